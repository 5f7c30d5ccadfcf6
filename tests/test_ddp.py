"""Multi-process (DDP) jobs: the test loop's sampler splits the images between ranks, rank 0 writes.

Two CPU ranks over gloo stand in for GPUs, through both ways ranks start in practice: Lightning
relaunching `run.py` itself, and an external launcher (SLURM's srun, simulated by its environment
variables) starting one process per rank.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import REPO, compose_config, isolated

from brainrobust.errors import ConfigError
from brainrobust.pipeline import build_trainer, pinned_devices, run
from brainrobust.probes.base import merge_chunks
from brainrobust.probes.chunks import Chunk
from brainrobust.results.store import ResultsStore

# Deterministic attacks (no random start), so one process and two ranks must agree image by image.
ATTACK = ["roi=[FFA,PPA]", "attack=pgd", "attack.random_start=false", "attack.steps=5"]
PROBES = [
    "probe=[sensitivity,subspace,effect_matched,targeted,transfer]",
    "probe.sensitivity.max_images=9", "probe.sensitivity.random_draws=1",
    "probe.subspace.max_images=3", "probe.subspace.k=3", "probe.subspace.method=exact",
    "probe.effect_matched.max_images=3",
    "probe.targeted.images.n=2", "probe.targeted.attack.steps=4", "probe.targeted.eps_schedule=[0.5,1.0]",
    "probe.targeted.save_media=false", "probe.transfer.max_images=9", "probe.transfer.random_draws=1",
]
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def _chunk(positions, value, eps=(0.1, 0.2, 0.3)):
    ids = np.asarray(positions) + 100
    return Chunk(np.asarray(positions),
                 pd.DataFrame({"image_id": ids, "metric": "s", "value": float(value)}),
                 {"pert": {"delta": np.full((3, len(ids), 4), float(value)), "image_id": ids,
                           "eps": np.array(eps)}})


def test_merge_puts_the_ranks_batches_in_test_order_and_drops_the_samplers_repeats():
    """Two ranks of a distributed sampler over 5 images: rank 0 takes 0, 2, 4 and rank 1 takes
    1, 3 and image 0 again (the padding that evens out the ranks)."""
    ids = np.arange(5) + 100
    chunks = [_chunk([0, 2], 1), _chunk([4], 2), _chunk([1, 3], 3), _chunk([0], 4)]
    records, arrays, _ = merge_chunks(chunks, {"delta": 1, "image_id": 0}, ids)
    assert sorted(records["image_id"]) == ids.tolist()
    assert records.set_index("image_id")["value"].to_dict() == {100: 1, 101: 3, 102: 1, 103: 3, 104: 2}
    assert arrays["pert"]["image_id"].tolist() == ids.tolist()
    assert arrays["pert"]["delta"][0, :, 0].tolist() == [1, 3, 1, 3, 2]
    assert arrays["pert"]["eps"].tolist() == [0.1, 0.2, 0.3]

    chunks[1] = _chunk([4], 2, eps=(0.1, 0.2, 0.4))
    with pytest.raises(RuntimeError, match="eps differs between batches"):
        merge_chunks(chunks, {"delta": 1, "image_id": 0}, ids)


def test_ddp_inside_a_local_multirun_is_refused_in_one_line(monkeypatch):
    from brainrobust import pipeline

    monkeypatch.setattr(pipeline, "multirun_job", lambda: 3)
    cfg = compose_config(*DDP, "logger=none")
    with pytest.raises(ConfigError, match="cannot start its ranks inside a local --multirun"):
        build_trainer(cfg)


def test_single_gpu_jobs_of_a_local_multirun_spread_over_the_gpus():
    one_gpu = {"accelerator": "auto", "devices": 1}
    assert [pinned_devices(one_gpu, job, gpus=4) for job in range(6)] == [[0], [1], [2], [3], [0], [1]]
    assert pinned_devices(one_gpu, 5, gpus=1) == [0]  # SLURM: each job sees only its own GPU
    assert pinned_devices(one_gpu, None, gpus=4) == 1  # a single run keeps Lightning's choice
    assert pinned_devices(one_gpu, 2, gpus=0) == 1  # CPU
    assert pinned_devices({"accelerator": "cpu", "devices": 1}, 2, gpus=4) == 1
    assert pinned_devices({"accelerator": "gpu", "devices": 4}, 2, gpus=8) == 4  # DDP jobs: ranks choose


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "MASTER_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"))}


def _run_py(overrides: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run.py", *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def _only_run(results: Path):
    store = ResultsStore(results)
    (entry,) = store.runs()
    run_store = store.open(entry)
    assert run_store.is_complete()
    return run_store


def _records(store, probe: str) -> pd.DataFrame:
    """A probe's records in a fixed row order, without the run key (which names the trainer)."""
    df = store.read_records(probe).drop(columns=["run_key"])
    keys = [c for c in ("roi", "image_id", "eps", "metric") if c in df.columns]
    return df.sort_values(keys).reset_index(drop=True)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, synthetic_root):
    """The same job in one process, with Lightning starting 2 ranks, and with 2 'srun' ranks.

    Its transfer probe applies a source run's perturbation of the first image only: rank 1's
    share of the images lacks it and must contribute nothing rather than fail.
    """
    root, _ = synthetic_root
    tmp = tmp_path_factory.mktemp("ddp")
    base = isolated(root, tmp) + ATTACK
    run(compose_config(*base, f"paths.results_dir={tmp / 'source'}", "probe=[sensitivity]",
                       "probe.sensitivity.max_images=1"))
    base += [*PROBES, f"probe.transfer.results_dir={tmp / 'source'}"]
    single = run(compose_config(*base, f"paths.results_dir={tmp / 'single'}"))

    # Cold caches: the ranks extract the features and fit the readout themselves (two ranks
    # share the cores, so their float sums differ from one process's in the last bits).
    lightning = _run_py(base + DDP + [f"paths.results_dir={tmp / 'lightning'}",
                                      f"paths.cache_dir={tmp / 'cold_cache'}"], _clean_env())
    out = _finish(lightning)
    srun_out = [_finish(p) for p in _srun(base + DDP + [f"paths.results_dir={tmp / 'srun'}",
                                                        f"paths.cache_dir={tmp / 'cold_cache_srun'}"])]
    return {"single": single, "lightning": _only_run(tmp / "lightning"), "srun": _only_run(tmp / "srun"),
            "out": out, "srun_out": srun_out, "isolated": isolated(root, tmp), "tmp": tmp}


def _srun(argv: list[str]) -> list[subprocess.Popen]:
    """Two ranks started the way SLURM's srun starts them: one process each, ranks in the env."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _clean_env() | {
            "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "brainrobust", "SLURM_NODELIST": "localhost", "MASTER_PORT": port}
        procs.append(_run_py(argv, env))
    return procs


@pytest.mark.slow  # several ranks as real processes
def test_two_ranks_write_one_run_that_matches_one_process(ddp_runs):
    single, ddp = ddp_runs["single"], ddp_runs["lightning"]
    # Rank 0 alone printed the summary table; each rank attacked its share of the 9 images.
    assert ddp_runs["out"].count("records:") == 1
    assert "probe sensitivity: rank 0 of 2 did 5 images" in ddp_runs["out"]
    assert "probe sensitivity: rank 1 of 2 did 4 images" in ddp_runs["out"]
    assert sorted(p.name for p in ddp.records_dir.iterdir()) == sorted(
        p.name for p in single.records_dir.iterdir())

    pd.testing.assert_frame_equal(_records(ddp, "predictivity"), _records(single, "predictivity"))
    for probe, metrics in (("sensitivity", ["r_clean", "r_adv", "s", "norm"]),
                           ("effect_matched", ["eps_found", "reached"]),
                           ("transfer", ["target_change", "source_change", "ratio", "delta_norm"]),
                           ("subspace", ["sigma_1", "sigma_2", "sigma_3"])):
        a, b = _records(ddp, probe), _records(single, probe)
        assert len(a) == len(b) and a["image_id"].tolist() == b["image_id"].tolist(), probe
        a, b = a[a.metric.isin(metrics)], b[b.metric.isin(metrics)]
        np.testing.assert_allclose(a["value"], b["value"], rtol=2e-3, atol=1e-5, err_msg=probe)
    # Targeted needs every image at once: rank 0 ran it whole, exactly as one process does.
    pd.testing.assert_frame_equal(_records(ddp, "targeted"), _records(single, "targeted"))

    for name, axis in (("perturbations_FFA_l2", 1), ("subspace_PPA", 0)):
        merged, whole = ddp.load_array(name), single.load_array(name)
        assert merged["image_id"].tolist() == whole["image_id"].tolist()
        key = "delta" if "delta" in whole else "P"
        assert merged[key].shape == whole[key].shape
        assert merged[key].shape[axis] == len(whole["image_id"])


@pytest.mark.slow  # several ranks as real processes
def test_srun_ranks_give_the_same_records_as_lightning_ranks(ddp_runs):
    assert sum(out.count("records:") for out in ddp_runs["srun_out"]) == 1
    lightning, srun = ddp_runs["lightning"], ddp_runs["srun"]
    assert srun.key == lightning.key
    for probe in ("predictivity", "sensitivity", "effect_matched", "subspace", "targeted", "transfer"):
        pd.testing.assert_frame_equal(_records(srun, probe), _records(lightning, probe))


@pytest.mark.slow  # several ranks as real processes
def test_an_error_of_a_rank_0_probe_leaves_no_rank_waiting(ddp_runs):
    """Targeted runs on rank 0 after the test loop; its missing start image ends rank 0 with its
    line, and rank 1, which has nothing to wait for, ends too."""
    tmp = ddp_runs["tmp"]
    argv = ddp_runs["isolated"] + ATTACK + DDP + [
        f"paths.results_dir={tmp / 'failing'}", "probe=[targeted]", "probe.targeted.save_media=false",
        "~probe.targeted.images", f"+probe.targeted.images=[{tmp / 'missing.png'}]"]
    procs = _srun(argv)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 0], outs
    assert "error: image file" in outs[0] and "missing.png not found" in outs[0]
    assert "Traceback" not in outs[0] + outs[1]


def test_no_probe_shadows_the_base_class_machinery():
    """A probe's own helper named like one of Probe's (an effect-matched `_attempt` did once)
    silently replaces the DDP and resume machinery: only the public hooks may be overridden."""
    from brainrobust import probes
    from brainrobust.probes.base import Probe

    for module in ("sensitivity", "transfer", "effect_matched", "subspace", "targeted", "mei",
                   "insilico"):
        __import__(f"{probes.__name__}.{module}")
    private = {name for name in vars(Probe) if name.startswith("_") and not name.startswith("__")}
    for cls in Probe.__subclasses__():
        assert not private & set(vars(cls)), (cls.__name__, private & set(vars(cls)))
