"""The shield round math: what a silo uploads and how silos rebuild the model from aggregates.

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

The server's side (summing payloads, the log) is :mod:`.aggregate`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedshield_flwr.shield.aggregate import decode_record
from fedshield_flwr.shield.errors import PayloadError, UpdateError
from fedshield_flwr.shield.keys import SiloKeyset
from fedshield_flwr.shield.layout import AdapterLayout
from fedshield_flwr.shield.payload import Payload
from fedshield_flwr.shield.pruning import (
    PruneSchedule,
    block_mask,
    block_tiers,
    scatter_blocks,
    split_with_residual,
)
from fedshield_flwr.shield.seal_backend import EncryptionPool

if TYPE_CHECKING:
    from fedshield_flwr.optimizers import ServerOptimizer

PARALLEL_MIN_VALUES = 1 << 19  # below this a process pool costs more than it saves


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
    privatize: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
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
    privatize : callable, optional
        Client-level DP (:func:`fedshield_flwr.dp.client.distributed_privatizer`): maps the
        blocks about to be sent (residual included) to ``(clipped, clipped + noise share)``;
        the second is weighted and encrypted, the first is what the silo's state remembers as
        sent. What clipping removes is dropped (not kept in the residual).

    Returns
    -------
    payload : bytes
        To send to the server (see :mod:`fedshield_flwr.shield.payload`).
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
    released = sent
    if privatize is not None:
        sent, released = privatize(sent)
    weighted = released * weight
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
    optimizer: ServerOptimizer | None = None,
) -> tuple[OrderedDict[str, np.ndarray], SiloState]:
    """Apply the server's downlink (records in order) to the global adapter this silo holds.

    Records not newer than ``state.global_round`` are skipped without decrypting, so the
    server may send more than needed. With a server ``optimizer`` (``strategy.optimizer``),
    each aggregate's mean ``G + mean update`` is stepped by it, as the fedavg server steps its
    mean: every silo applies the same steps in the same order from the same seeded start, so
    all hold the same adapter and optimizer state, and a silo replaying the whole log (a new
    silo, a resumed run) reaches them bit for bit.

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
    optimizer : ServerOptimizer, optional
        Its state is that of round ``state.global_round``; it is stepped in place.

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
        if record.kind == "snapshot" and optimizer is not None and optimizer.active:
            raise PayloadError(
                f"the server sent a round-{record.round} snapshot, but this run steps the "
                f"{optimizer.name} optimizer on the silos and a snapshot carries no optimizer "
                "state; do not compact the log of a run with strategy.optimizer set",
                silo=None, round=record.round)
        agg = decrypt_aggregate(keyset, record)
        mean = apply_aggregate(current, agg)
        if optimizer is not None and agg.kind == "aggregate":
            mean = optimizer.step_arrays(agg.round, current, mean)
        current = mean
        state = state.after_aggregate(agg.round, agg.silos, silo, agg.values.size,
                                      snapshot=agg.kind == "snapshot")
        rnd = agg.round
    return current, state
