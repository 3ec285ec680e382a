"""LoRA on tiny models of several architectures: state round trip, mismatch errors, PEFT export."""

from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedshield_flwr.config import LoraSettings
from fedshield_flwr.models import (
    AdapterMismatchError,
    apply_lora,
    export_adapter,
    get_adapter_state,
    load_base_model,
    resolve_model_path,
    set_adapter_state,
)

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_state_round_trip_changes_outputs_exactly(arch):
    model = apply_lora(load_base_model(f"tiny:{arch}"), LoraSettings(r=4, alpha=8), seed=0)
    state = get_adapter_state(model)
    assert state and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    ids = torch.arange(10).unsqueeze(0)
    before = model(input_ids=ids).logits
    rng = np.random.default_rng(0)
    new = OrderedDict((k, rng.normal(0, 0.05, v.shape).astype(np.float32)) for k, v in state.items())
    set_adapter_state(model, new)
    got = get_adapter_state(model)
    assert all(np.array_equal(got[k], new[k]) for k in new)
    assert not torch.allclose(before, model(input_ids=ids).logits)


def test_gpt2_conv1d_projections_get_lora():
    model = apply_lora(load_base_model("tiny:gpt2"), LoraSettings(r=4), seed=0)
    assert model.peft_config["default"].fan_in_fan_out is True
    assert any("c_attn.lora_A" in k for k in get_adapter_state(model))


def test_lora_init_is_seeded():
    a = get_adapter_state(apply_lora(load_base_model("tiny:llama"), LoraSettings(), seed=5))
    b = get_adapter_state(apply_lora(load_base_model("tiny:llama"), LoraSettings(), seed=5))
    c = get_adapter_state(apply_lora(load_base_model("tiny:llama"), LoraSettings(), seed=6))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_wrong_shape_or_nan_adapter_is_refused():
    model = apply_lora(load_base_model("tiny:llama"), LoraSettings(r=4), seed=0)
    state = get_adapter_state(model)
    key = next(iter(state))
    bad = OrderedDict(state)
    bad[key] = np.zeros((1, 1), np.float32)
    with pytest.raises(AdapterMismatchError, match="shape"):
        set_adapter_state(model, bad)
    bad[key] = np.full_like(state[key], np.nan)
    with pytest.raises(AdapterMismatchError, match="NaN"):
        set_adapter_state(model, bad)
    bad = OrderedDict(list(state.items())[1:])
    with pytest.raises(AdapterMismatchError, match="names differ"):
        set_adapter_state(model, bad)


def test_custom_target_modules_are_used():
    model = apply_lora(load_base_model("tiny:llama"),
                       LoraSettings(r=2, target_modules=("gate_proj",)), seed=0)
    keys = list(get_adapter_state(model))
    assert keys and all("gate_proj" in k for k in keys)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exported_adapter_loads_with_peft_from_pretrained(tmp_path, arch):
    from peft import PeftModel

    name = f"tiny:{arch}"
    settings = LoraSettings(r=4, alpha=8, dropout=0.0)
    model = apply_lora(load_base_model(name), settings, seed=0)
    rng = np.random.default_rng(1)
    state = OrderedDict((k, rng.normal(0, 0.05, v.shape).astype(np.float32))
                        for k, v in get_adapter_state(model).items())
    set_adapter_state(model, state)
    model.eval()
    ids = torch.arange(12).unsqueeze(0)
    expected = model(input_ids=ids).logits

    out = export_adapter(tmp_path / "adapter", state, model.config.model_type, settings,
                         resolve_model_path(name))
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(load_base_model(name), str(out))
    loaded.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,expected", [
    ("embedded:smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
    ("/data/models/my-llama", "/data/models/my-llama"),
])
def test_exported_adapter_names_a_base_anyone_can_resolve_not_the_cache(tmp_path, name, expected):
    import json

    from fedshield_flwr.models import cache_root, public_model_name

    out = export_adapter(tmp_path / "adapter", {}, "llama", LoraSettings(r=4),
                         public_model_name(name))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == expected
    assert str(cache_root()) not in json.dumps(config)
