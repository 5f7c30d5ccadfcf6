"""Cache entries that concurrent jobs build once and share.

Jobs of a sweep, on one machine or on a cluster's shared filesystem, ask for the same entries at
the same time. An entry is read without a lock: it is written atomically (`brainrobust.files`),
so a reader finds a complete entry or none. A missing or damaged entry is built under an
exclusive lock and looked up again once the lock is held, so one job builds it while the others
wait for it and then read it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from brainrobust.errors import CacheError
from brainrobust.files import atomic_path, exclusive, unwritable, write_json

log = logging.getLogger(__name__)

T = TypeVar("T")


@contextlib.contextmanager
def holding(lock: Path, what: str) -> Iterator[None]:
    """`files.exclusive(lock)` for building `what`, saying so when it waits for another process;
    a lock file that cannot be made is a one-line StorageError."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive(lock, on_wait=lambda: log.info(
                "%s is being built by another process; waiting for it", what)))
        except OSError as err:
            raise unwritable(lock, err) from None
        yield


def cached(lock: Path | None, load: Callable[[], T | None], build: Callable[[], T],
           what: str) -> T:
    """`load()`'s entry, else `build()`'s, built by one process at a time.

    Parameters
    ----------
    lock
        The entry's lock file, in a `.locks` folder so that a listing of the entries' folder
        holds only entries. None builds without one: for DDP ranks, whose build runs
        collectives that every rank must join, so a rank waiting on a lock would hang them all.
    load
        The valid entry, None when there is none, or CacheError saying why it is unusable.
    build
        Computes the value, writes the entry (atomically) and returns the value.
    what
        The entry, as log lines name it.
    """
    try:
        value = load()
    except CacheError as err:
        log.warning("%s unusable (%s); rebuilding it", what, err)
        value = None
    if value is not None:
        return value
    if lock is None:
        return build()
    with holding(lock, what):
        with contextlib.suppress(CacheError):
            value = load()  # built by the process this one waited for
        return build() if value is None else value


class ArrayCache:
    """Arrays extracted from a dataset, stored as <name>.npy plus <name>.json.

    The json is written last and holds the key, shape, dtype and byte size, so an entry whose
    key differs or whose .npy is truncated or damaged is rebuilt, never trusted.
    """

    def __init__(self, directory: str | os.PathLike | None):
        self.dir = Path(directory) if directory is not None else None

    def fetch(self, name: str, key: dict[str, Any],
              build: Callable[[], tuple[np.ndarray, dict]]) -> tuple[np.ndarray, dict]:
        """(array, meta) of the entry `name`, built by `build()` when missing or unusable; a
        cache hit is a read-only memory map."""
        if self.dir is None:
            return build()

        def make() -> tuple[np.ndarray, dict]:
            array, meta = build()
            self._write(name, key, array, meta)
            return array, meta

        return cached(self.dir / ".locks" / f"{name}.lock", lambda: self._read(name, key), make,
                      f"cache entry {self.dir / name}")

    def _read(self, name: str, key: dict[str, Any]) -> tuple[np.ndarray, dict] | None:
        record_path, npy = self.dir / f"{name}.json", self.dir / f"{name}.npy"
        if not record_path.exists():
            return None
        try:
            record = json.loads(record_path.read_text())
            if record["key"] != json.loads(json.dumps(key, default=str)):
                raise CacheError("key differs")
            if npy.stat().st_size != record["nbytes"]:
                raise CacheError("size differs")
            array = np.load(npy, mmap_mode="r")
            if list(array.shape) != record["shape"] or str(array.dtype) != record["dtype"]:
                raise CacheError("shape or dtype differs")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CacheError(str(exc)) from None
        return array, record["meta"]

    def _write(self, name: str, key: dict[str, Any], array: np.ndarray, meta: dict) -> None:
        npy = self.dir / f"{name}.npy"
        with atomic_path(npy) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array))
        write_json(self.dir / f"{name}.json", {
            "key": key, "shape": list(array.shape), "dtype": str(array.dtype),
            "nbytes": npy.stat().st_size, "meta": meta,
        })
