"""Checks and fingerprints of dataset files, shared by the loaders.

Every file a loader reads is first checked here, so a path that is missing, a directory, a
dangling link, a link loop, too long a name or unreadable ends in one DataError line that names
the file and the fix, never in a traceback or a misleading "truncated, re-download it".

Two identities of a file, for two purposes:
- `stat_key` (size, mtime, ctime): keys of the per-machine caches. ctime cannot be set back by
  a user (os.utime sets it to now), so any rewrite of a file, even one that restores its mtime,
  invalidates what was extracted from it.
- `file_digest` (content): a run's results key, which must not depend on where the data lives
  nor on when it was copied. See `file_digest` for what it reads.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from brainrobust.errors import ConfigError, DataError

# A stimulus below one ViT patch (16 px) has no spatial structure at the coarsest granularity a
# zoo backbone resolves, and it is the smallest size the tests' twins draw faces at; above 1024
# (NSD's stimuli are 425) the float test images and per-image gradients outgrow a GPU.
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 1024
# Files up to this size are hashed whole: every file of the default twin, the design, ROI
# volumes, label tables and ncsnr of the real NSD. Larger ones (NSD's 37 GB stimuli, its 1 GB
# beta sessions) are identified by size, mtime and SAMPLES blocks spread over the file.
FULL_HASH_BYTES = 256 << 20
SAMPLE_BYTES = 64 << 10
SAMPLES = 16


def check_image_size(size: Any, where: str = "data.image_size") -> int | None:
    """`size` as an int in [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE] (None passes), else a ConfigError."""
    if size is None:
        return None
    try:
        value = int(size)
    except (TypeError, ValueError):
        value = -1
    if isinstance(size, bool) or value != size or not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
        raise ConfigError(f"{where} must be an int in {MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE} (NSD's "
                          f"stimuli are 425 px) or null for the files' own size; got {size!r}")
    return value


def missing(path: Path, hint: str) -> DataError:
    # The root itself was found: most often one file is missing from a right root.
    return DataError(f"{path.name} not found under {path.parent}; copy or fetch it there, or, "
                     f"if the root is wrong, set data.root=... to {hint}")


def unreadable(path: Path, err: OSError, hint: str) -> DataError:
    """One line for an OSError met on `path`, by its cause."""
    code = err.errno
    if code in (errno.ENOENT, errno.ENOTDIR):
        if os.path.islink(path):
            return DataError(f"{path} is a link to {os.readlink(path)}, which does not exist; "
                             "fix the link or replace it with the file")
        return missing(path, hint)
    if code in (errno.EACCES, errno.EPERM):
        return DataError(f"cannot read {path}: permission denied; make it readable (chmod a+r) "
                         "for the user running brainrobust")
    if code == errno.ELOOP:
        return DataError(f"{path} is a symbolic link loop; replace the link with the file")
    if code == errno.ENAMETOOLONG:
        return DataError(f"{path}: a path component is longer than the filesystem allows (255 "
                         "bytes); set data.root=... to a shorter path")
    if code == errno.EISDIR:
        return DataError(f"{path} is a directory, expected a file; remove it and put the file "
                         "there")
    return DataError(f"cannot read {path} ({err.strerror or type(err).__name__}); check the file "
                     "and the filesystem it is on")


def read_error(path: Path, exc: Exception, hint: str, damaged: str = "truncated or damaged"
               ) -> DataError:
    """One line for a failed read: a system error (permission, link loop, ...) says so; any
    other is a damaged file."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return unreadable(path, exc, hint)
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DataError(f"cannot read {path} ({reason}): {damaged}; re-download it")


def check_root(root: Path, layout: str, hint: str) -> Path:
    """`root` if it is a readable directory, else one DataError line naming the `layout`."""
    try:
        st = root.stat()
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            raise DataError(f"{layout} root {root} not found; set data.root=... to {hint}") \
                from None
        raise unreadable(root, err, hint) from None
    if not stat.S_ISDIR(st.st_mode):
        raise DataError(f"{layout} root {root} is a file, expected a folder; set data.root=... "
                        f"to {hint}")
    return root


def stat_file(path: Path, hint: str) -> os.stat_result:
    """The stat of a regular file (links followed), else one DataError line saying why not."""
    try:
        st = path.stat()
    except OSError as err:
        raise unreadable(path, err, hint) from None
    if stat.S_ISDIR(st.st_mode):
        raise unreadable(path, IsADirectoryError(errno.EISDIR, "Is a directory"), hint)
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path} is not a regular file (a device, socket or pipe); put the file "
                        "there")
    return st


def is_file(path: Path, hint: str) -> bool:
    """Whether an optional file is there; a path that is there but unusable is an error."""
    if not os.path.lexists(path):
        return False
    stat_file(path, hint)
    return True


def stat_key(path: Path, hint: str) -> list[Any]:
    """Name, size, mtime and ctime of a file: its identity in a per-machine cache key."""
    st = stat_file(path, hint)
    return [path.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def file_digest(path: Path, hint: str) -> str:
    """A content digest of a file for a run's results key.

    Up to FULL_HASH_BYTES: sha256 of the whole file, so a flipped byte always changes it,
    wherever the file lives and whatever its mtime. Above: size, mtime and sha256 of SAMPLES
    blocks of SAMPLE_BYTES from the first to the last byte (the HDF5 superblock and dataset
    headers are in the first block). Hashing NSD's 37 GB stimuli or forty 1 GB sessions on every
    run would take minutes; the sample catches truncation, a re-packed or replaced file and
    damage to a sampled region, and mtime catches any ordinary rewrite. What it misses: bytes
    changed between the samples of a large file whose mtime was then set back on purpose.
    The per-machine caches still rebuild then (ctime in `stat_key`), but a finished run with the
    same digest is not redone.
    """
    st = stat_file(path, hint)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            if st.st_size <= FULL_HASH_BYTES:
                while block := fh.read(1 << 20):
                    digest.update(block)
                return f"{st.st_size}:{digest.hexdigest()[:32]}"
            last = st.st_size - SAMPLE_BYTES
            for k in range(SAMPLES):
                fh.seek(last * k // (SAMPLES - 1))
                digest.update(fh.read(SAMPLE_BYTES))
    except OSError as err:
        raise unreadable(path, err, hint) from None
    return f"{st.st_size}:{st.st_mtime_ns}:{digest.hexdigest()[:32]}"


def digests(root: Path, paths: Iterable[Path], hint: str) -> dict[str, str]:
    """Relative path -> `file_digest` for files under `root`: a record without the root."""
    return {p.relative_to(root).as_posix(): file_digest(p, hint) for p in paths}
