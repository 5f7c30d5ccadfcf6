"""The sensitivity probe on a model whose answer is known, through a real results store."""

import numpy as np
import pytest
import torch
from helpers import LinearEncoder

import brainrobust.probes.sensitivity as sensitivity_mod
from brainrobust.errors import BrainRobustError
from brainrobust.probes.attack import PGDConfig
from brainrobust.probes.base import ProbeContext
from brainrobust.probes.sensitivity import SensitivityProbe
from brainrobust.results.store import ResultsStore

SIZE, VOXELS = 8, 6


def _setup(tmp_path, n=5):
    torch.manual_seed(0)
    W = torch.randn(VOXELS, 3 * SIZE * SIZE)
    encoder = LinearEncoder(W, {"FFA": torch.arange(3), "PPA": torch.arange(3, 6)}).eval()
    images = torch.full((n, 3, SIZE, SIZE), 0.5) + 0.1 * torch.rand(n, 3, SIZE, SIZE)
    store = ResultsStore(tmp_path).run({"t": 1}, {"model": "linear"})
    ctx = ProbeContext(images=images, image_ids=np.arange(100, 100 + n), responses=np.zeros((n, VOXELS)),
                       rois=["FFA", "PPA"], roi_stats={r: {"test_sd": 2.0, "noise_ceiling": 25.0}
                                                       for r in ("FFA", "PPA")},
                       meta={"model": "linear"}, store=store)
    return encoder, ctx, W


def test_linear_encoder_reaches_the_analytic_sensitivity(tmp_path):
    encoder, ctx, W = _setup(tmp_path)
    ladder = [0.01, 0.03]  # small enough that [0, 1] never binds around 0.5 +- 0.1
    probe = SensitivityProbe(PGDConfig(norm="l2", steps=30, step_size=0.25), eps=ladder, random_draws=3)
    probe.bind(ctx)
    records = probe.run(encoder, ctx)
    for roi, rows in (("FFA", slice(0, 3)), ("PPA", slice(3, 6))):
        w_mean = W[rows].mean(0)
        sub = records[records.roi == roi]
        for eps in ladder:
            at = sub[sub.eps == eps]
            abs_s = at[at.metric == "abs_s"].value.to_numpy()
            np.testing.assert_allclose(abs_s, eps * w_mean.norm().item(), rtol=0.01)
            assert (at[at.metric == "norm"].value <= eps + 1e-6).all()
            assert (at[at.metric == "random_abs_s"].value < 0.2 * abs_s).all()
            # s in SD units and as a fraction of the explainable SD (sqrt(0.25) * 2.0 = 1.0).
            np.testing.assert_allclose(at[at.metric == "s_nc"].value, abs_s, rtol=1e-6)
            np.testing.assert_allclose(at[at.metric == "s_sd"].value.abs(), abs_s / 2.0, rtol=1e-6)
    assert set(records.image_id) == set(range(100, 105))
    saved = ctx.store.load_array("perturbations_FFA_l2")
    assert saved["delta"].shape == (2, 5, 3, SIZE, SIZE) and saved["delta"].dtype == np.float16
    np.testing.assert_array_equal(saved["image_id"], np.arange(100, 105))


def test_linf_optimum_is_eps_times_sign_of_w(tmp_path):
    encoder, ctx, W = _setup(tmp_path)
    eps = 2 / 255
    probe = SensitivityProbe(PGDConfig(norm="linf", steps=10, step_size=0.25), eps=[eps], objective="increase",
                             rois=["FFA"], random_draws=1)
    probe.bind(ctx)
    records = probe.run(encoder, ctx)
    gain = records[records.metric == "s"].value.to_numpy()
    np.testing.assert_allclose(-gain, eps * W[:3].mean(0).abs().sum().item(), rtol=1e-4)


def test_out_of_memory_halves_the_batch(tmp_path, monkeypatch):
    # 40 images in chunks of at most a tenth (4): the first chunk fails, halves to 2, succeeds.
    encoder, ctx, _ = _setup(tmp_path, n=40)
    real_pgd = sensitivity_mod.pgd
    sizes = []

    def pgd_that_needs_small_batches(objective, x, eps, cfg, **kwargs):
        sizes.append(len(x))
        if len(x) > 2:  # one eps: a chunk of more than 2 images does not fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_pgd(objective, x, eps, cfg, **kwargs)

    monkeypatch.setattr(sensitivity_mod, "pgd", pgd_that_needs_small_batches)
    probe = SensitivityProbe(PGDConfig(norm="l2", steps=3), eps=[0.01], rois=["FFA"], batch_size=8,
                             random_draws=1)
    probe.bind(ctx)
    records = probe.run(encoder, ctx)
    assert sizes[:4] == [8, 4, 2, 2] and records.image_id.nunique() == 40
    assert len(records[records.metric == "abs_s"]) == 40


def test_out_of_memory_at_one_image_is_a_clear_error(tmp_path, monkeypatch):
    encoder, ctx, _ = _setup(tmp_path, n=2)

    def always_oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(sensitivity_mod, "pgd", always_oom)
    probe = SensitivityProbe(PGDConfig(norm="l2", steps=3), eps=[0.01], rois=["FFA"], batch_size=2)
    probe.bind(ctx)
    with pytest.raises(BrainRobustError, match="out of GPU memory with one image per batch"):
        probe.run(encoder, ctx)
