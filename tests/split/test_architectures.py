"""Split on every common decoder family, found from the model itself (no per-family table)."""

from __future__ import annotations

import copy

import pytest
import torch

from fedshield_flwr.config import LoraSettings
from fedshield_flwr.models.lora import apply_lora, discover_targets
from fedshield_flwr.models.tiny import TINY_ARCHITECTURES, build_tiny_model
from fedshield_flwr.split.arch import Arch, SplitError, SplitLayout
from fedshield_flwr.split.middle import MiddleServer
from fedshield_flwr.split.silo_model import LocalLink, SiloTrainer, SplitSilo

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
LR = 1e-2


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("dropout", "attention_dropout", "activation_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)  # functional dropout (OPT)
    return model


def _batches(n=3):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 500, (3, 10), generator=gen)
        mask = torch.ones(3, 10, dtype=torch.long)
        mask[1, 6:] = 0
        mask[2, 4:] = 0
        out.append((ids, mask))
    return out


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_split_training_gives_the_unsplit_per_step_loss(arch):
    base = _no_dropout(build_tiny_model(arch))
    ref = apply_lora(copy.deepcopy(base), LORA, seed=1)
    layout = SplitLayout.for_model(ref, 1, 1)
    silo = SplitSilo(apply_lora(copy.deepcopy(base), LORA, seed=1), layout)
    middle = MiddleServer(apply_lora(copy.deepcopy(base), LORA, seed=1), layout, learning_rate=LR)
    trainer = SiloTrainer(silo, LocalLink(middle), learning_rate=LR)
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR,
                            weight_decay=0.0)
    ref.train()
    for ids, mask in _batches():
        labels = ids.masked_fill(mask == 0, -100)
        want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        want.backward()
        opt.step()
        opt.zero_grad()
        got = trainer.train_step(ids, mask).loss
        assert abs(got - float(want)) < 1e-5, (arch, got, float(want))


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "gpt_neox", "opt", "falcon", "phi3"])
def test_split_greedy_generation_with_kv_caches_equals_unsplit(arch):
    base = build_tiny_model(arch).eval()
    ref = apply_lora(copy.deepcopy(base), LORA, seed=1).eval()
    layout = SplitLayout.for_model(ref, 1, 1)
    silo = SplitSilo(apply_lora(copy.deepcopy(base), LORA, seed=1), layout)
    middle = MiddleServer(apply_lora(copy.deepcopy(base), LORA, seed=1), layout)
    ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(1))
    prompts = [ids[0, :7].tolist(), ids[1, :3].tolist()]
    out = SiloTrainer(silo, LocalLink(middle)).generate(prompts, max_new_tokens=5)
    for p, o in zip(prompts, out):
        g = ref.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p),
                         dtype=torch.long), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                         pad_token_id=0)
        assert o == g[0, len(p):].tolist()


def test_server_holds_no_embedding_norm_or_head_and_silo_no_middle_block():
    base = build_tiny_model("gpt2")
    layout = SplitLayout.for_model(base, 1, 1)
    middle = MiddleServer(apply_lora(copy.deepcopy(base), LORA, seed=1), layout)
    held = {n for n, _ in middle.peft_model.named_parameters()}
    assert not any(k in n for n in held for k in ("wte", "wpe", "ln_f", "lm_head", ".h.0.", ".h.3."))
    with pytest.raises(SplitError, match="server does not hold"):
        middle._arch.backbone.wte(torch.zeros(1, 1, dtype=torch.long))


def test_encoder_decoder_model_is_refused_naming_what_split_looks_for():
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    cfg = AutoConfig.for_model("t5", vocab_size=64, d_model=16, d_ff=32, num_layers=2,
                               num_heads=2, d_kv=8)
    with pytest.raises(SplitError, match="decoder-only causal LM.*encoder-decoder"):
        Arch.of(AutoModelForSeq2SeqLM.from_config(cfg))


def test_lora_targets_are_found_in_the_model_or_the_error_lists_its_modules():
    targets, conv1d = discover_targets(build_tiny_model("falcon"))
    assert set(targets) == {"query_key_value", "dense"} and not conv1d
    model = torch.nn.Module()
    model.config = type("C", (), {"num_hidden_layers": 1, "model_type": "mlp"})()
    model.layers = torch.nn.ModuleList([torch.nn.Sequential()])
    model.layers[0].add_module("up", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="linear modules: up"):
        discover_targets(model)
