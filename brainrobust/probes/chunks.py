"""A per-image probe's finished batches on disk: the unit of resumption and of the DDP merge.

A probe that runs for hours (the full test split, long attacks) must survive preemption: each
batch of the test loop a probe finished is kept in the run's folder, a SIGTERM stops the work at
the next batch, and a rerun of the same run (same results key, same batching) takes the kept
batches instead of recomputing them. Under DDP the same files carry each rank's share to rank 0,
which merges them once every rank is done (`Probe.on_test_epoch_end`).

Within a batch, `in_batches` splits the work to the probe's own batch size and halves it when a
GPU runs out of memory.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch

from brainrobust.errors import BrainRobustError
from brainrobust.files import atomic_path, write_json

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Chunk:
    """One finished batch of one probe: its test-split positions, records and arrays."""

    positions: np.ndarray
    records: pd.DataFrame
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    exact: dict[str, tuple[str, ...]] = field(default_factory=dict)


class ArrayCapture:
    """Stands in for the RunStore while a probe works on one batch: its arrays are held for the
    merge. Reads (the run's directory, identity, other runs) pass through to the real store."""

    def __init__(self, store):
        self._store = store
        self.saved: dict[str, dict[str, np.ndarray]] = {}
        self.exact: dict[str, tuple[str, ...]] = {}

    def save_array(self, name: str, arr: np.ndarray | Mapping[str, np.ndarray],
                   exact: Collection[str] = ()) -> None:
        self.saved[name] = dict(arr) if isinstance(arr, Mapping) else {"data": arr}
        self.exact[name] = tuple(exact)

    def __getattr__(self, attr: str):
        return getattr(self._store, attr)


class ChunkStore:
    """The kept batches of one probe of one run, until its records are written."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, tag: str) -> Path:
        return self.folder / f"{tag}.npz"

    def save(self, tag: str, chunk: Chunk) -> None:
        arrays = {f"a/{name}/{key}": np.asarray(value)
                  for name, entries in chunk.arrays.items() for key, value in entries.items()}
        buf = io.BytesIO()
        chunk.records.to_parquet(buf, index=False)
        arrays["__records__"] = np.frombuffer(buf.getvalue(), dtype=np.uint8)
        arrays["__positions__"] = np.asarray(chunk.positions, dtype=np.int64)
        arrays["__exact__"] = np.array(json.dumps({k: list(v) for k, v in chunk.exact.items()}))
        with atomic_path(self._path(tag)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    def load(self, tag: str) -> Chunk | None:
        path = self._path(tag)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                stored = {k: npz[k] for k in npz.files}
            records = pd.read_parquet(io.BytesIO(stored.pop("__records__").tobytes()))
        except (OSError, ValueError) as err:
            log.warning("kept batch %s is unreadable (%s); redoing it", path, err)
            return None
        chunk = Chunk(stored.pop("__positions__"), records,
                      exact={k: tuple(v) for k, v in json.loads(str(stored.pop("__exact__"))).items()})
        for entry, value in stored.items():
            _, name, key = entry.split("/", 2)
            chunk.arrays.setdefault(name, {})[key] = value
        return chunk

    def write_manifest(self, name: str, tags: list[str]) -> None:
        write_json(self.folder / f"{name}.json", tags)

    def read_manifest(self, name: str) -> list[str] | None:
        path = self.folder / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def in_batches(n: int, batch_size: int, work: Callable[[int, int], T],
               advance: Callable[[int], object] | None = None) -> list[T]:
    """`work(start, stop)` over [0, n) in batches of `batch_size`; a batch that runs out of GPU
    memory is redone at half the size. `advance(n_done)` follows each batch (a progress bar)."""
    out, start = [], 0
    while start < n:
        stop = min(n, start + batch_size)
        try:
            out.append(work(start, stop))
        except torch.cuda.OutOfMemoryError:
            batch_size = _halve(batch_size)
            continue
        if advance is not None:
            advance(stop - start)
        start = stop
    return out


def _halve(batch_size: int) -> int:
    if batch_size == 1:
        raise BrainRobustError(
            "out of GPU memory with one image per batch; use a smaller data.image_size "
            "or model, or a GPU with more memory") from None
    torch.cuda.empty_cache()
    log.warning("out of GPU memory: batch size lowered to %d", batch_size // 2)
    return batch_size // 2
