"""Loader of the real Natural Scenes Dataset layout (see shared/reference/nsd-layout.md).

What it reads, under the dataset root:
  nsddata/experiments/nsd/nsd_expdesign.mat            design; every index in it is 1-based
  nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5         imgBrick uint8 (73000, 425, 425, 3)
  nsddata_betas/ppdata/subjXX/func1pt8mm/betas_fithrf_GLMdenoise_RR/
      betas_sessionNN.hdf5                             betas int16 (750, Z, Y, X), PSC x 300
      ncsnr.nii.gz                                     float (X, Y, Z), optional
  nsddata/ppdata/subjXX/func1pt8mm/roi/[lh.|rh.]floc-*.nii.gz   label codes (X, Y, Z)
  nsddata/freesurfer/subjXX/label/floc-*.mgz.ctab      '<code> <name>' per line

Only the bounding boxes of the requested ROIs are read from each session file; the per-trial
z-scored ROI betas are cached so that later loads (either split, any ROI subset with the same
voxel set) never touch the beta files again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import scipy.io
from nibabel.filebasedimages import ImageFileError
from PIL import Image
from scipy.io.matlab import MatReadError

from brainrobust.data.rois import ROISpec, as_roi_specs, label_codes, read_ctab, roi_mask
from brainrobust.errors import CacheError, ConfigError, DataError
from brainrobust.files import atomic_path, stable_hash, write_json

log = logging.getLogger(__name__)

TRIALS_PER_SESSION = 750
N_SUBJECTS = 8
BETA_SCALE = 300.0  # int16 betas are percent signal change x 300
SPLITS = ("train", "test")
_CACHE_VERSION = 1
_COLUMN_CHUNK = 2048  # columns per float64 block: bounds temporaries on real-size ROIs
_IMAGE_BATCH = 256


@dataclass
class SplitData:
    """One subject's responses for one split.

    The voxel columns are the union of the requested ROIs' voxels, each voxel once, in C order
    of the (Z, Y, X) beta grid; a voxel in two ROIs appears in both ROIs' index arrays.
    """

    subject: int
    split: str
    ids: np.ndarray
    responses: np.ndarray
    n_repeats: np.ndarray
    rois: dict[str, np.ndarray]
    roi_mean: dict[str, np.ndarray]
    noise_ceiling: np.ndarray
    roi_noise_ceiling: dict[str, float]
    voxel_xyz: np.ndarray
    n_dropped: int


@dataclass(frozen=True)
class Design:
    """The experiment design with 1-based MATLAB indices kept as stored."""

    masterordering: np.ndarray  # (T,) 1-based index into a subject's images
    subjectim: np.ndarray  # (8, N) 1-based 73k ids
    sharedix: np.ndarray  # (n_shared,) 1-based 73k ids

    @property
    def n_planned_sessions(self) -> int:
        return len(self.masterordering) // TRIALS_PER_SESSION

    def trial_ids(self, subject: int, n_sessions: int) -> np.ndarray:
        """0-based 73k id shown on each trial of the subject's first `n_sessions` sessions."""
        order = self.masterordering[: n_sessions * TRIALS_PER_SESSION]
        return (self.subjectim[subject - 1, order - 1] - 1).astype(np.int64)


def read_design(path: Path) -> Design:
    """Read and check nsd_expdesign.mat."""
    if not path.is_file():
        raise _missing(path)
    try:
        mat = scipy.io.loadmat(path)
    except (OSError, ValueError, TypeError, MatReadError) as exc:
        raise DataError(f"cannot read {path} ({exc}); re-download it") from None
    missing = [k for k in ("masterordering", "subjectim", "sharedix") if k not in mat]
    if missing:
        raise DataError(f"{path} lacks key {missing[0]!r} (expects masterordering, subjectim, "
                        "sharedix); re-download it")
    order = np.asarray(mat["masterordering"]).astype(np.int64).ravel()
    subjectim = np.asarray(mat["subjectim"]).astype(np.int64)
    shared = np.asarray(mat["sharedix"]).astype(np.int64).ravel()
    if subjectim.ndim != 2 or subjectim.shape[0] != N_SUBJECTS:
        raise DataError(f"{path}: subjectim has shape {subjectim.shape}, expected (8, 10000)")
    if len(order) % TRIALS_PER_SESSION or order.min() < 1 or order.max() > subjectim.shape[1]:
        raise DataError(f"{path}: masterordering must hold 750 x sessions 1-based indices into "
                        f"subjectim's {subjectim.shape[1]} columns; re-download it")
    if subjectim.min() < 1 or not np.all(subjectim[:, : len(shared)] == shared):
        raise DataError(f"{path}: subjectim's first {len(shared)} columns differ from sharedix "
                        "(or hold ids < 1); re-download it")
    return Design(order, subjectim, shared)


def _missing(path: Path) -> DataError:
    return DataError(f"{path.name} not found under {path.parent}; set data.root=... to the NSD "
                     "root (the folder holding nsddata/, nsddata_betas/, nsddata_stimuli/)")


def _open_h5(path: Path) -> h5py.File:
    """Open an HDF5 file read-only; every beta/stimulus read goes through here."""
    if not path.is_file():
        raise _missing(path)
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        reason = str(exc).splitlines()[0]
        raise DataError(f"cannot open {path} ({reason}): truncated or not HDF5; "
                        "re-download it") from None


def _h5_dataset(f: h5py.File, path: Path, name: str, dtype: str, expected: str) -> h5py.Dataset:
    ds = f.get(name)
    if not isinstance(ds, h5py.Dataset):
        raise DataError(f"{path} has no dataset {name!r} (found {sorted(f.keys())}); expected "
                        f"{name!r} {dtype} {expected}")
    if ds.dtype != np.dtype(dtype):
        raise DataError(f"{path}: dataset {name!r} is {ds.dtype}, expected {dtype} {expected}")
    return ds


def _box_source(ds: h5py.Dataset, path: Path) -> np.ndarray | h5py.Dataset:
    """What to slice boxes from: a memory map for contiguous uncompressed data (the NSD
    release), which reads a box ~4x faster than an HDF5 hyperslab; else the dataset itself."""
    offset = ds.id.get_offset()
    if ds.chunks is not None or offset is None:
        return ds
    return np.memmap(path, dtype=ds.dtype, mode="r", offset=offset, shape=ds.shape)


def _read_nifti(path: Path) -> np.ndarray:
    if not path.is_file():
        raise _missing(path)
    try:
        data = np.asanyarray(nib.load(path).dataobj)
    except (OSError, ValueError, EOFError, ImageFileError, zlib.error) as exc:
        raise DataError(f"cannot read {path} ({exc}); re-download it") from None
    if data.ndim != 3:
        raise DataError(f"{path} has shape {data.shape}, expected a 3-D (X, Y, Z) volume")
    return data


class ArrayCache:
    """Arrays extracted from a dataset, stored as <name>.npy plus <name>.json.

    The json is written last and holds the key, shape, dtype and byte size, so an entry whose
    key differs or whose .npy is truncated or damaged is rebuilt, never trusted.
    """

    def __init__(self, directory: str | os.PathLike | None):
        self.dir = Path(directory) if directory is not None else None

    def get(self, name: str, key: dict[str, Any]) -> tuple[np.ndarray, dict] | None:
        """(read-only memory-mapped array, meta) for a valid entry, else None."""
        if self.dir is None or not (self.dir / f"{name}.json").exists():
            return None
        npy = self.dir / f"{name}.npy"
        try:
            record = json.loads((self.dir / f"{name}.json").read_text())
            if record["key"] != json.loads(json.dumps(key, default=str)):
                raise CacheError("key differs")
            if npy.stat().st_size != record["nbytes"]:
                raise CacheError("size differs")
            array = np.load(npy, mmap_mode="r")
            if list(array.shape) != record["shape"] or str(array.dtype) != record["dtype"]:
                raise CacheError("shape or dtype differs")
        except (OSError, ValueError, KeyError, TypeError, CacheError) as exc:
            log.warning("cache entry %s unusable (%s); rebuilding it", self.dir / name, exc)
            return None
        return array, record["meta"]

    def put(self, name: str, key: dict[str, Any], array: np.ndarray, meta: dict) -> None:
        if self.dir is None:
            return
        npy = self.dir / f"{name}.npy"
        with atomic_path(npy) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array))
        write_json(self.dir / f"{name}.json", {
            "key": key, "shape": list(array.shape), "dtype": str(array.dtype),
            "nbytes": npy.stat().st_size, "meta": meta,
        })


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, H, W, 3) -> (n, size, size, 3), antialiased (PIL Lanczos)."""
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.LANCZOS))
    return out


def noise_ceiling(ncsnr: np.ndarray, n_repeats: np.ndarray) -> np.ndarray:
    """Percent noise ceiling for images averaged over `n_repeats` trials each.

    NC = 100 ncsnr^2 / (ncsnr^2 + k), k = mean(1/n) over the images: this is the layout doc's
    (A/3 + B/2 + C/1) / (A + B + C) for A, B, C images with 3, 2, 1 repeats.
    """
    k = float(np.mean(1.0 / np.asarray(n_repeats, np.float64)))
    s2 = np.asarray(ncsnr, np.float64) ** 2
    return (100.0 * s2 / (s2 + k)).astype(np.float32)


def ncsnr_from_trials(trials: np.ndarray, trial_ids: np.ndarray) -> np.ndarray:
    """Noise-ceiling SNR per column from per-session z-scored single trials.

    Uses the images shown exactly 3 times: v = sqrt(mean across-trial variance (ddof=1)),
    ncsnr = sqrt(max(0, 1 - v^2)) / v.
    """
    _, inverse, counts = np.unique(trial_ids, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.cumsum(counts) - counts
    triples = order[starts[counts == 3][:, None] + np.arange(3)]
    if len(triples) == 0:
        log.warning("no image has 3 trials: noise ceiling from data is NaN")
        return np.full(trials.shape[1], np.nan, np.float32)
    rows = triples.ravel()
    var = np.empty(trials.shape[1])
    for c0 in range(0, trials.shape[1], _COLUMN_CHUNK):
        block = np.asarray(trials[rows, c0:c0 + _COLUMN_CHUNK], np.float64)
        var[c0:c0 + _COLUMN_CHUNK] = block.reshape(len(triples), 3, -1).var(axis=1, ddof=1).mean(0)
    v = np.sqrt(var)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.sqrt(np.maximum(0.0, 1.0 - v**2)) / v).astype(np.float32)


def zscore_sessions(x: np.ndarray) -> np.ndarray:
    """Z-score (population SD) each column within each block of 750 consecutive trials."""
    blocks = x.reshape(-1, TRIALS_PER_SESSION, *x.shape[1:]).astype(np.float64)
    mean = blocks.mean(axis=1, keepdims=True)
    sd = blocks.std(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((blocks - mean) / sd).reshape(x.shape)


def average_repeats(trials: np.ndarray, trial_ids: np.ndarray,
                    ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over each image's trials: (len(ids), V) float32 and the repeat counts.

    Every id in the sorted array `ids` must occur in `trial_ids`.
    """
    pos = np.clip(np.searchsorted(ids, trial_ids), 0, max(len(ids) - 1, 0))
    rows = np.flatnonzero(ids[pos] == trial_ids)
    rows = rows[np.argsort(pos[rows], kind="stable")]
    counts = np.bincount(pos[rows], minlength=len(ids))
    starts = np.cumsum(counts) - counts
    out = np.empty((len(ids), trials.shape[1]), np.float32)
    for c0 in range(0, trials.shape[1], _COLUMN_CHUNK):
        block = np.asarray(trials[rows, c0:c0 + _COLUMN_CHUNK], np.float64)
        out[:, c0:c0 + _COLUMN_CHUNK] = np.add.reduceat(block, starts, axis=0) / counts[:, None]
    return out, counts


def read_boxes(zyx: np.ndarray, min_saving: float = 0.3,
               max_boxes: int = 16) -> list[np.ndarray]:
    """Partition voxels (n, 3) into groups whose bounding boxes are cheap to read.

    A box is split at an empty plane (e.g. the gap between the hemispheres of a bilateral ROI)
    when the two tight boxes hold at least `min_saving` fewer voxels than the box itself.
    """

    def volume(idx: np.ndarray) -> int:
        return int(np.prod(zyx[idx].max(0) - zyx[idx].min(0) + 1))

    groups, done = [np.arange(len(zyx))], []
    while groups and len(groups) + len(done) < max_boxes:
        idx = groups.pop()
        best = None
        for axis in range(3):
            values = np.unique(zyx[idx, axis])
            for gap in np.flatnonzero(np.diff(values) > 1):
                left = idx[zyx[idx, axis] <= values[gap]]
                right = idx[zyx[idx, axis] > values[gap]]
                cost = volume(left) + volume(right)
                if best is None or cost < best[0]:
                    best = (cost, left, right)
        if best is not None and best[0] <= (1 - min_saving) * volume(idx):
            groups += [best[1], best[2]]
        else:
            done.append(idx)
    return done + groups


def _roi_columns(masks: dict[str, np.ndarray], flat: np.ndarray, valid: np.ndarray,
                 subject: int) -> dict[str, np.ndarray]:
    """ROI name -> columns among the kept voxels of `flat` (the flat indices of the union)."""
    column = np.full(len(flat), -1)
    column[valid] = np.arange(valid.sum())
    out = {}
    for name, mask in masks.items():
        cols = column[np.searchsorted(flat, np.flatnonzero(mask))]
        if not (cols >= 0).any():
            raise DataError(f"ROI {name!r} is empty for subject {subject}: all its voxels were "
                            "dropped as all-zero/NaN; choose another ROI")
        out[name] = cols[cols >= 0]
    return out


def check_subject(subject: Any, present: str) -> int:
    """`subject` as an int 1-8, else a ConfigError that says which subjects have data."""
    try:
        s = int(subject)
    except (TypeError, ValueError):
        s = -1
    if s != subject or not 1 <= s <= N_SUBJECTS:
        raise ConfigError(f"unknown subject {subject!r}; valid: 1-{N_SUBJECTS} ({present})")
    return s


class NSDLoader:
    """Images, per-subject ROI responses and noise ceilings from the real NSD layout.

    Parameters
    ----------
    root : path
        Dataset root holding nsddata/, nsddata_betas/ and nsddata_stimuli/.
    cache_dir : path, optional
        Where extracted per-trial z-scored ROI betas are cached; None disables caching.
    image_size : int, optional
        Size S of the square images returned by `images`; None keeps the file's size.
    sessions_fallback : 8 ints
        Completed sessions assumed for subjects without beta files when computing the
        test set (the real counts by default).
    """

    def __init__(self, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 image_size: int | None = None,
                 sessions_fallback: Sequence[int] = (40, 40, 32, 30, 40, 32, 40, 30)):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"NSD root {self.root} not found; set data.root=... to the folder "
                            "holding nsddata/, nsddata_betas/, nsddata_stimuli/")
        if image_size is not None and int(image_size) < 1:
            raise ConfigError(f"data.image_size must be a positive int or null, got {image_size}")
        if len(sessions_fallback) != N_SUBJECTS:
            raise ConfigError(f"sessions_fallback needs {N_SUBJECTS} counts, got "
                              f"{list(sessions_fallback)}")
        self.image_size = None if image_size is None else int(image_size)
        self.sessions_fallback = tuple(int(n) for n in sessions_fallback)
        self.cache = ArrayCache(Path(cache_dir) / "nsd" if cache_dir is not None else None)
        self._design: Design | None = None
        self._test_ids: np.ndarray | None = None

    # ---- paths -------------------------------------------------------------------------
    @property
    def design_path(self) -> Path:
        return self.root / "nsddata/experiments/nsd/nsd_expdesign.mat"

    @property
    def stimuli_path(self) -> Path:
        return self.root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"

    def betas_dir(self, subject: int) -> Path:
        return (self.root / f"nsddata_betas/ppdata/subj{subject:02d}/func1pt8mm"
                / "betas_fithrf_GLMdenoise_RR")

    def roi_path(self, subject: int, stem: str) -> Path:
        return self.root / f"nsddata/ppdata/subj{subject:02d}/func1pt8mm/roi/{stem}.nii.gz"

    def ctab_path(self, subject: int, file: str) -> Path:
        return self.root / f"nsddata/freesurfer/subj{subject:02d}/label/{file}.mgz.ctab"

    # ---- design --------------------------------------------------------------------------
    @property
    def design(self) -> Design:
        if self._design is None:
            self._design = read_design(self.design_path)
        return self._design

    @property
    def subjects(self) -> list[int]:
        """Subjects (1..8) with beta files present."""
        return [s for s in range(1, N_SUBJECTS + 1) if self._session_numbers(s)]

    def _session_numbers(self, subject: int) -> list[int]:
        directory = self.betas_dir(subject)
        if not directory.is_dir():
            return []
        found = (re.fullmatch(r"betas_session(\d\d)\.hdf5", p.name) for p in directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def _session_files(self, subject: int) -> list[Path]:
        numbers = self._session_numbers(subject)
        directory = self.betas_dir(subject)
        if not numbers:
            raise DataError(f"betas_session01.hdf5 not found under {directory}; set data.root=... "
                            f"(subjects with beta files: {self.subjects})")
        gap = next((n for n in range(1, numbers[-1] + 1) if n not in numbers), None)
        if gap is not None:
            raise DataError(f"betas_session{gap:02d}.hdf5 not found under {directory} although "
                            f"later sessions exist; re-download it")
        if len(numbers) > self.design.n_planned_sessions:
            raise DataError(f"{directory} holds {len(numbers)} sessions but the design in "
                            f"{self.design_path} plans {self.design.n_planned_sessions}")
        return [directory / f"betas_session{n:02d}.hdf5" for n in numbers]

    def n_sessions(self, subject: int) -> int:
        """Completed sessions of a subject, counted from the beta files present."""
        return len(self._session_files(self._check_subject(subject)))

    def _check_subject(self, subject: Any) -> int:
        return check_subject(subject, f"beta files present for {self.subjects}")

    def test_ids(self) -> np.ndarray:
        """Sorted 0-based 73k ids of the shared images every subject saw exactly 3 times."""
        if self._test_ids is not None:
            return self._test_ids
        design = self.design
        n_shared = len(design.sharedix)
        keep = np.ones(n_shared, bool)
        present = self.subjects
        for s in range(1, N_SUBJECTS + 1):
            if s in present:
                n = len(self._session_files(s))
            else:
                n = min(self.sessions_fallback[s - 1], design.n_planned_sessions)
                log.warning("subject %d has no beta files under %s: assuming %d completed sessions "
                            "for the test set", s, self.root, n)
            shown = design.masterordering[: n * TRIALS_PER_SESSION]
            keep &= np.bincount(shown, minlength=n_shared + 1)[1: n_shared + 1] == 3
        # Shared images are the first columns of subjectim, equal to sharedix (checked on read).
        self._test_ids = np.sort(design.sharedix[keep] - 1).astype(np.int64)
        return self._test_ids

    # ---- responses ---------------------------------------------------------------------
    def load(self, subject: int, rois: ROISpec | str | Sequence[ROISpec | str],
             split: str) -> SplitData:
        """One subject's z-scored, repeat-averaged ROI responses for a split.

        Parameters
        ----------
        subject : int
            1..8.
        rois : ROISpec, name or a sequence of them
            Builtin names ("FFA", "lh.PPA") or specs; their voxel sets are concatenated.
        split : str
            "test": the shared images seen 3 times by every subject; "train": the subject's
            other images shown at least once in its completed sessions.
        """
        subject = self._check_subject(subject)
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid: {SPLITS}")
        specs = as_roi_specs(rois)
        files = self._session_files(subject)
        trial_ids = self.design.trial_ids(subject, len(files))
        masks, grid_file = self._roi_masks(subject, specs)
        union = np.logical_or.reduce(list(masks.values()))
        flat = np.flatnonzero(union)
        trials, valid = self._trial_betas(subject, files, flat, union.shape, grid_file)

        ncsnr = self._ncsnr_file(subject, union.shape, flat)
        if ncsnr is not None:
            valid &= np.isfinite(ncsnr)
        n_dropped = int((~valid).sum())
        if n_dropped:
            log.warning("subject %d: dropped %d of %d ROI voxels (all-zero/constant in a session, "
                        "or NaN/inf)", subject, n_dropped, len(flat))
        keep = np.flatnonzero(valid)
        roi_columns = _roi_columns(masks, flat, valid, subject)

        test = self.test_ids()
        ids = test if split == "test" else np.setdiff1d(np.unique(trial_ids), test)
        kept_trials = trials[:, keep] if n_dropped else np.asarray(trials)
        responses, n_repeats = average_repeats(kept_trials, trial_ids, ids)
        if ncsnr is None:
            log.info("subject %d: no ncsnr.nii.gz under %s; noise ceiling computed from the "
                     "single trials", subject, self.betas_dir(subject))
            ncsnr = ncsnr_from_trials(kept_trials, trial_ids)
        else:
            ncsnr = ncsnr[keep]
        roi_nc = {}
        for name, cols in roi_columns.items():
            # The ROI mean is a response of its own: z-score its series, as for a voxel.
            series = zscore_sessions(kept_trials[:, cols].mean(axis=1, dtype=np.float64))
            roi_ncsnr = ncsnr_from_trials(series[:, None], trial_ids)
            roi_nc[name] = float(noise_ceiling(roi_ncsnr, n_repeats)[0])
        zyx = np.stack(np.unravel_index(flat[keep], union.shape), axis=1)
        return SplitData(
            subject=subject, split=split, ids=ids, responses=responses,
            n_repeats=n_repeats.astype(np.int64), rois=roi_columns,
            roi_mean={n: responses[:, c].mean(axis=1) for n, c in roi_columns.items()},
            noise_ceiling=noise_ceiling(ncsnr, n_repeats), roi_noise_ceiling=roi_nc,
            voxel_xyz=zyx[:, ::-1].astype(np.int64), n_dropped=n_dropped,
        )

    def _roi_masks(self, subject: int,
                   specs: list[ROISpec]) -> tuple[dict[str, np.ndarray], Path]:
        """ROI name -> bool mask on the (Z, Y, X) beta grid, and the file that set the grid."""
        volumes: dict[str, np.ndarray] = {}
        masks = {}
        first = self.roi_path(subject, specs[0].volume_stem)
        for spec in specs:
            path = self.roi_path(subject, spec.volume_stem)
            if spec.volume_stem not in volumes:
                volumes[spec.volume_stem] = np.rint(_read_nifti(path)).astype(np.int64)
            volume = volumes[spec.volume_stem]
            grid = volumes[specs[0].volume_stem].shape
            if volume.shape != grid:
                raise DataError(f"{path} has grid {volume.shape} but {first} has {grid}; "
                                "all ROI files must be the subject's func1pt8mm grid")
            ctab = self.ctab_path(subject, spec.file)
            if not ctab.is_file():
                raise _missing(ctab)
            mask = roi_mask(volume, label_codes(spec, read_ctab(ctab), ctab))
            if not mask.any():
                raise DataError(f"ROI {spec.name!r} is empty for subject {subject}: no voxel of "
                                f"{path.name} has label {list(spec.labels)}; choose another ROI")
            masks[spec.name] = mask.T  # NIfTI (X, Y, Z) -> beta grid (Z, Y, X)
        return masks, first

    def _ncsnr_file(self, subject: int, grid_zyx: tuple, flat: np.ndarray) -> np.ndarray | None:
        path = self.betas_dir(subject) / "ncsnr.nii.gz"
        if not path.is_file():
            return None
        volume = _read_nifti(path)
        if volume.shape != grid_zyx[::-1]:
            raise DataError(f"{path} has grid {volume.shape}, expected (X, Y, Z) = "
                            f"{grid_zyx[::-1]} like the ROI files; re-download it")
        return np.asarray(volume.T, np.float64).reshape(-1)[flat]

    def _trial_betas(self, subject: int, files: list[Path], flat: np.ndarray,
                     grid_zyx: tuple, grid_file: Path) -> tuple[np.ndarray, np.ndarray]:
        """Per-trial betas of the voxels `flat`, z-scored per session, and a validity mask."""
        key = {
            "version": _CACHE_VERSION, "root": str(self.root.resolve()), "subject": subject,
            "grid_zyx": list(grid_zyx),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
            "voxels": hashlib.sha256(flat.astype(np.int64).tobytes()).hexdigest(),
            "n_voxels": len(flat),
        }
        name = f"subj{subject:02d}-betas-{stable_hash(key)}"
        hit = self.cache.get(name, key)
        if hit is not None:
            trials, meta = hit
            valid = np.ones(len(flat), bool)
            valid[meta["dropped"]] = False
            return trials, valid

        zyx = np.stack(np.unravel_index(flat, grid_zyx), axis=1)
        boxes = read_boxes(zyx)
        expected = (TRIALS_PER_SESSION, *grid_zyx)
        trials = np.empty((len(files) * TRIALS_PER_SESSION, len(flat)), np.float32)
        valid = np.ones(len(flat), bool)
        raw = np.empty((TRIALS_PER_SESSION, len(flat)), np.int16)
        for k, path in enumerate(files):
            with _open_h5(path) as f:
                ds = _h5_dataset(f, path, "betas", "int16", f"of shape (750, Z, Y, X) = {expected}")
                if ds.shape != expected:
                    if k == 0 and ds.ndim == 4 and ds.shape[0] == TRIALS_PER_SESSION:
                        raise DataError(
                            f"{grid_file} has grid (X, Y, Z) = {grid_zyx[::-1]} but {path} holds "
                            f"betas {ds.shape}; expected (750, Z, Y, X) = {expected}: ROI and "
                            "beta files must be the same subject's func1pt8mm grid")
                    raise DataError(f"{path}: dataset 'betas' has shape {ds.shape}, expected "
                                    f"(750, Z, Y, X) = {expected}")
                try:
                    source = _box_source(ds, path)
                    for idx in boxes:
                        lo, hi = zyx[idx].min(0), zyx[idx].max(0) + 1
                        block = np.asarray(source[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
                        local = zyx[idx] - lo
                        raw[:, idx] = block[:, local[:, 0], local[:, 1], local[:, 2]]
                except (OSError, ValueError) as exc:
                    raise DataError(f"cannot read {path} ({str(exc).splitlines()[0]}): "
                                    "truncated or damaged; re-download it") from None
                del source
            z = zscore_sessions(raw / BETA_SCALE)
            ok = np.isfinite(z).all(axis=0)
            valid &= ok
            z[:, ~ok] = 0.0
            trials[k * TRIALS_PER_SESSION:(k + 1) * TRIALS_PER_SESSION] = z
        self.cache.put(name, key, trials, {"dropped": np.flatnonzero(~valid).tolist()})
        return trials, valid

    # ---- images ------------------------------------------------------------------------
    def images(self, ids: np.ndarray) -> np.ndarray:
        """uint8 (n, S, S, 3) stimuli for 0-based 73k ids, resized to image_size if set."""
        ids = np.asarray(ids, np.int64).ravel()
        path = self.stimuli_path
        with _open_h5(path) as f:
            ds = _h5_dataset(f, path, "imgBrick", "uint8", "of shape (73000, 425, 425, 3)")
            if ds.ndim != 4 or ds.shape[3] != 3 or ds.shape[1] != ds.shape[2]:
                raise DataError(f"{path}: imgBrick has shape {ds.shape}, expected (73000, 425, "
                                "425, 3) = (N, S, S, 3)")
            if len(ids) and (ids.min() < 0 or ids.max() >= ds.shape[0]):
                raise DataError(f"image id {int(ids.max())} outside {path}'s {ds.shape[0]} images; "
                                "the stimuli file does not match the design")
            size = self.image_size or ds.shape[1]
            out = np.empty((len(ids), size, size, 3), np.uint8)
            order = np.argsort(ids, kind="stable")
            for b in range(0, len(ids), _IMAGE_BATCH):
                rows = order[b:b + _IMAGE_BATCH]
                unique, inverse = np.unique(ids[rows], return_inverse=True)
                out[rows] = resize_images(ds[unique], size)[inverse]
        return out

    @property
    def image_source_id(self) -> str:
        """Identity of the images `images` returns: stimuli file, size, mtime and image_size."""
        path = self.stimuli_path
        if not path.is_file():
            raise _missing(path)
        st = path.stat()
        return f"nsd:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{self.image_size}"
