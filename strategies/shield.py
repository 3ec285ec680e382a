"""``shield``: CKKS-encrypted, block-pruned LoRA aggregation; the server only adds ciphertexts.

Per round ``t``:

1. ``configure_train`` sends every sampled silo the encrypted aggregates it has not seen yet
   (its *downlink*, from the :class:`~fedshield_flwr.crypto.AggregateLog`), so a silo that
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
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedshield_flwr.crypto import (
    AggregateLog,
    PayloadError,
    PruneSchedule,
    RoundAccumulator,
    ServerKeyset,
    as_array,
    prune_ratio,
)

from .base import RoundLoop, check_reply_round, silo_timings, split_replies, weighted_metric

log = logging.getLogger("fedshield.server")


def downlink_record(records: list[bytes]) -> ArrayRecord:
    """Encrypted aggregates as an ``ArrayRecord`` of uint8 arrays, in order."""
    return ArrayRecord(OrderedDict(
        (f"record-{i:05d}", Array(as_array(r))) for i, r in enumerate(records)))


def payload_bytes(msg: Message) -> bytes:
    """The single encrypted payload of a train reply (raises ``PayloadError`` naming the silo)."""
    node = msg.metadata.src_node_id
    rec = msg.content.array_records.get("payload")
    if rec is None or "payload" not in rec:
        raise PayloadError(f"silo node {node} sent no 'payload' array")
    arr = rec["payload"]
    if arr.dtype != "uint8" or len(arr.shape) != 1:
        raise PayloadError(f"silo node {node} sent a payload of {arr.dtype}{list(arr.shape)}; "
                           "expected a 1-D uint8 array")
    try:
        return arr.numpy().tobytes()
    except Exception as exc:  # noqa: BLE001
        raise PayloadError(f"silo node {node} sent undecodable payload bytes ({exc})") from exc


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
    **kwargs
        Passed to ``FedAvg`` (fractions, minimum node counts).
    """

    def __init__(self, keyset_loader, schedule: PruneSchedule, num_rounds: int,
                 train_extra: dict | None = None, evaluate_extra: dict | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
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
    def _messages(self, server_round: int, config: ConfigRecord, grid: Grid, fraction: float,
                  min_nodes: int, message_type: str) -> list[Message]:
        if fraction == 0.0:
            return []
        num = int(len(list(grid.get_node_ids())) * fraction)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num, min_nodes))
        config["server-round"] = server_round
        out = []
        for node in node_ids:
            since = self.known_round.get(node, 0)
            records = self.log.downlink(since) if self.log is not None else []
            content = RecordDict({"downlink": downlink_record(records),
                                  "config": ConfigRecord(dict(config))})
            out.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        for k, v in self.train_extra.items():
            config[k] = v
        config["prune-ratio"] = prune_ratio(server_round, self.schedule)
        return self._messages(server_round, config, grid, self.fraction_train,
                              self.min_train_nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        for k, v in self.evaluate_extra.items():
            config[k] = v
        config["final-round"] = server_round == self.num_rounds
        return self._messages(server_round, config, grid, self.fraction_evaluate,
                              self.min_evaluate_nodes, MessageType.EVALUATE)

    # ------------------------------------------------------------------ aggregation
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept, problems = split_replies(replies, server_round, "train")
        acc = RoundAccumulator(self.keyset, server_round, schedule=self.schedule)
        good = []
        for msg in kept:
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
            good.append(msg)
        for p in problems:
            log.warning("%s", p)
        self.problems = problems
        self.accepted_replies, self.rejected_replies = len(good), len(problems)
        if not good:
            return None, None
        record = acc.finalize()
        self.aggregate_log().append(record)
        metrics = MetricRecord({
            "train_loss": float(weighted_metric(good, "train_loss") or 0.0),
            "num-examples": int(sum(float(m.content.metric_records["metrics"]["num-examples"])
                                    for m in good)),
            "prune_ratio": float(prune_ratio(server_round, self.schedule)),
            **silo_timings(good),
        })
        marker = ArrayRecord(OrderedDict(
            [("aggregated-round", Array(np.array([server_round], np.int64)))]))
        return marker, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        kept, problems = split_replies(replies, server_round, "evaluate")
        for p in problems:
            log.warning("%s", p)
        good = []
        for msg in kept:
            try:
                check_reply_round(msg, server_round)
            except ValueError as exc:
                log.warning("%s", exc)
                continue
            held = msg.content.metric_records["metrics"].get("global-round")
            if held is not None:
                self.known_round[msg.metadata.src_node_id] = int(held)
            good.append(msg)
        loss = weighted_metric(good, "eval_loss", weight_key="num-tokens")
        if loss is None:
            return None
        return MetricRecord({"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0))),
                             **{k.replace("silo_load", "silo_eval_load"): v
                                for k, v in silo_timings(good).items()}})
