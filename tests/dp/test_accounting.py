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


# ---- the dp.* run config ----

import pytest as _pytest  # noqa: E402

from fedshield_flwr.config import ConfigError, RunConfig, default_flat_config  # noqa: E402


def _cfg(**keys):
    flat = default_flat_config()
    flat.update(keys)
    return RunConfig.from_flat(flat)


def test_dp_defaults_are_off_and_match_pyproject():
    cfg = _cfg()
    assert cfg.dp.level == "none" and not cfg.dp.enabled
    assert cfg.dp.max_grad_norm == 1.0


@_pytest.mark.parametrize("keys, named", [
    ({"dp.level": "row"}, "dp.level"),
    ({"dp.level": "record", "dp.epsilon": -1.0}, "dp.epsilon"),
    ({"dp.level": "record"}, "dp.epsilon"),  # neither a budget nor a noise multiplier
    ({"dp.level": "record", "dp.epsilon": 2.0, "dp.delta": 1.0}, "dp.delta"),
    ({"dp.level": "record", "dp.epsilon": 2.0, "dp.max-grad-norm": 0.0}, "dp.max-grad-norm"),
    ({"dp.stop-at-budget": True}, "dp.stop-at-budget"),
    ({"dp.level": "client", "dp.epsilon": 2.0, "strategy.name": "split"}, "dp.level"),
])
def test_dp_config_errors_name_the_key(keys, named):
    with _pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        _cfg(**keys)


def test_dp_record_with_a_budget_is_accepted():
    cfg = _cfg(**{"dp.level": "record", "dp.epsilon": 4.0, "strategy.name": "shield"})
    assert cfg.dp.enabled and cfg.dp.epsilon == 4.0


def test_dp_record_in_split_is_refused_until_its_relay_loop_does_dp_sgd():
    with _pytest.raises(ConfigError, match="split's silo-side adapters"):
        _cfg(**{"dp.level": "record", "dp.epsilon": 4.0, "strategy.name": "split"})
