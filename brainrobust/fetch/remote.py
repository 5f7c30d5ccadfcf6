"""`fetch nsd --roi-only`: fetch only the ROI voxels of each betas file and the fetched subjects'
rows of the stimuli file, with HTTP range requests, into partial copies the loader reads
(`brainrobust.data.partial`).

The NSD release stores each dataset contiguous and uncompressed, so the bytes of any element
follow from the dataset's offset, which h5py reads from the remote header (a few 64 KiB blocks).
The wanted elements are grouped into runs; runs less than GAP bytes apart share a request (one
request costs about as much time as that many bytes), and the requests run in parallel.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from brainrobust.data import nsd, partial
from brainrobust.errors import DataError
from brainrobust.fetch.http import Client, FetchError, RangeFile, Remote
from brainrobust.files import atomic_path

GAP = 1 << 17  # bytes; benchmarks/bench_fetch.py measures the trade-off
MAX_REQUEST = 1 << 24  # bytes per request: bounds memory and keeps requests parallel
WORK_PREFIX = ".roi-only."  # the stimuli copy being filled; resumed after a kill
_SOURCE = "brainrobust_source"  # attribute: the remote file a partial copy was read from
_FLUSH_BYTES = 1 << 28  # stimuli bytes written between two updates of the row list

Progress = Callable[[int], object]


@dataclass(frozen=True)
class RemoteDataset:
    """A contiguous, uncompressed dataset in a remote HDF5 file."""

    remote: Remote
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int


def open_remote_dataset(client: Client, remote: Remote, name: str, dtype: str,
                        expected: str) -> RemoteDataset:
    """Read a remote dataset's layout from the file's header with the loader's own checks."""
    source = RangeFile(client, remote)
    try:
        with h5py.File(source, "r") as f:
            ds = nsd._h5_dataset(f, Path(remote.url), name, dtype, expected)
            offset = ds.id.get_offset()
            if ds.chunks is not None or offset is None:
                raise FetchError(f"{remote.url} stores {name!r} chunked or compressed; "
                                 "--roi-only reads contiguous datasets (NSD's layout) only: "
                                 "fetch without --roi-only")
            return RemoteDataset(remote, ds.shape, ds.dtype, offset)
    except OSError as err:
        if source.failure is not None:
            raise source.failure from None
        raise FetchError(f"{remote.url} is not a readable HDF5 file ({str(err).splitlines()[0]})"
                         "; check --base-url") from None


def plan_requests(elements: np.ndarray, unit: int, gap: int = GAP,
                  cap: int = MAX_REQUEST) -> list[tuple[int, int]]:
    """[start, stop) element ranges covering the sorted `elements` (each `unit` bytes).

    Runs of wanted elements less than `gap` bytes apart share a range; a range spans at most
    `cap` bytes (or one element).
    """
    if not len(elements):
        return []
    skip, step = gap // unit, max(1, cap // unit)
    breaks = np.flatnonzero(np.diff(elements) > skip + 1) + 1
    ranges = []
    for first, last in zip(elements[np.r_[0, breaks]], elements[np.r_[breaks, len(elements)] - 1]):
        ranges += [(int(a), int(min(a + step, last + 1))) for a in range(first, last + 1, step)]
    return ranges


def fetch_elements(client: Client, rds: RemoteDataset, elements: np.ndarray, unit: int,
                   consume: Callable[[np.ndarray, np.ndarray], None], jobs: int,
                   progress: Progress) -> None:
    """Fetch the sorted `elements` (numbered in `unit`-byte steps from the data's offset).

    `consume(positions, data)` receives, per request, the positions in `elements` it covers and
    their bytes as a (len(positions), unit) uint8 array; it runs in the calling thread.
    """
    requests = plan_requests(elements, unit)
    with ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(client.read_range, rds.remote, rds.offset + a * unit,
                               rds.offset + b * unit): (a, b) for a, b in requests}
        try:
            for future in as_completed(futures):
                a, b = futures[future]
                data = np.frombuffer(future.result(), np.uint8).reshape(b - a, unit)
                lo, hi = np.searchsorted(elements, [a, b])
                consume(np.arange(lo, hi), data[elements[lo:hi] - a])
                progress(data.nbytes)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def planned_bytes(elements: np.ndarray, unit: int, gap: int = GAP) -> tuple[int, int]:
    """(bytes, requests) that fetching `elements` will cost."""
    requests = plan_requests(elements, unit, gap)
    return sum(b - a for a, b in requests) * unit, len(requests)


def _source(remote: Remote) -> str:
    return json.dumps({"url": remote.url, "size": remote.size, "etag": remote.etag},
                      sort_keys=True)


def _same_source(f: h5py.File, remote: Remote) -> bool:
    """Whether a partial copy was read from this version of the remote file (the host may
    differ: a mirror holds the same bytes)."""
    try:
        mine = json.loads(f.attrs[_SOURCE])
    except (KeyError, ValueError):
        return False
    return (mine["size"], mine["etag"]) == (remote.size, remote.etag)


# ---- betas ---------------------------------------------------------------------------------
def betas_elements(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Item numbers of the voxels `flat` (sorted, (Z, Y, X) C order) in every trial."""
    volume = int(np.prod(shape[1:]))
    return (np.arange(shape[0])[:, None] * volume + flat[None, :]).ravel()


def read_partial_betas(path: Path, remote: Remote) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(voxels, values (trials, voxels), ROIs) a partial copy of `remote` holds; empty when
    `path` is missing, unreadable, a full file or read from another version of the source."""
    try:
        with h5py.File(path, "r") as f:
            if partial.VOXELS in f and _same_source(f, remote):
                flat = f[partial.VOXELS][()]
                ds = f["betas"]
                values = np.empty((ds.shape[0], len(flat)), np.int16)
                rows = flat // ds.shape[3]
                for row in np.unique(rows):
                    z, y = divmod(int(row), ds.shape[2])
                    cols = np.flatnonzero(rows == row)
                    values[:, cols] = ds[:, z, y, :][:, flat[cols] % ds.shape[3]]
                return flat, values, [str(r) for r in f.attrs[partial.ROIS_ATTR]]
    except (OSError, KeyError):
        pass
    return np.zeros(0, np.int64), np.zeros((0, 0), np.int16), []


def write_partial_betas(path: Path, shape: tuple[int, ...], flat: np.ndarray,
                        values: np.ndarray, rois: list[str], remote: Remote) -> None:
    """A betas file of the real shape holding only the voxels `flat`; each chunk is one grid
    row over all trials, so the unfetched rows take no space."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("betas", shape, np.int16, chunks=(shape[0], 1, 1, shape[3]),
                              compression="gzip", compression_opts=1, shuffle=True)
        rows = flat // shape[3]
        for row in np.unique(rows):
            cols = np.flatnonzero(rows == row)
            block = np.zeros((shape[0], shape[3]), np.int16)
            block[:, flat[cols] % shape[3]] = values[:, cols]
            z, y = divmod(int(row), shape[2])
            ds[:, z, y, :] = block
        f.create_dataset(partial.VOXELS, data=flat.astype(np.int64))
        f.attrs[partial.ROIS_ATTR] = rois
        f.attrs[_SOURCE] = _source(remote)


def fetch_betas(client: Client, remote: Remote, path: Path, flat: np.ndarray,
                grid_zyx: tuple[int, ...], rois: list[str], jobs: int,
                progress: Progress) -> None:
    """Add the voxels `flat` of the remote betas file to the partial copy at `path`."""
    expected = (nsd.TRIALS_PER_SESSION, *grid_zyx)
    rds = open_remote_dataset(client, remote, "betas", "int16",
                              f"of shape (750, Z, Y, X) = {expected}")
    if rds.shape != expected:
        raise DataError(f"{remote.url} holds betas {rds.shape}, but the subject's ROI files "
                        f"give (750, Z, Y, X) = {expected}; check --base-url")
    have, values, have_rois = read_partial_betas(path, remote)
    new = np.setdiff1d(flat, have)
    elements = betas_elements(new, rds.shape)
    fetched = np.empty(len(elements), np.int16)

    def consume(positions: np.ndarray, data: np.ndarray) -> None:
        fetched[positions] = data.view(np.int16).ravel()

    fetch_elements(client, rds, elements, rds.dtype.itemsize, consume, jobs, progress)
    union = np.union1d(have, new)
    merged = np.empty((rds.shape[0], len(union)), np.int16)
    merged[:, np.searchsorted(union, have)] = values.reshape(rds.shape[0], len(have))
    merged[:, np.searchsorted(union, new)] = fetched.reshape(rds.shape[0], len(new))
    rois = [*have_rois, *(r for r in rois if r not in have_rois)]
    write_partial_betas(path, rds.shape, union, merged, rois, remote)


def betas_cost(client: Client, remote: Remote, path: Path, flat: np.ndarray) -> tuple[int, int]:
    """(bytes, requests) that `fetch_betas` would fetch for one session file."""
    new = np.setdiff1d(flat, read_partial_betas(path, remote)[0])
    if not len(new):
        return 0, 0
    rds = open_remote_dataset(client, remote, "betas", "int16", "of shape (750, Z, Y, X)")
    return planned_bytes(betas_elements(new, rds.shape), rds.dtype.itemsize)


# ---- stimuli -------------------------------------------------------------------------------
def _open_work(path: Path, rds: RemoteDataset) -> h5py.File:
    """The stimuli copy to fill: a killed run's work file, else a copy of the partial file at
    `path`, else an empty one (fill value 0, chunk per image, so unfetched rows take no space)."""
    work = path.with_name(WORK_PREFIX + path.name)
    for candidate in (work, path):
        try:
            with h5py.File(candidate, "r") as f:
                usable = partial.ROWS in f and _same_source(f, rds.remote)
        except OSError:
            usable = False
        if usable:
            if candidate != work:
                shutil.copyfile(candidate, work)
            return h5py.File(work, "r+")
    work.parent.mkdir(parents=True, exist_ok=True)
    f = h5py.File(work, "w")
    f.create_dataset("imgBrick", rds.shape, np.uint8, chunks=(1, *rds.shape[1:]))
    f.create_dataset(partial.ROWS, (0,), np.int64, maxshape=(None,), chunks=(4096,))
    f.attrs[partial.SUBJECTS_ATTR] = np.zeros(0, np.int64)
    f.attrs[_SOURCE] = _source(rds.remote)
    return f


def stimuli_rows_missing(path: Path, remote: Remote, rows: np.ndarray) -> np.ndarray:
    """The rows of `rows` a partial copy at `path` (or its work file) does not hold yet."""
    for candidate in (path.with_name(WORK_PREFIX + path.name), path):
        try:
            with h5py.File(candidate, "r") as f:
                if partial.ROWS in f and _same_source(f, remote):
                    return np.setdiff1d(rows, f[partial.ROWS][()])
        except OSError:
            continue
    return rows


def stimuli_dataset(client: Client, remote: Remote) -> RemoteDataset:
    return open_remote_dataset(client, remote, "imgBrick", "uint8",
                               "of shape (73000, 425, 425, 3)")


def fetch_stimuli(client: Client, remote: Remote, path: Path, rows: np.ndarray,
                  subjects: list[int], jobs: int, progress: Progress) -> None:
    """Add the images `rows` (0-based 73k ids of `subjects`) to the partial copy at `path`."""
    rds = stimuli_dataset(client, remote)
    unit = int(np.prod(rds.shape[1:]))
    with _open_work(path, rds) as f:
        ds, listed = f["imgBrick"], f[partial.ROWS]
        missing = np.setdiff1d(rows, listed[()])
        written: list[np.ndarray] = []
        pending = 0

        def record() -> None:
            # Rows are listed only after their pixels are flushed: a kill loses at most the
            # unlisted ones, which the next run fetches again.
            nonlocal pending
            f.flush()
            new = np.concatenate(written) if written else np.zeros(0, np.int64)
            listed.resize((len(listed) + len(new),))
            listed[len(listed) - len(new):] = new
            f.flush()
            written.clear()
            pending = 0

        def consume(positions: np.ndarray, data: np.ndarray) -> None:
            nonlocal pending
            ids = missing[positions]
            for k, row in enumerate(ids):
                ds[row] = data[k].reshape(rds.shape[1:])
            written.append(ids)
            pending += data.nbytes
            if pending >= _FLUSH_BYTES:
                record()

        fetch_elements(client, rds, missing, unit, consume, jobs, progress)
        record()
        held = {int(s) for s in f.attrs[partial.SUBJECTS_ATTR]} | set(subjects)
        f.attrs[partial.SUBJECTS_ATTR] = np.array(sorted(held), np.int64)
    work = path.with_name(WORK_PREFIX + path.name)
    with open(work, "rb+") as fh:
        os.fsync(fh.fileno())
    work.replace(path)
