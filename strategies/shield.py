"""``shield``: CKKS-encrypted, block-pruned LoRA aggregation; the server only adds ciphertexts.

Per round ``t``:

1. ``configure_train`` sends every sampled silo the encrypted aggregates it has not seen yet
   (its *downlink*, from the :class:`~fedshield_flwr.shield.AggregateLog`), so a silo that
   missed rounds catches up; no plaintext model ever leaves a silo or reaches the server.
2. Each silo decrypts its downlink, trains from the global adapter ``G_{t-1}``, and replies with
   one payload: the ciphertexts of ``w_i * (local - G_{t-1})`` on this round's block mask.
3. ``aggregate_train`` validates every payload on its own (:class:`RoundAccumulator` raises
   ``PayloadError`` naming silo and round and leaves the running sum untouched) and appends the
   sum to the log. Weighted FedAvg is exact over the silos that were summed.
4. ``configure_evaluate`` sends the new aggregate; silos decrypt it, evaluate ``G_t`` on their
   held-out data and report only the loss. On the final round they export the adapter.

The server's keyset type holds no secret key; its checkpoint is the log (ciphertexts only).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedshield_flwr.dp.client import ClientDp
from fedshield_flwr.protocol import CONFIG, ROUND, check_reply_round, reply_metrics
from fedshield_flwr.shield import (
    AggregateLog,
    PayloadError,
    PruneSchedule,
    RoundAccumulator,
    ServerKeyset,
    prune_ratio,
)
from fedshield_flwr.shield.errors import KeysetError
from fedshield_flwr.shield.params import MAX_SILOS_LIMIT, params_for_silos
from fedshield_flwr.shield.protocol import (
    FINAL_ROUND,
    GLOBAL_ROUND,
    MAX_SILOS,
    PRUNE_RATIO,
    downlink_record,
    payload_bytes,
    server_message,
)
from strategies.base import MetricsFold, RoundLoop, accepted, evaluate_metrics

log = logging.getLogger("fedshield.server")


class ShieldStrategy(RoundLoop, FedAvg):
    """Encrypted FedAvg: the server sums ciphertexts and keeps the encrypted log.

    Parameters
    ----------
    keyset_loader : callable
        Returns the :class:`ServerKeyset` (called lazily: in simulation the silos provision the
        keys during round 0).
    schedule : PruneSchedule
        Pruning schedule shared with the silos (through the run config).
    num_rounds : int
        Total rounds; the last evaluation asks silos to export the final adapter.
    train_extra, evaluate_extra : dict
        Config entries added to every train/evaluate message (e.g. the key tag).
    client_dp : ClientDp, optional
        Client-level DP, distributed: the silos clip and add their noise shares before
        encrypting (:func:`fedshield_flwr.dp.client.distributed_privatizer`); the server sends
        them the clipping norm, noise multiplier and number of silos sampled, and accounts.
    **kwargs
        Passed to ``FedAvg`` (fractions, minimum node counts).
    """

    def __init__(self, keyset_loader, schedule: PruneSchedule, num_rounds: int,
                 train_extra: dict | None = None, evaluate_extra: dict | None = None,
                 client_dp: ClientDp | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.client_dp = client_dp
        self._keyset_loader = keyset_loader
        self._keyset: ServerKeyset | None = None
        self.schedule = schedule
        self.num_rounds = num_rounds
        self.train_extra = dict(train_extra or {})
        self.evaluate_extra = dict(evaluate_extra or {})
        self.log: AggregateLog | None = None
        self.known_round: dict[int, int] = {}  # node id -> global round it holds
        self.accepted_replies = 0
        self.rejected_replies = 0
        self.problems: list[str] = []

    # ------------------------------------------------------------------ keys / state
    @property
    def keyset(self) -> ServerKeyset:
        if self._keyset is None:
            self._keyset = self._keyset_loader()
            log.info("shield: server keyset %s loaded (public material only)",
                     self._keyset.key_id)
        return self._keyset

    def aggregate_log(self) -> AggregateLog:
        if self.log is None:
            self.log = AggregateLog(self.keyset)
        return self.log

    def restore(self, blob: bytes) -> None:
        self.log = AggregateLog.from_bytes(self.keyset, blob)

    # ------------------------------------------------------------------ messages
    def silos_per_round(self, grid: Grid) -> int:
        """How many silos a training round samples (and sums) in this federation."""
        num = int(len(list(grid.get_node_ids())) * self.fraction_train)
        return max(num, self.min_train_nodes, 1)

    def check_capacity(self, server_round: int, silos: int) -> None:
        """Refuse a round that would sum more updates than the keyset holds (server side)."""
        if silos > MAX_SILOS_LIMIT:
            params_for_silos(silos)  # raises, naming the limit and the remedy
        if self._keyset is None and server_round == 0:
            return  # simulation: the silos provision a keyset sized by MAX_SILOS in round 0
        limit = self.keyset.params.max_silos
        if silos > limit:
            raise KeysetError(
                f"server, round {server_round}: the strategy samples {silos} silos per round but "
                f"shield keyset {self.keyset.key_id} sums at most max_silos={limit}; provision "
                f"one for this federation (`fedshield keys init --silos {silos}`, up to "
                f"{MAX_SILOS_LIMIT}) or sample fewer silos (strategy.fraction-train)")

    def _messages(self, server_round: int, config: ConfigRecord, grid: Grid, fraction: float,
                  min_nodes: int, message_type: str) -> list[Message]:
        if fraction == 0.0:
            return []
        silos = self.silos_per_round(grid)
        self.check_capacity(server_round, silos)
        config[MAX_SILOS] = silos  # a keyset provisioned in simulation is sized for this
        num = int(len(list(grid.get_node_ids())) * fraction)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num, min_nodes))
        config[ROUND] = server_round
        # One downlink record per distinct starting round, shared by the messages of every silo
        # that holds it: Flower hashes a record once (its object id is cached) and pushes a
        # shared object once, so the server's cost per silo does not grow with the aggregate.
        records: dict[int, ArrayRecord] = {}
        msgs = []
        for node in node_ids:
            since = self.known_round.get(node, 0)
            if since not in records:
                records[since] = downlink_record(
                    self.log.downlink(since) if self.log is not None else [])
            msgs.append(server_message(node, records[since], config, message_type))
        return msgs

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        for k, v in self.train_extra.items():
            config[k] = v
        config[PRUNE_RATIO] = prune_ratio(server_round, self.schedule)
        msgs = self._messages(server_round, config, grid, self.fraction_train,
                              self.min_train_nodes, MessageType.TRAIN)
        if self.client_dp is not None and msgs:
            self.client_dp.begin_round(server_round, len(msgs), len(list(grid.get_node_ids())))
            for msg in msgs:  # each silo's noise share is sigma^2 C^2 / (silos sampled)
                msg.content.config_records[CONFIG].update(
                    self.client_dp.config_entries(server_round))
        return msgs

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        for k, v in self.evaluate_extra.items():
            config[k] = v
        config[FINAL_ROUND] = server_round == self.num_rounds
        return self._messages(server_round, config, grid, self.fraction_evaluate,
                              self.min_evaluate_nodes, MessageType.EVALUATE)

    # ------------------------------------------------------------------ aggregation
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        problems: list[str] = []
        acc = RoundAccumulator(self.keyset, server_round, schedule=self.schedule)
        fold = MetricsFold()
        # RoundAccumulator adds each payload to the running ciphertext sum as it arrives and
        # keeps no payload; a bad one raises and leaves the sum untouched.
        for msg in accepted(replies, server_round, "train", lambda: self.destinations, problems):
            node = msg.metadata.src_node_id
            try:
                check_reply_round(msg, server_round)
                payload = acc.add(payload_bytes(msg), silo=str(node))
            except (PayloadError, ValueError) as exc:
                text = str(exc)
                if str(node) not in text:
                    text = f"silo node {node} in round {server_round}: {text}"
                problems.append(text)
                continue
            self.known_round[node] = int(payload.base_round)
            fold.add(msg)
            del payload, msg
        self.settle_train(fold.count, problems)
        if not fold.count:
            return None, None
        self.aggregate_log().append(acc.finalize())
        metrics = fold.record(
            prune_ratio=float(prune_ratio(server_round, self.schedule)),
            **(self.client_dp.end_round(server_round, fold.count) if self.client_dp else {}))
        marker = ArrayRecord(OrderedDict(
            [("aggregated-round", Array(np.array([server_round], np.int64)))]))
        return marker, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        good = self.accepted_evaluate_replies(server_round, replies)
        for msg in good:
            held = reply_metrics(msg).get(GLOBAL_ROUND)
            if held is not None:
                self.known_round[msg.metadata.src_node_id] = int(held)
        return evaluate_metrics(good)
