"""End to end on the synthetic twin: config -> data -> encoder -> probes -> results store."""

import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, config_maker, isolated

import brainrobust.models.features as features_mod
from brainrobust.models.readout import pearson_r
from brainrobust.models.ridge import fit_ridge
from brainrobust.pipeline import run
from brainrobust.results.store import load
from brainrobust.summary import summary_tables


@pytest.fixture
def make_cfg(tmp_path, synthetic_root):
    return config_maker(synthetic_root[0], tmp_path, "attack.steps=5",
                        "probe.sensitivity.max_images=6", "probe.sensitivity.random_draws=2")


@pytest.fixture
def count_backbone_passes(monkeypatch):
    calls = []
    real = features_mod._predict

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(features_mod, "_predict", counting)
    return calls


def test_default_run_writes_records_and_resumes(make_cfg, count_backbone_passes):
    cfg = make_cfg()
    store = run(cfg)
    assert store.is_complete()
    pred = store.read_records("predictivity")
    r_ffa = pred[(pred.metric == "r_roi_mean") & (pred.roi == "FFA")].value.item()
    assert r_ffa > 0.5, "the default small model should predict the planted FFA responses"
    sens = store.read_records("sensitivity")
    assert set(sens.eps.unique()) == set(cfg.epsilon.ladder)
    assert sens.image_id.nunique() == 6
    adv = sens[sens.metric == "abs_s"].groupby("eps").value.mean()
    rnd = sens[sens.metric == "random_abs_s"].groupby("eps").value.mean()
    assert (adv > 5 * rnd).all(), "the attack must beat random noise of the same norm"
    assert adv.is_monotonic_increasing
    # The float32 projection onto the L2 ball and the recorded float32 norm each sum D squares
    # (D pixels): each within (D + 3) eps of the exact norm, so the record within twice that of eps
    pixels = int(np.prod(store.load_array("perturbations_FFA_l2")["delta"].shape[2:]))
    norm = sens[sens.metric == "norm"]
    slack = 2 * (pixels + 3) * float(np.finfo(np.float32).eps) * norm.eps
    assert (norm.value <= norm.eps + slack).all()
    tables = summary_tables([store])
    assert {"model", "subject", "roi", "r", "n_images"} <= set(tables["predictivity"].columns)
    assert len(tables["predictivity"]) == 1
    assert len(tables["sensitivity"]) == len(cfg.epsilon.ladder)
    passes = len(count_backbone_passes)
    assert passes >= 1

    # Rerun: the run is complete, nothing is recomputed.
    again = run(cfg)
    assert again.key == store.key and len(count_backbone_passes) == passes

    # Another probe setting is another run, but the readout (and features) come from the cache.
    other = run(make_cfg("probe.sensitivity.objective=increase"))
    assert other.key != store.key and other.is_complete()
    assert len(count_backbone_passes) == passes
    merged = load(store.dir.parent.parent, probe="sensitivity")
    assert merged.run_key.nunique() == 2


def test_interrupted_run_resumes_at_missing_probe(make_cfg):
    cfg = make_cfg()
    store = run(cfg)
    first = store.read_records("sensitivity")
    (store.dir / "DONE").unlink()
    store.records_path("predictivity").unlink()
    again = run(cfg)
    assert again.is_complete() and again.has_records("predictivity")
    # The probe that had finished was not redone: its file is the same.
    assert again.read_records("sensitivity").equals(first)


def test_same_config_and_seed_give_identical_records(make_cfg, tmp_path):
    a = run(make_cfg()).read_records("sensitivity")
    b = run(make_cfg(f"paths.results_dir={tmp_path / 'results2'}")).read_records("sensitivity")
    assert a.drop(columns="run_key").equals(b.drop(columns="run_key"))


def test_small_model_beats_shuffled_baseline(make_cfg):
    from hydra.utils import instantiate

    from brainrobust.models.features import build_feature_model, extract_features
    from brainrobust.models.zoo import get_spec

    cfg = make_cfg()
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup()
    net = build_feature_model(get_spec(cfg.model.name))
    feats = {split: extract_features(get_spec(cfg.model.name), net, dm.images(split), getattr(dm, split).ids,
                                     dm.loader.image_source_id, cfg.paths.cache_dir, progress_bar=False)
             for split in ("train", "test")}
    y_train = dm.train.responses
    fit = fit_ridge(feats["train"], y_train)
    shuffled = fit_ridge(feats["train"], np.random.default_rng(0).permutation(y_train))
    r_true = pearson_r(dm.test.responses, feats["test"] @ fit.weights + fit.intercept)
    r_shuf = pearson_r(dm.test.responses, feats["test"] @ shuffled.weights + shuffled.intercept)
    assert np.median(r_true) > 0.3
    assert np.median(r_true) > np.median(r_shuf) + 0.25


def test_wandb_offline_writes_a_run_and_needs_no_network(make_cfg, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # Any attempt to reach a server would hit a closed local port and fail the run.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    store = run(make_cfg("logger=wandb"))
    assert store.is_complete()
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # Every name the shipped dashboard's panels use is in the run's files, and the scalars.
    panels = dashboard_names(REPO / "docs" / "wandb_dashboard.yaml", roi="FFA", norm_eps="l2_eps0.1")
    keys = [b"sensitivity/FFA/l2_eps0.1/abs_s", b"predictivity/FFA/r", b"sensitivity/records",
            b"run_key", *(name.encode() for name in panels)]
    data = settled_payload(next(runs[0].glob("*.wandb")), keys)
    for key in keys:
        assert key in data, key

    # A rerun finds the run complete and still reaches the dashboard: the same W&B run again.
    run(make_cfg("logger=wandb"))
    again = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(again) == 2 and {r.name.rsplit("-", 1)[1] for r in again} == {store.key}
    rerun = next(next(r for r in again if r != runs[0]).glob("*.wandb"))
    assert b"sensitivity/FFA/l2_eps1/abs_s" in settled_payload(rerun, [b"sensitivity/FFA/l2_eps1/abs_s"])


def settled_payload(path, keys, wait=120.0):
    """The run file once W&B's writer process has appended `keys` (it may still be writing when
    the run's `finish` returns on a loaded machine), or as it is after `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        data = wandb_payload(path)
        if all(k in data for k in keys) or time.monotonic() > deadline:
            return data
        time.sleep(1.0)


def wandb_payload(path):
    """The records of a W&B run file joined, without the framing that splits them.

    The file is a log of 32 KiB blocks (a 7-byte file header, then per fragment 4 bytes of
    checksum, 2 of length, 1 of type): a name can straddle a block boundary, so searching the
    raw bytes would miss it.
    """
    raw = path.read_bytes()
    block, out, pos = 32768, bytearray(), 7
    while pos + 7 <= len(raw):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        length = int.from_bytes(raw[pos + 4:pos + 6], "little")
        out += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
    return bytes(out)


def dashboard_names(path, **fill):
    spec = yaml.safe_load(path.read_text())
    names = list(spec["runs_table"]["columns"]) + list(spec["runs_table"]["group_by"])
    for panel in spec["panels"]:
        names += [panel[k] for k in ("x", "y", "metric", "key", "color_by", "group_by") if k in panel]
    return {name.format(**fill) for name in names}


def test_force_redoes_every_probe_of_a_finished_run(make_cfg, monkeypatch):
    from brainrobust.probes.sensitivity import SensitivityProbe

    store = run(make_cfg())
    calls = []
    real = SensitivityProbe.run_batch
    monkeypatch.setattr(SensitivityProbe, "run_batch",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert run(make_cfg()).key == store.key and calls == []
    again = run(make_cfg("force=true"))
    assert again.key == store.key and calls  # one call per test-loop batch


@pytest.mark.slow  # the default attack on 8 images: minutes on 2 cores
def test_readme_main_job_runs_as_a_user_types_it(synthetic_root, tmp_path):
    """`make demo`'s command with its defaults (progress bar, CSV logger), only the files moved
    to tmp."""
    root, _ = synthetic_root
    demo = re.search(r"^DEMO \?= (.*)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1).split()
    out = subprocess.run(
        [sys.executable, "run.py", *demo, f"data.root={root}", f"paths.cache_dir={tmp_path / 'cache'}",
         f"paths.results_dir={tmp_path / 'results'}", f"paths.log_dir={tmp_path / 'logs'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    # What the user reads: the tables with their units, where the records went, and a live bar
    # per probe; none of Lightning's device or advertising notices, no library warnings.
    assert "sensitivity: mean |s| = |r(x) - r(x + delta)|" in out.stdout and "records: " in out.stdout
    assert "predictivity: Pearson r" in out.stdout and "r/sqrt(NC)" in out.stdout
    assert "sensitivity FFA l2 eps 0.1..1" in out.stderr  # the probe's progress bar
    for noise in ("GPU available", "TPU available", "Tip:", "LeafSpec", "Warning"):
        assert noise not in out.stderr + out.stdout, noise
    assert list((tmp_path / "logs").rglob("metrics.csv"))


@pytest.mark.slow
def test_no_progress_bar_when_switched_off(synthetic_root, tmp_path):
    """trainer.enable_progress_bar=false (set by `isolated`) silences every bar: the test loop,
    feature extraction and the probes."""
    root, _ = synthetic_root
    out = subprocess.run(
        [sys.executable, "run.py", *isolated(root, tmp_path), "probe.sensitivity.max_images=4"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "it/s" not in out.stderr and "img/s" not in out.stderr and "%|" not in out.stderr


def test_per_image_probes_work_on_the_test_loops_batches(make_cfg, monkeypatch):
    """Sensitivity takes the test loop's batches (data.batch_size) up to its max_images; its
    batches' arrays come out as one piece and the kept batches are gone once it is written."""
    from brainrobust.probes.sensitivity import SensitivityProbe

    sizes = []
    real = SensitivityProbe.run_batch

    def counting(self, encoder, ctx, images, ids):
        assert torch.is_grad_enabled()  # Lightning's loop runs under no_grad; probes need autograd
        sizes.append(len(ids))
        return real(self, encoder, ctx, images, ids)

    monkeypatch.setattr(SensitivityProbe, "run_batch", counting)
    store = run(make_cfg("data.batch_size=4", "probe.sensitivity.max_images=10"))
    assert sizes == [4, 4, 2]
    ids = store.load_array("perturbations_FFA_l2")["image_id"]
    assert len(ids) == 10 and set(ids) == set(store.read_records("sensitivity").image_id)
    assert store.load_array("perturbations_FFA_l2")["delta"].shape[1] == 10 and not (store.dir / "partial" / "sensitivity-1ranks").exists()


def test_a_test_loop_cut_short_is_refused_not_merged(make_cfg):
    from brainrobust.errors import DataError

    with pytest.raises(DataError, match="handed over 2 of its 6 images"):
        run(make_cfg("+trainer.limit_test_batches=1", "data.batch_size=2"))


def test_every_attacking_probe_takes_its_runtime_from_one_place(make_cfg, monkeypatch):
    """Sensitivity, effect-matched and targeted attacks all get `AttackRuntime.auto` with their
    own amp and compile settings (bf16 + channels_last on a GPU, fp32 here)."""
    import sys

    from brainrobust.probes.attack_config import AttackRuntime

    calls = set()
    real = AttackRuntime.auto.__func__

    def spy(cls, device, compile=False, amp=True):
        calls.add((sys._getframe(1).f_globals["__name__"].rsplit(".", 1)[-1], amp, compile))
        return real(cls, device, compile=compile, amp=amp)

    monkeypatch.setattr(AttackRuntime, "auto", classmethod(spy))
    run(make_cfg("probe=[sensitivity,effect_matched,targeted]", "probe.sensitivity.max_images=1",
                 "probe.effect_matched.max_images=1", "probe.effect_matched.amp=false",
                 "probe.targeted.images.n=1", "probe.targeted.eps_schedule=[0.5]",
                 "probe.targeted.attack.steps=2", "probe.targeted.save_media=false"))
    assert calls == {("sensitivity", True, False), ("effect_matched", False, False),
                     ("targeted", True, False)}
