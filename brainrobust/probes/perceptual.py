"""Perceptual distance of a generated image from its start: L2, L-inf, PSNR and SSIM.

All functions take batches (B, 3, S, S) in [0, 1] and return one value per image (B,) as float64,
so a probe can write them straight into its records. SSIM is Wang et al. (2004) with the usual
constants: an 11-tap Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample)
covariance, averaged over the valid region and the three channels (torchmetrics' SSIM map,
cropped) - the same numbers as `skimage.metrics.structural_similarity(..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=...)`.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from brainrobust.errors import ConfigError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _pair(x: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != x0.shape or x.ndim != 4:
        raise ConfigError(
            f"perceptual measures need two (B, C, H, W) batches of one shape, "
            f"got {tuple(x.shape)} and {tuple(x0.shape)}"
        )
    # float64: PSNR of a tiny perturbation and SSIM close to 1 lose digits in float32.
    return x.detach().double(), x0.detach().double()


def l2(x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of x - x0 per image."""
    x, x0 = _pair(x, x0)
    return (x - x0).flatten(1).norm(dim=1)


def linf(x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Largest absolute pixel difference per image."""
    x, x0 = _pair(x, x0)
    return (x - x0).flatten(1).abs().amax(dim=1)


def psnr(x: torch.Tensor, x0: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image; +inf where the images are identical."""
    x, x0 = _pair(x, x0)
    # Not torchmetrics' PSNR: it takes log(10) in float32, 1e-7 relative off for float64 input.
    mse = (x - x0).flatten(1).pow(2).mean(dim=1)
    out = 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 gives +inf, which is the right answer
    return torch.where(mse > 0, out, torch.full_like(out, math.inf))


def ssim(x: torch.Tensor, x0: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image (mean over channels and the valid window positions)."""
    x, x0 = _pair(x, x0)
    height, width = x.shape[2:]
    if min(height, width) < SSIM_WINDOW:
        raise ConfigError(f"SSIM needs images of at least {SSIM_WINDOW} px, got {height}x{width}")
    _, s_map = structural_similarity_index_measure(
        x, x0, gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_WINDOW, reduction="none",
        data_range=data_range, k1=SSIM_K1, k2=SSIM_K2, return_full_image=True)
    # torchmetrics averages over reflect-padded borders too; Wang et al. and skimage average
    # only where the window fits inside the image (at 64 px the border is 29% of the pixels).
    pad = SSIM_WINDOW // 2
    return s_map[..., pad:-pad, pad:-pad].flatten(1).mean(dim=1)


def perceptual_measures(x: torch.Tensor, x0: torch.Tensor) -> dict[str, torch.Tensor]:
    """All four measures of x against its start x0, keyed by their record metric names."""
    return {"l2": l2(x, x0), "linf": linf(x, x0), "psnr": psnr(x, x0), "ssim": ssim(x, x0)}
