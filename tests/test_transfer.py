"""Transfer probe: stored perturbations of source runs applied to target encoders, end to end
through the real SensitivityProbe / EffectMatchedProbe files in a ResultsStore."""

import numpy as np
import pytest
import torch
from helpers import LinearEncoder

from brainrobust.analysis.transfer import transfer_matrix
from brainrobust.errors import ConfigError, DataError
from brainrobust.probes.attack import PGDConfig
from brainrobust.probes.base import ProbeContext
from brainrobust.probes.effect_matched import EffectMatchedProbe
from brainrobust.probes.sensitivity import SensitivityProbe
from brainrobust.probes.transfer import TransferProbe
from brainrobust.results.store import ResultsStore, load

S = 16
D = 3 * S * S
EPS16, EPS32, EPS64 = (float(np.finfo(t).eps) for t in (np.float16, np.float32, np.float64))
ROIS = {"FFA": [0, 1], "PPA": [2, 3]}
IDS = np.arange(100, 106)  # six images, as _images draws
EPS = [0.1, 0.3]
# From delta = 0 the linear model's optimum is reached exactly; a random start would leave an
# orthogonal remainder that leaks into the orthogonal encoder.
ATTACK = PGDConfig(norm="l2", steps=20, random_start=False)
DATA = {"layout": "nsd", "root": "/data/nsd", "image_size": S, "synthetic": None}


def _images(n=6, size=S, seed=0):
    # Mid-grey images and small eps: x + delta never reaches the box, so nothing is clipped.
    gen = torch.Generator().manual_seed(seed)
    return 0.5 + 0.1 * (torch.rand(n, 3, size, size, generator=gen) - 0.5)


def _readout(seed, orthogonal_to=None):
    """(4, D) weights; with `orthogonal_to`, every row is orthogonal to those directions."""
    W = torch.randn(4, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if orthogonal_to is not None:
        q, _ = torch.linalg.qr(orthogonal_to.T)
        W = W - (W @ q) @ q.T
    return W.float()


def _roi_directions(W):
    return torch.stack([W[cols].mean(0) for cols in ROIS.values()]).double()


class ExactLinearEncoder(LinearEncoder):
    """LinearEncoder summing its D products in float64: a response is its exact value rounded
    once to float32, so a response change carries no rounding of D-term float32 sums (which,
    at responses ~100 times the changes, would hide the fp16 storage these tests measure)."""

    def forward(self, x):
        return (x.double().flatten(1) @ self.W.double().T + self.b.double()).to(x.dtype)


def replay_error(W, eps, along=0.0):
    """Bound of a replayed change's error on an ExactLinearEncoder with readout W, for stored
    perturbations of L2 norm eps made along a ROI direction: the perturbation's fp16 storage
    (half an ulp per pixel, eps16 / 2 relative, 2^-25 when subnormal) and float32 projection
    onto the eps ball ((D + 3) eps32 relative) seen through the target's ROI direction d, the
    part `along` (a cosine) of the perturbation that d reads, and four float32 responses of at
    most |W|_1 * max|x + delta| rounded twice each (voxel, ROI mean)."""
    d = _roi_directions(W)
    norm, l1 = d.norm(dim=1).max().item(), d.abs().sum(1).max().item()
    responses = W.double().abs().sum(1).max().item() * (0.55 + eps)
    return (
        eps * norm * (along + EPS16 / 2 + (D + 3) * EPS32) + l1 * 2.0**-25 + 4 * EPS32 * responses
    )


def _encoder(W, model):
    enc = ExactLinearEncoder(W, ROIS).eval()
    enc.meta = {"model": model, "layer": "pixels", "subject": 1}
    return enc


def _context(store, model, subject=1, identity_extra=None, images=None, ids=IDS, data=DATA):
    columns = {"model": model, "layer": "pixels", "subject": subject, "rois": "FFA,PPA", "seed": 0}
    identity = {"model": model, "subject": subject, "data": data, **(identity_extra or {})}
    run = store.run(identity, columns)
    images = _images() if images is None else images
    return ProbeContext(
        images=images, image_ids=np.asarray(ids, dtype=np.int64),
        responses=np.zeros((len(ids), 4)), rois=sorted(ROIS),
        roi_stats={r: {"test_sd": 1.0, "noise_ceiling": 50.0} for r in ROIS},
        meta=columns, store=run, seed=0,
    )


def _run(probe, encoder, ctx):
    """What Probe.on_test_end does, without a Trainer."""
    probe.bind(ctx)
    records = probe.run(encoder, ctx)
    ctx.store.write_records(probe.name, records)
    return records


def _sensitivity(save=True):
    return SensitivityProbe(attack=ATTACK, eps=EPS, random_draws=2, save_perturbations=save)


def _transfer(**kw):
    return TransferProbe(**{"random_draws": 3, "norm": "l2", **kw})


def _wide(records):
    return records.pivot_table(index=["source_model", "image_id", "eps", "roi"], columns="metric",
                               values="value")


def test_identical_encoders_transfer_fully_orthogonal_readouts_not_at_all(tmp_path):
    store = ResultsStore(tmp_path)
    W_a = _readout(0)
    W_c = _readout(1, orthogonal_to=_roi_directions(W_a))
    d_a, d_c = _roi_directions(W_a), _roi_directions(W_c)
    cosine = torch.nn.functional.cosine_similarity(d_c[:, None], d_a[None], dim=2)
    # W_c is orthogonal to A's directions in float64 (D eps64), then rounded to float32 and
    # averaged over a ROI's rows in float32: half an ulp each
    rows = torch.stack([W_c[cols].double().abs().mean(0) for cols in ROIS.values()])
    slack = (EPS32 * rows @ d_a.abs().T) / (d_c.norm(dim=1)[:, None] * d_a.norm(dim=1)) + D * EPS64
    assert torch.all(cosine.abs() <= slack)
    along = slack.max().item()
    enc_a, enc_b, enc_c = _encoder(W_a, "A"), _encoder(W_a.clone(), "B"), _encoder(W_c, "C")
    sens = {"experiment_name": "sensitivity"}
    ctx_a = _context(store, "A", identity_extra=sens)
    ctx_c = _context(store, "C", identity_extra=sens)
    _run(_sensitivity(), enc_a, ctx_a)
    _run(_sensitivity(), enc_c, ctx_c)

    # B is a run of its own (stage 2); A and C run the transfer probe inside the source run itself.
    ctx_b = _context(store, "B", identity_extra={"experiment_name": "transfer"})
    out_b = _wide(_run(_transfer(sources=[{"experiment_name": "sensitivity"}]), enc_b, ctx_b))
    out_a = _wide(_run(_transfer(), enc_a, ctx_a))

    # Identical encoders: the target moves exactly as the source did (up to the fp16 storage).
    for out in (out_b.loc["A"], out_a.loc["A"]):
        err = replay_error(W_a, out.index.get_level_values("eps").to_numpy())
        np.testing.assert_array_less(np.abs(out["target_change"] - out["source_change"]), err)
        np.testing.assert_array_less(np.abs(out["ratio"] - 1), err / out["abs_source_change"])
        assert (out["abs_source_change"] > 0.01).all()
    # Orthogonal readouts: a perturbation along A's ROI direction does nothing to C and back.
    for out in (out_b.loc["C"], out_a.loc["C"]):
        err = replay_error(W_a, out.index.get_level_values("eps").to_numpy(), along)
        np.testing.assert_array_less(np.abs(out["ratio"]), err / out["abs_source_change"])
    # The random control of the same norm moves a linear ROI by ~ ||w|| eps / sqrt(D): small.
    assert out_b.loc["A"]["random_ratio"].mean() < 0.15
    # fp16 storage and float32 projection of the perturbations, as in replay_error
    norms = out_b.loc["A"]["delta_norm"].groupby("eps").mean()
    np.testing.assert_allclose(norms, EPS, rtol=EPS16 / 2 + (D + 3) * EPS32 + 2.0**-25 * np.sqrt(D))

    merged = load(tmp_path, probe="transfer")
    assert {"source_run", "source_subject", "target_model", "target_subject", "kind"} <= set(merged.columns)
    assert set(merged.source_run) == {ctx_a.store.key, ctx_c.store.key}
    assert set(zip(merged.target_model, merged.source_model)) == {
        ("A", "A"), ("A", "C"), ("B", "A"), ("B", "C")}

    ratio = transfer_matrix(tmp_path, "FFA", eps=0.3)
    assert list(ratio.index) == ["A", "C"] and list(ratio.columns) == ["A", "B"]
    # means of the ratios above, so within their bounds at eps = 0.3
    smallest = out_b["abs_source_change"].min()
    np.testing.assert_allclose(ratio.loc["A"].to_numpy(), 1.0, atol=replay_error(W_a, 0.3) / smallest)
    np.testing.assert_allclose(ratio.loc["C"].to_numpy(), 0.0, atol=replay_error(W_a, 0.3, along) / smallest)
    control = transfer_matrix(tmp_path, "FFA", eps=0.3, control=True)
    assert (control.loc["A"] < 0.15).all() and (control.loc["A"] > 0).all()
    normalised = transfer_matrix(tmp_path, "FFA", eps=0.3, normalise_by_random=True)
    assert (normalised.loc["A"] > 5).all()
    by_subject = transfer_matrix(tmp_path, "PPA", eps=0.1, value="abs_change", by="model_subject")
    assert list(by_subject.columns) == ["A/s1", "B/s1"]
    with pytest.raises(ConfigError, match="several eps"):
        transfer_matrix(tmp_path, "FFA")


def test_effect_matched_perturbations_transfer(tmp_path):
    store = ResultsStore(tmp_path)
    W = _readout(0)
    em = EffectMatchedProbe(attack=ATTACK, effect={"kind": "absolute", "value": 0.2},
                            eps_min=0.01, eps_max=0.5, rel_tol=0.01, rois=["FFA"])
    source = _context(store, "A", identity_extra={"experiment_name": "effect_matched"})
    _run(em, _encoder(W, "A"), source)
    target = _context(store, "B", identity_extra={"experiment_name": "transfer"})
    probe = _transfer(kind="effect_matched", sources=[{"experiment_name": "effect_matched"}],
                      rois=["FFA"])
    out = _wide(_run(probe, _encoder(W.clone(), "B"), target)).loc["A"]
    err = replay_error(W, out.index.get_level_values("eps").to_numpy()) / out["abs_source_change"]
    np.testing.assert_array_less(np.abs(out["ratio"] - 1), err)
    assert (out["abs_source_change"] >= 0.2).all()
    found = source.store.load_array("effect_matched_FFA_l2")["eps"]
    # the array stores eps in fp16: half an ulp
    np.testing.assert_allclose(np.sort(out.reset_index()["eps"]), np.sort(found), rtol=EPS16)
    matrix = transfer_matrix(tmp_path, "FFA", kind="effect_matched")
    assert matrix.loc["A", "B"] == pytest.approx(1.0, abs=err.max())


def test_missing_source_perturbations_name_the_run_and_the_command(tmp_path):
    store = ResultsStore(tmp_path)
    W = _readout(0)
    empty = _context(store, "A", identity_extra={"experiment_name": "sensitivity"})
    _run(_sensitivity(save=False), _encoder(W, "A"), empty)
    target = _context(store, "B")
    with pytest.raises(DataError) as err:
        _run(_transfer(sources=[{"model": "A", "subject": 1}]), _encoder(W, "B"), target)
    message = str(err.value)
    assert "no stored perturbations for model=A subject=1 roi=FFA norm=l2" in message
    assert empty.store.key in message
    assert "`python run.py model=A subject=1 roi=FFA probe=[sensitivity]`" in message
    with pytest.raises(DataError, match=r"model=Z .*python run.py model=Z roi=FFA"):
        _run(_transfer(sources=[{"model": "Z"}]), _encoder(W, "B"), target)

    # Perturbations saved but the records never written (a killed source run): named, not used.
    killed = _context(store, "K", identity_extra={"experiment_name": "sensitivity"})
    interrupted = _sensitivity()
    interrupted.bind(killed)
    interrupted.run(_encoder(W, "K"), killed)
    with pytest.raises(DataError, match=f"run {killed.store.key} .*no sensitivity records"):
        _run(_transfer(sources=[{"model": "K"}]), _encoder(W, "B"), target)


def test_sources_of_other_stimuli_are_not_applied(tmp_path):
    store = ResultsStore(tmp_path)
    W = _readout(0)
    other = _context(store, "A", data={**DATA, "root": "/elsewhere"})
    _run(_sensitivity(), _encoder(W, "A"), other)
    with pytest.raises(DataError, match="1 run.s. hold it for other stimuli"):
        _run(_transfer(), _encoder(W, "B"), _context(store, "B"))


def test_image_size_mismatch_is_a_config_error(tmp_path):
    store = ResultsStore(tmp_path)
    _run(_sensitivity(), _encoder(_readout(0), "A"), _context(store, "A"))
    small = 8
    W_small = torch.randn(4, 3 * small * small, generator=torch.Generator().manual_seed(3))
    target = _context(store, "B", images=_images(size=small), data={**DATA, "image_size": small})
    with pytest.raises(ConfigError, match="canonical stimulus size.*data.image_size"):
        _run(_transfer(), _encoder(W_small, "B"), target)


def test_disjoint_images_and_duplicate_sources_are_refused(tmp_path):
    store = ResultsStore(tmp_path)
    W = _readout(0)
    _run(_sensitivity(), _encoder(W, "A"), _context(store, "A"))
    disjoint = _context(store, "B", ids=IDS + 1000)
    with pytest.raises(DataError, match="shares no test image ids"):
        _run(_transfer(), _encoder(W, "B"), disjoint)
    # A second run of the same encoder (another attack) would be averaged into the same cell.
    _run(_sensitivity(), _encoder(W, "A"), _context(store, "A", identity_extra={"attack": "strong"}))
    with pytest.raises(ConfigError, match="both hold perturbations_FFA_l2 for model=A"):
        _run(_transfer(), _encoder(W, "B"), _context(store, "B"))


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "fixed"}, "transfer.kind"),
    ({"sources": "some"}, "transfer.sources"),
    ({"sources": [1]}, "transfer.sources"),
    ({"norm": "l1"}, "transfer.norm"),
    ({"random_draws": 0}, "random_draws"),
])
def test_bad_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TransferProbe(**kwargs)


def test_matrix_reports_missing_records(tmp_path):
    with pytest.raises(DataError, match="no records of probe 'transfer'"):
        transfer_matrix(tmp_path, "FFA")


def test_a_transfer_run_is_redone_when_new_sources_appear(tmp_path):
    """A finished transfer is stale once the store gains a source run it never weighed."""
    store = ResultsStore(tmp_path)
    W = _readout(0)
    sens = {"experiment_name": "sensitivity"}
    _run(_sensitivity(), _encoder(W, "A"), _context(store, "A", identity_extra=sens))
    target = _context(store, "T", identity_extra={"experiment_name": "transfer"})
    probe = _transfer(sources=[{"experiment_name": "sensitivity"}])
    first = _run(probe, _encoder(W, "T"), target)
    assert set(first.source_model) == {"A"} and not probe.stale(target.store)

    _run(_sensitivity(), _encoder(_readout(1), "C"), _context(store, "C", identity_extra=sens))
    assert probe.stale(target.store)
    again = _run(probe, _encoder(W, "T"), target)
    assert set(again.source_model) == {"A", "C"} and not probe.stale(target.store)
    # A's replayed changes are the same computation as before (the random controls draw from
    # one stream over all sources, so adding a source moves their draws).
    keep = ["source_model", "image_id", "eps", "roi", "metric"]

    def replayed(records):
        return records[~records.metric.str.startswith("random")].set_index(keep).value.sort_index()

    old = replayed(first)
    np.testing.assert_array_equal(replayed(again).loc[old.index], old)
