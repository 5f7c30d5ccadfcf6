"""The results store: one record set per run, keyed by a hash of its resolved config.

Layout under the store root (the embedded default is `results/`):

    runs/<key>/run.json              the identity config, the flat key columns, versions
    runs/<key>/records/<probe>.parquet   long-format records of one probe
    runs/<key>/arrays/<name>.npz         large tensors (perturbations, subspaces), fp16 compressed
    runs/<key>/DONE                  written last: the run finished every probe

Every file is written atomically, so a killed job leaves no partial file. A probe whose parquet
exists is skipped on rerun, so an interrupted run resumes at the probe it stopped in, and a run
whose DONE exists is skipped whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import platform
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from brainrobust.errors import BrainRobustError, DataError
from brainrobust.files import atomic_path, sha256_file, stable_hash, write_bytes, write_json

log = logging.getLogger(__name__)

# Bumped whenever the record columns change meaning; load() refuses to merge across it.
SCHEMA_VERSION = 1


def versions() -> dict[str, str]:
    import torch

    from brainrobust import __version__

    return {
        "brainrobust": __version__,
        "schema": str(SCHEMA_VERSION),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "python": platform.python_version(),
    }


@dataclass
class RunStore:
    """The files of one run."""

    dir: Path
    key: str
    columns: dict[str, Any]
    identity: dict[str, Any] | None = None

    def _claim(self) -> None:
        """Write run.json on the first write, so composing or dry-running a run leaves no trace."""
        meta_path = self.dir / "run.json"
        if read_meta(meta_path) is None:
            write_json(meta_path, {"key": self.key, "identity": self.identity,
                                   "columns": self.columns, "versions": versions()})

    @property
    def records_dir(self) -> Path:
        return self.dir / "records"

    def records_path(self, probe: str) -> Path:
        return self.records_dir / f"{probe}.parquet"

    def has_records(self, probe: str) -> bool:
        """Whether the probe's records exist and are readable; a damaged file (truncated, not
        parquet) counts as absent, so the probe is redone and the file replaced."""
        path = self.records_path(probe)
        if not path.exists():
            return False
        try:
            pq.read_metadata(path)
        except (OSError, ValueError, pa.ArrowException) as err:
            log.warning("records %s are damaged (%s); the probe will be redone", path,
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
            return False
        return True

    def is_complete(self) -> bool:
        """DONE is written last; a run.json or records damaged since make the run incomplete
        again, so a rerun rewrites what is damaged and reuses the rest."""
        if not (self.dir / "DONE").exists() or read_meta(self.dir / "run.json") is None:
            return False
        return all(self.has_records(p.stem) for p in self.records_dir.glob("*.parquet"))

    def write_records(self, probe: str, df: pd.DataFrame) -> Path:
        """Write one probe's long-format records, with the run's key columns added."""
        if "metric" not in df.columns or "value" not in df.columns:
            raise DataError(f"records of probe {probe!r} need 'metric' and 'value' columns")
        self._claim()
        df = df.copy()
        df.insert(0, "probe", probe)
        df.insert(0, "run_key", self.key)
        for name, value in self.columns.items():
            if name not in df.columns:
                df[name] = value
        path = self.records_path(probe)
        with atomic_path(path) as tmp:
            df.to_parquet(tmp, index=False)
        return path

    def read_records(self, probe: str) -> pd.DataFrame:
        return pd.read_parquet(self.records_path(probe))

    def save_array(self, name: str, arr: np.ndarray | Mapping[str, np.ndarray],
                   exact: Collection[str] = ()) -> dict[str, str]:
        """Save a large float array (or a dict of arrays) as compressed npz; floats kept as fp16,
        but for the entries named in `exact`, which keep their dtype (stimuli: fp16 rounds an
        image near 1 by 2.4e-4, the size of a whole small perturbation's pixel change).

        Its sha256 goes beside it (`<name>.npz.sha256`, written after the array), and
        `load_array` checks it: a damaged or half-copied array is refused, never read."""
        self._claim()
        arrays = dict(arr) if isinstance(arr, Mapping) else {"data": arr}
        buf = io.BytesIO()
        np.savez_compressed(buf, **{k: np.asarray(v) if k in exact else _compact(v)
                                    for k, v in arrays.items()})
        path = self.array_path(name)
        write_bytes(path, buf.getvalue())
        digest = hashlib.sha256(buf.getvalue()).hexdigest()
        write_bytes(_checksum_path(path), digest.encode())
        return {"path": str(path), "sha256": digest}

    def array_path(self, name: str) -> Path:
        return self.dir / "arrays" / f"{name}.npz"

    def has_array(self, name: str) -> bool:
        path = self.array_path(name)
        return path.exists() and _checksum_path(path).exists()

    def load_array(self, name: str) -> dict[str, np.ndarray]:
        path = self.array_path(name)
        if not self.has_array(name):
            raise DataError(f"array {name!r} not found in run {self.key} ({path}); rerun that run first")
        expected = _checksum_path(path).read_text().strip()
        if sha256_file(path) != expected:
            raise DataError(f"array {path} of run {self.key} does not match its sha256 (damaged or "
                            "replaced); rerun that run with force=true")
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}

    def mark_complete(self) -> None:
        self._claim()
        write_json(self.dir / "DONE", {"finished": time.strftime("%Y-%m-%dT%H:%M:%S")})


def read_meta(path: Path) -> dict[str, Any] | None:
    """A run.json, or None when it is missing or damaged (logged with its path)."""
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or "key" not in meta:
            raise ValueError("not a run description")
    except (OSError, ValueError) as err:
        log.warning("%s is damaged (%s); that run counts as not done", path, err)
        return None
    return meta


def _compact(v: np.ndarray) -> np.ndarray:
    """Floats as fp16 where fp16 holds them (perturbations, directions); arrays with values
    beyond fp16's range (65504) stay float32, so no stored number turns into inf."""
    v = np.asarray(v)
    if v.dtype.kind != "f" or v.dtype.itemsize <= 2:
        return v
    finite = np.abs(v[np.isfinite(v)])
    fits = finite.size == 0 or finite.max() <= np.finfo(np.float16).max
    return v.astype(np.float16 if fits else np.float32)


class ResultsStore:
    """All runs under one root."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def run(self, identity: Mapping[str, Any], columns: Mapping[str, Any]) -> RunStore:
        """The RunStore for a run identified by `identity` (a plain, resolved config dict).

        `columns` are the flat key columns (model, subject, roi, ...) added to every record.
        """
        key = stable_hash(identity)
        run_dir = self.root / "runs" / key
        stored = read_meta(run_dir / "run.json")
        if stored is not None and stored.get("identity") != json.loads(
                json.dumps(identity, default=str)):
            raise BrainRobustError(f"results run {key} holds another config (hash collision or "
                                   f"edited run.json); move {run_dir} away")
        return RunStore(dir=run_dir, key=key, columns=dict(columns), identity=dict(identity))

    def open(self, meta: Mapping[str, Any]) -> RunStore:
        """The RunStore of an existing run, from one of `runs()`' entries."""
        return RunStore(dir=self.root / "runs" / meta["key"], key=meta["key"],
                        columns=dict(meta["columns"]), identity=meta.get("identity"))

    def open_key(self, key: str) -> RunStore | None:
        """The RunStore of run `key`, or None when nothing (readable) of it was written."""
        meta = read_meta(self.root / "runs" / key / "run.json")
        return self.open(meta) if meta is not None else None

    def runs(self) -> list[dict[str, Any]]:
        """Every run with a readable run.json; a damaged one is named in the log and left out
        (rerunning its config rewrites it)."""
        out = []
        for meta_path in sorted(self.root.glob("runs/*/run.json")):
            meta = read_meta(meta_path)
            if meta is None:
                continue
            run = self.open(meta)
            meta["complete"] = run.is_complete()
            meta["probes"] = sorted(p.stem for p in run.records_dir.glob("*.parquet")
                                    if run.has_records(p.stem))
            out.append(meta)
        return out


def _checksum_path(array: Path) -> Path:
    return array.with_name(array.name + ".sha256")


def load(root: str | Path, probe: str | None = None) -> pd.DataFrame:
    """Merge the records of every run under `root` (optionally of one probe) into one table."""
    store = ResultsStore(root)
    runs = store.runs()
    schemas = {r["versions"].get("schema") for r in runs}
    if len(schemas) > 1:
        raise DataError(
            f"results under {root} mix record schema versions {sorted(schemas)}; "
            "load each version's runs separately or rerun the old ones"
        )
    frames = []
    for r in runs:
        run = store.open(r)
        frames += [run.read_records(name) for name in r["probes"] if probe in (None, name)]
    if not frames:
        what = f"probe {probe!r}" if probe else "any probe"
        raise DataError(f"no records of {what} under {root}; run `python run.py` (with that probe) first")
    return pd.concat(frames, ignore_index=True)
