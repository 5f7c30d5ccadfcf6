"""The tables and texts of a stimulus set: manifest.csv / .json, conditions.csv and README.md.

Everything here is a pure function of the items (pixels, fields, measures), the seed and the
repetitions: no time, no absolute path, JSON with sorted keys, PNGs from fixed settings, so the
same records give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from brainrobust.export.encoders import HELDOUT_RULE
from brainrobust.export.pixels import INTERPOLATION, png_bytes

FORMAT = 1
CONTACT_SHEET = "contact_sheet.png"

# manifest.csv's columns in order; the predicted-change columns (PREDICTED) follow them.
COLUMNS = {
    "file": "the PNG, relative to this folder: stimuli/<size>px/<stimulus>_<condition>.png",
    "sha256": "SHA-256 of the file's bytes",
    "stimulus": "stimulus id (s0000, ...); its native- and model-size files share it",
    "size_px": "side of the square image in pixels",
    "role": "native: the dataset's own resolution, for presentation; model: the encoder's input "
            "size; native+model: one file where the two sizes are equal",
    "condition": "what the stimulus is: original, or <method>_<roi>[_<norm>_eps<budget>]_"
                 "<model>_s<subject> of the encoder that made it",
    "source_stimulus": "the stimulus id of the original it was made from (its own on originals)",
    "source_file": "the original's file of the same role: the reference of psnr, ssim, "
                   "written_norm and every predicted change",
    "nsd_image_id": "0-based NSD (73k) id of the original; blank where it is no dataset image "
                    "(an MEI's noise start)",
    "method": "original, targeted_increase / targeted_decrease, mei, or the in-silico probe's "
              "method (noise, natural_top, ...)",
    "roi": "the ROI the method targets",
    "norm": "l2 or linf: the norm of budget, achieved_norm and written_norm (l2 for MEIs, which "
            "have no budget)",
    "budget": "nominal eps, in [0, 1] pixel units at the model's size; blank: unconstrained (MEI)",
    "achieved_norm": "norm of (stimulus - original) as the probe made it: float pixels at the "
                     "model's size, before writing (targeted, mei: of the images as the store "
                     "keeps them, fp16, so it can pass the budget by their rounding)",
    "written_norm": "norm of (file - source_file) as the source encoder sees them: resized to "
                    "the model's size where needed, 8-bit",
    "norm_survival": "written_norm / achieved_norm: the part of the perturbation's norm that "
                     "resizing and 8-bit rounding left (above 1: rounding added noise)",
    "kept_fraction": "projection of the written perturbation (file - source_file, as the source "
                     "encoder sees them) on the probe's float one, over the latter's squared "
                     "norm: 1 = all of it is there, 0 = rounding erased it",
    "psnr": "peak signal-to-noise ratio of file against source_file in dB, at the file's size",
    "ssim": "SSIM of file against source_file (Gaussian window 11, sigma 1.5), at the file's size",
    "converged": "the attack's convergence flag as its probe recorded it; blank where the probe "
                 "records none (targeted, mei)",
    "run_key": "results key of the run that made the stimulus (its source encoder)",
    "model": "model of the source encoder",
    "subject": "subject of the source encoder",
    "target_change_float": "the source encoder's predicted change of roi for the float stimulus "
                           "the probe made, before writing",
    "effect_survival": "pred_change_source_<roi> / target_change_float: the part of the "
                       "predicted effect on the target ROI that survived writing",
}
PREDICTED = {
    "pred_change_source_<ROI>": "predicted change of the ROI's mean response, file minus "
                                "source_file, by the source encoder (the file as the loader "
                                "reads it: Lanczos-resized to the encoder's input size)",
    "pred_change_<model>_s<subject>_<ROI>": "the same by a held-out encoder (encoders below); "
                                            "blank for stimuli of which it is the source",
}
CONDITIONS = {
    "image": "the native-size (presented) file, relative to this folder",
    "condition": "as in manifest.csv",
    "repetition": "1..repetitions: the presentation's number for that image",
    "stimulus": "stimulus id, the key into manifest.csv",
}


@dataclass(eq=False)
class Item:
    """One image of the set: a stimulus, or an original that stimuli were made from."""

    condition: str
    files: dict[str, np.ndarray]  # role -> (H, W, 3) uint8
    fields: dict[str, Any]  # the manifest's per-stimulus columns
    original: Item | None = None  # None for an original
    delta: np.ndarray | None = None  # (3, S, S) float stimulus - original at the model's size
    name: str = ""
    stem: str = ""
    measures: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> column -> value


@dataclass
class Rendered:
    files: dict[str, bytes]  # path relative to DIR -> bytes
    manifest: dict[str, Any]


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def _plain(value: Any) -> Any:
    """A cell as JSON and CSV hold it: NaN / inf become blank (None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def file_rows(items: list[Item]) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """One manifest row and one PNG per written file."""
    rows, pngs = [], {}
    for item in items:
        for role, pixels in item.files.items():
            path = f"stimuli/{pixels.shape[0]}px/{item.stem}.png"
            data = png_bytes(pixels)
            pngs[path] = data
            source = item.original or item
            row = dict.fromkeys(COLUMNS)
            row.update(item.fields)
            row.update({
                "file": path, "sha256": hashlib.sha256(data).hexdigest(), "stimulus": item.name,
                "size_px": int(pixels.shape[0]), "role": role, "condition": item.condition,
                "source_stimulus": source.name,
                "source_file": f"stimuli/{pixels.shape[0]}px/{source.stem}.png",
            })
            measures = item.measures.get(role, {})
            row.update(measures)
            if item.original is not None:
                row["norm_survival"] = _ratio(measures["written_norm"], row["achieved_norm"])
                row["effect_survival"] = _ratio(
                    measures[f"pred_change_source_{row['roi']}"], row["target_change_float"])
            rows.append({k: _plain(v) for k, v in row.items()})
    return rows, pngs


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    return [*COLUMNS, *sorted(extra, key=lambda c: (not c.startswith("pred_change_source_"), c))]


def _csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False, lineterminator="\n").encode()


def conditions(rows: list[dict[str, Any]], seed: int, repetitions: int) -> pd.DataFrame:
    """Every presented file `repetitions` times, in an order drawn from `seed`."""
    presented = [r for r in rows if r["role"] != "model"]
    trials = [(r, rep) for rep in range(1, repetitions + 1) for r in presented]
    order = np.random.default_rng(seed).permutation(len(trials))
    return pd.DataFrame([{"image": trials[i][0]["file"], "condition": trials[i][0]["condition"],
                          "repetition": trials[i][1], "stimulus": trials[i][0]["stimulus"]}
                         for i in order], columns=list(CONDITIONS))


def survival(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Median survival per role, method, norm and budget over the stimuli (not the originals)."""
    made = pd.DataFrame([r for r in rows if r["method"] != "original"])
    for col in ("budget", "kept_fraction", "effect_survival", "psnr"):
        made[col] = pd.to_numeric(made[col])
    return (made.groupby(["role", "method", "norm", "budget"], dropna=False)
            .agg(n=("file", "size"), kept_fraction=("kept_fraction", "median"),
                 effect_survival=("effect_survival", "median"), psnr=("psnr", "median"))
            .reset_index())


def _table(header: list[str], lines: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def _fmt(value: float) -> str:
    return "" if pd.isna(value) else f"{value:.3g}"


def readme(rows: list[dict[str, Any]], summary: pd.DataFrame, encoders: dict[str, str],
           seed: int, repetitions: int) -> str:
    sizes = sorted({(r["role"], r["size_px"]) for r in rows})
    heldout = [[label, key] for label, key in sorted(encoders.items())] or [["(none)", ""]]
    return "\n\n".join([
        "# Stimulus set (brainrobust export)",
        f"{len({r['stimulus'] for r in rows})} images, "
        f"{len({r['stimulus'] for r in rows if r['method'] == 'original'})} of them originals, "
        "at "
        + ", ".join(f"{size} px ({role})" for role, size in sizes) + ".",
        ("- `stimuli/<size>px/`: the images, 8-bit RGB PNG.\n"
        "- `manifest.csv`, `manifest.json`: one row per file (the JSON adds the settings).\n"
        f"- `conditions.csv`: the presentation list, every native-size file {repetitions} "
        f"time(s) in a random order drawn with seed {seed} (numpy default_rng permutation), "
        "for PsychoPy's loop (conditionsFile) or any package that reads CSV; paths are relative "
        "to this folder, so keep the experiment file here or prefix them.\n"
        f"- `{CONTACT_SHEET}`: a row per original, then the stimuli made from it, captioned with "
        "the source encoder's predicted change of the target ROI."),
        ("## How the files were made\n\n"
        "Stimuli come from the probes as float images at the model's input size. The "
        "model-size file is that image rounded to 8 bits. The native-size file is the dataset's "
        "own image plus the perturbation (stimulus - original) enlarged with "
        f"{INTERPOLATION}, then rounded to 8 bits; where the original is no dataset image it is "
        "the enlarged stimulus. Predictions are made on the files as written, read back the way "
        "the data loader reads stimuli (the same Lanczos resize to each encoder's input size)."),
        "## manifest.csv columns\n\n" + _table(
            ["column", "meaning"], [[f"`{k}`", v] for k, v in {**COLUMNS, **PREDICTED}.items()]),
        "## Held-out encoders\n\n" + _table(["label", "run key"], heldout) + "\n\n"
        + HELDOUT_RULE,
        "## conditions.csv columns\n\n" + _table(
            ["column", "meaning"], [[f"`{k}`", v] for k, v in CONDITIONS.items()]),
        "## What survived writing (medians)\n\n" + _table(
            ["role", "method", "norm", "budget", "n", "kept_fraction", "effect_survival",
             "psnr (dB)"],
            [[r.role, r.method, r.norm, _fmt(r.budget), r.n, _fmt(r.kept_fraction),
              _fmt(r.effect_survival), _fmt(r.psnr)] for r in summary.itertuples()]),
    ]) + "\n"


def render_set(items: list[Item], encoders: dict[str, str], seed: int,
               repetitions: int) -> Rendered:
    """Every file of the set but the contact sheet, and the manifest as a dict."""
    rows, files = file_rows(items)
    columns = _columns(rows)
    frame = pd.DataFrame(rows, columns=columns, dtype=object)
    summary = survival(rows)
    manifest = {
        "format": FORMAT, "seed": seed, "repetitions": repetitions,
        "interpolation": INTERPOLATION, "heldout_encoders": encoders,
        "columns": {**COLUMNS, **PREDICTED}, "conditions_columns": CONDITIONS,
        "files": [{c: row.get(c) for c in columns} for row in rows],
    }
    buf = io.StringIO()
    json.dump(manifest, buf, indent=2, sort_keys=True, allow_nan=False)
    files.update({
        "manifest.csv": _csv(frame),
        "manifest.json": (buf.getvalue() + "\n").encode(),
        "conditions.csv": _csv(conditions(rows, seed, repetitions)),
        "README.md": readme(rows, summary, encoders, seed, repetitions).encode(),
    })
    return Rendered(files=files, manifest=manifest)
