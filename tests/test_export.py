"""Stimulus export (`python -m brainrobust export`): the round trip from the written PNGs to the
manifest's checksums and predictions, byte-identical re-export, the in-silico probe's array
set, held-out encoders, and the one-line refusals."""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import config_maker, one_line_error
from PIL import Image

from brainrobust.cli import main
from brainrobust.data.datamodule import to_float_images
from brainrobust.data.nsd import resize_images
from brainrobust.export.encoders import Place, rebuild
from brainrobust.export.manifest import conditions
from brainrobust.export.pixels import enlarge, native_versions
from brainrobust.export.sources import INSILICO_ARRAY
from brainrobust.models.build import build, build_encoder
from brainrobust.models.encoder import BrainEncoder
from brainrobust.pipeline import run
from brainrobust.probes.image_selection import predicted_responses
from brainrobust.results.store import ResultsStore

EPS32 = float(np.finfo(np.float32).eps)
# A written pixel is round(255 x) / 255: at most half a level from x, plus the float32 rounding
# of 255 x (half an ulp of a value <= 255, i.e. 255 * EPS32 / 2 in level units).
QUANTISATION = (0.5 + 255 * EPS32 / 2) / 255
# Model size 32 against the twin's native 64: both files of every stimulus are written.
MODEL_SIZE = 32
ROIS = "roi=[FFA,PPA]"


@pytest.fixture(scope="module")
def store(synthetic_root, tmp_path_factory):
    """Run A (subject 1: targeted + MEI) and run B (subject 2: no probe, then the in-silico
    probe's array set written into it as that probe would), sharing data and ROIs."""
    tmp = tmp_path_factory.mktemp("export")
    root = synthetic_root[0]
    make = config_maker(root, tmp, f"data.image_size={MODEL_SIZE}", "print_table=false", ROIS)
    a_cfg = make("probe=[targeted,mei]", "probe.targeted.images.n=2",
                 "probe.targeted.attack.steps=4", "probe.targeted.eps_schedule=[0.1,1.0]",
                 "probe.targeted.save_media=false", "probe.mei.seeds=1", "probe.mei.steps=4",
                 "probe.mei.save_media=false", "probe.mei.max_images=8")
    a = run(a_cfg)
    b_cfg = make("probe=[]", "subject=2")
    b = run(b_cfg)
    _write_insilico(b, b_cfg)
    place = ["--root", str(tmp / "results"), "--data-root", str(root),
             "--cache-dir", str(tmp / "cache")]
    return {"tmp": tmp, "a": a, "b": b, "a_cfg": a_cfg, "place": place,
            "Place": Place(str(root), str(tmp / "cache"))}


def _write_insilico(store_run, cfg):
    """Three test images nudged by 0.1 in L2 and one noise stimulus without a source image, in
    the in-silico probe's format."""
    dm = build(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup()
    sources = torch.cat([dm.image_tensor("test")[:3], torch.full((1, 3, MODEL_SIZE, MODEL_SIZE), 0.5)])
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(sources.shape, generator=g)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    images = (sources + 0.1 * direction).clamp(0, 1)
    store_run.save_array(INSILICO_ARRAY, {
        "images": images.numpy(), "source_images": sources.numpy(),
        "image_id": np.array([*dm.test.ids[:3], -1], np.int64),
        "method": np.array(["targeted_increase", "targeted_increase", "noise", "noise"]),
        "norm": np.array(["l2"] * 4), "budget": np.full(4, 0.1, np.float32),
        "achieved_norm": (images - sources).flatten(1).norm(dim=1).numpy(),
        "converged": np.array([True, False, True, True]), "roi": np.array(["FFA", "PPA", "FFA", "FFA"]),
    })


def _export(store, source, out, *extra):
    main(["export", source, "--out", str(out), *store["place"], *extra])
    return pd.read_csv(out / "manifest.csv", keep_default_na=False, dtype=str)


def _num(column):
    return pd.to_numeric(column.replace("", np.nan))


def _encoder(cfg) -> BrainEncoder:
    """Run A's encoder built from the test's own config (not from what the run stored)."""
    dm = build(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup()
    return build_encoder(cfg, build(cfg.model), dm).eval()


def _roi_means(encoder, pngs, roi):
    """The encoder's response to written files as the data loader would read them."""
    x = to_float_images(resize_images(pngs, encoder.input_size))
    return predicted_responses(encoder, x, roi).double().numpy()


@pytest.mark.slow
def test_round_trip_pngs_give_the_manifest_checksums_and_predictions(store):
    out = store["tmp"] / "set"
    manifest = _export(store, store["a"].key, out, "--repetitions", "3")
    assert {"README.md", "manifest.csv", "manifest.json", "conditions.csv", "contact_sheet.png",
            "stimuli"} == {p.name for p in out.iterdir()}
    pngs = {f: np.asarray(Image.open(out / f).convert("RGB")) for f in manifest["file"]}
    for f, sha in zip(manifest["file"], manifest["sha256"]):
        assert hashlib.sha256((out / f).read_bytes()).hexdigest() == sha
    assert set(manifest["size_px"]) == {"32", "64"}
    assert (manifest["role"] == "model").sum() == (manifest["role"] == "native").sum()

    # The model-size files are the probe's float stimuli rounded to 8 bits.
    arrays = store["a"].load_array("targeted_FFA_decrease")
    made = manifest[manifest["method"] == "targeted_decrease"]
    model_rows = made[made["role"] == "model"]
    assert len(model_rows) == 2 * 2  # 2 start images x 2 budgets
    floats = arrays["images"][:, 1:].astype(np.float32).reshape(-1, 3, MODEL_SIZE, MODEL_SIZE)
    written = to_float_images(np.stack([pngs[f] for f in model_rows["file"]])).numpy()
    assert np.abs(written - floats).max() <= QUANTISATION
    assert _num(model_rows["budget"]).tolist() == [0.1, 1.0, 0.1, 1.0]

    # The manifest's predictions are those of the run's encoder on the re-read files.
    encoder = _encoder(store["a_cfg"])
    for size in ("32", "64"):
        stimuli = manifest[(manifest["method"] != "original") & (manifest["size_px"] == size)]
        files = np.stack([pngs[f] for f in stimuli["file"]])
        sources = np.stack([pngs[f] for f in stimuli["source_file"]])
        for roi in ("FFA", "PPA"):
            r, r0 = _roi_means(encoder, files, roi), _roi_means(encoder, sources, roi)
            # The export predicts in other batches: each float32 response may differ in its
            # last bits (reduction order), a couple of ulps of the larger response each.
            scale = max(1.0, np.abs(r).max(), np.abs(r0).max())
            np.testing.assert_allclose(_num(stimuli[f"pred_change_source_{roi}"]), r - r0,
                                       rtol=0, atol=4 * EPS32 * scale)
        # Written norm: what the encoder sees of the two files, at the model's size.
        seen = to_float_images(resize_images(files, MODEL_SIZE)).double()
        seen0 = to_float_images(resize_images(sources, MODEL_SIZE)).double()
        np.testing.assert_allclose(_num(stimuli["written_norm"]),
                                   (seen - seen0).flatten(1).norm(dim=1), rtol=1e-12)
        # Kept fraction: the written perturbation projected on the float one the probe made.
        targeted = np.flatnonzero(stimuli["method"] == "targeted_decrease")
        intended = torch.from_numpy(floats - np.repeat(
            arrays["images"][:, :1].astype(np.float32), 2, axis=1).reshape(floats.shape)).double()
        kept = ((seen - seen0)[targeted] * intended).flatten(1).sum(1) / intended.flatten(1).pow(2).sum(1)
        np.testing.assert_allclose(_num(stimuli["kept_fraction"]).iloc[targeted], kept, rtol=1e-9)
    stimuli = manifest[manifest["method"] != "original"]
    assert np.allclose(_num(stimuli["norm_survival"]),
                       _num(stimuli["written_norm"]) / _num(stimuli["achieved_norm"]))

    # Native-size originals with an NSD id are the dataset's own images.
    originals = manifest[(manifest["method"] == "original") & (manifest["role"] == "native")]
    with_id = originals[originals["nsd_image_id"] != ""]
    dm = build(store["a_cfg"].data, _convert_="all")
    dm.prepare_data()
    dm.setup()
    own = dm.loader.__class__(dm.root).images(with_id["nsd_image_id"].astype(int).to_numpy())
    assert np.array_equal(np.stack([pngs[f] for f in with_id["file"]]), own)

    # The conditions file: every presented file 3 times, in the recorded seed's order.
    cond = pd.read_csv(out / "conditions.csv")
    presented = manifest.loc[manifest["role"] == "native", "file"]
    assert sorted(cond["image"]) == sorted(list(presented) * 3)
    assert sorted(cond["repetition"].unique()) == [1, 2, 3]
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["seed"] == 0 and meta["repetitions"] == 3
    assert [r["sha256"] for r in meta["files"]] == list(manifest["sha256"])


def _fp16_half_ulp(x: torch.Tensor) -> torch.Tensor:
    """Half the fp16 spacing at each value of x in [0, 1] (subnormals below 2^-14)."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**-14)))
    return 2.0 ** (exponent - 11)


@pytest.mark.slow
def test_the_rebuilt_encoder_is_the_runs_encoder(store):
    """Rebuilt from run.json alone, it equals the encoder the test's config builds, and it
    predicts what the run stored for its trajectories."""
    rebuilt = rebuild(store["a"], store["Place"])
    assert rebuilt.native_size == 64
    arrays = store["a"].load_array("targeted_FFA_decrease")
    images = torch.from_numpy(arrays["images"].astype(np.float32)).flatten(0, 1)
    own = _encoder(store["a_cfg"])
    for k, roi in enumerate(arrays["rois"]):
        got = predicted_responses(rebuilt.encoder, images, str(roi))
        assert torch.equal(got, predicted_responses(own, images, str(roi)))
        # The run predicted on float32 images the store then kept as fp16, with the responses:
        # the image rounding moves r by at most sum |dr/dx| x half an fp16 ulp to first order
        # (doubled for the curvature over that step), the response rounding by 2^-11 of r.
        x = images.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(rebuilt.encoder.roi_response(x, str(roi)).sum(), x)
        first_order = (grad.abs() * _fp16_half_ulp(images)).flatten(1).sum(1)
        stored = torch.from_numpy(arrays["responses"][..., k].astype(np.float32)).flatten()
        assert ((got - stored).abs() <= 2 * first_order + stored.abs() * 2.0**-11).all()


@pytest.mark.slow
def test_reexport_is_byte_identical_and_never_overwrites_silently(store, capsys):
    first, second = store["tmp"] / "first", store["tmp"] / "second"
    _export(store, store["a"].key, first, "--seed", "7")
    _export(store, str(store["a"].dir), second, "--seed", "7")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    capsys.readouterr()
    line = one_line_error(capsys, ["export", store["a"].key, "--out", str(first), *store["place"]])
    assert "is not empty" in line and "--force" in line
    before = (first / "manifest.csv").read_bytes()
    _export(store, store["a"].key, first, "--force")  # seed 0: another order, same stimuli
    assert (first / "manifest.csv").read_bytes() == before
    assert (first / "conditions.csv").read_bytes() != (second / "conditions.csv").read_bytes()
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".first.")]


@pytest.mark.slow
def test_insilico_array_set_and_heldout_encoders(store):
    """A results folder exports every run; each run's stimuli are predicted by the other run's
    encoder (same data and ROIs, another subject) as held out."""
    out = store["tmp"] / "whole_store"
    manifest = _export(store, str(store["tmp"] / "results"), out)
    insilico = manifest[manifest["run_key"] == store["b"].key]
    model = insilico[insilico["role"] == "model"]
    assert model["method"].tolist() == ["targeted_increase", "targeted_increase", "noise", "noise"]
    assert model["converged"].tolist() == ["True", "False", "True", "True"]
    assert model["roi"].tolist() == ["FFA", "PPA", "FFA", "FFA"]
    assert model["nsd_image_id"].iloc[-1] == "" and model["subject"].unique().tolist() == ["2"]
    # Stimuli of run B: run A's encoder (subject 1) is held out, run B's own column is blank.
    assert (insilico["pred_change_tiny_cnn_random_s1_FFA"] != "").all()
    assert (insilico["pred_change_tiny_cnn_random_s2_FFA"] == "").all()
    from_a = manifest[manifest["run_key"] == store["a"].key]
    assert (from_a["pred_change_tiny_cnn_random_s2_PPA"] != "").all()
    assert (from_a["pred_change_tiny_cnn_random_s1_PPA"] == "").all()
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["heldout_encoders"] == {"tiny_cnn_random_s1": store["a"].key,
                                        "tiny_cnn_random_s2": store["b"].key}
    # 8-bit rounding of a 0.1 L2 perturbation spread over 3 x 32 x 32 pixels (0.46 levels a
    # pixel on average) zeroes most pixels: fewer written pixels differ from the source's.
    files = [np.asarray(Image.open(out / f).convert("RGB")) for f in model["file"]]
    sources = [np.asarray(Image.open(out / f).convert("RGB")) for f in model["source_file"]]
    changed = np.mean([(f != s0).mean() for f, s0 in zip(files, sources)])
    assert 0 < changed < 0.5
    assert np.isfinite(_num(model["kept_fraction"])).all()


def test_unknown_run_key_is_one_line(tmp_path, capsys):
    line = one_line_error(capsys, ["export", "abc123", "--root", str(tmp_path / "results"),
                                   "--out", str(tmp_path / "out")])
    assert "no run or sweep 'abc123'" in line and "python -m brainrobust list" in line
    assert not (tmp_path / "out").exists()


def test_run_without_stimuli_is_one_line(tmp_path, capsys):
    run_store = ResultsStore(tmp_path / "results").run({"x": 1}, {"model": "m", "subject": 1})
    run_store.write_records("predictivity", pd.DataFrame({"metric": ["r"], "value": [0.5]}))
    line = one_line_error(capsys, ["export", run_store.key, "--root", str(tmp_path / "results"),
                                   "--out", str(tmp_path / "out")])
    assert "holds no stimuli" in line and "probe=[targeted]" in line
    assert not (tmp_path / "out").exists()


def test_non_empty_out_dir_is_refused_before_anything_is_read(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    line = one_line_error(capsys, ["export", "anything", "--out", str(tmp_path / "out")])
    assert "pass --force" in line
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_a_zero_perturbation_gives_the_native_source_exactly():
    g = torch.Generator().manual_seed(1)
    native = torch.randint(0, 256, (2, 3, 20, 20), generator=g).float().div(255).numpy()
    small = torch.rand(2, 3, 8, 8, generator=g).numpy()
    out = native_versions(small, small, native, 20)
    assert np.array_equal(out, np.round(native * 255).astype(np.uint8).transpose(0, 2, 3, 1))
    # Lanczos weights sum to one: a constant image stays constant when enlarged.
    flat = enlarge(np.full((1, 3, 8, 8), 0.25, np.float32), 20)
    assert np.abs(flat - 0.25).max() <= 4 * EPS32


def test_conditions_order_follows_the_seed():
    rows = [{"role": "native", "file": f"f{i}.png", "condition": "c", "stimulus": f"s{i}"}
            for i in range(6)] + [{"role": "model", "file": "m.png", "condition": "c", "stimulus": "s0"}]
    a, b, c = conditions(rows, 3, 2), conditions(rows, 3, 2), conditions(rows, 4, 2)
    assert a.equals(b) and not a.equals(c)
    assert sorted(a["image"]) == sorted([f"f{i}.png" for i in range(6)] * 2)
