"""Lightning data module: one subject's images and ROI responses, train and test splits.

The same module serves the real NSD, the Algonauts 2023 layout and the synthetic twin: the twin
is written once in the real NSD layout and then read through the real loader, so there is no
separate fake code path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from brainrobust.checks import require_integer
from brainrobust.data.datafiles import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_image_size
from brainrobust.data.layouts import LOADERS, data_fingerprint, ensure_synthetic, open_loader
from brainrobust.data.rois import ROISpec
from brainrobust.errors import ConfigError

log = logging.getLogger(__name__)


class BrainDataModule(L.LightningDataModule):
    def __init__(
        self,
        root: str,
        subject: int,
        rois: Mapping[str, ROISpec] | Sequence[ROISpec | str],
        layout: str = "nsd",
        image_size: int | None = None,
        cache_dir: str | None = None,
        synthetic: Mapping[str, Any] | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        loader_kwargs: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if layout not in LOADERS:
            raise ConfigError(f"unknown data.layout {layout!r}; valid: {sorted(LOADERS)}")
        require_integer("data.batch_size", batch_size, 1)
        require_integer("data.num_workers", num_workers, 0)
        self.root = Path(root)
        self.subject = int(subject)
        self.roi_specs = list(rois.values()) if isinstance(rois, Mapping) else list(rois)
        if not self.roi_specs:
            raise ConfigError("no ROI selected; pass roi=FFA (or roi=[FFA,PPA])")
        self.layout = layout
        self.image_size = check_image_size(image_size)
        self.cache_dir = cache_dir
        self.synthetic = dict(synthetic) if synthetic else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.loader_kwargs = dict(loader_kwargs or {})
        self.loader = None
        self.train = None
        self.test = None
        self._tensors: dict[str, torch.Tensor] = {}

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            ensure_synthetic(self.root, self.synthetic)

    def fingerprint(self) -> str:
        """Digest of the content of every file this subject's run reads (writing the synthetic
        twin first if needed), without their paths: a run's results key includes it, so
        changed data is never hidden behind a finished run."""
        return data_fingerprint(self.layout, self.root, self.subject, self.roi_specs,
                                self.synthetic, self.loader_kwargs)

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        self.loader = open_loader(self.layout, self.root, cache_dir=self.cache_dir,
                                  image_size=self.image_size, **self.loader_kwargs)
        self.train = self.loader.load(self.subject, self.roi_specs, "train")
        self.test = self.loader.load(self.subject, self.roi_specs, "test")
        log.info("subject %d: %d train / %d test images, %d voxels (%s)", self.subject,
                 len(self.train.ids), len(self.test.ids), self.test.responses.shape[1],
                 ", ".join(f"{k} {len(v)}" for k, v in self.test.rois.items()))

    @property
    def rois(self) -> dict[str, np.ndarray]:
        return self.test.rois

    @property
    def image_source_id(self) -> str:
        """Which stimuli these are (file and resizing): part of every feature cache key."""
        return self.loader.image_source_id

    def images(self, split: str) -> np.ndarray:
        """uint8 (n, S, S, 3) images of a split, in the order of its ids."""
        return self.loader.images(getattr(self, split).ids)

    def image_tensor(self, split: str) -> torch.Tensor:
        if split not in self._tensors:
            images = self.images(split)
            size = images.shape[1]
            if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
                raise ConfigError(f"the stimuli under {self.root} are {size} px, outside "
                                  f"{MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE}; set data.image_size=224 "
                                  "to resize them")
            self._tensors[split] = to_float_images(images)
        return self._tensors[split]

    @property
    def stimulus_size(self) -> int:
        """The canonical stimulus size S: every probe works on (3, S, S) images."""
        return int(self.image_tensor("test").shape[-1])

    def test_dataloader(self) -> DataLoader:
        # Each image's position in the test split travels with it: under DDP the distributed
        # sampler deals the images out (repeating a few), and probes and predictivity put the
        # ranks' shares back in order by it.
        images = self.image_tensor("test")
        data = TensorDataset(images, torch.from_numpy(self.test.responses), torch.arange(len(images)))
        return DataLoader(data, batch_size=self.batch_size, num_workers=self.num_workers)


def to_float_images(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, S, S, 3) -> float (n, 3, S, S) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
