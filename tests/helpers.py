"""Test doubles shared by the test files."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def isolated(root, tmp: Path) -> list[str]:
    """Overrides that point a run at the test's twin and keep every file it writes under tmp."""
    return [f"data.root={root}", f"paths.cache_dir={tmp / 'cache'}", f"paths.results_dir={tmp / 'results'}",
            f"paths.log_dir={tmp / 'logs'}", "logger=none", "trainer.enable_progress_bar=false"]


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


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


def config_maker(root, tmp: Path, *defaults: str):
    """compose_config over `isolated(root, tmp)` and `defaults`, then a test's own overrides."""
    def make(*overrides: str) -> DictConfig:
        return compose_config(*isolated(root, tmp), *defaults, *overrides)
    return make


def one_line_error(capsys, argv: list[str]) -> str:
    """`python -m brainrobust ARGV` in this process: the one `error:` line it exits 2 with."""
    import pytest

    from brainrobust.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]
