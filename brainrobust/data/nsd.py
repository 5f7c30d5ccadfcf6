"""Loader of the real Natural Scenes Dataset layout (see shared/reference/nsd-layout.md).

Which files it reads, and how they are checked and fingerprinted, is `brainrobust.data.nsd_files`
(its names are importable from here too). Only the bounding boxes of the requested ROIs are
read from each session file; the per-trial z-scored ROI betas are cached so that later loads
(either split, any ROI subset with the same voxel set) never touch the beta files again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from brainrobust.cache import ArrayCache
from brainrobust.data import partial
from brainrobust.data.datafiles import check_image_size, is_file, stat_file, stat_key

# Re-exported: brainrobust.fetch and the tests take the layout's names from this module.
from brainrobust.data.nsd_files import (  # noqa: F401
    N_SUBJECTS,
    NSD_ROOT,
    TRIALS_PER_SESSION,
    Design,
    NSDLayout,
    _failed_read,
    _h5_dataset,
    _open_h5,
    _read_nifti,
    check_subject,
    read_design,
)
from brainrobust.data.rois import ROISpec, as_roi_specs, label_codes, read_ctab, roi_mask
from brainrobust.errors import ConfigError, DataError
from brainrobust.files import stable_hash

log = logging.getLogger(__name__)

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


def _box_source(ds: h5py.Dataset, path: Path) -> np.ndarray | h5py.Dataset:
    """What to slice boxes from: a memory map for contiguous uncompressed data (the NSD
    release), which reads a box ~4x faster than an HDF5 hyperslab; else the dataset itself."""
    offset = ds.id.get_offset()
    if ds.chunks is not None or offset is None:
        return ds
    return np.memmap(path, dtype=ds.dtype, mode="r", offset=offset, shape=ds.shape)

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
                            "dropped (betas all-zero, constant or NaN in a session, or ncsnr "
                            "NaN); check the subject's betas and ncsnr files, or choose another ROI")
        out[name] = cols[cols >= 0]
    return out


class NSDLoader(NSDLayout):
    """Images, per-subject ROI responses and noise ceilings from the real NSD layout.

    Parameters
    ----------
    root, sessions_fallback
        As for `NSDLayout`.
    cache_dir : path, optional
        Where extracted per-trial z-scored ROI betas are cached; None disables caching.
    image_size : int, optional
        Size S of the square images returned by `images`; None keeps the file's size.
    """

    def __init__(self, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 image_size: int | None = None, sessions_fallback: Sequence[int] | None = None):
        self.image_size = check_image_size(image_size)
        super().__init__(root, sessions_fallback)
        self.cache = ArrayCache(Path(cache_dir) / "nsd" if cache_dir is not None else None)
        self._test_ids: np.ndarray | None = None

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
            stat_file(ctab, NSD_ROOT)
            mask = roi_mask(volume, label_codes(spec, read_ctab(ctab), ctab))
            if not mask.any():
                raise DataError(f"ROI {spec.name!r} is empty for subject {subject}: no voxel of "
                                f"{path.name} has label {list(spec.labels)}; choose another ROI")
            masks[spec.name] = mask.T  # NIfTI (X, Y, Z) -> beta grid (Z, Y, X)
        return masks, first

    def _ncsnr_file(self, subject: int, grid_zyx: tuple, flat: np.ndarray) -> np.ndarray | None:
        path = self.betas_dir(subject) / "ncsnr.nii.gz"
        if not is_file(path, NSD_ROOT):
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
            "grid_zyx": list(grid_zyx), "files": [stat_key(p, NSD_ROOT) for p in files],
            "voxels": hashlib.sha256(flat.astype(np.int64).tobytes()).hexdigest(),
            "n_voxels": len(flat),
        }
        trials, meta = self.cache.fetch(
            f"subj{subject:02d}-betas-{stable_hash(key)}", key,
            lambda: self._read_trial_betas(files, flat, grid_zyx, grid_file))
        valid = np.ones(len(flat), bool)
        valid[meta["dropped"]] = False
        return trials, valid

    def _read_trial_betas(self, files: list[Path], flat: np.ndarray, grid_zyx: tuple,
                          grid_file: Path) -> tuple[np.ndarray, dict]:
        """The per-session z-scored betas of `_trial_betas`, read from the session files, and
        the columns to drop (all-zero, constant or non-finite in some session)."""
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
                partial.require_voxels(f, path, flat)
                try:
                    source = _box_source(ds, path)
                    for idx in boxes:
                        lo, hi = zyx[idx].min(0), zyx[idx].max(0) + 1
                        block = np.asarray(source[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
                        local = zyx[idx] - lo
                        raw[:, idx] = block[:, local[:, 0], local[:, 1], local[:, 2]]
                except (OSError, ValueError) as exc:
                    raise _failed_read(path, exc) from None
                del source
            z = zscore_sessions(raw / BETA_SCALE)
            # A constant int16 column z-scores to noise over an SD of ~1e-16, not to NaN.
            ok = np.isfinite(z).all(axis=0) & (raw.min(axis=0) != raw.max(axis=0))
            valid &= ok
            z[:, ~ok] = 0.0
            trials[k * TRIALS_PER_SESSION:(k + 1) * TRIALS_PER_SESSION] = z
        return trials, {"dropped": np.flatnonzero(~valid).tolist()}

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
            partial.require_rows(f, path, ids)
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
        """Identity of the images `images` returns, for the per-machine feature cache: the
        stimuli file (path, size, mtime, ctime) and image_size."""
        path = self.stimuli_path
        _, size, mtime, ctime = stat_key(path, NSD_ROOT)
        return f"nsd:{path.resolve()}:{size}:{mtime}:{ctime}:{self.image_size}"
