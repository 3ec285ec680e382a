"""Membership inference: AUC arithmetic, per-row losses, the attacks win where they must."""

import copy

import numpy as np
import pytest
import torch

from fedshield_flwr.audit.membership import (
    auc,
    loss_threshold_auc,
    reference_auc,
    row_losses,
    tokenized_rows,
)

MAX_LEN = 64


def test_auc_is_one_for_perfect_separation_and_zero_for_reversed():
    assert auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert auc([0, 1, 2], [3, 4, 5]) == 0.0


def test_auc_counts_ties_as_half():
    assert auc([1, 1], [1, 1]) == 0.5
    # pairs: (2>1) (2=2) (1=1) (1<2) -> (1 + .5 + .5 + 0) / 4
    assert auc([2, 1], [1, 2]) == pytest.approx(0.5)
    assert auc([2], [1, 2]) == pytest.approx(0.75)


def test_auc_matches_brute_force_pair_count():
    rng = np.random.default_rng(0)
    m, n = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 20).astype(float)
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in m for b in n])
    assert auc(m, n) == pytest.approx(brute)


def test_auc_refuses_empty_sets():
    with pytest.raises(ValueError):
        auc([], [1.0])


def _tiny(seed=0):
    from fedshield_flwr.models.tiny import build_tiny_model

    return build_tiny_model("llama", seed=seed)


def test_row_losses_weighted_mean_equals_the_training_evaluate_loss(tiny_tokenizer, qa_rows):
    from fedshield_flwr.train import evaluate

    model = _tiny()
    rows = qa_rows[:10]
    losses = row_losses(model, tiny_tokenizer, rows, max_length=MAX_LEN, batch_size=3)
    toks = tokenized_rows(rows, tiny_tokenizer, max_length=MAX_LEN)
    counts = np.array([sum(1 for t in r["labels"][1:] if t != -100) for r in toks])
    ev = evaluate(model, toks, batch_size=4, pad_id=tiny_tokenizer.pad_token_id)
    assert losses.shape == (10,)
    assert float((losses * counts).sum() / counts.sum()) == pytest.approx(ev.loss, rel=1e-4)
    # batching does not change a row's loss
    single = row_losses(model, tiny_tokenizer, rows[:3], max_length=MAX_LEN, batch_size=1)
    np.testing.assert_allclose(single, losses[:3], rtol=1e-4)


def _overfit(model, tokenizer, rows, steps=80, lr=3e-3):
    from fedshield_flwr.train import collate

    toks = tokenized_rows(rows, tokenizer, max_length=MAX_LEN)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        idx = [(step * 8 + i) % len(toks) for i in range(8)]
        batch = collate([toks[i] for i in idx], tokenizer.pad_token_id)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def test_attacks_win_on_an_overfit_model_and_are_at_chance_on_an_untrained_one(
        tiny_tokenizer, qa_rows):
    members, nonmembers = qa_rows[:24], qa_rows[24:48]
    base = _tiny()
    chance_loss = loss_threshold_auc(base, tiny_tokenizer, members, nonmembers, max_length=MAX_LEN)
    tuned = _overfit(copy.deepcopy(base), tiny_tokenizer, members)
    # the reference-model attack with an identical "reference" has every score 0: exactly chance
    assert reference_auc(base, base, tiny_tokenizer, members, nonmembers,
                         max_length=MAX_LEN) == 0.5
    assert abs(chance_loss - 0.5) < 0.25
    assert loss_threshold_auc(tuned, tiny_tokenizer, members, nonmembers,
                              max_length=MAX_LEN) >= 0.8
    assert reference_auc(tuned, base, tiny_tokenizer, members, nonmembers,
                         max_length=MAX_LEN) >= 0.8


def test_chance_band_holds_95_percent_of_chance_aucs():
    from fedshield_flwr.audit.membership import auc, chance_band

    rng = np.random.default_rng(0)
    m, n = 45, 45
    aucs = np.array([auc(rng.standard_normal(m), rng.standard_normal(n)) for _ in range(2000)])
    band = chance_band(m, n)
    assert abs(band - 0.119) < 0.002  # 1.96 * sqrt(91 / (12 * 45 * 45))
    inside = np.mean(np.abs(aucs - 0.5) <= band)
    assert 0.93 < inside < 0.97
    assert abs(aucs.std() - band / 1.96) < 0.005
