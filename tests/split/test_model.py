"""Split partitioning of every supported architecture: exact forward, generation, layout checks."""

from __future__ import annotations

import copy

import pytest
import torch

from fedshield_flwr.config import ConfigError, LoraSettings, RunConfig
from fedshield_flwr.models.load import load_base_model
from fedshield_flwr.models.lora import apply_lora, get_adapter_state, set_adapter_state
from fedshield_flwr.split.arch import SplitError, SplitLayout, merge_adapter_states
from fedshield_flwr.split.middle import MiddleServer
from fedshield_flwr.split.packing import batch_lengths, pack, unpack
from fedshield_flwr.split.settings import SplitSettings
from fedshield_flwr.split.silo_model import LocalLink, SiloTrainer, SplitSilo

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


def _three_parties(name: str, head: int = 1, tail: int = 1):
    """Unsplit reference, silo and middle server, all with the same non-zero LoRA adapter."""
    base = load_base_model(name)
    ref = apply_lora(copy.deepcopy(base), LORA, seed=1)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    state = get_adapter_state(ref)
    parts = []
    for _ in range(2):
        m = apply_lora(copy.deepcopy(base), LORA, seed=1)
        set_adapter_state(m, state)
        parts.append(m)
    layout = SplitLayout.for_model(parts[0], head, tail)
    return ref.eval(), SplitSilo(parts[0], layout), MiddleServer(parts[1], layout), state


def _batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_split_forward_and_greedy_generation_equal_unsplit_for_each_architecture(arch):
    ref, silo, middle, _ = _three_parties(f"tiny:{arch}")
    ids, mask = _batch()
    link = LocalLink(middle)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        lens = batch_lengths(mask)
        silo.peft_model.eval()
        h = pack(silo.head_forward(ids, mask), lens)
        got = silo.tail_forward(unpack(link.forward(0, h, lens.tolist(), False), lens, 12), mask)
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-5)

    prompts = [ids[0, :5].tolist(), ids[1, :7].tolist(), ids[2, :3].tolist()]
    out = SiloTrainer(silo, link).generate(prompts, max_new_tokens=6)
    for p, o in zip(prompts, out):
        g = ref.generate(
            input_ids=torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )
        assert o == g[0, len(p) :].tolist()
    assert middle.num_sessions == 0  # the session was ended


def test_parties_hold_only_their_blocks_and_adapters_merge_to_the_full_adapter():
    ref, silo, middle, state = _three_parties("tiny:llama", head=1, tail=2)
    lay = silo.layout
    assert (list(lay.head), list(lay.middle), list(lay.tail)) == ([0], [1], [2, 3])
    with pytest.raises(SplitError, match="silo does not hold middle block 1"):
        silo._arch.layers[1](torch.zeros(1, 1, 64))
    with pytest.raises(SplitError, match="server does not hold the embeddings"):
        middle._arch.backbone.embed_tokens(torch.zeros(1, 1, dtype=torch.long))
    silo_keys, mid_keys = set(silo.adapter_state()), set(middle.adapter_state())
    assert all(".layers.1." in k for k in mid_keys)
    assert not any(".layers.1." in k for k in silo_keys)
    merged = merge_adapter_states(silo.adapter_state(), middle.adapter_state())
    assert list(merged) == list(state)
    assert all((merged[k] == state[k]).all() for k in state)


def test_layout_refuses_a_cut_that_leaves_the_server_no_block():
    model = load_base_model("tiny:gpt2")
    with pytest.raises(SplitError, match="at least one block"):
        SplitLayout.for_model(model, 2, 2)
    with pytest.raises(SplitError, match="each must be >= 1"):
        SplitLayout.for_model(model, 0, 1)


def test_split_settings_are_read_and_validated_from_the_run_config():
    cfg = RunConfig.from_flat(
        {
            "strategy.name": "split",
            "split.head-layers": 2,
            "split.activation-dtype": "int8",
            "split.noise-sigma": 0.1,
        }
    )
    s = SplitSettings.from_config(cfg)
    assert (s.head_layers, s.tail_layers, s.activation_dtype, s.noise_sigma) == (2, 1, "int8", 0.1)
    with pytest.raises(ConfigError, match="split.activation-dtype"):
        SplitSettings.from_section({"activation-dtype": "bf16"})
    with pytest.raises(ConfigError, match="unknown run config key 'split.head'"):
        SplitSettings.from_section({"head": 1})
    assert s.server_certificates() is None
    with pytest.raises(ConfigError, match="must be set together"):
        SplitSettings.from_section({"relay-ca-cert": "/x/ca.pem"}).server_certificates()


def test_pack_unpack_roundtrip_and_left_padding_refused_for_training():
    x = torch.randn(3, 5, 4)
    lens = torch.tensor([5, 2, 3])
    p = pack(x, lens)
    assert p.shape == (10, 4)
    back = unpack(p, lens, 5)
    m = torch.arange(5)[None] < lens[:, None]
    assert torch.equal(back[m], x[m]) and float(back[~m].abs().sum()) == 0.0
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(SplitError, match="right-padded"):
        batch_lengths(left)
