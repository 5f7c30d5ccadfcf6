"""How budgets are written for people: the one place every table, log line and figure asks."""

from __future__ import annotations

from fractions import Fraction


def format_eps(eps: float, norm: str | None) -> str:
    """L-inf budgets as the k/255 intensity steps they are set in (0.5/255); L2 as a number."""
    if norm == "linf":
        steps = Fraction(float(eps) * 255).limit_denominator(8)
        if abs(float(steps) - eps * 255) <= 1e-6 * eps * 255:
            return f"{float(steps):g}/255"
    return f"{eps:g}"
