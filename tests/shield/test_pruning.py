"""Block pruning: ratio schedule, identical prioritized masks on all silos, error feedback."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fedshield_flwr.shield import (
    AdapterLayout,
    PruneSchedule,
    RoundAccumulator,
    SiloKeyset,
    block_mask,
    block_tiers,
    encrypt_update,
    generate_keyset,
    kept_block_count,
    prune_ratio,
    scatter_blocks,
    split_with_residual,
    with_residual,
)
from fedshield_flwr.shield.errors import UpdateError
from fedshield_flwr.shield.rounds import SiloState
from tests.shield import make_update


@pytest.fixture(scope="module")
def keys():
    return generate_keyset()


def test_ratio_schedule_clamps_to_0_and_0_99_and_ramps_linearly():
    assert prune_ratio(5, PruneSchedule()) == 0.0
    assert prune_ratio(1, PruneSchedule(target=1.5)) == 0.99
    assert prune_ratio(1, PruneSchedule(target=-0.3)) == 0.0
    ramp = PruneSchedule(target=0.9, start_round=3, ramp_rounds=4, initial=0.1)
    assert [round(ramp.ratio(r), 6) for r in range(1, 10)] == [
        0.0, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.9, 0.9]
    # FedShield-LLM keeps growing past the target; we stop at it and clamp
    assert PruneSchedule(target=2.0, start_round=1, ramp_rounds=2).ratio(100) == 0.99
    with pytest.raises(ValueError):
        PruneSchedule(target=float("nan"))


def _lora_tiers(layers: int = 4) -> np.ndarray:
    """Tiers of a SmolLM2-like q,k,v,o LoRA r=8 adapter (PEFT order: A then B per module)."""
    sizes, lead = [], []
    for _ in range(layers):
        for d_in, d_out in ((576, 192), (576, 576), (576, 576), (576, 192)):  # k, o, q, v
            sizes += [8 * d_in, 8 * d_out]
            lead += [False, True]
    return block_tiers(sizes, lead, 2048)


def test_mask_is_identical_across_silos_and_honours_the_ratio(keys):
    silo, server = keys
    # two silos load the same keyset file independently
    silo_a, silo_b = SiloKeyset.from_bytes(silo.to_bytes()), SiloKeyset.from_bytes(silo.to_bytes())
    tiers = np.arange(900) % 3 == 0
    for ratio in (0.0, 0.5, 0.75, 0.9, 0.99):
        schedule = PruneSchedule(target=ratio)
        for rnd in (1, 2, 7):
            for t in (None, tiers.astype(np.int8)):
                mask_a = block_mask(900, rnd, silo_a.mask_secret, schedule, t)
                mask_b = block_mask(900, rnd, silo_b.mask_secret, schedule, t)
                np.testing.assert_array_equal(mask_a, mask_b)
                assert mask_a.size == kept_block_count(900, ratio)
                assert 0 <= ratio - (1 - mask_a.size / 900) < 1 / 900 + 1e-12
                assert np.all(np.diff(mask_a) > 0)
    p75 = PruneSchedule(target=0.75)
    assert not np.array_equal(block_mask(900, 1, silo.mask_secret, p75),
                              block_mask(900, 2, silo.mask_secret, p75))
    # another federation (another secret) gets other masks
    other, _ = generate_keyset()
    assert not np.array_equal(block_mask(900, 1, silo.mask_secret, p75),
                              block_mask(900, 1, other.mask_secret, p75))
    # end to end: three silos' payloads carry the same blocks and the server accepts them
    schedule = PruneSchedule(target=0.5)
    acc = RoundAccumulator(server, 3, schedule=schedule)
    for i, keyset in enumerate((silo_a, silo_b, silo)):
        payload, _ = encrypt_update(keyset, make_update(i), server_round=3, silo=str(i),
                                    weight=1.0, schedule=schedule)
        acc.add(payload, silo=str(i))
    record = acc.finalize()
    assert record.num_blocks == kept_block_count(14, 0.5) == 7


def test_mask_depends_only_on_public_schedule_secret_and_round_not_on_any_update(keys):
    silo, _ = keys
    schedule = PruneSchedule(target=0.75)
    masks = []
    for seed in (1, 2):  # different data, different residuals: the same blocks
        state = None
        for rnd in (1, 2, 3):
            _, state = encrypt_update(silo, make_update(seed * 10 + rnd, scale=10.0 ** -seed),
                                      server_round=rnd, silo="a", weight=1.0,
                                      schedule=schedule, state=state)
            masks.append(state.last_upload.blocks)
    for a, b in zip(masks[:3], masks[3:]):
        np.testing.assert_array_equal(a, b)
    # a silo that missed rounds computes round 3's mask directly (no history needed)
    tiers = block_tiers(AdapterLayout.from_state(make_update(0)).sizes,
                        AdapterLayout.from_state(make_update(0)).lead_tensors, 2048)
    np.testing.assert_array_equal(block_mask(14, 3, silo.mask_secret, schedule, tiers),
                                  masks[2])


def test_tiers_mark_blocks_that_are_mostly_lora_b():
    layout = AdapterLayout.from_state(make_update(0))
    assert layout.lead_tensors == (False, True, False)
    # A: 9216 values (blocks 0-3 and 1024 of block 4), B: 9216 (rest of 4 .. 1/2 of 9), A ...
    tiers = block_tiers(layout.sizes, layout.lead_tensors, 2048)
    np.testing.assert_array_equal(tiers, [1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert set(block_tiers([10, 10], [False, False], 4).tolist()) == {1}
    names = ["m.lora_A.weight", "m.lora_B.weight", "e.lora_embedding_B", "lora_Bx", "norm"]
    lay = AdapterLayout(tuple(names), ((1,),) * 5)
    assert lay.lead_tensors == (False, True, True, False, False)


def test_round_robin_sends_lead_blocks_first_and_every_block_within_its_period():
    tiers = _lora_tiers(layers=30)  # 450 blocks, 180 mostly LoRA B (the demo adapter)
    lead = np.flatnonzero(tiers == 0)
    assert lead.size == 180
    schedule = PruneSchedule(target=0.75, lead_weight=4.0)
    masks = [block_mask(450, rnd, b"secret", schedule, tiers) for rnd in range(1, 61)]
    assert all(m.size == 113 for m in masks)
    # round 1 sends lead blocks only, and the first two rounds cover all of them
    assert np.all(tiers[masks[0]] == 0)
    assert np.all(np.isin(lead, np.concatenate(masks[:2])))
    # afterwards every block recurs at a bounded period, lead blocks ~4x as often
    last_sent = np.zeros(450, dtype=int)
    gaps = {0: [], 1: []}
    for rnd, mask in enumerate(masks, start=1):
        for b in mask:
            if last_sent[b]:
                gaps[int(tiers[b])].append(rnd - last_sent[b])
        last_sent[mask] = rnd
    assert np.all(last_sent > 40)  # nobody waits forever: delayed, not lost
    assert max(gaps[0]) <= 3 and max(gaps[1]) <= 12
    assert 3 < np.mean(gaps[1][-200:]) / np.mean(gaps[0][-200:]) < 5
    # lead_weight 1 is a plain round robin: 450 blocks at 113 a round cover all in 4 rounds
    flat_rr = PruneSchedule(target=0.75, lead_weight=1.0)
    cover = np.unique(np.concatenate([block_mask(450, r, b"s", flat_rr) for r in (1, 2, 3, 4)]))
    assert cover.size == 450
    # asking for rounds out of order (a restarted or catching-up silo) gives the same masks
    again = [block_mask(450, rnd, b"secret", schedule, tiers) for rnd in (7, 3, 60, 1)]
    for rnd, mask in zip((7, 3, 60, 1), again):
        np.testing.assert_array_equal(mask, masks[rnd - 1])
    with pytest.raises(ValueError):
        PruneSchedule(lead_weight=0.5)


def test_dense_rounds_send_everything_and_the_walk_continues_after_them():
    tiers = _lora_tiers(layers=2)
    ramp = PruneSchedule(target=0.75, start_round=3)
    assert block_mask(30, 1, b"s", ramp, tiers).size == 30
    assert block_mask(30, 3, b"s", ramp, tiers).size == kept_block_count(30, 0.75)


def test_error_feedback_sent_over_rounds_plus_residual_equals_sum_of_updates():
    rng = np.random.default_rng(1)
    size, block = 10_000, 2048
    schedule = PruneSchedule(target=0.75, start_round=2, ramp_rounds=2)
    residual = None
    total_update = np.zeros(size)
    total_sent = np.zeros(size)
    blocks = -(-size // block)
    for rnd in range(1, 9):
        update = rng.standard_normal(size) * 1e-2
        kept = block_mask(blocks, rnd, b"secret", schedule)
        sent, residual = split_with_residual(update, residual, kept, block)
        assert sent.shape == (kept.size, block)
        total_update += update
        total_sent += scatter_blocks(sent, kept, size)
    np.testing.assert_allclose(total_sent + residual, total_update, rtol=0, atol=1e-12)
    assert np.abs(residual).max() > 0  # something is still waiting to be sent


def test_flush_round_sends_every_block_and_empties_the_residual():
    rng = np.random.default_rng(2)
    size, block, rounds = 10_000, 2048, 5
    blocks = -(-size // block)
    schedule = PruneSchedule(target=0.75, flush_round=rounds)
    assert [schedule.ratio(r) for r in range(1, rounds + 2)] == [0.75] * 4 + [0.0, 0.75]
    residual, total_update, total_sent = None, np.zeros(size), np.zeros(size)
    for rnd in range(1, rounds + 1):
        update = rng.standard_normal(size) * 1e-2
        kept = block_mask(blocks, rnd, b"secret", schedule)
        assert kept.size == (blocks if rnd == rounds else kept_block_count(blocks, 0.75))
        sent, residual = split_with_residual(update, residual, kept, block)
        total_update += update
        total_sent += scatter_blocks(sent, kept, size)
    # after the flush every value of every round has been sent, none is left behind
    assert not residual.any()
    np.testing.assert_allclose(total_sent, total_update, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="flush_round"):
        PruneSchedule(flush_round=-1)
    every = PruneSchedule(target=0.75, flush_every=3, flush_round=8)
    assert [every.ratio(r) for r in range(1, 10)] == [
        0.75, 0.75, 0.0, 0.75, 0.75, 0.0, 0.75, 0.0, 0.0]
    with pytest.raises(ValueError, match="flush_every"):
        PruneSchedule(flush_every=-2)


def test_error_feedback_through_encrypt_update_keeps_unsent_values(keys):
    silo, _ = keys
    schedule = PruneSchedule(target=0.75)
    update = make_update(5)
    layout = AdapterLayout.from_state(update)
    _, state = encrypt_update(silo, update, server_round=1, silo="a", weight=2.0,
                              schedule=schedule)
    sent = state.last_upload.sent_vector(layout.num_values)
    np.testing.assert_array_equal(sent + state.residual, layout.flatten(update))


def test_a_silo_trains_from_the_global_adapter_plus_what_it_has_not_sent(keys):
    silo, _ = keys
    global_adapter = make_update(8, scale=2e-2)
    layout = AdapterLayout.from_state(global_adapter)
    assert with_residual(global_adapter, SiloState()) == global_adapter  # nothing held back
    _, state = encrypt_update(silo, make_update(9), server_round=1, silo="a", weight=1.0,
                              schedule=PruneSchedule(target=0.75))
    start = with_residual(global_adapter, state)
    assert list(start) == list(global_adapter)
    assert all(start[k].dtype == global_adapter[k].dtype for k in start)
    delta = layout.flatten(start) - layout.flatten(global_adapter)
    np.testing.assert_allclose(delta, state.residual, rtol=0, atol=1e-7)
    sent = state.last_upload.sent_vector(layout.num_values) != 0
    assert not delta[sent].any() and np.abs(delta[~sent]).max() > 0
    with pytest.raises(UpdateError, match="residual has"):
        with_residual(OrderedDict(list(global_adapter.items())[:2]), state)
