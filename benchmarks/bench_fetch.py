"""Benchmark: bytes one subject costs from NSD's server, whole files vs `fetch nsd --roi-only`.

Serves over HTTP on 127.0.0.1 (tests/http_server.py) a twin written at subject 1's real grid
(81 x 104 x 83, 750 trials, int16, contiguous like the release, ROIs of subject 1's sizes) and a
stand-in of nsd_stimuli.hdf5 in the real layout (73,000 x 425 x 425 x 3 uint8, contiguous; a
sparse file whose pixels are zeros), and counts what the server sends:
  betas     `fetch nsd --roi-only ROI ...` through the command itself, per session file, against
            the session file's size; a sweep of the request-merging gap; and the loader's own
            box reads through h5py over HTTP (RangeFile) for comparison
  stimuli   the rows of 10,000 random images of the 73,000 (a subject's count; the real ids are
            spread the same way), planned exactly and checked against a fetched sample
Per-subject totals are 40 x the per-session figures (subject 1 has 40 sessions; every session
file has the same layout).

    python benchmarks/bench_fetch.py [--dir /big/tmp] [--sample 1000]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from http_server import FolderServer

from brainrobust.data import nsd
from brainrobust.data.rois import as_roi_specs
from brainrobust.data.synthetic import write_synthetic_nsd
from brainrobust.fetch import remote
from brainrobust.fetch.http import Client, RangeFile
from brainrobust.fetch.nsd import fetch_nsd, session_path

GRID = (81, 104, 83)  # subject 1, NIfTI (X, Y, Z)
SIZES = {"FFA-1": 484, "FFA-2": 310, "EBA": 2971, "PPA": 1033}  # subject 1 reference counts
SESSIONS = 40
STIMULI = (73_000, 425, 425, 3)
SUBJECT_IMAGES = 10_000
GAPS = (0, 1 << 14, 1 << 17, 1 << 20)


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def sparse_stimuli(path: Path) -> None:
    """The real stimuli layout without writing its 39.6 GB: early allocation, never filled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        h5py.h5d.create(f.id, b"imgBrick", h5py.h5t.STD_U8LE, h5py.h5s.create_simple(STIMULI),
                        dcpl=dcpl)


def roi_voxels(loader: nsd.NSDLoader, rois: list[str]) -> np.ndarray:
    masks, _ = loader._roi_masks(1, as_roi_specs(rois))
    return np.flatnonzero(np.logical_or.reduce(list(masks.values())))


def betas_rows(root: Path, server: FolderServer, loader: nsd.NSDLoader) -> list[str]:
    session = session_path(loader, 1, 1)
    key = session.relative_to(root).as_posix()
    size = session.stat().st_size
    rows = [("| ROIs | voxels | bytes per session | requests per session | share of the file | "
             "per subject (40 sessions) | fetch s per session | on disk per session | "
             "FFA load s, partial vs whole files |"),
            "|---|---|---|---|---|---|---|---|---|"]
    for rois in (["FFA"], ["FFA", "EBA", "PPA"]):
        out = Path(tempfile.mkdtemp(dir=root.parent))
        before = dict(server.body_bytes), len(server.requests)
        start = time.perf_counter()
        fetch_nsd(out, [1], base_url=server.url, accept_terms=True, roi_only=rois)
        seconds = (time.perf_counter() - start) / 2
        sent = server.body_bytes[key] - before[0].get(key, 0)
        requests = sum(1 for m, p, r in server.requests[before[1]:]
                       if m == "GET" and p.lstrip("/") == key and r)
        disk = session_path(nsd.NSDLoader(out), 1, 1).stat().st_size
        loads = [load_seconds(r) for r in (out, root)]
        rows.append(f"| {' '.join(rois)} | {len(roi_voxels(loader, rois))} | {sent / 1e6:.1f} MB "
                    f"| {requests} | {sent / size:.1%} | {gb(SESSIONS * sent)} of "
                    f"{gb(SESSIONS * size)} | {seconds:.1f} | {disk / 1e6:.1f} MB | "
                    f"{loads[0]:.2f} vs {loads[1]:.2f} |")
        shutil.rmtree(out)
    return rows


def load_seconds(root: Path) -> float:
    """NSDLoader.load of FFA (both sessions, no cache), warm page cache: best of 3."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        nsd.NSDLoader(root).load(1, "FFA", "train")
        times.append(time.perf_counter() - start)
    return min(times)


def gap_rows(loader: nsd.NSDLoader, size: int) -> list[str]:
    flat = roi_voxels(loader, ["FFA", "EBA", "PPA"])
    elements = remote.betas_elements(flat, (750, *GRID[::-1]))
    rows = ["| gap (bytes) | bytes per session | requests per session | share |",
            "|---|---|---|---|"]
    for gap in GAPS:
        nbytes, requests = remote.planned_bytes(elements, 2, gap)
        mark = " (default)" if gap == remote.GAP else ""
        rows.append(f"| {gap}{mark} | {nbytes / 1e6:.1f} MB | {requests} | {nbytes / size:.1%} |")
    return rows


def h5py_over_http(root: Path, server: FolderServer, loader: nsd.NSDLoader) -> str:
    """The loader's own FFA box reads, through h5py over range requests."""
    client = Client()
    session = session_path(loader, 1, 1)
    found = client.head(f"{server.url}/{session.relative_to(root).as_posix()}")
    zyx = np.stack(np.unravel_index(roi_voxels(loader, ["FFA"]), GRID[::-1]), axis=1)
    start = time.perf_counter()
    with h5py.File(RangeFile(client, found), "r") as f:
        for idx in nsd.read_boxes(zyx):
            lo, hi = zyx[idx].min(0), zyx[idx].max(0) + 1
            f["betas"][:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return (f"FFA through h5py over HTTP (the loader's box reads, 64 KiB blocks): "
            f"{client.bytes_received / 1e6:.1f} MB in {client.requests} requests per session, "
            f"{time.perf_counter() - start:.1f} s")


def stimuli_rows(scratch: Path, sample: int) -> list[str]:
    served = scratch / "stimuli"
    sparse_stimuli(served / "nsd_stimuli.hdf5")
    ids = np.sort(np.random.default_rng(0).choice(STIMULI[0], SUBJECT_IMAGES, replace=False))
    unit = int(np.prod(STIMULI[1:]))
    with FolderServer(served, md5_etags=False) as server:
        client = Client()
        found = client.head(f"{server.url}/nsd_stimuli.hdf5")
        planned, requests = remote.planned_bytes(ids, unit)
        part = ids[:: SUBJECT_IMAGES // sample]
        start = time.perf_counter()
        remote.fetch_stimuli(client, found, scratch / "local" / "nsd_stimuli.hdf5", part, [1], 8,
                             lambda n: None)
        seconds = time.perf_counter() - start
        sent = server.body_bytes["nsd_stimuli.hdf5"]
        planned_part = remote.planned_bytes(part, unit)[0]
    return [f"| stimuli | whole file | {gb(found.size)} | 1 |",
            (f"| stimuli | {SUBJECT_IMAGES} images (planned) | {gb(planned)} "
             f"({planned / found.size:.1%}) | {requests} |"),
            (f"check: {len(part)} images fetched, {sent / 1e6:.1f} MB sent for "
             f"{planned_part / 1e6:.1f} MB planned (the rest: HDF5 header), {seconds:.1f} s")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="scratch folder (needs ~2.5 GB)")
    parser.add_argument("--sample", type=int, default=1000, help="stimuli rows actually fetched")
    args = parser.parse_args()
    logging.getLogger("brainrobust").setLevel(logging.ERROR)  # the twin's absent subjects
    scratch = Path(tempfile.mkdtemp(prefix="bench_fetch_", dir=args.dir))
    try:
        root = scratch / "nsd"
        start = time.perf_counter()
        write_synthetic_nsd(root, n_subjects=1, sessions=(2,), grid=GRID, image_size=16,
                            roi_sizes=SIZES)
        print(f"generated 2 sessions on grid {GRID} in {time.perf_counter() - start:.0f} s")
        loader = nsd.NSDLoader(root)
        size = session_path(loader, 1, 1).stat().st_size
        with FolderServer(root, md5_etags=False) as server:
            print("\n".join(betas_rows(root, server, loader)))
            print()
            print("\n".join(gap_rows(loader, size)))
            print()
            print(h5py_over_http(root, server, loader))
        print()
        print("\n".join(stimuli_rows(scratch, args.sample)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
