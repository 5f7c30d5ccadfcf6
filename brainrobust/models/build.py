"""Objects from their configs: `build` any `_target_` node, and `build_encoder`, the
differentiable brain encoder (backbone, cached features, ridge readout) of a model and a data
module. The pipeline builds a run's encoder with it; held-out encoders (in-silico scoring,
stimulus export) are built the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from brainrobust.cache import cached
from brainrobust.data.datamodule import BrainDataModule
from brainrobust.errors import BrainRobustError, ConfigError
from brainrobust.files import stable_hash
from brainrobust.models.encoder import BrainEncoder
from brainrobust.models.features import build_feature_model, extract_features, feature_cache_key
from brainrobust.models.readout import LinearReadout
from brainrobust.models.ridge import fit_ridge
from brainrobust.models.zoo import ModelSpec, get_spec

log = logging.getLogger(__name__)


def build(node: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, re-raising our own one-line errors instead of Hydra's wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, BrainRobustError):
            raise cause from None
        # A typo'd or mistyped field: say which object could not be built and why, in one line.
        reason = str(cause or err).splitlines()[0]
        raise ConfigError(f"cannot build {node.get('_target_')}: {reason}; check its config "
                          "keys (python run.py --cfg job shows them)") from None


def build_encoder(cfg: DictConfig, spec: ModelSpec, dm: BrainDataModule,
                  trainer: L.Trainer | None = None) -> BrainEncoder:
    """Backbone + cached features + ridge readout (fit once, then loaded from the cache).

    `trainer` is the run's own: it extracts the features on its root device (a DDP rank's own
    GPU), where the ridge fit runs too; None builds one that picks a GPU when there is one.
    Anything but CUDA means CPU for the fit: it needs float64, which Apple's MPS lacks.
    """
    if trainer is not None:
        device = trainer.strategy.root_device
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        device = torch.device("cpu")
    preprocess, features = build_feature_model(spec, weights_dir=cfg.paths.weights_dir)

    cache_dir = Path(cfg.paths.cache_dir)
    feature_key = feature_cache_key(spec, torch.nn.Sequential(preprocess, features),
                                    dm.image_source_id, dm.train.ids, cfg.paths.weights_dir)
    readout_key = stable_hash({
        "features": stable_hash(feature_key),
        "responses": hashlib.sha256(np.ascontiguousarray(dm.train.responses).tobytes()).hexdigest(),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "subject": dm.subject, "rois": {k: v.tolist() for k, v in dm.rois.items()},
        "train_ids": stable_hash(dm.train.ids.tolist()), "source": dm.image_source_id,
        "readout": OmegaConf.to_container(cfg.readout, resolve=True), "seed": cfg.seed,
    })
    readout_path = cache_dir / "readouts" / f"{spec.name}-s{dm.subject}-{readout_key}.safetensors"
    # DDP ranks fit together (Trainer.predict is collective): one waiting on a lock would hang all.
    ranks = trainer is not None and trainer.world_size > 1
    lock = None if ranks else readout_path.parent / ".locks" / f"{readout_path.stem}.lock"

    def load_readout() -> LinearReadout | None:
        if not readout_path.exists():
            return None
        readout, _ = LinearReadout.load(readout_path, expect={"key": readout_key})
        log.info("readout loaded from %s", readout_path)
        return readout

    def fit_readout() -> LinearReadout:
        x_train = extract_features(
            spec, torch.nn.Sequential(preprocess, features), images=dm.images("train"), ids=dm.train.ids,
            image_source_id=dm.image_source_id, cache_dir=cache_dir / "features",
            batch_size=dm.batch_size, weights_dir=cfg.paths.weights_dir,
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=[device.index or 0] if device.type == "cuda" else 1, trainer=trainer)
        fit_device = device if cfg.readout.device == "auto" else cfg.readout.device
        fit = fit_ridge(x_train, dm.train.responses, alphas=list(cfg.readout.alphas),
                        method=cfg.readout.method, cv=cfg.readout.cv, device=fit_device)
        readout = LinearReadout.from_fit(fit)
        readout.save(readout_path, {
            "key": readout_key, "model": spec.name, "layer": spec.layer, "subject": dm.subject,
            "rois": sorted(dm.rois), "method": cfg.readout.method,
            "alphas": list(cfg.readout.alphas), "train_ids_sha": stable_hash(dm.train.ids.tolist()),
        })
        log.info("readout fit (%s) and saved to %s", cfg.readout.method, readout_path)
        return readout

    readout = cached(lock, load_readout, fit_readout, f"readout {readout_path}")

    return BrainEncoder(
        preprocess, features, readout, rois=dm.rois, input_size=dm.stimulus_size,
        meta={"model": spec.name, "layer": spec.layer, "subject": dm.subject, "robust": spec.robust},
        noise_ceiling=dm.test.noise_ceiling, roi_noise_ceiling=dm.test.roi_noise_ceiling,
    )


def random_readout_encoder(model: str, size: int, voxels: int, seed: int = 0) -> BrainEncoder:
    """A zoo backbone at `size` px under a seeded random linear readout, with ROIs "half" (the
    first half of the voxels) and "all": a nonlinear encoder that needs no data, for attack
    benchmarks and tests against long reference attacks."""
    spec = dataclasses.replace(get_spec(model), input_size=size)
    preprocess, features = build_feature_model(spec)
    with torch.no_grad():
        width = features(preprocess(torch.rand(1, 3, size, size))).shape[1]
    g = torch.Generator().manual_seed(seed)
    readout = LinearReadout(torch.randn(width, voxels, generator=g) / math.sqrt(width),
                            torch.zeros(voxels))
    rois = {"half": list(range(voxels // 2)), "all": list(range(voxels))}
    encoder = BrainEncoder(preprocess, features, readout, rois, size).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder
