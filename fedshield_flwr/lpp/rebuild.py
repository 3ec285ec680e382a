"""Rebuild a trainable silo model from an ``lpp`` base package alone (silo side).

The architecture is instantiated from the manifest's config on the ``meta`` device, then filled
with bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` modules, :class:`QuantizedEmbedding` lookups
that de-quantize only the rows they need, a :class:`QuantizedLMHead`, and the small vectors.
Compute is fp32 on CPU (bf16 matmul is ~250x slower there; NF4 storage with fp32 compute costs
nothing extra per step). PEFT LoRA trains on top unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from fedshield_flwr.lpp.quantize import QuantizedBasePackage
from fedshield_flwr.packages.format import PackageError
from fedshield_flwr.packages.model import (
    config_from_manifest,
)


class QuantizedRows(nn.Module):
    """A frozen ``[num_rows, dim]`` matrix kept quantized, de-quantized a few rows at a time.

    4-bit matrices need ``dim % blocksize == 0`` (and ``dim`` even) so that every row is whole
    blocks of packed codes; their absmax is plain fp32 here (double quantization undone once,
    it is 1/blocksize of the matrix). int8 matrices are row-scaled: codes ``int8[num, dim]``
    and scales ``float32[num]`` (value = code * scale / 127).
    """

    def __init__(self, num_rows: int, dim: int, quant_type: str, data: torch.Tensor,
                 absmax: torch.Tensor, blocksize: int = 64,
                 code: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_rows, self.dim = num_rows, dim
        self.quant_type, self.blocksize = quant_type, blocksize
        if quant_type == "int8":
            self.register_buffer("data", data.view(num_rows, dim))
            self.register_buffer("absmax", absmax.view(num_rows))
        else:
            self.register_buffer("data", data.view(num_rows, dim // 2))
            self.register_buffer("absmax", absmax.view(num_rows, dim // blocksize))
            self.register_buffer("code", code)

    def _decode(self, data: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        if self.quant_type == "int8":
            return data.to(torch.float32) * (absmax / 127.0).unsqueeze(1)
        import bitsandbytes.functional as bnbf

        state = bnbf.QuantState(absmax=absmax.reshape(-1), shape=torch.Size((data.shape[0],
                                                                             self.dim)),
                                code=self.code, blocksize=self.blocksize,
                                quant_type=self.quant_type, dtype=torch.float32)
        return bnbf.dequantize_4bit(data.reshape(-1, 1), state)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """fp32 rows ``index`` (1-D), shape ``[len(index), dim]``."""
        return self._decode(self.data[index], self.absmax[index])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """fp32 rows ``start:stop``."""
        return self._decode(self.data[start:stop], self.absmax[start:stop])

    def extra_repr(self) -> str:
        return f"{self.num_rows}, {self.dim}, quant_type={self.quant_type}"


class QuantizedEmbedding(nn.Module):
    """Frozen embedding lookup on a :class:`QuantizedRows` table: only looked-up rows are
    de-quantized."""

    def __init__(self, table: QuantizedRows) -> None:
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.num_rows, table.dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.gather(input_ids.reshape(-1))
        return rows.view(*input_ids.shape, self.embedding_dim)


class _ChunkedRowsMatmul(torch.autograd.Function):
    """``x @ W.T`` with ``W`` de-quantized ``chunk`` rows at a time, forward and backward, so no
    full fp32 copy of a large output head ever exists. ``W`` is frozen: no weight gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, table: QuantizedRows, chunk: int) -> torch.Tensor:
        ctx.table, ctx.chunk = table, chunk
        out = x.new_empty(*x.shape[:-1], table.num_rows)
        for r0 in range(0, table.num_rows, chunk):
            r1 = min(r0 + chunk, table.num_rows)
            torch.matmul(x, table.rows(r0, r1).t(), out=out[..., r0:r1])
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        table, chunk = ctx.table, ctx.chunk
        grad_x = None
        for r0 in range(0, table.num_rows, chunk):
            r1 = min(r0 + chunk, table.num_rows)
            part = grad_out[..., r0:r1] @ table.rows(r0, r1)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None, None


class QuantizedLMHead(nn.Module):
    """Frozen output head ``x @ W.T (+ bias)`` on a :class:`QuantizedRows` table (shared with the
    input embedding when tied), de-quantized ``chunk_rows`` rows at a time.

    LoRA cannot target this module (PEFT does not know it); lpp's default targets are the
    attention projections.
    """

    def __init__(self, table: QuantizedRows, bias: torch.Tensor | None = None,
                 chunk_rows: int = 4096) -> None:
        super().__init__()
        self.table, self.chunk_rows = table, chunk_rows
        self.in_features, self.out_features = table.dim, table.num_rows
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _ChunkedRowsMatmul.apply(x.to(torch.float32), self.table, self.chunk_rows)
        return out if self.bias is None else out + self.bias


def _tensor(arr: np.ndarray) -> torch.Tensor:
    arr = arr if arr.flags.writeable else arr.copy()  # torch wants writeable buffers
    # np.ascontiguousarray turns a 0-dim array (Gemma's embed_scale) into shape [1]
    return torch.from_numpy(np.ascontiguousarray(arr).reshape(np.shape(arr)))


def _quant_state_dict(entry: dict, pkg: QuantizedBasePackage) -> dict:
    a = {f: _tensor(pkg.arrays[k]) for f, k in entry["arrays"].items()}
    q = entry["quant"]
    qs: dict[str, Any] = {"quant_type": entry["encoding"], "absmax": a["absmax"],
                          "blocksize": q["blocksize"], "quant_map": a["quant_map"],
                          "dtype": "float32", "shape": tuple(entry["shape"])}
    if q.get("nested"):
        qs.update(nested_absmax=a["nested_absmax"], nested_blocksize=q["nested_blocksize"],
                  nested_quant_map=a["nested_quant_map"], nested_dtype="float32",
                  nested_offset=q["nested_offset"])
    return qs


def dequantize_package_tensor(pkg: QuantizedBasePackage, name: str) -> torch.Tensor:
    """De-quantize one weight of the package to fp32, in the orientation of the original model."""
    entry = pkg.manifest["tensors"][name]
    src = pkg.manifest["tensors"][entry["tied_to"]] if entry.get("tied_to") else entry
    if src["role"] == "small":
        return _tensor(pkg.arrays[src["arrays"]["value"]]).to(torch.float32)
    if src["encoding"] == "int8":
        cb = _tensor(pkg.arrays[src["arrays"]["cb"]]).to(torch.float32)
        w = cb * (_tensor(pkg.arrays[src["arrays"]["scb"]]) / 127.0).unsqueeze(1)
    else:
        import bitsandbytes.functional as bnbf

        qs = bnbf.QuantState.from_dict(_quant_state_dict(src, pkg), device=torch.device("cpu"))
        w = bnbf.dequantize_4bit(_tensor(pkg.arrays[src["arrays"]["data"]]).view(-1, 1), qs)
    return w.t().contiguous() if entry["transposed"] else w


class _DropInt8CastNotice(logging.Filter):
    """bitsandbytes logs an fp32->fp16 cast notice on every int8 matmul; int8 layers compute in
    fp16 by design, so the notice says nothing new and would flood the training log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in record.getMessage()


_INT8_FILTER = _DropInt8CastNotice()


def _make_linear(entry: dict, src: dict, pkg: QuantizedBasePackage) -> nn.Module:
    import bitsandbytes as bnb

    out_f, in_f = src["shape"]
    if src["encoding"] == "int8":
        bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
        if _INT8_FILTER not in bnb_log.filters:
            bnb_log.addFilter(_INT8_FILTER)
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=entry["has_bias"], has_fp16_weights=False,
                                    threshold=0.0, device="meta")
        cb = _tensor(pkg.arrays[src["arrays"]["cb"]])
        scb = _tensor(pkg.arrays[src["arrays"]["scb"]])
        layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False,
                                         CB=cb, SCB=scb)
        return layer
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=entry["has_bias"], compute_dtype=torch.float32,
                              quant_type=src["encoding"], device="meta")
    layer.weight = bnb.nn.Params4bit.from_prequantized(
        _tensor(pkg.arrays[src["arrays"]["data"]]).view(-1, 1), _quant_state_dict(src, pkg),
        requires_grad=False, device="cpu", module=layer,
    )
    layer.compute_type_is_set = True
    # keep fp32 compute in eval too: bitsandbytes would otherwise repack weights for bf16 AVX512
    layer.support_avx512bf16_for_cpu = False
    return layer


def _rows_table(src_name: str, pkg: QuantizedBasePackage,
                tables: dict[str, QuantizedRows]) -> QuantizedRows | None:
    """The (shared) :class:`QuantizedRows` of a quantized 2-D tensor, or ``None`` when its rows
    are not whole 4-bit blocks."""
    if src_name in tables:
        return tables[src_name]
    src = pkg.manifest["tensors"][src_name]
    num, dim = src["shape"]
    if src["transposed"]:
        return None
    if src["encoding"] == "int8":
        table = QuantizedRows(num, dim, "int8", _tensor(pkg.arrays[src["arrays"]["cb"]]),
                              _tensor(pkg.arrays[src["arrays"]["scb"]]))
    else:
        import bitsandbytes.functional as bnbf

        bs = src["quant"]["blocksize"]
        if dim % bs or dim % 2:
            return None
        qs = bnbf.QuantState.from_dict(_quant_state_dict(src, pkg), device=torch.device("cpu"))
        absmax = qs.absmax
        if qs.nested:  # row slices need plain fp32 scales: undo the double quantization once
            absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        table = QuantizedRows(num, dim, src["encoding"],
                              _tensor(pkg.arrays[src["arrays"]["data"]]),
                              absmax.to(torch.float32), bs, qs.code)
    tables[src_name] = table
    return table


def build_model_from_package(pkg: QuantizedBasePackage) -> nn.Module:
    """Rebuild a trainable causal LM from the package alone (silo side).

    The architecture comes from the manifest's config (only architectures that transformers
    ships; no remote code), instantiated on the ``meta`` device so no full-precision weight is
    ever allocated, then filled in place:

    * ``Linear``/``Conv1D`` weights -> bitsandbytes ``Linear4bit`` (fp32 compute) or
      ``Linear8bitLt``; GPT-2's ``Conv1D`` becomes a ``Linear`` of the transposed weight.
    * ``nn.Embedding`` tables -> :class:`QuantizedEmbedding` (kept quantized); embedding
      subclasses with their own forward get a de-quantized fp32 table instead.
    * the output head -> :class:`QuantizedLMHead` (de-quantizes 4096 rows at a time, so no fp32
      copy of a large vocabulary matrix exists even transiently); a tied head shares the
      embedding's :class:`QuantizedRows`.
    * norm weights, biases and buffers -> the fp32 vectors from the package.

    Returns the model in ``eval()`` mode with ``use_cache=False`` and every parameter frozen;
    wrap it with :func:`fedshield_flwr.models.lora.apply_lora` to train.

    Raises
    ------
    PackageError
        The model type is unknown to this transformers, or a tensor could not be placed.
    """
    from transformers import AutoModelForCausalLM

    manifest = pkg.manifest
    config, model_type = config_from_manifest(pkg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    tensors = manifest["tensors"]
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    tables: dict[str, QuantizedRows] = {}
    # weights before small vectors (a bias lands on the replaced module), owners before tied
    # aliases; sorted() is stable, so the model's own order holds within each group
    order = sorted(tensors, key=lambda n: (tensors[n]["role"] == "small",
                                           bool(tensors[n].get("tied_to"))))
    for name in order:
        entry = tensors[name]
        parent_name, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(parent_name)
        except AttributeError as exc:
            raise PackageError(f"package tensor '{name}' has no module in a freshly built "
                               f"'{model_type}' model; server and silo transformers differ") from exc
        src = tensors[entry["tied_to"]] if entry.get("tied_to") else entry
        current = getattr(module, attr, None)
        if isinstance(current, torch.Tensor) and list(current.shape) != list(
                entry.get("orig_shape", entry["shape"])):
            raise PackageError(
                f"package tensor '{name}' has shape {entry.get('orig_shape', entry['shape'])} but "
                f"the '{model_type}' config gives {list(current.shape)}; the package is "
                "inconsistent: ask the server to rebuild it")
        if entry["role"] == "small":
            value = _tensor(pkg.arrays[entry["arrays"]["value"]]).to(torch.float32)
            setattr(module, attr, nn.Parameter(value, requires_grad=False))
        elif entry["role"] not in ("linear", "embedding"):
            raise PackageError(f"package tensor '{name}' has unknown role {entry['role']!r}")
        elif entry["role"] == "linear" and parent_name == head_name and (
                table := _rows_table(entry.get("tied_to") or name, pkg, tables)) is not None:
            new = QuantizedLMHead(table)
            if entry["has_bias"]:
                new.bias = nn.Parameter(torch.empty(table.num_rows, device="meta"))
            _replace(model, parent_name, new)
        elif entry["role"] == "linear":
            _replace(model, parent_name, _make_linear(entry, src, pkg))
        elif type(module) is nn.Embedding and module.max_norm is None and (
                table := _rows_table(entry.get("tied_to") or name, pkg, tables)) is not None:
            _replace(model, parent_name, QuantizedEmbedding(table))
        else:
            # an embedding subclass with its own forward (e.g. scaled), or rows that are not
            # whole blocks: keep the module, give it the de-quantized table (it still travelled
            # quantized; only this silo's memory pays)
            module.weight = nn.Parameter(dequantize_package_tensor(pkg, name), requires_grad=False)
    for name, info in manifest["buffers"].items():
        parent_name, _, attr = name.rpartition(".")
        module = model.get_submodule(parent_name)
        value = _tensor(pkg.arrays[info["key"]])
        current = getattr(module, attr, None)
        if isinstance(current, torch.Tensor) and current.shape != value.shape:
            raise PackageError(f"package buffer '{name}' has shape {list(value.shape)}, the "
                               f"model expects {list(current.shape)}; ask the server to rebuild")
        module.register_buffer(attr, value, persistent=info["persistent"])

    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:
        raise PackageError(f"package {pkg.content_hash[:12]} left {len(left)} tensors unfilled "
                           f"({left[:3]}); server and silo transformers versions differ")
    # the head is its own quantized module now; re-tying would point it at a QuantizedEmbedding
    model.config.tie_word_embeddings = False
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


