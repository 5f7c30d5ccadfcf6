"""The in-silico validation's numbers and figures (probe `insilico`, docs/insilico.md).

Records hold one row per stimulus x scorer. Here each stimulus first gets one value per scorer
kind (the mean over the scorers of that kind: held-out subjects, models, the brain's subjects),
then every condition (method, norm, budget) gets, per scorer kind, the mean over its stimuli of

    change       the target ROI's change from the source image, in test-set SD units
    selectivity  that change minus the mean change of the other ROIs (SD units)
    intended     the fraction of stimuli that move the ROI the way the method aims

with 95% percentile bootstrap intervals over the stimuli (images). `ranking` asks whether the
held-out encoders rank the conditions as the true brain does: Spearman's rho between the two
kinds' mean effects in the intended direction across conditions, its interval from the same
resampled stimuli for both.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from brainrobust.errors import DataError
from brainrobust.units import format_eps

KINDS = ("source", "other_subject", "other_model", "other_both", "brain")
KIND_LABELS = {"source": "source (made it; reference)", "other_subject": "same model, other subjects",
               "other_model": "other models, same subject", "other_both": "other models and subjects",
               "brain": "synthetic brain (truth)"}
KIND_COLORS = {"source": "#999999", "other_subject": "#1f77b4", "other_model": "#ff7f0e",
               "other_both": "#2ca02c", "brain": "#d62728"}
HELD_OUT = ("other_subject", "other_model", "other_both")
METHODS = ("targeted_increase", "targeted_decrease", "noise", "mei", "natural_top",
           "natural_bottom")
METRICS = {"change": ("value", "target ROI change (test-set SD)"),
           "selectivity": ("selectivity_sd", "selectivity: target - mean other ROIs (SD)"),
           "intended": ("intended", "fraction moved the intended way")}
SIGN = {"targeted_increase": 1, "targeted_decrease": -1, "noise": 1, "mei": 1,
        "natural_top": 1, "natural_bottom": -1}
CONDITION = ["source_model", "roi", "method", "norm_type", "eps"]
RUN_INSILICO = "experiments/insilico.sh (or python run.py experiment=insilico)"


def condition_label(method: str, norm: str, eps: float) -> str:
    if pd.isna(eps):
        return method.replace("_", " ")
    return f"{method.replace('_', ' ')} {norm} {format_eps(float(eps), norm)}"


def per_stimulus(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (source run, stimulus, scorer kind): means over that kind's scorers."""
    rows = records[(records.probe == "insilico") & (records.metric == "roi_change_sd")]
    if rows.empty:
        raise DataError(f"no insilico records; run {RUN_INSILICO} first")
    rows = rows.assign(intended=rows.intended.astype(float))
    keys = ["run_key", "stimulus", "scorer_kind", *CONDITION]
    return (rows.groupby(keys, dropna=False)[["value", "selectivity_sd", "intended"]].mean()
            .reset_index())


def _boot_index(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, n, (n_boot, n))


def summary(records: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per condition and scorer kind: n stimuli, and each metric's mean with its 95% interval."""
    stim = per_stimulus(records)
    rng = np.random.default_rng(seed)
    out = []
    for key, grp in stim.groupby([*CONDITION, "scorer_kind"], dropna=False, sort=False):
        row = dict(zip([*CONDITION, "scorer_kind"], key))
        row["n"] = len(grp)
        index = _boot_index(len(grp), n_boot, rng)
        for name, (column, _) in METRICS.items():
            values = grp[column].to_numpy(float)
            boots = np.nanmean(values[index], axis=1)
            row[name] = float(np.nanmean(values))
            row[f"{name}_lo"], row[f"{name}_hi"] = np.nanpercentile(boots, [2.5, 97.5])
        out.append(row)
    table = pd.DataFrame(out)
    table["condition"] = [condition_label(m, n, e) for m, n, e in
                          zip(table.method, table.norm_type, table.eps)]
    # Budgeted conditions by norm and eps, the unbudgeted ones (MEI, natural images) last.
    table["unbudgeted"] = table.eps.isna()
    table["order"] = table.method.map({m: i for i, m in enumerate(METHODS)})
    table = table.sort_values(["source_model", "roi", "unbudgeted", "norm_type", "eps", "order"])
    return table.drop(columns=["unbudgeted", "order"]).reset_index(drop=True)


def ranking(records: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per source model, ROI and held-out kind: Spearman's rho between that kind's and the
    brain's mean intended-direction change over the conditions, with a bootstrap interval."""
    stim = per_stimulus(records)
    stim = stim.assign(effect=stim.value * stim.method.map(SIGN))
    # unstack, not pivot_table: the unbudgeted methods' eps is NaN, which pivot_table drops.
    wide = (stim.set_index([*CONDITION, "run_key", "stimulus", "scorer_kind"])["effect"]
            .unstack("scorer_kind").reset_index())
    if "brain" not in wide:
        raise DataError("no synthetic-brain scores: run the in-silico experiment on "
                        "data=synthetic_brain (the default of experiment=insilico)")
    rng = np.random.default_rng(seed)
    out = []
    for (model, roi), part in wide.groupby(["source_model", "roi"]):
        conditions = [g for _, g in part.groupby(["method", "norm_type", "eps"], dropna=False)]
        index = [_boot_index(len(g), n_boot, rng) for g in conditions]
        truth = [g["brain"].to_numpy(float) for g in conditions]
        for kind in (k for k in HELD_OUT if k in part):
            scores = [g[kind].to_numpy(float) for g in conditions]
            boots = [_rho(scores, truth, [ix[b] for ix in index]) for b in range(n_boot)]
            lo, hi = np.nanpercentile(boots, [2.5, 97.5])
            out.append({"source_model": model, "roi": roi, "scorer_kind": kind,
                        "conditions": len(conditions),
                        "rho": _rho(scores, truth, [slice(None)] * len(scores)),
                        "rho_lo": lo, "rho_hi": hi})
    return pd.DataFrame(out)


def _rho(scores: Sequence[np.ndarray], truth: Sequence[np.ndarray],
         pick: Sequence[np.ndarray | slice]) -> float:
    """Spearman rho of the conditions' mean scores and truths over the picked stimuli."""
    a = [np.nanmean(s[i]) for s, i in zip(scores, pick)]
    b = [np.nanmean(t[i]) for t, i in zip(truth, pick)]
    return float(spearmanr(a, b).statistic)


def plot_conditions(table: pd.DataFrame, metric: str, title: str) -> plt.Figure:
    """One panel per source model and ROI: every condition on x, one point per scorer kind."""
    _, label = METRICS[metric]
    panels = list(table.groupby(["source_model", "roi"], sort=False))
    width = max(8.0, 0.55 * table.condition.nunique())
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 4.2 * len(panels)), squeeze=False)
    for ax, ((model, roi), part) in zip(axes[:, 0], panels):
        conditions = list(dict.fromkeys(part.condition))
        kinds = [k for k in KINDS if k in set(part.scorer_kind)]
        for j, kind in enumerate(kinds):
            rows = part[part.scorer_kind == kind].set_index("condition").reindex(conditions)
            x = np.arange(len(conditions)) + (j - (len(kinds) - 1) / 2) * 0.13
            err = np.abs(rows[[f"{metric}_lo", f"{metric}_hi"]].to_numpy().T - rows[metric].to_numpy())
            ax.errorbar(x, rows[metric], yerr=err, fmt="o", ms=4, capsize=2,
                        color=KIND_COLORS[kind], label=KIND_LABELS[kind])
        ax.axhline(0.5 if metric == "intended" else 0.0, color="k", lw=0.6, ls=":")
        ax.set_xticks(np.arange(len(conditions)), conditions, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel(label)
        n = int(part.n.max())
        ax.set_title(f"{title}\nsource {model}, target {roi}; mean over up to {n} stimuli per "
                     "condition, 95% bootstrap CI over images", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def plot_ranking(table: pd.DataFrame, ranks: pd.DataFrame) -> plt.Figure:
    """Per held-out kind: its mean intended-direction change per condition against the brain's."""
    effect = table.assign(effect=table.change * table.method.map(SIGN))
    wide = effect.pivot_table(index=["source_model", "roi", "condition"], columns="scorer_kind",
                              values="effect")
    kinds = [k for k in HELD_OUT if k in wide]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 4.0), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for (model, roi), part in wide.groupby(level=["source_model", "roi"]):
            ax.scatter(part[kind], part["brain"], s=18, color=KIND_COLORS[kind])
            for cond, x, y in zip(part.index.get_level_values("condition"), part[kind], part["brain"]):
                ax.annotate(cond, (x, y), fontsize=5, alpha=0.7)
        row = ranks[ranks.scorer_kind == kind]
        rho = ", ".join(f"{r.roi}: rho={r.rho:.2f} [{r.rho_lo:.2f}, {r.rho_hi:.2f}]"
                        for r in row.itertuples())
        ax.axhline(0, color="k", lw=0.5, ls=":")
        ax.axvline(0, color="k", lw=0.5, ls=":")
        ax.set_xlabel(f"{KIND_LABELS[kind]}: change in the intended direction (SD)", fontsize=8)
        ax.set_ylabel("synthetic brain: change in the intended direction (SD)", fontsize=8)
        ax.set_title(f"do held-out encoders rank methods as the brain does?\n{rho}", fontsize=8)
    fig.tight_layout()
    return fig


QUESTIONS = {
    "change": "Does each method move the target ROI in brains that did not make it?",
    "selectivity": "Does it move the target ROI more than the other ROIs?",
    "intended": "How often does a stimulus move the ROI the intended way?",
}


def figures(records: pd.DataFrame, n_boot: int = 1000) -> tuple[dict[str, plt.Figure],
                                                                  list[tuple[str, pd.DataFrame]],
                                                                  list[tuple[str, str]]]:
    """The section's figures (stem -> figure), tables and what could not be drawn, and why."""
    table = summary(records, n_boot)
    figs = {f"insilico_{m}": plot_conditions(table, m, q) for m, q in QUESTIONS.items()}
    shown = table[table.scorer_kind.isin(["source", "brain", *HELD_OUT])]
    wide = shown.pivot_table(index=["source_model", "roi", "condition"], columns="scorer_kind",
                             values="change", sort=False).round(2)
    caption = "In-silico ROI change (test-set SD units), mean over stimuli, per scorer kind"
    tables = [(caption, wide[[k for k in KINDS if k in wide]])]
    not_drawn = []
    try:
        ranks = ranking(records, n_boot)
    except DataError as err:
        not_drawn.append(("insilico_ranking", str(err)))
    else:
        figs["insilico_ranking"] = plot_ranking(table, ranks)
        caption = ("Held-out encoders' ranking of the conditions against the brain's "
                   "(Spearman rho, 95% bootstrap CI over images)")
        tables.append((caption, ranks.round(3)))
    return figs, tables, not_drawn


SECTION_TEXT = (
    "Would a stimulus that drives an ROI in the model that made it drive it in a brain? One "
    "encoder (the source) makes stimuli for one ROI by every method, from the same start images "
    "and at the same budgets: targeted PGD up and down, random noise of the norm the attack "
    "reached, a maximally exciting image started from the same image (unbounded; its distance "
    "to the start is recorded) and the natural test images it ranks highest or lowest (each "
    "compared with the start image it replaces). Every stimulus is then scored by encoders that "
    "never saw it (the same model fit to other subjects, other models fit to the same subject, "
    "other models fit to other subjects) and, on the synthetic brain, by the true response of "
    "every subject: what a real experiment would measure. Grey points are the source's own "
    "claim, for reference. Changes are in test-set SD units of each scorer's subject; "
    "selectivity subtracts the mean change of the other ROIs; the dotted line is no effect "
    "(0.5 for the fraction moved the intended way, where chance lies). The last figure asks "
    "whether the held-out encoders, which a real study has, rank the methods as the brain "
    "does (Spearman rho across the conditions).")
