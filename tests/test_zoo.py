"""Model registry: listing, specs, Hydra composition, architectures and their readout layers."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from brainrobust.errors import ConfigError
from brainrobust.models.backbones import (
    FACTORIES,
    build_architecture,
    build_backbone,
    check_normalisation,
)
from brainrobust.models.layers import LayerFeatures
from brainrobust.models.zoo import (
    DEFAULTS_ENTRY,
    DEFAULTS_FILE,
    MODEL_DIR,
    ModelSpec,
    get_spec,
    list_models,
    model_config,
    spec_from_config,
)

STANDARD = [
    "resnet18",
    "resnet50",
    "resnet101",
    "vgg16",
    "densenet121",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "convnext_tiny",
    "vit_base_patch16_224",
    "clip_vit_b16",
]
ROBUST_L2 = {
    "robust_resnet50_eps0p1": 0.1,
    "robust_resnet50_eps1": 1.0,
    "robust_resnet50_eps3": 3.0,
    "robust_resnet50_eps5": 5.0,
}
OFFLINE = ["tiny_cnn_random", "resnet18_random"]
# Fast on 2 CPU cores; the rest (large timm models and the other robust ResNet-50s) are `slow`.
FAST = {
    "tiny_cnn_random",
    "resnet18_random",
    "resnet18",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "robust_resnet50_eps3",
}


@pytest.fixture
def factory_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for family, factory in list(FACTORIES.items()):

        def counted(spec: ModelSpec, _factory=factory, _family=family) -> torch.nn.Module:
            calls.append(_family)
            return _factory(spec)

        monkeypatch.setitem(FACTORIES, family, counted)
    return calls


def test_registry_lists_every_yaml_without_building_a_model(factory_calls: list[str]) -> None:
    names = list_models()
    assert names == sorted(p.stem for p in MODEL_DIR.glob("*.yaml"))
    assert set(STANDARD) | set(ROBUST_L2) | set(OFFLINE) <= set(names)
    specs = [get_spec(name) for name in names]
    assert factory_calls == []
    assert sum(not s.robust and s.family == "timm" for s in specs) == 10
    assert sum(s.robust and s.train_norm == "l2" for s in specs) >= 4


def test_listing_imports_no_torch_or_timm() -> None:
    code = (
        "import sys; from brainrobust.models.zoo import list_models, get_spec; "
        "[get_spec(n) for n in list_models()]; print('torch' in sys.modules, 'timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_unknown_model_lists_the_valid_names() -> None:
    with pytest.raises(ConfigError) as err:
        get_spec("resnet5")
    message = str(err.value)
    assert "unknown model 'resnet5'" in message and "\n" not in message
    assert all(name in message for name in list_models())


def test_model_dir_override(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "only.yaml").write_text(
        "_target_: brainrobust.models.zoo.ModelSpec\n"
        "name: only\nfamily: offline\narch: tiny_cnn\nlayer: block4\n"
    )
    monkeypatch.setenv("BRAINROBUST_MODEL_DIR", str(tmp_path))
    assert list_models() == ["only"]
    assert get_spec("only").arch == "tiny_cnn"
    assert "tiny_cnn_random" in list_models(MODEL_DIR)


@pytest.mark.parametrize("name", list_models())
def test_every_yaml_composes_into_a_modelspec(name: str) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(MODEL_DIR.parent), version_base="1.3"):
        cfg = compose(overrides=[f"+model={name}", "model.weights=/data/w.pt", "model.layer=x"])
    spec = instantiate(cfg.model)
    assert isinstance(spec, ModelSpec)
    expected = dataclasses.replace(get_spec(name), weights="/data/w.pt", layer="x")
    assert spec == expected
    assert spec_from_config(cfg.model) == expected
    # Read without Hydra, the entry is the node Hydra composes: every field, defaults included.
    composed = OmegaConf.to_container(cfg.model, resolve=True)
    assert model_config(name) | {"weights": "/data/w.pt", "layer": "x"} == composed


def test_model_files_state_only_what_differs_from_the_defaults() -> None:
    base = OmegaConf.to_container(OmegaConf.load(DEFAULTS_FILE))
    # The dataclass and the defaults file agree, so a spec built in code is the composed one.
    declared = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(ModelSpec) if f.name in base}
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in declared.items()} == {
        k: v for k, v in base.items() if k != "_target_"}
    for name in list_models():
        own = OmegaConf.to_container(OmegaConf.load(MODEL_DIR / f"{name}.yaml"))
        assert own.pop("defaults") == [DEFAULTS_ENTRY, "_self_"], name
        assert not {k for k, v in own.items() if base.get(k, object()) == v}, name


def test_sources_and_robust_metadata() -> None:
    for name in STANDARD:
        spec = get_spec(name)
        assert spec.hub_id.startswith("timm/") and spec.filename and not spec.robust
    for name, eps in ROBUST_L2.items():
        spec = get_spec(name)
        assert spec.family == "madry" and spec.arch == "resnet50"
        assert spec.url.startswith("https://") and spec.url.endswith(spec.filename)
        assert (spec.train_norm, spec.train_eps) == ("l2", eps)
    for name in OFFLINE:
        spec = get_spec(name)
        assert spec.family == "offline" and spec.filename is None and "random" in name


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"family": "keras"}, "unknown family 'keras'"),
        ({"pool": "median"}, "unknown pool 'median'"),
        ({"std": (0.2, 0.0, 0.2)}, "std > 0"),
        ({"project_dim": 0}, "project_dim"),
        ({"robust": True}, "train_norm"),
        ({"sha256": "abc"}, "sha256"),
        ({"family": "madry"}, "needs url and filename"),
    ],
)
def test_spec_validation(change: dict, fragment: str) -> None:
    fields = {"name": "m", "family": "offline", "arch": "tiny_cnn", "layer": "block4", **change}
    with pytest.raises(ConfigError, match=fragment):
        ModelSpec(**fields)


def test_unknown_config_field_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown model field.*layr"):
        spec_from_config({"name": "m", "family": "offline", "arch": "tiny_cnn", "layr": "block4"})


def test_random_init_is_seeded_and_leaves_global_rng_alone() -> None:
    spec = get_spec("tiny_cnn_random")
    before = torch.random.get_rng_state()
    first, second = build_architecture(spec), build_architecture(spec)
    assert torch.equal(torch.random.get_rng_state(), before)
    other = build_architecture(dataclasses.replace(spec, seed=1))
    w = "block1.0.weight"
    assert torch.equal(first.state_dict()[w], second.state_dict()[w])
    assert not torch.equal(first.state_dict()[w], other.state_dict()[w])


@pytest.mark.parametrize("name", [n for n in list_models() if get_spec(n).family == "timm"])
def test_hub_models_normalise_as_their_weights_were_trained(name: str) -> None:
    """Every hub entry's mean and std are its tag's in timm's pretrained config; a changed one
    is refused before any weights are looked for."""
    spec = get_spec(name)
    check_normalisation(spec)
    with pytest.raises(ConfigError, match=rf"model {name}: mean .* is not what .* was trained with"):
        build_backbone(dataclasses.replace(spec, mean=(0.5, 0.5, 0.5) if spec.mean[0] != 0.5 else (0.4, 0.4, 0.4)))


def test_unknown_architecture_is_a_config_error() -> None:
    spec = dataclasses.replace(get_spec("resnet18_random"), arch="resnet19")
    with pytest.raises(ConfigError, match="resnet19"):
        build_architecture(spec)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in list_models()]
)
def test_architecture_builds_and_every_named_layer_reads_out(name: str) -> None:
    spec = get_spec(name)
    model = build_architecture(spec).eval()
    x = torch.rand(1, 3, spec.input_size, spec.input_size)
    for layer in spec.all_layers:
        with torch.no_grad():
            features = LayerFeatures(model, layer, spec.pool, spec.project_dim)(x)
        assert features.ndim == 2 and features.shape[0] == 1 and features.shape[1] > 0, layer
        assert torch.isfinite(features).all(), layer
