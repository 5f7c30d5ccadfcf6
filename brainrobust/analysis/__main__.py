"""`python -m brainrobust.analysis --root results --out figures`: figures + one HTML report.

Each figure is built from the merged results store (with the run settings that tell its slices
apart, brainrobust.analysis.slices); a figure whose records do not exist yet is skipped with a
line naming the run that produces them, and the report's "Not drawn" section lists it with that
reason, so a partial study still gets a report.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from brainrobust.analysis import figures, insilico
from brainrobust.analysis.media import save_figure
from brainrobust.analysis.report import Section, build_report
from brainrobust.analysis.slices import describe, load_records, slug, split
from brainrobust.errors import BrainRobustError, DataError
from brainrobust.units import format_eps

log = logging.getLogger("brainrobust.analysis")


@dataclass
class Built:
    """What one builder made: PNGs, (caption, table) pairs and the (figure, reason) pairs of
    what it could not draw."""

    images: list[Path] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    not_drawn: list[tuple[str, str]] = field(default_factory=list)


# builder(records, root, out, model colours) -> Built
Builder = Callable[[pd.DataFrame, Path, Path, Mapping[str, str]], Built]


def _save(figs: dict[str, plt.Figure], out: Path) -> list[Path]:
    return [save_figure(fig, out / f"{stem}.png") for stem, fig in figs.items()]


def _rows(records: pd.DataFrame, probe: str, how: str) -> pd.DataFrame:
    rows = records[records.probe == probe]
    if rows.empty:
        raise DataError(f"no {probe} records; run {how} first")
    return rows


def _sensitivity(records: pd.DataFrame, root: Path, out: Path, colors: Mapping[str, str]) -> Built:
    curves = figures.sensitivity_curves(records)
    built = Built(images=_save({"sensitivity_vs_eps": figures.plot_curves(curves, colors)}, out),
                  tables=_convergence_tables(records))
    try:
        points = figures.predictivity_points(records)
    except DataError as err:
        built.not_drawn.append(("sensitivity_vs_predictivity", str(err)))
        return built
    built.images += _save({"sensitivity_vs_predictivity": figures.plot_points(points, colors)}, out)
    for slice_, rows in split(points):
        built.not_drawn += [(f"sensitivity_vs_predictivity, {describe(slice_)}: {p.model} {p.roi}",
                             p.note) for p in rows[rows.note != ""].itertuples()]
    return built


def _convergence_tables(records: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Per slice, model x ROI rows and one column per eps: the share of records not converged."""
    tables = []
    for slice_, rows in split(figures.not_converged(records)):
        cells = rows.assign(cell=[f"{f:.0%} of {n}" for f, n in zip(rows.fraction, rows.n, strict=True)])
        wide = cells.pivot(index=["model", "roi"], columns="eps", values="cell")
        wide.columns = [f"eps={format_eps(e, slice_.get('norm_type'))}" for e in wide.columns]
        caption = (f"Sensitivity records not converged (converged == 0), {describe(slice_)}: "
                   "% of the records (images x subjects) per model, ROI and eps")
        tables.append((caption, wide))
    return tables


def _transfer(records: pd.DataFrame, root: Path, out: Path, colors: Mapping[str, str]) -> Built:
    from brainrobust.analysis.transfer import matrix_from_records

    rows = _rows(records, "transfer", "experiments/transfer.sh (or probe=[transfer])")
    figs = {}
    for slice_, part in split(rows):
        norm = slice_.get("norm_type")
        for (roi, kind), grp in part.groupby(["roi", "kind"]):
            for eps in sorted(grp.eps.dropna().unique()) if kind == "fixed_eps" else [None]:
                budget = "" if eps is None else format_eps(eps, norm)
                for control in (False, True):
                    matrix = matrix_from_records(grp, roi, eps=eps, kind=kind, control=control)
                    name = "_".join(filter(None, ["transfer", roi, kind, slug(slice_),
                                                  budget and "eps" + budget.replace("/", "-"),
                                                  "random" if control else ""]))
                    title = (f"transfer to {roi}, {kind.replace('_', ' ')}"
                             + (budget and f", eps={budget}") + (", random control" if control else "")
                             + f"\n{describe(slice_)}; within-subject pairs, mean over "
                             f"n = {matrix.attrs['n_subjects']} subject(s)")
                    figs[name] = figures.matrix_heatmap(matrix, title,
                                                        "|target change| / |source change|", vmin=0)
    return Built(images=_save(figs, out))


def _subspace(records: pd.DataFrame, root: Path, out: Path, colors: Mapping[str, str]) -> Built:
    from brainrobust.analysis.subspaces import similarity_matrix

    rows = _rows(records, "subspace", "experiments/subspace.sh (or probe=[subspace])")
    figs, built = {}, Built()
    # One matrix per subject: subspaces of different subjects' encoders are not averaged.
    for (roi, subject), _ in rows.groupby(["roi", "subject"]):
        try:
            matrix = similarity_matrix(root, roi, subject=subject)
        except DataError as err:
            built.not_drawn.append((f"subspace {roi}, subject {subject}", str(err)))
            continue
        figs[f"subspace_{roi}_s{subject}"] = figures.matrix_heatmap(
            matrix, f"perturbation subspace similarity {roi}, subject {subject}",
            "||P_i^T P_j||_F^2 / k", vmin=0, vmax=1, baseline=matrix.attrs.get("random_baseline"))
    built.images = _save(figs, out)
    return built


def _targeted(records: pd.DataFrame, root: Path, out: Path, colors: Mapping[str, str]) -> Built:
    from brainrobust.analysis.gallery import gallery

    # The report embeds the still images; videos stay beside it in the output folder.
    return Built(images=[p for p in gallery(root, out / "targeted") if p.suffix == ".png"])


def _insilico(records: pd.DataFrame, root: Path, out: Path, colors: Mapping[str, str]) -> Built:
    figs, tables, not_drawn = insilico.figures(records)
    return Built(images=_save(figs, out), tables=tables, not_drawn=not_drawn)


FIGURES: dict[str, tuple[str, str, Builder]] = {
    "sensitivity": ("Q1 - sensitivity",
                    ("Mean |r(x) - r(x+delta)| of the ROI-mean prediction against the budget (dashed: "
                     "random noise of the same norm), and sensitivity against predictivity per model. "
                     "One row of panels per slice (norm, objective, attack method and steps, and any other setting "
                     "that differs between runs); each point is the mean over subjects of the "
                     "per-subject mean over images, error bars the SEM across subjects."),
                    _sensitivity),
    "transfer": ("Q2/Q3 - transfer",
                 ("Perturbations found on each source model (rows) applied to each target model "
                  "(columns): mean |target change| / mean |source change|, at fixed eps and "
                  "effect-matched, with random noise of the same norm as the control; one matrix "
                  "per norm and setting."),
                 _transfer),
    "subspace": ("Q2 - perturbation subspaces",
                 ("Mean squared cosine of the principal angles between two models' top-k "
                  "eigenvectors of J^T J (1 = same subspace; random subspaces give k/D), one matrix "
                  "per ROI and subject."),
                 _subspace),
    "targeted": ("Q4 - targeted perturbations and maximally exciting images",
                 ("Images driven to decrease or increase one ROI's predicted response within a "
                  "growing budget (strips and response trajectories; standard vs robust side by "
                  "side), and unconstrained maximisation of each ROI (MEI grids)."),
                 _targeted),
    "insilico": ("Q5 - in-silico validation: judged by brains that never saw the stimuli",
                 insilico.SECTION_TEXT, _insilico),
}


def build_all(root: Path, out: Path, only: list[str] | None = None) -> Path:
    records = load_records(root)
    out.mkdir(parents=True, exist_ok=True)
    # Built once from every model of the store, so a model has one colour in every figure.
    colors = figures.model_colors(records.model)
    sections, not_drawn = [], []
    for name, (heading, text, builder) in FIGURES.items():
        if only and name not in only:
            continue
        try:
            built = builder(records, root, out, colors)
        except DataError as err:
            built = Built(not_drawn=[(name, str(err))])
        for what, why in built.not_drawn:
            print(f"skipped {what}: {why}", file=sys.stderr)
        not_drawn += built.not_drawn
        if built.images or built.tables:
            sections.append(Section(heading, text, built.images, built.tables))
    if not sections:
        raise DataError(f"no figure could be built from {root}; run `python run.py` first")
    report = build_report(sections, out / "report.html", not_drawn=not_drawn)
    print(f"figures and report: {report}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m brainrobust.analysis")
    parser.add_argument("--root", default="results", type=Path)
    parser.add_argument("--out", default="figures", type=Path)
    parser.add_argument("--only", nargs="*", choices=sorted(FIGURES))
    args = parser.parse_args(argv)
    try:
        build_all(args.root, args.out, args.only)
    except BrainRobustError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
