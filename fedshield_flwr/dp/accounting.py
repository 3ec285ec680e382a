"""Privacy accounting for DP-SGD with Opacus's RDP accountant (sampled Gaussian mechanism)."""

from __future__ import annotations

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier


def noise_multiplier_for(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier that spends ``epsilon`` at ``delta`` after ``steps`` sampled steps."""
    if epsilon <= 0 or not 0 < delta < 1 or not 0 < sample_rate <= 1 or steps < 1:
        raise ValueError(f"dp accounting: need epsilon > 0, 0 < delta < 1, 0 < sample_rate <= 1 "
                         f"and steps >= 1 (got {epsilon}, {delta}, {sample_rate}, {steps})")
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant="rdp"))


def epsilon_after(noise_multiplier: float, delta: float, sample_rate: float, steps: int) -> float:
    """Epsilon spent at ``delta`` after ``steps`` steps (``inf`` without noise)."""
    if noise_multiplier <= 0:
        return float("inf")
    if steps == 0:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta))


def last_round_within_budget(epsilon: float, noise_multiplier: float, delta: float,
                             sample_rate: float, steps_per_round: int, rounds: int) -> int:
    """The last round (0..``rounds``) whose cumulative epsilon stays within ``epsilon``."""
    last = 0
    for r in range(1, rounds + 1):
        if epsilon_after(noise_multiplier, delta, sample_rate, r * steps_per_round) > epsilon:
            break
        last = r
    return last
