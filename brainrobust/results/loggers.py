"""What a run sends to its Lightning loggers (CSV, W&B), read back from the results store.

Sending from the store rather than from inside the probes means a run that a sweep finds
complete still reaches the dashboard, with exactly the numbers a fresh run would send: every
run of a sweep, cached or not, is one row of the W&B runs table.

Names are chosen for grouping in a runs table: the config carries model, subject, ROIs,
robustness and the attack settings; the summary carries one scalar per probe, ROI, setting
(norm, eps, ...) and metric, e.g. `sensitivity/FFA/l2_eps0.1/abs_s` or `predictivity/FFA/r`.
`docs/wandb_panels.yaml` lists the dashboard's panels over these names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from brainrobust.results.store import RunStore
from brainrobust.units import format_eps

# The sensitivity-vs-eps chart's lines.
CURVES = {"abs_s": "attack", "random_abs_s": "random noise"}


def setting_name(row: Mapping[str, Any]) -> str:
    """`direction=decrease/l2_eps0.1`: one path segment per setting column, the norm and eps
    together (`linf_eps0.5|255`), so a panel can pick one by name."""
    parts = [f"{c}={row[c]}" for c in row if c not in ("eps", "norm_type")]
    norm = row.get("norm_type")
    if pd.notna(row.get("eps", float("nan"))):
        eps = format_eps(float(row["eps"]), str(norm)).replace("/", "|")
        parts.append(f"{norm}_eps{eps}" if norm else f"eps{eps}")
    elif norm:
        parts.append(str(norm))
    return "/".join(parts)


def scalars(probe: str, records: pd.DataFrame, settings: Sequence[str]) -> dict[str, float]:
    """The mean of each metric per ROI and setting, keyed probe/ROI/setting/metric.

    `settings` are the record columns that, with the ROI, make one setting (the probe's
    `settings`): a scalar never averages over two eps, norms or sources.
    """
    if "roi" not in records.columns or records.empty:
        return {}
    settings = [c for c in settings if c in records.columns]
    means = records.groupby(["roi", *settings, "metric"], dropna=False)["value"].mean()
    out = {}
    for (roi, *values, metric), value in means.items():
        setting = setting_name(dict(zip(settings, values)))
        out["/".join(p for p in (probe, str(roi), setting, str(metric)) if p)] = float(value)
    return out


def predictivity_scalars(records: pd.DataFrame) -> dict[str, float]:
    roi_level = records[records.voxel == -1]
    named = {"r_roi_mean": "r", "r_roi_mean_nc": "r_nc", "r_voxel_median": "r_voxel_median",
             "n_images": "n_images"}
    return {f"predictivity/{row.roi}/{named[row.metric]}": float(row.value)
            for row in roi_level.itertuples() if row.metric in named}


def run_config(store: RunStore, config: Mapping[str, Any]) -> dict[str, Any]:
    """Flat fields a runs table groups by, then the whole resolved config under `config`."""
    return {**store.columns, "run_key": store.key, "robust": bool(config["model"].get("robust", False)),
            "norm": config["attack"].get("norm"), "attack_steps": config["attack"].get("steps"),
            "config": dict(config)}


def send(loggers: Iterable[Any], store: RunStore, probes: Mapping[str, Sequence[str]],
         config: Mapping[str, Any]) -> None:
    """Hyperparameters, every stored probe's scalars and, for W&B, tables and charts.

    `probes` maps each probe of the run to its setting columns (`Probe.settings`)."""
    loggers = list(loggers)
    if not loggers:
        return
    metrics = predictivity_scalars(store.read_records("predictivity"))
    frames = {}
    for probe, settings in probes.items():
        if store.has_records(probe):
            frames[probe] = store.read_records(probe)
            metrics.update(scalars(probe, frames[probe], settings))
    for lg in loggers:
        lg.log_hyperparams(run_config(store, config))
        lg.log_metrics(metrics)
        if hasattr(lg, "log_table"):
            _wandb_extras(lg, frames)
        lg.save()


def _wandb_extras(lg: Any, frames: Mapping[str, pd.DataFrame]) -> None:
    """Per probe the records as a table (capped), and per ROI and norm a sensitivity-vs-eps chart."""
    import wandb

    for probe, records in frames.items():
        lg.log_table(key=f"{probe}/records", dataframe=records.head(20_000))
    sens = frames.get("sensitivity")
    if sens is None:
        return
    curves = (sens[sens.metric.isin(list(CURVES))]
              .groupby(["roi", "norm_type", "metric", "eps"])["value"].mean().reset_index())
    for (roi, norm), grp in curves.groupby(["roi", "norm_type"]):
        wide = grp.pivot(index="eps", columns="metric", values="value").reset_index()
        present = [m for m in CURVES if m in wide]
        chart = wandb.plot.line_series(
            xs=wide.eps.tolist(), ys=[wide[m].tolist() for m in present],
            keys=[CURVES[m] for m in present], title=f"{roi}: mean |s| vs eps ({norm})",
            xname=f"eps ({norm})")
        lg.experiment.log({f"sensitivity/{roi}/{norm}/vs_eps": chart})
