"""The shield protocol: what a silo uploads, how the server sums it, how silos rebuild the model.

Round ``t`` (Flower's 1-based server round)::

    silo i   u_i = local adapter - global adapter G_{t-1}         (fp32 dict, PEFT order)
             payload_i, state_i = encrypt_update(silo_keyset, u_i, server_round=t, silo=i,
                                                 weight=w_i, schedule=s, state=state_i)
    server   acc = RoundAccumulator(server_keyset, t, schedule=s)
             acc.add(payload_i, silo=i)      for every reply (a bad one raises, sum untouched)
             record = acc.finalize();  log.append(record)
             downlink = log.downlink(since_round=<base_round of the silo's last reply>)
    silo i   G_t, state_i = catch_up(silo_keyset, G_{t-1}, downlink, state_i, silo=i)

``G_t = G_{t-1} + sum_i w_i * sent_i / sum_i w_i`` over the silos that were summed (exact
weighted FedAvg of what was sent; a silo that dropped is simply not in the sum, its weight not
in the total). The server only adds ciphertext coefficients mod q and never decrypts.

Catch-up: the server keeps an :class:`AggregateLog` (ciphertexts only). Because every silo
starts from the same seeded LoRA initialization ``G_0``, the log of per-round aggregates is
enough to rebuild ``G_t``; to bound it, a silo may upload an encrypted snapshot of ``G_t``
(:func:`encrypt_snapshot`) and the log drops everything before it. A silo that missed rounds
receives the snapshot (if it is behind it) followed by the later aggregates.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .errors import PayloadError, ShieldError, UpdateError
from .keys import ServerKeyset, SiloKeyset
from .layout import AdapterLayout
from .payload import Payload, decode_payload
from .pruning import (
    PruneSchedule,
    block_mask,
    block_tiers,
    kept_block_count,
    scatter_blocks,
    split_with_residual,
)
from .seal_backend import EncryptionPool

PARALLEL_MIN_VALUES = 1 << 19  # below this a process pool costs more than it saves

# ---------------------------------------------------------------------------------------------
# silo side


@dataclass(frozen=True)
class PendingUpload:
    """An upload whose fate the silo does not know yet (summed or dropped by the server).

    Attributes
    ----------
    round : int
    blocks : np.ndarray
        Block indices sent.
    values : np.ndarray
        The unweighted blocks sent, ``(len(blocks), N)``.
    """

    round: int
    blocks: np.ndarray
    values: np.ndarray

    def sent_vector(self, num_values: int) -> np.ndarray:
        """What was sent, as a flat vector (zeros off the mask)."""
        return scatter_blocks(self.values, self.blocks, num_values)


@dataclass(frozen=True)
class SiloState:
    """What a silo keeps between rounds (persist it with :meth:`to_arrays`).

    Attributes
    ----------
    global_round : int
        Round of the global adapter the silo holds (0 = the seeded initial adapter).
    residual : np.ndarray or None
        float64 flat vector: everything computed but not yet sent (error feedback).
    pending : tuple of PendingUpload
        Uploads not yet settled by a server record; one that the server did not sum goes back
        into the residual (see :meth:`after_aggregate`), so nothing is lost.
    """

    global_round: int = 0
    residual: np.ndarray | None = None
    pending: tuple[PendingUpload, ...] = ()

    @property
    def last_upload(self) -> PendingUpload | None:
        """The most recent unsettled upload, if any."""
        return self.pending[-1] if self.pending else None

    def to_arrays(self) -> dict[str, np.ndarray]:
        """numpy arrays for Flower's ``ArrayRecord`` in ``context.state`` (local only)."""
        out: dict[str, np.ndarray] = {
            "global_round": np.array([self.global_round], np.int64),
            "pending_rounds": np.array([p.round for p in self.pending], np.int64),
        }
        if self.residual is not None:
            out["residual"] = self.residual
        for i, upload in enumerate(self.pending):
            out[f"pending_{i}_blocks"] = upload.blocks
            out[f"pending_{i}_values"] = upload.values
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> SiloState:
        """Inverse of :meth:`to_arrays`."""
        rounds = np.asarray(arrays.get("pending_rounds", np.zeros(0, np.int64)))
        residual = arrays.get("residual")
        return cls(
            global_round=int(np.asarray(arrays["global_round"])[0])
            if "global_round" in arrays else 0,
            residual=None if residual is None else np.asarray(residual, dtype=np.float64),
            pending=tuple(
                PendingUpload(int(r), np.asarray(arrays[f"pending_{i}_blocks"], np.int64),
                              np.asarray(arrays[f"pending_{i}_values"], np.float64))
                for i, r in enumerate(rounds)
            ),
        )

    def with_upload(self, upload: PendingUpload, residual: np.ndarray) -> SiloState:
        """State after encrypting ``upload`` (an earlier upload of the same round is replaced:
        the server accepts only one reply per silo and round)."""
        pending = tuple(p for p in self.pending if p.round != upload.round) + (upload,)
        return SiloState(global_round=self.global_round, residual=residual, pending=pending)

    def after_aggregate(self, record_round: int, silos: Sequence[str], silo: str,
                        num_values: int, snapshot: bool = False) -> SiloState:
        """State after applying the server's record of ``record_round`` (records in order).

        An upload of ``record_round`` is settled by the record's list of summed silos. An
        older unsettled upload belongs to a round the server logged no aggregate for, so it was
        not summed. Uploads not summed go back into the residual: nothing is lost. A snapshot
        settles every upload up to its round as summed (the log before it is gone).
        """
        residual = self.residual
        keep = []
        for upload in self.pending:
            if upload.round > record_round:
                keep.append(upload)
                continue
            summed = snapshot or (upload.round == record_round and silo in silos)
            if not summed:
                back = upload.sent_vector(num_values)
                residual = back if residual is None else residual + back
        return SiloState(global_round=record_round, residual=residual, pending=tuple(keep))


def _check_weight(weight: float, silo: str, server_round: int) -> float:
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        weight = math.nan
    if not math.isfinite(weight) or weight <= 0:
        raise UpdateError(
            f"silo {silo} cannot weight its round-{server_round} update by {weight!r}: the "
            "aggregation weight must be a finite positive number (e.g. its number of examples)"
        )
    return weight


def _encrypt(keyset: SiloKeyset, values: np.ndarray, workers: int,
             pool: EncryptionPool | None) -> tuple[np.ndarray, np.ndarray]:
    if pool is not None:
        return pool.encrypt_blocks(values)
    if workers > 1 and values.size >= PARALLEL_MIN_VALUES:
        with keyset.encryption_pool(workers) as tmp_pool:
            return tmp_pool.encrypt_blocks(values)
    return keyset.engine.encrypt_blocks(values)


def encrypt_update(
    keyset: SiloKeyset,
    update: Mapping[str, np.ndarray],
    *,
    server_round: int,
    silo: str,
    weight: float,
    schedule: PruneSchedule | None = None,
    state: SiloState | None = None,
    base_round: int | None = None,
    workers: int = 1,
    pool: EncryptionPool | None = None,
) -> tuple[bytes, SiloState]:
    """Prune, weight and encrypt one silo's update for ``server_round``.

    Parameters
    ----------
    keyset : SiloKeyset
    update : mapping of str to np.ndarray
        The adapter delta (local adapter after training minus the global adapter it started
        from), ordered as PEFT saves it; any float dtype.
    server_round : int
        1-based Flower round; selects the mask and the pruning ratio.
    silo : str
        This silo's id as the server sees it (e.g. ``str(context.node_id)``).
    weight : float
        Aggregation weight (e.g. number of training examples); only ratios matter, but
        ``weight * max|value|`` must stay below ``keyset.params.value_bound``.
    schedule : PruneSchedule, optional
        Default: dense (no pruning).
    state : SiloState, optional
        From the previous round (residual); default: fresh.
    base_round : int, optional
        Round of the global adapter the update was computed from (sent in the header so the
        server knows where this silo's downlink starts); default ``state.global_round``.
    workers : int, default 1
        Encrypt with this many processes when the update has at least
        ``PARALLEL_MIN_VALUES`` values to encrypt.
    pool : EncryptionPool, optional
        An existing pool (takes precedence over ``workers``).

    Returns
    -------
    payload : bytes
        To send to the server (see :mod:`fedshield_flwr.crypto.payload`).
    state : SiloState
        Keep it for the next round.

    Raises
    ------
    UpdateError
        Non-finite values (nothing is encrypted), a bad weight, values beyond the headroom, or
        an update that does not fit the residual.
    """
    params = keyset.params
    weight = _check_weight(weight, silo, server_round)
    state = state or SiloState()
    layout = AdapterLayout.from_state(update)
    vector = layout.flatten(update)
    bad = ~np.isfinite(vector)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise UpdateError(
            f"silo {silo} refuses to encrypt its round-{server_round} update: {int(bad.sum())} "
            f"NaN/Inf value(s), the first in tensor '{layout.tensor_at(first)}'; nothing was "
            "sent - check the local training (learning rate, gradient clipping, loss scaling)"
        )
    if state.residual is not None and state.residual.shape != vector.shape:
        raise UpdateError(
            f"silo {silo}: its residual from earlier rounds has {state.residual.size} values "
            f"but the round-{server_round} update has {vector.size}; the model or LoRA "
            "configuration changed - start from a fresh SiloState"
        )
    block = params.values_per_block
    total_blocks = layout.num_blocks(block)
    tiers = block_tiers(layout.sizes, layout.lead_tensors, block)
    kept = block_mask(total_blocks, server_round, keyset.mask_secret, schedule, tiers)
    sent, residual = split_with_residual(vector, state.residual, kept, block)
    weighted = sent * weight
    peak = float(np.abs(weighted).max()) if weighted.size else 0.0
    if not math.isfinite(peak) or peak > params.value_bound:
        raise UpdateError(
            f"silo {silo} cannot encrypt its round-{server_round} update: weight x value "
            f"reaches {peak:.4g}, above the keyset headroom {params.value_bound:.4g} for "
            f"{params.max_silos} silos; scale the weights down (only their ratios matter, e.g. "
            "num_examples / 1000) or use a keyset with smaller scale_bits"
        )
    c0, seeds = _encrypt(keyset, weighted, workers, pool)
    payload = Payload(
        kind="update", key_id=keyset.key_id, param_set=params.param_set_id,
        round=server_round, layout=layout.digest, num_values=layout.num_values,
        total_blocks=total_blocks, blocks=kept, c0=c0, seeds=seeds[None], silos=(silo,),
        weights=(weight,),
        base_round=state.global_round if base_round is None else base_round,
    )
    new_state = state.with_upload(PendingUpload(server_round, kept, sent), residual)
    return payload.to_bytes(params), new_state


def with_residual(global_state: Mapping[str, np.ndarray], state: SiloState
                  ) -> OrderedDict[str, np.ndarray]:
    """The global adapter plus this silo's residual: where the silo's own progress has reached.

    Under pruning the global adapter lacks what this silo computed but has not sent yet. A silo
    that trains from the global adapter alone re-learns that part and sends it twice; training
    from ``global + residual`` (and sending the new progress on top of the residual) does not.
    With no residual (dense rounds) this is the global adapter itself.
    """
    if state.residual is None:
        return OrderedDict(global_state)
    layout = AdapterLayout.from_state(global_state)
    if state.residual.shape != (layout.num_values,):
        raise UpdateError(
            f"the residual has {state.residual.size} values but the adapter has "
            f"{layout.num_values}; the model or LoRA configuration changed - start from a fresh "
            "SiloState")
    residual = layout.unflatten(state.residual, dtype=np.float64)
    return OrderedDict((k, (np.asarray(v, np.float64) + residual[k]).astype(np.asarray(v).dtype))
                       for k, v in global_state.items())


def encrypt_snapshot(
    keyset: SiloKeyset,
    global_state: Mapping[str, np.ndarray],
    *,
    server_round: int,
    silo: str,
    workers: int = 1,
    pool: EncryptionPool | None = None,
) -> bytes:
    """Encrypt the whole global adapter after ``server_round`` so the server can compact its log.

    Every silo holds the same global adapter; any one of them can produce the snapshot when
    the strategy asks for it (e.g. every 10 rounds). Values must stay within
    ``keyset.params.value_bound``.
    """
    params = keyset.params
    layout = AdapterLayout.from_state(global_state)
    vector = layout.flatten(global_state)
    peak = float(np.abs(vector).max()) if vector.size else 0.0
    if not math.isfinite(peak) or peak > params.value_bound:
        raise UpdateError(
            f"silo {silo} cannot snapshot the round-{server_round} global adapter: max |value| "
            f"{peak:.4g} is non-finite or above the headroom {params.value_bound:.4g}"
        )
    total_blocks = layout.num_blocks(params.values_per_block)
    kept = np.arange(total_blocks, dtype=np.int64)
    blocks, _ = split_with_residual(vector, None, kept, params.values_per_block)
    c0, seeds = _encrypt(keyset, blocks, workers, pool)
    payload = Payload(
        kind="snapshot", key_id=keyset.key_id, param_set=params.param_set_id,
        round=server_round, layout=layout.digest, num_values=layout.num_values,
        total_blocks=total_blocks, blocks=kept, c0=c0, seeds=seeds[None], silos=(silo,),
        weights=(1.0,),
    )
    return payload.to_bytes(params)


@dataclass(frozen=True)
class DecryptedAggregate:
    """A decrypted server record.

    Attributes
    ----------
    kind : str
        ``"aggregate"``: ``values`` is the weighted mean update of the round (zero off the
        mask); ``"snapshot"``: ``values`` is the whole global adapter after ``round``.
    round : int
    prev_round : int or None
        Round of the server log entry before this one (None if the server keeps no log).
    silos : tuple of str
        Silos summed into it.
    total_weight : float
    blocks : np.ndarray
        Blocks that carry values.
    values : np.ndarray
        float64 flat vector of the adapter's length.
    layout : str
        Layout digest.
    """

    kind: str
    round: int
    prev_round: int | None
    silos: tuple[str, ...]
    total_weight: float
    blocks: np.ndarray
    values: np.ndarray
    layout: str


def decrypt_aggregate(
    keyset: SiloKeyset,
    data: Any,
    *,
    expected_round: int | None = None,
) -> DecryptedAggregate:
    """Validate and decrypt a server record (aggregate or snapshot); divide by the total weight.

    Parameters
    ----------
    keyset : SiloKeyset
    data : bytes, 1-D uint8 np.ndarray or Payload
        The record as received (or already decoded with :func:`decode_record`).
    expected_round : int, optional
        Refuse a record of any other round.

    Raises
    ------
    PayloadError, KeyMismatchError
        The record is damaged or made with another keyset.
    TypeError
        ``keyset`` is not a :class:`SiloKeyset` (e.g. a server keyset, which cannot decrypt).
    """
    if not isinstance(keyset, SiloKeyset):
        raise TypeError(
            f"decryption needs a SiloKeyset (with the secret key), got {type(keyset).__name__}; "
            "the server keyset holds public material only and cannot decrypt"
        )
    payload = data if isinstance(data, Payload) else decode_record(keyset, data, expected_round)
    if payload.kind not in ("aggregate", "snapshot") or payload.key_id != keyset.key_id:
        raise PayloadError(f"cannot decrypt a {payload.kind} made under key id "
                           f"{payload.key_id} with key id {keyset.key_id}", round=payload.round)
    sums = keyset.engine.decrypt_blocks(payload.c0, payload.seeds)
    values = scatter_blocks(sums / payload.total_weight, payload.blocks, payload.num_values)
    return DecryptedAggregate(
        kind=payload.kind, round=payload.round, prev_round=payload.prev_round,
        silos=payload.silos, total_weight=payload.total_weight, blocks=payload.blocks,
        values=values, layout=payload.layout,
    )


def apply_aggregate(
    global_state: Mapping[str, np.ndarray], aggregate: DecryptedAggregate
) -> OrderedDict[str, np.ndarray]:
    """New global adapter: ``global + mean update`` (aggregate) or the snapshot itself."""
    layout = AdapterLayout.from_state(global_state)
    if layout.digest != aggregate.layout:
        raise PayloadError(
            f"the round-{aggregate.round} record from the server is for adapter layout "
            f"{aggregate.layout}, this silo has {layout.digest}; check that all silos run the "
            "same model and LoRA configuration", silo=None, round=aggregate.round)
    if aggregate.kind == "snapshot":
        return layout.unflatten(aggregate.values)
    return layout.unflatten(layout.flatten(global_state) + aggregate.values)


def catch_up(
    keyset: SiloKeyset,
    global_state: Mapping[str, np.ndarray],
    records: Sequence[Any],
    state: SiloState,
    *,
    silo: str,
) -> tuple[OrderedDict[str, np.ndarray], SiloState]:
    """Apply the server's downlink (records in order) to the global adapter this silo holds.

    Records not newer than ``state.global_round`` are skipped without decrypting, so the
    server may send more than needed.

    Parameters
    ----------
    keyset : SiloKeyset
    global_state : mapping
        Global adapter of round ``state.global_round`` (the seeded initial adapter for 0).
    records : sequence of bytes / uint8 arrays
        ``AggregateLog.downlink(state.global_round)``: optionally a snapshot, then aggregates.
    state : SiloState
    silo : str
        This silo's id (to tell whether its last upload was summed).

    Returns
    -------
    (global_state, state)
        The adapter after the last record and the updated state (``state.global_round`` is
        the round of that adapter).

    Raises
    ------
    PayloadError
        A record is invalid, out of order, or the chain skips a round the server logged.
    """
    current = OrderedDict(global_state)
    rnd = state.global_round
    for data in records:
        record = decode_record(keyset, data)  # validates; decrypts only if needed below
        if record.round <= rnd:
            continue  # not newer than what this silo holds
        if record.kind == "aggregate" and record.prev_round is not None and (
            record.prev_round > rnd
        ):
            raise PayloadError(
                f"the server's downlink jumps from round {rnd} to {record.round} but its log "
                f"has round {record.prev_round} in between; ask the server for "
                f"downlink(since_round={rnd})", silo=None, round=record.round)
        agg = decrypt_aggregate(keyset, record)
        current = apply_aggregate(current, agg)
        state = state.after_aggregate(agg.round, agg.silos, silo, agg.values.size,
                                      snapshot=agg.kind == "snapshot")
        rnd = agg.round
    return current, state


# ---------------------------------------------------------------------------------------------
# server side


class RoundAccumulator:
    """Sums the encrypted updates of one round; the server never decrypts.

    Every payload is parsed and validated completely before it touches the running sum, so a
    bad reply raises :class:`PayloadError` (naming the silo and the round) and leaves the sum
    exactly as it was.

    Parameters
    ----------
    keyset : ServerKeyset
    server_round : int
    schedule : PruneSchedule, optional
        When given, each update must carry exactly the number of blocks the schedule implies.
    layout : str, optional
        Expected adapter layout digest; default: the first valid update sets it.
    """

    def __init__(self, keyset: ServerKeyset, server_round: int, *,
                 schedule: PruneSchedule | None = None, layout: str | None = None):
        self.keyset = keyset
        self.server_round = server_round
        self.schedule = schedule
        self._layout = layout
        self._num_values: int | None = None
        self._blocks: np.ndarray | None = None
        self._c0: np.ndarray | None = None
        self._seeds: list[np.ndarray] = []
        self._silos: list[str] = []
        self._weights: list[float] = []
        self._total_blocks = 0
        self._unreduced = 0  # residues (< q) summed since the last reduction mod q
        # uint64 holds floor((2**64 - 1) / q) residues: 1024 for a 54-bit q, 16 for 60 bits.
        self._reduce_every = (2**64 - 1) // keyset.modulus

    @property
    def silos(self) -> tuple[str, ...]:
        """Silos summed so far, in order of arrival."""
        return tuple(self._silos)

    @property
    def total_weight(self) -> float:
        """Sum of their weights."""
        return math.fsum(self._weights)

    def add(self, data: Any, silo: str) -> Payload:
        """Validate one silo's update and add it to the sum.

        Parameters
        ----------
        data : bytes or 1-D uint8 np.ndarray
        silo : str
            The sender as the transport identifies it; must match the payload's silo id.

        Returns
        -------
        Payload
            The decoded update (for logging: weight, blocks).
        """
        rnd = self.server_round
        if silo in self._silos:
            raise PayloadError(
                f"silo {silo} replied twice in round {rnd}; the duplicate was ignored (the sum "
                "already holds its first reply)", silo=silo, round=rnd)
        params = self.keyset.params
        payload = decode_payload(data, params=params, key_id=self.keyset.key_id,
                                 modulus=self.keyset.modulus, kinds=("update",), sender=silo,
                                 expected_round=rnd)
        if payload.silos[0] != silo:
            raise PayloadError(
                f"silo {silo} sent an update in round {rnd} labelled as coming from silo "
                f"{payload.silos[0]}; each silo must pass its own id to encrypt_update",
                silo=silo, round=rnd)
        if self._layout is not None and payload.layout != self._layout:
            raise PayloadError(
                f"silo {silo} sent an update in round {rnd} for adapter layout "
                f"{payload.layout}, expected {self._layout}; check that all silos run the same "
                "model and LoRA configuration", silo=silo, round=rnd)
        if self._num_values is not None and payload.num_values != self._num_values:
            raise PayloadError(
                f"silo {silo} sent {payload.num_values} values in round {rnd}, the others "
                f"{self._num_values}; check that all silos run the same model and keyset",
                silo=silo, round=rnd)
        if self.schedule is not None:
            want = kept_block_count(payload.total_blocks, self.schedule.ratio(rnd))
            if payload.num_blocks != want:
                raise PayloadError(
                    f"silo {silo} sent {payload.num_blocks} ciphertexts for a {want}-block mask "
                    f"in round {rnd}; check that all silos run the same model, keyset and "
                    "pruning schedule", silo=silo, round=rnd)
        if self._blocks is not None and not np.array_equal(payload.blocks, self._blocks):
            raise PayloadError(
                f"silo {silo} sent {payload.num_blocks} ciphertexts for a "
                f"{self._blocks.size}-block mask in round {rnd} (different blocks than the "
                "other silos); check that all silos run the same model, keyset and pruning "
                "schedule", silo=silo, round=rnd)
        # Everything is validated: only now touch the running sum.
        if self._c0 is None:
            self._c0 = payload.c0.copy()
            self._blocks = payload.blocks
            self._layout = payload.layout
            self._num_values = payload.num_values
            self._total_blocks = payload.total_blocks
        else:
            self._c0 += payload.c0
        self._unreduced += 1
        if self._unreduced >= self._reduce_every:
            self._c0 %= np.uint64(self.keyset.modulus)
            self._unreduced = 1
        self._seeds.append(payload.seeds[0])
        self._silos.append(silo)
        self._weights.append(payload.weights[0])
        return payload

    def finalize(self) -> Payload:
        """The round's aggregate (kind ``"aggregate"``); encode it with :func:`encode_record`.

        Raises
        ------
        ShieldError
            If no update was added.
        """
        if self._c0 is None or self._blocks is None or self._num_values is None:
            raise ShieldError(
                f"no valid update arrived in round {self.server_round}; nothing to aggregate "
                "(keep the previous global adapter and check the silos' logs)"
            )
        c0 = self._c0 % np.uint64(self.keyset.modulus)
        return Payload(
            kind="aggregate", key_id=self.keyset.key_id, param_set=self.keyset.params.param_set_id,
            round=self.server_round, layout=self._layout or "", num_values=self._num_values,
            total_blocks=self._total_blocks, blocks=self._blocks, c0=c0,
            seeds=np.stack(self._seeds), silos=tuple(self._silos),
            weights=tuple(self._weights),
        )


def encode_record(keyset: ServerKeyset | SiloKeyset, record: Payload) -> bytes:
    """Bytes of a record (aggregate/snapshot) for the downlink or a checkpoint."""
    return record.to_bytes(keyset.params)


def decode_record(keyset: ServerKeyset | SiloKeyset, data: Any,
                  expected_round: int | None = None) -> Payload:
    """Validate and decode a record (aggregate or snapshot) without decrypting it."""
    return decode_payload(data, params=keyset.params, key_id=keyset.key_id,
                          modulus=keyset.modulus, kinds=("aggregate", "snapshot"), sender=None,
                          expected_round=expected_round)


_LOG_MAGIC = b"FSLOG001"


class AggregateLog:
    """The server's encrypted history: an optional snapshot plus later round aggregates.

    Parameters
    ----------
    keyset : ServerKeyset

    Notes
    -----
    The checkpoint (:meth:`to_bytes`) holds ciphertexts and headers only::

        b"FSLOG001" | uint32 big-endian count | (uint64 big-endian length | record bytes)*
    """

    def __init__(self, keyset: ServerKeyset):
        self.keyset = keyset
        self._entries: list[tuple[int, str, bytes]] = []  # (round, kind, bytes)

    @property
    def latest_round(self) -> int:
        """Round of the newest entry (0 when empty)."""
        return self._entries[-1][0] if self._entries else 0

    @property
    def snapshot_round(self) -> int | None:
        """Round of the snapshot at the start of the log, if any."""
        if self._entries and self._entries[0][1] == "snapshot":
            return self._entries[0][0]
        return None

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, record: Payload) -> bytes:
        """Add a round aggregate (from :meth:`RoundAccumulator.finalize`); returns its bytes.

        The record is chained to the previous entry (``prev_round``) so a silo can tell a
        complete downlink from one with a gap.
        """
        if record.kind != "aggregate":
            raise ValueError("append() takes aggregates; use add_snapshot() for snapshots")
        if record.round <= self.latest_round:
            raise ValueError(
                f"the log already reaches round {self.latest_round}; cannot append round "
                f"{record.round}"
            )
        self._check_layout(record, None)
        data = encode_record(self.keyset, record.with_prev_round(self.latest_round))
        self._entries.append((record.round, "aggregate", data))
        return data

    def _check_layout(self, record: Payload, silo: str | None) -> None:
        if not self._entries:
            return
        first = decode_record(self.keyset, self._entries[0][2])
        if (first.layout, first.num_values) != (record.layout, record.num_values):
            party = f"silo {silo}" if silo is not None else "the accumulator"
            raise PayloadError(
                f"{party} produced a round-{record.round} record for adapter layout "
                f"{record.layout} but the log holds layout {first.layout}; check that all "
                "silos run the same model and LoRA configuration", silo=silo, round=record.round)

    def add_snapshot(self, data: Any, silo: str) -> None:
        """Validate a silo's encrypted global adapter and drop the entries it replaces.

        The snapshot must be of a round the log has reached, dense, and of the same layout.
        """
        params = self.keyset.params
        payload = decode_payload(data, params=params, key_id=self.keyset.key_id,
                                 modulus=self.keyset.modulus, kinds=("snapshot",), sender=silo)
        rnd = payload.round
        if payload.silos[0] != silo:
            raise PayloadError(f"silo {silo} sent a snapshot labelled as silo "
                               f"{payload.silos[0]}", silo=silo, round=rnd)
        if rnd > self.latest_round or rnd < (self.snapshot_round or 0):
            raise PayloadError(
                f"silo {silo} sent a snapshot of round {rnd} but the log covers rounds "
                f"{self.snapshot_round or 0}..{self.latest_round}; snapshot the global adapter "
                "of the round just aggregated", silo=silo, round=rnd)
        if payload.num_blocks != payload.total_blocks:
            raise PayloadError(f"silo {silo} sent a pruned snapshot in round {rnd}; snapshots "
                               "must be dense", silo=silo, round=rnd)
        self._check_layout(payload, silo)
        record = replace(payload, prev_round=None)
        kept = [e for e in self._entries if e[0] > rnd]
        self._entries = [(rnd, "snapshot", encode_record(self.keyset, record))] + kept

    def downlink(self, since_round: int) -> list[bytes]:
        """Records a silo holding the global adapter of ``since_round`` needs, in order."""
        if since_round < 0:
            raise ValueError(f"since_round must be >= 0, got {since_round}")
        out: list[bytes] = []
        snap = self.snapshot_round
        start = since_round
        if snap is not None and since_round < snap:
            out.append(self._entries[0][2])
            start = snap
        out.extend(data for rnd, kind, data in self._entries
                   if kind == "aggregate" and rnd > start)
        return out

    def to_bytes(self) -> bytes:
        """Checkpoint bytes (ciphertexts and headers only)."""
        parts = [_LOG_MAGIC, len(self._entries).to_bytes(4, "big")]
        for _rnd, _kind, data in self._entries:
            parts += [len(data).to_bytes(8, "big"), data]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, keyset: ServerKeyset, data: bytes) -> AggregateLog:
        """Restore a checkpoint; every record is validated against ``keyset``."""
        log = cls(keyset)
        view = memoryview(data)
        if len(view) < 12 or bytes(view[:8]) != _LOG_MAGIC:
            raise PayloadError("not a shield aggregate-log checkpoint (bad magic)")
        count = int.from_bytes(view[8:12], "big")
        pos = 12
        for _ in range(count):
            if pos + 8 > len(view):
                raise PayloadError("aggregate-log checkpoint is truncated")
            size = int.from_bytes(view[pos : pos + 8], "big")
            pos += 8
            if pos + size > len(view):
                raise PayloadError("aggregate-log checkpoint is truncated")
            chunk = bytes(view[pos : pos + size])
            pos += size
            record = decode_record(keyset, chunk)
            log._entries.append((record.round, record.kind, chunk))
        if pos != len(view):
            raise PayloadError("aggregate-log checkpoint has trailing bytes")
        return log
