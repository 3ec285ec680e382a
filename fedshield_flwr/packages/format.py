"""Content-hashed packages: the format every package kind shares (lpp's base, split's parts).

A package is a JSON manifest plus named numpy arrays, identified by a SHA-256 over both. It
travels as one Flower ``ArrayRecord`` (the manifest as a ``uint8`` array under
:data:`MANIFEST_KEY`) and is kept on disk as one safetensors file per hash. A receiver accepts only
numeric dtypes, checks every array against the manifest's index and re-hashes on every load.
Nothing here uses pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class PackageError(ValueError):
    """A package (lpp's quantized base, split's silo parts) is malformed, tampered with, or
    cannot be built or rebuilt."""


MANIFEST_KEY = "__manifest__"


_ALLOWED_DTYPES = {"uint8", "int8", "int16", "int32", "int64", "bool", "float16", "float32"}


# Every content hash starts with this domain string. It names lpp's first package format, which
# split's parts share; changing it would invalidate every cached package.
HASH_DOMAIN = "fedshield-lpp-base/1"


class Package(Protocol):
    """What every package kind has: a JSON manifest, numpy arrays and their content hash."""

    manifest: Mapping[str, Any]
    arrays: Mapping[str, np.ndarray]
    content_hash: str


# ``reader(arrays, expected_hash=, who=)``: validates received arrays into a package of one kind.
Reader = Callable[..., Any]


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON encoding used for hashing and for the wire (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def compute_content_hash(manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) over the canonical manifest and every array's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(f"{HASH_DOMAIN}\0".encode())
    h.update(canonical_json(manifest))
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        h.update(f"\0{key}\0{arr.dtype.str}\0{list(arr.shape)}\0".encode())
        h.update(arr.reshape(-1).view(np.uint8))
    return h.hexdigest()


def package_to_arrays(pkg: Package) -> dict[str, np.ndarray]:
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


def _restore_shapes(manifest: Any, body: OrderedDict) -> OrderedDict:
    """Give each array the manifest's shape where only the shape differs, not the dtype nor the
    element count (a 0-dim buffer comes back as ``[1]`` from some transports); the content hash
    still covers every byte, and a real mismatch is left for the validator to refuse."""
    index = manifest.get("array_index") if isinstance(manifest, dict) else None
    if not isinstance(index, dict):
        return body
    for key, arr in body.items():
        info = index.get(key)
        shape = info.get("shape") if isinstance(info, dict) else None
        if (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and list(arr.shape) != shape and str(arr.dtype) == info.get("dtype")
                and arr.size == int(np.prod(shape, dtype=np.int64))):
            body[key] = arr.reshape(shape)
    return body


def verified_arrays(arrays: Mapping[str, np.ndarray], expected_hash: str | None, who: str,
                    validate) -> tuple[Any, OrderedDict, str]:
    """Manifest, arrays and content hash of a received package, after ``validate(manifest,
    arrays, who)`` accepted them and the hash matched ``expected_hash`` (when given)."""
    manifest, body = read_manifest(arrays, who)
    body = _restore_shapes(manifest, body)
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


def package_dir(cache_dir: str | os.PathLike, content_hash: str, kind: str) -> Path:
    """Where :func:`save_package` keeps the package with this hash under ``cache_dir``.

    ``kind`` names the package family (``"lpp-base"`` for :mod:`fedshield_flwr.lpp.package`,
    ``"split-parts"`` for :mod:`fedshield_flwr.split.parts`), one directory each.
    """
    if not (len(content_hash) == 64 and all(c in "0123456789abcdef" for c in content_hash)):
        raise PackageError(f"'{content_hash}' is not a sha256 hex digest")
    return Path(cache_dir) / kind / content_hash


def save_package(pkg: Package, cache_dir: str | os.PathLike, kind: str) -> Path:
    """Write ``pkg`` to ``cache_dir/<kind>/<hash>/package.safetensors`` atomically.

    ``pkg`` is any :class:`Package` (lpp's quantized base, split's parts). Safe to call from several processes at once:
    the directory appears complete or not at all. Returns the package directory.
    """
    from safetensors.numpy import save_file

    target = package_dir(cache_dir, pkg.content_hash, kind)
    if (target / "package.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{pkg.content_hash[:12]}.", dir=target.parent))
    try:
        arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in package_to_arrays(pkg).items()}
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


def load_package(path: str | os.PathLike, content_hash: str | None, reader: Reader):
    """Load and verify a package directory written by :func:`save_package`.

    The content is re-hashed on every load; it must equal ``content_hash`` when given, else the
    directory name. A mismatch raises :class:`PackageError` (delete the directory and fetch the
    package again). ``reader(arrays, expected_hash=, who=)`` validates the arrays (the kind's
    own ``package_from_arrays``).
    """
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


def cached_package(cache_dir: str | os.PathLike, content_hash: str, kind: str, reader: Reader):
    """The verified cached package with this hash, or ``None`` when it is not on disk."""
    target = package_dir(cache_dir, content_hash, kind)
    if not (target / "package.safetensors").exists():
        return None
    return load_package(target, content_hash, reader)
