"""Shield keysets: a silo keyset (holds the CKKS secret key) and a server keyset (public only).

The two are different types and :class:`ServerKeyset` has no field that could hold a secret
key, so a server process cannot decrypt by construction: it is never handed key material that
could. Both serialize to the same documented, pickle-free file format::

    offset 0       8 bytes   magic b"FSKEYSET"
    offset 8       4 bytes   big-endian uint32 H: length of the JSON header
    offset 12      H bytes   UTF-8 JSON header (see below)
    offset 12+H    rest      a TenSEAL context: protobuf ``TenSEALContextProto`` whose fields hold
                             SEAL's own serialization of the encryption parameters, the public
                             key and (silo file only) the secret key

    header = {"format": "fedshield-shield-keyset", "version": 1, "kind": "silo" | "server",
              "key_id": "<32 hex>", "params": {...ShieldParams...}, "param_set": "ckks-...",
              "modulus": q, "context_bytes": len, "context_sha256": "<hex>"}

The key id is the first 128 bits of SHA-256 over the public TenSEAL context (parameters and
public key); every payload carries it. Loading a server keyset checks with TenSEAL that the
context is not private; loading a silo keyset checks that its public key belongs to its secret
key. ``ts.context_from(context_bytes)`` opens either context with plain TenSEAL.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from fedshield_flwr.shield import _proto
from fedshield_flwr.shield.errors import KeysetError
from fedshield_flwr.shield.params import ShieldParams
from fedshield_flwr.shield.seal_backend import (
    EncryptionPool,
    SealEngine,
    check_public_parameters,
    generate_key_material,
)

KEYSET_MAGIC = b"FSKEYSET"
KEYSET_FORMAT = "fedshield-shield-keyset"
KEYSET_VERSION = 1
SILO_KEY_FILE = "shield-silo.key"
SERVER_KEY_FILE = "shield-server.key"
_MAX_HEADER = 1 << 16
_MASK_DOMAIN = b"fedshield-shield-mask-v1"


def _public_context(parms: bytes, public_key: bytes, scale: float) -> bytes:
    public = _proto.field_bytes(_proto.PUB_PUBLIC_KEY, public_key) + _proto.field_double(
        _proto.PUB_SCALE, scale
    )
    return _proto.field_bytes(_proto.CTX_ENCRYPTION_PARAMETERS, parms) + _proto.field_bytes(
        _proto.CTX_PUBLIC, public
    )


def _key_id(public_context: bytes) -> str:
    return hashlib.sha256(public_context).hexdigest()[:32]


@dataclass(frozen=True)
class _ContextParts:
    parms: bytes
    public_key: bytes
    public_message: bytes
    secret_key: bytes | None

    @property
    def public_context(self) -> bytes:
        return _proto.field_bytes(_proto.CTX_ENCRYPTION_PARAMETERS, self.parms) + (
            _proto.field_bytes(_proto.CTX_PUBLIC, self.public_message)
        )


def _split_context(context: bytes, where: str) -> _ContextParts:
    try:
        fields = _proto.parse_fields(context)
        (parms,) = fields.get(_proto.CTX_ENCRYPTION_PARAMETERS, [None])
        (public_message,) = fields.get(_proto.CTX_PUBLIC, [None])
        (enc_type,) = fields.get(_proto.CTX_ENCRYPTION_TYPE, [_proto.ENCRYPTION_TYPE_ASYMMETRIC])
        private = fields.get(_proto.CTX_PRIVATE, [])
        if not isinstance(parms, bytes) or not isinstance(public_message, bytes):
            raise ValueError("missing encryption parameters or public part")
        if enc_type != _proto.ENCRYPTION_TYPE_ASYMMETRIC or len(private) > 1:
            raise ValueError("unexpected encryption type or repeated private part")
        (public_key,) = _proto.parse_fields(public_message).get(_proto.PUB_PUBLIC_KEY, [None])
        if not isinstance(public_key, bytes):
            raise ValueError("missing public key")
        secret_key = None
        if private:
            (secret_key,) = _proto.parse_fields(private[0]).get(_proto.PRIV_SECRET_KEY, [None])
            if not isinstance(secret_key, bytes) or not secret_key:
                raise ValueError("private part without a secret key")
    except (ValueError, TypeError) as exc:
        raise KeysetError(f"{where}: malformed TenSEAL context ({exc})") from exc
    return _ContextParts(parms, public_key, public_message, secret_key)


def _tenseal_is_private(context: bytes, where: str) -> bool:
    import tenseal as ts

    try:
        return ts.context_from(context, n_threads=1).is_private()
    except Exception as exc:  # TenSEAL raises plain ValueError/RuntimeError
        raise KeysetError(f"{where}: TenSEAL cannot load the context ({exc})") from exc


def _encode_file(kind: str, key_id: str, params: ShieldParams, modulus: int,
                 context: bytes) -> bytes:
    header = {
        "format": KEYSET_FORMAT,
        "version": KEYSET_VERSION,
        "kind": kind,
        "key_id": key_id,
        "params": params.to_dict(),
        "param_set": params.param_set_id,
        "modulus": modulus,
        "context_bytes": len(context),
        "context_sha256": hashlib.sha256(context).hexdigest(),
    }
    raw = json.dumps(header, sort_keys=True).encode()
    return KEYSET_MAGIC + struct.pack(">I", len(raw)) + raw + context


def _decode_file(data: bytes, expected_kind: str, where: str) -> tuple[dict[str, Any], bytes]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise KeysetError(f"{where}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 12 or data[:8] != KEYSET_MAGIC:
        raise KeysetError(f"{where}: not a fedshield keyset file (bad magic)")
    (hlen,) = struct.unpack(">I", data[8:12])
    if hlen > _MAX_HEADER or 12 + hlen > len(data):
        raise KeysetError(f"{where}: truncated or corrupt keyset header")
    try:
        header = json.loads(data[12 : 12 + hlen].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeysetError(f"{where}: keyset header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != KEYSET_FORMAT:
        raise KeysetError(f"{where}: not a fedshield shield keyset")
    if header.get("version") != KEYSET_VERSION:
        raise KeysetError(
            f"{where}: keyset format version {header.get('version')} is not supported "
            f"(this library reads version {KEYSET_VERSION})"
        )
    kind = header.get("kind")
    if kind != expected_kind:
        hint = (
            "the server must be given the server keyset (shield-server.key), never the silo one"
            if expected_kind == "server"
            else "silos need the silo keyset (shield-silo.key); the server keyset cannot decrypt"
        )
        raise KeysetError(f"{where}: this is a {kind!r} keyset, expected {expected_kind!r}; {hint}")
    context = data[12 + hlen :]
    if len(context) != header.get("context_bytes") or (
        hashlib.sha256(context).hexdigest() != header.get("context_sha256")
    ):
        raise KeysetError(f"{where}: keyset file is truncated or corrupt (context digest)")
    return header, context


def _common_checks(header: dict[str, Any], parts: _ContextParts, where: str) -> ShieldParams:
    params = ShieldParams.from_dict(header.get("params") or {})
    if header.get("param_set") != params.param_set_id:
        raise KeysetError(f"{where}: param_set does not match the parameters")
    modulus = check_public_parameters(params, parts.parms)
    if modulus != header.get("modulus"):
        raise KeysetError(f"{where}: modulus in header does not match the SEAL parameters")
    if _key_id(parts.public_context) != header.get("key_id"):
        raise KeysetError(f"{where}: key id does not match the public context (corrupt file)")
    return params


def _write_file(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic and fails if the file appeared meanwhile
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass(frozen=True)
class ServerKeyset:
    """Public material of a shield keyset: what the server holds. It has no secret key field.

    Attributes
    ----------
    key_id : str
        128-bit hex id of the public context; payloads must carry the same id.
    params : ShieldParams
    modulus : int
        The data prime ``q`` (the server adds ciphertext coefficients mod ``q``).
    context : bytes
        Public TenSEAL context (encryption parameters + public key).
    """

    key_id: str
    params: ShieldParams
    modulus: int
    context: bytes = field(repr=False)

    def __reduce__(self):
        return (type(self), (self.key_id, self.params, self.modulus, self.context))

    def to_bytes(self) -> bytes:
        """The keyset file content (format in the module docstring)."""
        return _encode_file("server", self.key_id, self.params, self.modulus, self.context)

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "server keyset") -> ServerKeyset:
        """Parse and verify a server keyset; refuses any context that contains a secret key."""
        header, context = _decode_file(data, "server", source)
        parts = _split_context(context, source)
        if parts.secret_key is not None or _tenseal_is_private(context, source):
            raise KeysetError(
                f"{source}: the server keyset contains a secret key; the server must only hold "
                "public material - regenerate the pair with `fedshield keys init` and copy "
                "only shield-server.key to the server"
            )
        params = _common_checks(header, parts, source)
        return cls(key_id=header["key_id"], params=params, modulus=header["modulus"],
                   context=context)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the keyset file; refuses to replace an existing file unless ``overwrite``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(_exists_message([path]))
        _write_file(path, self.to_bytes(), 0o644, overwrite)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ServerKeyset:
        """Read and verify a server keyset file."""
        return cls.from_bytes(_read(path), source=f"server keyset {path}")


@dataclass(frozen=True)
class SiloKeyset:
    """A silo's shield keyset: parameters, public key and the shared CKKS secret key.

    Attributes
    ----------
    key_id : str
    params : ShieldParams
    modulus : int
    context : bytes
        Private TenSEAL context (encryption parameters, public key, secret key). Not shown in
        ``repr``.
    """

    key_id: str
    params: ShieldParams
    modulus: int
    context: bytes = field(repr=False)

    @cached_property
    def _parts(self) -> _ContextParts:
        return _split_context(self.context, "silo keyset")

    @cached_property
    def engine(self) -> SealEngine:
        """SEAL encoder/encryptor/decryptor for this process (built on first use)."""
        parts = self._parts
        assert parts.secret_key is not None
        return SealEngine(self.params, parts.parms, parts.secret_key, parts.public_key)

    @cached_property
    def mask_secret(self) -> bytes:
        """32-byte secret shared by all silos (derived from the secret key) that seeds masks."""
        assert self._parts.secret_key is not None
        return hashlib.sha256(_MASK_DOMAIN + self._parts.secret_key).digest()

    def public(self) -> ServerKeyset:
        """The matching server keyset (public context only)."""
        parts = self._parts
        return ServerKeyset(key_id=self.key_id, params=self.params, modulus=self.modulus,
                            context=parts.public_context)

    def encryption_pool(self, workers: int = 2, start_method: str | None = None
                        ) -> EncryptionPool:
        """Worker processes for parallel encryption (see :class:`EncryptionPool`)."""
        parts = self._parts
        assert parts.secret_key is not None
        return EncryptionPool(self.params, parts.parms, parts.secret_key, workers, start_method)

    def __reduce__(self):
        # in-process copies only (e.g. simulation actors); SEAL objects are rebuilt lazily
        return (type(self), (self.key_id, self.params, self.modulus, self.context))

    def to_bytes(self) -> bytes:
        """The keyset file content (format in the module docstring)."""
        return _encode_file("silo", self.key_id, self.params, self.modulus, self.context)

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "silo keyset") -> SiloKeyset:
        """Parse and verify a silo keyset (the public key must match the secret key)."""
        header, context = _decode_file(data, "silo", source)
        parts = _split_context(context, source)
        if parts.secret_key is None or not _tenseal_is_private(context, source):
            raise KeysetError(f"{source}: the silo keyset has no secret key; it cannot decrypt")
        params = _common_checks(header, parts, source)
        keyset = cls(key_id=header["key_id"], params=params, modulus=header["modulus"],
                     context=context)
        keyset.engine  # noqa: B018 - builds SEAL objects and checks public key <-> secret key
        return keyset

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the keyset file (mode 0600); refuses to replace a file unless ``overwrite``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(_exists_message([path]))
        _write_file(path, self.to_bytes(), 0o600, overwrite)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SiloKeyset:
        """Read and verify a silo keyset file."""
        return cls.from_bytes(_read(path), source=f"silo keyset {path}")


def _read(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise KeysetError(
            f"keyset file {path} not found; create one with `fedshield keys init --out DIR`"
        ) from exc


def _exists_message(paths: list[Path]) -> str:
    names = ", ".join(str(p) for p in paths)
    return (
        f"refusing to overwrite existing keyset file(s) {names}: replacing a keyset makes "
        "every ciphertext and server checkpoint made with it undecryptable; choose another "
        "directory or pass overwrite=True (`--force`)"
    )


def generate_keyset(params: ShieldParams | None = None) -> tuple[SiloKeyset, ServerKeyset]:
    """Generate a fresh keyset in memory (simulation provisions keys this way).

    Parameters
    ----------
    params : ShieldParams, optional
        Defaults to ``ShieldParams()`` (N=2048, one 54-bit prime, scale 2**34).

    Returns
    -------
    (SiloKeyset, ServerKeyset)
        The silo keyset (give it to every silo) and its public half (give it to the server).
    """
    params = params or ShieldParams()
    material = generate_key_material(params)
    public_context = _public_context(material.parms, material.public_key, params.scale)
    private = _proto.field_bytes(_proto.PRIV_SECRET_KEY, material.secret_key)
    silo_context = public_context + _proto.field_bytes(_proto.CTX_PRIVATE, private)
    key_id = _key_id(public_context)
    silo = SiloKeyset(key_id=key_id, params=params, modulus=material.modulus,
                      context=silo_context)
    server = ServerKeyset(key_id=key_id, params=params, modulus=material.modulus,
                          context=public_context)
    return silo, server


def write_keyset_files(
    out_dir: str | os.PathLike,
    params: ShieldParams | None = None,
    *,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Generate a keyset and write ``shield-silo.key`` and ``shield-server.key`` to ``out_dir``.

    This is what ``fedshield keys init --out DIR`` calls. The silo file is written with mode
    0600. Copy the silo file to every silo and only the server file to the server.

    Parameters
    ----------
    out_dir : path
        Created if missing.
    params : ShieldParams, optional
    overwrite : bool, default False
        Without it, existing files are never replaced (``FileExistsError``).

    Returns
    -------
    (silo_path, server_path)
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    silo_path, server_path = out / SILO_KEY_FILE, out / SERVER_KEY_FILE
    existing = [p for p in (silo_path, server_path) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(_exists_message(existing))
    silo, server = generate_keyset(params)
    silo.save(silo_path, overwrite=overwrite)
    server.save(server_path, overwrite=overwrite)
    return silo_path, server_path
