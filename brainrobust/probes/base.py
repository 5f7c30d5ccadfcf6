"""The probe interface: a Lightning callback that runs on the test split once the encoder is ready.

`run.py` binds a `ProbeContext` to every probe and calls `trainer.test(encoder, ...)`; each probe
then runs in `on_test_end`, writes its long-format records through the results store and logs a
few summary scalars to the active logger. Probes share only the encoder interface and the context:
they never import each other.

Under DDP (trainer.devices > 1), a probe whose work is independent per test image (it declares
`image_axes`) runs on a contiguous shard of the images in every rank; rank 0 gathers the shards'
records and arrays, merges them (arrays in image order) and writes them. Other probes run on rank 0 alone
while the other ranks wait. Only rank 0 writes to the results store.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, ClassVar, TypeVar

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm

from brainrobust.errors import BrainRobustError, ConfigError, DataError
from brainrobust.probes.chunks import ChunkStore, run_chunks
from brainrobust.results.store import RunStore

log = logging.getLogger(__name__)

T = TypeVar("T")
# Beside a run's records: the chunks of probes still running (kept for resumption).
PARTIAL = "partial"
MIN_CHUNKS = 10
# Seeds of DDP ranks are this far apart, so shards never share random draws; rank 0 keeps the run's.
RANK_SEED_STRIDE = 1_000_003
# How long the other ranks wait for rank 0 (a rank-0-only probe, the merge): a SLURM job's
# default time limit here (conf/hydra/launcher), far above the 30 min of the default group.
RANK_WAIT = timedelta(hours=4)


@dataclass(frozen=True)
class Shard:
    """The contiguous block of the selected test images that one DDP rank works on."""

    rank: int = 0
    world: int = 1

    def bounds(self, n: int) -> tuple[int, int]:
        edges = np.linspace(0, n, self.world + 1).round().astype(int)
        return int(edges[self.rank]), int(edges[self.rank + 1])


class ShardArrays:
    """Stands in for the RunStore inside one rank's shard: arrays are held for rank 0 to merge.

    Reads (the run's directory, identity, other runs) pass through to the real store.
    """

    def __init__(self, store: RunStore):
        self._store = store
        self.saved: dict[str, dict[str, np.ndarray]] = {}
        self.exact: dict[str, tuple[str, ...]] = {}

    def save_array(self, name: str, arr: np.ndarray | Mapping[str, np.ndarray],
                   exact: Collection[str] = ()) -> None:
        self.saved[name] = dict(arr) if isinstance(arr, Mapping) else {"data": arr}
        self.exact[name] = tuple(exact)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._store, attr)


def merge_shards(parts: list[tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]],
                 image_axes: dict[str, int]) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    """The ranks' shards as one record set: arrays in image order as one process stores them,
    records shard after shard (the same rows as one process, in another order).

    Array entries named in `image_axes` are concatenated along that axis; every other entry must
    be the same in every shard (e.g. the eps ladder), or the merge would silently drop data.
    """
    # A shard can hold no rows (e.g. transfer sources sharing no image with it).
    records = pd.concat([p[0] for p in parts if len(p[0])], ignore_index=True)
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for name in parts[0][1]:
        merged = {}
        for key in parts[0][1][name]:
            values = [np.asarray(p[1][name][key]) for p in parts]
            if key in image_axes:
                merged[key] = np.concatenate(values, axis=image_axes[key])
            elif all(np.array_equal(values[0], v, equal_nan=v.dtype.kind == "f") for v in values[1:]):
                merged[key] = values[0]
            else:
                raise RuntimeError(f"array {name}/{key} differs between DDP shards but is not "
                                   f"declared per image (image_axes); cannot merge it")
        arrays[name] = merged
    return records, arrays


@contextmanager
def host_group() -> Iterator[dist.ProcessGroup]:
    """A gloo group over all ranks for the probes' own exchanges.

    Shards travel through host memory (an NCCL gather would stage every shard on rank 0's GPU at
    the end of the run), and its timeout lets the ranks wait out a long rank-0-only probe.
    """
    group = dist.new_group(backend="gloo", timeout=RANK_WAIT)
    try:
        yield group
    finally:
        dist.destroy_process_group(group)


def first_line(err: BaseException | None) -> str | None:
    if err is None:
        return None
    return (str(err).splitlines() or [""])[0] or type(err).__name__


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
    shard: Shard = field(default_factory=Shard)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A generator seeded from the run seed (and DDP rank), on the probe's device."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed + offset + RANK_SEED_STRIDE * self.shard.rank)
        return gen


class Probe(L.Callback):
    """Base class. Subclasses set `name` and implement `run`."""

    name: str = "probe"
    # Record columns that, with the ROI, make one setting (an eps of the ladder, a source model):
    # the scalars sent to the loggers are means within a setting, never across settings.
    settings: ClassVar[tuple[str, ...]] = ()
    # Set by probes whose records and arrays are per test image, so DDP ranks can split the
    # images: the image axis of each per-image array entry (e.g. {"image_id": 0, "delta": 1}).
    # None: the probe needs all images at once (selection, MEIs) and runs on rank 0 alone.
    image_axes: ClassVar[dict[str, int] | None] = None

    def __init__(self, rois: list[str] | None = None, max_images: int | None = None,
                 force: bool = False):
        if max_images is not None and max_images < 1:
            raise ConfigError(f"probe {self.name}: max_images must be >= 1 or null, got {max_images}")
        self.rois = list(rois) if rois else None
        self.max_images = max_images
        self.force = force
        self.context: ProbeContext | None = None
        self.show_progress = False
        self._kept: ChunkStore | None = None
        self._should_stop: Callable[[], bool] = lambda: False

    def chunked(self, n: int, batch_size: int, work: Callable[[int, int], T], what: str,
                generator: torch.Generator | None = None) -> list[T]:
        """`work(start, stop)` over n images in chunks (`chunks.run_chunks`): a live bar, each
        finished chunk kept for a rerun to resume from, a SIGTERM honoured between chunks.
        `what` names the chunks within this probe (e.g. the ROI); `generator` is the one
        `work` draws from. A chunk is at most a tenth of the images, so the bar and the kept
        chunks advance even when all images would fit one batch."""
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", what)
        batch_size = min(batch_size, -(-n // MIN_CHUNKS))
        with self.progress(n, "img", what) as bar:
            return run_chunks(n, batch_size, work, advance=bar.update, kept=self._kept, tag=tag,
                              generator=generator, should_stop=self._should_stop)

    def progress(self, total: int, unit: str, what: str = "") -> tqdm:
        """A live bar with an ETA over `total` units of this probe's work.

        Lightning's test bar counts the test loop's batches, which end before any probe starts,
        so a long probe would otherwise show nothing for minutes. Silent where the trainer's
        bar is off (trainer.enable_progress_bar=false) and on every DDP rank but 0.
        """
        desc = f"{self.name} {what}".strip()
        return tqdm(
            total=total,
            unit=unit,
            desc=desc,
            disable=not self.show_progress,
            dynamic_ncols=True,
            leave=True,
        )

    def bind(self, context: ProbeContext) -> None:
        unknown = sorted(set(self.rois or []) - set(context.rois))
        if unknown:
            raise ConfigError(
                f"probe {self.name}: ROI(s) {unknown} not in this encoder; valid: {context.rois}"
            )
        self.context = context

    def selected_rois(self) -> list[str]:
        return self.rois or self.context.rois

    def n_selected(self, ctx: ProbeContext) -> int:
        return len(ctx.image_ids) if self.max_images is None else min(self.max_images, len(ctx.image_ids))

    def selected_images(self, ctx: ProbeContext) -> tuple[torch.Tensor, np.ndarray]:
        """This probe's test images (max_images, then this rank's shard), on ctx.device."""
        start, stop = ctx.shard.bounds(self.n_selected(ctx))
        return ctx.images[start:stop].to(ctx.device), ctx.image_ids[start:stop]

    def run(self, encoder: torch.nn.Module, ctx: ProbeContext) -> pd.DataFrame:
        raise NotImplementedError

    def stale(self, store: RunStore) -> bool:
        """Whether this probe's written records miss inputs that appeared since (new source runs
        of a transfer): a stale probe is redone, also in a run that is complete."""
        return False

    def media(self) -> dict[str, dict[str, Any]]:
        """Arrays of this run to render as pictures once it is written (array name -> options
        of `brainrobust.analysis.gallery.run_media`). Probes compute and store; analysis draws."""
        return {}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ctx = self.context
        if ctx is None:
            raise RuntimeError(f"probe {self.name} was not bound to a context before trainer.test")
        # Every rank must take the same branch; rank 0's view of the store decides.
        if trainer.strategy.broadcast(ctx.store.has_records(self.name) and not self.force
                                      and not self.stale(ctx.store)):
            log.info("probe %s: records exist in %s, skipped", self.name, ctx.store.dir)
            return
        if torch.is_inference_mode_enabled():
            raise RuntimeError("probes need gradients: build the Trainer with inference_mode=False")
        ctx.device = pl_module.device
        self.show_progress = trainer.progress_bar_callback is not None and trainer.is_global_zero
        # Lightning's own SIGTERM handler (active during trainer.test) raises this flag.
        self._should_stop = lambda: trainer.received_sigterm
        pl_module.eval()
        world, rank = trainer.world_size, trainer.global_rank
        if world == 1:
            self._write(trainer, ctx.store, self._run(pl_module, ctx))
            return
        # Every rank ends each probe in the same exchange, which carries any rank's error to
        # all: no rank is left waiting on one that failed.
        with host_group() as group:
            if self.image_axes is None:
                error = None
                if rank == 0:
                    error = self._attempt(lambda: self._write(trainer, ctx.store, self._run(pl_module, ctx)))
                failure = self._share(group, (0, first_line(error)) if error else None)
            else:
                error, failure = self._run_sharded(trainer, pl_module, ctx, Shard(rank, world), group)
        if failure is not None:
            if error is not None:
                raise error
            failed_rank, message = failure
            raise BrainRobustError(f"probe {self.name} failed on rank {failed_rank}: {message}")

    def _run(self, encoder: L.LightningModule, ctx: ProbeContext) -> pd.DataFrame:
        self._kept = ChunkStore(ctx.store.dir / PARTIAL / f"{self.name}-{ctx.shard.rank}of{ctx.shard.world}")
        # Lightning runs the test loop under no_grad; attacks and Jacobians need autograd.
        with torch.enable_grad():
            return self.run(encoder, ctx)

    @staticmethod
    def _attempt(work: Callable[[], None]) -> Exception | None:
        try:
            work()
        except Exception as err:  # noqa: BLE001 - every kind is handed to all ranks, then re-raised
            return err
        return None

    @staticmethod
    def _share(group: dist.ProcessGroup, failure: tuple[int, str] | None) -> tuple[int, str] | None:
        """Rank 0's outcome, on every rank."""
        box = [failure]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    def _run_sharded(self, trainer: L.Trainer, encoder: L.LightningModule, ctx: ProbeContext,
                     shard: Shard, group: dist.ProcessGroup) -> tuple[Exception | None, tuple[int, str] | None]:
        """Run this rank's shard, gather every shard on rank 0, merge and write there.

        Returns this rank's own error and the first failure of any rank (None, None when all went well).
        """
        start, stop = shard.bounds(self.n_selected(ctx))
        log.info("probe %s: rank %d of %d takes images [%d, %d)", self.name, shard.rank, shard.world,
                 start, stop)
        part = None
        arrays = ShardArrays(ctx.store)

        def work() -> None:
            nonlocal part
            part = (self._run(encoder, replace(ctx, shard=shard, store=arrays)), arrays.saved,
                    arrays.exact)

        # More ranks than images leaves some ranks without a shard.
        error = self._attempt(work) if stop > start else None
        parts = [None] * shard.world if shard.rank == 0 else None
        dist.gather_object((part, first_line(error)), parts, dst=0, group=group)
        failure = None
        if shard.rank == 0:
            failure = next(((r, msg) for r, (_, msg) in enumerate(parts) if msg), None)
            if failure is None:
                error = self._attempt(lambda: self._merge_and_write(trainer, ctx.store, parts))
                failure = (0, first_line(error)) if error else None
        return error, self._share(group, failure)

    def _merge_and_write(self, trainer: L.Trainer, store: RunStore, parts: list) -> None:
        # Each rank's part: (records, arrays, the arrays' exact entries), or None without images.
        shards = [p for p, _ in parts if p is not None]
        if not any(len(shard[0]) for shard in shards):
            raise DataError(f"probe {self.name} produced no records on any rank")
        records, arrays = merge_shards(shards, self.image_axes)
        exact = {name: keys for shard in shards for name, keys in shard[2].items()}
        for name, arr in arrays.items():
            store.save_array(name, arr, exact=exact.get(name, ()))
        self._write(trainer, store, records)

    def _write(self, trainer: L.Trainer, store: RunStore, records: pd.DataFrame) -> None:
        path = store.write_records(self.name, records)
        log.info("probe %s: %d records -> %s", self.name, len(records), path)
        # Every rank's kept chunks served their purpose once the records are written.
        for kept in (store.dir / PARTIAL).glob(f"{self.name}-*of*"):
            ChunkStore(kept).clear()
