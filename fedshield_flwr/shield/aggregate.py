"""The server side of a shield round: sum the silos' payloads, keep the encrypted log.

:class:`RoundAccumulator` validates each silo's payload on its own (a bad one raises
``PayloadError`` naming the silo and leaves the running sum untouched) and adds ciphertext
coefficients mod q; :class:`AggregateLog` keeps the per-round aggregates (and an optional
snapshot) that silos catch up from. The server never decrypts: it holds no secret key.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from fedshield_flwr.shield.errors import PayloadError, ShieldError
from fedshield_flwr.shield.keys import ServerKeyset, SiloKeyset
from fedshield_flwr.shield.payload import Payload, decode_payload
from fedshield_flwr.shield.pruning import (
    PruneSchedule,
    kept_block_count,
)


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
        if len(self._silos) >= params.max_silos:
            raise PayloadError(
                f"silo {silo} sent update number {len(self._silos) + 1} in round {rnd} but the "
                f"keyset {self.keyset.key_id} sums at most max_silos={params.max_silos} updates "
                "without overflow; it was ignored (provision a keyset with a larger max_silos, "
                "up to 1024, or sample fewer silos per round)", silo=silo, round=rnd)
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
