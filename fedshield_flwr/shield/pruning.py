"""Block pruning that shrinks the wire: ratio schedule, per-round block mask, error feedback.

A block is what one ciphertext carries (``ShieldParams.values_per_block`` values), so pruning
a block removes a whole ciphertext from the upload. The unsent part of an update stays in the
silo's residual and is added to the next round's update (error feedback), so every value is
eventually sent: delayed, not lost.

The mask of a round is the same on every silo, computed by each silo on its own, and
independent of any update (so the block ids the server sees reveal nothing about the data): a
keyed, prioritized round robin. Blocks fall into two tiers by a public prior: *lead* blocks,
mostly LoRA ``B`` values, and the rest (mostly ``A``). ``B`` starts at zero and the adapter's
product is ``B @ A``, so early on a change of ``B`` moves the model far more than a change of
``A`` of the same size (on the demo, Adam moves both by ~2.4e-3 rms per value in round 1,
while ``A`` starts Kaiming-uniform at ~2.4e-2 rms: ~10x the ``B`` it is multiplied by). A block's priority is
the number of rounds since it was last sent, times ``lead_weight`` for lead blocks; each round
sends the highest priorities (ties broken by SHAKE-256 of the silos' shared secret, the round
and the number of blocks). So round 1 sends lead blocks only, every block then recurs at a
steady period (lead blocks ``lead_weight`` times as often) instead of after a random, unbounded
wait, and the priorities follow from the public schedule alone: a silo that missed rounds
computes any round's mask on its own.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_RATIO = 0.99
LEAD_WEIGHT = 4.0  # a lead (LoRA B) block is sent this many times as often as another block


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
    lead_weight : float, default 4.0
        How many times as often a lead block (mostly LoRA ``B`` values) is sent as another
        block while pruning (see :func:`block_mask`); 1 treats all blocks alike.
    flush_round : int, default 0
        A round in which every block is sent whatever the ratio, so that the error-feedback
        residual each silo holds reaches the aggregate (the run's last round, so that the
        final model holds every update); 0 = none.
    flush_every : int, default 0
        Also flush in every round that is a multiple of this (bounds how far the global
        adapter lags the silos' progress during a long run); 0 = never.

    Notes
    -----
    Unlike FedShield-LLM's formula, the ratio stops at ``target`` after the ramp, and every
    ratio is clamped to ``[0, 0.99]``.
    """

    target: float = 0.0
    start_round: int = 1
    ramp_rounds: int = 0
    initial: float = 0.0
    lead_weight: float = LEAD_WEIGHT
    flush_round: int = 0
    flush_every: int = 0

    def __post_init__(self) -> None:
        for name in ("target", "initial"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"prune schedule {name} must be finite")
        if self.ramp_rounds < 0:
            raise ValueError(f"prune ramp_rounds must be >= 0, got {self.ramp_rounds}")
        if not (math.isfinite(self.lead_weight) and self.lead_weight >= 1.0):
            raise ValueError(f"prune lead_weight must be finite and >= 1, got {self.lead_weight}")
        if self.flush_round < 0:
            raise ValueError(f"prune flush_round must be >= 0 (0 = none), got {self.flush_round}")
        if self.flush_every < 0:
            raise ValueError(f"prune flush_every must be >= 0 (0 = never), got {self.flush_every}")

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
        In ``[0, 0.99]``; 0 before ``start_round`` and in flush rounds.
    """
    every = schedule.flush_every
    if (server_round < schedule.start_round or server_round == schedule.flush_round
            or (every > 0 and server_round % every == 0)):
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


def block_tiers(sizes: Sequence[int], lead: Sequence[bool], block_size: int) -> np.ndarray:
    """Tier of each block: 0 (lead) where most of its values belong to lead tensors, else 1.

    Parameters
    ----------
    sizes : sequence of int
        Values of each tensor, in flattening order (``AdapterLayout.sizes``).
    lead : sequence of bool
        Whether each tensor is a lead tensor (``AdapterLayout.lead_tensors``: LoRA ``B``).
    block_size : int

    Returns
    -------
    np.ndarray
        int8, one entry per block of the flattened vector (the last block zero-padded).
    """
    total = int(sum(sizes))
    num_blocks = -(-total // block_size)
    flags = np.zeros(num_blocks * block_size, dtype=np.float64)
    if len(sizes) and any(lead):
        flags[:total] = np.repeat(np.asarray(lead, dtype=np.float64),
                                  np.asarray(sizes, dtype=np.int64))
    share = flags.reshape(num_blocks, block_size).sum(1)
    # a block is lead when most of its *real* values are lead values (the padding does not vote)
    real = np.full(num_blocks, float(block_size))
    if num_blocks:
        real[-1] = total - (num_blocks - 1) * block_size
    return np.where(share * 2 > real, 0, 1).astype(np.int8)


def _jitter(secret: bytes, server_round: int, num_blocks: int) -> np.ndarray:
    """Keyed pseudo-random tie-breakers in [0, 1), one per block, fresh each round."""
    seed = b"block-mask" + secret + struct.pack(">QQ", server_round, num_blocks)
    keys = np.frombuffer(hashlib.shake_256(seed).digest(8 * num_blocks), dtype=">u8")
    return keys.astype(np.float64) / 2.0**64


# (num_blocks, secret digest, schedule, tiers) -> (round, round each block was last sent, mask):
# a silo asks for rounds in increasing order, so each mask costs one step, not a replay.
_WALKS: dict[tuple, tuple[int, np.ndarray, np.ndarray]] = {}
_MAX_WALKS = 8


def block_mask(
    num_blocks: int,
    server_round: int,
    secret: bytes,
    schedule: PruneSchedule | None = None,
    tiers: np.ndarray | None = None,
) -> np.ndarray:
    """Sorted indices of the blocks sent in ``server_round``; identical on every silo.

    Parameters
    ----------
    num_blocks : int
        Blocks of the flattened adapter.
    server_round : int
        1-based server round.
    secret : bytes
        Secret shared by the silos (``SiloKeyset.mask_secret``); the server does not have it.
    schedule : PruneSchedule, optional
        Pruning ratio of every round and the lead weight; default dense.
    tiers : np.ndarray, optional
        From :func:`block_tiers`; default: one tier (a plain keyed round robin).

    Returns
    -------
    np.ndarray
        int64 indices, increasing, ``kept_block_count(num_blocks, schedule.ratio(round))``.

    Notes
    -----
    Round ``t`` sends the blocks with the highest priority ``(t - last sent) x weight``
    (``weight`` = ``schedule.lead_weight`` for lead blocks, 1 otherwise; never sent = sent in
    round 0), ties broken by keyed pseudo-random numbers fresh each round. The priorities of
    round ``t`` follow from the masks of rounds ``1 .. t-1``, which depend only on the public
    schedule, the tiers and the secret: any silo computes any round's mask on its own, and no
    update enters it. In round 1 every lead block outranks every other block.
    """
    schedule = schedule or PruneSchedule()
    if server_round < 1:
        raise ValueError(f"server_round must be >= 1, got {server_round}")
    if tiers is None:
        tiers = np.ones(num_blocks, dtype=np.int8)
    tiers = np.asarray(tiers)
    if tiers.shape != (num_blocks,):
        raise ValueError(f"tiers has shape {tiers.shape}, expected ({num_blocks},)")
    if kept_block_count(num_blocks, schedule.ratio(server_round)) >= num_blocks:
        return np.arange(num_blocks, dtype=np.int64)  # dense round
    weight = np.where(tiers == 0, schedule.lead_weight, 1.0)
    key = (num_blocks, hashlib.sha256(secret).digest(), schedule, tiers.tobytes())
    rnd, last, mask = _WALKS.get(key, (0, np.zeros(num_blocks, dtype=np.int64), None))
    if rnd == server_round and mask is not None:
        return mask.copy()
    if rnd > server_round:  # asked for an earlier round: walk again from the start
        rnd, last = 0, np.zeros(num_blocks, dtype=np.int64)
    last = last.copy()
    while rnd < server_round:
        rnd += 1
        kept = kept_block_count(num_blocks, schedule.ratio(rnd))
        if kept >= num_blocks:
            mask = np.arange(num_blocks, dtype=np.int64)
        else:
            priority = (rnd - last) * weight
            order = np.lexsort((_jitter(secret, rnd, num_blocks), -priority))
            mask = np.sort(order[:kept]).astype(np.int64)
        last[mask] = rnd
    if len(_WALKS) >= _MAX_WALKS:
        _WALKS.pop(next(iter(_WALKS)))
    _WALKS[key] = (rnd, last, mask)
    return mask.copy()


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
