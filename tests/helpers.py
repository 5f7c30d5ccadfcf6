"""Test doubles shared by the test files."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LinearEncoder(nn.Module):
    """r = W x.flatten(1) + b: the known-answer encoder, with the BrainEncoder interface.

    Parameters
    ----------
    W : (V, 3 * S * S) readout from pixels to voxels.
    rois : {name: voxel column indices}.
    b : (V,) offset; zeros when None.
    """

    def __init__(self, W: Tensor, rois: dict, b: Tensor | None = None):
        super().__init__()
        n_voxels, n_pixels = W.shape
        size = math.isqrt(n_pixels // 3)
        if 3 * size * size != n_pixels:
            raise ValueError(f"W must have 3 * S * S columns, got {n_pixels}")
        self.register_buffer("W", W.detach().clone())
        self.register_buffer("b", torch.zeros(n_voxels, dtype=W.dtype) if b is None
                             else b.detach().clone())
        self.rois = {name: torch.as_tensor(cols, dtype=torch.long) for name, cols in rois.items()}
        self.meta = {"model": "linear", "layer": "pixels", "subject": "test"}
        self.input_size = size

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.W.T + self.b

    def roi_response(self, x: Tensor, roi: str) -> Tensor:
        return self(x)[:, self.rois[roi].to(x.device)].mean(1)
