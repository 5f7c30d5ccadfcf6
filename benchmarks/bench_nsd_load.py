"""Benchmark: loading one ROI from NSD betas on subject 1's real grid vs reading whole volumes.

Writes (with the synthetic twin generator) two sessions of 750 trials on the 81 x 104 x 83
grid of subject 1 with realistic FFA (~800 voxels) and EBA (~3000 voxels) ROIs, then measures
each load in a fresh process:
  whole volume  read each session's whole (750, Z, Y, X) volume, pick the ROI voxels, then the
                loader's own z-scoring and repeat averaging (the peer)
  loader        NSDLoader.load: ROI bounding boxes only, z-score, average, noise ceilings
  cached        NSDLoader.load again, from the cache a previous load wrote
"warm": the beta files are in the page cache; "cold": their pages are dropped first
(posix_fadvise DONTNEED).

    python benchmarks/bench_nsd_load.py [--repeats 3] [--dir /big/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

from brainrobust.data import nsd
from brainrobust.data.rois import builtin_roi, label_codes, read_ctab
from brainrobust.data.synthetic import write_synthetic_nsd

GRID = (81, 104, 83)  # subject 1, NIfTI (X, Y, Z)
SIZES = {"FFA-1": 484, "FFA-2": 310, "EBA": 2971, "PPA": 1033}  # subject 1 reference counts


def roi_xyz(loader: nsd.NSDLoader, roi: str) -> np.ndarray:
    """(n, 3) NIfTI coordinates of an ROI of subject 1, read without the loader's ROI code."""
    spec = builtin_roi(roi)
    ctab = loader.ctab_path(1, spec.file)
    labels = np.rint(nib.load(loader.roi_path(1, spec.volume_stem)).get_fdata())
    return np.argwhere(np.isin(labels, label_codes(spec, read_ctab(ctab), ctab)))


def whole_volume_load(root: Path, roi: str) -> None:
    loader = nsd.NSDLoader(root)
    xyz = roi_xyz(loader, roi)
    files = sorted(loader.betas_dir(1).glob("betas_session*.hdf5"))
    trials = []
    for path in files:
        with h5py.File(path, "r") as f:
            volume = f["betas"][:]
        trials.append(nsd.zscore_sessions(volume[:, xyz[:, 2], xyz[:, 1], xyz[:, 0]] / 300.0))
        del volume
    shown = loader.design.trial_ids(1, len(files))
    ids = np.setdiff1d(np.unique(shown), loader.test_ids())
    nsd.average_repeats(np.concatenate(trials).astype(np.float32), shown, ids)


def worker(method: str, roi: str, root: Path, cache: str) -> None:
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    start = time.perf_counter()
    if method == "whole volume":
        whole_volume_load(root, roi)
    else:
        nsd.NSDLoader(root, cache_dir=cache or None).load(1, roi, "train")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "rss_mb": (peak - baseline) / 1024,
                      "heap_mb": tracemalloc.get_traced_memory()[1] / 2**20}))


def drop_page_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(method: str, roi: str, root: Path, cache: str = "") -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", method, roi, str(root), cache],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch folder (needs ~2.2 GB)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, roi, root, cache = args.worker
        worker(method, roi, Path(root), cache)
        return

    scratch = Path(tempfile.mkdtemp(prefix="bench_nsd_", dir=args.dir))
    try:
        start = time.perf_counter()
        root = scratch / "nsd"
        write_synthetic_nsd(root, n_subjects=1, sessions=(2,), grid=GRID, image_size=16,
                            roi_sizes=SIZES)
        print(f"generated 2 sessions on grid {GRID} in {time.perf_counter() - start:.0f} s")
        loader = nsd.NSDLoader(root)
        betas = sorted(loader.betas_dir(1).glob("betas_session*.hdf5"))
        rows = []
        for roi in ("FFA", "EBA"):
            zyx = roi_xyz(loader, roi)[:, ::-1]
            box_voxels = sum(int(np.prod(zyx[g].max(0) - zyx[g].min(0) + 1))
                             for g in nsd.read_boxes(zyx))
            read = {"whole volume": "100%", "loader": f"{box_voxels / np.prod(GRID):.1%}",
                    "cached": "0%"}
            for state in ("warm", "cold"):
                results = {}
                for method in ("whole volume", "loader"):
                    results[method] = []
                    for _ in range(args.repeats if state == "warm" else 1):
                        if state == "cold":
                            drop_page_cache(betas)
                        results[method].append(measure(method, roi, root))
                if state == "warm":
                    cache = str(scratch / f"cache-{roi}")
                    measure("loader", roi, root, cache)
                    results["cached"] = [measure("loader", roi, root, cache)
                                         for _ in range(args.repeats)]
                base = statistics.median(r["seconds"] for r in results["whole volume"])
                for method, runs in results.items():
                    seconds = statistics.median(r["seconds"] for r in runs)
                    rss = max(r["rss_mb"] for r in runs)
                    heap = max(r["heap_mb"] for r in runs)
                    rows.append((roi, len(zyx), read[method], state, method, seconds, heap, rss,
                                 base / seconds))
        header = ("ROI", "voxels", "betas read", "page cache", "method", "seconds",
                  "heap peak MB", "RSS growth MB", "speed-up")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for roi, n, share, state, method, seconds, heap, rss, ratio in rows:
            print(f"| {roi} | {n} | {share} | {state} | {method} | {seconds:.3f} | {heap:.0f} | "
                  f"{rss:.0f} | {ratio:.1f}x |")
        print("betas read: share of each session's volume read. heap peak: tracemalloc peak of "
              "the load (numpy buffers). RSS growth: of the process's max RSS (includes "
              "memory-mapped file pages). speed-up: vs whole volume in the same run. Median of "
              f"{args.repeats} warm runs, 1 cold run.")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
