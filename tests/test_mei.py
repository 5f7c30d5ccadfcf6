"""Maximally exciting images on linear encoders: alignment with the readout, selectivity,
the parametrisation, the transforms, outputs and bad settings."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import LinearEncoder
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from brainrobust.errors import ConfigError
from brainrobust.pipeline import render_media
from brainrobust.probes.base import ProbeContext
from brainrobust.probes.mei import (
    COLOR_MATRIX,
    FourierImage,
    MEIProbe,
    optimise_mei,
    pairwise_cosine,
    random_affine,
    spectrum_scale,
)
from brainrobust.results.loggers import scalars
from brainrobust.results.store import ResultsStore

S = 16
EPS32 = float(np.finfo(np.float32).eps)
TRANSFORMS = {"jitter": 1.0, "scale": (0.95, 1.05), "rotate": 5.0}


def _smooth_direction(g: torch.Generator) -> torch.Tensor:
    """A unit readout varying smoothly over the image, like a real model's pixel-space readout."""
    low = torch.randn(1, 3, 4, 4, generator=g)
    w = F.interpolate(low, size=(S, S), mode="bilinear", align_corners=False).flatten()
    return w / w.norm()


@pytest.fixture(scope="module")
def encoder():
    g = torch.Generator().manual_seed(0)
    w_a, w_b = _smooth_direction(g), _smooth_direction(g)
    w_b = w_b - (w_b @ w_a) * w_a  # different ROIs read different (orthogonal) directions
    w_b = w_b / w_b.norm()
    W = torch.stack([w_a, 1.1 * w_a, w_b, 0.9 * w_b])
    return LinearEncoder(W, {"A": [0, 1], "B": [2, 3]}).eval()


def _readout(encoder, roi):
    return encoder.W[encoder.rois[roi]].mean(0)


def test_fourier_image_inverts_a_start_image_and_stays_in_range():
    x = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    param = FourierImage(2, S, init=x)
    # Round trip in float32: logit, colour unmixing, rfft2, /scale, *scale, irfft2, mixing. Each
    # FFT of N = S^2 points errs by at most ~7 log2(N) eps in 2-norm (Higham, Accuracy and
    # Stability of Numerical Algorithms, 24.1), the mixings by cond(colour) more; the sigmoid
    # then scales an error by at most 1/4 and rounds once.
    logits = torch.logit(x.double()).flatten(1).norm(dim=1)[:, None, None, None]
    cond = np.linalg.cond(COLOR_MATRIX.double().numpy())
    bound = EPS32 * ((14 * np.log2(S * S) + 10) * cond * logits / 4 + 1)
    assert torch.all((param() - x).abs() <= bound)
    noise = FourierImage(3, S, generator=torch.Generator().manual_seed(2))()
    assert noise.shape == (3, 3, S, S) and 0 < noise.min() and noise.max() < 1
    assert (noise - 0.5).abs().max() < 0.1  # a faint noise start is near grey
    same = FourierImage(3, S, generator=torch.Generator().manual_seed(2))()
    assert torch.equal(noise, same)
    scale = spectrum_scale(S, 1.0)
    # a square root and a division, half an ulp each
    assert scale.shape == (S, S // 2 + 1) and scale[0, 0] == S
    assert scale[0, 1] == pytest.approx(S, rel=2 * EPS32)
    assert scale[S // 2, S // 2] == pytest.approx(1 / np.sqrt(0.5), rel=2 * EPS32)


def test_random_affine_identity_and_gradient():
    x = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(3), requires_grad=True)
    same = random_affine(x, 0.0, (1.0, 1.0), 0.0)
    # The identity grid's pixel coordinates (<= S) carry a few float32 roundings (linspace,
    # 3-term affine map, unnormalising): 8 eps * S px moves a bilinear sample by at most that
    # times the largest neighbour difference (<= 1), plus the 4-tap interpolation's rounding.
    assert torch.allclose(same, x, rtol=0, atol=EPS32 * (8 * S + 4))
    moved = random_affine(x, 3.0, (0.9, 1.1), 20.0, torch.Generator().manual_seed(4))
    assert moved.shape == x.shape and (moved - x).abs().mean() > 0.05
    moved.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_mei_of_a_linear_readout_aligns_with_its_weights(encoder):
    targets = ["A", "A", "B"]
    mei, start = optimise_mei(
        encoder, targets, S, steps=100, generator=torch.Generator().manual_seed(5), **TRANSFORMS
    )
    for b, roi in enumerate(targets):
        w = _readout(encoder, roi)
        v = (mei[b] - 0.5).flatten()
        cos = F.cosine_similarity(v, w, dim=0)
        # The sigmoid saturates towards sign(w); that image's cosine is the best reachable one.
        best = F.cosine_similarity(torch.sign(w), w, dim=0)
        assert cos > 0.85 * best, (roi, float(cos), float(best))
        assert ((v > 0) == (w > 0)).float().mean() > 0.8  # chance: 0.5
        assert (mei[b] - start[b]).abs().max() > 0.3  # it moved far from the grey start


def _context(images: torch.Tensor, first_id: int, store) -> ProbeContext:
    """Test images with consecutive ids from first_id, ROIs A and B, no measured responses."""
    n = len(images)
    return ProbeContext(images=images, image_ids=np.arange(first_id, first_id + n, dtype=np.int64),
                        responses=np.zeros((n, 4)), rois=["A", "B"], roi_stats={}, meta={},
                        store=store, seed=0)


def test_mei_is_selective_and_the_probe_writes_its_outputs(encoder, tmp_path):
    store = ResultsStore(tmp_path / "results").run({"t": 1}, {"model": "linear", "subject": 1})
    g = torch.Generator().manual_seed(6)
    images = torch.rand(12, 3, S, S, generator=g)
    ctx = _context(images, first_id=0, store=store)
    probe = MEIProbe(seeds=2, steps=60, transforms=TRANSFORMS)
    probe.bind(ctx)
    records = probe.run(encoder, ctx)
    render_media(store, [probe])  # what the pipeline does once the probe is done
    store.write_records(probe.name, records)
    back = store.read_records("mei")
    assert {"target_roi", "mei_seed", "start", "image_id", "roi", "metric", "value"} <= set(
        back.columns
    )
    assert len(back[back.metric == "response"]) == 2 * 2 * 2  # 2 targets x 2 seeds x every ROI
    change = back[back.metric == "response_change"].pivot_table(
        index=["target_roi", "mei_seed"], columns="roi", values="value"
    )
    # Selectivity: each ROI's MEI raises that ROI more than the other one.
    assert (change.loc["A"]["A"] > change.loc["A"]["B"] + 1.0).all()
    assert (change.loc["B"]["B"] > change.loc["B"]["A"] + 1.0).all()
    z = back[back.metric == "response_z"].groupby(["target_roi", "roi"])["value"].mean()
    assert z["A", "A"] > 3 and z["B", "B"] > 3  # far above every test image
    assert set(back[back.roi.isna()].metric) == {"l2", "linf", "psnr", "ssim"}
    sent = scalars("mei", records, probe.settings)  # what the loggers get
    assert sent["mei/A/target_roi=A/response_z"] > sent["mei/B/target_roi=A/response_z"]

    arrays = store.load_array("mei_A")
    assert arrays["images"].shape == (2, 3, S, S) and arrays["responses"].shape == (2, 2)
    assert str(arrays["target_roi"]) == "A" and list(arrays["rois"]) == ["A", "B"]
    grid = Image.open(store.dir / "media" / "mei_grid.png")
    assert grid.format == "PNG" and grid.size[0] > 100


def test_mei_from_natural_images_starts_at_them(encoder, tmp_path):
    store = ResultsStore(tmp_path / "results").run({"t": 2}, {"model": "linear", "subject": 1})
    images = 0.1 + 0.8 * torch.rand(6, 3, S, S, generator=torch.Generator().manual_seed(7))
    ctx = _context(images, first_id=50, store=store)
    probe = MEIProbe(rois=["A"], start={"select": "first", "n": 2}, steps=20, save_media=False)
    probe.bind(ctx)
    records = probe.run(encoder, ctx)
    arrays = store.load_array("mei_A")
    assert arrays["image_id"].tolist() == [50, 51]
    # fp16 storage: half an ulp, eps16 / 2 relative
    fp16 = float(np.finfo(np.float16).eps)
    assert np.allclose(arrays["start_images"], images[:2].numpy(), rtol=fp16, atol=0)
    assert set(records.start) == {"image"}
    up = records[(records.metric == "response_change") & (records.roi == "A")]["value"]
    assert (up > 0).all()


def test_diversity_term_spreads_the_seeds(encoder):
    def spread(weight):
        mei, _ = optimise_mei(
            encoder,
            ["A"] * 3,
            S,
            steps=30,
            diversity=weight,
            decay_power=0.0,
            generator=torch.Generator().manual_seed(8),
        )
        return float(pairwise_cosine(mei, torch.zeros(3)))

    assert spread(50.0) < spread(0.0) - 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seeds": 0}, "seeds"),
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"transforms": {"shear": 1}}, "unknown"),
        ({"transforms": {"scale": [1.2, 0.8]}}, "scale"),
        ({"start": {"select": "middle"}}, "select"),
        ({"diversity": -1.0}, "diversity"),
    ],
)
def test_bad_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MEIProbe(**kwargs)


def test_config_builds_the_probe():
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=targeted", "probe=[mei]"])
    probe = instantiate(cfg.probe.mei, _convert_="all")
    assert isinstance(probe, MEIProbe) and probe.start is None and probe.scale == (0.9, 1.1)
