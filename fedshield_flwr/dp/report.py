"""What the server does with the epsilon the silos report (no torch: the ServerApp imports it)."""

from __future__ import annotations

DP_EPSILON = "dp-epsilon"  # silo train metric: epsilon spent after this round
DP_EPSILON_NEXT = "dp-epsilon-next"  # ... and what it would be after one more round


def budget_exceeded(budget: float | None, next_epsilon: float | None) -> bool:
    """Whether the next round would pass ``budget`` (False without a budget or a report)."""
    return budget is not None and next_epsilon is not None and next_epsilon > budget
