"""The real NSD layout on disk: paths, the design, checked readers and the data fingerprint.

What the loader (`brainrobust.data.nsd`) reads, under the dataset root:
  nsddata/experiments/nsd/nsd_expdesign.mat            design; every index in it is 1-based
  nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5         imgBrick uint8 (73000, 425, 425, 3)
  nsddata_betas/ppdata/subjXX/func1pt8mm/betas_fithrf_GLMdenoise_RR/
      betas_sessionNN.hdf5                             betas int16 (750, Z, Y, X), PSC x 300
      ncsnr.nii.gz                                     float (X, Y, Z), optional
  nsddata/ppdata/subjXX/func1pt8mm/roi/[lh.|rh.]floc-*.nii.gz   label codes (X, Y, Z)
  nsddata/freesurfer/subjXX/label/floc-*.mgz.ctab      '<code> <name>' per line
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import scipy.io
from nibabel.filebasedimages import ImageFileError
from scipy.io.matlab import MatReadError

from brainrobust.data.datafiles import (
    check_root,
    digests,
    is_file,
    missing,
    read_error,
    stat_file,
)
from brainrobust.data.rois import ROISpec, as_roi_specs
from brainrobust.errors import ConfigError, DataError
from brainrobust.files import stable_hash

log = logging.getLogger(__name__)

TRIALS_PER_SESSION = 750
N_SUBJECTS = 8
# Completed sessions per subject as NSD published them.
NSD_SESSIONS = (40, 40, 32, 30, 40, 32, 40, 30)
# A twin of NSD (brainrobust.data.synthetic) records its own completed sessions here: a JSON list
# of 8 counts that replaces NSD_SESSIONS for the data under that root.
TWIN_SESSIONS = ".brainrobust_synthetic_sessions.json"
NSD_ROOT = "the NSD root (the folder holding nsddata/, nsddata_betas/, nsddata_stimuli/)"

_missing = partial(missing, hint=NSD_ROOT)
_failed_read = partial(read_error, hint=NSD_ROOT)


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


def _session_counts(counts: object) -> bool:
    """Whether `counts` is one completed-session count (an integer >= 1, not a bool) per subject."""
    return (isinstance(counts, (Sequence, np.ndarray)) and not isinstance(counts, str)
            and len(counts) == N_SUBJECTS
            and all(isinstance(n, numbers.Integral) and not isinstance(n, (bool, np.bool_))
                    and n >= 1 for n in counts))


def read_design(path: Path) -> Design:
    """Read and check nsd_expdesign.mat."""
    stat_file(path, NSD_ROOT)
    try:
        mat = scipy.io.loadmat(path)
    except (OSError, ValueError, TypeError, MatReadError) as exc:
        raise _failed_read(path, exc) from None
    missing_keys = [k for k in ("masterordering", "subjectim", "sharedix") if k not in mat]
    if missing_keys:
        raise DataError(f"{path} lacks key {missing_keys[0]!r} (expects masterordering, "
                        "subjectim, sharedix); re-download it")
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


def _open_h5(path: Path) -> h5py.File:
    """Open an HDF5 file read-only; every beta/stimulus read goes through here."""
    stat_file(path, NSD_ROOT)
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise _failed_read(path, exc, damaged="truncated or not HDF5") from None


def _h5_dataset(f: h5py.File, path: Path, name: str, dtype: str, expected: str) -> h5py.Dataset:
    ds = f.get(name)
    if not isinstance(ds, h5py.Dataset):
        raise DataError(f"{path} has no dataset {name!r} (found {sorted(f.keys())}); expected "
                        f"{name!r} {dtype} {expected}")
    if ds.dtype != np.dtype(dtype):
        raise DataError(f"{path}: dataset {name!r} is {ds.dtype}, expected {dtype} {expected}")
    return ds


def _read_nifti(path: Path) -> np.ndarray:
    stat_file(path, NSD_ROOT)
    try:
        data = np.asanyarray(nib.load(path).dataobj)
    except (OSError, ValueError, EOFError, ImageFileError, zlib.error) as exc:
        raise _failed_read(path, exc) from None
    if data.ndim != 3:
        raise DataError(f"{path} has shape {data.shape}, expected a 3-D (X, Y, Z) volume")
    return data


def check_subject(subject: Any, present: str) -> int:
    """`subject` as an int 1-8, else a ConfigError that says which subjects have data."""
    try:
        s = int(subject)
    except (TypeError, ValueError):
        s = -1
    if s != subject or not 1 <= s <= N_SUBJECTS:
        raise ConfigError(f"unknown subject {subject!r}; valid: 1-{N_SUBJECTS} ({present})")
    return s


class NSDLayout:
    """The files of an NSD root: where each is, which sessions a subject has, and a fingerprint.

    Parameters
    ----------
    root : path
        Dataset root holding nsddata/, nsddata_betas/ and nsddata_stimuli/.
    sessions_fallback : 8 ints, optional
        Completed sessions the dataset defines per subject: a subject with fewer beta files is
        warned about, and one without beta files is assumed to have them when the test set is
        computed. None takes the counts a twin recorded at its root (TWIN_SESSIONS), else NSD's
        published ones.
    """

    def __init__(self, root: str | os.PathLike,
                 sessions_fallback: Sequence[int] | None = None):
        self.root = check_root(Path(root).expanduser(), "NSD", NSD_ROOT)
        if sessions_fallback is None:
            self.sessions_fallback = self._recorded_sessions()
        elif not _session_counts(sessions_fallback):
            raise ConfigError(f"sessions_fallback needs {N_SUBJECTS} integer counts >= 1, "
                              f"got {sessions_fallback!r}")
        else:
            self.sessions_fallback = tuple(int(n) for n in sessions_fallback)
        self._design: Design | None = None
        self._warned: set[int] = set()

    def _recorded_sessions(self) -> tuple[int, ...]:
        path = self.root / TWIN_SESSIONS
        if not is_file(path, NSD_ROOT):
            return NSD_SESSIONS
        try:
            counts = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            counts = exc
        if not _session_counts(counts):
            raise DataError(f"cannot read {path} (expected a JSON list of {N_SUBJECTS} integer "
                            f"session counts >= 1, got {counts!s:.60}); delete the twin's folder "
                            "to have it rewritten") from None
        return tuple(int(n) for n in counts)

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

    # ---- design and sessions -------------------------------------------------------------
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
        planned = self.design.n_planned_sessions
        if len(numbers) > planned:
            raise DataError(f"{directory} holds {len(numbers)} sessions but the design in "
                            f"{self.design_path} plans {planned}")
        expected = min(self.sessions_fallback[subject - 1], planned)
        if len(numbers) < expected and subject not in self._warned:
            self._warned.add(subject)
            log.warning("subject %d has %d of the %d sessions the dataset defines under %s: its "
                        "training split is smaller and the test split can differ; fetch the "
                        "missing sessions", subject, len(numbers), expected, directory)
        return [directory / f"betas_session{n:02d}.hdf5" for n in numbers]

    def n_sessions(self, subject: int) -> int:
        """Completed sessions of a subject, counted from the beta files present."""
        return len(self._session_files(self._check_subject(subject)))

    def _check_subject(self, subject: Any) -> int:
        return check_subject(subject, f"beta files present for {self.subjects}")

    def fingerprint(self, subject: int, rois: ROISpec | str | Sequence[ROISpec | str]) -> str:
        """Digest of everything a load of `subject`'s `rois` reads, without the root's path.

        Covers the design, the stimuli, the subject's sessions, ncsnr, the ROI volumes and label
        tables, a twin's recorded session counts, and every subject's number of sessions (the
        test set depends on all of them); see `datafiles.file_digest` for what it reads.
        """
        subject = self._check_subject(subject)
        files = [self.design_path, self.stimuli_path, *self._session_files(subject)]
        for spec in as_roi_specs(rois):
            files += [self.roi_path(subject, spec.volume_stem), self.ctab_path(subject, spec.file)]
        files += [p for p in (self.betas_dir(subject) / "ncsnr.nii.gz", self.root / TWIN_SESSIONS)
                  if is_file(p, NSD_ROOT)]
        return stable_hash({
            "layout": "nsd",
            "sessions": [len(self._session_numbers(s)) for s in range(1, N_SUBJECTS + 1)],
            "files": digests(self.root, sorted(set(files)), NSD_ROOT),
        }, length=32)
