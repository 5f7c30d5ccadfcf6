"""The probe interface: a Lightning callback that works inside the test loop.

`run.py` binds a `ProbeContext` to every probe and calls `trainer.test(encoder, ...)`. The test
loop's batches carry each image's position in the test split; under DDP Lightning's distributed
sampler deals them out to the ranks.

- Per-image probes (sensitivity, effect_matched, subspace, transfer; they declare `image_axes`)
  implement `run_batch`: the loop hands them its batches (with gradients enabled), so the
  loop's progress bar follows their work. Each finished batch is kept on disk (`chunks`), which
  makes an interrupted run resume where it stopped and carries every rank's share to rank 0:
  at the end of the epoch every rank lists its batches and waits at the strategy's barrier, then
  rank 0 merges them in test-split order (dropping the distributed sampler's padding repeats)
  and writes the records and arrays. Transfer reads its sources' stored perturbations, which
  would be read again for every batch, so it takes this rank's images in one piece at the end
  of the epoch (`per_batch = False`).
- Whole-set probes (targeted, mei, insilico: `image_axes = None`) need every image at once and
  implement `run`, which rank 0 calls once the test loop has ended.

Probes share only the encoder interface and the context: they never import each other. Only
rank 0 writes to the results store.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import lightning as L
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from brainrobust.checks import is_number, require_integer
from brainrobust.errors import ConfigError, DataError, Interrupted
from brainrobust.probes.chunks import ArrayCapture, Chunk, ChunkStore
from brainrobust.results.store import RunStore

log = logging.getLogger(__name__)

# Beside a run's records: the kept batches of probes still running.
PARTIAL = "partial"
# Seeds of batches are this far apart (per test-split position of a batch's first image), so
# batches never share random draws, whichever rank runs them.
BATCH_SEED_STRIDE = 1_000_003


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
    # The test-split position of the first image of the batch a per-image probe works on.
    stream: int = 0

    def generator(self, offset: int = 0) -> torch.Generator:
        """A generator seeded from the run seed (and the batch), on the probe's device."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed + offset + BATCH_SEED_STRIDE * self.stream)
        return gen


class Probe(L.Callback):
    """Base class. Subclasses set `name` and implement `run_batch` (per image) or `run`."""

    name: str = "probe"
    # Record columns that, with the ROI, make one setting (an eps of the ladder, a source model):
    # the scalars sent to the loggers are means within a setting, never across settings.
    settings: ClassVar[tuple[str, ...]] = ()
    # Set by per-image probes: the image axis of each per-image array entry (e.g.
    # {"image_id": 0, "delta": 1}); the other entries must be the same in every batch.
    # None: the probe needs all images at once (selection, MEIs) and runs after the loop.
    image_axes: ClassVar[dict[str, int] | None] = None
    # False: the probe takes this rank's images in one piece at the end of the epoch.
    per_batch: ClassVar[bool] = True

    def __init__(self, rois: list[str] | None = None, max_images: int | None = None,
                 force: bool = False):
        if max_images is not None:
            self.check(integers={"max_images": (max_images, 1)})
        # A single name is one ROI, not a list of its letters.
        self.rois = ([rois] if isinstance(rois, str) else list(rois)) if rois else None
        self.max_images = max_images
        self.force = force
        self.context: ProbeContext | None = None
        self.show_progress = False
        self._skip = False
        self._kept: ChunkStore | None = None
        self._tags: list[str] = []
        self._waiting: list[np.ndarray] = []
        self._reused = self._done = 0

    # ---- what subclasses implement ---------------------------------------------------------

    def run(self, encoder: torch.nn.Module, ctx: ProbeContext) -> pd.DataFrame:
        """The records of every selected image (`selected_images`): whole-set probes implement
        it; a per-image probe takes them as one batch (use outside a Trainer: notebooks, tests)."""
        if self.image_axes is None:
            raise NotImplementedError
        records = self.run_batch(encoder, ctx, *self.selected_images(ctx))
        if records.empty:
            raise DataError(self.no_records())
        return records

    def run_batch(self, encoder: torch.nn.Module, ctx: ProbeContext, images: torch.Tensor,
                  ids: np.ndarray) -> pd.DataFrame:
        """Per-image probes: the records of one batch; arrays go to `ctx.store.save_array`."""
        raise NotImplementedError

    def stale(self, store: RunStore) -> bool:
        """Whether this probe's written records miss inputs that appeared since (new source runs
        of a transfer): a stale probe is redone, also in a run that is complete."""
        return False

    def no_records(self) -> str:
        """The message when no batch gave a record."""
        return f"probe {self.name} produced no records"

    def media(self) -> dict[str, dict[str, Any]]:
        """Arrays of this run to render as pictures once it is written (array name -> options
        of `brainrobust.analysis.gallery.run_media`). Probes compute and store; analysis draws."""
        return {}

    # ---- helpers for subclasses ------------------------------------------------------------

    def progress(self, total: int, unit: str, what: str = "", leave: bool = True) -> tqdm:
        """A live bar with an ETA over `total` units of this probe's work; silent where the
        trainer's bar is off (trainer.enable_progress_bar=false) and on every DDP rank but 0."""
        return tqdm(total=total, unit=unit, desc=f"{self.name} {what}".strip(),
                    disable=not self.show_progress, dynamic_ncols=True, leave=leave)

    def check(self, *, integers: Mapping[str, tuple[Any, int]] | None = None,
              above: Mapping[str, tuple[Any, float]] | None = None,
              at_least: Mapping[str, tuple[Any, float]] | None = None,
              below: Mapping[str, tuple[Any, float]] | None = None,
              choices: Mapping[str, tuple[Any, Collection]] | None = None) -> None:
        """The one schema for a probe's settings, checked where the probe is built: integers at
        least a minimum, finite numbers above / at least / below a bound, one of some choices.
        A bad value is one line naming its key (`probe.<name>.<key> ...`)."""
        prefix = f"probe.{self.name}."
        for key, (value, low) in (integers or {}).items():
            require_integer(prefix + key, value, low)
        for rules, relation, holds in ((above, ">", operator.gt), (at_least, ">=", operator.ge),
                                       (below, "<", operator.lt)):
            for key, (value, bound) in (rules or {}).items():
                if not (is_number(value) and holds(value, bound)):
                    raise ConfigError(f"{prefix}{key} must be a finite number {relation} {bound:g}, "
                                      f"got {value!r}")
        for key, (value, options) in (choices or {}).items():
            if value not in options:
                raise ConfigError(f"{prefix}{key} must be one of {sorted(options)}, got {value!r}")

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
        """This probe's test images (the first max_images), on ctx.device."""
        n = self.n_selected(ctx)
        return ctx.images[:n].to(ctx.device), ctx.image_ids[:n]

    # ---- the Lightning hooks ---------------------------------------------------------------

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ctx = self.context
        if ctx is None:
            raise RuntimeError(f"probe {self.name} was not bound to a context before trainer.test")
        # Every rank must take the same branch; rank 0's view of the store decides.
        self._skip = trainer.strategy.broadcast(ctx.store.has_records(self.name) and not self.force
                                                and not self.stale(ctx.store))
        if self._skip:
            log.info("probe %s: records exist in %s, skipped", self.name, ctx.store.dir)
            return
        if torch.is_inference_mode_enabled():
            raise RuntimeError("probes need gradients: build the Trainer with inference_mode=False")
        ctx.device = pl_module.device
        self.show_progress = trainer.progress_bar_callback is not None and trainer.is_global_zero
        # Kept batches are valid for one batching only: the folder names the ranks.
        self._kept = ChunkStore(ctx.store.dir / PARTIAL / f"{self.name}-{trainer.world_size}ranks")
        self._tags, self._waiting, self._reused, self._done = [], [], 0, 0

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._skip or self.image_axes is None:
            return
        positions = batch[-1].cpu().numpy()
        mine = positions < self.n_selected(self.context)
        if not mine.any():
            return
        if not self.per_batch:
            self._waiting.append(positions[mine])
            return
        self._process(trainer, pl_module, positions[mine], batch[0][torch.from_numpy(mine).to(batch[0].device)])

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._skip or self.image_axes is None:
            return
        if self._waiting:
            positions = np.concatenate(self._waiting)
            self._process(trainer, pl_module, positions,
                          self.context.images[torch.from_numpy(positions)].to(pl_module.device))
        if self._reused:
            log.info("%s: reused %d kept batches of an interrupted run", self.name, self._reused)
        if trainer.world_size > 1:
            log.info("probe %s: rank %d of %d did %d images in %d batches", self.name,
                     trainer.global_rank, trainer.world_size, self._done, len(self._tags))
        self._kept.write_manifest(f"rank{trainer.global_rank}", self._tags)
        trainer.strategy.barrier(f"probe {self.name}")
        if trainer.is_global_zero:
            self._merge_and_write(trainer.world_size)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._skip or self.image_axes is not None or not trainer.is_global_zero:
            return
        pl_module.eval()
        with torch.enable_grad():
            records = self.run(pl_module, self.context)
        self._write(records)

    # ---- the machinery ---------------------------------------------------------------------

    def _process(self, trainer: L.Trainer, encoder: L.LightningModule, positions: np.ndarray,
                 images: torch.Tensor) -> None:
        """One batch of this rank: reused when kept from an interrupted run, else computed."""
        tag = f"rank{trainer.global_rank}-{positions[0]:08d}-{len(positions)}"
        kept = self._kept.load(tag)
        if kept is not None and np.array_equal(kept.positions, positions):
            self._reused += 1
        else:
            # Lightning's own SIGTERM handler (active during trainer.test) raises this flag.
            if trainer.received_sigterm:
                raise Interrupted(f"stopped by a signal at test image {positions[0]} ({self.name}); "
                                  "the finished batches are kept: rerun the same command to resume")
            ctx = self.context
            capture = ArrayCapture(ctx.store)
            batch_ctx = replace(ctx, store=capture, stream=int(positions[0]))
            encoder.eval()
            # Lightning runs the test loop under no_grad; attacks and Jacobians need autograd.
            with torch.enable_grad():
                records = self.run_batch(encoder, batch_ctx, images, ctx.image_ids[positions])
            self._kept.save(tag, Chunk(positions, records, capture.saved, capture.exact))
        self._tags.append(tag)
        self._done += len(positions)

    def _merge_and_write(self, world: int) -> None:
        chunks = []
        for rank in range(world):
            tags = self._kept.read_manifest(f"rank{rank}")
            if tags is None:
                raise DataError(f"probe {self.name}: rank {rank} left no list of its batches in "
                                f"{self._kept.folder} (is that folder shared by every rank?)")
            for tag in tags:
                chunk = self._kept.load(tag)
                if chunk is None:
                    raise DataError(f"probe {self.name}: kept batch {tag} of rank {rank} is missing "
                                    f"from {self._kept.folder}")
                chunks.append(chunk)
        covered = len(np.unique(np.concatenate([c.positions for c in chunks]))) if chunks else 0
        if covered != self.n_selected(self.context):
            raise DataError(f"probe {self.name}: the test loop handed over {covered} of its "
                            f"{self.n_selected(self.context)} images (trainer.limit_test_batches?); "
                            "remove the limit or set the probe's max_images")
        records, arrays, exact = merge_chunks(chunks, self.image_axes, self.context.image_ids)
        if records.empty:
            raise DataError(self.no_records())
        for name, entries in arrays.items():
            self.context.store.save_array(name, entries, exact=exact.get(name, ()))
        self._write(records)

    def _write(self, records: pd.DataFrame) -> None:
        store = self.context.store
        path = store.write_records(self.name, records)
        log.info("probe %s: %d records -> %s", self.name, len(records), path)
        # Kept batches of any batching served their purpose once the records are written.
        for kept in (store.dir / PARTIAL).glob(f"{self.name}-*ranks"):
            ChunkStore(kept).clear()


def merge_chunks(chunks: list[Chunk], image_axes: dict[str, int], image_ids: np.ndarray,
                 ) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]], dict[str, tuple[str, ...]]]:
    """Batches of any ranks as one record set, as one process would have written it.

    Each test image counts once (the distributed sampler repeats a few images to even out the
    ranks): its first batch in test-split order holds it. Array entries named in `image_axes`
    are concatenated along that axis in test-split order; every other entry must be the same in
    every batch (e.g. the eps ladder), or the merge would silently drop data.
    """
    chunks = sorted(chunks, key=lambda c: int(c.positions.min()))
    owner: dict[int, int] = {}
    for i, chunk in enumerate(chunks):
        for pos in chunk.positions.tolist():
            owner.setdefault(pos, i)
    frames = []
    for i, chunk in enumerate(chunks):
        own = [pos for pos in chunk.positions.tolist() if owner[pos] == i]
        if len(chunk.records) and own:
            frames.append(chunk.records[chunk.records["image_id"].isin(image_ids[own])])
    records = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    positions = np.concatenate([c.positions for c in chunks]) if chunks else np.zeros(0, int)
    _, first = np.unique(positions, return_index=True)  # test-split order, repeats dropped
    arrays: dict[str, dict[str, np.ndarray]] = {}
    exact: dict[str, tuple[str, ...]] = {}
    for name in dict.fromkeys(n for c in chunks for n in c.arrays):
        if any(name not in c.arrays for c in chunks):
            raise RuntimeError(f"array {name} is missing from some batches; cannot merge it")
        merged = {}
        for key in chunks[0].arrays[name]:
            values = [np.asarray(c.arrays[name][key]) for c in chunks]
            if key in image_axes:
                merged[key] = np.take(np.concatenate(values, axis=image_axes[key]), first,
                                      axis=image_axes[key])
            elif all(np.array_equal(values[0], v, equal_nan=v.dtype.kind == "f") for v in values[1:]):
                merged[key] = values[0]
            else:
                raise RuntimeError(f"array {name}/{key} differs between batches but is not "
                                   f"declared per image (image_axes); cannot merge it")
        arrays[name] = merged
        exact[name] = chunks[0].exact.get(name, ())
    return records, arrays, exact

