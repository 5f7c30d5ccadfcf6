"""Tests of values a user sets, shared by every config object, so each key reads the same way:
`<key> must be an integer >= 1, got 2.5`. Booleans are never numbers here (YAML's `true` would
otherwise pass as 1). Free of torch: run.py's preflight checks every job of a sweep with them
before the first starts."""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from brainrobust.errors import ConfigError

_ABSENT = object()


def is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_bool(key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


def require_folder(key: str, value: object) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # Hydra reads an unquoted all-digit override as a number.
        raise ConfigError(f"{key} must be a folder, got the number {value!r}; for a folder named "
                          f"so, quote the name as typed: '{key}=\"NAME\"'")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a folder, got {value!r}")


def require_integer(key: str, value: object, minimum: int) -> None:
    if not is_integer(value) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def check_run_values(cfg: DictConfig) -> None:
    """The top-level values every run reads, checked before anything is built."""
    subject = cfg.subject
    if not is_integer(subject) or not 1 <= subject <= 8:
        raise ConfigError(f"subject must be an NSD subject 1-8, got {subject!r}")
    # An empty folder name would read and write the current directory. data.cache_dir=null
    # (no response cache) is a choice.
    for key in ("paths.results_dir", "paths.cache_dir", "paths.log_dir", "data.root",
                "data.cache_dir"):
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not (key == "data.cache_dir" and value is None):
            require_folder(key, value)
    # The ladder's budgets are in epsilon.norm's units; an attack in another norm would read
    # an L2 ladder as L-inf budgets (up to eps 1: every pixel free).
    attack_norm, budget_norm = (OmegaConf.select(cfg, k) for k in ("attack.norm", "epsilon.norm"))
    if attack_norm is not None and budget_norm is not None and attack_norm != budget_norm:
        raise ConfigError(f"attack.norm={attack_norm} disagrees with epsilon.norm={budget_norm}, "
                          "the norm of the eps ladder; pick the norm with epsilon=... (linf, or "
                          "l2 / l2_small) and leave attack.norm to follow it")
    for key, top in (("subject", "subject"), ("rois", "roi")):
        if key in cfg.data and OmegaConf.select(cfg, f"data.{key}") != cfg[top]:
            raise ConfigError(f"data.{key} follows {top}; set {top}=... instead of data.{key} "
                              f"(records are labelled by {top})")
    seed = cfg.seed
    # numpy, torch and Lightning all take seeds in [0, 2**32).
    if not is_integer(seed) or not 0 <= seed < 2**32:
        shown = repr(seed) if len(repr(seed)) <= 40 else repr(seed)[:37] + "..."
        raise ConfigError(f"seed must be an integer in [0, 2**32), got {shown}")
