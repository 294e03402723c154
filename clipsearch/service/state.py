"""What a running service holds: settings, engine, indexes, metrics. No HTTP here."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from clipsearch.core.cpus import usable_cores
from clipsearch.core.errors import IndexLoadError, IndexRefused, ModelLoadError, NotReady
from clipsearch.index.format import Modality
from clipsearch.index.search import IndexSet, LoadedIndex, choose_backend
from clipsearch.model.base import Model
from clipsearch.model.load import load_model
from clipsearch.service.engine import Engine
from clipsearch.service.holder import IndexHolder
from clipsearch.service.metrics import Metrics
from clipsearch.service.settings import Settings

log = logging.getLogger(__name__)

GRAPH_MAX_BATCH = 64


@dataclass
class ServiceState:
    settings: Settings
    model: Model
    engine: Engine
    indexes: IndexHolder
    metrics: Metrics
    backend: str
    started: bool = field(default=False)
    last_refusal: str | None = field(default=None)  # the index error last logged

    @classmethod
    def build(cls, settings: Settings, model: Model | None = None, metrics: Metrics | None = None
              ) -> ServiceState:
        """Load the model (unless given) and the index; raises ModelLoadError / IndexLoadError.

        An index built with another model is not fatal: it is refused, logged, and
        readiness reports why, while `/embed` keeps working.
        """
        metrics = metrics or Metrics()
        if model is None:
            model = load_model(settings.model, settings.pretrained, settings.device, settings.dtype)
        if settings.torch_threads is not None or model.info.device == "cpu":
            model.set_threads(settings.torch_threads or default_model_threads(settings.workers))
        if model.info.fingerprint.startswith("random:"):
            log.warning("serving %s with RANDOM weights: vectors are meaningless outside tests and demos",
                        model.info.spec)
        if settings.warmup:
            # On the CPU a full batch of a large model takes seconds; 8 rows warm the same paths.
            full = settings.max_batch_size if model.info.device != "cpu" else min(8, settings.max_batch_size)
            try:
                model.warm_up(sorted({1, full}))
            except Exception as exc:  # fail at start, with the reason, rather than on every request
                raise ModelLoadError(f"{model.info.spec}: the model failed on a warm-up batch "
                                     f"({type(exc).__name__}: {exc})") from exc
        if settings.cuda_graphs and model.device.type == "cuda":
            # Larger batches are compute-bound (launches hide behind the math), and every
            # bucket holds its own activation memory: they stay eager.
            model.capture_graphs(min(settings.max_batch_size, GRAPH_MAX_BATCH))  # falls back to eager by itself
        metrics.set_model(model.info.__dict__)
        backend = choose_backend(settings.search_backend, model.info.device)
        state = cls(settings, model, Engine(model, settings, metrics), IndexHolder(settings.index_dir),
                    metrics, backend)
        state.load_index(fatal=True)
        return state

    def load_index(self, *, fatal: bool, force: bool = False) -> IndexSet | None:
        """(Re)load the published index version if it is new.

        A corrupt or mismatched version is refused with a log line and a metric, and
        the served one keeps serving. At start-up (`fatal`) an unreadable index is an
        error; a mismatched one only makes the service not ready.
        """
        if self.indexes.index_dir is None:
            return None
        before = self.indexes.current
        try:
            loaded = self.indexes.load(fingerprint=self.model.info.fingerprint, dim=self.model.dim,
                                       backend=self.backend, device=self.model.info.device, force=force,
                                       verify=self.settings.index_verify)
        except IndexLoadError as exc:
            self.metrics.index_load_failures.inc()
            served = f"; still serving {before.version}" if before is not None else ""
            if exc.message != self.last_refusal:  # once, then again only when the reason changes
                log.error("index version refused: %s%s", exc.message, served)
                self.last_refusal = exc.message
            if self.indexes.current is None:
                self.indexes.error = f"index refused: {exc.message}"
            if force:
                raise IndexRefused(exc.message) from None
            if fatal and exc.code != "index_mismatch":
                raise
            return self.indexes.current
        self.last_refusal = None
        if loaded is not None and loaded is not before:
            log.info("serving index version %s from %s", loaded.version, loaded.path)
            self.metrics.set_index(loaded.version, str(loaded.path))
            for modality, index in loaded.indexes.items():
                self.metrics.index_size.labels(modality).set(index.count)
        return loaded

    def not_ready_reason(self) -> str | None:
        if not self.started:
            return "model is loading"
        if self.indexes.index_dir is not None and self.indexes.current is None:
            return self.indexes.error or "index not loaded"
        return None

    def current_index(self) -> IndexSet:
        """The served index set, or NotReady saying why there is none."""
        current = self.indexes.current
        if current is None:
            if self.indexes.index_dir is None:
                raise NotReady("no index configured (set CLIPSEARCH_INDEX_DIR)")
            raise NotReady(self.indexes.error or "index not loaded")
        return current

    def index_for(self, modality: Modality) -> tuple[IndexSet, LoadedIndex]:
        """The served index of one modality, or NotReady saying why there is none."""
        current = self.current_index()
        index = current.get(modality)
        if index is None:
            raise NotReady(f"index version {current.version} has no {modality} index")
        return current, index



def default_model_threads(workers: int) -> int:
    """The model's CPU threads when not set: every core, shared by the worker processes. The
    event loop gets no core of its own: on 2 cores, 2 model threads served 1.4-1.5× the
    texts/s of 1 at 64 connections and 1.0-1.4× the images/s, on torch and ONNX Runtime
    (docs/benchmarks.md)."""
    return max(1, usable_cores() // max(1, workers))
