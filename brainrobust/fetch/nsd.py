"""`python -m brainrobust fetch nsd`: the files the NSD loader reads, from the public bucket.

The list comes from the loader's own path methods (`brainrobust.data.nsd.NSDLoader`), so what is
fetched is what `data=nsd` reads. Each file is downloaded under a hidden temporary name (resumed
with a range request after an interruption), checked (size; the server's MD5 where its ETag is
one; the loader's own readers for the HDF5 dataset name, dtype and shape, the NIfTI volumes, the
design and the label tables), then renamed into place. A checked file is recorded in
ROOT/.brainrobust_fetch.json with its size and mtime, so a later run skips it without reading it;
a file changed since (truncated, overwritten) is checked again and fetched again if it fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from brainrobust.data import nsd
from brainrobust.data.nsd_files import NSD_SESSIONS
from brainrobust.data.rois import as_roi_specs, builtin_names, builtin_roi, read_ctab
from brainrobust.errors import ConfigError, DataError
from brainrobust.fetch import remote as roi_only_fetch
from brainrobust.fetch.http import PART_PREFIX, Client, FetchError, NotFound, Remote, disk_errors
from brainrobust.files import write_json

NSD_URL = "https://natural-scenes-dataset.s3.amazonaws.com"
TERMS = ("NSD is free to use under its Terms and Conditions, which every user must agree to "
         "before using the data: https://naturalscenesdataset.org")
MANIFEST = ".brainrobust_fetch.json"
ROI_FILES = sorted({builtin_roi(name).file for name in builtin_names()})
VOLUME_STEMS = [f"{hemi}{file}" for file in ROI_FILES for hemi in ("", "lh.", "rh.")]
GB = 1e9


@dataclass(frozen=True)
class Item:
    """One file the loader reads: its local path, what it is, whose it is."""

    path: Path
    kind: str  # design | stimuli | roi | ctab | ncsnr | betas
    subject: int = 0


def session_path(loader: nsd.NSDLoader, subject: int, session: int) -> Path:
    return loader.betas_dir(subject) / f"betas_session{session:02d}.hdf5"


def subject_items(loader: nsd.NSDLoader, subject: int, n_sessions: int) -> list[Item]:
    """The files of one subject: ROI volumes and label tables, ncsnr, the first n sessions."""
    return [
        *(Item(loader.roi_path(subject, stem), "roi", subject) for stem in VOLUME_STEMS),
        *(Item(loader.ctab_path(subject, file), "ctab", subject) for file in ROI_FILES),
        Item(loader.betas_dir(subject) / "ncsnr.nii.gz", "ncsnr", subject),
        *(Item(session_path(loader, subject, k), "betas", subject)
          for k in range(1, n_sessions + 1)),
    ]


def grid_zyx(loader: nsd.NSDLoader, subject: int) -> tuple[int, ...]:
    """The subject's beta grid (Z, Y, X), from its ROI volume as the loader takes it."""
    return nsd._read_nifti(loader.roi_path(subject, ROI_FILES[0])).shape[::-1]


def check_file(loader: nsd.NSDLoader, item: Item, path: Path, remote: Remote) -> None:
    """Raise DataError unless `path` (a download of `item`) is what the loader expects."""
    if remote.md5:
        with open(path, "rb") as fh:
            if hashlib.file_digest(fh, "md5").hexdigest() != remote.md5:
                raise DataError(f"{path} differs from the server's copy (MD5 vs ETag)")
    if item.kind == "design":
        nsd.read_design(path)
    elif item.kind == "ctab":
        read_ctab(path)
    elif item.kind in ("roi", "ncsnr"):
        volume = nsd._read_nifti(path)
        if item.kind == "ncsnr" and volume.shape != grid_zyx(loader, item.subject)[::-1]:
            raise DataError(f"{path} has grid {volume.shape}, not the ROI files' "
                            f"{grid_zyx(loader, item.subject)[::-1]}")
    else:
        with nsd._open_h5(path) as f:
            if item.kind == "stimuli":
                nsd._h5_dataset(f, path, "imgBrick", "uint8", "of shape (73000, 425, 425, 3)")
                return
            expected = (nsd.TRIALS_PER_SESSION, *grid_zyx(loader, item.subject))
            ds = nsd._h5_dataset(f, path, "betas", "int16", f"of shape (750, Z, Y, X) = {expected}")
            if ds.shape != expected:
                raise DataError(f"{path}: dataset 'betas' has shape {ds.shape}, expected "
                                f"(750, Z, Y, X) = {expected}")


class Fetcher:
    """Files of one NSD root from one server: HEAD, download, check, record."""

    def __init__(self, root: Path, base_url: str, jobs: int):
        self.root, self.base, self.jobs = root, base_url.rstrip("/"), jobs
        self.client = Client()
        self.loader = nsd.NSDLoader(root)
        self.remotes: dict[Path, Remote] = {}
        self._lock = threading.Lock()
        try:
            self.manifest = json.loads((root / MANIFEST).read_text())
        except (OSError, ValueError):
            self.manifest = {}

    def url(self, path: Path) -> str:
        return f"{self.base}/{path.relative_to(self.root).as_posix()}"

    def head(self, items: Sequence[Item]) -> list[Remote]:
        """The server's size and ETag of each item, asked in parallel."""
        todo = [i.path for i in items if i.path not in self.remotes]
        with ThreadPoolExecutor(self.jobs) as pool:
            for path, found in zip(todo, pool.map(lambda p: self.client.head(self.url(p)), todo)):
                self.remotes[path] = found
        return [self.remotes[i.path] for i in items]

    def count_sessions(self, subject: int, planned: int) -> int:
        """Sessions 1..n of the subject on the server (the loader needs them without gaps)."""
        paths = [session_path(self.loader, subject, k) for k in range(1, planned + 1)]

        def ask(path: Path) -> Remote | None:
            try:
                return self.client.head(self.url(path))
            except NotFound:
                return None

        with ThreadPoolExecutor(self.jobs) as pool:
            found = list(pool.map(ask, paths))
        n = next((k for k, remote in enumerate(found) if remote is None), len(found))
        if n == 0:
            raise FetchError(f"subject {subject} has no {self.url(paths[0])}; check --base-url")
        self.remotes.update(zip(paths[:n], found[:n]))
        return n

    def is_done(self, item: Item) -> bool:
        """Whether the file was checked after its download and has not changed since."""
        entry = self.manifest.get(item.path.relative_to(self.root).as_posix())
        remote = self.remotes[item.path]
        try:
            stat = item.path.stat()
        except OSError:
            return False
        return entry == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                         "etag": remote.etag} and stat.st_size == remote.size

    def _record(self, item: Item) -> None:
        stat = item.path.stat()
        with self._lock:
            self.manifest[item.path.relative_to(self.root).as_posix()] = {
                "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "etag": self.remotes[item.path].etag}
            write_json(self.root / MANIFEST, self.manifest)

    def fetch(self, item: Item, progress: tqdm) -> None:
        """Bring one file into place, checked; a file that fails its check is fetched anew."""
        remote = self.remotes[item.path]
        if self.is_done(item):
            return
        if item.path.is_file() and item.path.stat().st_size == remote.size:
            try:  # a complete-looking file nobody checked yet (an earlier copy, a changed one)
                check_file(self.loader, item, item.path, remote)
                self._record(item)
                return
            except DataError:
                pass
        part = item.path.with_name(PART_PREFIX + item.path.name)
        for attempt in (1, 2):
            self.client.download(remote, part, progress.update)
            try:
                check_file(self.loader, item, part, remote)
                break
            except DataError as err:
                part.unlink()
                if attempt == 2:
                    raise FetchError(f"{remote.url} fails its check twice ({err}); the server's "
                                     "copy is damaged or not NSD's: check --base-url") from None
        with open(part, "rb+") as fh:
            os.fsync(fh.fileno())
        part.replace(item.path)
        self._record(item)

    def fetch_all(self, items: Sequence[Item]) -> None:
        todo = [i for i in items if not self.is_done(i)]
        with tqdm(total=sum(self.remotes[i.path].size for i in todo), unit="B", unit_scale=True,
                  disable=None) as bar, ThreadPoolExecutor(self.jobs) as pool:
            list(pool.map(lambda item: self.fetch(item, bar), todo))


def _size(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= GB / 10 else f"{nbytes / 1e6:.1f} MB"


def fetch_nsd(root: str | os.PathLike, subjects: Sequence[int], sessions: int | None = None,
              base_url: str | None = None, accept_terms: bool = False,
              roi_only: Sequence[str] | None = None, jobs: int = 8) -> None:
    """Fetch what `NSDLoader(root)` reads for `subjects` (see the module docstring).

    sessions: the first `sessions` sessions of each subject (all on the server when None).
    base_url: the server holding NSD's layout (default: the natural-scenes-dataset bucket).
    roi_only: fetch only these ROIs' voxels of the betas and the subjects' images of the
    stimuli, into partial copies (`brainrobust.data.partial`).
    """
    if not accept_terms:
        raise ConfigError(f"{TERMS}; read them, then pass --accept-terms to agree and fetch")
    subjects = sorted({nsd.check_subject(s, "NSD has subjects 1-8") for s in subjects})
    for flag, value in (("--sessions", sessions), ("--jobs", jobs)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if sessions is not None and sessions > max(NSD_SESSIONS):
        raise ConfigError(f"--sessions must be <= {max(NSD_SESSIONS)} (NSD's most sessions per "
                          f"subject), got {sessions}")
    specs = as_roi_specs(list(roi_only)) if roi_only else []
    print(f"{TERMS} (agreed with --accept-terms)")
    root = Path(root).expanduser()
    with disk_errors(root):
        root.mkdir(parents=True, exist_ok=True)
        _fetch(Fetcher(root, base_url or NSD_URL, jobs), subjects, sessions, specs)
    rois = f" roi=[{','.join(spec.name for spec in specs)}]" if specs else ""
    print(f"done: python run.py data=nsd data.root={root} subject={subjects[0]}{rois}")


def _fetch(fetcher: Fetcher, subjects: list[int], sessions: int | None, specs: list) -> None:
    loader = fetcher.loader
    design = Item(loader.design_path, "design")
    fetcher.head([design])
    fetcher.fetch_all([design])
    counts = {}
    for s in subjects:
        available = fetcher.count_sessions(s, loader.design.n_planned_sessions)
        if sessions is not None and sessions > available:
            raise ConfigError(f"subject {s} has {available} sessions at {fetcher.base}; pass "
                              f"--sessions {available} or fewer")
        counts[s] = sessions or available
    items = [design, Item(loader.stimuli_path, "stimuli"),
             *(i for s in subjects for i in subject_items(loader, s, counts[s]))]
    remotes = dict(zip(items, fetcher.head(items)))
    large = ("betas", "stimuli")
    whole = [i for i in items if not (specs and i.kind in large)]
    done = sum(remotes[i].size for i in whole if fetcher.is_done(i))
    total = sum(remotes[i].size for i in whole)
    listing = ", ".join(f"{s} ({counts[s]} sessions)" for s in subjects)
    print(f"subjects {listing}: {len(whole)} files, {_size(total)} at {fetcher.base}; "
          f"{_size(done)} already here, {_size(total - done)} to fetch")
    fetcher.fetch_all([i for i in items if i.kind not in (*large, "ncsnr")])
    fetcher.fetch_all([i for i in items if i.kind == "ncsnr"])  # checked against the ROI grid
    if specs:
        _fetch_roi_only(fetcher, [i for i in items if i.kind in large], specs, subjects)
    else:
        fetcher.fetch_all([i for i in items if i.kind in large])


def _fetch_roi_only(fetcher: Fetcher, items: list[Item], specs: list, subjects: list[int]) -> None:
    """Partial copies of the betas (the ROIs' voxels) and the stimuli (the subjects' images)."""
    loader, client, jobs = fetcher.loader, fetcher.client, fetcher.jobs
    todo = [i for i in items if not fetcher.is_done(i)]  # a checked full file holds everything
    voxels = {}
    for s in subjects:
        masks, _ = loader._roi_masks(s, specs)
        voxels[s] = np.flatnonzero(np.logical_or.reduce(list(masks.values())))

    def cost(item: Item) -> tuple[int, int]:
        found = fetcher.remotes[item.path]
        if item.kind == "betas":
            return roi_only_fetch.betas_cost(client, found, item.path, voxels[item.subject])
        missing = roi_only_fetch.stimuli_rows_missing(item.path, found, rows)
        if not len(missing):
            return 0, 0
        rds = roi_only_fetch.stimuli_dataset(client, found)
        return roi_only_fetch.planned_bytes(missing, int(np.prod(rds.shape[1:])))

    rows = np.unique(np.concatenate([loader.design.subjectim[s - 1] - 1 for s in subjects]))
    with ThreadPoolExecutor(jobs) as pool:
        costs = dict(zip(todo, pool.map(cost, todo)))
    todo = [i for i in todo if costs[i][1]]
    nbytes, requests = sum(costs[i][0] for i in todo), sum(costs[i][1] for i in todo)
    full = sum(fetcher.remotes[i.path].size for i in todo)
    print(f"--roi-only {' '.join(s.name for s in specs)}: {len(todo)} partial files, "
          f"{_size(nbytes)} in {requests} range requests instead of {_size(full)}")
    names = [spec.name for spec in specs]
    with tqdm(total=nbytes, unit="B", unit_scale=True, disable=None) as bar:
        for item in todo:
            remote = fetcher.remotes[item.path]
            if item.kind == "betas":
                roi_only_fetch.fetch_betas(client, remote, item.path, voxels[item.subject],
                                           grid_zyx(loader, item.subject), names, jobs, bar.update)
            else:
                roi_only_fetch.fetch_stimuli(client, remote, item.path, rows, subjects, jobs,
                                             bar.update)
