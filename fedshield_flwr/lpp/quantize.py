"""Quantized base package for ``lpp`` mode: the only form in which a silo ever receives the base.

The server turns its full-precision causal LM into a *package*: every ``Linear`` (and GPT-2
``Conv1D``) weight, every embedding table and the output head are quantized with bitsandbytes
(NF4 by default, FP4 or row-wise int8 on request) and stored as plain numpy arrays (packed
``uint8`` codes, per-block ``absmax``, the shared code books); only small 1-D vectors (norm
weights, biases, rotary frequencies) travel in fp32/fp16. A JSON manifest carries the model
config, each tensor's name, shape, encoding and bitsandbytes quantization-state fields; the
format, hash and cache are :mod:`fedshield_flwr.packages.format`'s.

This module quantizes (server side); :mod:`.package` validates a received package and keeps the
server's build cache, :mod:`.rebuild` turns a package into a trainable silo model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedshield_flwr.packages.format import (
    PackageError,
    canonical_json,
    compute_content_hash,
)
from fedshield_flwr.packages.model import (
    config_dict,
    to_numpy,
    tokenizer_files,
)

PACKAGE_FORMAT = "fedshield-lpp-base"


PACKAGE_VERSION = 1


QUANT_TYPES = ("nf4", "fp4", "int8")


BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)


NESTED_BLOCKSIZE = 256  # bitsandbytes' double-quantization block size for absmax


@dataclass(frozen=True)
class BaseQuantSpec:
    """How the server quantizes the base model.

    Parameters
    ----------
    quant_type : str, default "nf4"
        ``"nf4"`` or ``"fp4"`` (bitsandbytes 4-bit, blockwise) or ``"int8"`` (LLM.int8 row-wise
        absmax, no outlier decomposition).
    blocksize : int, default 64
        Elements per 4-bit block with one absmax each; one of 32, 64, ..., 4096. Ignored by int8.
    compress_statistics : bool, default True
        Double quantization (QLoRA): the 4-bit absmax values are themselves 8-bit quantized in
        blocks of 256, shrinking them from 0.5 to ~0.13 bits per weight.
    clip_search : bool, default True
        4-bit only: per block, clip the weights at the scale (a fraction of the block's absmax,
        see :func:`mse_clip`) that minimizes the block's squared quantization error, instead
        of always scaling by the absmax. Same format and size; silos de-quantize as usual.
    small_dtype : str, default "float32"
        Dtype of the vectors that travel unquantized (norm weights, biases): ``"float32"`` or
        ``"float16"``.
    max_small_numel : int, default 65536
        Largest 1-D parameter allowed to travel unquantized. A larger one, or any unquantizable
        parameter with two or more dimensions, makes :func:`build_quantized_package` fail rather
        than leak it in full precision.
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    compress_statistics: bool = True
    clip_search: bool = True
    small_dtype: str = "float32"
    max_small_numel: int = 65536

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise PackageError(f"quant_type '{self.quant_type}': use one of {QUANT_TYPES}")
        if self.blocksize not in BLOCKSIZES_4BIT:
            raise PackageError(f"blocksize {self.blocksize}: use one of {BLOCKSIZES_4BIT}")
        if self.small_dtype not in ("float32", "float16"):
            raise PackageError(f"small_dtype '{self.small_dtype}': use float32 or float16")
        if self.max_small_numel < 1:
            raise PackageError("max_small_numel must be >= 1")


@dataclass(frozen=True)
class QuantizedBasePackage:
    """A quantized base model as it travels: JSON manifest + numpy arrays + content hash.

    Build it with :func:`build_quantized_package` (server) or :func:`package_from_arrays` /
    :func:`load_package` (silo); both compute ``content_hash`` from the content itself.
    """

    manifest: Mapping[str, Any]
    arrays: Mapping[str, np.ndarray]
    content_hash: str

    @property
    def quant_type(self) -> str:
        return str(self.manifest["quant"]["quant_type"])

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: every array plus the manifest (tokenizer files included)."""
        return int(sum(a.nbytes for a in self.arrays.values())) + len(canonical_json(self.manifest))


# Clipping fractions of a block's absmax that :func:`mse_clip` tries (1.0 = plain absmax).
CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(17))


def _mse_clip_blocks(blocks: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """``blocks [n, bs]`` clipped per row at the grid fraction with least rounding error."""
    mids = (code[1:] + code[:-1]) / 2
    absmax = blocks.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    best_err = best_frac = None
    for frac in CLIP_GRID:
        scale = absmax * frac
        idx = torch.bucketize((blocks / scale).clamp_(-1.0, 1.0), mids)
        err = (blocks - code[idx] * scale).square_().sum(1)
        if best_err is None:
            best_err, best_frac = err, torch.full_like(err, frac)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_frac = torch.where(better, frac, best_frac)
    limit = absmax * best_frac.unsqueeze(1)
    return torch.minimum(torch.maximum(blocks, -limit), limit)


@torch.no_grad()
def mse_clip(weight: torch.Tensor, quant_type: str, blocksize: int) -> torch.Tensor:
    """``weight`` clipped, block by block, so that 4-bit absmax quantization of the result has
    the least squared error against ``weight``.

    bitsandbytes scales each block of ``blocksize`` consecutive values by its absmax, so one
    outlier stretches the grid and wastes codes on values that do not occur. Clipping a block at
    ``frac * absmax`` (``frac`` in :data:`CLIP_GRID`, chosen per block by trying each with
    nearest-code rounding) makes bitsandbytes pick that smaller scale: the package format, its
    size and the silo's de-quantization are unchanged (``benchmarks/lpp.py`` records the effect
    on the weights' error and on the quantized base's loss, ``clip_search`` in ``lpp.json``).
    """
    import bitsandbytes.functional as bnbf

    code = bnbf.get_4bit_type(quant_type, device="cpu").to(torch.float32).sort().values
    flat = weight.detach().to(torch.float32).reshape(-1)
    n_full = flat.numel() // blocksize * blocksize
    out = torch.empty_like(flat)
    if n_full:
        out[:n_full] = _mse_clip_blocks(flat[:n_full].view(-1, blocksize), code).view(-1)
    if n_full < flat.numel():  # bitsandbytes' last, shorter block
        out[n_full:] = _mse_clip_blocks(flat[n_full:].view(1, -1), code).view(-1)
    return out.view(weight.shape)


def _quantize_4bit(weight: torch.Tensor, spec: BaseQuantSpec) -> tuple[dict, dict]:
    """Quantize a 2-D fp weight; return (arrays by field, JSON quant-state fields)."""
    import bitsandbytes.functional as bnbf

    weight = weight.detach().to(torch.float32)
    if spec.clip_search:
        weight = mse_clip(weight, spec.quant_type, spec.blocksize)
    packed, state = bnbf.quantize_4bit(
        weight.contiguous(),
        blocksize=spec.blocksize,
        compress_statistics=spec.compress_statistics,
        quant_type=spec.quant_type,
        quant_storage=torch.uint8,
    )
    qs = state.as_dict()
    arrays = {"data": to_numpy(packed).reshape(-1), "absmax": to_numpy(qs["absmax"]),
              "quant_map": to_numpy(qs["quant_map"])}
    fields: dict[str, Any] = {"blocksize": int(qs["blocksize"]), "dtype": "float32",
                              "nested": "nested_absmax" in qs}
    if fields["nested"]:
        arrays["nested_absmax"] = to_numpy(qs["nested_absmax"])
        arrays["nested_quant_map"] = to_numpy(qs["nested_quant_map"])
        fields.update(nested_blocksize=int(qs["nested_blocksize"]),
                      nested_offset=float(qs["nested_offset"]), nested_dtype="float32")
    return arrays, fields


def _quantize_int8(weight: torch.Tensor) -> tuple[dict, dict]:
    import bitsandbytes.functional as bnbf

    cb, scb, _ = bnbf.int8_vectorwise_quant(weight.detach().to(torch.float16).contiguous())
    return {"cb": to_numpy(cb), "scb": to_numpy(scb).astype(np.float32)}, {}


def build_quantized_package(
    model: nn.Module, spec: BaseQuantSpec | None = None, tokenizer=None
) -> QuantizedBasePackage:
    """Quantize a full-precision causal LM into a package (server side).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The full-precision base (fp32/fp16/bf16; not already quantized, no LoRA wrapped).
    spec : BaseQuantSpec, optional
        Quantization settings; NF4, block 64, double-quantized statistics by default.
    tokenizer : transformers tokenizer, optional
        When given, its JSON/text files travel in the package (``uint8`` arrays under
        ``tokenizer:<file>``) so a silo needs nothing but the package; see :func:`package_tokenizer`.

    Returns
    -------
    QuantizedBasePackage

    Raises
    ------
    PackageError
        A parameter could neither be quantized nor sent as a small vector (it would otherwise
        travel in full precision), or the model needs custom code.
    """
    from transformers.pytorch_utils import Conv1D

    spec = spec or BaseQuantSpec()
    arrays: dict[str, np.ndarray] = OrderedDict()
    tensors: dict[str, dict] = OrderedDict()
    codebooks: dict[str, np.ndarray] = {}

    owner_of: dict[int, str] = {}  # id(Parameter) -> first name, to detect tied weights
    modules = dict(model.named_modules())
    for name, param in model.named_parameters(remove_duplicate=False):
        mod_name, _, attr = name.rpartition(".")
        module = modules[mod_name]
        if id(param) in owner_of:
            owner = owner_of[id(param)]
            role = _role(module, attr, Conv1D)
            if (role is None or tensors[owner]["role"] not in ("linear", "embedding")
                    or tensors[owner]["transposed"] or isinstance(module, Conv1D)):
                raise PackageError(f"tied parameter '{name}' shares '{owner}' in a layout lpp "
                                   "cannot quantize once for both; untie them before packaging")
            tensors[name] = {"module": mod_name, "attr": attr, "role": role, "tied_to": owner,
                             "orig_shape": list(param.shape), "shape": tensors[owner]["shape"],
                             "transposed": False, "encoding": tensors[owner]["encoding"],
                             "has_bias": getattr(module, "bias", None) is not None}
            continue
        owner_of[id(param)] = name
        role = _role(module, attr, Conv1D)
        entry: dict[str, Any] = {"module": mod_name, "attr": attr, "role": role,
                                 "orig_shape": list(param.shape), "transposed": False}
        if role in ("linear", "embedding"):
            weight = param.detach()
            if isinstance(module, Conv1D):  # (in, out) storage; quantize as Linear (out, in)
                weight = weight.t()
                entry["transposed"] = True
            entry["shape"] = list(weight.shape)
            entry["has_bias"] = getattr(module, "bias", None) is not None
            if spec.quant_type == "int8":
                fields, qfields = _quantize_int8(weight)
            else:
                fields, qfields = _quantize_4bit(weight, spec)
            entry.update(encoding=spec.quant_type, quant=qfields, arrays={})
            for fname, arr in fields.items():
                if fname in ("quant_map", "nested_quant_map"):
                    # code books are the same for every tensor: send each once
                    key = "codebook:" + (spec.quant_type if fname == "quant_map" else "nested")
                    if key in codebooks and not np.array_equal(codebooks[key], arr):
                        raise PackageError(f"bitsandbytes returned two different '{key}'")
                    codebooks[key] = arr
                else:
                    key = f"{name}:{fname}"
                    arrays[key] = arr
                entry["arrays"][fname] = key
        else:
            if param.dim() > 1 or param.numel() > spec.max_small_numel:
                raise PackageError(
                    f"parameter '{name}' {tuple(param.shape)} of {type(module).__name__} is neither "
                    "a Linear/Conv1D/Embedding weight nor a small vector; lpp refuses to send it in "
                    "full precision (raise BaseQuantSpec.max_small_numel only for 1-D vectors)"
                )
            entry.update(role="small", shape=list(param.shape), encoding=spec.small_dtype,
                         arrays={"value": name})
            arrays[name] = to_numpy(param.to(getattr(torch, spec.small_dtype)))
        tensors[name] = entry

    buffers: dict[str, dict] = OrderedDict()
    persistent = set(model.state_dict().keys())
    for name, buf in model.named_buffers():
        if buf.numel() > spec.max_small_numel:
            raise PackageError(f"buffer '{name}' {tuple(buf.shape)} is larger than "
                               f"max_small_numel={spec.max_small_numel}; lpp refuses to send it")
        value = buf.detach()
        if value.is_floating_point():
            value = value.to(torch.float32)
        key = f"buffer:{name}"
        arrays[key] = to_numpy(value)
        buffers[name] = {"key": key, "persistent": name in persistent,
                         "shape": list(buf.shape), "dtype": str(arrays[key].dtype)}

    arrays.update(codebooks)
    tok_files = tokenizer_files(tokenizer) if tokenizer is not None else {}
    for fname, data in tok_files.items():
        arrays[f"tokenizer:{fname}"] = data

    manifest = {
        "format": PACKAGE_FORMAT,
        "version": PACKAGE_VERSION,
        "model_type": model.config.model_type,
        "config": config_dict(model.config),
        "quant": {"quant_type": spec.quant_type, "blocksize": spec.blocksize,
                  "compress_statistics": spec.compress_statistics,
                  "clip_search": spec.clip_search,
                  "small_dtype": spec.small_dtype, "max_small_numel": spec.max_small_numel},
        "tensors": tensors,
        "buffers": buffers,
        "tokenizer_files": sorted(tok_files),
        "num_params": int(sum(p.numel() for p in model.parameters())),
        "array_index": {k: {"dtype": str(v.dtype), "shape": list(v.shape)}
                        for k, v in arrays.items()},
    }
    arrays = OrderedDict((k, arrays[k]) for k in sorted(arrays))
    return QuantizedBasePackage(manifest, arrays, compute_content_hash(manifest, arrays))


def _role(module: nn.Module, attr: str, conv1d_cls: type) -> str | None:
    if attr != "weight":
        return None
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Linear, conv1d_cls)) and module.weight.dim() == 2:
        return "linear"
    return None


def full_precision_tensors(pkg: QuantizedBasePackage) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, dtype)`` of every model tensor that travels unquantized (vectors, buffers)."""
    out = [(n, tuple(e["shape"]), e["encoding"]) for n, e in pkg.manifest["tensors"].items()
           if e["role"] == "small"]
    out += [(n, tuple(b["shape"]), b["dtype"]) for n, b in pkg.manifest["buffers"].items()
            if np.dtype(b["dtype"]).kind == "f"]
    return out


def assert_no_full_precision_weights(
    pkg: QuantizedBasePackage, max_small_numel: int | None = None
) -> None:
    """Raise :class:`PackageError` if a floating-point array could be a full-precision weight.

    Every floating array must be one of: a listed small vector or buffer of at most
    ``max_small_numel`` elements and at most one dimension; a quantization statistic (absmax,
    row scale) at least ``min(blocksize, 32)`` times smaller than the weight it scales; or a
    code book of at most 256 entries. The check trusts array sizes, not names alone.
    """
    limit = max_small_numel if max_small_numel is not None else pkg.manifest["quant"][
        "max_small_numel"]
    tensors = pkg.manifest["tensors"]
    stat_of: dict[str, int] = {}  # array key -> numel of the weight it describes
    for entry in tensors.values():
        for fname, key in entry.get("arrays", {}).items():
            if fname in ("absmax", "nested_absmax", "scb"):
                stat_of[key] = int(np.prod(entry["shape"]))
    for key, arr in pkg.arrays.items():
        if arr.dtype.kind != "f":
            continue
        if key.startswith("codebook:"):
            ok = arr.size <= 256
        elif key in stat_of:
            ok = arr.ndim <= 1 and arr.size * 32 <= stat_of[key]
        else:
            ok = arr.ndim <= 1 and arr.size <= limit
        if not ok:
            raise PackageError(
                f"package {pkg.content_hash[:12]} holds floating array '{key}' {arr.shape} that "
                f"could be a full-precision weight (limit {limit} elements for 1-D vectors); "
                "the server must quantize it or refuse to send the model"
            )


def package_nbytes(pkg: QuantizedBasePackage) -> dict[str, int]:
    """Bytes on the wire by category: ``weights`` (codes+stats), ``small``, ``buffers``,
    ``tokenizer``, ``manifest`` and ``total``."""
    out = {"weights": 0, "small": 0, "buffers": 0, "tokenizer": 0, "codebooks": 0}
    small = {e["arrays"]["value"] for e in pkg.manifest["tensors"].values() if e["role"] == "small"}
    for key, arr in pkg.arrays.items():
        if key.startswith("tokenizer:"):
            out["tokenizer"] += arr.nbytes
        elif key.startswith("buffer:"):
            out["buffers"] += arr.nbytes
        elif key.startswith("codebook:"):
            out["codebooks"] += arr.nbytes
        elif key in small:
            out["small"] += arr.nbytes
        else:
            out["weights"] += arr.nbytes
    out["manifest"] = len(canonical_json(pkg.manifest))
    out["total"] = sum(out.values())
    return out
