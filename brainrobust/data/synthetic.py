"""Writer of the synthetic NSD twin: a miniature NSD in the real layout with planted responses.

The twin uses the real file names, dataset names, dtypes, axis order, 1-based design indices,
int16 x 300 betas, ctab label tables and ROIs absent in some subjects, so that the default run
and the tests go through the real loader (`brainrobust.data.nsd.NSDLoader`) with no fake path.
What it holds and plants is `brainrobust.data.synthetic_content`.

Jobs of a sweep start on a cold cache together: `ensure_synthetic_nsd` writes the twin in a
hidden folder under the root while holding a lock there, moves it into place and writes the
marker last, listing every file with its size. Each use checks that list (a stat per file), so a
twin that is incomplete, truncated or half-deleted is rewritten under the lock, never trusted.
The same parameters give the same bytes, so a run's data fingerprint does not depend on where
or when the twin was written.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainrobust.cache import holding
from brainrobust.data.datafiles import MAX_IMAGE_SIZE
from brainrobust.data.rois import ROISpec, builtin_roi
from brainrobust.data.synthetic_content import DEFAULT_SIZES, TRIALS, write_files
from brainrobust.errors import ConfigError, StorageError
from brainrobust.files import atomic_path, stable_hash, unwritable, write_json, write_text

log = logging.getLogger(__name__)

GENERATOR_VERSION = 3  # 3: no time stamps in the files; the marker lists the files
MARKER = ".brainrobust_synthetic.json"  # written last: its absence means a half-written twin
PARTIAL = ".brainrobust_synthetic.partial"  # written while files are replaced: the folder is ours
LOCK = ".brainrobust_synthetic.lock"
BUILD = ".brainrobust_synthetic.build-"  # prefix of the hidden folder a twin is written in
TRUTH_JSON = "synthetic_truth.json"
TRUTH_NPZ = "synthetic_truth.npz"


@dataclass
class SyntheticTruth:
    """What the generator planted, for tests; saved beside the data as json + npz."""

    root: str
    params: dict[str, Any]
    test_ids: np.ndarray  # sorted 0-based 73k ids of the planted test set
    sessions: dict[int, int]  # subject -> completed sessions written
    grids: dict[int, tuple[int, int, int]]  # subject -> NIfTI (X, Y, Z)
    label_counts: dict[int, dict[str, dict[str, int]]]  # subject -> label -> hemi -> voxels
    content: np.ndarray = field(repr=False)  # (n_images, 3) face/body/place strength per 73k id

    def roi_voxel_count(self, subject: int, roi: str | ROISpec) -> int:
        """Voxels of an ROI in a subject (labels in one file never overlap)."""
        spec = builtin_roi(roi) if isinstance(roi, str) else roi
        hemis = ("lh", "rh") if spec.hemi == "both" else (spec.hemi,)
        counts = self.label_counts[subject]
        return sum(counts[lab][h] for lab in spec.labels for h in hemis)

    def save(self, directory: Path) -> None:
        meta = {k: v for k, v in asdict(self).items() if k not in ("test_ids", "content")}
        with atomic_path(directory / TRUTH_NPZ) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, test_ids=self.test_ids, content=self.content)
        write_json(directory / TRUTH_JSON, meta)


def load_truth(root: str | os.PathLike) -> SyntheticTruth:
    """Read the truth saved beside a twin."""
    root = Path(root)
    meta = json.loads((root / TRUTH_JSON).read_text())
    arrays = np.load(root / TRUTH_NPZ)
    return SyntheticTruth(
        root=str(root), params=meta["params"], test_ids=arrays["test_ids"],
        sessions={int(k): v for k, v in meta["sessions"].items()},
        grids={int(k): tuple(v) for k, v in meta["grids"].items()},
        label_counts={int(k): v for k, v in meta["label_counts"].items()},
        content=arrays["content"],
    )


def ensure_synthetic_nsd(root: str | os.PathLike, **params: Any) -> SyntheticTruth:
    """Write the twin once; reuse it while its marker matches the parameters and its files.

    Safe for any number of processes at once: one writes, the others wait for it.
    """
    root = Path(root)
    params = _params(**params)
    found = _existing(root, params)
    if isinstance(found, SyntheticTruth):
        return found
    _refuse_foreign(root)
    with holding(root / LOCK, f"synthetic twin at {root}"):
        again = _existing(root, params)
        if isinstance(again, SyntheticTruth):  # written by the process this one waited for
            return again
        log.log(logging.WARNING if "damaged" in found else logging.INFO,
                "synthetic twin at %s %s; writing it", root, found)
        return _build(root, params)


def _existing(root: Path, params: dict[str, Any]) -> SyntheticTruth | str:
    """The truth of a complete twin with these parameters at `root`, else why there is none."""
    if not os.path.exists(root / MARKER):  # False, not an error, for an unusable root path
        return "is not written yet"
    try:
        record = json.loads((root / MARKER).read_text())
        if record["key"] != stable_hash(params):
            return "has other parameters"
        for rel, size in record["files"].items():
            if _size(root / rel) != size:
                return f"is damaged ({rel} is missing or not the size written)"
        return load_truth(root)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        return f"is damaged ({type(exc).__name__}: {exc})"


def _size(path: Path) -> int | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _params(*, n_subjects: int = 8, sessions: Sequence[int] = (3, 3, 2, 2, 3, 2, 3, 2),
            grid: Sequence[int] = (14, 16, 12), image_size: int = 64, n_shared: int = 100,
            seed: int = 0, roi_sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
    if not 1 <= n_subjects <= 8 or len(sessions) < n_subjects:
        raise ConfigError(f"n_subjects must be 1-8 with a session count each; got {n_subjects}, "
                          f"sessions={list(sessions)}")
    sessions = [int(n) for n in sessions[:n_subjects]]
    if (min(sessions) < 1 or len(grid) != 3 or min(grid) < 6
            or not 8 <= image_size <= MAX_IMAGE_SIZE):
        raise ConfigError(f"need sessions >= 1, a 3-D grid >= 6 voxels a side and image_size in "
                          f"8-{MAX_IMAGE_SIZE}; got {sessions}, {list(grid)}, {image_size}")
    unknown = set(roi_sizes or {}) - set(DEFAULT_SIZES)
    if unknown:
        raise ConfigError(f"roi_sizes: unknown labels {sorted(unknown)}; valid: "
                          f"{list(DEFAULT_SIZES)}")
    n_per = TRIALS * max(sessions) // 3
    if not 1 <= n_shared <= n_per // 2:
        raise ConfigError(f"n_shared must be in 1..{n_per // 2} for {max(sessions)} sessions, "
                          f"got {n_shared}")
    return {"version": GENERATOR_VERSION, "n_subjects": n_subjects, "sessions": sessions,
            "grid": [int(g) for g in grid], "image_size": int(image_size),
            "n_shared": int(n_shared), "seed": int(seed),
            "roi_sizes": {**DEFAULT_SIZES, **(roi_sizes or {})}}


def write_synthetic_nsd(root: str | os.PathLike, *, n_subjects: int = 8,
                        sessions: Sequence[int] = (3, 3, 2, 2, 3, 2, 3, 2),
                        grid: Sequence[int] = (14, 16, 12), image_size: int = 64,
                        n_shared: int = 100, seed: int = 0,
                        roi_sizes: Mapping[str, int] | None = None,
                        overwrite: bool = False) -> SyntheticTruth:
    """Write a miniature NSD in the real layout under `root`.

    Parameters
    ----------
    n_subjects : int
        Subjects 1..n_subjects get beta and ROI files (the design always has 8 rows).
    sessions : ints
        Completed sessions per subject (750 trials each).
    grid : (X, Y, Z)
        Subject 1's NIfTI grid; subject s adds ((s-1) % 2, (s-1) % 3, 0), like the real
        grids that differ per subject.
    image_size, n_shared, seed : int
        Stimulus size S, shared images (a 1000 in real NSD), random seed.
    roi_sizes : mapping, optional
        Bilateral voxel count per label, overriding DEFAULT_SIZES.
    overwrite : bool
        Replace a complete twin already at `root`.
    """
    params = _params(n_subjects=n_subjects, sessions=sessions, grid=grid, image_size=image_size,
                     n_shared=n_shared, seed=seed, roi_sizes=roi_sizes)
    root = Path(root)
    _refuse_foreign(root)
    with holding(root / LOCK, f"synthetic twin at {root}"):
        if (root / MARKER).exists() and not overwrite:
            raise ConfigError(f"{root} already holds a synthetic twin; pass overwrite=True or "
                              "use ensure_synthetic_nsd")
        return _build(root, params)


def _refuse_foreign(root: Path) -> None:
    """Refuse to clobber dataset folders the generator did not write (checked before the lock
    file is made there; a build writes PARTIAL before it moves folders in, so a folder it is
    filling always reads as ours)."""
    ours = any(os.path.exists(root / name) for name in (MARKER, PARTIAL, TRUTH_JSON))
    foreign = [p for p in ("nsddata", "nsddata_betas", "nsddata_stimuli")
               if os.path.exists(root / p)]
    if foreign and not ours:
        raise ConfigError(f"{root} holds {foreign} not written by the synthetic generator; "
                          "choose an empty folder for the twin")


def _build(root: Path, params: dict[str, Any]) -> SyntheticTruth:
    """Write the twin in a hidden folder under `root`, then move it into place (lock held)."""
    build = root / f"{BUILD}{secrets.token_hex(4)}"
    try:
        for stale in root.glob(f"{BUILD}*"):  # left by a killed build: no other one runs now
            shutil.rmtree(stale)
        build.mkdir()
        truth = SyntheticTruth(root=str(root), params=params, **write_files(build, params))
        truth.save(build)
        files = {p.relative_to(build).as_posix(): p.stat().st_size
                 for p in sorted(build.rglob("*")) if p.is_file()}
        write_text(root / PARTIAL, "being written\n")
        (root / MARKER).unlink(missing_ok=True)
        for entry in sorted(build.iterdir()):
            target = root / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)  # stale files of an older twin must not survive
            os.replace(entry, target)
        write_json(root / MARKER, {"key": stable_hash(params), "params": params, "files": files})
        (root / PARTIAL).unlink()
    except StorageError:
        raise
    except OSError as err:
        raise unwritable(root, err) from None
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return truth


