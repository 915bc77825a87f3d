"""How the report writes numbers in its cells: ratios ("2.31x"), plain figures and percentages, each
empty when a figure is missing (a case that did not run leaves blank cells, not an error).

Shared by report.py (the tables) and targets.py (the verdicts).
"""
from __future__ import annotations


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as "1.23x"; callers pass (ours, baseline) for throughputs or (baseline, ours) for times."""
    if not a or not b:
        return ""
    return f"{a / b:.2f}x"


def num(value: float | None) -> str:
    """One decimal, or empty."""
    return "" if value is None else f"{value:.1f}"


def pct(value: float | None, whole: float | None) -> str:
    """``value`` as a percentage of ``whole``: whole, or with two decimals for a share of 1."""
    if value is None or not whole:
        return ""
    return f"{100 * value / whole:.0f}%" if whole != 1 else f"{100 * value:.2f}%"
