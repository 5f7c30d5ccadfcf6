"""The fitted readout as a torch module: the last, frozen layer of the brain encoder.

`LinearReadout.from_fit` holds a `brainrobust.models.ridge.RidgeFit`; `save`/`load` store it as
safetensors with its metadata. `pearson_r` scores its predictions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from brainrobust.errors import CacheError, ConfigError, DataError
from brainrobust.files import atomic_path
from brainrobust.models.ridge import Array, RidgeFit

FORMAT = "brainrobust-ridge-readout-v1"
_TENSORS = ("weights", "intercept", "alphas")


# ----------------------------------------------------------------------------- metric


def pearson_r(y_true: Array, y_pred: Array) -> np.ndarray:
    """Column-wise Pearson correlation, accumulated in float64.

    Parameters
    ----------
    y_true, y_pred : (n, V) arrays (or (n,), treated as one column).

    Returns
    -------
    (V,) float64; 0 for a column that is constant in either input (no warning).
    """
    t, p = (
        np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
        for a in (y_true, y_pred)
    )
    if t.shape != p.shape or t.ndim not in (1, 2) or t.shape[0] < 2:
        raise DataError(
            f"pearson_r needs two (n, V) arrays of the same shape with n >= 2; got {t.shape} and {p.shape}"
        )
    if t.ndim == 1:
        t, p = t[:, None], p[:, None]
    tc, pc = t - t.mean(0), p - p.mean(0)
    num = (tc * pc).sum(0)
    den = np.sqrt(np.square(tc).sum(0) * np.square(pc).sum(0))
    # an exactly constant column can leave rounding residue after centring: test it directly
    varies = (np.ptp(t, axis=0) > 0) & (np.ptp(p, axis=0) > 0) & (den > 0)
    r = np.zeros(t.shape[1])
    r[varies] = num[varies] / den[varies]
    return r


# ----------------------------------------------------------------------------- torch module


def _to_json(value: Any) -> Any:
    """JSON-normal form of a metadata value (numpy values become lists / Python scalars)."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(type(obj).__name__)

    try:
        return json.loads(json.dumps(value, default=default, sort_keys=True))
    except TypeError as exc:
        raise ConfigError(
            f"readout metadata holds a {exc} value; pass str, numbers, lists or dicts"
        ) from exc


class LinearReadout(torch.nn.Module):
    """Fixed linear map feats (B, p) -> voxels (B, V): feats @ weights + intercept.

    The weights are buffers (no gradient, never trained) but the map is differentiable, so
    gradients reach the input features and through them the image.
    """

    weights: torch.Tensor
    intercept: torch.Tensor
    alphas: torch.Tensor

    def __init__(
        self,
        weights: Array,
        intercept: Array,
        alphas: Array | None = None,
        info: dict[str, Any] | None = None,
    ):
        super().__init__()
        w = torch.as_tensor(weights, dtype=torch.float32)
        b = torch.as_tensor(intercept, dtype=torch.float32)
        if w.ndim != 2 or b.shape != (w.shape[1],):
            raise DataError(
                f"readout weights must be (p, V) and intercept (V,); got {tuple(w.shape)} and {tuple(b.shape)}"
            )
        if alphas is None:
            a = torch.full((w.shape[1],), math.nan, dtype=torch.float64)
        else:
            a = torch.as_tensor(alphas, dtype=torch.float64)
        if a.shape != b.shape:
            raise DataError(f"readout alphas must be (V,) = {tuple(b.shape)}; got {tuple(a.shape)}")
        self.register_buffer("weights", w.contiguous())
        self.register_buffer("intercept", b.contiguous())
        self.register_buffer("alphas", a.contiguous())
        self.info: dict[str, Any] = _to_json(info or {})  # how it was fit; saved with the metadata

    @classmethod
    def from_fit(cls, fit: RidgeFit) -> LinearReadout:
        """Readout holding a `RidgeFit`'s weights, intercept and penalties."""
        return cls(
            fit.weights,
            fit.intercept,
            fit.alphas,
            info={"method": fit.method, "alpha_grid": fit.alpha_grid},
        )

    @property
    def n_features(self) -> int:
        return self.weights.shape[0]

    @property
    def n_voxels(self) -> int:
        return self.weights.shape[1]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, p) features -> (B, V) predicted responses."""
        if feats.shape[-1] != self.n_features:
            raise DataError(
                f"readout expects {self.n_features} features, got {feats.shape[-1]}; it was fit on another layer or reduction"
            )
        return torch.addmm(self.intercept.to(feats.dtype), feats, self.weights.to(feats.dtype))

    def save(self, path: str | Path, metadata: dict[str, Any]) -> None:
        """Write weights, intercept and alphas as safetensors, atomically.

        `metadata` (model, layer, subject, rois, train ids checksum, ...) is stored with the
        fit's own (method, alpha_grid) and the shapes, each value as a JSON string.
        """
        own = {
            **self.info,
            "format": FORMAT,
            "n_features": self.n_features,
            "n_voxels": self.n_voxels,
        }
        given = _to_json(metadata)
        clash = sorted(k for k in own.keys() & given.keys() if own[k] != given[k])
        if clash:
            raise ConfigError(
                f"readout metadata {clash} contradicts the fit's own values {[own[k] for k in clash]}; drop those keys"
            )
        stored = {str(k): json.dumps(v, sort_keys=True) for k, v in {**given, **own}.items()}
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in _TENSORS}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=stored)

    @classmethod
    def load(
        cls, path: str | Path, expect: dict[str, Any] | None = None
    ) -> tuple[LinearReadout, dict[str, Any]]:
        """Read a readout written by `save`; returns (readout, metadata).

        Raises CacheError naming the file when it is missing, damaged, of another shape or
        dtype, or when a key of `expect` differs from the stored metadata: the caller refits.
        """
        path = Path(path)
        refit = f"delete {path} (or let the run refit it)"
        if not path.is_file():
            raise CacheError(f"readout file {path} does not exist; fit the readout first")
        try:
            with safe_open(str(path), framework="pt") as fh:
                raw = fh.metadata() or {}
                names = fh.keys()
                tensors = {name: fh.get_tensor(name) for name in names}
            meta = {k: json.loads(v) for k, v in raw.items()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CacheError(f"readout file {path} is unreadable ({exc}); {refit}") from exc
        if meta.get("format") != FORMAT or set(tensors) != set(_TENSORS):
            raise CacheError(
                f"readout file {path} is not a {FORMAT} file (tensors {sorted(tensors)}); {refit}"
            )
        w, b, a = (tensors[name] for name in _TENSORS)
        p, v = meta.get("n_features"), meta.get("n_voxels")
        if (
            w.dtype != torch.float32
            or b.dtype != torch.float32
            or a.dtype != torch.float64
            or tuple(w.shape) != (p, v)
            or tuple(b.shape) != (v,)
            or tuple(a.shape) != (v,)
        ):
            raise CacheError(
                f"readout file {path} holds weights {tuple(w.shape)} {w.dtype}, intercept {tuple(b.shape)}, "
                f"alphas {tuple(a.shape)} that do not match its metadata ({p} features, {v} voxels); {refit}"
            )
        for key, want in _to_json(expect or {}).items():
            if key not in meta or meta[key] != want:
                raise CacheError(
                    f"readout file {path} was fit for {key}={meta.get(key)!r}, not {want!r}; {refit}"
                )
        info = {k: meta[k] for k in ("method", "alpha_grid") if k in meta}
        return cls(w, b, a, info=info), meta
