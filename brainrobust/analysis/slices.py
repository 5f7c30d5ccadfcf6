"""Which records may share a figure, and how a slice, a budget and its axis are labelled.

A slice is one value of everything that changes a probe's numbers apart from the model, subject,
ROI and budget: the norm, objective, attack method and steps of the records, and every other run setting
that differs between the runs of that probe (max_images, the PGD step size, the stimulus size...).
Figures group by `slice_columns` and never pool across them.

`load_records(root)` is `brainrobust.results.store.load` with those settings added from each
run's identity (run.json): a `cfg.<setting>` column per setting that differs between the runs of
a probe (probe settings without their `probe.<name>.` prefix, e.g. `cfg.max_images`), and
`image_size`, the stimulus size S that L2 budgets refer to.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from brainrobust.results.store import ResultsStore, load

# Record columns of a slice, always named in its title.
CORE = ("norm_type", "objective", "attack_method", "attack_steps")
# Record columns that split a slice only where they differ: replicate seeds, stimulus size.
EXTRA = ("seed", "image_size")
SETTING = "cfg."
NORM_LABELS = {"l2": "L2", "linf": "L-inf"}
METHOD_LABELS = {"apgd": "Auto-PGD", "pgd": "PGD", "cosine": "cosine-annealed"}

# Identity entries that define no slice: the encoder (the model column), the subject (averaged
# or faceted), the ROIs (a record column), the budget ladder (the x axis), entries that the
# records or the probe's own copy carry (seed, image size, attack, epsilon norm) and the name of
# the experiment file that set them.
NOT_SETTINGS = ("model", "subject", "seed", "roi", "epsilon", "attack", "experiment_name",
                "data.subject", "data.rois", "data.image_size")
# Probe entries that define no slice: the ladder, the ROI subset, how work is batched or saved,
# and the entries the records carry as columns (norm_type, objective, attack_method,
# attack_steps, kind).
NOT_PROBE_SETTINGS = ("eps", "rois", "batch_size", "save_perturbations", "attack.norm",
                      "attack.method", "attack.steps", "objective", "norm", "kind")


def load_records(root: str | Path) -> pd.DataFrame:
    """Every record under `root`, with the settings that tell its slices apart."""
    return annotate(load(root), ResultsStore(root).runs())


def annotate(records: pd.DataFrame, runs: list[dict[str, Any]]) -> pd.DataFrame:
    """`records` plus `image_size` and the varying `cfg.*` settings of the `runs` behind them."""
    identities = {r["key"]: r.get("identity") or {} for r in runs}
    frames = [_with_settings(rows, str(probe), identities)
              for probe, rows in records.groupby("probe", sort=False)]
    return _split_layers(pd.concat(frames, ignore_index=True))


def _with_settings(rows: pd.DataFrame, probe: str, identities: dict[str, dict]) -> pd.DataFrame:
    table = pd.DataFrame([{"run_key": key, **settings(identities.get(key, {}), probe)}
                          for key in rows.run_key.unique()], dtype=object)
    varying = [c for c in table if c.startswith(SETTING) and table[c].nunique(dropna=False) > 1]
    keep = ["run_key", *(["image_size"] if "image_size" in table else []), *varying]
    return rows.merge(table[keep], on="run_key", how="left")


def settings(identity: Mapping[str, Any], probe: str) -> dict[str, Any]:
    """The slice-defining settings of one run for the records of `probe`."""
    own = f"probe.{probe}."
    out = {"image_size": identity.get("data", {}).get("image_size")}
    for key, value in _flatten(identity).items():
        if key.endswith("_target_"):
            continue
        if key.startswith(own):
            name = key[len(own):]
            if not _under(name, NOT_PROBE_SETTINGS):
                out[SETTING + name] = value
        elif not key.startswith("probe.") and not _under(key, NOT_SETTINGS):
            out[SETTING + key] = value
    return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            # Lists (e.g. readout alphas) as text, so they compare and group like scalars.
            out[prefix + str(key)] = json.dumps(value) if isinstance(value, list | Mapping) else value
    return out


def _split_layers(records: pd.DataFrame) -> pd.DataFrame:
    """A model probed at several layers is several encoders: they become 'model [layer]'."""
    if "layer" not in records:
        return records
    layers = records.dropna(subset=["model", "layer"]).groupby("model")["layer"].nunique()
    several = records.model.isin(layers[layers > 1].index) & records.layer.notna()
    records.loc[several, "model"] = (records.model[several].astype(str) + " ["
                                     + records.layer[several].astype(str) + "]")
    return records


def slice_columns(data: pd.DataFrame) -> list[str]:
    """The columns whose values tell the slices of `data` apart."""
    # Merged tables leave other probes' core columns empty (transfer has no attack steps).
    core = [c for c in CORE if c in data and data[c].notna().any()]
    others = [*EXTRA, *sorted(c for c in data if c.startswith(SETTING))]
    return core + [c for c in others if c in data and data[c].nunique(dropna=False) > 1]


def split(data: pd.DataFrame,
          columns: list[str] | None = None) -> Iterator[tuple[dict[str, Any], pd.DataFrame]]:
    """(slice, its rows) for every slice of `data` (by `columns`, default its slice columns)."""
    columns = slice_columns(data) if columns is None else columns
    if data.empty:
        return
    if not columns:
        yield {}, data
        return
    for key, rows in data.groupby(columns, dropna=False, sort=True):
        yield dict(zip(columns, key, strict=True)), rows


def _value(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "unset"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def describe(slice_: Mapping[str, Any]) -> str:
    """A slice as a title, e.g. 'L-inf, objective abs, Auto-PGD, 100 steps, max_images=50'."""
    parts = []
    for name, value in slice_.items():
        if name == "norm_type":
            parts.append(NORM_LABELS.get(value, _value(value)))
        elif name == "objective":
            parts.append(f"objective {_value(value)}")
        elif name == "attack_method":
            parts.append(METHOD_LABELS.get(value, _value(value)))
        elif name == "attack_steps":
            parts.append(f"{_value(value)} steps")
        else:
            parts.append(f"{name.removeprefix(SETTING)}={_value(value)}")
    return ", ".join(parts)


def slug(slice_: Mapping[str, Any]) -> str:
    """A slice as part of a file name, e.g. 'linf_abs_apgd_100steps_max_images-50'."""
    parts = [_value(v) + ("steps" if k == "attack_steps" else "") if k in CORE
             else f"{k.removeprefix(SETTING)}-{_value(v)}" for k, v in slice_.items()]
    return "_".join("".join(c if c.isalnum() or c in ".-" else "-" for c in p) for p in parts)


def eps_label(norm: str | None, image_size: Any = None) -> str:
    """The budget axis label, with its units."""
    if norm == "linf":
        return "eps (L-inf, multiples of 1/255 of the [0, 1] pixel range)"
    size = (f"{_value(image_size)} x {_value(image_size)}" if _value(image_size) != "unset"
            else "the native stimulus size")
    return f"eps ({NORM_LABELS.get(norm, norm or 'norm')}, pixel units in [0, 1] at {size})"
