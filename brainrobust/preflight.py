"""The command line of `run.py`, checked before Hydra launches anything.

Hydra reports a composition mistake (an unknown model, a key the config does not define, an
unset mandatory value) with its own multi-line text and exit code 1, and a sweep learns of a bad
value only when its job starts. Composing every value of every override here first turns each
mistake into the project's one line and exit code 2, before a job of a sweep has run.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from brainrobust.checks import check_run_values
from brainrobust.errors import ConfigError

# What the user sets for each value that the shipped configs leave mandatory (`???`).
MANDATORY_HINTS = {
    "data.root": "the folder holding nsddata/, nsddata_betas/ and nsddata_stimuli/ (NSD) or "
                 "subjXX/ (Algonauts)",
}


_ABSENT = object()

# Top-level groups a run can do without: the CSV logger, the experiment preset.
DELETABLE = ("logger", "experiment")


def check_overrides(overrides: Sequence[str], conf_dir: str | Path, multirun: bool = True,
                    make_log_dir: bool = False) -> None:
    """Compose the config once per value of every override; raise ConfigError on a mistake.
    Without `multirun`, a swept value (`subject=1,2`) is one too. With `make_log_dir` (a job is
    about to start), paths.log_dir is created."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as err:
        raise ConfigError(f"cannot read the command line: {_first_line(err)}") from None
    swept = next((o for o in parsed if o.is_sweep_override()), None)
    if swept is not None and not multirun:
        raise ConfigError(f"'{swept.input_line}' is a sweep: add --multirun to run one job per "
                          f"value (a list is written [a,b])")
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        _refuse_new_top_level_keys(parsed)
        _refuse_deleting_what_runs_read(parsed)
        for variant in _variants(parsed):
            cfg = _compose(variant)
            check_run_values(cfg)
            if make_log_dir:
                _make_log_dir(cfg)


def _make_log_dir(cfg: DictConfig) -> None:
    """Hydra creates paths.log_dir (its run folder) before the job starts, with a traceback where
    it cannot: create it here first."""
    folder = cfg.paths.log_dir
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create paths.log_dir={folder} ({err.strerror or err}); "
                          "point paths.log_dir elsewhere") from None


def _refuse_new_top_level_keys(parsed: list[Override]) -> None:
    """`+eps=-1` would add a key that nothing reads, silently: only nested keys may be added
    (a probe's or model's extra argument, which its constructor then checks)."""
    added = [o for o in parsed if (o.is_add() or o.is_force_add())
             and "." not in o.key_or_group and not o.key_or_group.startswith("hydra")]
    if not added:
        return
    known = [str(k) for k in compose("config")]
    for override in added:
        key = override.key_or_group
        if key not in known:
            near = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(near)}? " if near else ""
            raise ConfigError(f"'{override.input_line}' adds a top-level key '{key}' that nothing "
                              f"reads; {hint}python run.py --cfg job lists the keys")


def _refuse_deleting_what_runs_read(parsed: list[Override]) -> None:
    """`~model` or `~seed` would remove a group or value every run reads, and fail later with an
    error about some other key."""
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() and "." not in key and key not in DELETABLE:
            raise ConfigError(f"'{override.input_line}' removes {key}, which every run reads; "
                              f"set it instead ({key}=...)")


def _values(override: Override) -> list[str] | None:
    """The override as `key=value` lines, one per swept value; None for a glob (it selects
    existing files, so there is nothing to check)."""
    key = override.get_key_element()
    if override.value_type is not None and override.value_type.name == "GLOB_CHOICE_SWEEP":
        return None
    if override.is_sweep_override():
        return [f"{key}={value}" for value in override.sweep_string_iterator()]
    if override.is_delete():
        return [override.input_line]
    return [f"{key}={override.get_value_element_as_str()}"]


def _variants(parsed: list[Override]) -> list[list[str]]:
    """The first value of every override, then each other value swapped in one at a time: a
    mistake in any value shows up, at the cost of one compose per value, not per job."""
    lines = [v for v in (_values(o) for o in parsed) if v]
    base = [values[0] for values in lines]
    variants = [base]
    for i, values in enumerate(lines):
        variants += [base[:i] + [value] + base[i + 1:] for value in values[1:]]
    return variants


def _compose(overrides: list[str]) -> DictConfig:
    try:
        cfg = compose("config", overrides=overrides)
        if not cfg.get("roi"):
            raise ConfigError("no ROI selected; pass roi=FFA or roi=[FFA,PPA]")
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingConfigException as err:
        raise ConfigError(_unknown_option(err)) from None
    except MissingMandatoryValue as err:
        key = err.full_key
        hint = MANDATORY_HINTS.get(key, "a value")
        raise ConfigError(f"{key} is not set; pass {key}=... ({hint})") from None
    except ValueError as err:  # Hydra's answer to a group set to null (`roi=null`)
        nulled = next((o.split("=")[0] for o in overrides if o.endswith("=null")), None)
        hint = f"{nulled} cannot be null; pass one of its options" if nulled else _first_line(err)
        raise ConfigError(f"{hint} (python run.py --cfg job shows the config)") from None
    except (HydraException, OmegaConfBaseException) as err:
        unknown = re.match(r"Could not override '([^']+)'", _first_line(err))
        if unknown:
            raise ConfigError(_unknown_key(unknown.group(1), overrides)) from None
        raise ConfigError(f"{_first_line(err)} (python run.py --cfg job shows the config)") from None
    return cfg


def _unknown_key(key: str, overrides: list[str]) -> str:
    """`unknown config key 'subjct'; did you mean subject?`, from the keys beside the first part
    of `key` that this run's config lacks; where that part is a probe the run does not select
    (`probe=[transfer] probe.sensitivity.steps=5`), it says so."""
    parts = key.split(".")
    listing = "python run.py --cfg job lists the keys"
    # Without every override below the same top-level key: another one there may fail alike.
    others = [o for o in overrides if not o.lstrip("+~").startswith((f"{parts[0]}.", f"{key}="))]
    try:
        root = compose("config", overrides=others)
    except (HydraException, OmegaConfBaseException):
        return f"unknown config key '{key}'; {listing}"
    for depth in range(1, len(parts)):
        node = OmegaConf.select(root, ".".join(parts[:depth]), default=_ABSENT)
        if node is _ABSENT:
            break
        if not isinstance(node, DictConfig):
            return f"unknown config key '{key}': {'.'.join(parts[:depth])} is a value, not a group; {listing}"
    else:
        depth = len(parts)
    outer, name, rest = ".".join(parts[:depth - 1]), parts[depth - 1], ".".join(parts[depth:])
    probes = GlobalHydra.instance().config_loader().get_group_options("probe")
    if outer == "probe" and name in probes:
        return f"'{key}' sets probe {name}, which this run does not select; drop it or add {name} to probe=[...]"
    node = OmegaConf.select(root, outer) if outer else root
    siblings = {str(k) for k in node} | (set(probes) if outer == "probe" else set())
    near = difflib.get_close_matches(name, sorted(siblings - {name}), n=3, cutoff=0.6)
    spelled = [".".join(p for p in (outer, k, rest) if p) for k in near]
    hint = f"did you mean {' or '.join(spelled)}? " if near else ""
    return f"unknown config key '{key}'; {hint}{listing}"


def _unknown_option(err: MissingConfigException) -> str:
    group, _, name = (err.missing_cfg_file or "").rpartition("/")
    # Hydra lists the options for `group=x` but not for the list form `group=[x]`.
    options = list(err.options or GlobalHydra.instance().config_loader().get_group_options(group)
                   if group else [])
    if not options:
        return _first_line(err)
    near = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    listing = "python -m brainrobust models lists them" if group == "model" else \
        f"valid: {', '.join(options)}"
    return f"unknown {group} '{name}'; {hint}{listing}"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
