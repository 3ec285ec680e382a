"""lpp base package: quantize on the server, ship as arrays, cache by hash, rebuild and train on
a silo. Real bitsandbytes on tiny random models, no mocks."""

from __future__ import annotations

import copy
import json
import math

import bitsandbytes.functional as bnbf
import numpy as np
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from fedshield_flwr.config import LoraSettings
from fedshield_flwr.lpp.margin import evaluate_lm_loss, ip_margin
from fedshield_flwr.lpp.package import (
    cached_package,
    load_or_build_package,
    load_package,
    package_from_arrays,
    save_package,
)
from fedshield_flwr.lpp.quantize import (
    BaseQuantSpec,
    QuantizedBasePackage,
    assert_no_full_precision_weights,
    build_quantized_package,
    full_precision_tensors,
    mse_clip,
    package_nbytes,
)
from fedshield_flwr.lpp.rebuild import (
    QuantizedEmbedding,
    QuantizedLMHead,
    build_model_from_package,
    dequantize_package_tensor,
)
from fedshield_flwr.models import apply_lora, get_adapter_state, load_base_model, load_tokenizer
from fedshield_flwr.packages.format import MANIFEST_KEY, PackageError, package_to_arrays

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def _fake_quantized(model, quant_type: str, clip: bool = True):
    """Reference: the fp model with every Linear/Conv1D/Embedding weight replaced by its
    bitsandbytes quantize -> dequantize round trip (same math, fp32 modules), after the
    per-block clipping when ``clip``."""
    ref = copy.deepcopy(model)
    done: set[int] = set()  # a tied weight is quantized once
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding, Conv1D)):
                if id(mod.weight) in done:
                    continue
                done.add(id(mod.weight))
                w = mod.weight.t() if isinstance(mod, Conv1D) else mod.weight
                w = mse_clip(w, quant_type, 64) if clip else w
                q, st = bnbf.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=True,
                                           quant_type=quant_type)
                d = bnbf.dequantize_4bit(q, st)
                mod.weight.copy_(d.t() if isinstance(mod, Conv1D) else d)
    return ref


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _tied_llama():
    from fedshield_flwr.models.tiny import build_tiny_model

    model = build_tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("arch, quant_type, clip", [
    ("llama", "nf4", True), ("qwen2", "nf4", True), ("mistral", "nf4", True),
    ("gpt2", "nf4", True), ("llama", "fp4", True), ("gpt2", "fp4", True),
    ("llama", "nf4", False), ("gpt2", "fp4", False),
])
def test_rebuilt_4bit_model_matches_bitsandbytes_reference(arch, quant_type, clip):
    model = load_base_model(f"tiny:{arch}")
    pkg = build_quantized_package(model, BaseQuantSpec(quant_type=quant_type, clip_search=clip))
    assert pkg.manifest["quant"]["clip_search"] is clip
    silo = build_model_from_package(package_from_arrays(package_to_arrays(pkg), pkg.content_hash))
    ref = _fake_quantized(model, quant_type, clip)
    got, ref, fp = _logits(silo), _logits(ref), _logits(model)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # and close to full precision (random tiny weights are the worst case for 4 bits)
    assert float((got - fp).norm() / fp.norm()) < 0.35


def _roundtrip_error(w: torch.Tensor, source: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Per-block squared error against ``w`` of bitsandbytes' 4-bit round trip of ``source``."""
    q, st = bnbf.quantize_4bit(source.contiguous(), blocksize=64, compress_statistics=False,
                               quant_type=quant_type)
    return (bnbf.dequantize_4bit(q, st) - w).square().reshape(-1)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_mse_clip_lowers_4bit_error_and_only_shrinks_outliers(quant_type):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 200, generator=gen)  # 19200 values: 300 whole blocks of 64
    w[torch.rand(w.shape, generator=gen) < 0.01] *= 6.0  # sparse outliers stretch some blocks
    clipped = mse_clip(w, quant_type, 64)
    assert clipped.shape == w.shape
    assert bool((clipped.abs() <= w.abs()).all())  # clipping moves values toward 0, never out
    moved = clipped != w
    assert 0 < int(moved.sum()) < w.numel() // 20  # a few extremes per block, not the bulk
    plain = _roundtrip_error(w, w, quant_type).view(-1, 64).sum(1)
    ours = _roundtrip_error(w, clipped, quant_type).view(-1, 64).sum(1)
    assert bool((ours <= plain * (1 + 1e-5)).all())  # no block gets worse (1.0 is in the grid)
    assert float(ours.sum()) < 0.95 * float(plain.sum())


def test_mse_clip_handles_a_last_partial_block():
    w = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))  # 150 = 2 x 64 + 22
    clipped = mse_clip(w, "nf4", 64)
    assert clipped.shape == w.shape and bool(torch.isfinite(clipped).all())
    assert bool((clipped.abs() <= w.abs()).all())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rebuilt_int8_model_is_close_to_full_precision(arch):
    model = load_base_model(f"tiny:{arch}")
    silo = build_model_from_package(build_quantized_package(model, BaseQuantSpec("int8")))
    got, fp = _logits(silo), _logits(model)
    assert float((got - fp).norm() / fp.norm()) < 0.03


def test_package_holds_no_full_precision_weight_beyond_listed_vectors():
    model = load_base_model("tiny:qwen2")  # has q/k/v biases
    pkg = build_quantized_package(model)
    assert_no_full_precision_weights(pkg)
    listed = full_precision_tensors(pkg)
    names = {n for n, _, _ in listed}
    assert names and all(len(shape) <= 1 for _, shape, _ in listed)
    assert all(n.endswith(("norm.weight", ".bias", "inv_freq")) for n in names), names
    assert "model.layers.0.self_attn.q_proj.bias" in names
    # every 2-D parameter of the model travels quantized (uint8 codes), none as floats
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert name not in pkg.arrays and pkg.arrays[f"{name}:data"].dtype == np.uint8
    # a planted full-precision matrix is caught, whatever its name
    planted = dict(pkg.arrays, **{"model.norm.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(PackageError, match="full-precision"):
        assert_no_full_precision_weights(QuantizedBasePackage(pkg.manifest, planted, "x" * 64))


def test_unquantizable_matrix_is_refused_rather_than_sent():
    model = load_base_model("tiny:llama")
    model.model.norm.extra = torch.nn.Parameter(torch.randn(64, 64))
    with pytest.raises(PackageError, match="refuses to send it in full precision"):
        build_quantized_package(model)


def test_tied_embeddings_travel_once_and_stay_shared_on_the_silo():
    model = _tied_llama()
    pkg = build_quantized_package(model)
    entry = pkg.manifest["tensors"]["lm_head.weight"]
    assert entry["tied_to"] == "model.embed_tokens.weight" and "arrays" not in entry
    assert not any(k.startswith("lm_head.") for k in pkg.arrays)
    silo = build_model_from_package(pkg)
    assert isinstance(silo.lm_head, QuantizedLMHead)
    assert isinstance(silo.model.embed_tokens, QuantizedEmbedding)
    assert silo.lm_head.table is silo.model.embed_tokens.table
    torch.testing.assert_close(_logits(silo), _logits(_fake_quantized(model, "nf4")),
                               atol=1e-4, rtol=1e-4)


def test_silo_model_holds_no_full_precision_matrix():
    pkg = build_quantized_package(load_base_model("tiny:llama"))
    silo = build_model_from_package(pkg)
    for name, t in list(silo.named_parameters()) + list(silo.named_buffers()):
        if t.dim() >= 2 and t.is_floating_point():  # only per-block scales: 1/64 of the table
            assert name.endswith("table.absmax"), name
            assert t.shape == (silo.config.vocab_size, silo.config.hidden_size // 64), name
    table = silo.model.embed_tokens.table
    rows = table.gather(torch.tensor([3, 500, 7]))
    full = dequantize_package_tensor(pkg, "model.embed_tokens.weight")
    torch.testing.assert_close(rows, full[[3, 500, 7]], atol=0, rtol=0)


def test_transport_round_trip_keeps_hash_and_refuses_tampering():
    pkg = build_quantized_package(load_base_model("tiny:llama"))
    arrays = package_to_arrays(pkg)
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in arrays.values())
    assert package_from_arrays(arrays, pkg.content_hash).content_hash == pkg.content_hash

    flipped = dict(arrays)
    key = "model.layers.1.mlp.up_proj.weight:data"
    flipped[key] = arrays[key].copy()
    flipped[key][0] ^= 1
    with pytest.raises(PackageError, match="tampered"):
        package_from_arrays(flipped, pkg.content_hash, who="server in round 2")

    with pytest.raises(PackageError, match="manifest says"):
        package_from_arrays(dict(arrays, **{key: arrays[key][:-1]}))
    with pytest.raises(PackageError, match="dtype"):
        package_from_arrays(dict(arrays, **{key: arrays[key].astype(np.float64)}))
    with pytest.raises(PackageError, match=MANIFEST_KEY):
        package_from_arrays({k: v for k, v in arrays.items() if k != MANIFEST_KEY})
    bad_manifest = dict(arrays, **{MANIFEST_KEY: np.frombuffer(b"{not json", np.uint8)})
    with pytest.raises(PackageError, match="JSON"):
        package_from_arrays(bad_manifest)


def test_package_survives_flower_array_record():
    from flwr.app import Array, ArrayRecord

    pkg = build_quantized_package(load_base_model("tiny:qwen2"))
    record = ArrayRecord({k: Array(np.ascontiguousarray(v))
                          for k, v in package_to_arrays(pkg).items()})
    received = {k: a.numpy() for k, a in record.items()}
    assert package_from_arrays(received, pkg.content_hash).content_hash == pkg.content_hash


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["tensors"]["model.layers.0.mlp.up_proj.weight"].update(shape=[256, 64]),
     "packed codes must be"),
    (lambda m: m["tensors"]["model.norm.weight"].pop("role"), "malformed manifest"),
    (lambda m: m["config"].update(auto_map={"AutoModel": "x.Y"}), "remote code"),
])
def test_consistently_rehashed_but_wrong_manifest_is_refused(edit, match):
    # a sender that recomputes the hash still cannot make a silo build something inconsistent
    pkg = build_quantized_package(load_base_model("tiny:llama"))
    manifest = copy.deepcopy(dict(pkg.manifest))
    edit(manifest)
    arrays = dict(package_to_arrays(pkg))
    arrays[MANIFEST_KEY] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
    with pytest.raises(PackageError, match=match):
        build_model_from_package(package_from_arrays(arrays))


def test_cache_hit_by_hash_then_tampered_file_refused(tmp_path):
    pkg = build_quantized_package(load_base_model("tiny:llama"))
    assert cached_package(tmp_path, pkg.content_hash) is None
    where = save_package(pkg, tmp_path)
    assert where.name == pkg.content_hash
    again = cached_package(tmp_path, pkg.content_hash)
    assert again is not None and again.content_hash == pkg.content_hash
    torch.testing.assert_close(_logits(build_model_from_package(again)),
                               _logits(build_model_from_package(pkg)), atol=0, rtol=0)

    file = where / "package.safetensors"
    raw = bytearray(file.read_bytes())
    raw[-100] ^= 0xFF  # inside the last array's bytes
    file.write_bytes(bytes(raw))
    with pytest.raises(PackageError, match="delete"):
        load_package(where)


def test_server_builds_package_once_then_reads_cache(cache_dir):
    first = load_or_build_package("tiny:mistral", cache_dir=cache_dir)
    second = load_or_build_package("tiny:mistral", cache_dir=cache_dir)
    assert first.content_hash == second.content_hash
    assert first.manifest["tokenizer_files"]


def test_silo_needs_nothing_but_the_package(tmp_path, monkeypatch):
    pkg = build_quantized_package(load_base_model("tiny:gpt2"), tokenizer=load_tokenizer("tiny:gpt2"))
    save_package(pkg, tmp_path / "silo")
    # an empty model cache and no hub: the silo can only use what the package carries
    monkeypatch.setenv("FEDSHIELD_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from fedshield_flwr.packages.model import package_tokenizer

    loaded = cached_package(tmp_path / "silo", pkg.content_hash)
    tok = package_tokenizer(loaded)
    ids = tok("Hello, how are you?", return_tensors="pt")["input_ids"]
    assert build_model_from_package(loaded)(input_ids=ids).logits.shape[:2] == ids.shape
    assert not (tmp_path / "empty" / "models").exists()


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_lora_trains_on_the_rebuilt_model(quant_type):
    silo = build_model_from_package(
        build_quantized_package(load_base_model("tiny:llama"), BaseQuantSpec(quant_type)))
    packed_before = {n: b.clone() for n, b in silo.named_buffers()}
    model = apply_lora(silo, LoraSettings(r=4, alpha=8, dropout=0.0), seed=0)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    batch = {"input_ids": IDS, "labels": IDS}
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for n, b in model.named_buffers():  # the quantized base is frozen
        key = n.replace("base_model.model.", "")
        if key in packed_before:
            assert torch.equal(b, packed_before[key]), n
    state = get_adapter_state(model)
    assert any(np.abs(v).sum() > 0 for k, v in state.items() if "lora_B" in k)


def test_evaluate_lm_loss_matches_model_loss_and_masks_padding():
    model = load_base_model("tiny:llama")
    hf_loss = float(model(input_ids=IDS, labels=IDS).loss)
    report = evaluate_lm_loss(model, [{"input_ids": IDS}])
    assert math.isclose(report.loss, hf_loss, rel_tol=1e-5)
    assert report.tokens == IDS.numel() - IDS.shape[0]
    mask = torch.ones_like(IDS)
    mask[:, -4:] = 0
    masked = evaluate_lm_loss(model, [{"input_ids": IDS, "attention_mask": mask}])
    assert masked.tokens == report.tokens - 8


def test_ip_margin_compares_full_and_silo_models():
    model = load_base_model("tiny:llama")
    silo = build_model_from_package(build_quantized_package(model))
    batches = [{"input_ids": IDS}]
    same = ip_margin(model, model, batches)
    assert same.loss_gap == 0 and same.perplexity_ratio == 1
    margin = ip_margin(model, silo, batches)
    assert margin.loss_gap != 0 and margin.as_dict()["tokens"] == same.full.tokens


def test_nf4_package_is_under_30_percent_of_fp16():
    model = load_base_model("tiny:llama")
    sizes = package_nbytes(build_quantized_package(model))
    fp16 = 2 * sum(p.numel() for p in model.parameters())
    # tiny models carry relatively large norms and manifest; real models land near 0.26
    assert sizes["weights"] / fp16 < 0.27
    assert sizes["total"] == sizes["weights"] + sizes["small"] + sizes["buffers"] + sizes[
        "tokenizer"] + sizes["codebooks"] + sizes["manifest"]


def test_spec_values_are_validated():
    with pytest.raises(PackageError, match="quant_type"):
        BaseQuantSpec(quant_type="int4")
    with pytest.raises(PackageError, match="blocksize"):
        BaseQuantSpec(blocksize=48)
