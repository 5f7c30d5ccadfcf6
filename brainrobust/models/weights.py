"""Finding, checking and loading backbone weights without the network unless asked to.

Sources, in order: `model.weights` (a local file), `<weights_dir>/<filename>`, the Hugging Face
cache (timm models), then a download only when `model.allow_download=true`. Pickled
checkpoints are read with `torch.load(weights_only=True)`, so a file cannot run code while it
loads; MadryLab checkpoints load without the `robustness` package by keeping the
`module.model.*` weights and dropping the attacker and normaliser copies.

`python -m brainrobust fetch weights` fills the weights folder and records each file's sha256 in
its lock file (`weights.lock.json`) on first download; no checksums are published for these
checkpoints, so that first download is trusted and every later load is verified against it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import pickletools
import re
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brainrobust.errors import WeightsError
from brainrobust.files import atomic_path, sha256_file, write_json
from brainrobust.models.zoo import MODEL_DIR, ModelSpec

log = logging.getLogger(__name__)

MADRY_PREFIX = "module.model."
# timm's hub repos carry the weights under this name; pytorch_model.bin on older repos.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
LOCK_FILE = "weights.lock.json"
_SHOWN_KEYS = 4


def default_weights_dir() -> Path:
    """The folder runs read weights from unless told otherwise: `paths.weights_dir` of
    conf/paths/default.yaml ($BRAINROBUST_WEIGHTS_DIR, else .cache/brainrobust/weights under
    the working folder)."""
    from omegaconf import OmegaConf

    paths = OmegaConf.load(MODEL_DIR.parent / "paths" / "default.yaml")
    return Path(OmegaConf.create({"paths": paths}).paths.weights_dir)


def read_lock(folder: str | os.PathLike) -> dict[str, dict[str, str]]:
    """File name -> {sha256, source, recorded} of the lock file in `folder` ({} if none)."""
    path = Path(folder) / LOCK_FILE
    try:
        return json.loads(path.read_text())["files"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"{path} is unreadable ({err}); restore it, or delete it to trust "
                           "the files beside it anew") from None


def record_lock(folder: str | os.PathLike, filename: str, sha256: str, source: str) -> None:
    """Record a file's sha256 on its first download (trust on first use)."""
    files = read_lock(folder)
    files[filename] = {"sha256": sha256, "source": source,
                       "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(Path(folder) / LOCK_FILE, {"files": files})


def verify_locked(path: str | os.PathLike) -> str | None:
    """The file's sha256 when its folder's lock file lists it, None when it does not.

    Raises
    ------
    WeightsError
        The file differs from what the lock file recorded on its first download.
    """
    path = Path(path)
    entry = read_lock(path.parent).get(path.name)
    if entry is None:
        return None
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise WeightsError(
            f"refused: {path} has sha256 {actual} but the lock file recorded {entry['sha256']} "
            "on first download; delete it and fetch again if the source changed"
        )
    return actual


def source_url(spec: ModelSpec) -> str | None:
    """Where the default weights of `spec` are published (None for random-init models)."""
    if spec.family == "madry":
        return spec.url
    if spec.family == "timm":
        return f"https://huggingface.co/{spec.hub_id}/resolve/main/{HUB_FILES[0]}"
    return None


def resolve_weights(
    spec: ModelSpec,
    weights_dir: str | os.PathLike | None = None,
    hub_cache_dir: str | os.PathLike | None = None,
) -> Path | None:
    """Path of the weights file for `spec`, or None for a random-init (offline) model.

    Never touches the network unless `spec.allow_download` is set.

    Raises
    ------
    WeightsError
        The file is nowhere to be found; the message names the URL and the path to put it at.
    """
    if spec.weights:
        path = Path(spec.weights).expanduser()
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise WeightsError(
                f"model.weights={spec.weights} {what}; fix the path or set model.weights=null")
        return path
    if spec.filename is None:
        return None
    folder = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    local = folder / spec.filename
    if local.is_file():
        return local
    if spec.hub_id:
        from huggingface_hub import try_to_load_from_cache

        for hub_file in HUB_FILES:
            cached = try_to_load_from_cache(spec.hub_id, hub_file, cache_dir=hub_cache_dir)
            if isinstance(cached, str):
                return Path(cached)
    if spec.allow_download:
        return _download(spec, local)
    raise WeightsError(
        f"weights for {spec.name} not found: run python -m brainrobust fetch weights {spec.name} "
        f"--weights-dir {folder.absolute()} where there is network (or download "
        f"{source_url(spec)} to {local}, set model.weights=/path, or model.allow_download=true)"
    )


def _download(spec: ModelSpec, local: Path) -> Path:
    log.info("downloading weights for %s from %s", spec.name, source_url(spec))
    try:
        if spec.family == "timm":
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(spec.hub_id, HUB_FILES[0]))
        with atomic_path(local) as tmp:
            torch.hub.download_url_to_file(spec.url, str(tmp), progress=True)
            # Checked before the rename, so a wrong file never lands in weights_dir.
            verify_sha256(tmp, spec.sha256, spec.name)
        record_lock(local.parent, local.name, sha256_file(local), spec.url)
    except OSError as err:
        raise WeightsError(
            f"download of {source_url(spec)} failed ({err}); fetch it by hand to {local}"
        ) from None
    return local


def weights_identity(spec: ModelSpec, weights_dir: str | os.PathLike | None = None) -> str:
    """A short string that changes whenever the weights `spec` would load change.

    The configured sha256 when there is one (it is verified at load), else path, size and
    modification time of the resolved file, else the random-init seed.
    """
    if spec.sha256:
        return f"sha256:{spec.sha256}"
    path = resolve_weights(spec, weights_dir)
    if path is None:
        return f"random-init:{spec.arch}:seed={spec.seed}"
    stat = path.stat()
    return f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def weights_status(spec: ModelSpec, weights_dir: str | os.PathLike | None = None) -> str:
    """What `python -m brainrobust models` shows: verified, not locked, CHANGED, missing or
    random init. Reads (hashes) the file; never touches the network."""
    if spec.filename is None and not spec.weights:
        return "random init"
    try:
        path = resolve_weights(dataclasses.replace(spec, allow_download=False), weights_dir)
    except WeightsError:
        return "missing"
    try:
        return "verified" if verify_locked(path) else "not locked"
    except WeightsError:
        return "CHANGED"


def verify_sha256(path: str | os.PathLike, expected: str | None, name: str) -> None:
    """Raise WeightsError when `expected` is set and the file's sha256 differs."""
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(
            f"{path} has sha256 {actual[:12]}..., but {name} expects {expected[:12]}...; "
            f"re-download it, or set model.sha256=null to accept this file"
        )


def read_checkpoint(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> Any:
    """Load a safetensors file or a torch checkpoint without executing code from it.

    Raises
    ------
    WeightsError
        The pickle holds non-tensor objects (refused unless `allow_unsafe_pickle`), or the
        file is not a readable checkpoint.
    """
    path = Path(path)
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as err:
            raise WeightsError(f"{path} is not a readable safetensors file ({err})") from None
    if allow_unsafe_pickle:
        log.warning("unpickling %s with weights_only=False (model.allow_unsafe_pickle=true)", path)
    if path.stat().st_size == 0:
        raise WeightsError(f"{path} is empty (0 bytes): an interrupted download? fetch it again")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle)
    except pickle.UnpicklingError as err:
        # torch's safe unpickler may only name the opcode it stopped at (a FRAME of protocol
        # 4, say): a stream that parses as a pickle is a refusal, one that does not is damage.
        found = re.search(r"GLOBAL (\S+?)(?: whose|\s|$)", str(err))
        if found or _parses_as_pickle(path):
            what = found.group(1) if found else "an object other than tensors"
            raise WeightsError(
                f"{path} refused as unsafe: it carries {what}, and unpickling it could run code; "
                "if you trust the file set model.allow_unsafe_pickle=true") from None
        raise WeightsError(
            f"{path} is not a readable torch checkpoint (damaged or another format)") from None
    except Exception as err:  # noqa: BLE001 (whatever torch's parsers raise, the file is not a checkpoint)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsError(f"{path} is not a readable torch checkpoint ({reason})") from None


def _parses_as_pickle(path: Path) -> bool:
    # torch.save writes a zip holding data.pkl; older checkpoints are a bare pickle.
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                stream = io.BytesIO(archive.read(name))
        else:
            stream = io.BytesIO(path.read_bytes())
        for _ in pickletools.genops(stream):
            pass
    except (ValueError, StopIteration, zipfile.BadZipFile, OSError):
        return False
    return True


def _is_safetensors(path: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 32)


def _some(keys: list[str]) -> str:
    """The first few keys, for one-line messages."""
    more = ", ..." if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    """The state dict in a checkpoint: its 'model' or 'state_dict' entry, or the object itself."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def _tensors_only(state: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries {_some(bad)} are not tensors; not a state dict")
    return dict(state)


def _strip_madry(state: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    # The robustness library saves DataParallel(AttackerModel): the network under
    # module.model.*, a second copy under module.attacker.model.*, and the input normaliser.
    kept = {
        key[len(MADRY_PREFIX) :]: value
        for key, value in state.items()
        if key.startswith(MADRY_PREFIX)
    }
    if not kept:
        found = _some(list(state))
        raise WeightsError(
            f"{path} is not a MadryLab checkpoint: no {MADRY_PREFIX}* keys (found {found})"
        )
    return _tensors_only(kept, path)


def load_madry_state_dict(
    path: str | os.PathLike, allow_unsafe_pickle: bool = False, sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """State dict of the network in a MadryLab `robustness` checkpoint, keys without prefix.

    Parameters
    ----------
    path
        The .ckpt file: a dict whose 'model' (or 'state_dict') entry has `module.model.*`,
        `module.attacker.model.*` and `module.normalizer.*` keys; only the first are kept.
    allow_unsafe_pickle
        Unpickle arbitrary objects (only for files you trust).
    sha256
        Expected checksum; verified before the file is read.
    """
    path = Path(path)
    verify_sha256(path, sha256, str(path))
    return _strip_madry(_unwrap(read_checkpoint(path, allow_unsafe_pickle), path), path)


def load_state_dict_file(
    path: str | os.PathLike, allow_unsafe_pickle: bool = False, sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """State dict from any supported file.

    timm/hub format (safetensors or .pth), wrapped in 'model'/'state_dict', DataParallel
    (`module.` prefix) or MadryLab (`module.model.` kept, the rest dropped).
    """
    path = Path(path)
    verify_sha256(path, sha256, str(path))
    state = _unwrap(read_checkpoint(path, allow_unsafe_pickle), path)
    if any(key.startswith(MADRY_PREFIX) for key in state):
        return _strip_madry(state, path)
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return _tensors_only(state, path)


def load_state_dict_into(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], spec: ModelSpec
) -> None:
    """Strict load; weights of another architecture raise WeightsError naming differing keys."""
    own = model.state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(own[key].shape)}"
        for key in own
        if key in state_dict and state_dict[key].shape != own[key].shape
    ]
    problems = [
        f"{len(keys)} {what} ({_some(keys)})"
        for what, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatches file vs model", mismatched),
        )
        if keys
    ]
    if problems:
        raise WeightsError(
            f"weights do not fit {spec.name} (arch {spec.arch}): {'; '.join(problems)}; "
            f"check model.arch or model.weights"
        )
    model.load_state_dict(state_dict, strict=True)


def load_weights(model: nn.Module, path: str | os.PathLike, spec: ModelSpec) -> None:
    """Verify and load the weights file of `spec` (from `resolve_weights`) into `model`."""
    verify_locked(path)
    # A configured MadryLab source must be in MadryLab format; a user's file may be any format.
    loader = (
        load_madry_state_dict
        if spec.family == "madry" and not spec.weights
        else load_state_dict_file
    )
    state = loader(path, allow_unsafe_pickle=spec.allow_unsafe_pickle, sha256=spec.sha256)
    load_state_dict_into(model, state, spec)
    log.info("loaded %s weights from %s", spec.name, path)
