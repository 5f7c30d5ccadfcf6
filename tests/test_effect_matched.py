"""Effect-matched budgets: bracketing + bisection over PGD against analytic answers."""

import math

import numpy as np
import pytest
import torch
from helpers import LinearEncoder

from brainrobust.costs import search_rounds
from brainrobust.errors import ConfigError, DataError
from brainrobust.probes.attack import PGDConfig
from brainrobust.probes.base import ProbeContext
from brainrobust.probes.effect_matched import EffectMatchedProbe
from brainrobust.results.loggers import scalars
from brainrobust.results.store import ResultsStore

S = 16
D = 3 * S * S
ROIS = {"FFA": [0, 1], "PPA": [2]}
# From delta = 0 PGD reaches the exact optimum of a linear or squared-linear ROI response.
ATTACK = PGDConfig(norm="l2", steps=20, random_start=False)
STATS = {"FFA": {"test_sd": 2.0, "noise_ceiling": 25.0}, "PPA": {"test_sd": 1.0, "noise_ceiling": 36.0}}


class SquaredLinearEncoder(LinearEncoder):
    """r = (W x + b)^2 per voxel: the budget for a given change differs per image."""

    def forward(self, x):
        return super().forward(x).square()


def _weights(seed=0):
    return torch.randn(sum(len(cols) for cols in ROIS.values()), D, generator=torch.Generator().manual_seed(seed))


def _roi_direction(W, roi):
    return W[ROIS[roi]].mean(0)


def _images(n=5, seed=0):
    # Mid-grey and small budgets: x + delta stays inside [0, 1], so the box never binds.
    gen = torch.Generator().manual_seed(seed)
    return 0.5 + 0.1 * (torch.rand(n, 3, S, S, generator=gen) - 0.5)


def _probe(effect, **kw):
    return EffectMatchedProbe(attack=ATTACK, effect=effect, **{"eps_min": 0.01, "eps_max": 5.0,
                                                                "rel_tol": 0.005, **kw})


def _context(images, tmp_path):
    ids = np.arange(len(images), dtype=np.int64) + 7
    store = ResultsStore(tmp_path).run({"model": "lin"}, {"model": "lin", "subject": 1})
    return ProbeContext(images=images, image_ids=ids, responses=np.zeros((len(ids), 3)),
                        rois=sorted(ROIS), roi_stats=STATS, meta={"model": "lin", "subject": 1},
                        store=store, seed=0)


def _wide(records):
    return records.pivot_table(index=["roi", "image_id"], columns="metric", values="value", dropna=False)


@pytest.mark.parametrize("kind, value, units", [
    ("absolute", 0.8, 1.0),
    ("test_sd", 0.4, STATS["FFA"]["test_sd"]),
    ("noise_ceiling", 0.8, math.sqrt(0.25) * STATS["FFA"]["test_sd"]),
])
def test_bisection_finds_the_analytic_eps_of_a_linear_model(tmp_path, kind, value, units):
    W = _weights()
    encoder = LinearEncoder(W, ROIS).eval()
    images = _images()
    probe = _probe({"kind": kind, "value": value}, rois=["FFA"])
    ctx = _context(images, tmp_path)
    probe.bind(ctx)
    out = _wide(probe.run(encoder, ctx)).loc["FFA"]
    # The best L2 change of w^T x within ||delta|| <= eps is eps ||w||.
    effect = value * units
    expected = effect / _roi_direction(W, "FFA").norm().item()
    assert (out["reached"] == 1).all()
    np.testing.assert_allclose(out["eps_found"], expected, rtol=0.01)
    assert (out["eps_found"] >= expected * (1 - 1e-4)).all()  # the upper end of the bracket
    assert (out["effect"] >= effect * (1 - 1e-5)).all()
    np.testing.assert_allclose(out["effect_target"], effect, rtol=1e-9)
    np.testing.assert_allclose(out["norm"], out["eps_found"], rtol=1e-4)
    # Bracketing doubles from 0.01 (log2(expected / 0.01) rounds) before the bisection starts.
    assert (out["pgd_runs"] >= math.ceil(math.log2(expected / 0.01))).all()
    # ... and never takes more attacks than `brainrobust plan` counts for it.
    longest = search_rounds(probe.eps_min, probe.eps_max, probe.growth, probe.rel_tol)
    assert (out["pgd_runs"] <= longest).all()


def test_each_image_gets_its_own_budget_and_unreached_ones_are_nan(tmp_path):
    # r = (w.x + b)^2 with a = w.x + b > 0: the best change at eps is 2 a eps|w| + (eps|w|)^2,
    # so eps* = (sqrt(a^2 + effect) - a) / |w| differs per image.
    W = _weights(1)[:1]
    w = W[0]
    offsets = torch.tensor([40.0, 2.0, 1.0, 0.5, 0.05])  # a_i; the last needs more than eps_max
    # Images x_i = (mid-grey with w.x removed) + a_i w / |w|^2, so that w . x_i = a_i.
    base = torch.full((D,), 0.5)
    unit = w / w.norm() ** 2
    images = (base - (w @ base) * unit + offsets[:, None] * unit).reshape(-1, 3, S, S)
    assert images.min() > 0.3 and images.max() < 0.7
    encoder = SquaredLinearEncoder(W, {"FFA": [0]}).eval()
    a, norm_w = offsets.double(), w.double().norm()
    effect = 3.0
    expected = ((a ** 2 + effect).sqrt() - a) / norm_w
    eps_max = math.sqrt(expected[-1] * expected[:-1].max())
    assert expected[-1] > eps_max > expected[:-1].max()
    probe = _probe({"kind": "absolute", "value": effect}, rois=["FFA"], eps_min=0.001, eps_max=eps_max)
    ctx = _context(images, tmp_path)
    ctx.rois = ["FFA"]
    probe.bind(ctx)
    out = _wide(probe.run(encoder, ctx)).loc["FFA"]
    np.testing.assert_allclose(out["eps_found"].to_numpy()[:-1], expected[:-1].numpy(), rtol=0.01)
    assert len(set(np.round(out["eps_found"].to_numpy()[:-1], 4))) == 4
    assert out["reached"].tolist() == [1, 1, 1, 1, 0]
    assert math.isnan(out["eps_found"].iloc[-1])
    # Not reached: the record holds the best effect at eps_max, below the target.
    best = 2 * a[-1] * eps_max * norm_w + (eps_max * norm_w) ** 2
    assert out["effect"].iloc[-1] == pytest.approx(best.item(), rel=1e-3)
    assert out["effect"].iloc[-1] < effect

    saved = ctx.store.load_array("effect_matched_FFA_l2")
    assert saved["delta"].shape == (1, len(images), 3, S, S)
    np.testing.assert_array_equal(saved["image_id"], ctx.image_ids)
    np.testing.assert_allclose(saved["eps"][:-1], out["eps_found"].to_numpy()[:-1], rtol=1e-3)
    assert np.isnan(saved["eps"][-1])
    norms = np.linalg.norm(saved["delta"][0].astype(np.float64).reshape(len(images), -1), axis=1)
    np.testing.assert_allclose(norms[:-1], out["eps_found"].to_numpy()[:-1], rtol=2e-3)


def test_every_roi_gets_its_own_target(tmp_path):
    W = _weights()
    encoder = LinearEncoder(W, ROIS).eval()
    probe = _probe({"kind": "test_sd", "value": 0.5})
    ctx = _context(_images(n=2), tmp_path)
    probe.bind(ctx)
    records = probe.run(encoder, ctx)
    out = _wide(records)
    for roi in ROIS:
        expected = 0.5 * STATS[roi]["test_sd"] / _roi_direction(W, roi).norm().item()
        np.testing.assert_allclose(out.loc[roi]["eps_found"], expected, rtol=0.01)
    assert set(records.effect_kind) == {"test_sd"} and set(records.norm_type) == {"l2"}
    # eps mirrors eps_found so the transfer probe can key the source change on it.
    found = records[records.metric == "eps_found"]
    np.testing.assert_allclose(found.eps, found.value)
    # The scalar the loggers get: every image reached the effect.
    assert scalars("effect_matched", records, probe.settings)[
        "effect_matched/FFA/effect_kind=test_sd/l2/reached"] == 1.0


@pytest.mark.parametrize("effect, kw, match", [
    ({"kind": "sd", "value": 1.0}, {}, "effect.kind"),
    ({"kind": "absolute", "value": -1.0}, {}, "effect.value"),
    ({"kind": "absolute", "value": float("nan")}, {}, "effect.value"),
    ({"kind": "absolute", "value": "big"}, {}, "effect.value"),
    ({"kind": "absolute"}, {}, "effect must be"),
    ({"kind": "absolute", "value": 1.0}, {"eps_min": 1.0, "eps_max": 0.5}, "eps_max must be a finite number > 1"),
    ({"kind": "absolute", "value": 1.0}, {"growth": 1.0}, "growth"),
    ({"kind": "absolute", "value": 1.0}, {"growth": float("nan")}, "growth must be a finite number > 1"),
    ({"kind": "absolute", "value": 1.0}, {"batch_size": True}, "batch_size must be an integer >= 1"),
    ({"kind": "absolute", "value": 1.0}, {"rel_tol": 0.0}, "rel_tol"),
])
def test_bad_settings_are_config_errors(effect, kw, match):
    with pytest.raises(ConfigError, match=match):
        _probe(effect, **kw)


def test_missing_noise_ceiling_names_the_fix(tmp_path):
    probe = _probe({"kind": "noise_ceiling", "value": 0.5})
    with pytest.raises(DataError, match="effect.kind=test_sd"):
        probe.effect_target({"test_sd": 1.0, "noise_ceiling": float("nan")}, "FFA")
