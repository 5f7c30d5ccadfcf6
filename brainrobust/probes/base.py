"""The probe interface: a Lightning callback that runs on the test split once the encoder is ready.

`run.py` binds a `ProbeContext` to every probe and calls `trainer.test(encoder, ...)`; each probe
then runs in `on_test_end`, writes its long-format records through the results store and logs a
few summary scalars to the active logger. Probes share only the encoder interface and the context:
they never import each other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import lightning as L
import numpy as np
import pandas as pd
import torch

from brainrobust.errors import BrainRobustError, ConfigError
from brainrobust.results.store import RunStore

log = logging.getLogger(__name__)

T = TypeVar("T")


def adaptive_chunks(n: int, batch_size: int, work: Callable[[int, int], T]) -> list[T]:
    """`work(start, stop)` over [0, n) in chunks, halving the chunk on CUDA out-of-memory.

    A chunk that fails is redone smaller instead of crashing the run. Only the random draws
    (random starts, control noise) follow the chunking; rerun with the logged batch size to
    reproduce them bit for bit.
    """
    out, start = [], 0
    while start < n:
        stop = min(n, start + batch_size)
        try:
            out.append(work(start, stop))
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise BrainRobustError(
                    "out of GPU memory with one image per batch; use a smaller data.image_size "
                    "or model, or a GPU with more memory") from None
            batch_size = max(1, batch_size // 2)
            torch.cuda.empty_cache()
            log.warning("out of GPU memory: batch size lowered to %d", batch_size)
            continue
        start = stop
    return out


@dataclass
class ProbeContext:
    """What every probe may read: the test split, its statistics and where to write."""

    images: torch.Tensor  # (n, 3, S, S) float in [0, 1]
    image_ids: np.ndarray  # (n,) 0-based NSD 73k ids
    responses: np.ndarray  # (n, V) measured, z-scored, repeat-averaged
    rois: list[str]
    roi_stats: dict[str, dict[str, float]]  # roi -> {"test_sd", "noise_ceiling" (percent)}
    meta: dict[str, Any]
    store: RunStore
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def generator(self, offset: int = 0) -> torch.Generator:
        """A generator seeded from the run seed, on the device the probe computes on."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed + offset)
        return gen


class Probe(L.Callback):
    """Base class. Subclasses set `name` and implement `run`."""

    name: str = "probe"
    # Rows of the per-image table sent to W&B; the full records are always in the store.
    table_rows: int = 20_000

    def __init__(self, rois: list[str] | None = None, max_images: int | None = None,
                 force: bool = False):
        if max_images is not None and max_images < 1:
            raise ConfigError(f"probe {self.name}: max_images must be >= 1 or null, got {max_images}")
        self.rois = list(rois) if rois else None
        self.max_images = max_images
        self.force = force
        self.context: ProbeContext | None = None

    def bind(self, context: ProbeContext) -> None:
        unknown = sorted(set(self.rois or []) - set(context.rois))
        if unknown:
            raise ConfigError(
                f"probe {self.name}: ROI(s) {unknown} not in this encoder; valid: {context.rois}"
            )
        self.context = context

    def selected_rois(self) -> list[str]:
        return self.rois or self.context.rois

    def selected_images(self, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
        ctx = self.context
        n = len(ctx.image_ids) if self.max_images is None else min(self.max_images, len(ctx.image_ids))
        return ctx.images[:n].to(device), ctx.image_ids[:n]

    def run(self, encoder: torch.nn.Module, ctx: ProbeContext) -> pd.DataFrame:
        raise NotImplementedError

    def summary(self, records: pd.DataFrame) -> dict[str, float]:
        """Scalars logged to the active logger; by default the mean of each metric per ROI."""
        if "roi" not in records.columns:
            return {}
        means = records.groupby(["roi", "metric"])["value"].mean()
        return {f"{self.name}/{roi}/{metric}": float(v) for (roi, metric), v in means.items()}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ctx = self.context
        if ctx is None:
            raise RuntimeError(f"probe {self.name} was not bound to a context before trainer.test")
        if ctx.store.has_records(self.name) and not self.force:
            log.info("probe %s: records exist in %s, skipped", self.name, ctx.store.dir)
            return
        if torch.is_inference_mode_enabled():
            raise RuntimeError("probes need gradients: build the Trainer with inference_mode=False")
        ctx.device = pl_module.device
        pl_module.eval()
        # Lightning runs the test loop under no_grad; attacks and Jacobians need autograd.
        with torch.enable_grad():
            records = self.run(pl_module, ctx)
        path = ctx.store.write_records(self.name, records)
        log.info("probe %s: %d records -> %s", self.name, len(records), path)
        for lg in trainer.loggers:
            lg.log_metrics(self.summary(records))
            if hasattr(lg, "log_table"):
                # W&B: the per-image records as a table, so the UI can slice by model/ROI/eps.
                lg.log_table(key=f"{self.name}/records", dataframe=records.head(self.table_rows))
