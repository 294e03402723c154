"""The served index version, swapped between requests when a new one is published."""

from __future__ import annotations

import threading
from pathlib import Path

from clipsearch.index.format import VerifyMode, current_version_dir
from clipsearch.index.search import IndexSet, load_index_set


class IndexHolder:
    """Holds the served IndexSet and why none is served; swapping is one reference assignment.

    A search takes `holder.current` once and uses that object to the end, so a swap
    never changes an index under a search in flight.
    """

    def __init__(self, index_dir: Path | None) -> None:
        self.index_dir = index_dir
        self.current: IndexSet | None = None
        self.error: str | None = None
        self.refused: Path | None = None  # a version already refused: not retried by polling
        self._lock = threading.Lock()

    def pending_version(self) -> Path | None:
        """The published version directory if it differs from the served one, else None."""
        if self.index_dir is None:
            return None
        version_dir = current_version_dir(self.index_dir)
        if version_dir is None or (self.current is not None and self.current.path == version_dir):
            return None
        return version_dir

    def load(self, *, fingerprint: str, dim: int, backend: str, device: str, force: bool = False,
             verify: VerifyMode = "auto") -> IndexSet | None:
        """Load the published version of `index_dir` if it is new.

        On failure the served IndexSet stays and the exception propagates; the refused
        version is remembered so polling does not retry it (`force` does).
        """
        if self.index_dir is None:
            return None
        with self._lock:
            version_dir = current_version_dir(self.index_dir)
            if version_dir is None:
                if self.current is None:
                    self.error = f"no index version published in {self.index_dir} yet"
                return self.current
            if self.current is not None and self.current.path == version_dir:
                return self.current
            if version_dir == self.refused and not force:
                return self.current
            try:
                loaded = load_index_set(version_dir, fingerprint=fingerprint, dim=dim, backend=backend,
                                        device=device, verify=verify)
            except Exception:
                self.refused = version_dir
                raise
            self.current = loaded  # one reference assignment: searches in flight keep the old set
            self.error = None
            self.refused = None
            return loaded
