"""The synthetic brain: a world whose true response to any image is known."""

import math

import numpy as np
import pytest
import torch
from helpers import compose_config

from brainrobust.data.layouts import ensure_synthetic
from brainrobust.data.nsd import NSDLoader
from brainrobust.data.synthetic import _build
from brainrobust.data.synthetic_brain import (
    BRAIN_NPZ,
    UNITS,
    PixelUnits,
    SyntheticBrain,
    brain_params,
    ensure_synthetic_brain,
)
from brainrobust.errors import ConfigError

# A small world: 2 subjects of one session (750 trials), 16 px stimuli, an 8^3 grid.
SMALL = {"n_subjects": 2, "sessions": [1, 1], "image_size": 16, "grid": [8, 8, 8],
         "n_shared": 40, "roi_sizes": {"FFA-1": 8, "FFA-2": 6, "EBA": 12, "PPA": 8}}
ROIS = ["FFA", "EBA", "PPA"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_brain")
    return root, ensure_synthetic_brain(root, **SMALL)


def linear_brain(size: int, subjects: int = 3, voxels: int = 12, seed: int = 0) -> SyntheticBrain:
    """A linear brain built in memory: units standardised by 1, readouts drawn at random."""
    rng = np.random.default_rng(seed)
    arrays = {"unit_mean": np.zeros(len(UNITS)), "unit_sd": np.full(len(UNITS), 0.01)}
    for s in range(1, subjects + 1):
        arrays.update({f"s{s}_xyz": np.argwhere(np.ones((voxels, 1, 1), bool)),
                       f"s{s}_grid": np.array([voxels, 1, 1]),
                       f"s{s}_loadings": rng.normal(0, 1, (voxels, len(UNITS))),
                       f"s{s}_mean": np.zeros(voxels), f"s{s}_sd": np.ones(voxels)})
    return SyntheticBrain("linear", size, arrays).eval()


def test_measured_responses_are_the_truth_plus_noise(world):
    root, _ = world
    brain = SyntheticBrain.load(root)
    test = NSDLoader(root).load(1, ROIS, "test")
    images = torch.from_numpy(NSDLoader(root).images(test.ids)).permute(0, 3, 1, 2).float() / 255
    scorer = brain.scorer(1, test.voxel_xyz, test.rois, input_size=16)
    for roi in ROIS:
        with torch.no_grad():
            t = scorer.roi_response(images, roi).double().numpy()
        m = test.roi_mean[roi]
        slope, intercept = np.polyfit(t, m, 1)
        resid = m - (slope * t + intercept)
        n = len(t)
        se = resid.std(ddof=2) / (t.std() * math.sqrt(n))
        # E[measured | image] = truth, up to the loader's per-session z-scoring, whose SD and
        # mean come from one session's 750 trials: relative SD error 1/sqrt(2 * 750) = 2.6%,
        # mean error 1/sqrt(750) = 0.037 SD. Bounds: 4 standard errors plus 4x those.
        assert abs(slope - 1) <= 4 * se + 4 * 0.026, (roi, slope, se)
        assert abs(intercept) <= 4 * resid.std() / math.sqrt(n) + 4 * 0.037, (roi, intercept)


def test_the_world_is_reused_and_a_half_built_one_is_not(world, tmp_path):
    root, truth = world
    again = ensure_synthetic_brain(root, **SMALL)
    assert np.array_equal(again.test_ids, truth.test_ids) and again.params["world"] == "brain"
    # A build killed after the twin's files left a marker of other parameters: rebuilt.
    _build(tmp_path, {**brain_params(**SMALL), "stage": "twin files"})
    assert not (tmp_path / BRAIN_NPZ).exists()
    ensure_synthetic(tmp_path, {"world": "brain", **SMALL})
    rebuilt, first = SyntheticBrain.load(tmp_path), SyntheticBrain.load(root)
    for name, buffer in first.state_dict().items():
        assert torch.equal(buffer, rebuilt.state_dict()[name]), name


def test_linear_brain_is_affine_in_the_pixels():
    brain = linear_brain(16)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 4, 3, 16, 16, generator=gen)
    cols = torch.arange(12)

    def r(z: torch.Tensor) -> torch.Tensor:
        return brain.responses(z, 1, cols)

    # float32 sums over 768 pixels of responses of order 10: rounding well below 1e-3.
    torch.testing.assert_close(r(0.3 * x + 0.7 * y), 0.3 * r(x) + 0.7 * r(y), atol=1e-3, rtol=0)

    def grad(z: torch.Tensor) -> torch.Tensor:
        z = z.clone().requires_grad_(True)
        r(z)[:, :4].mean(1).sum().backward()
        return z.grad

    torch.testing.assert_close(grad(x), grad(y), atol=1e-6, rtol=1e-4)


def test_nonlinear_units_have_finite_gradients_everywhere():
    x = torch.cat([torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16),
                   torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))])
    x.requires_grad_(True)
    units = PixelUnits("nonlinear")(x)
    assert units.shape == (4, len(UNITS)) and torch.isfinite(units).all()
    units.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[2:].abs().sum() > 0


def test_unknown_world_or_kind_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="world must be twin or brain"):
        ensure_synthetic(tmp_path, {"world": "brian"})
    with pytest.raises(ConfigError, match="kind must be one of"):
        brain_params(kind="quadratic")


def test_data_synthetic_brain_composes():
    cfg = compose_config("data=synthetic_brain")
    assert cfg.data.synthetic.world == "brain" and cfg.data.layout == "nsd"
