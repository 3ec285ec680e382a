"""CKKS parameter set of the shield mode: ring, the single data prime, scale and headroom.

The server only adds ciphertexts, so one data prime suffices (no rescaling, no key switching, no
evaluation keys); the ring is the smallest that keeps 128-bit security for that prime according
to the HomomorphicEncryption.org standard (``HE_STANDARD_128``). Each ciphertext carries
``poly_modulus_degree`` real values: the ``N/2`` complex CKKS slots hold two reals each (real and
imaginary part), so one block of the pruning mask is exactly one ciphertext.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fedshield_flwr.shield.errors import KeysetError

# Largest total coefficient-modulus bit count with 128-bit classical security per ring degree
# (HomomorphicEncryption.org standard, ternary secret; the table SEAL enforces for TC128).
HE_STANDARD_128: dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438,
                                   32768: 881}
SEAL_MAX_PRIME_BITS = 60  # SEAL's CoeffModulus::Create limit per prime
# The server reduces its uint64 running sum mod q every floor((2**64 - 1) / q) updates (1024 for
# the default 54-bit prime); 1024 silos at the default scale keep a headroom of ~181 per value.
MAX_SILOS_LIMIT = 1024
DEFAULT_MAX_SILOS = 64  # the smallest keyset a federation gets (the ShieldParams default)


@dataclass(frozen=True)
class ShieldParams:
    """Parameters of the shield CKKS scheme; fixed when a keyset is generated.

    Parameters
    ----------
    poly_modulus_degree : int, default 2048
        Ring degree ``N``; also the number of real values per ciphertext (= per pruning block).
    prime_bits : int, default 54
        Bit size of the single data prime ``q``; at most ``HE_STANDARD_128[N]`` and 60.
    scale_bits : int, default 34
        ``log2`` of the CKKS scale. Absolute error per value is about ``100 / 2**scale_bits``
        per silo (fresh noise), i.e. ~1e-8 at the default.
    max_silos : int, default 64
        How many silo updates may be summed without overflow; sets the per-silo headroom
        :attr:`value_bound`.
    """

    poly_modulus_degree: int = 2048
    prime_bits: int = 54
    scale_bits: int = 34
    max_silos: int = 64

    def __post_init__(self) -> None:
        n, q, s = self.poly_modulus_degree, self.prime_bits, self.scale_bits
        if n not in HE_STANDARD_128:
            raise KeysetError(
                f"poly_modulus_degree {n} is not supported; use one of {sorted(HE_STANDARD_128)}"
            )
        limit = min(HE_STANDARD_128[n], SEAL_MAX_PRIME_BITS)
        if not 20 <= q <= limit:
            raise KeysetError(
                f"prime_bits {q} is invalid for N={n}: 128-bit security and SEAL allow at most "
                f"{limit} bits for one prime (HE standard: N=2048 -> 54, 4096 -> 109); use a "
                "larger poly_modulus_degree for a larger prime"
            )
        if not 20 <= s <= q - 8:
            raise KeysetError(
                f"scale_bits {s} is invalid for a {q}-bit prime; use 20 <= scale_bits <= "
                f"{q - 8} (the rest is headroom for sums over silos)"
            )
        if not 1 <= self.max_silos <= MAX_SILOS_LIMIT:
            raise KeysetError(f"max_silos {self.max_silos} must be in [1, {MAX_SILOS_LIMIT}]")
        if self.value_bound < 1.0:
            raise KeysetError(
                f"scale_bits {s} with a {q}-bit prime and max_silos {self.max_silos} leaves a "
                f"headroom of {self.value_bound:.3g} per value; lower scale_bits or max_silos"
            )

    @property
    def values_per_block(self) -> int:
        """Real values carried by one ciphertext (2 per complex slot, ``N/2`` slots)."""
        return self.poly_modulus_degree

    @property
    def scale(self) -> float:
        """The CKKS scale ``2**scale_bits``."""
        return float(2**self.scale_bits)

    @property
    def coeff_bytes(self) -> int:
        """Bytes per ciphertext coefficient on the wire (``ceil(prime_bits / 8)``)."""
        return (self.prime_bits + 7) // 8

    @property
    def value_bound(self) -> float:
        """Largest ``|weight * value|`` one silo may encrypt.

        A CKKS coefficient is at most ``scale * sqrt(2) * max|value|`` (the canonical embedding
        of ``N/2`` complex slots); ``max_silos`` such sums must stay below ``q/2 >= 2**(bits-2)``.
        """
        return 2.0 ** (self.prime_bits - 2 - self.scale_bits) / (self.max_silos * math.sqrt(2))

    @property
    def param_set_id(self) -> str:
        """Short identifier that every payload carries, e.g. ``ckks-n2048-q54-s34-k64``."""
        return (
            f"ckks-n{self.poly_modulus_degree}-q{self.prime_bits}-s{self.scale_bits}"
            f"-k{self.max_silos}"
        )

    def to_dict(self) -> dict[str, int]:
        """JSON-friendly form (used in keyset headers)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShieldParams:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        unknown = set(data) - {"poly_modulus_degree", "prime_bits", "scale_bits", "max_silos"}
        if unknown:
            raise KeysetError(f"unknown shield parameter(s) {sorted(unknown)} in keyset header")
        try:
            return cls(**{k: int(v) for k, v in data.items()})
        except KeysetError:
            raise
        except (TypeError, ValueError) as exc:
            raise KeysetError(f"invalid shield parameters {dict(data)!r}: {exc}") from exc


def params_for_silos(silos: int, base: ShieldParams | None = None) -> ShieldParams:
    """The keyset parameters for rounds that sum ``silos`` updates, selected automatically.

    ``max_silos`` is the next power of two >= ``silos`` (at least :data:`DEFAULT_MAX_SILOS`), so
    a small federation keeps the default headroom and a large one trades headroom for capacity:
    at the default 54-bit prime and 2**34 scale the per-value bound :attr:`ShieldParams.
    value_bound` is ~2896 for 64 silos and ~181 for 1024 (``|weight x update|`` per value,
    far above what LoRA updates times ``shield.weight-scale`` reach). Ring, prime and scale are
    unchanged, so the CKKS noise per silo is too.

    Raises
    ------
    KeysetError
        Past :data:`MAX_SILOS_LIMIT` (1024) silos per round, or for fewer than one.
    """
    silos = int(silos)
    if silos > MAX_SILOS_LIMIT:
        raise KeysetError(
            f"shield: a round would sum {silos} silo updates but a keyset sums at most "
            f"{MAX_SILOS_LIMIT} without overflow; sample fewer silos per round "
            "(strategy.fraction-train / min-train-nodes) or split the federation")
    if silos < 1:
        raise KeysetError(f"shield: cannot provision a keyset for {silos} silos per round")
    k = max(DEFAULT_MAX_SILOS, 1 << (silos - 1).bit_length())
    base = base or ShieldParams()
    return ShieldParams(poly_modulus_degree=base.poly_modulus_degree, prime_bits=base.prime_bits,
                        scale_bits=base.scale_bits, max_silos=k)
