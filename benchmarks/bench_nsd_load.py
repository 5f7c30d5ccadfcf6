"""Benchmark: loading one ROI from NSD betas on subject 1's real grid vs reading whole volumes.

Writes (synthetic twin generator) two sessions of 750 trials on the 81 x 104 x 83 grid of
subject 1 with realistic FFA (~800 voxels) and EBA (~3000 voxels) ROIs, then measures in a
fresh process per run:
  loader        NSDLoader.load: ROI bounding boxes only, z-score, repeat-average, noise ceiling
  whole volume  the same z-scoring and averaging after reading each session's whole volume
  cached        NSDLoader.load again with the cache of a previous load
Both "warm" (files in the page cache) and "cold" (pages dropped with posix_fadvise first).

    python benchmarks/bench_nsd_load.py [--repeats 3] [--dir /big/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = (81, 104, 83)  # subject 1, NIfTI (X, Y, Z)
SIZES = {"FFA-1": 484, "FFA-2": 310, "EBA": 2971, "PPA": 1033}  # subject 1 reference counts


def whole_volume_load(root: Path, roi: str) -> None:
    """The peer: read every session's whole (750, Z, Y, X) volume, then pick the ROI voxels."""
    import h5py
    import nibabel as nib
    import numpy as np

    from brainrobust.data import nsd
    from brainrobust.data.rois import builtin_roi, label_codes, read_ctab

    loader = nsd.NSDLoader(root)
    spec = builtin_roi(roi)
    ctab = loader.ctab_path(1, spec.file)
    labels = np.rint(nib.load(loader.roi_path(1, spec.volume_stem)).get_fdata())
    xyz = np.argwhere(np.isin(labels, label_codes(spec, read_ctab(ctab), ctab)))
    trials = []
    files = sorted(loader.betas_dir(1).glob("betas_session*.hdf5"))
    for path in files:
        with h5py.File(path, "r") as f:
            volume = f["betas"][:]
        trials.append(nsd.zscore_sessions(volume[:, xyz[:, 2], xyz[:, 1], xyz[:, 0]] / 300.0))
        del volume
    trials = np.concatenate(trials).astype(np.float32)
    shown = loader.design.trial_ids(1, len(files))
    ids = np.setdiff1d(np.unique(shown), loader.test_ids())
    nsd.average_repeats(trials, shown, ids)


def worker(method: str, roi: str, root: Path, cache: str) -> None:
    import resource

    from brainrobust.data.nsd import NSDLoader

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "whole volume":
        whole_volume_load(root, roi)
    else:
        NSDLoader(root, cache_dir=cache or None).load(1, roi, "train")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mb": (peak - baseline) / 1024}))


def drop_page_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(method: str, roi: str, root: Path, cache: str = "") -> dict:
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

    import numpy as np

    from brainrobust.data.nsd import NSDLoader, read_boxes
    from brainrobust.data.rois import builtin_roi
    from brainrobust.data.synthetic import write_synthetic_nsd

    scratch = Path(tempfile.mkdtemp(prefix="bench_nsd_", dir=args.dir))
    try:
        start = time.perf_counter()
        root = scratch / "nsd"
        write_synthetic_nsd(root, n_subjects=1, sessions=(2,), grid=GRID, image_size=16,
                            roi_sizes=SIZES)
        print(f"generated 2 sessions on grid {GRID} in {time.perf_counter() - start:.0f} s")
        loader = NSDLoader(root)
        betas = sorted(loader.betas_dir(1).glob("betas_session*.hdf5"))
        rows = []
        for roi in ("FFA", "EBA"):
            masks, _ = loader._roi_masks(1, [builtin_roi(roi)])
            zyx = np.argwhere(masks[roi])
            box_voxels = sum(int(np.prod(zyx[g].max(0) - zyx[g].min(0) + 1))
                             for g in read_boxes(zyx))
            read = {"whole volume": "100%", "loader": f"{box_voxels / np.prod(GRID):.1%}",
                    "cached": "0%"}
            for state in ("warm", "cold"):
                results = {}
                for method in ("whole volume", "loader"):
                    results[method] = []
                    for _ in range(args.repeats if state == "warm" else 1):
                        if state == "cold":
                            drop_page_cache(betas)
                        results[method].append(run(method, roi, root))
                if state == "warm":
                    cache = str(scratch / f"cache-{roi}")
                    run("loader", roi, root, cache)
                    results["cached"] = [run("loader", roi, root, cache)
                                         for _ in range(args.repeats)]
                base = statistics.median(r["seconds"] for r in results["whole volume"])
                for method, runs in results.items():
                    seconds = statistics.median(r["seconds"] for r in runs)
                    peak = max(r["peak_mb"] for r in runs)
                    rows.append((roi, len(zyx), read[method], state, method, seconds, peak,
                                 base / seconds))
        header = ("ROI", "voxels", "betas read", "page cache", "method", "seconds",
                  "peak MB", "speed-up")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for roi, n, share, state, method, seconds, peak, ratio in rows:
            print(f"| {roi} | {n} | {share} | {state} | {method} | {seconds:.3f} | {peak:.0f} | "
                  f"{ratio:.1f}x |")
        print("betas read = share of each session's volume read; peak MB = growth of the "
              "process's max RSS during the load; speed-up vs whole volume in the same run; "
              f"median of {args.repeats} warm runs, 1 cold run (pages dropped by posix_fadvise)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
