"""`python -m brainrobust.analysis --root results --out figures`: figures + one HTML report.

Each figure is built from the merged results store; a figure whose records do not exist yet is
skipped with a line naming the run that produces them, so a partial study still gets a report.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

import matplotlib.pyplot as plt
import pandas as pd

from brainrobust.analysis import figures
from brainrobust.analysis.report import build_report
from brainrobust.errors import BrainRobustError, DataError
from brainrobust.results.store import load

log = logging.getLogger("brainrobust.analysis")

# name -> (section heading, what it shows, builder(records, root) -> {file stem: Figure})
Builder = Callable[[pd.DataFrame, Path], dict[str, plt.Figure]]


def _sensitivity(records: pd.DataFrame, root: Path) -> dict[str, plt.Figure]:
    return {"sensitivity_vs_eps": figures.sensitivity_vs_eps(records),
            "sensitivity_vs_predictivity": figures.sensitivity_vs_predictivity(records)}


FIGURES: dict[str, tuple[str, str, Builder]] = {
    "sensitivity": ("Q1 - sensitivity",
                    "Mean |r(x) - r(x+delta)| of the ROI-mean prediction against the budget (dashed: "
                    "random noise of the same norm), and sensitivity against predictivity per model.",
                    _sensitivity),
}


def build_all(root: Path, out: Path, only: list[str] | None = None) -> Path:
    records = load(root)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for name, (heading, text, builder) in FIGURES.items():
        if only and name not in only:
            continue
        try:
            figs = builder(records, root)
        except DataError as err:
            print(f"skipped {name}: {err}", file=sys.stderr)
            continue
        paths = []
        for stem, fig in figs.items():
            path = out / f"{stem}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
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
