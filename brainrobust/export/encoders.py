"""The encoders an export predicts with, rebuilt from the configs their runs stored.

A run's `run.json` holds its identity: the resolved config without the entries that do not
change its numbers (`key_ignore`: paths, data.root, logging, ...). `run_config` puts those back
from conf/ (with the cache folder and data root the export is given) and the pipeline's own
`build` and `build_encoder` make the encoder again: the same backbone, and the ridge readout
from the readout cache (fitted again where the cache lacks it, to the same numbers). The data
the rebuilt config reads must have the fingerprint the run recorded, so an export never
predicts with an encoder fitted to other data.

Held-out encoders (`heldout_runs`) follow HELDOUT_RULE.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from brainrobust.data.layouts import open_loader
from brainrobust.errors import ConfigError, DataError
from brainrobust.files import stable_hash
from brainrobust.models.build import build, build_encoder
from brainrobust.models.encoder import BrainEncoder
from brainrobust.results.store import ResultsStore, RunStore

log = logging.getLogger(__name__)

CONF = Path(__file__).resolve().parents[2] / "conf"
# Entries the pipeline adds to a run's identity that are not config.
NOT_CONFIG = ("device", "data_fingerprint")
HELDOUT_RULE = (
    "The held-out encoders of a stimulus are the other runs of its source run's results store "
    "whose data config equals the source run's but for the subject (the same stimuli and ROI "
    "definitions), whose ROI set is the same, and that differ from the source in model or "
    "subject. Runs that share model, layer, subject, readout and seed are one encoder; the "
    "first by results key is used.")
# What makes two runs the same encoder (probes and attacks do not change it).
ENCODER_KEYS = ("model", "data", "readout", "seed", "subject")


@dataclass(frozen=True)
class Place:
    """Where the rebuilt configs read: the data root (None: the run's default) and the cache
    folder (None: conf/paths' default), as `data.root=` and `paths.cache_dir=` would set them."""

    data_root: str | None = None
    cache_dir: str | None = None


@dataclass
class Rebuilt:
    """A run's encoder and its dataset's images at their native resolution."""

    run: RunStore
    encoder: BrainEncoder
    loader: Any  # the dataset's image reader with no resizing: native resolution
    native_size: int

    def native_images(self, ids: np.ndarray) -> np.ndarray:
        """uint8 (n, N, N, 3) dataset images at their native resolution N."""
        return self.loader.images(np.asarray(ids, np.int64))


def _config_group(data: Mapping[str, Any]) -> str:
    """The conf/data option a stored data node was composed from."""
    return "synthetic" if data.get("synthetic") else str(data["layout"])


def _restore(into: dict[str, Any], defaults: Mapping[str, Any], parts: list[str]) -> None:
    """Copy the entry at dotted path `parts` from `defaults` where `into` lacks it."""
    head, rest = parts[0], parts[1:]
    if head not in defaults:
        return
    if not rest:
        into.setdefault(head, copy.deepcopy(defaults[head]))
    elif isinstance(into.get(head), dict) and isinstance(defaults[head], Mapping):
        _restore(into[head], defaults[head], rest)


def run_config(run: RunStore, place: Place) -> DictConfig:
    """The config run `run` was computed with: its stored identity, plus the ignored entries."""
    identity = run.identity or {}
    if "data" not in identity or "model" not in identity:
        raise DataError(f"run {run.key} stores no config ({run.dir / 'run.json'}); rerun it")
    overrides = [f"data={_config_group(identity['data'])}"]
    if place.cache_dir is not None:
        overrides.append(f"paths.cache_dir={place.cache_dir}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        defaults = compose("config", overrides=overrides)
    if place.data_root is not None:
        defaults.data.root = place.data_root
    elif OmegaConf.is_missing(defaults.data, "root"):
        raise ConfigError(f"run {run.key} read data.layout={identity['data']['layout']} from a "
                          "folder its results key does not record; pass --data-root (the "
                          "data.root it ran with)")
    plain = OmegaConf.to_container(defaults, resolve=True)
    config = {k: copy.deepcopy(v) for k, v in identity.items() if k not in NOT_CONFIG}
    for path in plain["key_ignore"]:
        if "*" not in path:
            _restore(config, plain, path.split("."))
    return OmegaConf.create(config)


def rebuild(run: RunStore, place: Place) -> Rebuilt:
    """Run `run`'s encoder, after checking the data it will read is the data the run read."""
    cfg = run_config(run, place)
    spec = build(cfg.model)
    dm = build(cfg.data, _convert_="all")
    recorded = (run.identity or {}).get("data_fingerprint")
    if recorded is not None and dm.fingerprint() != recorded:
        raise DataError(f"the data under {cfg.data.root} is not the data run {run.key} read (its "
                        "fingerprint differs); pass --data-root with the data.root that run used")
    dm.prepare_data()
    dm.setup()
    log.info("rebuilding the encoder of run %s (%s, subject %s)", run.key, spec.name, dm.subject)
    encoder = build_encoder(cfg, spec, dm).eval()
    loader = open_loader(cfg.data.layout, cfg.data.root, **dm.loader_kwargs)
    native_size = int(loader.images(dm.test.ids[:1]).shape[1])
    return Rebuilt(run=run, encoder=encoder, loader=loader, native_size=native_size)


def encoder_label(columns: Mapping[str, Any]) -> str:
    """How manifest columns name an encoder: model and subject."""
    return f"{columns['model']}_s{columns['subject']}"


def heldout_runs(store: ResultsStore, source: RunStore) -> dict[str, RunStore]:
    """Label -> run of every held-out encoder of `source` (the rule in the module docstring)."""
    ident = source.identity or {}
    data = {k: v for k, v in (ident.get("data") or {}).items() if k != "subject"}
    mine = (ident.get("model"), ident.get("subject"))
    chosen: dict[str, RunStore] = {}
    seen: set[str] = set()
    for meta in store.runs():
        other = meta.get("identity") or {}
        same_data = {k: v for k, v in (other.get("data") or {}).items() if k != "subject"} == data
        if (meta["key"] == source.key or not same_data
                or meta["columns"].get("rois") != source.columns.get("rois")
                or (other.get("model"), other.get("subject")) == mine):
            continue
        encoder = stable_hash({k: other.get(k) for k in ENCODER_KEYS})
        if encoder in seen:
            continue
        seen.add(encoder)
        label = encoder_label(meta["columns"])
        # Two encoders of one model and subject (another layer or readout): told apart by key.
        chosen[label if label not in chosen else f"{label}_{meta['key'][:6]}"] = store.open(meta)
    return chosen
