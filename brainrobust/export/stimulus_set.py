"""`export_stimulus_set`: the stimuli of some runs, written as a set a real experiment can show.

For every stimulus (and once for every image they were made from, the originals):

1. its pixels are written as 8-bit PNGs at the dataset's native resolution and at the model's
   input size (one file where the two are equal; see `pixels` for the resizing);
2. every encoder (the source run's and the held-out ones, see `encoders`) predicts its response
   to each written file as the file is, re-read the way the loader reads stimuli, and the change
   from the written original is recorded per ROI, with how much of the perturbation's norm and
   of its predicted effect survived the rounding and resizing;
3. the manifest, the conditions file, the README and a contact sheet go beside them.

The whole set is built in a hidden folder beside DIR and renamed onto DIR at the end, so an
interrupted export leaves no partial set; DIR must be empty unless `force`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainrobust.analysis.media import labelled_grid
from brainrobust.data.datamodule import to_float_images
from brainrobust.errors import BrainRobustError, DataError
from brainrobust.export.encoders import Place, Rebuilt, encoder_label, heldout_runs, rebuild
from brainrobust.export.manifest import CONTACT_SHEET, Item, render_set
from brainrobust.export.pixels import enlarge, model_view, native_versions, quantise
from brainrobust.export.sources import ADAPTERS, Stimuli, find_runs, run_stimuli
from brainrobust.files import unwritable, write_bytes
from brainrobust.probes.image_selection import predicted_responses
from brainrobust.probes.perceptual import l2, linf, psnr, ssim

NORMS = {"l2": l2, "linf": linf}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def _condition(s: Stimuli, i: int, columns: dict[str, Any]) -> str:
    budget = f"_{s.norm[i]}_eps{s.budget[i]:g}" if np.isfinite(s.budget[i]) else ""
    return f"{s.method[i]}_{s.roi[i]}{budget}_{encoder_label(columns)}"


def _roles(native_size: int, model_size: int) -> tuple[str, ...]:
    return ("native+model",) if native_size == model_size else ("native", "model")


class Assembly:
    """The items of the set and the encoders that predict them, run by run."""

    def __init__(self, place: Place):
        self.place = place
        self.originals: dict[tuple, Item] = {}
        self.stimuli: list[Item] = []
        self.encoders: dict[str, Rebuilt] = {}  # run key -> rebuilt encoder, shared across runs
        self.heldout: dict[str, dict[str, str]] = {}  # source run key -> {label: run key}

    def encoder(self, run) -> Rebuilt:
        if run.key not in self.encoders:
            self.encoders[run.key] = rebuild(run, self.place)
        return self.encoders[run.key]

    def add_run(self, store, run, s: Stimuli) -> None:
        source = self.encoder(run)
        size, native = int(s.images.shape[-1]), source.native_size
        if size != source.encoder.input_size:
            raise DataError(f"run {run.key} stores {size} px stimuli but its encoder takes "
                            f"{source.encoder.input_size} px; rerun it with force=true")
        roles = _roles(native, size)
        model_files, model_sources = quantise(s.images), quantise(s.sources)
        if roles == ("native", "model"):
            has_id = s.image_id >= 0
            native_sources = enlarge(s.sources, native)
            if has_id.any():
                native_sources[has_id] = to_float_images(
                    source.native_images(s.image_id[has_id])).numpy()
            native_files = native_versions(s.images, s.sources, native_sources, native)
            native_originals = quantise(native_sources)
        heldout = heldout_runs(store, run)
        self.heldout[run.key] = {label: other.key for label, other in sorted(heldout.items())}
        # Float-image prediction of the target ROI: what the written file's effect is compared to.
        float_change = self._target_change(source, s)
        for i in range(len(s.images)):
            image_id = int(s.image_id[i])
            key = (image_id, size) if image_id >= 0 else (
                hashlib.sha256(model_sources[i].tobytes()).hexdigest(), size)
            if key not in self.originals:
                files = ({"native": native_originals[i], "model": model_sources[i]}
                         if len(roles) == 2 else {"native+model": model_sources[i]})
                self.originals[key] = Item("original", files, {
                    "method": "original", "nsd_image_id": image_id if image_id >= 0 else None})
            files = ({"native": native_files[i], "model": model_files[i]}
                     if len(roles) == 2 else {"native+model": model_files[i]})
            self.stimuli.append(Item(_condition(s, i, run.columns), files, {
                "method": s.method[i], "roi": s.roi[i], "norm": s.norm[i],
                "budget": float(s.budget[i]), "achieved_norm": float(s.achieved_norm[i]),
                "converged": s.converged[i], "nsd_image_id": image_id if image_id >= 0 else None,
                "run_key": run.key, "model": run.columns.get("model"),
                "subject": run.columns.get("subject"),
                "target_change_float": float(float_change[i]),
            }, original=self.originals[key], delta=s.images[i] - s.sources[i]))
        for other in heldout.values():
            self.encoder(other)

    @staticmethod
    def _target_change(source: Rebuilt, s: Stimuli) -> np.ndarray:
        out = np.empty(len(s.images))
        for roi in sorted(set(s.roi)):
            rows = np.flatnonzero(np.asarray(s.roi) == roi)
            x = torch.from_numpy(s.images[rows])
            x0 = torch.from_numpy(s.sources[rows])
            out[rows] = (predicted_responses(source.encoder, x, roi)
                         - predicted_responses(source.encoder, x0, roi)).double().numpy()
        return out

    def name_items(self) -> list[Item]:
        """Originals first, then stimuli; each named by its number, condition and source id."""
        items = [*self.originals.values(), *self.stimuli]
        for n, item in enumerate(items):
            image_id = item.fields.get("nsd_image_id")
            suffix = f"_nsd{image_id:05d}" if image_id is not None else ""
            item.name = f"s{n:04d}"
            item.stem = _slug(f"{item.name}_{item.condition}{suffix}")
        return items

    def measure(self) -> None:
        """For every stimulus file: PSNR and SSIM against its written original at the file's
        size; the norm of what survived, as the source encoder sees the two files; and each
        encoder's predicted change per ROI from the original (source and held-out)."""
        by_run: dict[str, list[Item]] = {}
        for item in self.stimuli:
            by_run.setdefault(item.fields["run_key"], []).append(item)
        for key, items in by_run.items():
            source = self.encoders[key]
            encoders = {"source": source, **{label: self.encoders[other]
                                             for label, other in self.heldout[key].items()}}
            for role in items[0].files:
                files = np.stack([it.files[role] for it in items])
                originals = np.stack([it.original.files[role] for it in items])
                values: dict[str, np.ndarray] = {
                    "psnr": psnr(to_float_images(files), to_float_images(originals)).numpy(),
                    "ssim": ssim(to_float_images(files), to_float_images(originals)).numpy()}
                size = source.encoder.input_size
                seen, seen0 = model_view(files, size), model_view(originals, size)
                by_norm = {norm: f(seen, seen0).numpy() for norm, f in NORMS.items()}
                values["written_norm"] = np.array(
                    [by_norm[it.fields["norm"]][j] for j, it in enumerate(items)])
                intended = torch.from_numpy(np.stack([it.delta for it in items])).double()
                kept = ((seen - seen0).double() * intended).flatten(1).sum(1)
                values["kept_fraction"] = (kept / intended.flatten(1).pow(2).sum(1)).numpy()
                for label, rebuilt in encoders.items():
                    enc = rebuilt.encoder
                    x, x0 = model_view(files, enc.input_size), model_view(originals, enc.input_size)
                    for roi in sorted(enc.rois):
                        values[f"pred_change_{label}_{roi}"] = (
                            predicted_responses(enc, x, roi)
                            - predicted_responses(enc, x0, roi)).double().numpy()
                for j, it in enumerate(items):
                    it.measures[role] = {name: float(v[j]) for name, v in values.items()}


def check_out(out: Path, force: bool) -> None:
    """Refuse a DIR that is a file, or holds anything, unless `force`: never replace silently."""
    if out.exists() and not out.is_dir():
        raise BrainRobustError(f"--out {out} is a file; name a folder for the stimulus set")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BrainRobustError(f"{out} is not empty; choose another --out or pass --force to "
                               "replace what it holds")


@contextlib.contextmanager
def replacing(out: Path) -> Iterator[Path]:
    """A new hidden folder beside `out`; when the block succeeds it becomes `out` (whatever
    `out` held is removed only after that rename), else it is removed."""
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    try:
        tmp.mkdir(parents=True)
        yield tmp
        old = out.parent / f".{out.name}.{secrets.token_hex(6)}.old"
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise unwritable(out, err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_stimulus_set(target: str, out: str | Path, root: str | Path = "results",
                        place: Place | None = None, seed: int = 0, repetitions: int = 1,
                        force: bool = False) -> dict[str, Any]:
    """Write the stimuli of the run(s) `target` names as a stimulus set in `out`.

    Returns the manifest (what manifest.json holds).
    """
    out = Path(out)
    if repetitions < 1:
        raise BrainRobustError(f"--repetitions must be >= 1, got {repetitions}")
    check_out(out, force)
    assembly = Assembly(place or Place())
    runs = find_runs(target, root)
    for store, run in runs:
        stimuli = run_stimuli(run)
        if stimuli is not None:
            assembly.add_run(store, run, stimuli)
    if not assembly.stimuli:
        keys = ", ".join(run.key for _, run in runs) or "none found"
        raise BrainRobustError(
            f"{target} holds no stimuli to export (runs: {keys}); arrays of the "
            f"{', '.join(ADAPTERS)} probes are exported: run e.g. python run.py "
            "probe=[targeted] first")
    items = assembly.name_items()
    assembly.measure()
    encoders = {label: key for heldout in assembly.heldout.values()
                for label, key in heldout.items()}
    rendered = render_set(items, encoders, seed, repetitions)
    with replacing(out) as tmp:
        for relpath, data in rendered.files.items():
            write_bytes(tmp / relpath, data)
        contact_sheet(items, tmp / CONTACT_SHEET)
    return rendered.manifest


def _caption(item: Item) -> str:
    if item.original is None:
        image_id = item.fields.get("nsd_image_id")
        return f"{item.name} original" + (f" nsd{image_id}" if image_id is not None else "")
    f = item.fields
    budget = f" eps {f['budget']:g}" if np.isfinite(f["budget"]) else ""
    role = next(iter(item.files))
    change = item.measures[role][f"pred_change_source_{f['roi']}"]
    return f"{item.name} {f['method']}{budget}\n{f['roi']} {change:+.3f}"


def contact_sheet(items: list[Item], path: Path) -> Path:
    """A row per original: the original, then the stimuli made from it, as presented (the
    native-size files), each captioned with its source encoder's written predicted change."""
    rows, captions, labels = [], [], []
    for original in (it for it in items if it.original is None):
        row = [original, *(it for it in items if it.original is original)]
        rows.append([it.files[next(iter(it.files))] for it in row])
        captions.append([_caption(it) for it in row])
        labels.append(original.name)
    return labelled_grid(rows, path, row_labels=labels, captions=captions)
