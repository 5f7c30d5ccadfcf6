"""Perceptual distance of a generated image from its start: L2, L-inf, PSNR and SSIM.

All functions take batches (B, 3, S, S) in [0, 1] and return one value per image (B,) as float64,
so a probe can write them straight into its records. SSIM is Wang et al. (2004) with the usual
constants: an 11-tap Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample)
covariance, averaged over the valid region and the three channels - the same numbers as
`skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1, channel_axis=...)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
    mse = (x - x0).flatten(1).pow(2).mean(dim=1)
    out = 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 gives +inf, which is the right answer
    return torch.where(mse > 0, out, torch.full_like(out, math.inf))


def _gaussian_window(
    size: int, sigma: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    t = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, x0: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image (mean over channels and the valid window positions)."""
    x, x0 = _pair(x, x0)
    channels, height, width = x.shape[1:]
    if min(height, width) < SSIM_WINDOW:
        raise ConfigError(f"SSIM needs images of at least {SSIM_WINDOW} px, got {height}x{width}")
    g = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, x.dtype, x.device)
    # Separable Gaussian: a (1 x 11) then an (11 x 1) depthwise valid convolution.
    gh = g.view(1, 1, 1, -1).expand(channels, 1, 1, SSIM_WINDOW)
    gv = g.view(1, 1, -1, 1).expand(channels, 1, SSIM_WINDOW, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, gh, groups=channels), gv, groups=channels)

    mu_x, mu_y = blur(x), blur(x0)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(x0 * x0) - mu_y * mu_y
    cov = blur(x * x0) - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return s_map.flatten(1).mean(dim=1)


def perceptual_measures(x: torch.Tensor, x0: torch.Tensor) -> dict[str, torch.Tensor]:
    """All four measures of x against its start x0, keyed by their record metric names."""
    return {"l2": l2(x, x0), "linf": linf(x, x0), "psnr": psnr(x, x0), "ssim": ssim(x, x0)}
