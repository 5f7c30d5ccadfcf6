"""`python -m brainrobust.analysis --root results --out figures`: figures + one HTML report.

Each figure is built from the merged results store; a figure whose records do not exist yet is
skipped with a line naming the run that produces them, so a partial study still gets a report.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from brainrobust.analysis import figures
from brainrobust.analysis.report import build_report
from brainrobust.errors import BrainRobustError, DataError
from brainrobust.results.store import load

log = logging.getLogger("brainrobust.analysis")

# name -> (section heading, what it shows, builder(records, root, out) -> written PNG paths)
Builder = Callable[[pd.DataFrame, Path, Path], list[Path]]


def _save(figs: dict[str, plt.Figure], out: Path) -> list[Path]:
    paths = []
    for stem, fig in figs.items():
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _sensitivity(records: pd.DataFrame, root: Path, out: Path) -> list[Path]:
    return _save({"sensitivity_vs_eps": figures.sensitivity_vs_eps(records),
                  "sensitivity_vs_predictivity": figures.sensitivity_vs_predictivity(records)}, out)


def _transfer(records: pd.DataFrame, root: Path, out: Path) -> list[Path]:
    from brainrobust.analysis.transfer import transfer_matrix

    rows = records[records.probe == "transfer"] if len(records) else records
    if rows.empty:
        raise DataError("no transfer records; run experiments/transfer.sh (or probe=[transfer]) first")
    figs = {}
    for (roi, kind), grp in rows.groupby(["roi", "kind"]):
        for eps in sorted(grp.eps.dropna().unique()) if kind == "fixed_eps" else [None]:
            tag = f"{roi}_{kind}" + ("" if eps is None else f"_eps{eps:g}")
            title = f"transfer {roi} ({kind}{'' if eps is None else f', eps={eps:g}'})"
            for control in (False, True):
                matrix = transfer_matrix(root, roi, eps=eps, kind=kind, control=control)
                name = f"transfer_{tag}" + ("_random" if control else "")
                figs[name] = figures.matrix_heatmap(
                    matrix, title + (" random control" if control else ""),
                    "|target change| / |source change|", vmin=0)
    return _save(figs, out)


def _subspace(records: pd.DataFrame, root: Path, out: Path) -> list[Path]:
    from brainrobust.analysis.subspaces import similarity_matrix

    rows = records[records.probe == "subspace"] if len(records) else records
    if rows.empty:
        raise DataError("no subspace records; run experiments/subspace.sh (or probe=[subspace]) first")
    figs = {}
    for roi in sorted(rows.roi.unique()):
        matrix = similarity_matrix(root, roi)
        figs[f"subspace_{roi}"] = figures.matrix_heatmap(
            matrix, f"perturbation subspace similarity {roi}", "||P_i^T P_j||_F^2 / k",
            vmin=0, vmax=1, baseline=matrix.attrs.get("random_baseline"))
    return _save(figs, out)


def _targeted(records: pd.DataFrame, root: Path, out: Path) -> list[Path]:
    from brainrobust.analysis.media import gallery

    # The report embeds the still images; videos stay beside it in the output folder.
    return [p for p in gallery(root, out / "targeted") if p.suffix == ".png"]


FIGURES: dict[str, tuple[str, str, Builder]] = {
    "sensitivity": ("Q1 - sensitivity",
                    ("Mean |r(x) - r(x+delta)| of the ROI-mean prediction against the budget (dashed: "
                    "random noise of the same norm), and sensitivity against predictivity per model."),
                    _sensitivity),
    "transfer": ("Q2/Q3 - transfer",
                 ("Perturbations found on each source model (rows) applied to each target model "
                 "(columns): mean |target change| / mean |source change|, at fixed eps and "
                 "effect-matched, with random noise of the same norm as the control."),
                 _transfer),
    "subspace": ("Q2 - perturbation subspaces",
                 ("Mean squared cosine of the principal angles between two models' top-k "
                 "eigenvectors of J^T J (1 = same subspace; random subspaces give k/D)."),
                 _subspace),
    "targeted": ("Q4 - targeted perturbations and maximally exciting images",
                 ("Images driven to decrease or increase one ROI's predicted response within a "
                 "growing budget (strips and response trajectories; standard vs robust side by "
                 "side), and unconstrained maximisation of each ROI (MEI grids)."),
                 _targeted),
}


def build_all(root: Path, out: Path, only: list[str] | None = None) -> Path:
    records = load(root)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for name, (heading, text, builder) in FIGURES.items():
        if only and name not in only:
            continue
        try:
            paths = builder(records, root, out)
        except DataError as err:
            print(f"skipped {name}: {err}", file=sys.stderr)
            continue
        sections.append((heading, text, paths))
    if not sections:
        raise DataError(f"no figure could be built from {root}; run `python run.py` first")
    report = build_report(sections, out / "report.html")
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
