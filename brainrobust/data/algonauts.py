"""Loader of the Algonauts 2023 challenge layout, with the API of `NSDLoader`.

Per subject, under the challenge root:
  subjXX/training_split/training_fmri/{lh,rh}_training_fmri.npy   float32 (images, vertices)
  subjXX/training_split/training_images/train-0001_nsd-00013.png  1-based row, 0-based 73k id
  subjXX/test_split/test_images/test-0001_nsd-XXXXX.png
  subjXX/roi_masks/{lh,rh}.floc-*_challenge_space.npy            label code per vertex
  subjXX/roi_masks/mapping_floc-*.npy                              pickled {code: name}

The released responses are already z-scored per session and averaged over repeats, and no
test fMRI or single trials were released. So the test split is a seeded hold-out of the
training images that every present subject has, repeat counts are unknown (0) and noise
ceilings are NaN. The release holds no list of the images all its subjects share, so that
split follows the subjects under the root: it is the release's only with all 8 there (fewer
log a warning), and `fingerprint` covers it, so a run's results key changes with it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from collections.abc import Sequence
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from brainrobust.cache import ArrayCache
from brainrobust.data.datafiles import (
    check_image_size,
    check_root,
    digests,
    missing,
    read_error,
    stat_file,
    stat_key,
)
from brainrobust.data.nsd import SplitData, check_subject
from brainrobust.data.rois import ROISpec, as_roi_specs, label_codes, roi_mask
from brainrobust.errors import ConfigError, DataError
from brainrobust.files import stable_hash

log = logging.getLogger(__name__)

N_SUBJECTS = 8
HEMIS = ("lh", "rh")
SPLITS = ("train", "test")
_IMAGE_NAME = re.compile(r"(train|test)-(\d+)_nsd-(\d+)\.png")
_CACHE_VERSION = 1
ALGONAUTS_ROOT = "the Algonauts 2023 root (the folder holding subj01/ ... subj08/)"

_missing = partial(missing, hint=ALGONAUTS_ROOT)
_failed_read = partial(read_error, hint=ALGONAUTS_ROOT)


def _load_npy(path: Path, **kwargs: Any) -> Any:
    stat_file(path, ALGONAUTS_ROOT)
    try:
        return np.load(path, **kwargs)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise _failed_read(path, exc) from None


def _image_index(directory: Path, kind: str) -> dict[int, Path]:
    """Row (1-based) -> path for the images in a folder, checked to be rows 1..n."""
    rows = {}
    for path in directory.glob(f"{kind}-*.png"):
        match = _IMAGE_NAME.fullmatch(path.name)
        if match:
            rows[int(match.group(2))] = path
    if sorted(rows) != list(range(1, len(rows) + 1)):
        raise DataError(f"{directory}: {kind} image rows are not 1..{len(rows)}; re-download it")
    return rows


def _nsd_id(path: Path) -> int:
    return int(_IMAGE_NAME.fullmatch(path.name).group(3))


class AlgonautsLoader:
    """Images and ROI responses from the Algonauts 2023 layout.

    Parameters
    ----------
    root : path
        Challenge root holding subj01/ ... subj08/.
    cache_dir : path, optional
        Where extracted ROI columns are cached; None disables caching.
    image_size : int, optional
        Size S of the square images returned by `images`; None keeps the files' size.
    test_fraction : float
        Fraction of the images common to all present subjects held out as the test split.
    seed : int
        Seed of the hold-out draw.
    """

    def __init__(self, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 image_size: int | None = None, test_fraction: float = 0.1, seed: int = 0):
        self.image_size = check_image_size(image_size)
        self.root = check_root(Path(root).expanduser(), "Algonauts", ALGONAUTS_ROOT)
        if not 0 < test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)
        self.cache = ArrayCache(Path(cache_dir) / "algonauts" if cache_dir is not None else None)
        self._train_ids: dict[int, np.ndarray] = {}
        self._test_ids: np.ndarray | None = None
        self._paths: dict[int, Path] | None = None

    def _dir(self, subject: int) -> Path:
        return self.root / f"subj{subject:02d}"

    def _fmri_path(self, subject: int, hemi: str) -> Path:
        return self._dir(subject) / f"training_split/training_fmri/{hemi}_training_fmri.npy"

    @property
    def subjects(self) -> list[int]:
        """Subjects (1..8) with training fMRI present."""
        # lexists: a broken link there is a subject whose file must be reported, not skipped.
        return [s for s in range(1, N_SUBJECTS + 1) if os.path.lexists(self._fmri_path(s, "lh"))]

    def _check_subject(self, subject: Any) -> int:
        s = check_subject(subject, f"training fMRI present for {self.subjects}")
        if s not in self.subjects:
            raise _missing(self._fmri_path(s, "lh"))
        return s

    def train_image_ids(self, subject: int) -> np.ndarray:
        """0-based 73k id of each row of the subject's training fMRI."""
        subject = self._check_subject(subject)
        if subject not in self._train_ids:
            folder = self._dir(subject) / "training_split/training_images"
            rows = _image_index(folder, "train")
            self._train_ids[subject] = np.array([_nsd_id(rows[r]) for r in sorted(rows)],
                                                np.int64)
        return self._train_ids[subject]

    def test_ids(self) -> np.ndarray:
        """Sorted seeded hold-out of the training images every present subject has."""
        if self._test_ids is None:
            subjects = self.subjects
            if not subjects:
                raise _missing(self._fmri_path(1, "lh"))
            common = self.train_image_ids(subjects[0])
            for s in subjects[1:]:
                common = np.intersect1d(common, self.train_image_ids(s))
            if len(common) < 2:
                raise DataError(f"subjects {subjects} share {len(common)} training images under "
                                f"{self.root}; the test split needs at least 2")
            if len(subjects) < N_SUBJECTS:
                log.warning("only subjects %s are under %s: the test split is a hold-out of the "
                            "images they share, not of those all %d subjects of the release "
                            "share, and it changes when subjects are added", subjects, self.root,
                            N_SUBJECTS)
            n = min(len(common) - 1, max(1, round(self.test_fraction * len(common))))
            pick = np.random.default_rng(self.seed).choice(np.sort(common), n, replace=False)
            self._test_ids = np.sort(pick).astype(np.int64)
            log.info("Algonauts test split: %d of the %d training images shared by subjects %s "
                     "(seed %d)", n, len(common), subjects, self.seed)
        return self._test_ids

    def load(self, subject: int, rois: ROISpec | str | Sequence[ROISpec | str],
             split: str) -> SplitData:
        """The subject's ROI responses for a split, as `NSDLoader.load` returns them.

        n_repeats is 0 (unknown), noise ceilings are NaN and voxel_xyz is -1: the challenge
        data are surface vertices averaged over repeats, without single trials.
        """
        subject = self._check_subject(subject)
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid: {SPLITS}")
        specs = as_roi_specs(rois)
        image_ids = self.train_image_ids(subject)
        fmri = {h: self._fmri(subject, h, len(image_ids)) for h in HEMIS}
        offset = {"lh": 0, "rh": fmri["lh"].shape[1]}
        masks = {}
        for spec in specs:
            columns = [offset[h] + np.flatnonzero(self._roi_vertices(subject, spec, h, fmri[h]))
                       for h in (HEMIS if spec.hemi == "both" else (spec.hemi,))]
            masks[spec.name] = np.concatenate(columns)
            if len(masks[spec.name]) == 0:
                raise DataError(f"ROI {spec.name!r} is empty for subject {subject}: no vertex "
                                f"has label {list(spec.labels)}; choose another ROI")
        columns = np.unique(np.concatenate(list(masks.values())))
        data, dropped = self._columns(subject, fmri, columns)
        valid = np.ones(len(columns), bool)
        valid[dropped] = False
        if dropped:
            log.warning("subject %d: dropped %d of %d ROI vertices (NaN/inf or all-zero)",
                        subject, len(dropped), len(columns))
        keep = np.flatnonzero(valid)
        position = np.full(len(columns), -1)
        position[keep] = np.arange(len(keep))
        roi_columns = {}
        for name, cols in masks.items():
            cols = position[np.searchsorted(columns, cols)]
            if not (cols >= 0).any():
                raise DataError(f"ROI {name!r} is empty for subject {subject}: all its vertices "
                                "were dropped as NaN/all-zero; choose another ROI")
            roi_columns[name] = np.sort(cols[cols >= 0])

        test = self.test_ids()
        in_test = np.isin(image_ids, test)
        rows = np.flatnonzero(in_test if split == "test" else ~in_test)
        rows = rows[np.argsort(image_ids[rows], kind="stable")]
        responses = np.asarray(data[rows][:, keep], np.float32)
        log.info("Algonauts releases no single trials: noise ceilings are NaN")
        return SplitData(
            subject=subject, split=split, ids=image_ids[rows], responses=responses,
            n_repeats=np.zeros(len(rows), np.int64), rois=roi_columns,
            roi_mean={n: responses[:, c].mean(axis=1) for n, c in roi_columns.items()},
            noise_ceiling=np.full(len(keep), np.nan, np.float32),
            roi_noise_ceiling={n: float("nan") for n in roi_columns},
            voxel_xyz=np.full((len(keep), 3), -1, np.int64), n_dropped=len(dropped),
        )

    def _fmri(self, subject: int, hemi: str, n_images: int) -> np.ndarray:
        path = self._fmri_path(subject, hemi)
        array = _load_npy(path, mmap_mode="r")
        if array.ndim != 2 or array.shape[0] != n_images or array.dtype != np.float32:
            raise DataError(f"{path} holds {array.dtype} {array.shape}, expected float32 "
                            f"({n_images} training images, vertices)")
        return array

    def _roi_vertices(self, subject: int, spec: ROISpec, hemi: str,
                      fmri: np.ndarray) -> np.ndarray:
        folder = self._dir(subject) / "roi_masks"
        path = folder / f"{hemi}.{spec.file}_challenge_space.npy"
        labels = np.rint(_load_npy(path)).astype(np.int64)
        if labels.shape != (fmri.shape[1],):
            raise DataError(f"{path} has shape {labels.shape}, expected ({fmri.shape[1]},): one "
                            f"label per vertex of {hemi}_training_fmri.npy")
        mapping_path = folder / f"mapping_{spec.file}.npy"
        mapping = _load_npy(mapping_path, allow_pickle=True).item()
        # The devkit maps code -> name; accept name -> code too.
        table = {str(v): int(k) for k, v in mapping.items()} if all(
            isinstance(k, (int, np.integer)) for k in mapping) else {
            str(k): int(v) for k, v in mapping.items()}
        return roi_mask(labels, label_codes(spec, table, mapping_path))

    def _columns(self, subject: int, fmri: dict[str, np.ndarray],
                 columns: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """(images, len(columns)) responses of the given global columns and dropped positions."""
        key = {
            "version": _CACHE_VERSION, "root": str(self.root.resolve()), "subject": subject,
            "files": [stat_key(self._fmri_path(subject, h), ALGONAUTS_ROOT) for h in HEMIS],
            "columns": hashlib.sha256(columns.astype(np.int64).tobytes()).hexdigest(),
        }

        def extract() -> tuple[np.ndarray, dict]:
            n_lh = fmri["lh"].shape[1]
            data = np.concatenate([fmri["lh"][:, columns[columns < n_lh]],
                                   fmri["rh"][:, columns[columns >= n_lh] - n_lh]], axis=1)
            bad = ~np.isfinite(data).all(axis=0) | (data == 0).all(axis=0)
            data[:, bad] = 0.0
            return data, {"dropped": np.flatnonzero(bad).tolist()}

        data, meta = self.cache.fetch(f"subj{subject:02d}-fmri-{stable_hash(key)}", key, extract)
        return data, meta["dropped"]

    def _image_paths(self) -> dict[int, Path]:
        if self._paths is None:
            self._paths = {}
            for s in self.subjects:
                for folder, kind in (("training_split/training_images", "train"),
                                     ("test_split/test_images", "test")):
                    directory = self._dir(s) / folder
                    if directory.is_dir():
                        for path in _image_index(directory, kind).values():
                            self._paths[_nsd_id(path)] = path
        return self._paths

    def images(self, ids: np.ndarray) -> np.ndarray:
        """uint8 (n, S, S, 3) images for 0-based 73k ids, resized to image_size if set."""
        paths = self._image_paths()
        out = []
        for i in np.asarray(ids, np.int64).ravel():
            if int(i) not in paths:
                raise DataError(f"no image nsd-{int(i):05d} under {self.root}/subj*/"
                                "{training_split/training_images,test_split/test_images}")
            image = _read_image(paths[int(i)])
            if self.image_size and image.size != (self.image_size, self.image_size):
                image = image.resize((self.image_size, self.image_size), Image.LANCZOS)
            out.append(np.asarray(image))
        if len({a.shape for a in out}) > 1:
            raise DataError(f"images under {self.root} differ in size; set data.image_size")
        size = self.image_size or (out[0].shape[0] if out else 0)
        return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)

    @cached_property
    def _image_stats(self) -> list[list[Any]]:
        """[relative path, size, mtime, ctime] of every image file `images` may read."""
        return sorted([path.relative_to(self.root).as_posix(),
                       *stat_key(path, ALGONAUTS_ROOT)[1:]] for path in self._image_paths().values())

    @property
    def image_source_id(self) -> str:
        """Identity of the images `images` returns, for the per-machine feature cache: the root
        and every image file's size, mtime and ctime, and image_size."""
        return f"algonauts:{self.root.resolve()}:{stable_hash(self._image_stats)}:{self.image_size}"

    def fingerprint(self, subject: int, rois: ROISpec | str | Sequence[ROISpec | str]) -> str:
        """Digest of everything a load of `subject`'s `rois` reads, without the root's path.

        Covers the subject's fMRI files, ROI masks and label mappings by content (see
        `datafiles.file_digest`), the test split (it depends on every subject present) and the
        image files by name, size and mtime: hashing the 73k PNGs of the release on every run
        would cost more than the run's data loading.
        """
        subject = self._check_subject(subject)
        folder = self._dir(subject) / "roi_masks"
        files = [self._fmri_path(subject, h) for h in HEMIS]
        for spec in as_roi_specs(rois):
            files += [folder / f"{h}.{spec.file}_challenge_space.npy"
                      for h in (HEMIS if spec.hemi == "both" else (spec.hemi,))]
            files.append(folder / f"mapping_{spec.file}.npy")
        return stable_hash({
            "layout": "algonauts", "subjects": self.subjects,
            "test_ids": hashlib.sha256(self.test_ids().tobytes()).hexdigest(),
            "files": digests(self.root, sorted(set(files)), ALGONAUTS_ROOT),
            "images": stable_hash([stats[:3] for stats in self._image_stats]),
        }, length=32)


def _read_image(path: Path) -> Image.Image:
    stat_file(path, ALGONAUTS_ROOT)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as exc:
        raise _failed_read(path, exc, damaged="not an image") from None
