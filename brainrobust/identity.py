"""A run's results key from its resolved config alone.

Free of torch, so `python -m brainrobust.plan` can look up every job of a sweep in seconds;
`pipeline.run_identity` adds whether this process has a GPU.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

GPU_ACCELERATORS = ("auto", "gpu", "cuda")


def config_identity(plain: Mapping[str, Any], cuda_available: bool) -> dict[str, Any]:
    """The part of a resolved config (`OmegaConf.to_container(cfg, resolve=True)`) that
    determines a run's numbers: its results key.

    `key_ignore` lists dotted paths to leave out (`*` matches one level, e.g. `probe.*.force`).
    The device type is added: fp32 CPU and bf16 GPU results never share a key. `cuda_available`
    says whether the process that runs the job has a GPU.
    """
    identity = copy.deepcopy(dict(plain))
    for path in plain.get("key_ignore", []):
        _pop_path(identity, path.split("."))
    accelerator = str(plain["trainer"].get("accelerator", "auto"))
    identity["device"] = "cuda" if cuda_available and accelerator in GPU_ACCELERATORS else "cpu"
    return identity


def _pop_path(tree: Any, parts: list[str]) -> None:
    if not isinstance(tree, dict) or not parts:
        return
    head, rest = parts[0], parts[1:]
    keys = list(tree) if head == "*" else [head]
    for key in keys:
        if not rest:
            tree.pop(key, None)
        else:
            _pop_path(tree.get(key), rest)


def key_columns(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The flat columns of a run's records, from its config (a DictConfig or a resolved dict)."""
    return {
        "model": cfg["model"]["name"],
        "layer": cfg["model"]["layer"],
        "subject": int(cfg["subject"]),
        "rois": ",".join(sorted(cfg["roi"])),
        "seed": int(cfg["seed"]),
    }
