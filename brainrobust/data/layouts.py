"""The dataset layouts a run can read, and the fingerprint of the data a run reads.

Free of torch, so `python -m brainrobust.plan` can compute a job's results key (which includes
the data fingerprint) as cheaply as the run itself does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from brainrobust.data.rois import ROISpec
from brainrobust.errors import ConfigError

LOADERS = {
    "nsd": "brainrobust.data.nsd:NSDLoader",
    "algonauts": "brainrobust.data.algonauts:AlgonautsLoader",
}


def open_loader(layout: str, root: str | os.PathLike, **kwargs: Any) -> Any:
    """The loader of `layout` over `root` (the loader modules are imported only when used)."""
    if layout not in LOADERS:
        raise ConfigError(f"unknown data.layout {layout!r}; valid: {sorted(LOADERS)}")
    module, name = LOADERS[layout].split(":")
    return getattr(__import__(module, fromlist=[name]), name)(root, **kwargs)


def ensure_synthetic(root: str | os.PathLike, synthetic: Mapping[str, Any]) -> None:
    """Write the synthetic world `synthetic` names (`world: twin`, the default, or `brain`)."""
    params = dict(synthetic)
    world = params.pop("world", "twin")
    if world == "brain":
        from brainrobust.data.synthetic_brain import ensure_synthetic_brain

        ensure_synthetic_brain(root, **params)
    elif world == "twin":
        from brainrobust.data.synthetic import ensure_synthetic_nsd

        ensure_synthetic_nsd(root, **params)
    else:
        raise ConfigError(f"data.synthetic.world must be twin or brain, got {world!r}")


def roi_specs(rois: Mapping[str, Any] | Sequence[Any]) -> list[ROISpec | str]:
    """ROIs as configs give them (name -> spec or its fields, or a list) as specs or names."""
    items = list(rois.values()) if isinstance(rois, Mapping) else list(rois)
    return [ROISpec(**{k: v for k, v in r.items() if k != "_target_"})
            if isinstance(r, Mapping) else r for r in items]


def data_fingerprint(layout: str, root: str | os.PathLike, subject: int,
                     rois: Mapping[str, Any] | Sequence[Any],
                     synthetic: Mapping[str, Any] | None = None,
                     loader_kwargs: Mapping[str, Any] | None = None) -> str:
    """Digest of the content of every file a run of `subject`'s `rois` reads, without paths.

    The arguments are the run's `data` config; a synthetic twin is written first if needed.
    """
    if synthetic is not None:
        ensure_synthetic(root, synthetic)
    loader = open_loader(layout, root, **dict(loader_kwargs or {}))
    return loader.fingerprint(subject, roi_specs(rois))
