"""The brain encoder: image in [0, 1] -> predicted voxel responses, as one differentiable module.

    x (B, 3, S, S) at the canonical stimulus size S
      -> Preprocess (resize to the backbone's input size, normalise)
      -> LayerFeatures (backbone up to the readout layer, pooled / projected)
      -> LinearReadout (ridge weights, one column per voxel of every ROI)
      -> (B, V)

Resizing and normalisation live inside, so every probe works in the same pixel space and a
perturbation found on one encoder applies unchanged to any other (other models, subjects, ROIs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import nn

from brainrobust.errors import ConfigError, DataError
from brainrobust.models.readout import pearson_r


class BrainEncoder(L.LightningModule):
    def __init__(
        self,
        preprocess: nn.Module,
        features: nn.Module,
        readout: nn.Module,
        rois: Mapping[str, np.ndarray | torch.Tensor],
        input_size: int,
        meta: Mapping[str, Any] | None = None,
        noise_ceiling: np.ndarray | None = None,
        roi_noise_ceiling: Mapping[str, float] | None = None,
    ):
        super().__init__()
        self.preprocess = preprocess
        self.features = features
        self.readout = readout
        self.rois = {name: torch.as_tensor(np.asarray(idx), dtype=torch.long) for name, idx in rois.items()}
        if any(len(idx) == 0 for idx in self.rois.values()):
            empty = [n for n, idx in self.rois.items() if len(idx) == 0]
            raise ConfigError(f"encoder ROI(s) {empty} have no voxels; choose another roi=")
        self.input_size = int(input_size)
        self.meta = dict(meta or {})
        self.noise_ceiling = None if noise_ceiling is None else np.asarray(noise_ceiling)
        self.roi_noise_ceiling = dict(roi_noise_ceiling or {})
        self._test_pred: list[torch.Tensor] = []
        self._test_true: list[torch.Tensor] = []
        self._test_pos: list[torch.Tensor] = []
        self.predictivity: pd.DataFrame | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            raise ConfigError(
                f"encoder expects images (B, 3, {self.input_size}, {self.input_size}) in [0, 1], "
                f"got {tuple(x.shape)}; resize stimuli to the dataset's image_size"
            )
        return self.readout(self.features(self.preprocess(x)))

    def roi_response(self, x: torch.Tensor, roi: str) -> torch.Tensor:
        return self.roi_mean(self(x), roi)

    def roi_mean(self, responses: torch.Tensor, roi: str) -> torch.Tensor:
        """Mean over one ROI's columns of an already computed (B, V) response."""
        if roi not in self.rois:
            raise ConfigError(f"ROI {roi!r} is not in this encoder; valid: {sorted(self.rois)}")
        return responses[:, self.rois[roi].to(responses.device)].mean(dim=1)

    # The Lightning test loop computes predictivity; per-image probes work on the same batches.
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, responses, positions = batch
        self._test_pred.append(self(images).float())
        self._test_true.append(responses.float())
        self._test_pos.append(positions)

    def on_test_epoch_start(self) -> None:
        self._test_pred, self._test_true, self._test_pos = [], [], []

    def on_test_epoch_end(self) -> None:
        # Under DDP each rank saw its share (the sampler pads the shares to one length by
        # repeating images): gather them, then keep each test image once, in test-split order.
        world = self.trainer.world_size
        pred, true, pos = (self.all_gather(torch.cat(parts)).flatten(0, 1).cpu()
                           if world > 1 else torch.cat(parts).cpu()
                           for parts in (self._test_pred, self._test_true, self._test_pos))
        _, first = np.unique(pos.numpy(), return_index=True)
        self.predictivity = predictivity_table(pred.numpy()[first], true.numpy()[first], self.rois,
                                               self.noise_ceiling, self.roi_noise_ceiling)


def predictivity_table(
    pred: np.ndarray,
    true: np.ndarray,
    rois: Mapping[str, torch.Tensor],
    noise_ceiling: np.ndarray | None,
    roi_noise_ceiling: Mapping[str, float],
) -> pd.DataFrame:
    """Pearson r per voxel and of the ROI mean, raw and divided by the noise ceiling.

    The noise ceiling is a percent of explainable variance, so r is compared with sqrt(NC/100).
    """
    if len(pred) > 1 and np.ptp(pred, axis=0).max() == 0:
        raise DataError("the predictions are identical for every test image (are the stimuli all "
                        "the same, e.g. all black from an incomplete stimuli file?); check them")
    r_vox = pearson_r(true, pred)
    rows = []
    for roi, idx in rois.items():
        idx = idx.numpy()
        r_mean = float(pearson_r(true[:, idx].mean(1, keepdims=True), pred[:, idx].mean(1, keepdims=True))[0])
        rows.append({"roi": roi, "voxel": -1, "metric": "r_roi_mean", "value": r_mean})
        rows.append({"roi": roi, "voxel": -1, "metric": "n_images", "value": float(len(true))})
        nc = roi_noise_ceiling.get(roi)
        if nc is not None and np.isfinite(nc) and nc > 0:
            rows.append({"roi": roi, "voxel": -1, "metric": "r_roi_mean_nc", "value": r_mean / np.sqrt(nc / 100)})
        rows.append({"roi": roi, "voxel": -1, "metric": "r_voxel_median", "value": float(np.median(r_vox[idx]))})
        for j in idx:
            rows.append({"roi": roi, "voxel": int(j), "metric": "r", "value": float(r_vox[j])})
            if noise_ceiling is not None and np.isfinite(noise_ceiling[j]) and noise_ceiling[j] > 0:
                rows.append({"roi": roi, "voxel": int(j), "metric": "r_nc",
                             "value": float(r_vox[j] / np.sqrt(noise_ceiling[j] / 100))})
    return pd.DataFrame(rows)
