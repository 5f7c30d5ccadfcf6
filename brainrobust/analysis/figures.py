"""The paper's figures: a pure function computes each figure's data, another draws it.

Data functions take the long-format records (brainrobust.analysis.slices.load_records) and return
tidy DataFrames, one row per point of a line or scatter, so tests check the numbers and the
drawing only draws. Every figure keeps its slices apart (brainrobust.analysis.slices: norm,
objective, attack steps, other differing settings), one row of panels per slice, each panel
titled with its slice. Subjects are averaged: the mean of per-subject means, with error bars the
SEM across subjects (across images where a line has one subject), n stated in the title. Colours
come from one model -> colour map (`model_colors`), so a model looks the same in every figure.

A table without the records a figure needs raises DataError naming the run that produces them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import to_hex

from brainrobust.analysis.slices import describe, eps_label, slice_columns, split
from brainrobust.errors import DataError
from brainrobust.units import format_eps

RUN_SENSITIVITY = "`python run.py probe=[sensitivity]`"
RESPONSE_UNITS = "ROI-mean response, z units"


def model_colors(models: Iterable[str]) -> dict[str, str]:
    """One colour per model, from the sorted names: the same map for every figure of a report."""
    names = sorted({str(m) for m in models if pd.notna(m)})
    if len(names) <= 20:
        cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
        return {name: to_hex(cmap(i)) for i, name in enumerate(names)}
    return {name: to_hex(c) for name, c in zip(names, plt.get_cmap("turbo")(
        np.linspace(0.05, 0.95, len(names))), strict=True)}


def _metric(records: pd.DataFrame, probe: str, metric: str) -> pd.DataFrame:
    return records[(records.probe == probe) & (records.metric == metric)] if len(records) else records


def _require(records: pd.DataFrame, probe: str, metric: str, how: str) -> pd.DataFrame:
    rows = _metric(records, probe, metric)
    if rows.empty:
        raise DataError(f"no '{metric}' records of probe {probe!r}; run {how} first")
    return rows


def _over_subjects(per_subject: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """Mean over subjects of per-subject `value`, its SEM across subjects (NaN for one) and n."""
    g = per_subject.groupby(by, dropna=False)[value]
    return pd.DataFrame({value: g.mean(), f"{value}_sem": g.sem(), "n_subjects": g.count()})


def sensitivity_curves(records: pd.DataFrame) -> pd.DataFrame:
    """Mean |s| per slice, ROI, model and eps: one row per point of `sensitivity_vs_eps`.

    Columns: the slice columns, roi, model, eps, mean, err (SEM across subjects, across images
    where n_subjects is 1), err_over ('subjects' or 'images'), n_subjects, control (mean random
    noise |s| of the same norm, NaN without control records).
    """
    rows = _require(records, "sensitivity", "abs_s", RUN_SENSITIVITY)
    keys = slice_columns(rows)
    # The stimulus size labels the L2 axis even where it is the same for every slice.
    size = ["image_size"] if "image_size" in rows and "image_size" not in keys else []
    by = [*keys, *size, "roi", "model", "eps"]
    per_subject = rows.groupby([*by, "subject"], dropna=False)["value"].agg(["mean", "sem"])
    curves = _over_subjects(per_subject.reset_index(), by, "mean")
    one = curves.n_subjects == 1
    image_sem = per_subject["sem"].groupby(by, dropna=False).first()
    curves["err"] = curves["mean_sem"].where(~one, image_sem)
    curves["err_over"] = np.where(one, "images", "subjects")
    control = _metric(records, "sensitivity", "random_abs_s")
    curves["control"] = (control.groupby([*by, "subject"], dropna=False)["value"].mean()
                         .groupby(by, dropna=False).mean()) if len(control) else np.nan
    return curves.drop(columns="mean_sem").reset_index()


def predictivity_points(records: pd.DataFrame, eps: float | None = None) -> pd.DataFrame:
    """Sensitivity and test r per slice, ROI and model at one eps per slice.

    The eps is `eps` where given, else the budget most (model, ROI) pairs of the slice ran (the
    ladder's middle one among ties). Each run's sensitivity is paired with its own test r.
    Columns: the slice columns, eps, roi, model, sensitivity, sensitivity_sem, test_r,
    test_r_sem, n_subjects, note (why a pair has no point; empty where it has one).
    """
    rows = _require(records, "sensitivity", "abs_s", RUN_SENSITIVITY)
    pred = _require(records, "predictivity", "r_roi_mean", "`python run.py`")
    join = [c for c in ("run_key", "model", "subject", "roi") if c in rows and c in pred]
    test_r = pred.groupby(join)["value"].mean().rename("test_r")
    frames = []
    for slice_, grp in split(rows):
        budget = _budget(grp, eps)
        at = grp[np.isclose(grp.eps, budget)] if budget is not None else grp.iloc[:0]
        per_run = at.groupby(join)["value"].mean().rename("sensitivity").to_frame().join(test_r)
        # A subject's runs of one slice (e.g. one run per ROI group) are one subject.
        by = ["model", "roi"]
        per_subject = per_run.groupby([*by, "subject"])[["sensitivity", "test_r"]].mean()
        per_subject = per_subject.reset_index()
        points = (grp[by].drop_duplicates().set_index(by)
                  .join(_over_subjects(per_subject, by, "sensitivity"))
                  .join(_over_subjects(per_subject, by, "test_r").drop(columns="n_subjects")))
        what = format_eps(eps if budget is None else budget, slice_.get("norm_type"))
        points["note"] = np.where(points.sensitivity.isna(), f"no sensitivity records at eps={what}",
                                  np.where(points.test_r.isna(), "no predictivity (r_roi_mean) "
                                           "record of the same run", ""))
        frames.append(points.reset_index().assign(**slice_, eps=budget))
    points = pd.concat(frames, ignore_index=True)
    if eps is not None and points.eps.isna().all():
        available = {describe(s): [format_eps(e, s.get("norm_type")) for e in sorted(g.eps.unique())]
                     for s, g in split(rows)}
        raise DataError(f"no sensitivity records at eps={eps:g}; available: {available}")
    if (points.note != "").all():
        raise DataError("no sensitivity record has a predictivity (r_roi_mean) record of the same "
                        "run; rerun those runs with `python run.py`")
    return points


def _budget(grp: pd.DataFrame, eps: float | None) -> float | None:
    ladder = np.sort(grp.eps.unique())
    if eps is not None:
        match = ladder[np.isclose(ladder, eps)]
        return float(match[0]) if len(match) else None
    cover = grp.drop_duplicates(["eps", "model", "roi"]).groupby("eps").size()
    middle = len(ladder) // 2
    best = max(range(len(ladder)), key=lambda i: (cover[ladder[i]], -abs(i - middle)))
    return float(ladder[best])


def not_converged(records: pd.DataFrame) -> pd.DataFrame:
    """Fraction of sensitivity records flagged not converged (converged == 0) per slice, model,
    ROI and eps, with n the records behind it; empty where the records carry no flags."""
    rows = _metric(records, "sensitivity", "converged")
    by = [*slice_columns(rows), "model", "roi", "eps"]
    flags = (rows.value == 0).groupby([rows[c] for c in by], dropna=False)
    return pd.DataFrame({"fraction": flags.mean(), "n": flags.count()}).reset_index()


# ---- drawing ---------------------------------------------------------------------------------

def _panels(data: pd.DataFrame, columns: list[str], width: float, height: float):
    """A figure with one row per slice (by `columns`) and one panel per ROI of it:
    (fig, [(ax, slice, roi, rows)])."""
    slices = [(s, list(g.groupby("roi"))) for s, g in split(data, columns)]
    n_cols = max(len(rois) for _, rois in slices)
    fig, axes = plt.subplots(len(slices), n_cols, figsize=(width * n_cols, height * len(slices)),
                             squeeze=False)
    panels = []
    for row, (slice_, rois) in enumerate(slices):
        for col in range(n_cols):
            if col < len(rois):
                panels.append((axes[row][col], slice_, *rois[col]))
            else:
                fig.delaxes(axes[row][col])
    return fig, panels


def _subjects(panel: pd.DataFrame) -> tuple[str, bool]:
    """What the error bars are over, and whether n differs between the models of a panel."""
    ns = sorted(panel.n_subjects.dropna().astype(int).unique())
    if ns == [1]:
        return "n = 1 subject, ± SEM across images", False
    if len(ns) == 1:
        return f"mean ± SEM across n = {ns[0]} subjects", False
    single = "; n = 1: SEM across images" if ns[0] == 1 else ""
    return f"mean ± SEM across n = {ns[0]}-{ns[-1]} subjects (n per model in legend{single})", True


def _label(model: str, line: pd.DataFrame, with_n: bool) -> str:
    return f"{model} (n={int(line.n_subjects.iloc[0])})" if with_n else model


def plot_curves(curves: pd.DataFrame, colors: Mapping[str, str] | None = None) -> plt.Figure:
    """`sensitivity_curves` drawn: |s| against eps, a line per model, dashed random control."""
    colors = colors or model_colors(curves.model)
    fig, panels = _panels(curves, slice_columns(curves), 4.8, 3.9)
    for ax, slice_, roi, panel in panels:
        note, with_n = _subjects(panel)
        for model, line in panel.groupby("model"):
            line = line.sort_values("eps")
            ax.plot(line.eps, line["mean"], marker="o", color=colors[model],
                    label=_label(model, line, with_n))
            ax.errorbar(line.eps, line["mean"], yerr=line.err, fmt="none", ecolor=colors[model])
            ax.plot(line.eps, line.control, ls="--", color=colors[model], alpha=0.6)
        norm = slice_.get("norm_type")
        ladder = np.sort(panel.eps.unique())
        ax.set(xscale="log", yscale="log", xlabel=eps_label(norm, _image_size(panel)),
               ylabel=f"|s| ({RESPONSE_UNITS})")
        ax.set_xticks(ladder, [format_eps(e, norm) for e in ladder])
        ax.minorticks_off()
        ax.set_title(f"{describe(slice_)}\n{roi}: {note}", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("Adversarial sensitivity |s| = |r(x) - r(x + delta)| against the budget "
                 "(dashed: random noise of the same norm and size)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_points(points: pd.DataFrame, colors: Mapping[str, str] | None = None) -> plt.Figure:
    """`predictivity_points` drawn: |s| against test r, a point per model with SEM bars."""
    drawn = points[points.note == ""]
    colors = colors or model_colors(drawn.model)
    # Slices of every point, drawn or not: a title names a setting even if only its
    # undrawn slice differed.
    fig, panels = _panels(drawn, slice_columns(points), 4.8, 4.0)
    for ax, slice_, roi, panel in panels:
        note, with_n = _subjects(panel)
        eps = format_eps(panel.eps.iloc[0], slice_.get("norm_type"))
        for model, point in panel.groupby("model"):
            ax.errorbar(point.test_r, point.sensitivity, xerr=point.test_r_sem,
                        yerr=point.sensitivity_sem, fmt="none", ecolor=colors[model])
            ax.scatter(point.test_r, point.sensitivity, color=colors[model],
                       label=_label(model, point, with_n))
        ax.set(yscale="log", xlabel="test r (Pearson, ROI-mean response, held-out images)",
               ylabel=f"|s| at eps={eps} ({RESPONSE_UNITS})")
        ax.set_title(f"{describe(slice_)}, eps={eps}\n{roi}: {note}", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("Sensitivity against predictivity, per model", fontsize=9)
    fig.tight_layout()
    return fig


def _image_size(panel: pd.DataFrame):
    sizes = panel["image_size"].dropna().unique() if "image_size" in panel else []
    return sizes[0] if len(sizes) == 1 else None


def sensitivity_vs_eps(records: pd.DataFrame, colors: Mapping[str, str] | None = None) -> plt.Figure:
    """Mean |s| against eps: a row of ROI panels per slice, a line per model."""
    return plot_curves(sensitivity_curves(records), colors)


def sensitivity_vs_predictivity(records: pd.DataFrame, eps: float | None = None,
                                colors: Mapping[str, str] | None = None) -> plt.Figure:
    """The paper's main scatter: test r of the ROI mean against |s| at one eps per slice."""
    return plot_points(predictivity_points(records, eps), colors)


def matrix_heatmap(matrix: pd.DataFrame, title: str, label: str, vmin: float | None = None,
                   vmax: float | None = None, baseline: float | None = None) -> plt.Figure:
    """A labelled heatmap of a square or rectangular matrix (transfer, subspace similarity)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 2.5 + 0.7 * matrix.shape[1]),
                                    max(4.0, 2.0 + 0.55 * matrix.shape[0])))
    im = ax.imshow(matrix.values.astype(float), cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(matrix.shape[0]), [str(i) for i in matrix.index], fontsize=7)
    ax.set_xlabel(matrix.columns.name or "")
    ax.set_ylabel(matrix.index.name or "")
    for (i, j), v in np.ndenumerate(matrix.values.astype(float)):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="w")
    full_title = title if baseline is None else f"{title}\n(random baseline {baseline:.2g})"
    ax.set_title(full_title, fontsize=9)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    return fig
