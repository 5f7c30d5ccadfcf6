"""Targeted probe on the known-answer linear encoder: direction, monotonicity, held ROIs,
budgets, records, arrays and media, start-image selection and bad input."""

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from helpers import LinearEncoder
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from brainrobust.errors import ConfigError, DataError
from brainrobust.pipeline import render_media
from brainrobust.probes.base import ProbeContext
from brainrobust.probes.image_selection import ImageSelection, load_image_files
from brainrobust.probes.targeted import TargetedProbe
from brainrobust.results.loggers import scalars
from brainrobust.results.store import ResultsStore

S = 16
D = 3 * S * S
EPS32 = float(np.finfo(np.float32).eps)
SCHEDULE = [0.5, 1.0, 2.0, 4.0]
ATTACK = {"steps": 32, "step_size": 0.1, "random_start": False}


def _unit(v):
    return v / v.norm()


class ExactLinearEncoder(LinearEncoder):
    """LinearEncoder summing its D products in float64: a response is its exact value rounded
    once to float32, so a response change carries no rounding of D-term float32 sums."""

    def forward(self, x):
        return (x.double().flatten(1) @ self.W.double().T + self.b.double()).to(x.dtype)


def change_error(encoder, roi, x_max):
    """Bound of the rounding of a float32 ROI response change r(x + d) - r(x) of an
    ExactLinearEncoder at pixels <= x_max: x + d rounds each pixel (half an ulp, times |w|_1),
    each response of at most |W|_1 x_max rounds twice (voxel, ROI mean), then the difference."""
    w = encoder.W[encoder.rois[roi]].double()
    l1 = w.abs().sum(1).max().item()
    return EPS32 * (l1 / 2 + 2 * l1 * x_max) + EPS32 / 2 * l1 * x_max


def l2_projection_slack(eps):
    """How far an L2 projection onto the eps ball in float32 can end outside it: its D-term
    norm and the rescaling round, (D + 3) eps relative."""
    return (D + 3) * EPS32 * np.asarray(eps)


@pytest.fixture(scope="module")
def setup():
    """ROIs A, B, C: B's readout has cosine 0.7 with A's, C is an independent direction."""
    g = torch.Generator().manual_seed(0)
    w_a = _unit(torch.randn(D, generator=g))
    w_c = _unit(torch.randn(D, generator=g))
    u = torch.randn(D, generator=g)
    u = _unit(u - (u @ w_a) * w_a)
    w_b = 0.7 * w_a + np.sqrt(1 - 0.49) * u
    W = torch.stack([w_a, w_a, w_b, w_b, w_c, w_c])
    encoder = ExactLinearEncoder(W, {"A": [0, 1], "B": [2, 3], "C": [4, 5]}).eval()
    images = 0.3 + 0.4 * torch.rand(8, 3, S, S, generator=g)  # far from the box at these budgets
    return encoder, images, {"A": w_a, "B": w_b, "C": w_c}


def _context(tmp_path, encoder, images, responses=None):
    store = ResultsStore(tmp_path / "results").run(
        {"test": str(tmp_path)}, {"model": "linear", "subject": 1}
    )
    n = len(images)
    return ProbeContext(
        images=images,
        image_ids=np.arange(100, 100 + n, dtype=np.int64),
        responses=responses if responses is not None else np.zeros((n, 6)),
        rois=sorted(encoder.rois),
        roi_stats={r: {"test_sd": 0.5, "noise_ceiling": 40.0} for r in encoder.rois},
        meta={"model": "linear"},
        store=store,
        seed=0,
    )


def _probe(**kw):
    settings = {
        "roi": "A",
        "direction": "increase",
        "eps_schedule": SCHEDULE,
        "attack": ATTACK,
        "images": {"select": "first", "n": 3},
        "save_media": False,
    }
    return TargetedProbe(**{**settings, **kw})


@pytest.mark.parametrize("direction", ["increase", "decrease"])
@pytest.mark.parametrize("warm_start", [True, False])
def test_drives_roi_monotonically_to_the_linear_optimum(setup, direction, warm_start):
    encoder, images, w = setup
    x = images[:3]
    delta, converged = _probe(direction=direction, warm_start=warm_start).trajectory(encoder, x)
    assert delta.shape == (len(SCHEDULE), 3, 3, S, S)
    # Each eps's attack reaches the ball's edge in a third of its steps and stays: converged.
    assert converged.shape == (len(SCHEDULE), 3) and bool(converged.all())
    with torch.no_grad():
        change = torch.stack(
            [encoder.roi_response(x + d, "A") - encoder.roi_response(x, "A") for d in delta]
        )
    sign = 1.0 if direction == "increase" else -1.0
    moved = sign * change  # (E, B)
    assert torch.all(moved[1:] > moved[:-1])
    # Unclamped L2 optimum of a linear ROI: eps * ||w_A|| (= eps here); PGD reaches 99 % of it.
    optimum = torch.tensor(SCHEDULE)[:, None] * w["A"].norm()
    slack = torch.tensor(l2_projection_slack(SCHEDULE))[:, None]
    above = slack * w["A"].norm() + change_error(encoder, "A", (x + delta).max().item())
    assert torch.all(moved >= 0.99 * optimum) and torch.all(moved <= optimum + above)
    norms = delta.double().flatten(2).norm(dim=2)
    assert torch.all(norms <= torch.tensor(SCHEDULE, dtype=torch.float64)[:, None] + slack)
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1


def test_linf_schedule_reaches_eps_times_l1_norm(setup):
    encoder, images, w = setup
    x = images[:2]
    schedule = [1 / 255, 2 / 255, 4 / 255]
    delta, _ = _probe(norm="linf", eps_schedule=schedule).trajectory(encoder, x)
    with torch.no_grad():
        change = torch.stack(
            [encoder.roi_response(x + d, "A") - encoder.roi_response(x, "A") for d in delta]
        )
    optimum = torch.tensor(schedule)[:, None] * w["A"].abs().sum()
    assert torch.all(change[1:] > change[:-1]) and torch.all(change >= 0.99 * optimum)
    # the L-inf ball is a clamp to float32 eps: exact but for that one rounding of eps
    assert torch.all(delta.abs().flatten(2).amax(2) <= torch.tensor(schedule)[:, None] * (1 + EPS32))


def test_held_roi_stays_within_tolerance(setup):
    encoder, images, _ = setup
    x = images[:3]

    def changes(hold):
        delta, _ = _probe(hold=hold).trajectory(encoder, x)
        with torch.no_grad():
            return {
                roi: torch.stack(
                    [encoder.roi_response(x + d, roi) - encoder.roi_response(x, roi) for d in delta]
                )
                for roi in ("A", "B")
            }

    free, held = changes({}), changes({"B": 10.0})
    # Unheld, B follows A (cosine 0.7); held, B barely moves while A still rises.
    assert torch.all(free["B"] > 0.6 * free["A"])
    assert torch.all(held["B"].abs() <= 0.1 * held["A"]) and torch.all(held["B"].abs() < 0.1)
    assert torch.all(held["A"][1:] > held["A"][:-1])
    # The best A can do with B fixed is eps * sqrt(1 - 0.7^2).
    assert torch.all(held["A"] >= 0.95 * np.sqrt(1 - 0.49) * torch.tensor(SCHEDULE)[:, None])


@pytest.mark.parametrize("weight", [2.0, 20.0])
def test_shipped_attack_resolves_a_strong_hold(weight):
    # ROI C reads what A reads, so decreasing A by t costs weight * t^2: the objective
    # -t - weight t^2 peaks at t = -1 / (2 weight) with value 1 / (4 weight), inside every budget
    # of the schedule. A fixed step of 0.1 eps overshoots that peak and stalls at 98% (w = 20).
    g = torch.Generator().manual_seed(3)
    w_a = _unit(torch.randn(D, generator=g)).double()
    W = torch.stack([w_a, w_a])
    encoder = ExactLinearEncoder(W.float(), {"A": [0], "C": [1]}, b=-(W.sum(1) * 0.5).float()).eval()
    x = 0.5 + 0.05 * (2 * torch.rand(3, 3, S, S, generator=g) - 1)
    conf = Path(__file__).resolve().parents[1] / "conf" / "probe" / "targeted.yaml"
    attack = OmegaConf.to_container(OmegaConf.load(conf).targeted.attack)
    probe = _probe(direction="decrease", hold={"C": weight}, attack=attack)
    delta, _ = probe.trajectory(encoder, x)
    t = delta.double().flatten(2) @ w_a  # (E, B): the change of A (and of C)
    assert ((-t - weight * t**2) >= 0.99 / (4 * weight)).all(), (-t - weight * t**2) * 4 * weight


def test_run_writes_records_arrays_and_media(setup, tmp_path):
    encoder, images, _ = setup
    ctx = _context(tmp_path, encoder, images)
    probe = _probe(images={"select": "top", "n": 2}, save_media=True, hold={"C": 1.0})
    probe.bind(ctx)
    records = probe.run(encoder, ctx)
    render_media(ctx.store, [probe])  # what the pipeline does once the probe is done
    path = ctx.store.write_records(probe.name, records)
    back = ctx.store.read_records("targeted")
    assert path.exists() and len(back) == len(records)
    assert {"image_id", "roi", "eps", "metric", "value", "driven_roi", "direction", "hold"} <= set(
        back.columns
    )
    assert set(back.metric) == {
        "response",
        "response_change",
        "response_change_sd",
        "l2",
        "linf",
        "psnr",
        "ssim",
        "converged",
    }
    resp = back[back.metric == "response_change"]
    assert set(resp.roi) == {"A", "B", "C"} and sorted(resp.eps.unique()) == [0.0, *SCHEDULE]
    # Two images x (start + 4 eps) x 3 ROIs x 3 response metrics + 2 x 4 eps x (4 perceptual
    # measures + the attack's convergence flag).
    assert len(back) == 2 * 5 * 3 * 3 + 2 * 4 * 5
    flags = back[back.metric == "converged"]
    assert sorted(flags.eps.unique()) == SCHEDULE and set(flags.value) <= {0.0, 1.0}
    drive = resp[resp.roi == "A"].groupby("eps")["value"].mean()
    assert drive.is_monotonic_increasing and drive.iloc[0] == 0
    sd = (
        back[(back.metric == "response_change_sd") & (back.roi == "A")]
        .groupby("eps")["value"]
        .mean()
    )
    np.testing.assert_array_equal(sd.values, drive.values / 0.5)  # halving by 0.5 is exact
    l2 = back[back.metric == "l2"].groupby("eps")["value"].max()
    assert np.all(l2.values <= np.array(SCHEDULE) + 1e-3)  # fp16-free: computed before saving
    assert (back[back.metric == "ssim"].value < 1).all() and np.isfinite(
        back[back.metric == "psnr"].value
    ).all()

    arrays = ctx.store.load_array("targeted_A_increase")
    assert arrays["images"].shape == (2, 5, 3, S, S) and arrays["images"].dtype == np.float16
    assert arrays["delta"].shape == (2, 4, 3, S, S) and arrays["responses"].shape == (2, 5, 3)
    np.testing.assert_array_equal(
        arrays["converged"],
        flags.pivot(index="image_id", columns="eps", values="value").loc[arrays["image_id"]].values)
    assert list(arrays["rois"]) == ["A", "B", "C"] and str(arrays["driven_roi"]) == "A"
    assert arrays["test_sd"].tolist() == [0.5, 0.5, 0.5]
    # top-2 by the model's own prediction of A
    with torch.no_grad():
        top = np.argsort(-encoder.roi_response(images, "A").numpy())[:2]
    assert arrays["image_id"].tolist() == (100 + top).tolist()

    media = ctx.store.dir / "media"
    for image_id in arrays["image_id"]:
        stem = f"targeted_A_increase_nsd{image_id}"
        video = iio.imread(media / f"{stem}.mp4", plugin="FFMPEG", index=None)
        assert video.shape[0] == 5
        assert Image.open(media / f"{stem}_strip.png").size == (5 * S + 4 * 2, S)
        assert Image.open(media / f"{stem}_responses.png").format == "PNG"
    # The scalar sent to the loggers: A's mean change at the largest budget.
    sent = scalars("targeted", records, probe.settings)
    assert sent[f"targeted/A/direction=increase/driven_roi=A/l2_eps{SCHEDULE[-1]:g}/response_change"] > 3.9


def test_selection_by_measured_and_bottom(setup, tmp_path):
    encoder, images, _ = setup
    measured = np.zeros((len(images), 6))
    measured[:, 2:4] = np.arange(len(images))[:, None]  # B's voxels: image 7 highest
    ids = np.arange(100, 108)
    sel = ImageSelection.parse({"select": "top", "n": 2, "by": "measured"}, "t")
    _, got, _ = sel.resolve(encoder, images, ids, "B", measured)
    assert got.tolist() == [107, 106]
    sel = ImageSelection.parse({"select": "bottom", "n": 3}, "t")
    _, got, _ = sel.resolve(encoder, images, ids, "C")
    with torch.no_grad():
        expected = 100 + np.argsort(encoder.roi_response(images, "C").numpy())[:3]
    assert got.tolist() == expected.tolist()


def test_image_files_are_loaded_cropped_and_resized(setup, tmp_path):
    encoder, images, _ = setup
    rng = np.random.default_rng(0)
    a = tmp_path / "face.png"
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(a)
    b = tmp_path / "grey.jpg"
    Image.fromarray(np.full((20, 20), 128, dtype=np.uint8), mode="L").save(b)
    c = tmp_path / "palette.gif"
    Image.fromarray(rng.integers(0, 255, (S, S, 3), dtype=np.uint8)).convert("P").save(c)
    x = load_image_files([a, b, c], S)
    assert x.shape == (3, 3, S, S) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.allclose(x[1], torch.full((3, S, S), 128 / 255), atol=2 / 255)

    ctx = _context(tmp_path, encoder, images)
    probe = _probe(images=[str(a), str(b)], save_media=True, eps_schedule=[0.5, 1.0])
    probe.bind(ctx)
    records = probe.run(encoder, ctx)
    render_media(ctx.store, [probe])
    assert sorted(records.image_id.unique()) == [-2, -1]
    arrays = ctx.store.load_array("targeted_A_increase")
    assert list(arrays["files"]) == [str(a), str(b)]
    assert (ctx.store.dir / "media" / "targeted_A_increase_face_strip.png").exists()


def test_bad_image_files_raise_data_error_naming_the_file(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DataError, match="notes.png"):
        load_image_files([text], S)
    deep = tmp_path / "deep16.png"
    Image.fromarray(np.full((S, S), 40000, dtype=np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    with pytest.raises(DataError, match=r"deep16.png.*16-bit"):
        load_image_files([deep], S)
    truncated = tmp_path / "cut.png"
    full = tmp_path / "full.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8) + 7).save(full)
    truncated.write_bytes(full.read_bytes()[:60])
    with pytest.raises(DataError, match="cut.png"):
        load_image_files([truncated], S)
    with pytest.raises(DataError, match="missing.png"):
        load_image_files([tmp_path / "missing.png"], S)


@pytest.mark.parametrize(
    "schedule", [[1.0, 1.0, 2.0], [2.0, 1.0], [0.5, -1.0], [0.0, 1.0], [float("nan")], []]
)
def test_bad_eps_schedule_is_a_config_error(schedule):
    with pytest.raises(ConfigError, match="eps"):
        _probe(eps_schedule=schedule)


def test_other_bad_settings_are_config_errors(setup, tmp_path):
    encoder, images, _ = setup
    with pytest.raises(ConfigError, match="direction"):
        _probe(direction="up")
    with pytest.raises(ConfigError, match="driven ROI"):
        _probe(hold={"A": 1.0})
    with pytest.raises(ConfigError, match="hold weights"):
        _probe(hold={"B": -1.0})
    with pytest.raises(ConfigError, match="disagrees"):
        _probe(attack={**ATTACK, "norm": "linf"})
    with pytest.raises(ConfigError, match="select"):
        _probe(images={"select": "best", "n": 2})
    with pytest.raises(ConfigError, match=r"^probe\.targeted\.images\.n must be an integer >= 1, got 0$"):
        _probe(images={"select": "top", "n": 0})
    with pytest.raises(ConfigError, match="not in this encoder"):
        _probe(roi="FFA").bind(_context(tmp_path, encoder, images))


def test_config_builds_the_probe():
    conf = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=targeted",
                "probe.targeted.roi=EBA",
                "probe.targeted.direction=increase",
                "+probe.targeted.hold.FFA=10",
            ],
        )
    assert sorted(cfg.roi) == ["EBA", "FFA", "PPA"]
    probe = instantiate(cfg.probe.targeted, _convert_="all")
    assert isinstance(probe, TargetedProbe)
    assert probe.roi == "EBA" and probe.hold == {"FFA": 10.0} and probe.attack.norm == "l2"
    assert probe.images == ImageSelection(select="top", n=4, by="measured")
