"""Client-level DP: clipping bound, uniform noised mean, shield's distributed noise (plaintext
and one CKKS round), federation accounting against Opacus."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant

from fedshield_flwr.config import DpSettings
from fedshield_flwr.dp.accounting import epsilon_after
from fedshield_flwr.dp.client import (
    DP_EPSILON,
    DP_NOISE,
    ClientDp,
    ClientDpPlan,
    FederationAccountant,
    clip_update,
    distributed_privatizer,
    private_mean,
)
from fedshield_flwr.wire import encode_arrays
from strategies.fedavg import LoraFedAvg
from tests.helpers import reply, server_message
from tests.shield import flat, make_update

TEMPLATE = OrderedDict([("a.lora_A.weight", np.zeros((2, 3), np.float32)),
                        ("a.lora_B.weight", np.zeros((3, 2), np.float32))])


def _state(value):
    return OrderedDict((k, np.full(v.shape, value, np.float32)) for k, v in TEMPLATE.items())


def _norm(state, ref):
    return math.sqrt(sum(float(np.sum((np.asarray(state[k], np.float64) - ref[k]) ** 2))
                         for k in ref))


@pytest.mark.parametrize("scale", [1e-3, 0.3, 50.0])
def test_clipped_update_norm_is_bounded_and_small_updates_pass(scale):
    ref = make_update(1)
    state = OrderedDict((k, ref[k] + v) for k, v in make_update(2, scale).items())
    clipped, before = clip_update(state, ref, 1.0)
    assert before == pytest.approx(_norm(state, ref))
    after = _norm(clipped, ref)
    assert after <= 1.0 + 1e-9
    if before <= 1.0:  # nothing to clip: the update passes unchanged
        assert after == pytest.approx(before)
    else:  # scaled, direction kept
        assert after == pytest.approx(1.0)
        k = next(iter(ref))
        np.testing.assert_allclose(clipped[k] - ref[k], (state[k] - ref[k]) / before, rtol=1e-6)


def test_private_mean_is_uniform_over_the_sampled_silos():
    """sigma = 0 isolates the clipping: sum of clipped updates / n sampled (one silo dropped)."""
    ref = _state(0.5)
    plan = ClientDpPlan(noise_multiplier=0.0, clipping_norm=1.0, delta=0.1, sample_rate=1.0,
                        rounds=1)
    states = [_state(1.5), _state(10.0)]  # update norms sqrt(12) and 9.5 sqrt(12): both clipped
    out = private_mean(states, ref, plan, num_sampled=3)
    per_value = 1.0 / math.sqrt(12)  # each clipped update is a constant of norm 1
    for k in ref:
        np.testing.assert_allclose(out[k], 0.5 + 2 * per_value / 3, rtol=1e-6)


def test_fedavg_strategy_clips_noises_and_reports_epsilon(flower_identity):
    dp = ClientDp(DpSettings(level="client", noise_multiplier=1.0, max_grad_norm=1.0), rounds=3)
    strat = LoraFedAvg(TEMPLATE, client_dp=dp)
    strat.current_arrays = encode_arrays(TEMPLATE)
    dp.begin_round(1, num_sampled=2, num_available=4)

    def train_reply(node, state, n):
        arrays = ArrayRecord(OrderedDict((k, Array(v)) for k, v in state.items()))
        metrics = MetricRecord({"num-examples": n, "server-round": 1, "train_loss": 1.0})
        return reply(server_message(RecordDict({}), node),
                     RecordDict({"arrays": arrays, "metrics": metrics}))

    arrays, metrics = strat.aggregate_train(1, [train_reply(1, _state(3.0), 10),
                                                train_reply(2, _state(-3.0), 1000)])
    # clipped updates cancel (uniform mean; weighted by examples they would not): what is left
    # is the noise, std sigma * C / n = 0.5
    noise = np.concatenate([arrays[k].numpy().ravel() for k in TEMPLATE])
    assert np.all(np.abs(noise) < 0.5 * 6)
    assert metrics[DP_EPSILON] == pytest.approx(epsilon_after(1.0, 0.25, 0.5, 1))
    assert metrics[DP_NOISE] == 1.0


def test_plan_from_epsilon_spends_the_budget_over_the_rounds():
    plan = ClientDpPlan.from_settings(DpSettings(level="client", epsilon=4.0), rounds=20,
                                      num_silos=16, num_sampled=4)
    assert plan.delta == 1 / 16 and plan.sample_rate == 0.25
    spent = epsilon_after(plan.noise_multiplier, plan.delta, plan.sample_rate, 20)
    assert 3.8 < spent <= 4.0 + 1e-6


def test_federation_epsilon_equals_opacus_after_every_round():
    sigma, q, delta = 1.1, 0.25, 1 / 16
    acc, ref = FederationAccountant(delta), RDPAccountant()
    for _ in range(3):
        acc.step(sigma, q)
        ref.step(noise_multiplier=sigma, sample_rate=q)
        assert acc.epsilon() == pytest.approx(ref.get_epsilon(delta), rel=1e-9)
    assert acc.epsilon() == pytest.approx(epsilon_after(sigma, delta, q, 3), rel=1e-9)


def test_dropped_shield_silo_is_accounted_with_the_noise_actually_added():
    dp = ClientDp(DpSettings(level="client", noise_multiplier=2.0), rounds=2, distributed=True)
    dp.begin_round(1, num_sampled=4, num_available=4)
    assert dp.config_entries(1)["dp.sampled-silos"] == 4
    got = dp.end_round(1, num_summed=3)
    assert got[DP_NOISE] == pytest.approx(2.0 * math.sqrt(3 / 4))
    assert got[DP_EPSILON] == pytest.approx(epsilon_after(2.0 * math.sqrt(0.75), 0.25, 1.0, 1))
    ref = RDPAccountant()  # what dp.stop-at-budget compares with the target: one more round
    ref.history = [(2.0 * math.sqrt(0.75), 1.0, 1), (2.0, 1.0, 1)]
    assert dp.next_round_epsilon() == pytest.approx(ref.get_epsilon(0.25), rel=1e-9)
    assert got["dp_epsilon_next"] == pytest.approx(dp.next_round_epsilon())


def test_client_level_budget_stop_happens_before_the_round_that_would_pass_epsilon():
    from strategies.base import budget_exceeded
    sigma, q, budget = 1.0, 0.25, 3.0  # an explicit noise multiplier: the budget binds
    dp = ClientDp(DpSettings(level="client", noise_multiplier=sigma, epsilon=budget,
                             stop_at_budget=True), rounds=50)
    done, nxt = 0, None
    for rnd in range(1, 51):  # what RoundLoop.run does with the round's metrics
        if budget_exceeded(budget, nxt):
            break
        dp.begin_round(rnd, num_sampled=4, num_available=16)
        got = dp.end_round(rnd, num_summed=4)
        done, nxt = rnd, got["dp_epsilon_next"]
    expected = max(r for r in range(1, 51) if epsilon_after(sigma, 1 / 16, q, r) <= budget)
    assert done == expected and 1 < expected < 50
    assert got[DP_EPSILON] <= budget < epsilon_after(sigma, 1 / 16, q, done + 1)


def test_distributed_noise_shares_sum_to_the_full_variance_in_plaintext():
    """n silos' real noise shares, summed as shield sums (uniform weights): var = sigma^2 C^2."""
    n, sigma, clip, size = 8, 1.3, 0.7, 20_000
    rng = np.random.default_rng(0)
    privatize = distributed_privatizer(clip, sigma, n)
    weight = 1e-3  # shield.weight-scale: every silo the same weight under client-level DP
    total_sent, total_clipped = np.zeros(size), np.zeros(size)
    for _ in range(n):
        clipped, released = privatize(rng.standard_normal(size))  # norm ~141: clipped to C
        assert np.linalg.norm(clipped) == pytest.approx(clip)
        total_sent += weight * released
        total_clipped += weight * clipped
    noise_of_sum = (total_sent - total_clipped) / weight
    assert abs(noise_of_sum.mean()) < 4 * sigma * clip / math.sqrt(size)
    assert np.var(noise_of_sum) == pytest.approx((sigma * clip) ** 2, rel=0.05)


def test_distributed_noise_in_one_ckks_round():
    """Real encryption, server sum and decryption: the decrypted mean's noise is sigma C / n."""
    from fedshield_flwr.shield import RoundAccumulator, encode_record, encrypt_update
    from fedshield_flwr.shield.keys import generate_keyset
    from fedshield_flwr.shield.rounds import decrypt_aggregate

    silo_keys, server_keys = generate_keyset()
    n, sigma, clip = 4, 1.0, 0.5
    acc = RoundAccumulator(server_keys, 1)
    clipped_sum = 0.0
    for i in range(n):
        payload, state = encrypt_update(silo_keys, make_update(i), server_round=1, silo=str(i),
                                        weight=1e-3,
                                        privatize=distributed_privatizer(clip, sigma, n))
        sent = state.last_upload.sent_vector(payload_size := flat(make_update(i)).size)
        assert np.linalg.norm(sent) == pytest.approx(clip)  # the clipped vector is remembered
        clipped_sum = clipped_sum + sent
        acc.add(payload, silo=str(i))
    agg = decrypt_aggregate(silo_keys, encode_record(server_keys, acc.finalize()),
                            expected_round=1)
    noise = agg.values - clipped_sum / n
    assert noise.size == payload_size
    assert np.std(noise) == pytest.approx(sigma * clip / n, rel=0.05)
    assert abs(noise.mean()) < 4 * sigma * clip / n / math.sqrt(noise.size)


def test_lpp_clips_the_update_over_the_dequantized_adapter_the_silos_started_from(
        flower_identity):
    """sigma = 0: the new fp adapter is fp + lr * mean(clip(reply - dequantized(sent)))."""
    from flwr.app import ConfigRecord

    from fedshield_flwr.lpp.adapter import AdapterQuantSpec, prepare_global_adapter
    from strategies.lpp import LppStrategy
    from tests.strategies.test_lpp_strategy import TEMPLATE as LPP
    from tests.strategies.test_lpp_strategy import NodeGrid, _arrays, _state
    from tests.strategies.test_lpp_strategy import _train_reply as lpp_reply

    dp = ClientDp(DpSettings(level="client", noise_multiplier=1.0, max_grad_norm=0.05), 2)
    dp.plan = ClientDpPlan(0.0, 0.05, 0.5, 1.0, 2)
    dp.accountant = FederationAccountant(0.5)
    strat = LppStrategy(LPP, lambda: {"w": np.zeros(8, np.uint8)}, "ab" * 32,
                        AdapterQuantSpec(4, 32), 0.5, client_dp=dp, min_train_nodes=1,
                        min_available_nodes=1, min_evaluate_nodes=1)
    fp = _state(0, 0.01)
    strat.configure_train(1, _arrays(fp), ConfigRecord(), NodeGrid([1, 2], [1, 2]))
    _, sent = prepare_global_adapter(fp, AdapterQuantSpec(4, 32))
    big, small = _state(1, 0.01), _state(2, 1e-5)  # norms ~0.16 (clipped) and ~1.6e-4
    a = OrderedDict((k, sent[k] + big[k]) for k in LPP)
    b = OrderedDict((k, sent[k] + small[k]) for k in LPP)
    new, _ = strat.aggregate_train(1, [lpp_reply(1, a, 10), lpp_reply(2, b, 1000)])
    norm = math.sqrt(sum(float(np.sum(big[k].astype(np.float64) ** 2)) for k in LPP))
    assert norm > 0.05  # clipped; clipping reply - fp instead would be off by (sent - fp)/4
    for k in LPP:
        expected = fp[k] + 0.5 * (big[k] * (0.05 / norm) + small[k]) / 2
        np.testing.assert_allclose(new[k].numpy(), expected, atol=1e-6)
