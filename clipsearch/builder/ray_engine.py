"""The Ray engine of the index builder: the same spans and shards, encoded across a cluster.

`run_build` plans the spans, skips the ones whose shard is already in the work area and
publishes the version, whichever engine encodes; this module only replaces the encoding
loop. The spans to do become a Ray Dataset (one row each), and `map_batches` hands them to
a pool of actors, each of which loads the model once through the model seam (one GPU each
when the cluster has GPUs), reads its span from the input by seeking to it, encodes it
with the local engine's `Encoder` and writes the shard, atomically, into the work area.
Inputs and the output directory must therefore be on storage every node sees (NFS, a
shared volume); each shard is written once, so a node lost mid-span only costs that span,
and a rerun of the command (with either engine) encodes only the spans without a shard.

Ray is an optional extra (`pip install 'clipsearch[ray]'`); the local engine never
imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from clipsearch.builder.encoder import ShardResult
from clipsearch.builder.options import BuildError, BuildOptions
from clipsearch.builder.writer import shard_path, write_shard
from clipsearch.inputs.readers import Span, read_span

log = logging.getLogger(__name__)


def _ray() -> Any:
    try:
        import ray
        import ray.data  # Ray Data is the part used here
    except ImportError:
        raise BuildError("--engine ray needs Ray: pip install 'clipsearch[ray]'") from None
    return ray


def connect(address: str | None) -> Any:
    """Join the cluster at `address` (auto, ray://host:10001, host:6379), or start a local one;
    an already connected driver (a test, a notebook) is used as it is."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False, log_to_driver=True,
                 logging_level=logging.WARNING)
    return ray


def plan_actors(ray: Any, opts: BuildOptions) -> tuple[int, float, float]:
    """(actors, GPUs each, CPUs each): one actor per GPU when the cluster has GPUs and the
    model is not forced onto the CPU; otherwise one per two CPUs (one decodes while the
    other's model runs), or `opts.ray_actors` when given."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if gpus and opts.device != "cpu":
        actors = opts.ray_actors or gpus
        return actors, 1.0, max(1.0, cpus // max(actors, 1) - 1.0)
    actors = opts.ray_actors or max(1, cpus // 2)
    return actors, 0.0, max(1.0, float(cpus // actors))


class SpanEncoder:
    """A Ray Data actor: loads the model once, then encodes whole spans into shards."""

    def __init__(self, opts: BuildOptions, spans: list[Span], work_dir: str, fingerprint: str, threads: int) -> None:
        import torch

        from clipsearch.builder.encoder import Encoder
        from clipsearch.model.load import load_model

        torch.set_num_threads(max(1, threads))
        device = opts.device
        if device == "auto":  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU, or to none
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(opts.model, opts.pretrained, device, opts.dtype)
        if model.info.fingerprint != fingerprint:
            raise BuildError(f"a Ray actor loaded {opts.model} as {model.info.fingerprint}, the job has {fingerprint}: "
                             "every node must see the same checkpoint")
        self.opts, self.spans, self.work_dir = opts, spans, Path(work_dir)
        self.encoder = Encoder(model, workers=0, batch_size=opts.batch_size, max_image_bytes=opts.max_image_bytes,
                               max_image_pixels=opts.max_image_pixels, image_decode=opts.image_decode,
                               exif_orientation=opts.exif_orientation, thumbnails=opts.thumbnails)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        done = []
        for index in batch["span"]:
            i = int(index)
            opts = self.opts
            shard = self.encoder.encode(read_span(opts.inputs, self.spans[i], opts.fmt, opts.schema, opts.base,
                                                          opts.confine))
            write_shard(shard_path(self.work_dir, i), shard)
            done.append(i)
        return {"span": done}


def encode_with_ray(opts: BuildOptions, spans: list[Span], todo: list[int], work_dir: Path, fingerprint: str,
                    finished: Callable[[int, ShardResult], None], read: Callable[[int], ShardResult]) -> None:
    """Encode spans `todo` on the cluster; `finished(i, shard)` on each, in the order they finish.
    A failure (or Ctrl-C) stops the dataset; finished shards stay in the work area for a rerun."""
    ray = connect(opts.ray_address)
    actors, gpus, cpus = plan_actors(ray, opts)
    actors = min(actors, len(todo))
    log.info("Ray: %d spans on %d actors (%g GPU, %g CPU each)", len(todo), actors, gpus, cpus)
    # One block per span: spans are the unit of work, and a block of several would hold a
    # finished span back until its neighbours are done.
    dataset = ray.data.from_items([{"span": i} for i in todo], override_num_blocks=len(todo))
    encoded = dataset.map_batches(
        SpanEncoder,
        fn_constructor_kwargs={"opts": replace(opts, progress=False), "spans": spans, "work_dir": str(work_dir),
                               "fingerprint": fingerprint, "threads": int(cpus)},
        batch_size=1, concurrency=actors, num_gpus=gpus, num_cpus=cpus, batch_format="numpy",
    )
    for row in encoded.iter_rows():
        i = int(row["span"])
        finished(i, read(i))


def add_on_ray(address: str | None) -> Callable[[bytes, str, list[tuple[int, int, str]]], None]:
    """An on-disk build's `PartAdder` (builder/indexing.py) that adds every part in a Ray task
    of its own, all at once: the trained index goes to the object store once, and each task
    reads its rows of the vector file and writes its part file into the work area, which
    every node must see (as for the encoding). The driver then merges the parts' lists."""

    def adder(index_bytes: bytes, vectors_file: str, parts: list[tuple[int, int, str]]) -> None:
        from clipsearch.builder.indexing import add_part

        ray = connect(address)
        task = ray.remote(num_cpus=1)(add_part)
        trained = ray.put(index_bytes)
        pending = [task.remote(trained, vectors_file, start, stop, out) for start, stop, out in parts]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                log.info("on-disk index: part %s added on the cluster", Path(ray.get(done[0])).name)
        except BaseException:
            for ref in pending:
                ray.cancel(ref)
            raise

    return adder
