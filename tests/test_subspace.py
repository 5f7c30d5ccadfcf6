"""The subspace probe through a real results store, and similarity across stored runs."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import LinearEncoder
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from test_jacobian import planted_weights

from brainrobust.analysis.subspaces import main, pair_table, similarity_matrix
from brainrobust.errors import ConfigError, DataError
from brainrobust.probes.base import ProbeContext
from brainrobust.probes.jacobian import orthonormalize, subspace_similarity, top_k_right_singular
from brainrobust.probes.subspace import SubspaceProbe
from brainrobust.results.store import ResultsStore

CONF = str(Path(__file__).resolve().parents[1] / "conf")
S, D, K = 8, 192, 4
N_VOX = 30
# EBA overlaps FFA: it only needs to be too small for k.
ROIS = {"FFA": torch.arange(N_VOX), "EBA": torch.arange(3)}
TOP_SIGMA = [10.0, 8.0, 6.0, 5.0]


@pytest.fixture(scope="module")
def models():
    """Linear encoders a, b whose FFA top-4 subspaces share 2 planted directions (sim 0.5)."""
    g = torch.Generator().manual_seed(0)
    basis = orthonormalize(torch.randn(D, D, generator=g))
    tail = torch.linspace(1.0, 0.05, N_VOX - K).tolist()
    w_a = planted_weights(basis, [0, 1, 2, 3], TOP_SIGMA, range(10, 36), tail, N_VOX, 1)
    w_b = planted_weights(basis, [0, 1, 4, 5], TOP_SIGMA, range(40, 66), tail, N_VOX, 2)
    return {
        "a": LinearEncoder(w_a, ROIS).eval(),
        "b": LinearEncoder(w_b, ROIS).eval(),
        "images": torch.rand(5, 3, S, S, generator=g),
        "ids": np.array([7, 3, 11, 40, 2]),
    }


def run_probe(root, encoder, model, images, ids, subject=1, **settings):
    store = ResultsStore(root).run(
        {"model": model, "subject": subject},
        {"model": model, "subject": subject, "rois": "EBA,FFA"},
    )
    ctx = ProbeContext(
        images=images,
        image_ids=ids,
        responses=np.zeros((len(ids), N_VOX)),
        rois=["EBA", "FFA"],
        roi_stats={r: {"test_sd": 1.0, "noise_ceiling": 50.0} for r in ROIS},
        meta={"model": model, "subject": subject},
        store=store,
    )
    settings = {
        "k": K,
        "oversample": 4,
        "max_iters": 2,
        "method": "randomized",
        "rois": ["FFA"],
    } | settings
    probe = SubspaceProbe(**settings)
    probe.bind(ctx)
    records = probe.run(encoder, ctx)
    store.write_records(probe.name, records)
    return store, records


def ffa_truth(encoder):
    _, s, vh = torch.linalg.svd(encoder.W[ROIS["FFA"]])
    return vh[:K].T, s[:K]


def test_probe_writes_records_and_subspaces(tmp_path, models):
    store, records = run_probe(tmp_path, models["a"], "a", models["images"], models["ids"])
    truth_p, truth_s = ffa_truth(models["a"])
    sigmas = {f"sigma_{i}" for i in range(1, K + 1)}
    assert set(records.metric) == sigmas | {
        "participation_ratio",
        "gap_ratio",
        "residual",
        "error_bound",
        "iterations",
    }
    assert set(records.roi) == {"FFA"} and sorted(set(records.image_id)) == sorted(models["ids"])
    sigma = records[records.metric == "sigma_1"].value.to_numpy()
    np.testing.assert_allclose(sigma, truth_s[0].item(), rtol=1e-4)
    eig = truth_s.double() ** 2
    pr = records[records.metric == "participation_ratio"].value.to_numpy()
    np.testing.assert_allclose(pr, (eig.sum() ** 2 / (eig**2).sum()).item(), rtol=1e-4)
    # sigma_5 / sigma_4 of the planted spectrum (the first tail value over the last top one);
    # the randomized sigma_5 is a Rayleigh-Ritz value, a slight underestimate.
    gap = records[records.metric == "gap_ratio"].value.to_numpy()
    assert ((gap > 0.95 / TOP_SIGMA[-1]) & (gap < 1.00001 / TOP_SIGMA[-1])).all()
    assert (records.k == K).all() and (records.method == "randomized").all()
    stored = pd.read_parquet(store.records_path("subspace"))
    assert len(stored) == len(records) and (stored.model == "a").all()

    arrays = store.load_array("subspace_FFA")
    assert arrays["P"].shape == (5, D, K) and arrays["P"].dtype == np.float16
    np.testing.assert_array_equal(arrays["image_id"], models["ids"])
    p = np.linalg.qr(arrays["P"].astype(np.float32))[0]
    assert subspace_similarity(p, np.broadcast_to(truth_p.numpy(), p.shape)).min() >= 0.99


def test_similarity_matrix_equals_direct_computation(tmp_path, models):
    images, ids = models["images"], models["ids"]
    run_probe(tmp_path, models["a"], "a", images, ids)
    # b saw the images in another order and only some of them: compared on the shared ids.
    order = [3, 0, 2]
    run_probe(tmp_path, models["b"], "b", images[order], ids[order])
    sim = similarity_matrix(tmp_path, "FFA")

    fn = {m: (lambda x, e=models[m]: e(x)[:, ROIS["FFA"]]) for m in ("a", "b")}
    p_a, _ = top_k_right_singular(fn["a"], images[order], K, method="exact")[:2]
    p_b, _ = top_k_right_singular(fn["b"], images[order], K, method="exact")[:2]
    direct = subspace_similarity(p_a, p_b).mean()
    assert list(sim.index) == ["a", "b"] and list(sim.columns) == ["a", "b"]
    assert direct == pytest.approx(2 / K, abs=1e-4)
    assert sim.loc["a", "b"] == pytest.approx(direct, abs=2e-3)
    assert sim.loc["b", "a"] == sim.loc["a", "b"]
    np.testing.assert_allclose(np.diag(sim.to_numpy()), 1.0, atol=1e-5)
    assert sim.attrs["random_baseline"] == pytest.approx(K / D)
    assert sim.attrs["n_images"][("a", "b")] == 3 and sim.attrs["n_images"][("a", "a")] == 5

    table = pair_table(tmp_path, "FFA")
    ab = table[(table.a == "a") & (table.b == "b")]
    assert sorted(ab.image_id) == sorted(ids[order])
    angles = ab[[f"angle_{i}" for i in range(1, K + 1)]].to_numpy()
    np.testing.assert_allclose(angles, np.tile([0, 0, math.pi / 2, math.pi / 2], (3, 1)), atol=0.05)


def test_pairs_are_aligned_by_image_id(tmp_path):
    """Per-image subspaces stored in different orders are matched by id, not by position."""
    rng = np.random.default_rng(0)
    p = np.linalg.qr(rng.normal(size=(4, 30, 2)))[0]
    store = ResultsStore(tmp_path)
    for model, order in (("x", [0, 1, 2, 3]), ("y", [2, 0, 3])):
        run = store.run({"model": model}, {"model": model, "subject": 1})
        q = p[order].copy()
        q[:, :, 1] = rng.normal(size=(len(order), 30)) if model == "y" else q[:, :, 1]
        run.save_array(
            "subspace_FFA",
            {"P": q, "sigma": np.ones((len(order), 2)), "image_id": np.array(order) + 100},
        )
    table = pair_table(tmp_path, "FFA")
    xy = table[(table.a == "x") & (table.b == "y")].set_index("image_id")
    p_y = {
        i + 100: np.linalg.qr(a.astype(np.float32))[0] for i, a in zip([2, 0, 3], _load(store, "y"))
    }
    p_x = {i + 100: np.linalg.qr(a.astype(np.float32))[0] for i, a in enumerate(_load(store, "x"))}
    for image_id, row in xy.iterrows():
        assert row.similarity == pytest.approx(
            subspace_similarity(p_x[image_id], p_y[image_id]), abs=1e-5
        )
    assert sorted(xy.index) == [100, 102, 103]


def _load(store, model):
    run = next(r for r in store.runs() if r["columns"]["model"] == model)
    with np.load(store.root / "runs" / run["key"] / "arrays" / "subspace_FFA.npz") as npz:
        return npz["P"]


def test_k_above_the_roi_voxel_count_is_a_config_error(tmp_path, models):
    with pytest.raises(ConfigError, match=r"k=4 exceeds the 3 voxels of EBA.*k <= 3"):
        run_probe(tmp_path, models["a"], "a", models["images"], models["ids"], rois=["EBA"])


def test_missing_subspaces_name_the_run(tmp_path, models):
    with pytest.raises(DataError, match="no stored subspaces for FFA"):
        similarity_matrix(tmp_path, "FFA")
    store, _ = run_probe(tmp_path, models["a"], "a", models["images"], models["ids"])
    other = ResultsStore(tmp_path).run({"model": "c"}, {"model": "c", "subject": 1})
    other.write_records(
        "sensitivity", pd.DataFrame({"roi": ["FFA"], "metric": ["s"], "value": [1.0]})
    )
    with pytest.raises(
        DataError, match=rf"run {other.key} \(model=c\).*experiment=subspace model=c subject=1"
    ):
        similarity_matrix(tmp_path, "FFA", models=["a", "c"])
    (store.dir / "arrays" / "subspace_FFA.npz").unlink()
    with pytest.raises(
        DataError, match=rf"run {store.key} .*subspace_FFA.npz is missing.*force=true"
    ):
        similarity_matrix(tmp_path, "FFA")


def test_runs_are_labelled_unambiguously(tmp_path, models):
    images, ids = models["images"][:2], models["ids"][:2]
    run_probe(tmp_path, models["a"], "a", images, ids, subject=1)
    run_probe(tmp_path, models["a"], "a", images, ids, subject=2)
    run_probe(tmp_path, models["b"], "b", images, ids, subject=1)
    with pytest.raises(DataError, match="labelled 'a'.*subject="):
        similarity_matrix(tmp_path, "FFA")
    assert list(similarity_matrix(tmp_path, "FFA", subject=1).index) == ["a", "b"]
    by_subject = similarity_matrix(tmp_path, "FFA", by=("model", "subject"))
    assert list(by_subject.index) == ["a/1", "a/2", "b/1"]
    # The same linear encoder read out for two "subjects": identical subspaces.
    assert by_subject.loc["a/1", "a/2"] == pytest.approx(1.0, abs=1e-5)

    out = tmp_path / "figures"
    main(["--root", str(tmp_path), "--out", str(out), "--rois", "FFA", "--subjects", "1"])
    csv = pd.read_csv(out / "similarity_FFA_s1.csv", index_col=0)
    np.testing.assert_allclose(
        csv.to_numpy(), similarity_matrix(tmp_path, "FFA", subject=1).to_numpy()
    )


def test_all_voxels_mode_and_auto_method(tmp_path, models):
    store, records = run_probe(
        tmp_path,
        models["a"],
        "a",
        models["images"][:2],
        models["ids"][:2],
        voxels="all",
        method="auto",
    )
    assert set(records.roi) == {"all"}
    # 30 voxels cost fewer products than (4 + 4) x (2 x 2 + 1) = 40: auto takes the exact J.
    assert set(records.method) == {"exact"}
    gap = records[records.metric == "gap_ratio"].value.to_numpy()
    np.testing.assert_allclose(gap, 1.0 / TOP_SIGMA[-1], rtol=1e-4)
    _, s, _ = torch.linalg.svd(models["a"].W)
    np.testing.assert_allclose(records[records.metric == "sigma_1"].value, s[0].item(), rtol=1e-4)
    assert store.load_array("subspace_all")["P"].shape == (2, D, K)


def test_config_builds_the_probe_and_rejects_bad_settings():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=subspace", "probe.subspace.k=6"])
    probe = instantiate(cfg.probe.subspace, _convert_="all")
    assert isinstance(probe, SubspaceProbe) and probe.k == 6 and probe.method == "auto"
    assert cfg.experiment_name == "subspace" and list(cfg.probe) == ["subspace"]
    for bad in (
        {"k": 0},
        {"max_iters": 0},
        {"tol": 0},
        {"method": "lanczos"},
        {"voxels": "mean"},
        {"oversample": -1},
    ):
        with pytest.raises(ConfigError, match=f"probe.subspace.{next(iter(bad))}"):
            SubspaceProbe(**bad)
