"""End-to-end protocol: precision, exact weighted mean with dropouts, catch-up, checkpoints."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fedshield_flwr.shield import (
    AdapterLayout,
    AggregateLog,
    PayloadError,
    PruneSchedule,
    RoundAccumulator,
    SiloState,
    catch_up,
    decrypt_aggregate,
    encode_record,
    encrypt_snapshot,
    encrypt_update,
    generate_keyset,
)
from fedshield_flwr.shield.reference import (
    ReferenceParams,
    reference_aggregate,
    reference_context,
    reference_decrypt,
    reference_encrypt,
    reference_public_context,
)
from tests.shield import SHAPES, flat, make_update


@pytest.fixture(scope="module")
def keys():
    return generate_keyset()


def _sent(state: SiloState, num_values: int) -> np.ndarray:
    return state.last_upload.sent_vector(num_values)


def test_packing_error_is_below_1e_6_at_update_scale_1e_2(keys):
    silo, server = keys
    shapes = OrderedDict([("big.lora_A.weight", (64, 2048))])  # 131,072 values, 64 blocks
    weights = [1.0, 2.5, 0.5]
    acc = RoundAccumulator(server, 1)
    expected = np.zeros(64 * 2048)
    for i, w in enumerate(weights):
        update = make_update(10 + i, scale=1e-2, shapes=shapes)
        update["big.lora_A.weight"][0, :4] = [0.05, -0.05, 0.049, -0.049]  # 5-sigma values
        payload, _ = encrypt_update(silo, update, server_round=1, silo=str(i), weight=w)
        acc.add(payload, silo=str(i))
        expected += w * flat(update)
    expected /= sum(weights)
    mean = decrypt_aggregate(silo, encode_record(server, acc.finalize())).values
    error = np.abs(mean - expected).max()
    assert error <= 1e-6, error


def test_exact_weighted_mean_over_three_silos_with_one_dropping(keys):
    silo, server = keys
    schedule = PruneSchedule(target=0.5)
    weights = {"a": 3.0, "b": 1.0, "c": 2.0}
    payloads, sent = {}, {}
    for i, (sid, w) in enumerate(weights.items()):
        payloads[sid], state = encrypt_update(silo, make_update(i), server_round=2, silo=sid,
                                              weight=w, schedule=schedule)
        sent[sid] = _sent(state, 27648)
    # all three reply
    acc = RoundAccumulator(server, 2, schedule=schedule)
    for sid in weights:
        acc.add(payloads[sid], silo=sid)
    full = decrypt_aggregate(silo, encode_record(server, acc.finalize()))
    want = sum(weights[s] * sent[s] for s in weights) / 6.0
    assert full.total_weight == 6.0 and full.silos == ("a", "b", "c")
    assert np.abs(full.values - want).max() <= 1e-6
    # "c" drops mid-round: the mean is over a and b only, with their weights only
    acc = RoundAccumulator(server, 2, schedule=schedule)
    acc.add(payloads["a"], silo="a")
    acc.add(payloads["b"], silo="b")
    part = decrypt_aggregate(silo, encode_record(server, acc.finalize()))
    want = (3.0 * sent["a"] + 1.0 * sent["b"]) / 4.0
    assert part.total_weight == 4.0 and part.silos == ("a", "b")
    assert np.abs(part.values - want).max() <= 1e-6
    assert np.all(part.values[~np.isin(np.arange(27648) // 2048, part.blocks)] == 0.0)


def _run_rounds(keys, silos, rounds, schedule, log, dropped=None):
    """Simulate rounds; returns the global adapter and state of every silo."""
    silo_keyset, server = keys
    dropped = dropped or {}
    zero = OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items())
    globals_ = {s: zero for s in silos}
    states = {s: SiloState() for s in silos}
    for rnd in rounds:
        acc = RoundAccumulator(server, rnd, schedule=schedule)
        for i, sid in enumerate(silos):
            if dropped.get((sid, rnd)) == "absent":
                continue
            payload, states[sid] = encrypt_update(
                silo_keyset, make_update(100 * rnd + i), server_round=rnd, silo=sid,
                weight=1.0 + i, schedule=schedule, state=states[sid])
            if dropped.get((sid, rnd)) != "lost":
                acc.add(payload, silo=sid)
        log.append(acc.finalize())
        for sid in silos:
            if dropped.get((sid, rnd)) == "absent":
                continue
            globals_[sid], states[sid] = catch_up(
                silo_keyset, globals_[sid], log.downlink(states[sid].global_round), states[sid],
                silo=sid)
    return globals_, states


def test_silo_that_missed_rounds_catches_up_from_the_log_and_a_snapshot(keys):
    silo, server = keys
    log = AggregateLog(server)
    schedule = PruneSchedule(target=0.5)
    dropped = {("c", 2): "absent", ("c", 3): "absent"}
    globals_, states = _run_rounds(keys, ["a", "b", "c"], [1, 2, 3, 4], schedule, log, dropped)
    assert {s: st.global_round for s, st in states.items()} == {"a": 4, "b": 4, "c": 4}
    for sid in ("b", "c"):
        for name in SHAPES:
            np.testing.assert_allclose(globals_[sid][name], globals_["a"][name], atol=1e-7)
    # a snapshot compacts the log; a newcomer starting from round 0 rebuilds the same model
    log.add_snapshot(encrypt_snapshot(silo, globals_["a"], server_round=4, silo="a"), silo="a")
    assert len(log) == 1 and log.snapshot_round == 4
    zero = OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items())
    newcomer, state = catch_up(silo, zero, log.downlink(0), SiloState(), silo="d")
    assert state.global_round == 4
    for name in SHAPES:
        np.testing.assert_allclose(newcomer[name], globals_["a"][name], atol=1e-6)


def test_lost_reply_returns_to_the_residual_so_nothing_is_lost(keys):
    silo_keyset, server = keys
    schedule = PruneSchedule(target=0.5)
    _, states = _run_rounds(keys, ["a", "b"], [1, 2, 3], schedule, AggregateLog(server),
                               dropped={("b", 2): "lost"})
    # Replay silo b (masks and pruning are deterministic) to get what the server summed of it.
    included, state = [], SiloState()
    for rnd in (1, 2, 3):
        _, state = encrypt_update(silo_keyset, make_update(100 * rnd + 1), server_round=rnd,
                                  silo="b", weight=2.0, schedule=schedule, state=state)
        summed = ("a",) if rnd == 2 else ("a", "b")
        if "b" in summed:
            included.append(_sent(state, 27648))
        state = state.after_aggregate(rnd, summed, "b", 27648)
    computed = sum(flat(make_update(100 * rnd + 1)) for rnd in (1, 2, 3))
    np.testing.assert_allclose(sum(included) + states["b"].residual, computed, rtol=0,
                               atol=1e-12)


def test_upload_of_a_round_the_server_never_aggregated_returns_to_the_residual(keys):
    silo, server = keys
    schedule = PruneSchedule(target=0.5)
    log = AggregateLog(server)
    zero = OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items())
    state, summed = SiloState(), []
    for rnd in (1, 2, 3):
        payload, state = encrypt_update(silo, make_update(rnd), server_round=rnd, silo="a",
                                        weight=1.0, schedule=schedule, state=state)
        if rnd == 2:
            continue  # the server got no valid update in round 2: no aggregate, no log entry
        summed.append(state.last_upload.sent_vector(27648))
        acc = RoundAccumulator(server, rnd, schedule=schedule)
        acc.add(payload, silo="a")
        log.append(acc.finalize())
        zero, state = catch_up(silo, zero, log.downlink(state.global_round), state, silo="a")
    assert state.pending == () and state.global_round == 3
    computed = sum(flat(make_update(rnd)) for rnd in (1, 2, 3))
    np.testing.assert_allclose(sum(summed) + state.residual, computed, rtol=0, atol=1e-12)


def test_downlink_with_a_gap_is_refused(keys):
    silo, server = keys
    log = AggregateLog(server)
    _run_rounds(keys, ["a"], [1, 2, 3], PruneSchedule(), log)
    records = log.downlink(0)
    zero = OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items())
    with pytest.raises(PayloadError, match="jumps from round 1 to 3"):
        catch_up(silo, zero, [records[0], records[2]], SiloState(), silo="a")


def test_aggregate_log_checkpoint_round_trips_and_rejects_corruption(keys):
    _, server = keys
    log = AggregateLog(server)
    _run_rounds(keys, ["a", "b"], [1, 2], PruneSchedule(target=0.75), log)
    blob = log.to_bytes()
    restored = AggregateLog.from_bytes(server, blob)
    assert restored.downlink(0) == log.downlink(0) and restored.latest_round == 2
    with pytest.raises(PayloadError):
        AggregateLog.from_bytes(server, blob[:-10])


def test_silo_state_round_trips_through_arrays(keys):
    silo, _ = keys
    _, state = encrypt_update(silo, make_update(0), server_round=1, silo="a", weight=1.0,
                              schedule=PruneSchedule(target=0.5))
    again = SiloState.from_arrays(state.to_arrays())
    np.testing.assert_array_equal(again.residual, state.residual)
    np.testing.assert_array_equal(again.last_upload.blocks, state.last_upload.blocks)
    np.testing.assert_array_equal(again.last_upload.values, state.last_upload.values)
    assert again.last_upload.round == 1 and again.global_round == 0


def test_process_parallel_encryption_matches_serial(keys):
    silo, server = keys
    values = np.random.default_rng(3).standard_normal((6, 2048)) * 1e-2
    with silo.encryption_pool(workers=2) as pool:
        c0, seeds = pool.encrypt_blocks(values)
    assert c0.shape == (6, 2048) and seeds.shape == (6, 65)
    decrypted = silo.engine.decrypt_blocks(c0, seeds[None])
    assert np.abs(decrypted - values).max() < 1e-7
    layout = AdapterLayout.from_state(make_update(0))
    with silo.encryption_pool(workers=2) as pool:
        payload, _ = encrypt_update(silo, make_update(0), server_round=1, silo="a",
                                    weight=1.0, pool=pool)
    acc = RoundAccumulator(server, 1)
    acc.add(payload, silo="a")
    mean = decrypt_aggregate(silo, encode_record(server, acc.finalize())).values
    assert np.abs(mean - layout.flatten(make_update(0))).max() < 1e-7


def test_reference_fedshield_llm_scheme_computes_the_unweighted_mean_of_pruned_updates():
    context = reference_context(ReferenceParams(galois_keys=False))
    shapes = OrderedDict([("x.lora_A.weight", (4, 100)), ("x.lora_B.weight", (100, 4))])
    updates = [make_update(i, shapes=shapes) for i in range(2)]
    payloads = [reference_encrypt(context, u, sparsity=0.5) for u in updates]
    mean = reference_decrypt(context, reference_aggregate(reference_public_context(context),
                                                          payloads), shapes)
    for name in shapes:
        pruned = [np.where(np.abs(u[name]) >= np.median(np.abs(u[name])), u[name], 0)
                  for u in updates]
        np.testing.assert_allclose(mean[name], (pruned[0] + pruned[1]) / 2, atol=1e-6)
