"""Weights: MadryLab checkpoints, hub-format files, checksums, refusals and the offline message."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from brainrobust.errors import WeightsError
from brainrobust.files import sha256_file
from brainrobust.models.backbones import FACTORIES, build_architecture, build_backbone
from brainrobust.models.weights import (
    load_madry_state_dict,
    load_state_dict_file,
    load_state_dict_into,
    read_checkpoint,
    resolve_weights,
    weights_identity,
)
from brainrobust.models.zoo import ModelSpec, get_spec

MADRY_URL = (
    "https://huggingface.co/madrylab/robust-imagenet-models/resolve/main/resnet18_l2_eps3.ckpt"
)


def madry_spec(**change) -> ModelSpec:
    """A MadryLab-family spec on ResNet-18, small enough for CPU tests."""
    fields = {
        "name": "madry_resnet18_test",
        "family": "madry",
        "arch": "resnet18",
        "layer": "layer4",
        "url": MADRY_URL,
        "filename": "resnet18_l2_eps3.ckpt",
        "robust": True,
        "train_norm": "l2",
        "train_eps": 3.0,
    }
    return ModelSpec(**{**fields, **change})


def write_madry_checkpoint(path: Path, network: torch.nn.Module, extra: dict | None = None) -> Path:
    """What the robustness library saves: DataParallel(AttackerModel) state plus training state."""
    model_state = {}
    for key, value in network.state_dict().items():
        model_state[f"module.model.{key}"] = value
        model_state[f"module.attacker.model.{key}"] = value + 1  # a different copy: must be dropped
    for prefix in ("module.normalizer", "module.attacker.normalize"):
        model_state[f"{prefix}.new_mean"] = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        model_state[f"{prefix}.new_std"] = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    checkpoint = {
        "model": model_state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
        "schedule": None,
        "epoch": 90,
        **(extra or {}),
    }
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def torchvision_resnet18() -> torch.nn.Module:
    torch.manual_seed(3)
    net = torchvision.models.resnet18()
    # Non-trivial BatchNorm statistics, so a dropped or swapped buffer changes the output.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_madry_checkpoint_loads_into_the_architecture_with_identical_outputs(
    tmp_path, torchvision_resnet18
):
    write_madry_checkpoint(tmp_path / "resnet18_l2_eps3.ckpt", torchvision_resnet18)
    backbone = build_backbone(madry_spec(), weights_dir=tmp_path)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(backbone(x), torchvision_resnet18(x))
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())


def test_load_madry_state_dict_keeps_only_the_model_copy(tmp_path, torchvision_resnet18):
    path = write_madry_checkpoint(tmp_path / "m.ckpt", torchvision_resnet18)
    state = load_madry_state_dict(path)
    assert set(state) == set(torchvision_resnet18.state_dict())
    assert torch.equal(state["conv1.weight"], torchvision_resnet18.conv1.weight)


def test_plain_file_is_not_a_madry_checkpoint(tmp_path, torchvision_resnet18):
    path = tmp_path / "plain.pth"
    torch.save(torchvision_resnet18.state_dict(), path)
    with pytest.raises(WeightsError, match=r"not a MadryLab checkpoint: no module\.model\.\* keys"):
        load_madry_state_dict(path)


class Payload:
    """Stands for any object a pickle could carry (and run code from)."""


@pytest.mark.parametrize(
    "intruder", [argparse.Namespace(arch="resnet18"), Payload()], ids=["namespace", "custom"]
)
def test_pickle_with_a_non_tensor_object_is_refused(tmp_path, torchvision_resnet18, intruder):
    write_madry_checkpoint(
        tmp_path / "resnet18_l2_eps3.ckpt", torchvision_resnet18, extra={"args": intruder}
    )
    with pytest.raises(WeightsError) as err:
        build_backbone(madry_spec(), weights_dir=tmp_path)
    message = str(err.value)
    assert "refused" in message and "model.allow_unsafe_pickle=true" in message
    assert type(intruder).__name__ in message


def test_unsafe_pickle_is_an_explicit_opt_in(tmp_path, torchvision_resnet18):
    extra = {"args": argparse.Namespace(arch="resnet18")}
    write_madry_checkpoint(tmp_path / "resnet18_l2_eps3.ckpt", torchvision_resnet18, extra=extra)
    backbone = build_backbone(madry_spec(allow_unsafe_pickle=True), weights_dir=tmp_path)
    assert torch.equal(backbone.conv1.weight, torchvision_resnet18.conv1.weight)


def test_sha256_is_verified(tmp_path, torchvision_resnet18):
    path = write_madry_checkpoint(tmp_path / "resnet18_l2_eps3.ckpt", torchvision_resnet18)
    build_backbone(madry_spec(sha256=sha256_file(path)), weights_dir=tmp_path)
    with pytest.raises(WeightsError, match=r"sha256 .*model\.sha256=null"):
        build_backbone(madry_spec(sha256="0" * 64), weights_dir=tmp_path)


def test_wrong_architecture_names_missing_unexpected_and_mismatched_keys(
    tmp_path, torchvision_resnet18
):
    path = tmp_path / "r18.safetensors"
    save_file(torchvision_resnet18.state_dict(), path)
    spec = dataclasses.replace(get_spec("resnet50"), weights=str(path))
    with pytest.raises(WeightsError) as err:
        build_backbone(spec)
    message = str(err.value)
    assert "weights do not fit resnet50" in message
    assert (
        "missing (" in message and ".conv3.weight" in message
    )  # bottleneck convs absent in resnet18
    assert (
        "shape mismatches" in message
        and "layer1.0.conv1.weight (64, 64, 3, 3) vs (64, 64, 1, 1)" in message
    )
    assert "\n" not in message


def test_extra_keys_are_named_unexpected(torchvision_resnet18):
    spec = get_spec("resnet18")
    state = {**torchvision_resnet18.state_dict(), "head.proj.weight": torch.zeros(2)}
    with pytest.raises(WeightsError, match=r"1 unexpected \(head\.proj\.weight\)"):
        load_state_dict_into(build_architecture(spec), state, spec)


def test_missing_weights_offline_name_the_url_and_the_path(tmp_path, monkeypatch):
    built: list[str] = []
    monkeypatch.setitem(FACTORIES, "madry", lambda spec: built.append(spec.name))
    spec = get_spec("robust_resnet50_eps3")
    with pytest.raises(WeightsError) as err:
        build_backbone(spec, weights_dir=tmp_path)
    assert str(err.value) == (
        "weights for robust_resnet50_eps3 not found: run python -m brainrobust fetch weights "
        f"robust_resnet50_eps3 --weights-dir {tmp_path} where there is network (or download "
        f"{spec.url} to {tmp_path / spec.filename}, set model.weights=/path, or "
        "model.allow_download=true)")
    assert built == []  # fails before building anything


def test_missing_timm_weights_point_at_the_hub_file(tmp_path):
    spec = get_spec("resnet18")
    with pytest.raises(
        WeightsError,
        match=r"download https://huggingface\.co/timm/resnet18\.tv_in1k/resolve/main/"
        r"model\.safetensors to .*resnet18\.tv_in1k\.safetensors",
    ):
        resolve_weights(spec, tmp_path / "weights", hub_cache_dir=tmp_path / "hub")


def test_missing_local_override_is_named(tmp_path):
    spec = dataclasses.replace(get_spec("resnet18"), weights=str(tmp_path / "nope.pth"))
    with pytest.raises(WeightsError, match=r"model\.weights=.*nope\.pth does not exist"):
        resolve_weights(spec, tmp_path)
    with pytest.raises(WeightsError, match=r"model\.weights=.* is a folder, not a file"):
        resolve_weights(dataclasses.replace(spec, weights=str(tmp_path)), tmp_path)


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_timm_hub_format_local_file_loads(tmp_path, suffix):
    spec = get_spec("resnet18")
    source = build_architecture(dataclasses.replace(spec, seed=7))
    path = tmp_path / f"resnet18.{suffix}"
    if suffix == "safetensors":
        save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    backbone = build_backbone(dataclasses.replace(spec, weights=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key


def test_weights_are_found_in_the_hugging_face_cache(tmp_path):
    spec = get_spec("resnet18")
    repo = tmp_path / "hub" / "models--timm--resnet18.tv_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    cached = repo / "snapshots" / "abc123" / "model.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_weights(spec, tmp_path / "weights", hub_cache_dir=tmp_path / "hub") == cached
    # A file in the weights folder takes precedence over the hub cache.
    local = tmp_path / "weights" / spec.filename
    local.parent.mkdir()
    local.write_bytes(b"y")
    assert resolve_weights(spec, tmp_path / "weights", hub_cache_dir=tmp_path / "hub") == local


def test_opt_in_download_lands_atomically_and_is_verified(tmp_path, torchvision_resnet18):
    source = write_madry_checkpoint(tmp_path / "published.ckpt", torchvision_resnet18)
    weights_dir = tmp_path / "weights"
    spec = madry_spec(
        url=source.as_uri(), allow_download=True
    )  # file:// keeps the test off the network
    with pytest.raises(WeightsError, match="sha256"):
        build_backbone(dataclasses.replace(spec, sha256="0" * 64), weights_dir=weights_dir)
    assert not any(weights_dir.iterdir())  # the wrong file never lands
    backbone = build_backbone(
        dataclasses.replace(spec, sha256=sha256_file(source)), weights_dir=weights_dir
    )
    assert (weights_dir / spec.filename).is_file()
    assert torch.equal(backbone.conv1.weight, torchvision_resnet18.conv1.weight)


@pytest.mark.parametrize("name,content", [
    ("broken.pth", b"\x80\x02not a checkpoint" * 8),
    ("passwd", b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n"),
    ("model.safetensors", bytes(range(256)) * 2),  # header length far beyond the file
])
def test_unreadable_files_are_weights_errors(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="not a readable"):
        load_state_dict_file(path)


def test_dataparallel_prefix_is_stripped(tmp_path, torchvision_resnet18):
    path = tmp_path / "dp.pth"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in torchvision_resnet18.state_dict().items()}},
        path,
    )
    assert set(load_state_dict_file(path)) == set(torchvision_resnet18.state_dict())


def test_weights_identity_follows_the_file(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"a")
    spec = dataclasses.replace(get_spec("resnet18"), weights=str(path))
    first = weights_identity(spec)
    path.write_bytes(b"ab")
    os.utime(path, ns=(1, 1))
    assert weights_identity(spec) != first
    assert weights_identity(dataclasses.replace(spec, sha256="f" * 64)) == "sha256:" + "f" * 64
    assert weights_identity(get_spec("tiny_cnn_random")) == "random-init:tiny_cnn:seed=0"


class _RunsACommand:
    """A pickle whose loading would call os.system: what a malicious checkpoint carries."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_a_checkpoint_that_would_run_code_is_refused_as_unsafe(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"model": _RunsACommand()}, fh)
    with pytest.raises(WeightsError, match="refused as unsafe") as err:
        read_checkpoint(path)
    assert "model.allow_unsafe_pickle=true" in str(err.value) and "\n" not in str(err.value)


def test_an_empty_checkpoint_names_its_cause(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match=r"is empty \(0 bytes\): an interrupted download"):
        read_checkpoint(path)
