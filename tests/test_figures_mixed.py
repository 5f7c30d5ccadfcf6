"""Figures of a store that mixes norms, attack steps, subjects and models: one slice per panel.

The store is written through the real ResultsStore with the record schema of the probes and
run identities shaped like `brainrobust.pipeline.run_identity`, with numbers chosen so every
mean and error bar is known.
"""

import os
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from brainrobust.analysis import figures
from brainrobust.analysis.__main__ import build_all
from brainrobust.analysis.slices import describe, load_records, slice_columns, slug, split
from brainrobust.analysis.transfer import transfer_matrix
from brainrobust.errors import ConfigError
from brainrobust.results.store import ResultsStore
from brainrobust.units import format_eps

LADDER = {"l2": [0.1, 0.3, 1.0], "linf": [0.00196078431, 0.00392156863, 0.00784313725]}
SCALE = {"standard": 1.0, "robust": 0.1}
IMAGES = range(4)


def _identity(model, subject, norm, steps, rois, max_images=4):
    attack = {"_target_": "brainrobust.probes.attack.PGDConfig", "norm": norm, "steps": steps,
              "step_size": 0.125, "random_start": True, "restarts": 1, "clamp": True}
    specs = {roi: {"name": roi} for roi in rois}
    return {
        "data": {"layout": "nsd", "root": "/data/nsd", "subject": subject, "rois": specs,
                 "image_size": 224, "synthetic": None},
        "model": {"name": model, "layer": "layer4", "robust": model == "robust"},
        "roi": specs, "readout": {"method": "gcv", "alphas": [1.0, 10.0]},
        "attack": attack, "epsilon": {"norm": norm, "ladder": LADDER[norm]},
        "probe": {"sensitivity": {"attack": attack, "eps": LADDER[norm], "objective": "abs",
                                  "random_draws": 4, "batch_size": 32, "max_images": max_images,
                                  "rois": None, "save_perturbations": True, "amp": True}},
        "trainer": {"devices": 1}, "subject": subject, "seed": 0, "device": "cuda",
    }


def _abs_s(model, subject, eps, steps):
    return SCALE[model] * eps * (1 + 0.1 * subject) * steps / 20


def _sensitivity(model, subject, norm, steps, rois, converged=None):
    rows = []
    for roi in rois:
        for eps in LADDER[norm]:
            for image in IMAGES:
                metrics = {"abs_s": _abs_s(model, subject, eps, steps), "random_abs_s": 0.01 * eps}
                if converged is not None:
                    metrics |= {"converged": float(converged(image)), "conv_gain": 0.0,
                                "conv_spread": 0.0}
                rows += [{"image_id": 100 + image, "roi": roi, "eps": eps, "metric": m, "value": v}
                         for m, v in metrics.items()]
    df = pd.DataFrame(rows)
    return df.assign(norm_type=norm, objective="abs", attack_steps=steps)


def _predictivity(model, subject, rois):
    r = 0.3 + 0.2 * SCALE[model] + 0.01 * subject
    return pd.DataFrame([{"roi": roi, "voxel": -1, "metric": "r_roi_mean", "value": r}
                         for roi in rois])


def _write_run(store, model, subject, norm, steps, rois, max_images=4, converged=None):
    columns = {"model": model, "layer": "layer4", "subject": subject, "rois": ",".join(rois),
               "seed": 0}
    run = store.run(_identity(model, subject, norm, steps, rois, max_images), columns)
    run.write_records("sensitivity", _sensitivity(model, subject, norm, steps, rois, converged))
    run.write_records("predictivity", _predictivity(model, subject, rois))
    run.mark_complete()
    return run


def _mixed_store(root):
    """L2 at 20 steps for both models and ROIs, L2 at 10 steps and L-inf (with convergence
    metrics, image 0 of subject 1 not converged) for the standard model's FFA only."""
    store = ResultsStore(root)
    for subject in (1, 2):
        for model in ("robust", "standard"):
            _write_run(store, model, subject, "l2", 20, ["FFA", "PPA"])
        _write_run(store, "standard", subject, "l2", 10, ["FFA"])
        _write_run(store, "standard", subject, "linf", 20, ["FFA"],
                   converged=lambda image, s=subject: not (s == 1 and image == 0))
    return root


@pytest.fixture
def mixed(tmp_path):
    return load_records(_mixed_store(tmp_path / "results"))


def _rgba(colour):
    return tuple(np.round(to_rgba(colour), 3))


def _colours(ax):
    """Model -> colour of every labelled line and scatter in an axes (labels may add ' (n=..)')."""
    out = {line.get_label().split(" (")[0]: _rgba(line.get_color()) for line in ax.get_lines()
           if not line.get_label().startswith("_")}
    out |= {points.get_label().split(" (")[0]: _rgba(points.get_facecolor()[0])
            for points in ax.collections if not points.get_label().startswith("_")}
    return out


def _all_colours(ax):
    return {_rgba(line.get_color()) for line in ax.get_lines()} | {
        _rgba(c) for points in ax.collections for c in points.get_facecolor()}


SLICES = {("l2", "abs", 10), ("l2", "abs", 20), ("linf", "abs", 20)}


def test_linf_eps_read_as_multiples_of_one_255th():
    assert [format_eps(e, "linf") for e in LADDER["linf"]] == ["0.5/255", "1/255", "2/255"]
    assert [format_eps(e, "l2") for e in LADDER["l2"]] == ["0.1", "0.3", "1"]


def test_curves_never_mix_norms_or_steps(mixed):
    curves = figures.sensitivity_curves(mixed)
    assert set(curves[["norm_type", "objective", "attack_steps"]].itertuples(index=False)) == SLICES
    for (norm, *_), line in curves.groupby(["norm_type", "objective", "attack_steps", "roi", "model"]):
        assert sorted(line.eps) == LADDER[norm]
    # Known answer: mean over the two subjects, SEM across them.
    at = curves[(curves.norm_type == "l2") & (curves.attack_steps == 20) & (curves.roi == "FFA")
                & (curves.model == "standard") & np.isclose(curves.eps, 1.0)].iloc[0]
    values = [_abs_s("standard", s, 1.0, 20) for s in (1, 2)]
    assert at["mean"] == pytest.approx(np.mean(values))
    assert at["err"] == pytest.approx(np.std(values, ddof=1) / np.sqrt(2))
    assert at["n_subjects"] == 2 and at["err_over"] == "subjects"
    assert at["control"] == pytest.approx(0.01)


def test_eps_figure_panels_hold_one_slice_with_units_legends_and_colours(mixed):
    colours = figures.model_colors(mixed.model)
    fig = figures.sensitivity_vs_eps(mixed, colors=colours)
    # One row per slice, one panel per ROI that slice has: L2 20 steps (FFA, PPA), the others FFA.
    panels = [ax for ax in fig.axes if ax.get_lines()]
    assert len(panels) == 4
    for ax in panels:
        title = ax.get_title()
        assert len(re.findall(r"\bL2\b|L-inf", title)) == 1, title
        assert re.search(r"\d+ steps", title) and "n = 2 subjects" in title
        linf = "L-inf" in title
        assert ("L-inf" in ax.get_xlabel()) == linf and "z units" in ax.get_ylabel()
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks == (["0.5/255", "1/255", "2/255"] if linf else ["0.1", "0.3", "1"])
        assert ax.get_legend() is not None or len(_all_colours(ax)) <= 1
        for model, colour in _colours(ax).items():
            assert colour == _rgba(colours[model])


def test_predictivity_keeps_models_and_rois_with_l2_records_only(mixed):
    points = figures.predictivity_points(mixed)
    l2 = points[(points.norm_type == "l2") & (points.attack_steps == 20)]
    assert set(zip(l2.model, l2.roi)) == {(m, r) for m in SCALE for r in ("FFA", "PPA")}
    assert l2[["sensitivity", "test_r"]].notna().all().all() and set(l2.n_subjects) == {2}
    linf = points[points.norm_type == "linf"]
    assert set(zip(linf.model, linf.roi)) == {("standard", "FFA")}
    assert linf.eps.iloc[0] in LADDER["linf"]
    robust = l2[(l2.model == "robust") & (l2.roi == "PPA")].iloc[0]
    assert robust.test_r == pytest.approx(np.mean([0.3 + 0.02 + 0.01 * s for s in (1, 2)]))
    fig = figures.sensitivity_vs_predictivity(mixed, colors=figures.model_colors(mixed.model))
    titles = [ax.get_title() for ax in fig.axes if ax.collections]
    assert sum("L-inf" in t for t in titles) == 1 and sum("eps=" in t for t in titles) == len(titles)
    assert any("L2" in t and "PPA" in t for t in titles)


def test_runs_of_one_subject_count_as_one_subject(tmp_path):
    store = ResultsStore(tmp_path / "results")
    _write_run(store, "standard", 1, "l2", 20, ["FFA"])
    _write_run(store, "standard", 1, "l2", 20, ["FFA", "PPA"])
    records = load_records(tmp_path / "results")
    assert set(figures.sensitivity_curves(records).n_subjects) == {1}
    assert set(figures.predictivity_points(records).n_subjects) == {1}


def test_model_colours_agree_between_figures(mixed):
    colours = figures.model_colors(mixed.model)
    assert colours == figures.model_colors(sorted(set(mixed.model), reverse=True))
    assert len(set(colours.values())) == len(colours)
    seen = {}
    for fig in (figures.sensitivity_vs_eps(mixed, colors=colours),
                figures.sensitivity_vs_predictivity(mixed, colors=colours)):
        for ax in fig.axes:
            for model, colour in _colours(ax).items():
                assert seen.setdefault(model, colour) == colour
    assert set(seen) == set(SCALE)


def test_a_setting_that_differs_between_runs_splits_the_slices(tmp_path):
    store = ResultsStore(tmp_path / "results")
    _write_run(store, "standard", 1, "l2", 20, ["FFA"], max_images=4)
    _write_run(store, "robust", 1, "l2", 20, ["FFA"], max_images=2)
    curves = figures.sensitivity_curves(load_records(tmp_path / "results"))
    assert set(curves["cfg.max_images"]) == {2, 4}
    fig = figures.sensitivity_vs_eps(load_records(tmp_path / "results"))
    titles = [ax.get_title() for ax in fig.axes if ax.get_lines()]
    assert sorted(re.search(r"max_images=(\d)", t).group(1) for t in titles) == ["2", "4"]
    assert all("n = 1 subject" in t for t in titles)


def test_convergence_flags_per_model_roi_norm_and_eps(mixed):
    table = figures.not_converged(mixed)
    assert set(table.norm_type) == {"linf"}
    # One of the 2 subjects x 4 images did not converge, at every eps.
    assert np.allclose(table.fraction, 1 / 8) and set(table.n) == {8}


def _transfer_records(norm, eps):
    rows = []
    for source, scale in SCALE.items():
        for image in IMAGES:
            for metric, value in (("abs_target_change", scale * eps),
                                  ("abs_source_change", eps), ("random_abs_change", 0.01 * eps)):
                rows.append({"image_id": 100 + image, "eps": eps, "metric": metric, "value": value,
                             "roi": "FFA", "source_roi": "FFA", "source_model": source,
                             "source_layer": "layer4", "source_subject": 1, "source_run": source,
                             "target_model": "standard", "target_subject": 1})
    return pd.DataFrame(rows).assign(kind="fixed_eps", norm_type=norm)


def test_transfer_matrices_are_per_norm(tmp_path):
    root = _mixed_store(tmp_path / "results")
    store = ResultsStore(root)
    for norm, eps in (("l2", 0.3), ("linf", LADDER["linf"][1])):
        run = store.run({"transfer_target": norm}, {"model": "standard", "layer": "layer4",
                                                    "subject": 1, "rois": "FFA", "seed": 0})
        run.write_records("transfer", _transfer_records(norm, eps).assign(kind="effect_matched"))
    with pytest.raises(ConfigError, match="norm="):
        transfer_matrix(root, "FFA", kind="effect_matched")
    matrix = transfer_matrix(root, "FFA", kind="effect_matched", norm="linf")
    assert matrix.loc["robust", "standard"] == pytest.approx(0.1)
    build_all(root, tmp_path / "figures", only=["transfer"])
    names = sorted(p.name for p in (tmp_path / "figures").glob("transfer_*.png"))
    assert any("linf" in n for n in names) and any("l2" in n for n in names)


def test_report_says_what_it_left_out_and_is_readable_like_the_pngs(tmp_path):
    root = _mixed_store(tmp_path / "results")
    report = build_all(root, tmp_path / "figures")
    html = report.read_text()
    assert "Not drawn" in html
    not_drawn = html[html.index("Not drawn"):]
    for name, reason in (("transfer", "no transfer records"), ("subspace", "no subspace records"),
                         ("targeted", "no targeted or MEI arrays")):
        assert re.search(rf"{name}.*?{reason}", not_drawn, re.DOTALL), name
    # The L-inf runs carry convergence flags: their table is in the report.
    assert "not converged" in html and "12%" in html
    umask = os.umask(0)
    os.umask(umask)
    assert report.stat().st_mode & 0o777 == 0o666 & ~umask
    for png in (tmp_path / "figures").glob("*.png"):
        assert png.stat().st_mode & 0o777 == 0o666 & ~umask


def test_report_omits_the_convergence_table_without_the_metrics(tmp_path):
    store = ResultsStore(tmp_path / "results")
    _write_run(store, "standard", 1, "l2", 20, ["FFA"])
    assert figures.not_converged(load_records(tmp_path / "results")).empty
    html = build_all(tmp_path / "results", tmp_path / "figures").read_text()
    assert "not converged" not in html


def test_attack_methods_are_separate_slices():
    """Auto-PGD and PGD at the same steps reach different optima: never one curve."""
    rows = pd.DataFrame({"norm_type": "l2", "objective": "abs", "attack_steps": 100,
                         "attack_method": ["apgd", "pgd", "apgd", "pgd"], "value": [1.0, 0.9, 1.1, 1.0]})
    assert slice_columns(rows) == ["norm_type", "objective", "attack_method", "attack_steps"]
    slices = {describe(s): list(part.value) for s, part in split(rows)}
    assert slices == {"L2, objective abs, Auto-PGD, 100 steps": [1.0, 1.1],
                      "L2, objective abs, PGD, 100 steps": [0.9, 1.0]}
    assert {slug(s) for s, _ in split(rows)} == {"l2_abs_apgd_100steps", "l2_abs_pgd_100steps"}
