"""Block pruning that shrinks the wire: ratio schedule, per-round block mask, error feedback.

A block is what one ciphertext carries (``ShieldParams.values_per_block`` values), so pruning
a block removes a whole ciphertext from the upload. The mask of a round is the same on every
silo and independent of any update: the blocks are ranked by SHAKE-256 of
``(secret shared by the silos, round, number of blocks)``. The server learns which blocks were
sent (it must add matching ciphertexts) but that reveals nothing about the data, and it cannot
predict future masks. The unsent part of an update stays in the silo's residual and is added to
the next round's update (error feedback), so every value is eventually sent: delayed, not lost.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import numpy as np

MAX_RATIO = 0.99


@dataclass(frozen=True)
class PruneSchedule:
    """Fraction of blocks *not* sent per round, ramped linearly as in FedShield-LLM.

    Parameters
    ----------
    target : float, default 0.0
        Pruning ratio once the ramp is over (0 = dense).
    start_round : int, default 1
        First server round (1-based) that prunes; earlier rounds are dense.
    ramp_rounds : int, default 0
        Rounds over which the ratio grows linearly from ``initial`` to ``target``
        (FedShield-LLM's ``pruning_end_round - pruning_start_round``); 0 jumps to ``target``.
    initial : float, default 0.0
        Ratio at ``start_round`` (FedShield-LLM's ``pruning_initial``).

    Notes
    -----
    Unlike FedShield-LLM's formula, the ratio stops at ``target`` after the ramp, and every
    ratio is clamped to ``[0, 0.99]``.
    """

    target: float = 0.0
    start_round: int = 1
    ramp_rounds: int = 0
    initial: float = 0.0

    def __post_init__(self) -> None:
        for name in ("target", "initial"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"prune schedule {name} must be finite")
        if self.ramp_rounds < 0:
            raise ValueError(f"prune ramp_rounds must be >= 0, got {self.ramp_rounds}")

    def ratio(self, server_round: int) -> float:
        """Shortcut for :func:`prune_ratio`."""
        return prune_ratio(server_round, self)


def prune_ratio(server_round: int, schedule: PruneSchedule) -> float:
    """Pruning ratio of a server round (pure function of the public schedule).

    Parameters
    ----------
    server_round : int
        1-based Flower server round.
    schedule : PruneSchedule

    Returns
    -------
    float
        In ``[0, 0.99]``; 0 before ``start_round``.
    """
    if server_round < schedule.start_round:
        ratio = 0.0
    elif schedule.ramp_rounds <= 0:
        ratio = schedule.target
    else:
        progress = min(1.0, (server_round - schedule.start_round) / schedule.ramp_rounds)
        ratio = schedule.initial + (schedule.target - schedule.initial) * progress
    return float(min(MAX_RATIO, max(0.0, ratio)))


def kept_block_count(num_blocks: int, ratio: float) -> int:
    """Blocks sent at ``ratio``: ``num_blocks - floor(ratio * num_blocks)``, at least 1."""
    if num_blocks <= 0:
        return 0
    pruned = int(math.floor(ratio * num_blocks + 1e-9))
    return max(1, num_blocks - pruned)


def block_mask(num_blocks: int, ratio: float, server_round: int, secret: bytes) -> np.ndarray:
    """Sorted indices of the blocks sent in ``server_round``; identical on every silo.

    Parameters
    ----------
    num_blocks : int
        Blocks of the flattened adapter.
    ratio : float
        Pruning ratio of the round (see :func:`prune_ratio`).
    server_round : int
    secret : bytes
        Secret shared by the silos (``SiloKeyset.mask_secret``); the server does not have it.

    Returns
    -------
    np.ndarray
        int64 indices, increasing, ``kept_block_count(num_blocks, ratio)`` of them.
    """
    kept = kept_block_count(num_blocks, ratio)
    if kept >= num_blocks:
        return np.arange(num_blocks, dtype=np.int64)
    seed = b"block-mask" + secret + struct.pack(">QQ", server_round, num_blocks)
    keys = np.frombuffer(hashlib.shake_256(seed).digest(8 * num_blocks), dtype=">u8")
    order = np.argsort(keys, kind="stable")  # ties (probability ~2**-64) broken by index
    return np.sort(order[:kept]).astype(np.int64)


def split_with_residual(
    update: np.ndarray,
    residual: np.ndarray | None,
    kept: np.ndarray,
    block_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Error feedback: add the residual, cut out the kept blocks, keep the rest as residual.

    Parameters
    ----------
    update : np.ndarray
        Flat update of this round (float64, length ``P``).
    residual : np.ndarray or None
        What previous rounds did not send (length ``P``), or None for zeros.
    kept : np.ndarray
        Block indices to send (from :func:`block_mask`).
    block_size : int

    Returns
    -------
    sent : np.ndarray
        float64 ``(len(kept), block_size)``: the blocks to send (last block zero-padded).
    new_residual : np.ndarray
        float64 length ``P``: ``update + residual`` with the sent blocks zeroed, so that
        ``sent`` (scattered back) ``+ new_residual == update + residual`` exactly.
    """
    total = np.array(update, dtype=np.float64, copy=True).reshape(-1)
    if residual is not None:
        total += residual
    size = total.size
    padded = np.zeros(-(-size // block_size) * block_size, dtype=np.float64)
    padded[:size] = total
    blocks = padded.reshape(-1, block_size)
    sent = blocks[kept].copy()
    blocks[kept] = 0.0
    return sent, padded[:size].copy()


def scatter_blocks(blocks: np.ndarray, kept: np.ndarray, num_values: int) -> np.ndarray:
    """Inverse of the cut in :func:`split_with_residual`: a flat vector, zeros off the mask."""
    block_size = blocks.shape[1] if blocks.ndim == 2 else 1
    num_blocks = -(-num_values // block_size)
    padded = np.zeros((num_blocks, block_size), dtype=np.float64)
    padded[kept] = blocks
    return padded.reshape(-1)[:num_values]
