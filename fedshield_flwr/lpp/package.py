"""The ``lpp`` base package as a silo receives it, and the server's build cache.

:func:`package_from_arrays` validates received arrays against the manifest (every tensor's
encoding, shape and quantization fields) before anything is rebuilt from them;
:func:`load_or_build_package` quantizes a model once per spec and reads it from the cache after.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedshield_flwr.lpp.quantize import (
    BLOCKSIZES_4BIT,
    NESTED_BLOCKSIZE,
    PACKAGE_FORMAT,
    PACKAGE_VERSION,
    QUANT_TYPES,
    BaseQuantSpec,
    QuantizedBasePackage,
    build_quantized_package,
)
from fedshield_flwr.packages import format as fmt
from fedshield_flwr.packages.format import (
    PackageError,
    canonical_json,
    check_array_index,
    verified_arrays,
)

LPP_KIND = "lpp-base"  # cache directory of quantized bases (``<cache>/lpp-base/<hash>``)


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
        if nested_bs != NESTED_BLOCKSIZE or not isinstance(q.get("nested_offset"), float):
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


def save_package(pkg: QuantizedBasePackage, cache_dir: str | os.PathLike) -> Path:
    """Write a quantized base under ``cache_dir/lpp-base/<hash>`` (see :func:`~fedshield_flwr.packages.format.save_package`)."""
    return fmt.save_package(pkg, cache_dir, LPP_KIND)


def load_package(path: str | os.PathLike, content_hash: str | None = None) -> QuantizedBasePackage:
    """Load and verify a quantized base directory written by :func:`save_package`."""
    return fmt.load_package(path, content_hash, package_from_arrays)


def cached_package(cache_dir: str | os.PathLike, content_hash: str) -> QuantizedBasePackage | None:
    """The verified cached quantized base with this hash, or ``None`` when it is not on disk."""
    return fmt.cached_package(cache_dir, content_hash, LPP_KIND, package_from_arrays)


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
    from fedshield_flwr.models.load import (
        cache_root,
        load_base_model,
        load_tokenizer,
        resolve_model_path,
    )

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
    index = root / LPP_KIND / "index" / key
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
