"""Atomic file writes and checksums.

Every file brainrobust writes goes through `atomic_path`: the content lands in a temporary file
in the same folder and is renamed into place, so a killed job leaves either the old file or the
new one, never a partial file that a later run could read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from brainrobust.errors import StorageError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` when the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _new_file_beside(path)
    except OSError as err:
        raise unwritable(path, err) from None
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except StorageError:
        raise
    except OSError as err:
        raise unwritable(path, err) from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


def unwritable(path: Path, err: OSError) -> StorageError:
    """One line for a failed write (read-only or full filesystem, no permission)."""
    reason = err.strerror or type(err).__name__
    return StorageError(f"cannot write {path}: {reason}; free space or fix the permissions there, "
                        "or point paths.results_dir / paths.cache_dir / paths.log_dir elsewhere")


def check_writable(folder: str | os.PathLike) -> None:
    """Fail now, in one line, if `folder` cannot take a new file: before hours of compute."""
    write_bytes(Path(folder) / ".write-check", b"")
    (Path(folder) / ".write-check").unlink(missing_ok=True)


def _new_file_beside(path: Path) -> Path:
    """An empty, uniquely named file in `path`'s folder, created with the mode a plain open()
    gives (0o666 & ~umask): mkstemp's 0600 would make every file written here private."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-serialisable object that does not depend on dict order."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) for the block.

    POSIX record locks (`fcntl.lockf`) are held per process, released by the kernel when the
    holder dies (kill -9 included), and honoured across machines on NFS with lockd, so jobs of
    a sweep on one machine or on a cluster's shared filesystem serialise on them. `on_wait` runs
    once if another process holds the lock, before this one blocks.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if on_wait is not None:
                on_wait()
            fcntl.lockf(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(fh, fcntl.LOCK_UN)
