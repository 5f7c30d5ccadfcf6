"""Every figure builds from a small results table; missing records name what to run."""

import base64
import re

import numpy as np
import pandas as pd
import pytest

from brainrobust.analysis import figures
from brainrobust.analysis.__main__ import build_all
from brainrobust.analysis.report import build_report
from brainrobust.errors import DataError
from brainrobust.results.store import ResultsStore


def _records():
    rng = np.random.default_rng(0)
    rows = []
    for model, scale in (("standard", 1.0), ("robust", 0.1)):
        for subject in (1, 2):
            for roi in ("FFA", "PPA"):
                rows.append({"probe": "predictivity", "model": model, "subject": subject, "roi": roi,
                             "metric": "r_roi_mean", "value": 0.6 + 0.1 * rng.random()})
                for eps in (0.1, 1.0):
                    for image in range(3):
                        for metric, value in (("abs_s", scale * eps), ("random_abs_s", 0.01 * eps)):
                            rows.append({"probe": "sensitivity", "model": model, "subject": subject,
                                         "roi": roi, "eps": eps, "image_id": image, "norm_type": "l2",
                                         "metric": metric, "value": value * (1 + 0.1 * rng.random())})
    return pd.DataFrame(rows)


def test_sensitivity_figures_build():
    records = _records()
    fig = figures.sensitivity_vs_eps(records)
    assert len(fig.axes) == 2 and len(fig.axes[0].get_lines()) >= 2
    fig = figures.sensitivity_vs_predictivity(records, eps=1.0)
    # One labelled scatter per model (the error bars are unlabelled): both models in each panel.
    points = [c.get_offsets() for c in fig.axes[0].collections if not c.get_label().startswith("_")]
    assert len(fig.axes) == 2 and sum(len(p) for p in points) == 2


def test_heatmap_builds_with_values():
    matrix = pd.DataFrame([[1.0, 0.2], [0.1, 1.0]], index=["a", "b"], columns=["a", "b"])
    fig = figures.matrix_heatmap(matrix, "transfer", "ratio", baseline=0.01)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["1.00", "0.20", "0.10", "1.00"]


def test_missing_records_name_what_to_run():
    records = _records()
    with pytest.raises(DataError, match="run `python run.py probe=\\[sensitivity\\]`"):
        figures.sensitivity_vs_eps(records[records.probe == "predictivity"])
    with pytest.raises(DataError, match="available"):
        figures.sensitivity_vs_predictivity(records, eps=0.5)


def test_report_embeds_images(tmp_path):
    fig = figures.matrix_heatmap(pd.DataFrame([[1.0]], index=["a"], columns=["a"]), "t", "v")
    png = tmp_path / "m.png"
    fig.savefig(png)
    html = build_report([("Section", "text", [png])], tmp_path / "report.html").read_text()
    data = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html).group(1)
    assert base64.b64decode(data) == png.read_bytes()


def test_build_all_from_a_store_skips_what_is_missing(tmp_path, capsys):
    records = _records()
    store = ResultsStore(tmp_path / "results")
    for (model, subject, roi), grp in records.groupby(["model", "subject", "roi"]):
        run = store.run({"model": model, "subject": subject, "roi": roi},
                        {"model": model, "subject": subject, "rois": roi})
        for probe, rows in grp.groupby("probe"):
            run.write_records(probe, rows.drop(columns=["probe", "model", "subject"]))
    report = build_all(tmp_path / "results", tmp_path / "figures")
    assert report.exists() and (tmp_path / "figures" / "sensitivity_vs_eps.png").exists()
    err = capsys.readouterr().err
    assert "skipped transfer" in err and "skipped subspace" in err


def test_empty_store_names_the_run(tmp_path):
    with pytest.raises(DataError, match="python run.py"):
        build_all(tmp_path / "nothing", tmp_path / "figures")
