"""Building a zoo spec's network: the architecture of each model family, then its weights.

Each family's factory returns the architecture with random init (timm's `pretrained=False`);
`build_backbone` then loads the weights through `brainrobust.models.weights`, the same way for
every family. `build_architecture` seeds the RNG around the factory, so random-init models are
reproducible.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence

import timm
import torch
from torch import Tensor, nn

from brainrobust.errors import ConfigError
from brainrobust.models.weights import load_weights, resolve_weights
from brainrobust.models.zoo import ModelSpec

Factory = Callable[[ModelSpec], nn.Module]
# family -> architecture builder (random init, no weights).
FACTORIES: dict[str, Factory] = {}


def register_factory(*families: str) -> Callable[[Factory], Factory]:
    """Decorator: register an architecture builder for families."""

    def decorate(factory: Factory) -> Factory:
        for family in families:
            FACTORIES[family] = factory
        return factory

    return decorate


class TinyCNN(nn.Module):
    """Four conv blocks (3x3 conv, BatchNorm, ReLU, 2x2 max-pool) for fast CPU features.

    At 64 x 64 input `block4` gives a 128 x 4 x 4 map. With random (Kaiming) weights the
    ReLU + max-pool stack still yields diverse, spatially local features, which is what an
    offline default model and the tests need; it is not meant to be trained here.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 96, 128)) -> None:
        super().__init__()
        channels = [3, *widths]
        for index, (c_in, c_out) in enumerate(itertools.pairwise(channels), start=1):
            block = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.add_module(f"block{index}", block)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        for block in self.children():
            x = block(x)
        return x


OFFLINE_NETS: dict[str, Callable[[], nn.Module]] = {"tiny_cnn": TinyCNN}


def _timm_model(arch: str) -> nn.Module:
    try:
        return timm.create_model(arch, pretrained=False)
    except RuntimeError as err:  # timm's "Unknown model" error
        raise ConfigError(f"timm has no architecture '{arch}' ({err}); fix model.arch") from None


@register_factory("timm", "madry")
def timm_architecture(spec: ModelSpec) -> nn.Module:
    """timm architecture `spec.arch`; MadryLab ResNet-50s share torchvision's key names with it."""
    return _timm_model(spec.arch)


@register_factory("offline")
def offline_architecture(spec: ModelSpec) -> nn.Module:
    """A network defined here (e.g. tiny_cnn), else a timm architecture, random init."""
    if spec.arch in OFFLINE_NETS:
        return OFFLINE_NETS[spec.arch]()
    return _timm_model(spec.arch)


def build_architecture(spec: ModelSpec) -> nn.Module:
    """The spec's architecture with seeded random weights (pretrained=False).

    The global RNG state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return FACTORIES[spec.family](spec)


def check_normalisation(spec: ModelSpec) -> None:
    """A hub model's mean and std must be those its weights were trained with, as timm's
    pretrained config of the hub tag states them (offline: the configs ship with timm). Other
    values would silently feed the network images unlike any it has seen. The input size may
    differ on purpose (a cheaper run), so only mean and std are held to it."""
    tag = (spec.hub_id or "").split("/", 1)[-1]
    if spec.family != "timm" or not tag:
        return
    try:
        cfg = timm.get_pretrained_cfg(tag)
    except RuntimeError:  # a tag this timm does not know: the weights' loader says so
        return
    if cfg is None:
        return
    for field, theirs in (("mean", cfg.mean), ("std", cfg.std)):
        ours = getattr(spec, field)
        # The zoo's YAMLs round to 3 decimals.
        if len(ours) != len(theirs) or any(abs(a - b) > 1e-3 for a, b in zip(ours, theirs, strict=True)):
            raise ConfigError(
                f"model {spec.name}: {field} {list(ours)} is not what {tag} was trained with "
                f"({[round(v, 4) for v in theirs]}, timm's pretrained config); set model.{field} to it")


def build_backbone(spec: ModelSpec, weights_dir: str | os.PathLike | None = None) -> nn.Module:
    """Architecture plus its weights, in eval mode with frozen parameters.

    Weights come from `spec.weights`, else `weights_dir/<filename>`, else the Hugging Face
    cache (timm), else a download when `spec.allow_download`; offline-family models without
    `weights` keep their seeded random init. See `brainrobust.models.weights.resolve_weights`.
    """
    check_normalisation(spec)
    path = resolve_weights(spec, weights_dir)  # missing weights fail before any build
    model = build_architecture(spec)
    if path is not None:
        load_weights(model, path, spec)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
