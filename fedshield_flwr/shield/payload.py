"""Wire format of shield payloads (silo update, server aggregate, silo snapshot) and validation.

One payload is one byte string; in Flower it travels as one uint8 ``Array`` inside an
``ArrayRecord`` (:func:`as_array` / :func:`decode_payload` accept the array directly)::

    offset 0       8 bytes   magic b"FSHIELD1"
    offset 8       4 bytes   big-endian uint32 H: length of the JSON header
    offset 12      H bytes   UTF-8 JSON header
    offset 12+H    body      c0 section: num_blocks x N coefficients, each the low
                             ``coeff_bytes`` bytes of a little-endian uint64 (< q)
                             seed section: parties x num_blocks x 65 bytes (SEAL PRNG type +
                             512-bit seed of c1); parties = len(silos)
    last 32 bytes            SHA-256 of everything before it (magic, length, header, body)

    header = {"format": "fedshield-shield-payload", "version": 1,
              "kind": "update" | "aggregate" | "snapshot",
              "key_id", "param_set", "round", "layout", "num_values", "total_blocks",
              "mask": hex bitmap of the sent blocks (bit i = block i, little-endian bit order),
              "num_blocks", "silos": [...], "weights": [...], "base_round", "prev_round",
              "body_bytes"}

Ciphertext ``j`` of the body is the block of the ``j``-th set bit of the mask. The digest
detects truncation and corruption anywhere (integrity against tampering is TLS's job). An
update has one silo and its weight; an aggregate lists every silo summed, their weights and one
seed row per silo; a snapshot is a silo's encryption of the whole global adapter (weight 1).
No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedshield_flwr.shield.errors import KeyMismatchError, PayloadError
from fedshield_flwr.shield.params import ShieldParams
from fedshield_flwr.shield.seal_backend import PRNG_TYPES, SEED_BYTES

PAYLOAD_MAGIC = b"FSHIELD1"
PAYLOAD_FORMAT = "fedshield-shield-payload"
PAYLOAD_VERSION = 1
KINDS = ("update", "aggregate", "snapshot")
MAX_HEADER_BYTES = 8 << 20
DIGEST_BYTES = 32


def as_array(data: bytes) -> np.ndarray:
    """A payload as a 1-D uint8 numpy array (zero-copy), ready for ``flwr.common.Array``."""
    return np.frombuffer(data, dtype=np.uint8)


def _as_bytes(data: Any) -> bytes | memoryview:
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, memoryview):
        return data.cast("B") if data.format != "B" else data
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise TypeError(f"expected a 1-D uint8 array, got {data.dtype} {data.shape}")
        return memoryview(np.ascontiguousarray(data)).cast("B")
    raise TypeError(f"expected bytes or a uint8 array, got {type(data).__name__}")


def mask_to_hex(blocks: np.ndarray, total_blocks: int) -> str:
    """Bitmap (little-endian bit order) of block indices, as hex."""
    bits = np.zeros(total_blocks, dtype=bool)
    bits[blocks] = True
    return np.packbits(bits, bitorder="little").tobytes().hex()


def hex_to_mask(text: str, total_blocks: int) -> np.ndarray:
    """Inverse of :func:`mask_to_hex`; raises ValueError on length or padding mismatch."""
    raw = bytes.fromhex(text)
    if len(raw) != -(-total_blocks // 8):
        raise ValueError("mask bitmap length does not match total_blocks")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    if bits[total_blocks:].any():
        raise ValueError("mask bitmap has bits beyond total_blocks")
    return np.flatnonzero(bits[:total_blocks]).astype(np.int64)


@dataclass(frozen=True)
class Payload:
    """A decoded shield payload: header fields plus the ciphertexts as arrays.

    Attributes
    ----------
    kind : str
        ``"update"`` (silo -> server), ``"aggregate"`` (server -> silos) or ``"snapshot"``.
    key_id, param_set : str
    round : int
        Server round the payload belongs to (for a snapshot: the global state after it).
    layout : str
        ``AdapterLayout.digest`` of the adapter.
    num_values, total_blocks : int
        Adapter size and its number of blocks.
    blocks : np.ndarray
        int64 indices of the blocks carried, increasing.
    c0 : np.ndarray
        uint64 ``(len(blocks), N)``: the ``c0`` polynomials (summed for an aggregate).
    seeds : np.ndarray
        uint8 ``(len(silos), len(blocks), 65)``: seeds of the ``c1`` polynomials.
    silos : tuple of str
        Sender of an update/snapshot; every silo summed into an aggregate.
    weights : tuple of float
        Aggregation weight of each silo (1.0 for a snapshot).
    base_round : int or None
        Update only: round of the global state the silo trained from.
    prev_round : int or None
        Aggregate only: round of the previous entry of the server's log (for catch-up checks).
    """

    kind: str
    key_id: str
    param_set: str
    round: int
    layout: str
    num_values: int
    total_blocks: int
    blocks: np.ndarray
    c0: np.ndarray
    seeds: np.ndarray
    silos: tuple[str, ...]
    weights: tuple[float, ...]
    base_round: int | None = None
    prev_round: int | None = None

    @property
    def total_weight(self) -> float:
        """Correctly rounded sum of the weights (independent of their order)."""
        return math.fsum(self.weights)

    @property
    def num_blocks(self) -> int:
        """Number of ciphertexts carried."""
        return int(self.blocks.size)

    def with_prev_round(self, prev_round: int) -> Payload:
        """Copy with ``prev_round`` set (the server log chains its entries)."""
        return replace(self, prev_round=prev_round)

    def header(self, body_bytes: int) -> dict[str, Any]:
        """The JSON header of this payload."""
        return {
            "format": PAYLOAD_FORMAT,
            "version": PAYLOAD_VERSION,
            "kind": self.kind,
            "key_id": self.key_id,
            "param_set": self.param_set,
            "round": int(self.round),
            "layout": self.layout,
            "num_values": int(self.num_values),
            "total_blocks": int(self.total_blocks),
            "mask": mask_to_hex(self.blocks, self.total_blocks),
            "num_blocks": self.num_blocks,
            "silos": list(self.silos),
            "weights": [float(w) for w in self.weights],
            "base_round": self.base_round,
            "prev_round": self.prev_round,
            "body_bytes": body_bytes,
        }

    def to_bytes(self, params: ShieldParams) -> bytes:
        """Encode (format in the module docstring)."""
        cb = params.coeff_bytes
        c0 = np.ascontiguousarray(self.c0, dtype="<u8").view(np.uint8)
        c0 = c0.reshape(self.num_blocks, params.poly_modulus_degree, 8)[:, :, :cb]
        body = np.ascontiguousarray(c0).tobytes() + np.ascontiguousarray(self.seeds).tobytes()
        header = json.dumps(self.header(len(body))).encode()
        frame = PAYLOAD_MAGIC + struct.pack(">I", len(header)) + header + body
        return frame + hashlib.sha256(frame).digest()


def _party(sender: str | None) -> str:
    return "the server" if sender is None else f"silo {sender}"


def decode_payload(
    data: Any,
    *,
    params: ShieldParams,
    key_id: str,
    modulus: int,
    kinds: tuple[str, ...],
    sender: str | None,
    expected_round: int | None = None,
) -> Payload:
    """Parse and validate one payload completely (nothing is trusted before this returns).

    Parameters
    ----------
    data : bytes or 1-D uint8 np.ndarray
    params, key_id, modulus
        Of the receiver's keyset.
    kinds : tuple of str
        Accepted payload kinds.
    sender : str or None
        Who sent it (silo id, or None for the server); used in error messages.
    expected_round : int, optional
        Refuse a payload of any other round.

    Raises
    ------
    KeyMismatchError
        The payload was made with another keyset.
    PayloadError
        Anything else; the message names the sender, the round and a remedy.
    """
    party = _party(sender)
    rnd = expected_round

    def fail(reason: str, remedy: str, cls: type[PayloadError] = PayloadError) -> PayloadError:
        where = f" in round {rnd}" if rnd is not None else ""
        return cls(f"{party} sent an invalid shield payload{where}: {reason}; {remedy}",
                   silo=sender, round=rnd)

    resend = "the payload was damaged in transit or by the sender; ask it to resend"
    # after the digest matched, an inconsistency is the sender's fault, not the network's
    broken = ("the sender built an inconsistent payload; run the same fedshield-flwr version "
              "everywhere")
    try:
        buf = _as_bytes(data)
    except TypeError as exc:
        raise fail(str(exc), "send the payload as bytes or a uint8 Array") from exc
    if len(buf) < 12 or bytes(buf[:8]) != PAYLOAD_MAGIC:
        raise fail("not a shield payload (bad magic or shorter than 12 bytes)",
                   "check that the sender runs strategy 'shield' with the same version")
    (hlen,) = struct.unpack(">I", bytes(buf[8:12]))
    if hlen > MAX_HEADER_BYTES or 12 + hlen + DIGEST_BYTES > len(buf):
        raise fail(f"truncated header ({len(buf)} bytes in all, header claims {hlen})", resend)
    try:
        header = json.loads(bytes(buf[12 : 12 + hlen]).decode())
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise fail(f"garbled header ({exc})", resend) from exc

    def field(name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
        value = header.get(name)
        if value is None and optional:
            return None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise fail(f"header field '{name}' is missing or has the wrong type", broken)
        return value

    declared = header.get("body_bytes")
    if isinstance(declared, int) and 12 + hlen + declared + DIGEST_BYTES != len(buf):
        state = "truncated" if len(buf) < 12 + hlen + declared + DIGEST_BYTES else "too long"
        raise fail(f"payload is {state}: {len(buf)} bytes, the header announces "
                   f"{12 + hlen + declared + DIGEST_BYTES}", resend)
    if hashlib.sha256(buf[:-DIGEST_BYTES]).digest() != bytes(buf[-DIGEST_BYTES:]):
        raise fail("garbled bytes (SHA-256 mismatch)", resend)
    if header.get("format") != PAYLOAD_FORMAT or header.get("version") != PAYLOAD_VERSION:
        raise fail(f"unsupported format {header.get('format')!r} v{header.get('version')!r}",
                   "run the same fedshield-flwr version on the server and all silos")
    rnd = field("round", int)
    if expected_round is not None and rnd != expected_round:
        got = rnd
        rnd = expected_round
        raise fail(f"it is for round {got} (stale or replayed)",
                   "ignore it; the silo must answer the round it was asked for")
    kind = field("kind", str)
    if kind not in kinds:
        raise fail(f"kind {kind!r} where {' or '.join(kinds)} was expected",
                   "check the message routing of the strategy")
    if field("key_id", str) != key_id:
        raise fail(
            f"it was encrypted under key id {header['key_id']} but this party holds key id "
            f"{key_id}",
            "give every silo the silo keyset generated together with the server keyset "
            "(`fedshield keys init`)",
            KeyMismatchError,
        )
    if field("param_set", str) != params.param_set_id:
        raise fail(f"parameter set {header['param_set']} but the keyset uses "
                   f"{params.param_set_id}", "use one keyset for the whole federation")
    layout = field("layout", str)
    num_values = field("num_values", int)
    total_blocks = field("total_blocks", int)
    num_blocks = field("num_blocks", int)
    n = params.poly_modulus_degree
    if num_values < 1 or total_blocks != -(-num_values // n) or not 0 <= num_blocks <= total_blocks:
        raise fail(f"inconsistent sizes ({num_values} values, {total_blocks} blocks, "
                   f"{num_blocks} sent)", broken)
    try:
        blocks = hex_to_mask(field("mask", str), total_blocks)
    except ValueError as exc:
        raise fail(f"garbled block mask ({exc})", broken) from exc
    if blocks.size != num_blocks:
        raise fail(f"{num_blocks} ciphertexts declared for a {blocks.size}-block mask", broken)
    silos = field("silos", list)
    weights = field("weights", list)
    if (not silos or len(silos) != len(weights)
            or not all(isinstance(s, str) for s in silos)
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)
            or len(set(silos)) != len(silos)):
        raise fail("malformed silos/weights lists", broken)
    weights = [float(w) for w in weights]
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise fail(f"aggregation weights {weights} are not all finite and positive",
                   "pass a positive weight (e.g. number of examples) to encrypt_update")
    if kind != "aggregate" and len(silos) != 1:
        raise fail(f"a {kind} must come from exactly one silo", broken)
    base_round = field("base_round", int, optional=True)
    prev_round = field("prev_round", int, optional=True)

    parties = len(silos)
    cb = params.coeff_bytes
    c0_bytes = num_blocks * n * cb
    expected_body = c0_bytes + parties * num_blocks * SEED_BYTES
    body = buf[12 + hlen : len(buf) - DIGEST_BYTES]
    if field("body_bytes", int) != expected_body:
        raise fail(f"header declares {header['body_bytes']} body bytes but {num_blocks} "
                   f"ciphertexts need {expected_body}",
                   "check that all silos run the same model and keyset")

    raw = np.frombuffer(body, dtype=np.uint8)
    words = np.zeros((num_blocks, n, 8), dtype=np.uint8)
    words[:, :, :cb] = raw[:c0_bytes].reshape(num_blocks, n, cb)
    c0 = words.view("<u8").reshape(num_blocks, n)
    if num_blocks and int(c0.max()) >= modulus:
        raise fail("ciphertext coefficient out of range (>= q)", broken)
    seeds = raw[c0_bytes:].reshape(parties, num_blocks, SEED_BYTES).copy()
    if num_blocks and not np.isin(seeds[:, :, 0], PRNG_TYPES).all():
        raise fail("unknown PRNG type in a ciphertext seed", broken)
    return Payload(
        kind=kind, key_id=key_id, param_set=params.param_set_id, round=rnd, layout=layout,
        num_values=num_values, total_blocks=total_blocks, blocks=blocks, c0=c0, seeds=seeds,
        silos=tuple(silos), weights=tuple(weights), base_round=base_round, prev_round=prev_round,
    )
