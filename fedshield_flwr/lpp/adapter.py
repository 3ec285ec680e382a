"""k-bit global adapter for ``lpp`` mode, and the server's per-round math on adapters.

In ``lpp`` the server keeps the full-precision global LoRA adapter and sends silos only a k-bit
copy: each tensor is flattened, cut into blocks of ``blocksize`` values, scaled by the block's
absolute maximum (kept as fp32) and rounded to the nearest level of a NormalFloat-style code
book of ``2**bits`` levels (QLoRA's NF construction generalized to 2, 3, 4 and 8 bits; exact
zero is a level, so a zero-initialized ``lora_B`` survives). The level indices are bit-packed
into ``uint8`` (3-bit codes pack 8 values into 3 bytes), so the payload is really
``bits + 32 / blocksize`` bits per value.

Server round, with ``fp`` the full-precision adapter::

    sent = quantize_adapter(fp, spec)                       # -> silos, as adapter_to_arrays(sent)
    base = dequantize_adapter(sent)                         # what every silo starts from
    for each reply: validate_silo_adapter(fp, reply, silo, rnd)
    fp = lpp_server_update(fp, base, replies, weights, server_lr)

so the quantization error of what was sent never accumulates into ``fp``: the server moves
``fp`` by the silos' mean progress *relative to what they received*.

All functions are pure numpy; nothing here uses pickle.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from fedshield_flwr.models.lora import AdapterMismatchError, check_adapter_state

SUPPORTED_BITS = (2, 3, 4, 8)
ADAPTER_FORMAT = "fedshield-lpp-adapter"
ADAPTER_VERSION = 1
ADAPTER_MANIFEST_KEY = "__adapter_manifest__"


class AdapterQuantError(ValueError):
    """A k-bit adapter is malformed or its parameters are unsupported."""


@dataclass(frozen=True)
class AdapterQuantSpec:
    """How the global adapter is quantized for silos.

    Parameters
    ----------
    bits : int, default 4
        Bits per value: 2, 3, 4 or 8.
    blocksize : int, default 64
        Values per block sharing one fp32 absmax (adds ``32 / blocksize`` bits per value).
    """

    bits: int = 4
    blocksize: int = 64

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise AdapterQuantError(f"adapter bits={self.bits}: use one of {SUPPORTED_BITS}")
        if self.blocksize < 1:
            raise AdapterQuantError(f"adapter blocksize={self.blocksize}: must be >= 1")


# --------------------------------------------------------------------------------------------
# code book and bit packing
# --------------------------------------------------------------------------------------------


@cache
def _codebook(bits: int) -> np.ndarray:
    # QLoRA's create_normal_map generalized: 2**(b-1) positive and 2**(b-1)-1 negative normal
    # quantiles, plus an exact zero, scaled to [-1, 1]. The offset puts the outermost level at
    # the midpoint between the last quantiles of a 2**b and a (2**b - 1) level grid, exactly as
    # the NF4 offset 0.9677 does for 16 levels.
    n = 2**bits
    offset = 1.0 - 0.5 * (1.0 / (2 * (n - 1)) + 1.0 / (2 * n))
    ppf = statistics.NormalDist().inv_cdf
    pos = [ppf(p) for p in np.linspace(offset, 0.5, n // 2 + 1)[:-1]]
    neg = [-ppf(p) for p in np.linspace(offset, 0.5, n // 2)[:-1]]
    levels = np.sort(np.array(pos + [0.0] + neg, dtype=np.float64))
    levels /= levels.max()
    out = levels.astype(np.float32)
    out.setflags(write=False)
    return out


def normal_float_codebook(bits: int) -> np.ndarray:
    """The ``2**bits`` sorted levels in ``[-1, 1]`` (``-1``, ``0`` and ``1`` included), float32."""
    if bits not in SUPPORTED_BITS:
        raise AdapterQuantError(f"adapter bits={bits}: use one of {SUPPORTED_BITS}")
    return _codebook(bits)


def codebook_half_gap(bits: int) -> float:
    """Largest rounding error of the code book on ``[-1, 1]``: half its widest level gap."""
    return float(np.max(np.diff(normal_float_codebook(bits).astype(np.float64))) / 2.0)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes ``< 2**bits`` into ``ceil(len * bits / 8)`` bytes, MSB first."""
    codes = np.asarray(codes).reshape(-1)
    if codes.size and int(codes.max()) >= 2**bits:
        raise AdapterQuantError(f"code {int(codes.max())} does not fit in {bits} bits")
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes.copy()
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
    planes = (codes[:, None] >> shifts) & np.uint8(1)
    return np.packbits(planes.reshape(-1))


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as ``uint8``."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != math.ceil(count * bits / 8):
        raise AdapterQuantError(
            f"{packed.size} packed bytes cannot hold exactly {count} {bits}-bit codes")
    if bits == 8:
        return packed.copy()
    planes = np.unpackbits(packed, count=count * bits).reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint8)
    return (planes * weights).sum(axis=1, dtype=np.uint16).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# tensors and adapters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedTensor:
    """One k-bit tensor: packed codes, per-block fp32 absmax and the original shape."""

    packed: np.ndarray  # uint8[ceil(numel * bits / 8)]
    absmax: np.ndarray  # float32[ceil(numel / blocksize)]
    shape: tuple[int, ...]
    bits: int
    blocksize: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes + self.absmax.nbytes)


def quantize_tensor(x: np.ndarray, bits: int, blocksize: int = 64) -> QuantizedTensor:
    """Blockwise absmax NormalFloat quantization of ``x`` to ``bits`` bits per value."""
    AdapterQuantSpec(bits, blocksize)  # validates
    x = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise AdapterQuantError("cannot quantize a tensor with NaN or Inf")
    flat = x.reshape(-1)
    nblocks = math.ceil(flat.size / blocksize)
    padded = np.zeros(nblocks * blocksize, dtype=np.float32)
    padded[: flat.size] = flat
    blocks = padded.reshape(nblocks, blocksize)
    absmax = np.abs(blocks).max(axis=1) if nblocks else np.zeros(0, np.float32)
    scale = np.where(absmax > 0, absmax, np.float32(1.0))
    normed = np.clip(blocks / scale[:, None], -1.0, 1.0)
    levels = normal_float_codebook(bits)
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = np.searchsorted(midpoints, normed.reshape(-1)[: flat.size])
    return QuantizedTensor(pack_bits(codes, bits), absmax.astype(np.float32), tuple(x.shape),
                           bits, blocksize)


def dequantize_tensor(q: QuantizedTensor) -> np.ndarray:
    """The float32 tensor that ``q`` encodes."""
    n = q.numel
    codes = unpack_bits(q.packed, q.bits, n)
    values = normal_float_codebook(q.bits)[codes]
    scale = np.repeat(q.absmax, q.blocksize)[:n]
    return (values * scale).astype(np.float32).reshape(q.shape)


def max_abs_error_bound(q: QuantizedTensor) -> np.ndarray:
    """Per-element bound on ``|x - dequantize(q)|``: block absmax times the code book half gap
    (plus float32 rounding slack)."""
    scale = np.repeat(q.absmax.astype(np.float64), q.blocksize)[: q.numel]
    return (scale * codebook_half_gap(q.bits) * (1 + 1e-6) + 1e-12).reshape(q.shape)


@dataclass(frozen=True)
class QuantizedAdapter:
    """A k-bit LoRA adapter: one :class:`QuantizedTensor` per tensor name, in state order."""

    spec: AdapterQuantSpec
    tensors: Mapping[str, QuantizedTensor]

    @property
    def nbytes(self) -> int:
        """Payload bytes (packed codes + absmax), excluding the small JSON manifest."""
        return int(sum(t.nbytes for t in self.tensors.values()))

    @property
    def numel(self) -> int:
        return int(sum(t.numel for t in self.tensors.values()))


def quantize_adapter(
    state: Mapping[str, np.ndarray], spec: AdapterQuantSpec | None = None
) -> QuantizedAdapter:
    """Quantize every tensor of an adapter state (``get_adapter_state`` output)."""
    spec = spec or AdapterQuantSpec()
    return QuantizedAdapter(spec, OrderedDict(
        (k, quantize_tensor(v, spec.bits, spec.blocksize)) for k, v in state.items()))


def dequantize_adapter(qa: QuantizedAdapter) -> OrderedDict[str, np.ndarray]:
    """Float32 adapter state that ``set_adapter_state`` takes."""
    return OrderedDict((k, dequantize_tensor(q)) for k, q in qa.tensors.items())


def adapter_to_arrays(qa: QuantizedAdapter) -> dict[str, np.ndarray]:
    """Flower-ready arrays: ``<name>:codes`` (uint8), ``<name>:absmax`` (float32) and a JSON
    manifest as a uint8 array under :data:`ADAPTER_MANIFEST_KEY`."""
    manifest = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "bits": qa.spec.bits,
                "blocksize": qa.spec.blocksize,
                "tensors": [[k, list(q.shape)] for k, q in qa.tensors.items()]}
    out: dict[str, np.ndarray] = OrderedDict()
    for k, q in qa.tensors.items():
        out[f"{k}:codes"] = q.packed
        out[f"{k}:absmax"] = q.absmax
    out[ADAPTER_MANIFEST_KEY] = np.frombuffer(
        json.dumps(manifest, separators=(",", ":")).encode(), dtype=np.uint8).copy()
    return out


def adapter_from_arrays(arrays: Mapping[str, np.ndarray], who: str = "server") -> QuantizedAdapter:
    """Validate arrays from :func:`adapter_to_arrays` and rebuild the :class:`QuantizedAdapter`.

    Raises :class:`AdapterQuantError` naming ``who`` (e.g. ``"server in round 3"``) when the
    manifest, a dtype or a size is wrong, or a scale is negative or not finite.
    """
    def fail(msg: str) -> None:
        raise AdapterQuantError(f"k-bit adapter from {who}: {msg}; check that server and silos "
                                "run the same fedshield version and lpp settings")

    if ADAPTER_MANIFEST_KEY not in arrays:
        fail(f"no '{ADAPTER_MANIFEST_KEY}' array")
    raw = np.asarray(arrays[ADAPTER_MANIFEST_KEY])
    try:
        if raw.dtype != np.uint8:
            raise ValueError("not uint8")
        manifest: Any = json.loads(raw.tobytes().decode("utf-8"))
        spec = AdapterQuantSpec(int(manifest["bits"]), int(manifest["blocksize"]))
        entries = [(str(k), tuple(int(s) for s in shape)) for k, shape in manifest["tensors"]]
    except (ValueError, KeyError, TypeError, AdapterQuantError) as exc:
        fail(f"unreadable manifest ({exc})")
    if manifest.get("format") != ADAPTER_FORMAT or manifest.get("version") != ADAPTER_VERSION:
        fail(f"format {manifest.get('format')!r} v{manifest.get('version')!r} is not "
             f"{ADAPTER_FORMAT} v{ADAPTER_VERSION}")
    expected_keys = {ADAPTER_MANIFEST_KEY} | {f"{k}:{f}" for k, _ in entries
                                              for f in ("codes", "absmax")}
    if set(arrays) != expected_keys:
        fail(f"unexpected or missing arrays {sorted(set(arrays) ^ expected_keys)[:3]}")
    tensors: dict[str, QuantizedTensor] = OrderedDict()
    for name, shape in entries:
        if any(s < 0 for s in shape):
            fail(f"tensor '{name}' has negative shape {shape}")
        n = int(np.prod(shape, dtype=np.int64))
        codes, absmax = np.asarray(arrays[f"{name}:codes"]), np.asarray(arrays[f"{name}:absmax"])
        if codes.dtype != np.uint8 or codes.shape != (math.ceil(n * spec.bits / 8),):
            fail(f"tensor '{name}': codes must be uint8[{math.ceil(n * spec.bits / 8)}], got "
                 f"{codes.dtype}{list(codes.shape)}")
        nblocks = math.ceil(n / spec.blocksize)
        if absmax.dtype != np.float32 or absmax.shape != (nblocks,):
            fail(f"tensor '{name}': absmax must be float32[{nblocks}], got "
                 f"{absmax.dtype}{list(absmax.shape)}")
        if not (np.all(np.isfinite(absmax)) and np.all(absmax >= 0)):
            fail(f"tensor '{name}': absmax holds negative, NaN or Inf values")
        tensors[name] = QuantizedTensor(codes, absmax, shape, spec.bits, spec.blocksize)
    return QuantizedAdapter(spec, tensors)


def adapter_quantization_error(
    state: Mapping[str, np.ndarray], spec: AdapterQuantSpec
) -> dict[str, float]:
    """How much quantizing ``state`` with ``spec`` costs and saves.

    Returns ``rel_l2`` (||x - q(x)|| / ||x|| over the whole adapter), ``max_abs``,
    ``bound_ok`` (1.0 when every element is within :func:`max_abs_error_bound`), ``bytes``
    (payload) and ``bits_per_value`` (codes + absmax).
    """
    qa = quantize_adapter(state, spec)
    err2 = ref2 = 0.0
    max_abs = 0.0
    bound_ok = True
    for k, x in state.items():
        x = np.asarray(x, dtype=np.float64)
        d = dequantize_tensor(qa.tensors[k]).astype(np.float64) - x
        err2 += float((d * d).sum())
        ref2 += float((x * x).sum())
        if d.size:
            max_abs = max(max_abs, float(np.abs(d).max()))
        bound_ok &= bool(np.all(np.abs(d) <= max_abs_error_bound(qa.tensors[k])))
    return {"rel_l2": math.sqrt(err2 / ref2) if ref2 > 0 else 0.0, "max_abs": max_abs,
            "bound_ok": float(bound_ok), "bytes": float(qa.nbytes),
            "bits_per_value": 8.0 * qa.nbytes / max(qa.numel, 1)}


# --------------------------------------------------------------------------------------------
# server: validate replies, update the full-precision adapter
# --------------------------------------------------------------------------------------------


def validate_silo_adapter(
    reference: Mapping[str, np.ndarray],
    adapter: Mapping[str, np.ndarray],
    silo: int | str,
    server_round: int,
) -> None:
    """Refuse a silo's adapter unless names, shapes and dtype match ``reference`` and every value
    is finite.

    Raises
    ------
    AdapterMismatchError
        Naming the silo and the round, e.g. ``silo 2 in round 4: tensor '...' contains NaN or
        Inf``; drop that reply from aggregation.
    """
    try:
        check_adapter_state(reference, adapter, f"silo {silo} in round {server_round}")
    except AdapterMismatchError as exc:
        raise AdapterMismatchError(
            f"{exc} (reply refused: leave silo {silo} out of round {server_round}'s aggregate)"
        ) from None


def prepare_global_adapter(
    fp_adapter: Mapping[str, np.ndarray], spec: AdapterQuantSpec
) -> tuple[QuantizedAdapter, OrderedDict[str, np.ndarray]]:
    """Server, start of a round: the k-bit adapter to send and its de-quantized value (keep it
    for :func:`lpp_server_update`)."""
    sent = quantize_adapter(fp_adapter, spec)
    return sent, dequantize_adapter(sent)


def lpp_server_update(
    fp_adapter: Mapping[str, np.ndarray],
    sent_adapter: Mapping[str, np.ndarray],
    silo_adapters: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    server_lr: float = 1.0,
) -> OrderedDict[str, np.ndarray]:
    """FedLPP server rule: ``fp + server_lr * (weighted_mean(silo adapters) - sent)``.

    Parameters
    ----------
    fp_adapter : mapping of str to float32 array
        The server's full-precision global adapter.
    sent_adapter : mapping of str to float32 array
        The de-quantized k-bit adapter the silos received this round.
    silo_adapters : sequence of mappings
        The silos' trained adapters (validate them first with :func:`validate_silo_adapter`).
    weights : sequence of float
        Aggregation weight per silo (typically its number of training examples), >= 0.
    server_lr : float, default 1.0
        Server step size; 1.0 with lossless transport is plain FedAvg.

    Returns
    -------
    OrderedDict of str to float32 array
        The new full-precision adapter; the inputs are not modified.
    """
    if len(silo_adapters) != len(weights):
        raise ValueError(f"{len(silo_adapters)} silo adapters but {len(weights)} weights")
    if not silo_adapters:
        raise ValueError("lpp_server_update needs at least one silo adapter")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"aggregation weights must be finite, >= 0 and not all 0; got {weights}")
    w = w / w.sum()
    if set(sent_adapter) != set(fp_adapter):
        raise AdapterMismatchError("sent adapter and full-precision adapter differ in tensor names")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for k, fp in fp_adapter.items():
        mean = sum(wi * np.asarray(a[k], dtype=np.float64) for wi, a in zip(w, silo_adapters))
        delta = mean - np.asarray(sent_adapter[k], dtype=np.float64)
        out[k] = (np.asarray(fp, dtype=np.float64) + server_lr * delta).astype(np.float32)
    return out
