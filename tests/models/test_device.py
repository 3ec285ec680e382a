"""Device and dtype: which compute dtype each device gets, checked on the CPU with the device
given explicitly (the CUDA rows are the rule, not a run on a GPU)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedshield_flwr.config import LoraSettings, ModelSettings
from fedshield_flwr.models import (
    DeviceError,
    apply_lora,
    compute_dtype,
    get_adapter_state,
    load_base_model,
    resolve_model_path,
)
from fedshield_flwr.models.load import load_kwargs

# On a GPU without native bf16 (before compute capability 8.0) "auto" is fp32 there.
NATIVE_BF16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported(
    including_emulation=False)


@pytest.mark.parametrize("device,requested,expected", [
    ("cpu", "auto", torch.float32),
    ("cpu", "fp32", torch.float32),
    ("cuda", "fp32", torch.float32),
    ("cuda", "bf16", torch.bfloat16),
    pytest.param("cuda", "auto", torch.bfloat16,
                 marks=pytest.mark.skipif(not NATIVE_BF16, reason="this GPU emulates bf16")),
    (torch.device("cuda", 0), "auto" if NATIVE_BF16 else "bf16", torch.bfloat16),
])
def test_auto_is_bf16_on_cuda_and_fp32_on_the_cpu(device, requested, expected):
    assert compute_dtype(device, requested) == expected


def test_bf16_on_the_cpu_is_refused_naming_the_slowdown_and_the_remedy():
    with pytest.raises(DeviceError, match=r"~250x slower.*model.dtype='auto'"):
        compute_dtype("cpu", "bf16")
    with pytest.raises(DeviceError, match="use one of auto, fp32, bf16"):
        compute_dtype("cuda", "fp16")
    with pytest.raises(DeviceError, match="250x"):  # before any weight is read
        load_base_model("tiny:llama", device="cpu", dtype="bf16")
    with pytest.raises(ValueError, match="model.dtype"):
        ModelSettings(dtype="float16").validate()


@pytest.mark.parametrize("device,expected", [("cpu", torch.float32), ("cuda", torch.bfloat16)])
def test_nf4_computes_in_the_device_dtype(device, expected):
    if device == "cuda" and not NATIVE_BF16:
        pytest.skip("this GPU emulates bf16")
    kw = load_kwargs(4, device)
    q = kw["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4"
    assert q.bnb_4bit_compute_dtype == expected == kw["dtype"]
    assert kw["device_map"] == device
    assert load_kwargs(4, device, "fp32")["quantization_config"].bnb_4bit_compute_dtype == (
        torch.float32)


def test_nf4_on_the_cpu_loads_and_runs_in_fp32():
    model = load_base_model("tiny:llama", quantization=4, device="cpu")
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and all(m.compute_dtype == torch.float32 for m in layers)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.dtype == torch.float32


def test_the_initial_adapter_is_the_same_over_a_bf16_base_as_over_fp32():
    # a CUDA silo (bf16 base) and a CPU server must start from the same fp32 adapter
    path = resolve_model_path("tiny:qwen2")
    states = [get_adapter_state(apply_lora(
        AutoModelForCausalLM.from_pretrained(path, dtype=dt), LoraSettings(r=4), seed=3))
        for dt in (torch.float32, torch.bfloat16)]
    assert states[0].keys() == states[1].keys()
    assert all(v.dtype == "float32" for v in states[1].values())
    assert all((states[0][k] == states[1][k]).all() for k in states[0])
    assert any(abs(v).max() > 0 for k, v in states[0].items() if "lora_A" in k)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "falcon"])
def test_the_initial_adapter_is_peft_s_own_draw_over_an_fp32_base(family):
    # the replay in init_adapter_fp32 must not change what a CPU run starts from
    from peft import get_peft_model

    from fedshield_flwr.models.lora import lora_config
    from fedshield_flwr.models.tiny import build_tiny_model

    ours = get_adapter_state(apply_lora(build_tiny_model(family), LoraSettings(r=4), seed=5))
    base = build_tiny_model(family)
    torch.manual_seed(5)
    theirs = get_adapter_state(get_peft_model(base, lora_config(
        base.config.model_type, LoraSettings(r=4), model=base)))
    assert ours.keys() == theirs.keys()
    assert all((ours[k] == theirs[k]).all() for k in ours)
    assert sum("lora_A" in k for k in ours) >= 4
