"""The local training loop: FlowerTune cosine schedule, determinism, learning, evaluation."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedshield_flwr import train as train_mod
from fedshield_flwr.config import DataSettings, LoraSettings, NodeSettings, TrainSettings
from fedshield_flwr.data import load_silo_data
from fedshield_flwr.models import apply_lora, get_adapter_state, load_base_model, load_tokenizer
from fedshield_flwr.train import (
    batch_schedule,
    collate,
    cosine_lr,
    evaluate,
    set_gradient_checkpointing,
    token_loss,
    train_lora,
)


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


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chunked_token_loss_equals_model_loss_and_gradients(arch, monkeypatch):
    tok = load_tokenizer(f"tiny:{arch}")
    model = apply_lora(load_base_model(f"tiny:{arch}"), LoraSettings(r=4), seed=0)
    model.eval()  # no dropout: both passes must see the same network
    data = load_silo_data(DataSettings(max_length=48, max_eval_examples=16),
                          NodeSettings(partition_id=0, num_partitions=4), tok, seed=0)
    batch = collate(data.train[:6], tok.pad_token_id)  # padded, prompt tokens unlabelled
    trainable = [p for p in model.parameters() if p.requires_grad]

    ref = model(**batch).loss
    ref_grads = torch.autograd.grad(ref, trainable)
    monkeypatch.setattr(train_mod, "LOSS_CHUNK_TOKENS", 7)  # several chunks, a ragged last one
    total, count = token_loss(model, batch)
    assert count == int((batch["labels"][:, 1:] != -100).sum()) > 7
    grads = torch.autograd.grad(total / count, trainable)
    assert float(total.detach() / count) == pytest.approx(float(ref), rel=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_trains_the_same_adapter():
    settings = TrainSettings(max_steps=2, batch_size=4, progress=False)
    states = []
    for ckpt in (False, True):
        tok, model, data = _setup()
        train_lora(model, data.train, replace(settings, gradient_checkpointing=ckpt), 1e-3,
                   tok.pad_token_id, seed=3)
        states.append(get_adapter_state(model))
    for k in states[0]:
        np.testing.assert_allclose(states[0][k], states[1][k], atol=1e-6)
    set_gradient_checkpointing(model, False)
    assert not model.get_base_model().is_activation_checkpointing


def test_token_loss_of_a_batch_without_labels_is_zero_without_a_forward_pass():
    tok, model, data = _setup()
    batch = collate(data.train[:2], tok.pad_token_id)
    batch["labels"][:] = -100
    total, count = token_loss(model, batch)
    assert count == 0 and float(total) == 0.0
