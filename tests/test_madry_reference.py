"""Our PGD against MadryLab `robustness`' own attack steps, as an independent reference.

`robustness.attacker.Attacker.forward` hard-codes `.cuda()`, and its model modules import
`torchvision.models.utils` (gone from torchvision), so neither runs here unpatched. Its
`attack_steps` module imports only torch: its L2/L-inf steps, projections and random starts are
the reference, driven by the same loop as `Attacker.forward` (random start, step, project,
keep the best iterate), with our brain-response objective as its custom loss.
"""

import pytest
import torch
from helpers import LinearEncoder

from brainrobust.models.backbones import TinyCNN
from brainrobust.probes.attack import PGDConfig, pgd
from brainrobust.probes.objectives import make_objective

attack_steps = pytest.importorskip("robustness.attack_steps")
STEPS = {"l2": attack_steps.L2Step, "linf": attack_steps.LinfStep}


def madry_pgd(objective, x, eps, norm, steps, step_size, seed):
    """The loop of robustness.attacker.Attacker.forward (untargeted, random start, best kept)."""
    torch.manual_seed(seed)
    step = STEPS[norm](orig_input=x.detach(), eps=eps, step_size=step_size)
    adv = step.random_perturb(x)
    best_loss, best_x = None, None
    for _ in range(steps):
        adv = adv.clone().detach().requires_grad_(True)
        losses = objective(adv)
        (grad,) = torch.autograd.grad(losses.mean(), adv)
        with torch.no_grad():
            if best_loss is None:
                best_loss, best_x = losses.detach().clone(), adv.detach().clone()
            else:
                better = losses > best_loss
                best_loss[better], best_x[better] = losses[better], adv[better]
            adv = step.project(step.step(adv, grad))
    with torch.no_grad():
        final = objective(adv)
        better = final > best_loss
        best_loss[better], best_x[better] = final[better], adv[better]
    return best_loss, best_x


class CNNEncoder(torch.nn.Module):
    """A small nonlinear encoder with the BrainEncoder interface."""

    def __init__(self, voxels=40):
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyCNN().eval()
        self.readout = torch.nn.Linear(128 * 2 * 2, voxels)
        self.rois = {"A": torch.arange(voxels // 2), "B": torch.arange(voxels // 2, voxels)}
        self.meta, self.input_size = {"model": "cnn"}, 32

    def forward(self, x):
        return self.readout(torch.nn.functional.adaptive_avg_pool2d(self.net(x), 2).flatten(1))

    def roi_response(self, x, roi):
        return self(x)[:, self.rois[roi]].mean(1)


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("linf", 4 / 255)])
@pytest.mark.parametrize("kind", ["abs", "pattern"])
def test_our_pgd_matches_the_madry_reference(norm, eps, kind):
    torch.manual_seed(1)
    encoder = CNNEncoder().eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    x = torch.rand(6, 3, 32, 32) * 0.6 + 0.2
    objective = make_objective(encoder, "A", kind, x)
    steps, step_size = 20, 2.5 * eps / 20
    theirs, their_x = madry_pgd(objective, x, eps, norm, steps, step_size, seed=0)
    cfg = PGDConfig(norm=norm, steps=steps, step_size=2.5 / steps, random_start=True, restarts=1)
    gen = torch.Generator().manual_seed(0)
    ours = pgd(objective, x, torch.full((len(x),), eps), cfg, generator=gen)
    # Both stay feasible, and ours is at least as strong on average (within 2%).
    their_delta = (their_x - x).flatten(1)
    their_norm = their_delta.norm(dim=1) if norm == "l2" else their_delta.abs().amax(dim=1)
    assert (their_norm <= eps + 1e-5).all() and (ours.norm <= eps + 1e-6).all()
    assert ours.objective.mean() >= 0.98 * theirs.mean()


def test_linear_optimum_reached_by_both():
    torch.manual_seed(2)
    size, voxels = 8, 12
    W = torch.randn(voxels, 3 * size * size)
    encoder = LinearEncoder(W, {"all": torch.arange(voxels)}).eval()
    x = torch.full((4, 3, size, size), 0.5)
    eps = 0.05  # small enough that the box never binds: the optimum is eps * sigma_1
    objective = make_objective(encoder, "all", "pattern", x)
    optimum = eps * torch.linalg.svdvals(W)[0]
    theirs, _ = madry_pgd(objective, x, eps, "l2", 50, 2.5 * eps / 50, seed=0)
    cfg = PGDConfig(norm="l2", steps=50, step_size=2.5 / 50)
    ours = pgd(objective, x, torch.full((4,), eps), cfg, generator=torch.Generator().manual_seed(0))
    # With the same random start and step (2.5 eps / steps), 50 steps of either get within ~10%
    # of the optimum (power-iteration-like convergence on ||W delta||); ours is never weaker.
    assert (theirs >= 0.85 * optimum).all() and (ours.objective >= 0.85 * optimum).all()
    assert ours.objective.mean() >= 0.99 * theirs.mean()
