"""The local training loop: FlowerTune cosine schedule, determinism, learning, evaluation."""

import math

import pytest

from fedshield_flwr.config import DataSettings, LoraSettings, NodeSettings, TrainSettings
from fedshield_flwr.data import load_silo_data
from fedshield_flwr.models import apply_lora, get_adapter_state, load_base_model, load_tokenizer
from fedshield_flwr.train import batch_schedule, cosine_lr, evaluate, train_lora


def test_cosine_lr_starts_at_max_and_decreases_toward_min():
    lrs = [cosine_lr(r, 10, 1e-3, 1e-4) for r in range(1, 11)]
    assert lrs[0] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] > 1e-4


def test_batch_schedule_is_seeded_and_covers_rows_before_repeating():
    a = batch_schedule(10, 3, 3, seed=1)
    assert a == batch_schedule(10, 3, 3, seed=1) and a != batch_schedule(10, 3, 3, seed=2)
    flat = [i for b in a for i in b]
    assert len(set(flat)) == 9


def _setup(seed=0):
    tok = load_tokenizer("tiny:llama")
    model = apply_lora(load_base_model("tiny:llama"), LoraSettings(r=4), seed=seed)
    data = load_silo_data(DataSettings(max_length=48, max_eval_examples=16),
                          NodeSettings(partition_id=0, num_partitions=4), tok, seed=0)
    return tok, model, data


def test_training_is_deterministic_on_cpu():
    settings = TrainSettings(max_steps=3, batch_size=4, progress=False)
    results, states = [], []
    for _ in range(2):
        tok, model, data = _setup()
        results.append(train_lora(model, data.train, settings, 1e-3, tok.pad_token_id, seed=7))
        states.append(get_adapter_state(model))
    assert results[0].loss == results[1].loss
    assert all((states[0][k] == states[1][k]).all() for k in states[0])


def test_training_lowers_eval_loss_and_uses_accumulation():
    tok, model, data = _setup()
    before = evaluate(model, data.eval, 8, tok.pad_token_id)
    settings = TrainSettings(max_steps=15, batch_size=8, gradient_accumulation_steps=2,
                             progress=False)
    res = train_lora(model, data.train, settings, 3e-3, tok.pad_token_id, seed=1)
    after = evaluate(model, data.eval, 8, tok.pad_token_id)
    assert res.num_examples == 15 * 2 * 8 and res.steps == 15
    assert after.loss < before.loss
    assert after.perplexity == pytest.approx(math.exp(after.loss))
    assert after.num_tokens > 0 and after.num_examples == len(data.eval)
