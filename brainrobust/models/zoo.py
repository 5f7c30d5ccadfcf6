"""Model zoo: one `conf/model/<name>.yaml` per backbone, read into a `ModelSpec`.

The yaml files are the registry. This module is a torch-free leaf: listing models and reading
specs touches only those files, so a sweep planner can enumerate all 14 models for free.
Building a spec's network (`brainrobust.models.backbones`) and loading its weights
(`brainrobust.models.weights`) depend on it, never the reverse.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainrobust import CONF_DIR
from brainrobust.checks import is_number, require_integer
from brainrobust.errors import ConfigError

MODEL_DIR_ENV = "BRAINROBUST_MODEL_DIR"
MODEL_DIR = CONF_DIR / "model"
# Every field's default, which each model file extends through its defaults list.
DEFAULTS_FILE = CONF_DIR / "model_defaults.yaml"
DEFAULTS_ENTRY = "/model_defaults@_here_"
SPEC_TARGET = "brainrobust.models.zoo.ModelSpec"

FAMILIES = ("timm", "madry", "offline")
NORMS = ("l2", "linf")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_POOL_RE = re.compile(r"^(avg|max|flatten|cls|grid([1-9][0-9]*))$")


def parse_pool(pool: str) -> tuple[str, int]:
    """Split a pool name into (kind, grid side); grid side is 0 unless kind is "grid".

    avg / max: global mean / max over space (or over patch tokens); flatten: everything;
    cls: the first token of a ViT block; gridK: average over a K x K spatial grid, then flatten.
    """
    match = _POOL_RE.match(str(pool))
    if match is None:
        raise ConfigError(
            f"unknown pool '{pool}'; use avg, max, flatten, cls or gridK (e.g. grid2)"
        )
    if match.group(2):
        return "grid", int(match.group(2))
    return match.group(1), 0


@dataclass
class ModelSpec:
    """Everything needed to build one backbone and read features from it.

    Built by Hydra from `conf/model/<name>.yaml` (`_target_: brainrobust.models.zoo.ModelSpec`)
    or by `get_spec`. `weights` (a local file) overrides the default source; `allow_download`
    is off by default so a sweep on an offline compute node fails at once with the
    download instruction instead of hanging on a socket.
    """

    name: str
    family: str
    arch: str
    layer: str
    layers: list[str] = field(default_factory=list)
    pool: str = "avg"
    project_dim: int | None = None
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hub_id: str | None = None
    url: str | None = None
    filename: str | None = None
    sha256: str | None = None
    weights: str | None = None
    allow_download: bool = False
    allow_unsafe_pickle: bool = False
    robust: bool = False
    train_norm: str | None = None
    train_eps: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # Hydra hands over ListConfig objects; plain types keep specs hashable and serialisable.
        self.layers = [str(name) for name in self.layers]
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        where = f"model {self.name}"
        if self.family not in FAMILIES:
            raise ConfigError(
                f"{where}: unknown family '{self.family}'; valid: {', '.join(FAMILIES)}"
            )
        parse_pool(self.pool)
        if (len(self.mean) != 3 or len(self.std) != 3
                or not all(map(is_number, (*self.mean, *self.std))) or min(self.std) <= 0):
            raise ConfigError(f"{where}: mean and std need 3 finite values each, std > 0")
        require_integer("model.seed", self.seed, 0)
        if int(self.input_size) != self.input_size or self.input_size < 8:
            raise ConfigError(f"{where}: input_size must be an integer >= 8, got {self.input_size}")
        if self.project_dim is not None and (
            int(self.project_dim) != self.project_dim or self.project_dim < 1
        ):
            raise ConfigError(f"{where}: project_dim must be null or a positive integer")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", str(self.sha256)):
            raise ConfigError(f"{where}: sha256 must be 64 lowercase hex digits or null")
        if self.family == "timm" and not (self.hub_id and self.filename):
            raise ConfigError(f"{where}: family timm needs hub_id and filename")
        if self.family == "madry" and not (self.url and self.filename):
            raise ConfigError(f"{where}: family madry needs url and filename")
        if self.robust and (self.train_norm not in NORMS or self.train_eps is None):
            raise ConfigError(
                f"{where}: a robust model needs train_norm ({'|'.join(NORMS)}) and train_eps"
            )

    @property
    def all_layers(self) -> list[str]:
        """The default readout layer followed by the documented alternatives."""
        return [self.layer, *(name for name in self.layers if name != self.layer)]


def model_dir(config_dir: str | os.PathLike | None = None) -> Path:
    """The registry folder: the argument, else $BRAINROBUST_MODEL_DIR, else <repo>/conf/model."""
    if config_dir is not None:
        return Path(config_dir)
    return Path(os.environ.get(MODEL_DIR_ENV, MODEL_DIR))


def list_models(config_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of all registered models (the yaml file stems), sorted; imports and loads nothing."""
    folder = model_dir(config_dir)
    if not folder.is_dir():
        raise ConfigError(
            f"model registry {folder} not found; set ${MODEL_DIR_ENV} or pass config_dir"
        )
    return sorted(path.stem for path in folder.glob("*.yaml"))


def model_config(name: str, config_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """`<config_dir>/<name>.yaml` over conf/model_defaults.yaml where its defaults list names
    it: the `model` node that `model=<name>` composes, read without Hydra.

    Raises
    ------
    ConfigError
        Unknown name (the message lists the valid ones), or a defaults list naming anything else.
    """
    valid = list_models(config_dir)
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown model '{name}'{hint}; valid: {', '.join(valid)}")
    from omegaconf import OmegaConf

    path = model_dir(config_dir) / f"{name}.yaml"
    entry = OmegaConf.load(path)
    defaults = list(entry.pop("defaults", []))
    if set(defaults) - {DEFAULTS_ENTRY, "_self_"}:
        raise ConfigError(f"{path}: its defaults list may name only {DEFAULTS_ENTRY} and _self_, "
                          f"got {defaults}")
    base = OmegaConf.load(DEFAULTS_FILE) if DEFAULTS_ENTRY in defaults else {}
    return OmegaConf.to_container(OmegaConf.merge(base, entry), resolve=True)


def get_spec(name: str, config_dir: str | os.PathLike | None = None) -> ModelSpec:
    """The ModelSpec of zoo entry `name` (see `model_config`)."""
    spec = spec_from_config(model_config(name, config_dir))
    if spec.name != name:
        raise ConfigError(f"conf/model/{name}.yaml says name: {spec.name}; make the two agree")
    return spec


def spec_from_config(cfg: Mapping[str, Any]) -> ModelSpec:
    """Build a ModelSpec from a composed `cfg.model` node (or any mapping of its fields)."""
    from omegaconf import DictConfig, OmegaConf

    fields = dict(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg)
    target = fields.pop("_target_", SPEC_TARGET)
    if target != SPEC_TARGET:
        raise ConfigError(f"model config has _target_: {target}; expected {SPEC_TARGET}")
    known = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(
            f"unknown model field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    try:
        return ModelSpec(**fields)
    except TypeError as err:  # a required field is absent
        raise ConfigError(f"model config incomplete: {err}") from None
