"""Split attacks on a tiny model: they win without noise and are at chance on random rows."""

import numpy as np
import pytest
import torch

from fedshield_flwr.audit.gradients import RecordingLink, record_training
from fedshield_flwr.audit.inversion import (
    NoiseSpec,
    RidgeInversion,
    candidate_head_outputs,
    head_rows,
    nearest_neighbour_attack,
)
from fedshield_flwr.audit.membership import tokenized_rows
from fedshield_flwr.audit.tokens import content_mask, recovery
from fedshield_flwr.config import LoraSettings
from fedshield_flwr.split.middle import MiddleServer
from fedshield_flwr.split.settings import SplitSettings
from fedshield_flwr.split.silo_model import LocalLink, SiloTrainer, SplitSilo
from fedshield_flwr.train import collate

MAX_LEN = 64


@pytest.fixture(scope="module")
def parts():
    s = SplitSettings(head_layers=1, tail_layers=1)
    lora = LoraSettings()
    silo = SplitSilo.from_pretrained("tiny:llama", s, lora, seed=0)
    middle = MiddleServer.from_pretrained("tiny:llama", s, lora, seed=0, learning_rate=0.0)
    return silo, middle


def _data(tok, rows):
    toks = tokenized_rows(rows, tok, max_length=MAX_LEN)
    return toks, [content_mask(r, t, tok) for r, t in zip(rows, toks)]


def test_head_output_inversion_wins_without_noise_and_is_at_chance_on_random_rows(
        parts, tiny_tokenizer, qa_rows):
    silo, _ = parts
    pub, pub_m = _data(tiny_tokenizer, qa_rows[100:160])
    vic, vic_m = _data(tiny_tokenizer, qa_rows[:12])
    pad = tiny_tokenizer.pad_token_id
    emb = silo.peft_model.get_input_embeddings().weight.detach().numpy()
    ridge = RidgeInversion(emb).fit(*_fit_args(head_rows(silo, pub, pub_m, pad)))
    victim = head_rows(silo, vic, vic_m, pad)
    assert recovery(ridge.predict(victim.features), victim.tokens, victim.content) >= 0.5
    dictionary = candidate_head_outputs(silo, vic[0]["input_ids"][0], len(emb))
    assert recovery(nearest_neighbour_attack(victim, dictionary), victim.tokens,
                    victim.content) >= 0.5
    # rows that carry nothing: recovery near 1 / vocabulary
    rnd = np.random.default_rng(0).standard_normal(victim.features.shape).astype(np.float32)
    assert recovery(ridge.predict(rnd), victim.tokens, victim.content) < 0.1
    # heavy calibrated noise (z = 8 at the median norm) drives the noise-aware attack down
    c = float(np.median(np.linalg.norm(victim.features, axis=1)))
    noise = NoiseSpec(clip_norm=c, noise_multiplier=8.0)
    noisy_fit = RidgeInversion(emb).fit(*_fit_args(head_rows(silo, pub, pub_m, pad, noise, 1)))
    noisy = head_rows(silo, vic, vic_m, pad, noise, 2)
    assert recovery(noisy_fit.predict(noisy.features), noisy.tokens, noisy.content) < 0.2


def _fit_args(rows):
    return rows.features, rows.tokens


def test_gradient_attack_recovers_target_tokens_from_what_the_server_receives(
        parts, tiny_tokenizer, qa_rows):
    silo, middle = parts
    pad = tiny_tokenizer.pad_token_id
    pub = tokenized_rows(qa_rows[100:164], tiny_tokenizer, max_length=MAX_LEN)
    vic = tokenized_rows(qa_rows[:16], tiny_tokenizer, max_length=MAX_LEN)
    link = RecordingLink(LocalLink(middle))
    trainer = SiloTrainer(silo, link, learning_rate=0.0)
    fit = record_training(trainer, link, [collate(pub[i:i + 8], pad) for i in range(0, 64, 8)])
    got = record_training(trainer, link, [collate(vic[i:i + 8], pad) for i in range(0, 16, 8)])
    assert len(link.forwards) == 10  # the relay saw every forward, unchanged
    out_emb = silo.peft_model.get_output_embeddings().weight.detach().numpy()
    ridge = RidgeInversion(out_emb, normalize=True).fit(fit.features, fit.targets)
    assert recovery(ridge.predict(got.features), got.targets) >= 0.5
    rnd = torch.randn(got.features.shape).numpy()
    assert recovery(ridge.predict(rnd), got.targets) < 0.1
