"""Differentiable feature modules: resize + normalise, then a named layer reduced to a vector."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import create_feature_extractor
from torch import Tensor, nn

from brainrobust.errors import ConfigError, DataError
from brainrobust.models.zoo import parse_pool

# Bumped when the resize or reduction arithmetic changes, so feature caches built with the
# old arithmetic get a different key.
FEATURE_ARITHMETIC = "v1"
FEATURES = "features"  # the traced backbone's one output


class Preprocess(nn.Module):
    """Resize (B, 3, S, S) images in [0, 1] to `input_size` and normalise with mean/std.

    Bilinear. When shrinking, `antialias=True`: plain bilinear sampling at a factor above 2
    reads only some pixels, so the rest would get exactly zero gradient and attacks would
    leave them untouched; the antialiased kernel averages every pixel, is differentiable and
    keeps the whole image in the gradient path. Enlarging (the usual 64 -> 224 case) is
    unaffected by antialiasing, and equal sizes skip the resize altogether (exact identity).
    """

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise DataError(
                f"expected images of shape (B, 3, S, S) in [0, 1], got {tuple(x.shape)}"
            )
        if x.shape[-2:] != (self.input_size, self.input_size):
            shrinking = max(x.shape[-2:]) > self.input_size
            x = F.interpolate(
                x,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                align_corners=False,
                antialias=shrinking,
            )
        return (x - self.mean) / self.std

    def identity(self) -> dict[str, Any]:
        """What the output depends on besides the input (feeds the feature-cache key)."""
        return {
            "input_size": self.input_size,
            "mean": [round(v, 8) for v in self.mean.flatten().tolist()],
            "std": [round(v, 8) for v in self.std.flatten().tolist()],
            "resize": f"bilinear-antialias-when-shrinking-{FEATURE_ARITHMETIC}",
        }


class LayerFeatures(nn.Module):
    """Backbone up to a named layer, reduced to a (B, p) vector; differentiable in the input.

    The backbone is cut at the layer by FX graph extraction (timm's wrapper of torchvision's
    `create_feature_extractor`): `self.backbone` is a traced module that computes only what the
    layer needs, shares the backbone's parameters, and compiles (no hook, no exception).

    Parameters
    ----------
    backbone
        Any traceable module; `layer` is one of its `named_modules()` names (e.g. "layer4",
        "blocks.11"): its output is the last operation inside that module.
    layer
        The readout layer; later layers are not part of the traced module.
    pool
        avg | max | flatten | cls | gridK (see `brainrobust.models.zoo.parse_pool`). For token
        outputs (B, T, C) avg/max/gridK use the patch tokens only and cls takes token 0;
        (B, C) outputs are used as they are.
    project_dim
        If set, the pooled vector is multiplied by a fixed Gaussian matrix (d, project_dim)
        with N(0, 1/project_dim) entries drawn from `seed` (a Johnson-Lindenstrauss random
        projection); it is built at the first forward, when d is known, and costs
        4 * d * project_dim bytes.
    seed
        Seed of the projection matrix.
    """

    def __init__(
        self,
        backbone: nn.Module,
        layer: str,
        pool: str = "avg",
        project_dim: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        names = [name for name, _ in backbone.named_modules() if name]
        if layer not in names:
            close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5) or names[:5]
            raise ConfigError(
                f"layer '{layer}' not in {type(backbone).__name__}; "
                f"nearest valid: {', '.join(close)}"
            )
        try:
            self.backbone = create_feature_extractor(backbone, {layer: FEATURES})
        except (ValueError, RuntimeError, TypeError) as err:  # FX cannot trace or find it
            reason = str(err).splitlines()[0]
            raise ConfigError(f"cannot cut {type(backbone).__name__} at layer '{layer}' ({reason}); "
                              "pick another model.layer") from None
        self.layer = layer
        self.pool = pool
        self.kind, self.grid = parse_pool(pool)
        self.project_dim = project_dim
        self.seed = seed
        # ViTs keep class/register tokens in front of the patch tokens.
        self.prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))
        self.register_buffer("projection", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        features = self._reduce(self.backbone(x)[FEATURES])
        if self.project_dim is not None:
            features = features @ self._projection(features)
        return features

    def _reduce(self, out: Any) -> Tensor:
        if not isinstance(out, Tensor):
            raise ConfigError(
                f"layer '{self.layer}' outputs a {type(out).__name__}, not a tensor; "
                "pick another layer"
            )
        if out.ndim == 2:
            return out
        if out.ndim == 3:
            if self.kind == "cls":
                if self.prefix_tokens < 1:
                    raise ConfigError(
                        f"pool=cls needs a class token; layer '{self.layer}' has none"
                    )
                return out[:, 0]
            if self.kind == "flatten":
                return out.flatten(1)
            patches = out[:, self.prefix_tokens :]
            side = math.isqrt(patches.shape[1])
            if self.kind == "grid":
                if side * side != patches.shape[1]:
                    raise ConfigError(
                        f"pool={self.pool} needs a square token grid; "
                        f"layer '{self.layer}' has {patches.shape[1]} tokens"
                    )
                out = patches.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side)
            else:
                return patches.mean(1) if self.kind == "avg" else patches.amax(1)
        if out.ndim != 4:
            raise ConfigError(
                f"layer '{self.layer}' output has shape {tuple(out.shape)}; expected 2, 3 or 4 dims"
            )
        if self.kind == "cls":
            raise ConfigError(
                f"pool=cls needs a token layer; '{self.layer}' is a feature map: "
                "use avg, max or gridK"
            )
        if self.kind == "avg":
            return out.mean((2, 3))
        if self.kind == "max":
            return out.amax((2, 3))
        if self.kind == "grid":
            return F.adaptive_avg_pool2d(out, self.grid).flatten(1)
        return out.flatten(1)

    def _projection(self, features: Tensor) -> Tensor:
        dim = features.shape[1]
        if self.projection is None or self.projection.shape[0] != dim:
            # Drawn on the CPU so every device gets the same matrix; outside inference mode so a
            # matrix first made during Trainer.predict can still be used in a gradient pass.
            with torch.inference_mode(False), torch.no_grad():
                generator = torch.Generator().manual_seed(self.seed)
                matrix = torch.randn(dim, self.project_dim, generator=generator) / math.sqrt(
                    self.project_dim
                )
                self.projection = matrix.to(features.device)
        return self.projection.to(device=features.device, dtype=features.dtype)

    def identity(self) -> dict[str, Any]:
        """What the output depends on besides backbone and input (feeds the feature-cache key)."""
        ident: dict[str, Any] = {
            "layer": self.layer,
            "pool": self.pool,
            "project_dim": self.project_dim,
            "reduce": FEATURE_ARITHMETIC,
        }
        if self.project_dim is not None:
            ident["projection_seed"] = self.seed
        return ident
