import math

from opacus.accountants import RDPAccountant

from fedshield_flwr.dp.accounting import (
    epsilon_after,
    last_round_within_budget,
    noise_multiplier_for,
)


def test_epsilon_equals_opacus_step_by_step_accountant():
    acc = RDPAccountant()
    for _ in range(24):
        acc.step(noise_multiplier=1.1, sample_rate=0.01)
    assert math.isclose(epsilon_after(1.1, 1e-5, 0.01, 24), acc.get_epsilon(1e-5), rel_tol=1e-9)


def test_noise_multiplier_reaches_target_epsilon():
    sigma = noise_multiplier_for(8.0, 1e-4, 0.02, 24)
    eps = epsilon_after(sigma, 1e-4, 0.02, 24)
    assert eps <= 8.0 and eps > 7.8


def test_budget_stop_round_is_the_last_within_target():
    sigma, q, steps = 0.8, 0.05, 8
    last = last_round_within_budget(3.0, sigma, 1e-4, q, steps, 50)
    assert 0 < last < 50
    assert epsilon_after(sigma, 1e-4, q, last * steps) <= 3.0
    assert epsilon_after(sigma, 1e-4, q, (last + 1) * steps) > 3.0
