"""`python -m brainrobust fetch weights`: the checkpoints the zoo's configs name, into the folder
runs read weights from, each recorded in its lock file.

MadryLab checkpoints come from their URLs through brainrobust's resumable HTTP client; timm
weights through huggingface_hub (its cache, resume and progress bar; HF_ENDPOINT selects a
mirror), then hard-linked (or copied) into the weights folder, so one folder holds everything an
offline node needs. No checksums are published for these files: the sha256 of each is recorded
in <weights folder>/weights.lock.json on its first download (trust on first use), and every later
load and every `fetch weights` verifies the file against it.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tqdm import tqdm

from brainrobust.errors import ConfigError, WeightsError
from brainrobust.fetch.http import PART_PREFIX, Client, disk_errors
from brainrobust.files import atomic_path, sha256_file
from brainrobust.models.weights import (
    HUB_FILES,
    default_weights_dir,
    load_madry_state_dict,
    read_checkpoint,
    record_lock,
    source_url,
    verify_locked,
    verify_sha256,
)
from brainrobust.models.zoo import ModelSpec, get_spec, list_models

HUB_HOST = "huggingface.co"


def rebase(url: str, base_url: str | None) -> str:
    """`url` on the host of `base_url` (a mirror), same path; unchanged when base_url is None."""
    if not base_url:
        return url
    base, parts = urlsplit(base_url), urlsplit(url)
    return urlunsplit((base.scheme, base.netloc, base.path.rstrip("/") + parts.path,
                       parts.query, ""))


def fetch_weights(names: Sequence[str], all_models: bool = False,
                  weights_dir: str | os.PathLike | None = None,
                  base_url: str | None = None) -> list[Path]:
    """Fetch, lock and verify the weights of the named models (or all of them).

    base_url replaces the host of every source (MadryLab URLs and the Hugging Face endpoint);
    without it HF_ENDPOINT does, for every source on huggingface.co (MadryLab's included).
    """
    if bool(names) == all_models:
        raise ConfigError("name the models to fetch (python -m brainrobust models lists them) "
                          "or pass --all, not both")
    if base_url and urlsplit(base_url).scheme not in ("http", "https"):
        raise ConfigError(f"--base-url must be an http:// or https:// address, got {base_url!r}")
    specs = [get_spec(name) for name in (list_models() if all_models else names)]
    folder = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    fetched = []
    with disk_errors(folder):
        for spec in specs:
            if spec.filename is None:
                print(f"{spec.name}: random init, nothing to fetch")
                continue
            fetched.append(fetch_spec(spec, folder, base_url))
    if fetched:
        print(f"weights in {folder}: python -m brainrobust models shows their state")
    return fetched


def fetch_spec(spec: ModelSpec, folder: Path, base_url: str | None = None) -> Path:
    """`folder/<spec.filename>`, downloaded if absent, locked, and verified."""
    local = folder / spec.filename
    if not local.is_file():
        if spec.family == "madry":
            _fetch_url(spec, local, base_url)
        else:
            _fetch_hub(spec, local, base_url)
    sha256 = verify_locked(local)
    if sha256 is None:  # a file someone put there: trusted now, verified from now on
        sha256 = sha256_file(local)
        verify_sha256(local, spec.sha256, spec.name)
        record_lock(folder, local.name, sha256, "found in place")
    print(f"{spec.name}: {local} sha256 {sha256[:16]}... verified")
    return local


def _mirror(url: str, base_url: str | None) -> str:
    """Where to fetch `url` from: --base-url, else HF_ENDPOINT for a hub URL, else itself."""
    if base_url is None and urlsplit(url).netloc == HUB_HOST:
        base_url = os.environ.get("HF_ENDPOINT")
    return rebase(url, base_url)


def _fetch_url(spec: ModelSpec, local: Path, base_url: str | None) -> None:
    source = _mirror(spec.url, base_url)
    client = Client()
    remote = client.head(source)
    part = local.with_name(PART_PREFIX + local.name)
    have = part.stat().st_size if part.is_file() else 0
    with tqdm(total=remote.size, initial=have, unit="B", unit_scale=True, disable=None,
              desc=spec.name) as bar:
        client.download(remote, part, bar.update)
    try:  # a wrong file (an error page, another format) must not be locked as the truth
        load_madry_state_dict(part, sha256=spec.sha256)
    except WeightsError as err:
        part.unlink()
        raise WeightsError(f"{source} is not a usable MadryLab checkpoint ({err}); check "
                           "--base-url") from None
    with open(part, "rb+") as fh:
        os.fsync(fh.fileno())
    part.replace(local)
    record_lock(local.parent, local.name, sha256_file(local), source)


def _fetch_hub(spec: ModelSpec, local: Path, base_url: str | None) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        cached = Path(hf_hub_download(spec.hub_id, HUB_FILES[0], endpoint=base_url)).resolve()
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"download of {_mirror(source_url(spec), base_url)} through "
                           f"huggingface_hub failed ({reason}); check the network, HF_ENDPOINT "
                           "or --base-url") from None
    sha256 = sha256_file(cached)
    # The hub names its cache blobs after the ETag, the sha256 of an LFS file: a published
    # checksum after all, so check it.
    if re.fullmatch(r"[0-9a-f]{64}", cached.name) and cached.name != sha256:
        raise WeightsError(f"refused: {cached} has sha256 {sha256} but the hub announced "
                           f"{cached.name}; delete it and fetch again")
    verify_sha256(cached, spec.sha256, spec.name)
    read_checkpoint(cached)
    with atomic_path(local) as tmp:
        tmp.unlink()
        try:
            os.link(cached, tmp)  # no second copy on the same file system
        except OSError:
            shutil.copyfile(cached, tmp)
    record_lock(local.parent, local.name, sha256, _mirror(source_url(spec), base_url))
