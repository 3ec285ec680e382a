"""SEAL operations of the shield scheme, through TenSEAL's bundled ``tenseal.sealapi``.

TenSEAL's high-level ``CKKSVector`` cannot do what makes shield ciphertexts small: it encodes
only ``N/2`` reals per ciphertext (real slots), it refuses a single-prime modulus (it always
builds relinearization keys) and its symmetric encryption stores the full ``c1`` polynomial.
``tenseal.sealapi`` exposes SEAL itself, so here

* values are encoded as complex slots (``N`` reals per ciphertext),
* encryption is SEAL's *seeded* symmetric encryption: ``c1`` is the expansion of a public
  64-byte PRNG seed, so only ``c0`` (one polynomial) and the seed travel,
* ``c0`` is taken out of SEAL's serialization as ``N`` integers below the data prime ``q``.

A ciphertext is therefore the pair ``(c0, seed)`` with ``c0`` a vector of ``N`` residues mod
``q``. Decryption is linear, so the server aggregates by adding the ``c0`` vectors mod ``q`` and
collecting the seeds; a silo rebuilds ``(sum c0, sum expand(seed_k))`` in SEAL and decrypts.
The server never runs SEAL at all.

``sealapi`` reads and writes objects only through file paths, so bytes pass through a private
temporary directory (``/dev/shm`` when available). The byte layout of SEAL 4 serialization is
checked once per process (:meth:`SealEngine.__init__` encrypts a probe) so that a TenSEAL
build with a different layout fails loudly instead of producing wrong ciphertexts.
"""

from __future__ import annotations

import atexit
import multiprocessing.util
import os
import shutil
import struct
import tempfile
import threading
import zlib
from dataclasses import dataclass

import numpy as np

from fedshield_flwr.shield.errors import BackendError
from fedshield_flwr.shield.params import ShieldParams

SEAL_MAGIC = 0xA15E
SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr, reserved, size
COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD = 0, 1, 2
SEED_BYTES = 65  # SEAL's UniformRandomGeneratorInfo: 1 byte PRNG type + 512-bit seed
PRNG_TYPES = (1, 2)  # blake2xb, shake256
# Ciphertext::save_members: parms_id (4 x u64), is_ntt_form (u8), size, poly_modulus_degree,
# coeff_modulus_size (3 x u64), scale (f64), correction_factor (u64).
MEMBERS_BYTES = 32 + 1 + 24 + 8 + 8


def _sealapi():
    try:
        import tenseal.sealapi as sealapi
    except ImportError as exc:  # pragma: no cover - tenseal is a hard dependency
        raise BackendError("tenseal is not installed; pip install tenseal==0.3.18") from exc
    return sealapi


# ---------------------------------------------------------------------------------------------
# bytes <-> sealapi objects through a private temporary directory

_TMP_LOCK = threading.Lock()
_TMP_DIRS: dict[int, str] = {}


def _tmp_dir() -> str:
    pid = os.getpid()
    with _TMP_LOCK:
        path = _TMP_DIRS.get(pid)
        if path is None or not os.path.isdir(path):
            base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            path = tempfile.mkdtemp(prefix="fedshield-seal-", dir=base)  # mode 0o700
            _TMP_DIRS[pid] = path
            atexit.register(_cleanup_tmp, pid, path)
            # multiprocessing workers leave through os._exit(), which skips atexit
            multiprocessing.util.Finalize(None, _cleanup_tmp, args=(pid, path), exitpriority=10)
        return path


def _cleanup_tmp(pid: int, path: str) -> None:
    if os.getpid() == pid:
        shutil.rmtree(path, ignore_errors=True)


def _tmp_path(tag: str) -> str:
    return os.path.join(_tmp_dir(), f"{tag}-{threading.get_ident()}")


def _read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def save_bytes(obj) -> bytes:
    """Serialize a sealapi object (anything with ``save(path)``) to bytes."""
    path = _tmp_path("out")
    try:
        obj.save(path)
        return _read_file(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)


def load_into(obj, data: bytes, context=None, *, keep_file: bool = False) -> None:
    """Load bytes into a sealapi object (``load(path)`` or ``load(context, path)``).

    The file is removed afterwards unless ``keep_file`` (ciphertexts only: saves a syscall;
    secret keys are never left behind).
    """
    path = _tmp_path("ct" if keep_file else "in")
    _write_file(path, data)
    try:
        if context is None:
            obj.load(path)
        else:
            obj.load(context, path)
    finally:
        if not keep_file:
            os.unlink(path)


def seal_payload(blob: bytes, raw_len: int | None = None) -> bytes:
    """The decompressed body of one SEAL-serialized object (after its 16-byte header)."""
    if len(blob) < SEAL_HEADER.size:
        raise BackendError("SEAL blob shorter than its header")
    magic, hsize, _major, _minor, compr, _res, size = SEAL_HEADER.unpack_from(blob)
    if magic != SEAL_MAGIC or hsize != SEAL_HEADER.size or size != len(blob):
        raise BackendError("unexpected SEAL serialization header")
    body = memoryview(blob)[SEAL_HEADER.size :]
    if compr == COMPR_NONE:
        return bytes(body)
    if compr == COMPR_ZLIB:
        return zlib.decompress(body)
    if compr == COMPR_ZSTD:
        import pyarrow as pa

        if raw_len is None:
            return pa.CompressedInputStream(pa.BufferReader(body), "zstd").read()
        return pa.decompress(body, decompressed_size=raw_len, codec="zstd", asbytes=True)
    raise BackendError(f"unknown SEAL compression mode {compr}")


# ---------------------------------------------------------------------------------------------
# key generation


@dataclass(frozen=True)
class SealKeyMaterial:
    """Serialized SEAL objects of a freshly generated keyset (SEAL's own binary format)."""

    parms: bytes
    secret_key: bytes
    public_key: bytes
    modulus: int


def _context(params: ShieldParams, parms_bytes: bytes | None = None):
    sealapi = _sealapi()
    if parms_bytes is None:
        parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(params.poly_modulus_degree)
        parms.set_coeff_modulus(
            sealapi.CoeffModulus.Create(params.poly_modulus_degree, [params.prime_bits])
        )
    else:
        parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
        load_into(parms, parms_bytes)
    context = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise BackendError(
            f"SEAL refuses parameter set {params.param_set_id}: "
            f"{context.parameters_error_message()}"
        )
    moduli = [m.value() for m in parms.coeff_modulus()]
    if (
        parms.poly_modulus_degree() != params.poly_modulus_degree
        or len(moduli) != 1
        or moduli[0].bit_length() != params.prime_bits
    ):
        raise BackendError(
            f"SEAL encryption parameters (N={parms.poly_modulus_degree()}, primes "
            f"{[m.bit_length() for m in moduli]} bits) do not match {params.param_set_id}"
        )
    return parms, context, moduli[0]


def generate_key_material(params: ShieldParams) -> SealKeyMaterial:
    """Generate a secret key and its public key for ``params`` (one data prime, no eval keys)."""
    sealapi = _sealapi()
    parms, context, modulus = _context(params)
    keygen = sealapi.KeyGenerator(context)
    public_key = sealapi.PublicKey()
    keygen.create_public_key(public_key)
    return SealKeyMaterial(
        parms=save_bytes(parms),
        secret_key=save_bytes(keygen.secret_key()),
        public_key=save_bytes(public_key),
        modulus=modulus,
    )


def check_public_parameters(params: ShieldParams, parms_bytes: bytes) -> int:
    """Validate serialized encryption parameters against ``params``; returns the prime ``q``."""
    return _context(params, parms_bytes)[2]


# ---------------------------------------------------------------------------------------------
# encryption / decryption engine (silo side)


class SealEngine:
    """SEAL objects of one silo keyset in this process: encode, encrypt, decrypt.

    Parameters
    ----------
    params : ShieldParams
    parms_bytes, secret_key_bytes, public_key_bytes : bytes
        SEAL-serialized encryption parameters and keys.
    """

    def __init__(
        self,
        params: ShieldParams,
        parms_bytes: bytes,
        secret_key_bytes: bytes,
        public_key_bytes: bytes | None = None,
    ):
        sealapi = _sealapi()
        self.params = params
        self._parms, self._context, self.modulus = _context(params, parms_bytes)
        self._secret_key = sealapi.SecretKey()
        load_into(self._secret_key, secret_key_bytes, self._context)
        self._encoder = sealapi.CKKSEncoder(self._context)
        self._encryptor = sealapi.Encryptor(self._context, self._secret_key)
        self._decryptor = sealapi.Decryptor(self._context, self._secret_key)
        self._evaluator = sealapi.Evaluator(self._context)
        n = params.poly_modulus_degree
        self._dyn_bytes = SEAL_HEADER.size + 8 + 8 * n
        self._raw_len = MEMBERS_BYTES + self._dyn_bytes + SEAL_HEADER.size + SEED_BYTES
        self._calibrate()
        if public_key_bytes is not None:
            self._check_public_key(public_key_bytes)

    # -- layout calibration -------------------------------------------------------------------
    def _calibrate(self) -> None:
        """Encrypt a probe and check that SEAL's seeded layout is the one this module parses."""
        sealapi = _sealapi()
        n = self.params.poly_modulus_degree
        plain = sealapi.Plaintext()
        self._encoder.encode([0j] * (n // 2), self.params.scale, plain)
        blob = save_bytes(self._encryptor.encrypt_symmetric(plain))
        _m, _h, major, minor, _c, _r, _s = SEAL_HEADER.unpack_from(blob)
        self._version = (major, minor)
        try:
            raw = seal_payload(blob, self._raw_len)
        except Exception as exc:
            raise BackendError(f"cannot read SEAL's seeded ciphertext: {exc}") from exc
        members = raw[:MEMBERS_BYTES]
        is_ntt = members[32]
        size, degree, count = struct.unpack_from("<3Q", members, 33)
        (scale,) = struct.unpack_from("<d", members, 57)
        dyn = SEAL_HEADER.unpack_from(raw, MEMBERS_BYTES)
        (dyn_count,) = struct.unpack_from("<Q", raw, MEMBERS_BYTES + SEAL_HEADER.size)
        seed_hdr = SEAL_HEADER.unpack_from(raw, MEMBERS_BYTES + self._dyn_bytes)
        ok = (
            len(raw) == self._raw_len
            and is_ntt == 1
            and (size, degree, count) == (2, n, 1)
            and scale == self.params.scale
            and dyn[0] == SEAL_MAGIC
            and dyn[4] == COMPR_NONE
            and dyn[6] == self._dyn_bytes
            and dyn_count == n
            and seed_hdr[0] == SEAL_MAGIC
            and seed_hdr[6] == SEAL_HEADER.size + SEED_BYTES
            and raw[-SEED_BYTES] in PRNG_TYPES
        )
        if not ok:
            raise BackendError(
                "this TenSEAL build serializes seeded CKKS ciphertexts differently than SEAL 4 "
                "in tenseal 0.3.18; install tenseal==0.3.18 (pinned in pyproject.toml)"
            )
        self._members = members
        self._zero_c0 = bytes(8 * n)
        # and that a ciphertext rebuilt from (c0, seed) decrypts: the path silos use
        c0 = np.frombuffer(raw, dtype="<u8", count=n, offset=MEMBERS_BYTES + SEAL_HEADER.size + 8)
        seed = np.frombuffer(raw, dtype=np.uint8, offset=len(raw) - SEED_BYTES)
        try:
            probe = self.decrypt_blocks(c0[None], seed[None, None])
        except Exception as exc:
            raise BackendError(f"SEAL refuses a rebuilt seeded ciphertext: {exc}") from exc
        if not np.all(np.abs(probe) < 1e-6):
            raise BackendError("a rebuilt seeded ciphertext does not decrypt correctly; install "
                               "tenseal==0.3.18 (pinned in pyproject.toml)")

    def _check_public_key(self, public_key_bytes: bytes) -> None:
        """The public key must belong to the secret key: decrypt an encryption of zero."""
        sealapi = _sealapi()
        public_key = sealapi.PublicKey()
        load_into(public_key, public_key_bytes, self._context)
        encryptor = sealapi.Encryptor(self._context, public_key)
        plain = sealapi.Plaintext()
        self._encoder.encode([0j] * (self.params.poly_modulus_degree // 2), self.params.scale,
                             plain)
        ct = sealapi.Ciphertext()
        encryptor.encrypt(plain, ct)
        plain = sealapi.Plaintext()
        self._decryptor.decrypt(ct, plain)
        values = np.asarray(self._encoder.decode_double(plain))
        # Fresh public-key noise is ~2**15 here; a foreign secret key gives ~2**(prime_bits+5).
        if not np.all(np.abs(values) * self.params.scale < 2.0 ** (self.params.prime_bits - 12)):
            raise BackendError(
                "the keyset's public key does not belong to its secret key; the silo keyset "
                "file is corrupt or was assembled from two keysets - regenerate it with "
                "`fedshield keys init`"
            )

    # -- encryption ---------------------------------------------------------------------------
    def encrypt_blocks(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Encrypt rows of ``N`` reals each; returns ``c0`` (rows x N, uint64) and seeds.

        Parameters
        ----------
        values : np.ndarray
            float64 array of shape ``(rows, N)``; row ``i`` fills ciphertext ``i`` (first half
            in the real parts, second half in the imaginary parts of the ``N/2`` slots).

        Returns
        -------
        c0 : np.ndarray
            uint64 ``(rows, N)``, residues mod ``q`` in SEAL's NTT form.
        seeds : np.ndarray
            uint8 ``(rows, 65)``: PRNG type byte + 64-byte seed of ``c1``.
        """
        sealapi = _sealapi()
        n = self.params.poly_modulus_degree
        half = n // 2
        values = np.ascontiguousarray(values, dtype=np.float64).reshape(-1, n)
        rows = values.shape[0]
        c0 = np.empty((rows, n), dtype=np.uint64)
        seeds = np.empty((rows, SEED_BYTES), dtype=np.uint8)
        offset = MEMBERS_BYTES + SEAL_HEADER.size + 8
        encoder, encryptor, scale = self._encoder, self._encryptor, self.params.scale
        path = _tmp_path("enc")
        try:
            for i in range(rows):
                plain = sealapi.Plaintext()
                encoder.encode((values[i, :half] + 1j * values[i, half:]).tolist(), scale, plain)
                encryptor.encrypt_symmetric(plain).save(path)
                raw = seal_payload(_read_file(path), self._raw_len)
                c0[i] = np.frombuffer(raw, dtype="<u8", count=n, offset=offset)
                seeds[i] = np.frombuffer(raw, dtype=np.uint8, count=SEED_BYTES,
                                         offset=len(raw) - SEED_BYTES)
        finally:
            if os.path.exists(path):
                os.unlink(path)
        return c0, seeds

    # -- decryption ---------------------------------------------------------------------------
    def _blob(self, c0_bytes: bytes, seed: bytes) -> bytes:
        major, minor = self._version
        dyn = SEAL_HEADER.pack(SEAL_MAGIC, SEAL_HEADER.size, major, minor, COMPR_NONE, 0,
                               self._dyn_bytes)
        count = struct.pack("<Q", self.params.poly_modulus_degree)
        seed_hdr = SEAL_HEADER.pack(SEAL_MAGIC, SEAL_HEADER.size, major, minor, COMPR_NONE, 0,
                                    SEAL_HEADER.size + SEED_BYTES)
        body = b"".join((self._members, dyn, count, c0_bytes, seed_hdr, seed))
        outer = SEAL_HEADER.pack(SEAL_MAGIC, SEAL_HEADER.size, major, minor, COMPR_NONE, 0,
                                 SEAL_HEADER.size + len(body))
        return outer + body

    def decrypt_blocks(self, c0: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """Decrypt summed ciphertexts ``(sum c0, sum_k expand(seeds[k]))``.

        Parameters
        ----------
        c0 : np.ndarray
            uint64 ``(rows, N)``, reduced mod ``q``.
        seeds : np.ndarray
            uint8 ``(parties, rows, 65)``: the seeds of every ciphertext that was summed.

        Returns
        -------
        np.ndarray
            float64 ``(rows, N)``: the decrypted sums.
        """
        sealapi = _sealapi()
        n = self.params.poly_modulus_degree
        c0 = np.ascontiguousarray(c0, dtype="<u8").reshape(-1, n)
        rows = c0.shape[0]
        if seeds.ndim != 3 or seeds.shape[1:] != (rows, SEED_BYTES) or seeds.shape[0] < 1:
            raise BackendError(f"seeds of shape {seeds.shape} do not fit {rows} ciphertexts")
        out = np.empty((rows, n), dtype=np.float64)
        ctx, ev = self._context, self._evaluator
        for i in range(rows):
            acc = sealapi.Ciphertext()
            load_into(acc, self._blob(c0[i].tobytes(), seeds[0, i].tobytes()), ctx,
                      keep_file=True)
            for k in range(1, seeds.shape[0]):
                part = sealapi.Ciphertext()
                load_into(part, self._blob(self._zero_c0, seeds[k, i].tobytes()), ctx,
                          keep_file=True)
                ev.add_inplace(acc, part)
            plain = sealapi.Plaintext()
            self._decryptor.decrypt(acc, plain)
            z = np.asarray(self._encoder.decode_complex(plain))
            out[i, : n // 2] = z.real
            out[i, n // 2 :] = z.imag
        return out


# ---------------------------------------------------------------------------------------------
# process-parallel encryption (TenSEAL/SEAL hold the GIL: threads do not help)

_WORKER: SealEngine | None = None


def _worker_init(params: dict, parms: bytes, secret_key: bytes) -> None:
    global _WORKER
    _WORKER = SealEngine(ShieldParams.from_dict(params), parms, secret_key)


def _worker_encrypt(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER is not None, "worker not initialized"
    return _WORKER.encrypt_blocks(values)


class EncryptionPool:
    """Worker processes that each hold the silo's SEAL objects; encrypts blocks in parallel.

    The key material crosses to the workers as bytes through the local process pipe (never the
    network). Starting a pool costs ~0.05 s with ``fork`` and ~1-2 s with ``spawn`` or
    ``forkserver`` (measured on 2 cores), so ``fork`` is the default where it exists; reuse one
    pool across rounds in long-lived processes.

    Parameters
    ----------
    params : ShieldParams
    parms_bytes, secret_key_bytes : bytes
        As for :class:`SealEngine` (use ``SiloKeyset.encryption_pool`` to build one).
    workers : int, default 2
    start_method : str, optional
        ``multiprocessing`` start method; default ``"fork"`` when available, else ``"spawn"``.
    """

    def __init__(
        self,
        params: ShieldParams,
        parms_bytes: bytes,
        secret_key_bytes: bytes,
        workers: int = 2,
        start_method: str | None = None,
    ):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if start_method is None:
            start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self.workers = workers
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=mp.get_context(start_method),
            initializer=_worker_init,
            initargs=(params.to_dict(), parms_bytes, secret_key_bytes),
        )
        self.params = params

    def encrypt_blocks(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Same contract as :meth:`SealEngine.encrypt_blocks`, split over the workers."""
        n = self.params.poly_modulus_degree
        values = np.ascontiguousarray(values, dtype=np.float64).reshape(-1, n)
        rows = values.shape[0]
        if rows == 0:
            return np.empty((0, n), np.uint64), np.empty((0, SEED_BYTES), np.uint8)
        chunks = np.array_split(values, min(rows, self.workers * 4))
        results = list(self._executor.map(_worker_encrypt, chunks))
        return (
            np.concatenate([r[0] for r in results]),
            np.concatenate([r[1] for r in results]),
        )

    def close(self) -> None:
        """Stop the worker processes."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> EncryptionPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
