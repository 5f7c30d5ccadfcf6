"""Partial copies of NSD files, written by `python -m brainrobust fetch nsd --roi-only`.

A partial copy keeps the real file's name, dataset name, shape and dtype, so the loader reads it
unchanged, but holds only some elements: the voxels of the fetched ROIs in each
betas_sessionNN.hdf5, the images of the fetched subjects in nsd_stimuli.hdf5. The elements it
holds are listed in a dataset beside the data. The others read as zeros, so the loader must call
`require_voxels` / `require_rows` before trusting a read.
"""

from __future__ import annotations

import os

import h5py
import numpy as np

from brainrobust.errors import DataError

VOXELS = "brainrobust_fetched_voxels"  # flat indices into the (Z, Y, X) beta grid, C order
ROWS = "brainrobust_fetched_rows"  # 0-based 73k ids held by a partial stimuli file
ROIS_ATTR = "brainrobust_rois"  # the ROIs whose voxels a partial betas file holds
SUBJECTS_ATTR = "brainrobust_subjects"  # the subjects whose images a partial stimuli file holds


def require_voxels(f: h5py.File, path: str | os.PathLike, flat: np.ndarray) -> None:
    """Refuse a read of voxels (flat grid indices) that a partial betas file does not hold."""
    if VOXELS in f and len(np.setdiff1d(flat, f[VOXELS][()])):
        rois = " ".join(str(r) for r in f.attrs[ROIS_ATTR])
        raise DataError(f"{path} holds only the voxels of {rois} (fetched with --roi-only); add "
                        f"the ROIs you load to fetch nsd --roi-only, or fetch without it")


def require_rows(f: h5py.File, path: str | os.PathLike, ids: np.ndarray) -> None:
    """Refuse a read of images (0-based 73k ids) that a partial stimuli file does not hold."""
    if ROWS not in f:
        return
    missing = np.setdiff1d(ids, f[ROWS][()])
    if len(missing):
        subjects = " ".join(str(s) for s in f.attrs[SUBJECTS_ATTR])
        raise DataError(f"{path} holds only the images of subjects {subjects} (fetched with "
                        f"--roi-only), not image {int(missing[0])}; fetch nsd --roi-only for that "
                        "subject too, or fetch without --roi-only")
