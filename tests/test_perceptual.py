"""Perceptual measures: known answers, identities, and SSIM against independent references."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from brainrobust.errors import ConfigError
from brainrobust.probes.perceptual import l2, linf, perceptual_measures, psnr, ssim

EPS64 = float(np.finfo(np.float64).eps)
# SSIM's variances are differences of 11 x 11-tap float64 blurs of values in [0, 1], a few dozen
# eps each, and enter divided by at least c2 = 0.03^2: the rounding bound of an SSIM value.
SSIM_ROUNDING = 100 * EPS64 / 0.03**2


def _images(n: int = 3, size: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(
        torch.rand(n, 3, 6, 6, generator=g), size=(size, size), mode="bilinear", align_corners=False
    )
    return (base + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def _ssim_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. SSIM with scipy's Gaussian filter (truncate 3.5 -> 11 taps), valid region."""
    c1, c2, pad = 0.01**2, 0.03**2, 5
    vals = []
    for ch in range(a.shape[0]):
        x, y = a[ch], b[ch]

        def f(t):
            return gaussian_filter(t, sigma=1.5, truncate=3.5)

        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        vals.append(s[pad:-pad, pad:-pad].mean())
    return float(np.mean(vals))


def test_identity_gives_perfect_scores():
    x = _images()
    m = perceptual_measures(x, x.clone())
    assert torch.equal(m["l2"], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(m["linf"], torch.zeros(3, dtype=torch.float64))
    assert torch.all(torch.isinf(m["psnr"])) and torch.all(m["psnr"] > 0)
    # an image and its copy take the same float64 operations: every ratio is exactly 1
    assert torch.equal(m["ssim"], torch.ones(3, dtype=torch.float64))


def test_constant_shift_known_answers():
    size = 16
    x0 = torch.full((2, 3, size, size), 0.5)
    x = x0 + 0.1
    # The known answers at the float32 pixel values: 0.1 and 0.5 + 0.1 each round once in
    # float32, together within an ulp of 0.6.
    hi = float(x[0, 0, 0, 0])
    shift, n = hi - 0.5, 3 * size * size
    assert shift == pytest.approx(0.1, abs=0.6 * float(np.finfo(np.float32).eps))
    assert torch.equal(linf(x, x0), torch.full((2,), shift, dtype=torch.float64))
    # float64 sums of n equal squares: n eps relative
    exact_l2 = torch.full((2,), shift * math.sqrt(n), dtype=torch.float64)
    assert torch.allclose(l2(x, x0), exact_l2, rtol=n * EPS64, atol=0)
    exact_psnr = torch.full((2,), -20 * math.log10(shift), dtype=torch.float64)
    assert torch.allclose(psnr(x, x0), exact_psnr, rtol=0, atol=10 / math.log(10) * n * EPS64)
    # Flat images: variances and covariance vanish, only the luminance term remains.
    c1 = 0.01**2
    expected = (2 * hi * 0.5 + c1) / (hi**2 + 0.5**2 + c1)
    exact_ssim = torch.full((2,), expected, dtype=torch.float64)
    assert torch.allclose(ssim(x, x0), exact_ssim, rtol=0, atol=SSIM_ROUNDING)


def test_mixed_batch_psnr_is_finite_where_images_differ():
    x0 = _images(2)
    x = x0.clone()
    x[1] = (x[1] + 0.05).clamp(0, 1)
    p = psnr(x, x0)
    assert math.isinf(p[0]) and math.isfinite(p[1]) and 20 < p[1] < 40


def test_ssim_matches_scipy_reference_and_is_symmetric():
    x0 = _images(seed=1)
    x = (x0 + 0.08 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    ours = ssim(x, x0)
    ref = [_ssim_scipy(x[i].double().numpy(), x0[i].double().numpy()) for i in range(len(x))]
    assert np.allclose(ours.numpy(), ref, rtol=0, atol=SSIM_ROUNDING)
    # the formula is symmetric operation by operation (x * y, mu_x * mu_y, var_x + var_y)
    assert torch.equal(ours, ssim(x0, x))
    assert torch.all(ours < 0.99)


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    x0 = _images(seed=3)
    x = (x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    ours = ssim(x, x0).numpy()
    ref = [
        metrics.structural_similarity(
            x[i].double().numpy(),
            x0[i].double().numpy(),
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        for i in range(len(x))
    ]
    assert np.allclose(ours, ref, rtol=0, atol=SSIM_ROUNDING)


def test_ssim_and_psnr_fall_as_noise_grows():
    x0 = _images(1, seed=5)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    levels = [0.01, 0.03, 0.1, 0.3]
    s = [float(ssim((x0 + a * noise).clamp(0, 1), x0)) for a in levels]
    p = [float(psnr((x0 + a * noise).clamp(0, 1), x0)) for a in levels]
    assert all(a > b for a, b in itertools.pairwise(s))
    assert all(a > b for a, b in itertools.pairwise(p))


def test_bad_shapes_raise_config_error():
    with pytest.raises(ConfigError, match="one shape"):
        l2(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="at least 11 px"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
