"""The paper's figures, each built from a merged results table (brainrobust.results.load).

Every function takes a long-format DataFrame and returns a matplotlib Figure; a table without the
records a figure needs raises DataError naming the run that produces them.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from brainrobust.errors import DataError


def _require(records: pd.DataFrame, probe: str, metric: str, how: str) -> pd.DataFrame:
    rows = records[(records.probe == probe) & (records.metric == metric)] if len(records) else records
    if rows.empty:
        raise DataError(f"no '{metric}' records of probe {probe!r}; run {how} first")
    return rows


def sensitivity_vs_eps(records: pd.DataFrame) -> plt.Figure:
    """Mean |s| against eps, one line per model, one panel per ROI, random control dashed."""
    adv = _require(records, "sensitivity", "abs_s", "`python run.py probe=[sensitivity]`")
    rnd = records[(records.probe == "sensitivity") & (records.metric == "random_abs_s")]
    rois = sorted(adv.roi.unique())
    fig, axes = plt.subplots(1, len(rois), figsize=(4.5 * len(rois), 3.6), squeeze=False)
    for ax, roi in zip(axes[0], rois):
        for i, (model, grp) in enumerate(adv[adv.roi == roi].groupby("model")):
            color = f"C{i % 10}"
            curve = grp.groupby("eps")["value"].agg(["mean", "sem"])
            ax.errorbar(curve.index, curve["mean"], yerr=curve["sem"], marker="o", color=color, label=model)
            ctrl = rnd[(rnd.roi == roi) & (rnd.model == model)].groupby("eps")["value"].mean()
            if len(ctrl):
                ax.plot(ctrl.index, ctrl.values, ls="--", color=color, alpha=0.6)
        ax.set(xscale="log", yscale="log", xlabel=f"eps ({adv.norm_type.iloc[0]})",
               ylabel="|r(x) - r(x+delta)|", title=f"{roi}  (dashed: random noise)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def sensitivity_vs_predictivity(records: pd.DataFrame, eps: float | None = None) -> plt.Figure:
    """The paper's main scatter: test r of the ROI mean against sensitivity at one eps, per model."""
    adv = _require(records, "sensitivity", "abs_s", "`python run.py probe=[sensitivity]`")
    pred = _require(records, "predictivity", "r_roi_mean", "`python run.py`")
    # By default the middle budget of the ladder (one that was actually run).
    eps = float(np.sort(adv.eps.unique())[len(adv.eps.unique()) // 2]) if eps is None else eps
    at = adv[np.isclose(adv.eps, eps)]
    if at.empty:
        raise DataError(f"no sensitivity records at eps={eps}; available: "
                        f"{sorted(float(e) for e in adv.eps.unique())}")
    sens = at.groupby(["model", "subject", "roi"])["value"].mean().rename("sensitivity")
    r = pred.groupby(["model", "subject", "roi"])["value"].mean().rename("test_r")
    both = pd.concat([sens, r], axis=1, join="inner").reset_index()
    rois = sorted(both.roi.unique())
    fig, axes = plt.subplots(1, len(rois), figsize=(4.5 * len(rois), 3.8), squeeze=False)
    for ax, roi in zip(axes[0], rois):
        sub = both[both.roi == roi].groupby("model")[["test_r", "sensitivity"]].mean()
        ax.scatter(sub.test_r, sub.sensitivity)
        for model, row in sub.iterrows():
            ax.annotate(model, (row.test_r, row.sensitivity), fontsize=7)
        ax.set(xlabel="test r (ROI mean)", ylabel=f"|s| at eps={eps:g}", yscale="log", title=roi)
    fig.tight_layout()
    return fig


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
