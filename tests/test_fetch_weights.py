"""`python -m brainrobust fetch weights` against a local server holding small checkpoints.

The server (tests/http_server.py) holds, at the zoo's real URLs, a MadryLab-format checkpoint
for robust_resnet50_eps3 and a hub-format model.safetensors for resnet18, both of timm's
`test_resnet` (0.5 M parameters) so the tests stay fast: the zoo entries load them with
model.arch=test_resnet. MadryLab files come through brainrobust's HTTP client, timm files
through huggingface_hub pointed at the same server.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers import REPO, one_line_error
from http_server import FolderServer
from safetensors.torch import save_file

from brainrobust.cli import main
from brainrobust.errors import WeightsError
from brainrobust.fetch import http
from brainrobust.files import sha256_file
from brainrobust.models.backbones import build_backbone
from brainrobust.models.weights import LOCK_FILE, read_lock, resolve_weights
from brainrobust.models.zoo import get_spec

MADRY = "madrylab/robust-imagenet-models/resolve/main/resnet50_l2_eps3.ckpt"
HUB = "timm/resnet18.tv_in1k/resolve/main/model.safetensors"
NAMES = ("robust_resnet50_eps3", "resnet18")


def network(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The server's folder, and the networks its two checkpoints hold."""
    folder = tmp_path_factory.mktemp("published")
    madry, hub = network(1), network(2)
    state = {}
    for key, value in madry.state_dict().items():
        state[f"module.model.{key}"] = value
        state[f"module.attacker.model.{key}"] = value + 1
    state["module.normalizer.new_mean"] = torch.zeros(3, 1, 1)
    (folder / MADRY).parent.mkdir(parents=True)
    torch.save({"model": state, "epoch": 90}, folder / MADRY)
    (folder / HUB).parent.mkdir(parents=True)
    save_file(hub.state_dict(), folder / HUB)
    return folder, {"robust_resnet50_eps3": madry, "resnet18": hub}


@pytest.fixture
def server(published, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(http, "BACKOFF", 0.0)
    with FolderServer(published[0]) as srv:
        yield srv


def fetch(weights, server_url, *names):
    main(["fetch", "weights", *names, "--weights-dir", str(weights), "--base-url", server_url])


def small(name: str):
    return dataclasses.replace(get_spec(name), arch="test_resnet")


def test_fetched_weights_are_locked_listed_and_load_offline(tmp_path, published, server, capsys):
    weights = tmp_path / "weights"
    fetch(weights, server.url, *NAMES)
    lock = read_lock(weights)
    for name, rel in zip(NAMES, (MADRY, HUB)):
        local = weights / get_spec(name).filename
        assert local.read_bytes() == (published[0] / rel).read_bytes()
        assert lock[local.name]["sha256"] == sha256_file(local)
        assert lock[local.name]["source"] == f"{server.url}/{rel}"
    main(["models", "--weights-dir", str(weights)])
    listing = {line.split()[0]: line.split()[2] for line in capsys.readouterr().out.splitlines()
               if not line.startswith("weights:")}
    assert listing["robust_resnet50_eps3"] == listing["resnet18"] == "verified"
    assert listing["resnet50"] == "missing" and listing["tiny_cnn_random"] == "random"
    server.__exit__()  # offline from here on
    for name in NAMES:
        backbone = build_backbone(small(name), weights)
        for key, value in published[1][name].state_dict().items():
            assert torch.equal(backbone.state_dict()[key], value), (name, key)


def test_a_broken_off_checkpoint_download_resumes(tmp_path, published, server):
    weights = tmp_path / "weights"
    server.drop_after[MADRY] = 300_000
    fetch(weights, server.url, "robust_resnet50_eps3")
    ranges = [r for m, p, r in server.requests if m == "GET" and p.endswith(MADRY)]
    assert ranges == [None, "bytes=300000-"]
    assert (weights / "resnet50_l2_eps3.ckpt").read_bytes() == (published[0] / MADRY).read_bytes()


def test_a_broken_off_hub_download_is_retried(tmp_path, published, server):
    """huggingface_hub retries itself; it resumes from what it wrote, in 10 MB pieces."""
    weights = tmp_path / "weights"
    server.drop_after[HUB] = 200_000
    fetch(weights, server.url, "resnet18")
    assert len([r for m, p, r in server.requests if m == "GET" and p.endswith(HUB)]) == 2
    assert (weights / get_spec("resnet18").filename).read_bytes() == \
        (published[0] / HUB).read_bytes()


def test_a_changed_file_is_refused_by_runs_fetch_and_listed(tmp_path, server, capsys):
    weights = tmp_path / "weights"
    fetch(weights, server.url, "robust_resnet50_eps3")
    local = weights / "resnet50_l2_eps3.ckpt"
    recorded = read_lock(weights)[local.name]["sha256"]
    with open(local, "ab") as fh:
        fh.write(b"\0")
    expected = (f"refused: {local} has sha256 {sha256_file(local)} but the lock file recorded "
                f"{recorded} on first download; delete it and fetch again if the source changed")
    with pytest.raises(WeightsError) as err:
        build_backbone(small("robust_resnet50_eps3"), weights)
    assert str(err.value) == expected
    argv = ["fetch", "weights", "robust_resnet50_eps3", "--weights-dir", str(weights)]
    assert one_line_error(capsys, argv) == f"error: {expected}"
    main(["models", "--weights-dir", str(weights)])
    assert " CHANGED " in next(line for line in capsys.readouterr().out.splitlines()
                               if line.startswith("robust_resnet50_eps3 "))


def test_a_file_put_there_by_hand_is_trusted_once_then_verified(tmp_path, published, capsys):
    weights = tmp_path / "weights"
    weights.mkdir()
    local = weights / "resnet50_l2_eps3.ckpt"
    local.write_bytes((published[0] / MADRY).read_bytes())
    main(["fetch", "weights", "robust_resnet50_eps3", "--weights-dir", str(weights)])
    entry = read_lock(weights)[local.name]
    assert entry["sha256"] == sha256_file(local) and entry["source"] == "found in place"
    assert "verified" in capsys.readouterr().out


@pytest.mark.parametrize("argv,words", [
    (["robust_resnet50_eps33"], "unknown model 'robust_resnet50_eps33' (did you mean"),
    ([], "name the models to fetch (python -m brainrobust models lists them) or pass --all"),
    (["resnet18", "--all"], "or pass --all, not both"),
    (["resnet18", "--base-url", "notaurl"], "--base-url must be an http:// or https:// address"),
])
def test_mistakes_are_one_line(tmp_path, capsys, argv, words):
    line = one_line_error(capsys, ["fetch", "weights", *argv, "--weights-dir", str(tmp_path)])
    assert words in line


def test_server_errors_are_one_line(tmp_path, server, capsys):
    (tmp_path / "site" / MADRY).parent.mkdir(parents=True)
    with FolderServer(tmp_path / "site") as other:  # 404 for both sources
        for name, words in (("robust_resnet50_eps3", "answered HTTP 404 Not Found"),
                            ("resnet18", "through huggingface_hub failed")):
            line = one_line_error(capsys, ["fetch", "weights", name, "--weights-dir",
                                           str(tmp_path / "w"), "--base-url", other.url])
            assert words in line and other.url in line
        (tmp_path / "site" / MADRY).write_text("<html>Service Unavailable</html>")
        line = one_line_error(capsys, ["fetch", "weights", "robust_resnet50_eps3",
                                       "--weights-dir", str(tmp_path / "w"), "--base-url",
                                       other.url])
    assert "is not a usable MadryLab checkpoint" in line
    assert not [p for p in (tmp_path / "w").iterdir() if p.name != LOCK_FILE]


def test_the_missing_weights_error_names_the_fetch_command(tmp_path):
    with pytest.raises(WeightsError) as err:
        resolve_weights(get_spec("robust_resnet50_eps3"), tmp_path)
    assert str(err.value).startswith(
        "weights for robust_resnet50_eps3 not found: run python -m brainrobust fetch weights "
        f"robust_resnet50_eps3 --weights-dir {tmp_path} where there is network")


@pytest.mark.slow
def test_a_run_on_an_offline_node_needs_nothing_more(tmp_path, server):
    """fetch weights, stop the server, then python run.py with the hub offline."""
    weights = tmp_path / "weights"
    fetch(weights, server.url, "robust_resnet50_eps3")
    server.__exit__()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": server.url}
    out = subprocess.run(
        [sys.executable, "run.py", "model=robust_resnet50_eps3", "model.arch=test_resnet",
         f"paths.weights_dir={weights}", f"paths.cache_dir={tmp_path / 'cache'}",
         f"paths.results_dir={tmp_path / 'results'}", f"paths.log_dir={tmp_path / 'logs'}",
         "logger=none", "trainer.enable_progress_bar=false", "attack.steps=2",
         "probe.sensitivity.max_images=2", "probe.sensitivity.random_draws=1"],
        cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(Path(tmp_path / "results").rglob("DONE"))
