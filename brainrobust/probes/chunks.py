"""A probe's work over its images, chunk by chunk: the unit of memory, progress and resumption.

A probe that runs for hours (the full test split, long attacks) must survive preemption: each
finished chunk is kept in the run's folder with the state of the random generator after it, a
SIGTERM stops the work at the next chunk boundary, and a rerun of the same run (same results
key) takes the kept chunks and continues at the first missing one, giving the records an
uninterrupted run gives. A chunk that runs out of GPU memory is redone at half the size.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from brainrobust.errors import BrainRobustError, Interrupted
from brainrobust.files import atomic_path

log = logging.getLogger(__name__)

T = TypeVar("T")


class ChunkStore:
    """Finished chunks of one probe (and DDP rank) of one run, until its records are written."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, tag: str, start: int) -> Path:
        return self.folder / f"{tag}-{start:08d}.npz"

    def load(self, tag: str, start: int) -> tuple[int, Any, torch.Tensor | None] | None:
        """(stop, result, generator state after the chunk) of the chunk kept at `start`."""
        path = self._path(tag, start)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as err:
            log.warning("kept chunk %s is unreadable (%s); redoing it", path, err)
            return None
        head = json.loads(str(arrays.pop("__head__")))
        state = arrays.pop("__generator__", None)
        return head["stop"], _unpack(head["tree"], arrays), (
            None if state is None else torch.from_numpy(state))

    def save(self, tag: str, start: int, stop: int, result: Any,
             generator: torch.Generator | None) -> None:
        arrays: dict[str, np.ndarray] = {}
        tree = _pack(result, arrays)
        arrays["__head__"] = np.array(json.dumps({"stop": stop, "tree": tree}))
        if generator is not None:
            arrays["__generator__"] = generator.get_state().cpu().numpy()
        with atomic_path(self._path(tag, start)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def run_chunks(
    n: int,
    batch_size: int,
    work: Callable[[int, int], T],
    advance: Callable[[int], Any] | None = None,
    kept: ChunkStore | None = None,
    tag: str = "",
    generator: torch.Generator | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[T]:
    """`work(start, stop)` over [0, n) in chunks of `batch_size`.

    With `kept`, finished chunks are saved and reused, and `generator` (the one `work` draws
    from) is restored to its state after the last reused chunk. `should_stop()` is asked before
    each new chunk; when it says yes the work ends with `Interrupted`. Only the random draws
    (random starts, control noise) follow the chunking: rerun with the logged batch size to
    reproduce them bit for bit. `advance(n_done)` follows each chunk (a progress bar).
    """
    out, start, reused_chunks = [], 0, 0
    while start < n:
        reused = kept.load(tag, start) if kept is not None else None
        if reused is not None:
            stop, result, state = reused
            if state is not None and generator is not None:
                generator.set_state(state.to(generator.get_state().device))
            out.append(result)
            reused_chunks += 1
        else:
            if should_stop is not None and should_stop():
                raise Interrupted(f"stopped by a signal at image {start} of {n} ({tag}); the "
                                  "finished chunks are kept: rerun the same command to resume")
            stop = min(n, start + batch_size)
            try:
                result = work(start, stop)
            except torch.cuda.OutOfMemoryError:
                batch_size = _halve(batch_size)
                continue
            if kept is not None:
                kept.save(tag, start, stop, result, generator)
            out.append(result)
        if advance is not None:
            advance(stop - start)
        start = stop
    if reused_chunks:
        log.info("%s: reused %d kept chunks of an interrupted run", tag, reused_chunks)
    return out


def _halve(batch_size: int) -> int:
    if batch_size == 1:
        raise BrainRobustError(
            "out of GPU memory with one image per batch; use a smaller data.image_size "
            "or model, or a GPU with more memory") from None
    torch.cuda.empty_cache()
    log.warning("out of GPU memory: batch size lowered to %d", batch_size // 2)
    return batch_size // 2


def _pack(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    """A JSON description of a tree of dicts, tuples and lists over numpy arrays, whose leaves
    are stored in `arrays` under numbered keys."""
    if isinstance(obj, dict):
        return {"dict": {str(k): _pack(v, arrays) for k, v in obj.items()}}
    if isinstance(obj, (tuple, list)):
        return {type(obj).__name__: [_pack(v, arrays) for v in obj]}
    key = f"a{len(arrays)}"
    arrays[key] = np.asarray(obj)
    return {"array": key}


def _unpack(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    (kind, body), = tree.items()
    if kind == "dict":
        return {k: _unpack(v, arrays) for k, v in body.items()}
    if kind in ("tuple", "list"):
        items = [_unpack(v, arrays) for v in body]
        return tuple(items) if kind == "tuple" else items
    return arrays[body]
