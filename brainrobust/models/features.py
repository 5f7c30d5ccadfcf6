"""Backbone features for a set of images, through `Trainer.predict`, cached on disk.

A cache entry is `<cache_dir>/<model>/<digest>.npy` plus a `<digest>.json` sidecar holding
the key, shape and the .npy checksum. The digest hashes everything the numbers depend on
(model, weights identity, layer, pooling, projection, input size, mean/std, resize
arithmetic, image set and ids), so an entry made with other preprocessing is never found,
let alone reused; sweep jobs, subjects and ROIs asking for the same thing share one entry.
An entry whose sidecar, checksum, shape or dtype disagrees is logged and rebuilt. Jobs that ask
for a missing entry at once compute it once: the first holds the entry's lock file, in
<cache_dir>/.locks/, while the others wait and then read it (`brainrobust.cache.cached`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from brainrobust.cache import cached
from brainrobust.errors import CacheError, ConfigError, DataError
from brainrobust.files import atomic_path, sha256_file, stable_hash, write_json
from brainrobust.models.backbones import build_backbone
from brainrobust.models.layers import LayerFeatures, Preprocess
from brainrobust.models.weights import weights_identity
from brainrobust.models.zoo import ModelSpec

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
ImageSource = np.ndarray | Tensor | Dataset | Callable[[int], Any]


@contextmanager
def lightning_notices_off() -> Iterator[None]:
    """Lightning notices that do not apply to this project's loops: the worker hints (the
    images are in memory, loaded without workers), the test sampler's repeated images (each
    image counts once: the encoder and the probes drop the repeats), and Lightning 2.6 calling a
    pytree API that torch 2.14 deprecates."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
        warnings.filterwarnings("ignore", message=".*DistributedSampler. with the dataloaders.*")
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*", category=FutureWarning)
        yield


def build_feature_model(
    spec: ModelSpec, weights_dir: str | os.PathLike | None = None, layer: str | None = None
) -> nn.Sequential:
    """Preprocess + LayerFeatures over `build_backbone(spec)`: images in [0, 1] -> (B, p)."""
    backbone = build_backbone(spec, weights_dir)
    return nn.Sequential(
        Preprocess(spec.input_size, spec.mean, spec.std),
        LayerFeatures(backbone, layer or spec.layer, spec.pool, spec.project_dim, seed=spec.seed),
    )


def as_float_images(batch: Tensor) -> Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [0, 1]; float (B, 3, S, S) passes through."""
    if batch.dtype == torch.uint8 and batch.ndim == 4 and batch.shape[-1] == 3:
        return batch.permute(0, 3, 1, 2).float().div_(255.0)
    if batch.is_floating_point() and batch.ndim == 4 and batch.shape[1] == 3:
        return batch.float()
    raise DataError(
        "images must be uint8 (n, S, S, 3) or float (n, 3, S, S) in [0, 1]; "
        f"got {batch.dtype} {tuple(batch.shape)}"
    )


class FeatureExtractor(L.LightningModule):
    """Lightning wrapper whose `predict_step` returns float32 CPU features (B, p)."""

    def __init__(self, feature_model: nn.Module) -> None:
        super().__init__()
        self.feature_model = feature_model

    def forward(self, images: Tensor) -> Tensor:
        return self.feature_model(images)

    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        # uint8 crosses to the device and is converted there: 4x less host-to-device traffic.
        return self(as_float_images(batch)).float().cpu()


class _Batches(IterableDataset):
    """Whole batches in order: one fancy-index per batch for arrays, per item otherwise.

    An iterable, so Lightning hands every batch to every DDP rank (it shards only map-style
    datasets): each rank fits the readout itself and needs every image's features.
    """

    def __init__(self, images: ImageSource, n_images: int, batch_size: int) -> None:
        self.images = images
        self.per_item = callable(images) and not hasattr(images, "__getitem__")
        self.n_images, self.batch_size = n_images, batch_size

    def __len__(self) -> int:
        return math.ceil(self.n_images / self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        for start in range(0, self.n_images, self.batch_size):
            yield self.batch(list(range(start, min(self.n_images, start + self.batch_size))))

    def batch(self, indices: list[int]) -> Tensor:
        if isinstance(self.images, Tensor):
            return self.images[indices].detach().cpu()
        if isinstance(self.images, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(self.images[indices]))
        fetch = self.images if self.per_item else self.images.__getitem__
        return torch.stack([torch.as_tensor(np.asarray(fetch(i))) for i in indices])


def _ids_array(ids: Sequence[int] | np.ndarray, images: ImageSource) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if hasattr(images, "__len__") and len(images) != len(ids):
        raise DataError(f"{len(images)} images but {len(ids)} ids; pass one id per image")
    return ids.astype(np.int64)


def _identity_parts(layer_module: nn.Module) -> list[dict[str, Any]]:
    found = [m for m in layer_module.modules() if isinstance(m, (Preprocess, LayerFeatures))]
    kinds = sorted(type(m).__name__ for m in found)
    if kinds != ["LayerFeatures", "Preprocess"]:
        raise ConfigError(
            "layer_module must hold one Preprocess and one LayerFeatures "
            "(see build_feature_model); "
            f"found {kinds or 'neither'}"
        )
    return [m.identity() for m in found]


def _state_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()[:16]


def feature_cache_key(
    spec: ModelSpec,
    layer_module: nn.Module,
    image_source_id: str,
    ids: np.ndarray,
    weights_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Everything the features depend on, as a JSON-able dict (its stable_hash names the entry)."""
    weights = weights_identity(spec, weights_dir)
    if weights.startswith("random-init"):
        # No file names these weights: fingerprint the tensors themselves (small offline nets),
        # so a change to the init code or an edited module never reuses old features.
        weights += ":" + _state_digest(layer_module)
    return {
        "format": CACHE_FORMAT,
        "model": spec.name,
        "arch": spec.arch,
        "weights": weights,
        "modules": _identity_parts(layer_module),
        "image_source_id": image_source_id,
        "n_images": len(ids),
        "ids_sha256": hashlib.sha256(
            np.ascontiguousarray(ids, dtype=np.int64).tobytes()
        ).hexdigest(),
    }


def _load_entry(npy: Path, sidecar: Path, digest: str, n_images: int) -> np.ndarray:
    """The cached array, or CacheError saying why it cannot be trusted."""
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"unreadable sidecar ({err})") from None
    if meta.get("digest") != digest or stable_hash(meta.get("key")) != digest:
        raise CacheError("sidecar belongs to another key")
    if not npy.is_file() or sha256_file(npy) != meta.get("sha256"):
        raise CacheError("array missing or checksum mismatch")
    try:
        array = np.load(npy, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CacheError(f"unreadable array ({err})") from None
    if array.dtype != np.float32 or array.ndim != 2 or array.shape != (n_images, meta.get("dim")):
        raise CacheError(
            f"array is {array.dtype} {array.shape}, "
            f"expected float32 ({n_images}, {meta.get('dim')})"
        )
    return array


def _save_entry(
    npy: Path, sidecar: Path, key: dict[str, Any], digest: str, array: np.ndarray
) -> None:
    with atomic_path(npy) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        checksum = sha256_file(tmp)
    # The sidecar is written last: an entry without one is simply not there yet.
    write_json(
        sidecar,
        {
            "digest": digest,
            "key": key,
            "sha256": checksum,
            "dim": int(array.shape[1]),
            "dtype": "float32",
        },
    )


def _predict(
    layer_module: nn.Module,
    images: ImageSource,
    n_images: int,
    batch_size: int,
    accelerator: str,
    devices: int | list[int],
    progress_bar: bool,
    trainer: L.Trainer | None,
) -> np.ndarray:
    # Images are already in memory: worker processes would only add start-up and copies.
    loader = DataLoader(_Batches(images, n_images, batch_size), batch_size=None, num_workers=0)
    if trainer is None:
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=devices,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress_bar,
        )
    home = next(chain(layer_module.parameters(), layer_module.buffers())).device
    with lightning_notices_off():
        outputs = trainer.predict(FeatureExtractor(layer_module), dataloaders=loader)
    layer_module.to(home)  # Lightning leaves the module on the accelerator
    return torch.cat(outputs).numpy().astype(np.float32, copy=False)


def extract_features(
    spec: ModelSpec,
    layer_module: nn.Module,
    images: ImageSource,
    ids: Sequence[int] | np.ndarray,
    image_source_id: str,
    cache_dir: str | os.PathLike,
    batch_size: int = 64,
    accelerator: str = "auto",
    devices: int | list[int] = 1,
    weights_dir: str | os.PathLike | None = None,
    progress_bar: bool = True,
    trainer: L.Trainer | None = None,
) -> np.ndarray:
    """Features (n, p) float32 of `images` under `layer_module`, from the cache when possible.

    Parameters
    ----------
    spec
        The model `layer_module` was built from (names the cache entry and its weights).
    layer_module
        Preprocess + LayerFeatures as one module, e.g. `build_feature_model(spec)`.
    images
        uint8 (n, S, S, 3) array, float (n, 3, S, S) tensor in [0, 1], a Dataset, or a
        callable i -> image, item i belonging to `ids[i]`.
    ids
        One integer id per image (e.g. 0-based NSD ids); part of the cache key.
    image_source_id
        Names the image set (e.g. "nsd-224" or the synthetic twin's hash); part of the key.
    cache_dir
        Root of the feature cache.
    batch_size, accelerator, devices, progress_bar
        Passed to the DataLoader / Trainer ("auto" uses a GPU when present; devices=[i] picks
        GPU i, e.g. a DDP rank's own).
    trainer
        The run's own Trainer, used instead of building one from accelerator, devices and
        progress_bar (a run then shows one device report and honours its progress-bar setting).
    weights_dir
        Where the weights were resolved from (for the weights identity in the key).
    """
    ids = _ids_array(ids, images)
    key = feature_cache_key(spec, layer_module, image_source_id, ids, weights_dir)
    digest = stable_hash(key)
    npy = Path(cache_dir) / spec.name / f"{digest}.npy"
    sidecar = npy.with_suffix(".json")

    def load() -> np.ndarray | None:
        return _load_entry(npy, sidecar, digest, len(ids)) if sidecar.exists() else None

    def build() -> np.ndarray:
        features = _predict(layer_module, images, len(ids), batch_size, accelerator, devices,
                            progress_bar, trainer)
        if features.shape[0] != len(ids):
            raise DataError(f"got features for {features.shape[0]} images, expected {len(ids)}")
        _save_entry(npy, sidecar, key, digest, features)
        return features

    # DDP ranks each compute the entry (Trainer.predict is collective): none may wait on a lock.
    ranks = trainer is not None and trainer.world_size > 1
    lock = None if ranks else Path(cache_dir) / ".locks" / f"{spec.name}-{digest}.lock"
    return cached(lock, load, build, f"feature cache entry {npy}")
