"""Quantized base package for ``lpp`` mode: the only form in which a silo ever receives the base.

The server turns its full-precision causal LM into a *package*: every ``Linear`` (and GPT-2
``Conv1D``) weight, every embedding table and the output head are quantized with bitsandbytes
(NF4 by default, FP4 or row-wise int8 on request) and stored as plain numpy arrays (packed
``uint8`` codes, per-block ``absmax``, the shared code books); only small 1-D vectors (norm
weights, biases, rotary frequencies) travel in fp32/fp16. A JSON manifest carries the model
config, each tensor's name, shape, encoding and bitsandbytes quantization-state fields. The
package is a ``dict[str, np.ndarray]`` (a Flower ``ArrayRecord``; the manifest rides along as a
``uint8`` array under :data:`MANIFEST_KEY`), identified by a SHA-256 content hash over manifest
and arrays, so silos cache it on disk by hash and verify it on every load.

The silo rebuilds a trainable model from the package alone (:func:`build_model_from_package`):
the architecture is instantiated from the config on the ``meta`` device, then filled with
bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` modules, :class:`QuantizedEmbedding` lookups that
de-quantize only the rows they need, and the small vectors. Compute is fp32 on CPU (bf16 matmul
is ~250x slower there; NF4 storage with fp32 compute costs nothing extra per step). PEFT LoRA
trains on top unchanged.

The last section measures the *IP margin*: the quality gap between what the server holds (full
base + full adapter) and what a silo holds (quantized base + k-bit adapter) on given batches.

Nothing here uses pickle: arrays are numpy, the manifest is JSON, the disk format is safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

PACKAGE_FORMAT = "fedshield-lpp-base"
PACKAGE_VERSION = 1
MANIFEST_KEY = "__manifest__"
QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# dtypes a receiver accepts for any array; everything else (object arrays above all) is refused
_ALLOWED_DTYPES = {"uint8", "int8", "int16", "int32", "int64", "bool", "float16", "float32"}
_TOKENIZER_SUFFIXES = (".json", ".txt", ".model", ".jinja")
_NESTED_BLOCKSIZE = 256  # bitsandbytes' double-quantization block size for absmax


class PackageError(ValueError):
    """A quantized base package is malformed, tampered with, or cannot be built or rebuilt."""


# --------------------------------------------------------------------------------------------
# parameters and the package object
# --------------------------------------------------------------------------------------------


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


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON encoding used for hashing and for the wire (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def compute_content_hash(manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) over the canonical manifest and every array's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(f"{PACKAGE_FORMAT}/{PACKAGE_VERSION}\0".encode())
    h.update(canonical_json(manifest))
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        h.update(f"\0{key}\0{arr.dtype.str}\0{list(arr.shape)}\0".encode())
        h.update(arr.reshape(-1).view(np.uint8))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# server side: quantize a full-precision model into a package
# --------------------------------------------------------------------------------------------


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy().copy()


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
    arrays = {"data": _np(packed).reshape(-1), "absmax": _np(qs["absmax"]),
              "quant_map": _np(qs["quant_map"])}
    fields: dict[str, Any] = {"blocksize": int(qs["blocksize"]), "dtype": "float32",
                              "nested": "nested_absmax" in qs}
    if fields["nested"]:
        arrays["nested_absmax"] = _np(qs["nested_absmax"])
        arrays["nested_quant_map"] = _np(qs["nested_quant_map"])
        fields.update(nested_blocksize=int(qs["nested_blocksize"]),
                      nested_offset=float(qs["nested_offset"]), nested_dtype="float32")
    return arrays, fields


def _quantize_int8(weight: torch.Tensor) -> tuple[dict, dict]:
    import bitsandbytes.functional as bnbf

    cb, scb, _ = bnbf.int8_vectorwise_quant(weight.detach().to(torch.float16).contiguous())
    return {"cb": _np(cb), "scb": _np(scb).astype(np.float32)}, {}


def _config_dict(config) -> dict:
    cfg = json.loads(config.to_json_string(use_diff=False))
    if cfg.get("auto_map"):
        raise PackageError(
            "the base model needs custom code (config.auto_map); lpp rebuilds only architectures "
            "that transformers ships, so silos never run code sent by the server"
        )
    for key in ("quantization_config", "_name_or_path", "auto_map"):
        cfg.pop(key, None)
    cfg["dtype"] = "float32"
    cfg["use_cache"] = False
    return cfg


def _tokenizer_files(tokenizer) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            if path.is_file() and path.suffix in _TOKENIZER_SUFFIXES:
                out[path.name] = np.frombuffer(path.read_bytes(), dtype=np.uint8).copy()
    return out


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
            arrays[name] = _np(param.to(getattr(torch, spec.small_dtype)))
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
        arrays[key] = _np(value)
        buffers[name] = {"key": key, "persistent": name in persistent,
                         "shape": list(buf.shape), "dtype": str(arrays[key].dtype)}

    arrays.update(codebooks)
    tok_files = _tokenizer_files(tokenizer) if tokenizer is not None else {}
    for fname, data in tok_files.items():
        arrays[f"tokenizer:{fname}"] = data

    manifest = {
        "format": PACKAGE_FORMAT,
        "version": PACKAGE_VERSION,
        "model_type": model.config.model_type,
        "config": _config_dict(model.config),
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


# --------------------------------------------------------------------------------------------
# transport: Flower arrays and the on-disk cache
# --------------------------------------------------------------------------------------------


def package_to_arrays(pkg: QuantizedBasePackage) -> dict[str, np.ndarray]:
    """The whole package as one ``dict[str, np.ndarray]`` (put it in one Flower ArrayRecord).

    The manifest travels as a ``uint8`` array of canonical JSON under :data:`MANIFEST_KEY`;
    send ``pkg.content_hash`` alongside (ConfigRecord) so the receiver can verify it.
    """
    out = OrderedDict(pkg.arrays)
    out[MANIFEST_KEY] = np.frombuffer(canonical_json(pkg.manifest), dtype=np.uint8).copy()
    return out


def read_manifest(arrays: Mapping[str, np.ndarray], who: str) -> tuple[Any, OrderedDict]:
    """Split received package arrays into the decoded JSON manifest and the other arrays."""
    if MANIFEST_KEY not in arrays:
        raise PackageError(f"package from {who} has no '{MANIFEST_KEY}' array; the sender must "
                           "use package_to_arrays()")
    raw = np.asarray(arrays[MANIFEST_KEY])
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise PackageError(f"package from {who}: manifest must be a 1-D uint8 array")
    try:
        manifest = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"package from {who}: manifest is not valid JSON ({exc})") from exc
    body = OrderedDict(
        (k, np.asarray(arrays[k])) for k in sorted(arrays) if k != MANIFEST_KEY
    )
    return manifest, body


def check_array_index(manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                      fail) -> None:
    """Every array is listed in ``manifest['array_index']`` with its dtype and shape, and no
    dtype outside the allowed numeric ones (no object arrays) arrives; ``fail(msg)`` raises."""
    index = manifest["array_index"]
    if set(index) != set(arrays):
        missing, extra = sorted(set(index) - set(arrays)), sorted(set(arrays) - set(index))
        fail(f"arrays differ from the manifest (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, arr in arrays.items():
        if str(arr.dtype) not in _ALLOWED_DTYPES:
            fail(f"array '{key}' has dtype {arr.dtype}, not one of {sorted(_ALLOWED_DTYPES)}")
        if str(arr.dtype) != index[key]["dtype"] or list(arr.shape) != index[key]["shape"]:
            fail(f"array '{key}' is {arr.dtype}{list(arr.shape)}, manifest says "
                 f"{index[key]['dtype']}{index[key]['shape']}")
    for fname in manifest.get("tokenizer_files") or []:
        if f"tokenizer:{fname}" not in arrays:
            fail(f"tokenizer file '{fname}' is missing")


def package_from_arrays(
    arrays: Mapping[str, np.ndarray], expected_hash: str | None = None, who: str = "server"
) -> QuantizedBasePackage:
    """Validate and rebuild a package received as arrays (silo side).

    Parameters
    ----------
    arrays : mapping of str to np.ndarray
        What :func:`package_to_arrays` produced, e.g. ``ArrayRecord`` values as numpy.
    expected_hash : str, optional
        The content hash announced by the sender; a mismatch is refused.
    who : str
        The sender as it should appear in error messages (``"server in round 3"``).

    Raises
    ------
    PackageError
        Missing or malformed manifest, unexpected arrays, wrong dtypes/shapes, hash mismatch.
    """
    return QuantizedBasePackage(*verified_arrays(arrays, expected_hash, who, _validate_manifest))


def verified_arrays(arrays: Mapping[str, np.ndarray], expected_hash: str | None, who: str,
                    validate) -> tuple[Any, OrderedDict, str]:
    """Manifest, arrays and content hash of a received package, after ``validate(manifest,
    arrays, who)`` accepted them and the hash matched ``expected_hash`` (when given)."""
    manifest, body = read_manifest(arrays, who)
    try:
        validate(manifest, body, who)
    except PackageError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise PackageError(f"package from {who}: malformed manifest ({exc!r}); the server must "
                           "rebuild and resend it") from exc
    digest = compute_content_hash(manifest, body)
    if expected_hash is not None and digest != expected_hash:
        raise PackageError(
            f"package from {who} hashes to {digest[:12]}..., expected {expected_hash[:12]}...; "
            "it was corrupted or tampered with in transit: drop the cached copy and resend"
        )
    return manifest, body, digest


def _validate_manifest(manifest: Any, arrays: Mapping[str, np.ndarray], who: str) -> None:
    def fail(msg: str) -> None:
        raise PackageError(f"package from {who}: {msg}; the server must rebuild and resend it")

    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        fail(f"not a {PACKAGE_FORMAT} manifest")
    if manifest.get("version") != PACKAGE_VERSION:
        fail(f"version {manifest.get('version')!r}, this silo reads {PACKAGE_VERSION}")
    for key in ("model_type", "config", "quant", "tensors", "buffers", "array_index"):
        if key not in manifest:
            fail(f"manifest lacks '{key}'")
    check_array_index(manifest, arrays, fail)
    for name, info in manifest["buffers"].items():
        if info.get("key") not in arrays or list(arrays[info["key"]].shape) != info.get("shape"):
            fail(f"buffer '{name}' does not match its array")
    quant = manifest["quant"]
    if quant.get("quant_type") not in QUANT_TYPES:
        fail(f"unknown quant_type {quant.get('quant_type')!r}")
    for name, entry in manifest["tensors"].items():
        for fname, key in entry.get("arrays", {}).items():
            if key not in arrays:
                fail(f"tensor '{name}' refers to missing array '{key}' ({fname})")
        if entry.get("tied_to") and entry["tied_to"] not in manifest["tensors"]:
            fail(f"tensor '{name}' is tied to unknown '{entry['tied_to']}'")
        if entry["role"] == "small":
            value = arrays[entry["arrays"]["value"]]
            if value.dtype.kind != "f" or value.ndim > 1 or value.size > quant["max_small_numel"]:
                fail(f"small tensor '{name}' is {value.dtype}{list(value.shape)}")
        elif entry["role"] not in ("linear", "embedding"):
            fail(f"tensor '{name}' has unknown role {entry['role']!r}")
        elif not entry.get("tied_to"):
            _validate_quantized_entry(name, entry, arrays, quant, fail)


def _validate_quantized_entry(name, entry, arrays, quant, fail) -> None:
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(
            isinstance(s, int) and s > 0 for s in shape)):
        fail(f"tensor '{name}' has invalid shape {shape!r}")
    numel = shape[0] * shape[1]
    a = {f: arrays[k] for f, k in entry["arrays"].items()}
    if entry.get("encoding") != quant["quant_type"]:
        fail(f"tensor '{name}' encoding {entry.get('encoding')!r} differs from the package's")
    if quant["quant_type"] == "int8":
        if a["cb"].dtype != np.int8 or list(a["cb"].shape) != shape:
            fail(f"tensor '{name}': int8 codes must be int8{shape}")
        if a["scb"].dtype != np.float32 or a["scb"].shape != (shape[0],):
            fail(f"tensor '{name}': row scales must be float32[{shape[0]}]")
        return
    q = entry.get("quant", {})
    bs = q.get("blocksize")
    if bs not in BLOCKSIZES_4BIT:
        fail(f"tensor '{name}' has invalid blocksize {bs!r}")
    nblocks = math.ceil(numel / bs)
    if a["data"].dtype != np.uint8 or a["data"].shape != ((numel + 1) // 2,):
        fail(f"tensor '{name}': packed codes must be uint8[{(numel + 1) // 2}]")
    if a["quant_map"].shape != (16,) or a["quant_map"].dtype != np.float32:
        fail(f"tensor '{name}': 4-bit code book must be float32[16]")
    if q.get("nested"):
        nested_bs = q.get("nested_blocksize")
        if nested_bs != _NESTED_BLOCKSIZE or not isinstance(q.get("nested_offset"), float):
            fail(f"tensor '{name}': invalid double-quantization fields")
        if a["absmax"].dtype != np.uint8 or a["absmax"].shape != (nblocks,):
            fail(f"tensor '{name}': absmax must be uint8[{nblocks}] with double quantization")
        n2 = math.ceil(nblocks / nested_bs)
        if a["nested_absmax"].dtype != np.float32 or a["nested_absmax"].shape != (n2,):
            fail(f"tensor '{name}': nested absmax must be float32[{n2}]")
        if a["nested_quant_map"].shape != (256,):
            fail(f"tensor '{name}': nested code book must have 256 entries")
    elif a["absmax"].dtype != np.float32 or a["absmax"].shape != (nblocks,):
        fail(f"tensor '{name}': absmax must be float32[{nblocks}]")


def package_dir(cache_dir: str | os.PathLike, content_hash: str, kind: str = "lpp-base") -> Path:
    """Where :func:`save_package` keeps the package with this hash under ``cache_dir``.

    ``kind`` names the package family (``"lpp-base"``; ``"split-parts"`` for
    :mod:`fedshield_flwr.models.parts`), one directory each.
    """
    if not (len(content_hash) == 64 and all(c in "0123456789abcdef" for c in content_hash)):
        raise PackageError(f"'{content_hash}' is not a sha256 hex digest")
    return Path(cache_dir) / kind / content_hash


def save_package(pkg, cache_dir: str | os.PathLike, kind: str = "lpp-base") -> Path:
    """Write ``pkg`` to ``cache_dir/<kind>/<hash>/package.safetensors`` atomically.

    ``pkg`` is a :class:`QuantizedBasePackage` or any package with ``manifest``, ``arrays``
    and ``content_hash`` (a split parts package). Safe to call from several processes at once:
    the directory appears complete or not at all. Returns the package directory.
    """
    from safetensors.numpy import save_file

    target = package_dir(cache_dir, pkg.content_hash, kind)
    if (target / "package.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{pkg.content_hash[:12]}.", dir=target.parent))
    try:
        arrays = {k: np.ascontiguousarray(v) for k, v in package_to_arrays(pkg).items()}
        save_file(arrays, str(tmp / "package.safetensors"),
                  metadata={"format": str(pkg.manifest["format"]),
                            "content_hash": pkg.content_hash})
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy has the same content
            if not (target / "package.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_package(path: str | os.PathLike, content_hash: str | None = None, reader=None):
    """Load and verify a package directory written by :func:`save_package`.

    The content is re-hashed on every load; it must equal ``content_hash`` when given, else the
    directory name. A mismatch raises :class:`PackageError` (delete the directory and fetch the
    package again). ``reader(arrays, expected_hash=, who=)`` validates the arrays; default
    :func:`package_from_arrays` (a quantized base).
    """
    reader = reader or package_from_arrays
    from safetensors.numpy import load_file

    path = Path(path)
    file = path / "package.safetensors"
    if not file.exists():
        raise PackageError(f"no cached package at {path}; ask the server to send it")
    expected = content_hash or path.name
    try:
        arrays = load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types on corruption
        raise PackageError(f"cached package {file} is unreadable ({exc}); delete {path}") from exc
    try:
        return reader(arrays, expected_hash=expected, who=f"disk cache {path}")
    except PackageError as exc:
        raise PackageError(f"{exc} (delete {path} to force a fresh download)") from exc


def cached_package(cache_dir: str | os.PathLike, content_hash: str, kind: str = "lpp-base",
                   reader=None):
    """The verified cached package with this hash, or ``None`` when it is not on disk."""
    target = package_dir(cache_dir, content_hash, kind)
    if not (target / "package.safetensors").exists():
        return None
    return load_package(target, content_hash, reader)


def load_or_build_package(
    model_name: str,
    spec: BaseQuantSpec | None = None,
    cache_dir: str | os.PathLike | None = None,
    include_tokenizer: bool = True,
) -> QuantizedBasePackage:
    """Server side: the package of ``model_name``, quantized once and then read from the cache.

    Quantizing a base takes a while on CPU (bitsandbytes has no CPU kernel for it: ~0.1 us per
    parameter, ~15-30 s for 135M), so the server keeps the package under
    ``<cache>/lpp-base/<hash>`` and an index ``<cache>/lpp-base/index/<key>`` mapping the model
    name, the spec and (for a local directory) its files' sizes and mtimes to the hash. A hub
    id is keyed by name only: clear the index if the hub weights change.
    """
    from .load import cache_root, load_base_model, load_tokenizer, resolve_model_path

    spec = spec or BaseQuantSpec()
    root = cache_root(cache_dir)
    path = resolve_model_path(model_name, root)
    fingerprint: list = []
    if Path(path).is_dir():
        fingerprint = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                             for f in Path(path).iterdir() if f.is_file())
    key = hashlib.sha256(canonical_json({
        "format": PACKAGE_FORMAT, "version": PACKAGE_VERSION, "model": model_name,
        "files": fingerprint, "spec": spec.__dict__, "tokenizer": include_tokenizer,
    })).hexdigest()
    index = root / "lpp-base" / "index" / key
    if index.exists():
        pkg = cached_package(root, index.read_text().strip())
        if pkg is not None:
            return pkg
    model = load_base_model(model_name, cache_dir=root)
    tokenizer = load_tokenizer(model_name, root) if include_tokenizer else None
    pkg = build_quantized_package(model, spec, tokenizer)
    save_package(pkg, root)
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_name(f".{key}.{os.getpid()}")
    tmp.write_text(pkg.content_hash)
    os.replace(tmp, index)
    return pkg


# --------------------------------------------------------------------------------------------
# silo side: rebuild a trainable model from the package alone
# --------------------------------------------------------------------------------------------


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
    return torch.from_numpy(np.ascontiguousarray(arr))


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


def config_from_manifest(pkg) -> tuple[Any, str]:
    """The transformers config a package's manifest describes, and its model type.

    Only architectures that transformers ships: a config asking for remote code is refused,
    so a silo never runs code sent by the server.
    """
    from transformers import AutoConfig

    cfg = dict(pkg.manifest["config"])
    model_type = cfg.pop("model_type", pkg.manifest["model_type"])
    cfg.pop("dtype", None)
    if cfg.get("auto_map") or cfg.get("trust_remote_code"):
        raise PackageError(f"package {pkg.content_hash[:12]} asks for remote code; a silo only "
                           "rebuilds architectures that transformers ships")
    try:
        return AutoConfig.for_model(model_type, **cfg), model_type
    except (KeyError, ValueError) as exc:
        raise PackageError(
            f"model_type '{model_type}' of package {pkg.content_hash[:12]} is unknown to "
            f"transformers here ({exc}); upgrade transformers on this silo"
        ) from exc


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


def package_tokenizer(pkg: QuantizedBasePackage):
    """The tokenizer shipped in the package (see ``build_quantized_package(tokenizer=...)``).

    Returns ``None`` when the package has no tokenizer files. Only JSON/text/sentencepiece
    files are accepted, never code; the pad token defaults to EOS as in ``load_tokenizer``.
    """
    from transformers import AutoTokenizer

    files = pkg.manifest.get("tokenizer_files") or []
    if not files:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        for fname in files:
            if Path(fname).name != fname or Path(fname).suffix not in _TOKENIZER_SUFFIXES:
                raise PackageError(f"package tokenizer file '{fname}' is not allowed")
            (Path(tmp) / fname).write_bytes(pkg.arrays[f"tokenizer:{fname}"].tobytes())
        tok = AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------------------------
# IP margin: what the server holds vs what a silo holds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossReport:
    """Token-weighted causal-LM loss over some batches."""

    loss: float
    perplexity: float
    tokens: int


@dataclass(frozen=True)
class IPMargin:
    """Quality of full base + full adapter (``full``) vs quantized base + k-bit adapter (``silo``).

    ``loss_gap = silo.loss - full.loss`` (nats per token) and ``perplexity_ratio`` = silo / full
    perplexity: the margin the server keeps over what any silo can reproduce.
    """

    full: LossReport
    silo: LossReport
    loss_gap: float = field(init=False)
    perplexity_ratio: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss_gap", self.silo.loss - self.full.loss)
        object.__setattr__(self, "perplexity_ratio", self.silo.perplexity / self.full.perplexity)

    def as_dict(self) -> dict[str, float]:
        return {"loss_full": self.full.loss, "loss_silo": self.silo.loss,
                "perplexity_full": self.full.perplexity, "perplexity_silo": self.silo.perplexity,
                "loss_gap": self.loss_gap, "perplexity_ratio": self.perplexity_ratio,
                "tokens": self.full.tokens}


@torch.no_grad()
def evaluate_lm_loss(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> LossReport:
    """Mean next-token cross-entropy over every label that is not ``-100``.

    Parameters
    ----------
    model : causal LM (plain, quantized or PEFT-wrapped)
        Called as ``model(input_ids=..., attention_mask=...)``; must return ``.logits``.
    batches : iterable of mappings
        Each with ``input_ids`` ``[B, T]``, optional ``attention_mask`` ``[B, T]`` and optional
        ``labels`` ``[B, T]`` (default: ``input_ids`` with padding masked out). Labels are
        un-shifted, as HF models take them.
    """
    from ..train import token_loss  # the silos' loss code (chunked head, labelled tokens only)

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            labels = batch.get("labels")
            if labels is None:
                labels = ids.masked_fill(mask == 0, -100) if mask is not None else ids
            with torch.no_grad():
                batch_total, n = token_loss(
                    model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
            total += float(batch_total)
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate_lm_loss: the batches hold no label tokens")
    loss = total / count
    return LossReport(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=count)


def ip_margin(
    full_model: nn.Module, silo_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
) -> IPMargin:
    """Evaluate both models on the same batches (``batches`` is iterated twice: pass a list).

    ``full_model`` is the server's full-precision base with the full-precision global adapter
    loaded; ``silo_model`` is :func:`build_model_from_package` with the de-quantized k-bit
    adapter (:func:`fedshield_flwr.models.adapter_quant.dequantize_adapter`) loaded.
    """
    batches = list(batches)
    return IPMargin(full=evaluate_lm_loss(full_model, batches),
                    silo=evaluate_lm_loss(silo_model, batches))
