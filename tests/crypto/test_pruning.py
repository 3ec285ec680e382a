"""Block pruning: ratio schedule, identical masks on all silos, error feedback loses nothing."""

from __future__ import annotations

import numpy as np
import pytest

from fedshield_flwr.crypto import (
    AdapterLayout,
    PruneSchedule,
    RoundAccumulator,
    SiloKeyset,
    block_mask,
    encrypt_update,
    generate_keyset,
    kept_block_count,
    prune_ratio,
    scatter_blocks,
    split_with_residual,
)

from . import make_update


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


def test_mask_is_identical_across_silos_and_honours_the_ratio(keys):
    silo, server = keys
    # two silos load the same keyset file independently
    silo_a, silo_b = SiloKeyset.from_bytes(silo.to_bytes()), SiloKeyset.from_bytes(silo.to_bytes())
    for ratio in (0.0, 0.5, 0.75, 0.9, 0.99):
        for rnd in (1, 2, 7):
            mask_a = block_mask(900, ratio, rnd, silo_a.mask_secret)
            mask_b = block_mask(900, ratio, rnd, silo_b.mask_secret)
            np.testing.assert_array_equal(mask_a, mask_b)
            assert mask_a.size == kept_block_count(900, ratio)
            assert 0 <= ratio - (1 - mask_a.size / 900) < 1 / 900 + 1e-12
            assert np.all(np.diff(mask_a) > 0)
    assert not np.array_equal(block_mask(900, 0.75, 1, silo.mask_secret),
                              block_mask(900, 0.75, 2, silo.mask_secret))
    # another federation (another secret) gets other masks: the server cannot predict them
    other, _ = generate_keyset()
    assert not np.array_equal(block_mask(900, 0.75, 1, silo.mask_secret),
                              block_mask(900, 0.75, 1, other.mask_secret))
    # end to end: three silos' payloads carry the same blocks and the server accepts them
    schedule = PruneSchedule(target=0.5)
    acc = RoundAccumulator(server, 3, schedule=schedule)
    for i, keyset in enumerate((silo_a, silo_b, silo)):
        payload, _ = encrypt_update(keyset, make_update(i), server_round=3, silo=str(i),
                                    weight=1.0, schedule=schedule)
        acc.add(payload, silo=str(i))
    record = acc.finalize()
    assert record.num_blocks == kept_block_count(14, 0.5) == 7


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
        kept = block_mask(blocks, schedule.ratio(rnd), rnd, b"secret")
        sent, residual = split_with_residual(update, residual, kept, block)
        assert sent.shape == (kept.size, block)
        total_update += update
        total_sent += scatter_blocks(sent, kept, size)
    np.testing.assert_allclose(total_sent + residual, total_update, rtol=0, atol=1e-12)
    assert np.abs(residual).max() > 0  # something is still waiting to be sent


def test_error_feedback_through_encrypt_update_keeps_unsent_values(keys):
    silo, _ = keys
    schedule = PruneSchedule(target=0.75)
    update = make_update(5)
    layout = AdapterLayout.from_state(update)
    _, state = encrypt_update(silo, update, server_round=1, silo="a", weight=2.0,
                              schedule=schedule)
    sent = state.last_upload.sent_vector(layout.num_values)
    np.testing.assert_array_equal(sent + state.residual, layout.flatten(update))
