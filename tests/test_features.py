"""Named-layer features, preprocessing, and Trainer.predict extraction with its disk cache."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

from brainrobust.errors import ConfigError, DataError
from brainrobust.models.backbones import build_architecture
from brainrobust.models.features import build_feature_model, extract_features
from brainrobust.models.layers import FEATURES, LayerFeatures, Preprocess
from brainrobust.models.zoo import get_spec

S = 32  # stimulus size in these tests; Preprocess resizes to the model's input_size
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def spec():
    return get_spec("tiny_cnn_random")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(10, S, S, 3), dtype=np.uint8)


@pytest.fixture
def counted(spec):
    """The default tiny feature model and a list that grows by one per backbone forward call."""
    model = build_feature_model(spec)
    calls: list[int] = []
    model[1].backbone.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return model, calls


def run(spec, model, images, cache_dir, ids=None, **kw) -> np.ndarray:
    ids = np.arange(100, 110) if ids is None else ids
    return extract_features(
        spec,
        model,
        images,
        ids,
        "test-set",
        cache_dir,
        batch_size=4,
        accelerator="cpu",
        progress_bar=False,
        **kw,
    )


def rounding_bound(spec, model, images):
    """Bound of the float32 rounding error of each feature of `model`, built from `spec`
    (Preprocess, then LayerFeatures over convolutions, BatchNorm, ReLU and pooling), on uint8
    (B, S, S, 3) images.

    To first order a layer that sums t terms adds at most t * eps * (|W| |x| + |b|), and later
    layers carry that through at most |W|: in all at most eps * (terms of every layer) * M, with
    M the model run in float64 on |x| with every weight and shift replaced by its absolute value.
    Summation order (batch size, CPU, kernel) moves a feature within this bound.
    """
    absolute = build_feature_model(spec)  # a copy without the test's hooks
    absolute.load_state_dict(model.state_dict())
    absolute = absolute.double().eval()
    preprocess, features = absolute
    preprocess.mean, preprocess.std = -preprocess.mean.abs(), preprocess.std.abs()
    terms = 1 + 4 + 2  # uint8 / 255, bilinear enlarging (4 taps), normalisation
    with torch.no_grad():
        for module in absolute.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.abs_()
                if module.bias is not None:
                    module.bias.abs_()
                terms += module.weight[0].numel() + 1
            elif isinstance(module, nn.BatchNorm2d):
                sd = torch.sqrt(module.running_var + module.eps)
                scale = module.weight / sd
                module.bias.copy_((module.bias - module.running_mean * scale).abs())
                module.weight.copy_(scale.abs() * sd)
                module.running_mean.zero_()
                terms += 3
        x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).double() / 255
        layer_map = features.backbone(preprocess(x))[FEATURES]
        magnitude = absolute(x)
    terms += int(np.prod(layer_map.shape[2:]))  # pooling sums at most the whole map
    return EPS32 * terms * magnitude.numpy()


def test_unknown_layer_lists_the_nearest_names(spec):
    with pytest.raises(ConfigError) as err:
        LayerFeatures(build_architecture(spec), "block5")
    assert str(err.value).startswith("layer 'block5' not in TinyCNN; nearest valid: block4, block3")


def test_forward_stops_at_the_layer_and_stays_differentiable(spec):
    backbone = build_architecture(spec).eval()
    features = LayerFeatures(backbone, "block2", pool="avg")
    ran: list[str] = []
    # Hooks on the convolutions (leaf modules, which the cut backbone calls as they are).
    for name in ("block2", "block4"):
        backbone.get_submodule(name)[0].register_forward_pre_hook(
            lambda module, args, name=name: ran.append(name))
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    out = features(x)
    assert out.shape == (2, 64) and ran == ["block2"]
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "pool, dim", [("avg", 128), ("max", 128), ("grid2", 512), ("flatten", 128 * 16)]
)
def test_feature_map_pools(spec, pool, dim):
    backbone = build_architecture(spec).eval()
    out = LayerFeatures(backbone, "block4", pool=pool)(torch.rand(3, 3, 64, 64))
    assert out.shape == (3, dim)


class TokenNet(nn.Module):
    """Stands for a ViT block output: (B, 1 + 16 tokens, C) with a class token in front."""

    num_prefix_tokens = 1

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.block(tokens)


def test_token_outputs_pool_over_patch_tokens():
    tokens = torch.randn(2, 17, 5)

    def layer(pool: str) -> torch.Tensor:
        return LayerFeatures(TokenNet(), "block", pool=pool)(tokens)

    # the same reductions of the same views as the module's: equal to the last bit
    assert torch.equal(layer("avg"), tokens[:, 1:].mean(1))
    assert torch.equal(layer("cls"), tokens[:, 0])
    assert torch.equal(layer("max"), tokens[:, 1:].amax(1))
    grid = tokens[:, 1:].transpose(1, 2).reshape(2, 5, 4, 4)
    assert torch.equal(layer("grid2"), nn.functional.adaptive_avg_pool2d(grid, 2).flatten(1))


def test_cls_pool_on_a_feature_map_is_a_config_error(spec):
    with pytest.raises(ConfigError, match="pool=cls needs a token layer"):
        LayerFeatures(build_architecture(spec), "block4", pool="cls")(torch.rand(1, 3, 64, 64))


def test_random_projection_is_seeded_and_keeps_norms(spec):
    backbone = build_architecture(spec).eval()
    x = torch.rand(4, 3, 64, 64)
    full = LayerFeatures(backbone, "block3", pool="flatten")(x)
    first = LayerFeatures(backbone, "block3", pool="flatten", project_dim=1024, seed=1)(x)
    again = LayerFeatures(backbone, "block3", pool="flatten", project_dim=1024, seed=1)(x)
    other = LayerFeatures(backbone, "block3", pool="flatten", project_dim=1024, seed=2)(x)
    assert first.shape == (4, 1024) and torch.equal(first, again) and not torch.equal(first, other)
    ratio = first.norm(dim=1) / full.norm(dim=1)
    assert torch.all((ratio > 0.85) & (ratio < 1.15))


def test_preprocess_normalises_and_resizes():
    pre = Preprocess(16, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    x = torch.rand(2, 3, 16, 16)
    expected = (x - torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 1.0]
    ).view(1, 3, 1, 1)
    assert torch.equal(pre(x), expected)  # equal sizes: no resampling at all
    assert pre(torch.rand(2, 3, 64, 64)).shape == (2, 3, 16, 16)
    with pytest.raises(DataError, match=r"\(B, 3, S, S\)"):
        pre(torch.rand(2, 16, 16, 3))


def test_shrinking_keeps_every_pixel_in_the_gradient_path():
    x = torch.rand(1, 3, 128, 128, requires_grad=True)
    Preprocess(32, mean=(0, 0, 0), std=(1, 1, 1))(x).sum().backward()
    assert (x.grad != 0).all()


def test_features_match_a_direct_forward(spec, counted, images, tmp_path):
    model, _ = counted
    features = run(spec, model, images, tmp_path)
    with torch.no_grad():
        direct = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    assert features.dtype == np.float32 and features.shape == (10, 512)
    # batches of 4 against one of 10: two float32 evaluations
    bound = 2 * rounding_bound(spec, model, images)
    np.testing.assert_array_less(np.abs(features - direct.numpy()), bound)


def test_second_run_hits_the_cache_without_a_backbone_pass(
    spec, counted, images, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # Trainer.predict must not leave logs or checkpoints behind
    model, calls = counted
    first = run(spec, model, images, tmp_path / "cache")
    assert sum(calls) == 10
    calls.clear()
    second = run(spec, model, images, tmp_path / "cache")
    assert calls == [] and np.array_equal(first, second)
    assert sorted(p.suffix for p in (tmp_path / "cache" / spec.name).iterdir()) == [".json", ".npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


@pytest.mark.parametrize(
    "change",
    [
        {"mean": (0.5, 0.5, 0.5)},
        {"input_size": 48},
        {"pool": "avg"},
        {"layer": "block3"},
        {"project_dim": 64},
    ],
    ids=["mean", "input_size", "pool", "layer", "project_dim"],
)
def test_other_preprocessing_or_readout_never_reuses_the_cache(
    spec, counted, images, tmp_path, change
):
    model, _calls = counted
    baseline = run(spec, model, images, tmp_path)
    other_spec = dataclasses.replace(spec, **change)
    other_model = build_feature_model(other_spec)
    other_calls: list[int] = []
    other_model[1].backbone.register_forward_pre_hook(lambda module, args: other_calls.append(1))
    other = run(other_spec, other_model, images, tmp_path)
    assert other_calls, "a different key must run the backbone"
    assert len(list((tmp_path / spec.name).glob("*.npy"))) == 2
    assert other.shape != baseline.shape or not np.allclose(other, baseline)


def test_other_ids_or_image_set_get_their_own_entry(spec, counted, images, tmp_path):
    model, calls = counted
    run(spec, model, images, tmp_path)
    run(spec, model, images, tmp_path, ids=np.arange(10))
    extract_features(
        spec,
        model,
        images,
        np.arange(100, 110),
        "other-set",
        tmp_path,
        accelerator="cpu",
        progress_bar=False,
    )
    assert sum(calls) == 30 and len(list((tmp_path / spec.name).glob("*.json"))) == 3


@pytest.mark.parametrize("damage", ["garbage", "truncate", "other_key", "sidecar"])
def test_damaged_cache_entry_is_rebuilt(spec, counted, images, tmp_path, caplog, damage):
    model, calls = counted
    original = run(spec, model, images, tmp_path)
    npy = next((tmp_path / spec.name).glob("*.npy"))
    sidecar = npy.with_suffix(".json")
    if damage == "garbage":
        npy.write_bytes(np.save.__doc__.encode()[:500])
    elif damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:-40])
    elif damage == "other_key":
        meta = json.loads(sidecar.read_text())
        meta["key"]["image_source_id"] = "someone-else"
        sidecar.write_text(json.dumps(meta))
    else:
        sidecar.write_text("{not json")
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="brainrobust.models.features"):
        rebuilt = run(spec, model, images, tmp_path)
    assert sum(calls) == 10 and np.array_equal(rebuilt, original)
    assert "unusable" in caplog.text and "rebuilding" in caplog.text
    calls.clear()
    run(spec, model, images, tmp_path)
    assert calls == []  # the rebuilt entry is trusted again


def test_dataset_callable_and_tensor_sources_agree(spec, counted, images, tmp_path):
    model, _ = counted
    expected = run(spec, model, images, tmp_path / "a")
    bound = 2 * rounding_bound(spec, model, images)  # two float32 evaluations of the same images
    as_list = [images[i] for i in range(len(images))]
    from_list = run(spec, model, as_list, tmp_path / "b")
    np.testing.assert_array_less(np.abs(from_list - expected), bound)
    from_callable = run(spec, model, lambda i: images[i], tmp_path / "c")
    np.testing.assert_array_less(np.abs(from_callable - expected), bound)
    floats = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    from_floats = run(spec, model, floats, tmp_path / "d")
    np.testing.assert_array_less(np.abs(from_floats - expected), bound)


def test_bad_inputs_are_data_errors(spec, counted, images, tmp_path):
    model, _ = counted
    with pytest.raises(DataError, match="10 images but 3 ids"):
        run(spec, model, images, tmp_path, ids=np.arange(3))
    with pytest.raises(DataError, match="uint8 \\(n, S, S, 3\\)"):
        run(spec, model, images.astype(np.float32), tmp_path)


def test_extraction_needs_a_preprocess_and_layer_module(spec, images, tmp_path):
    with pytest.raises(ConfigError, match="one Preprocess and one LayerFeatures"):
        run(spec, build_architecture(spec), images, tmp_path)


def test_random_init_weights_are_part_of_the_key(spec, counted, images, tmp_path):
    model, calls = counted
    run(spec, model, images, tmp_path)
    with torch.no_grad():
        model[1].backbone.get_submodule("block1.0").weight.mul_(2)  # same spec, other weights
    calls.clear()
    run(spec, model, images, tmp_path)
    assert sum(calls) == 10


class TwoRanks:
    """The part of a DDP Trainer that extraction uses: each rank predicts every image."""

    world_size = 2

    def predict(self, module, dataloaders):
        with torch.no_grad():
            return [module.predict_step(batch, i) for i, batch in enumerate(dataloaders)]


def test_one_process_builds_under_the_entry_lock_and_ddp_ranks_never_wait(spec, counted, images,
                                                                          tmp_path):
    """A rank blocked on the lock would never join the predict collective of the rank holding
    it, so ranks each compute the entry (written atomically) instead."""
    model, calls = counted
    first = run(spec, model, images, tmp_path / "one")
    (lock,) = (tmp_path / "one" / ".locks").iterdir()
    assert lock.name.startswith(spec.name) and lock.suffix == ".lock"
    ranked = run(spec, model, images, tmp_path / "ddp", trainer=TwoRanks())
    assert not (tmp_path / "ddp" / ".locks").exists() and sum(calls) == 20
    np.testing.assert_array_less(np.abs(ranked - first), 2 * rounding_bound(spec, model, images))
