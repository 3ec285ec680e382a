"""``fedavg``: plain LoRA FedAvg, the baseline every privacy mode is measured against.

Only LoRA tensors cross the wire, as an ``ArrayRecord``; the server averages them weighted by the
number of examples each silo trained on. Every reply is validated on its own (round, names,
shapes, dtype, finite values, duplicates): a bad reply is logged with the silo and the round and
left out, and the round goes on with the others. With ``strategy.optimizer`` other than
``fedavg`` the mean is the "average" one of Flower's server optimizers steps from
(:mod:`fedshield_flwr.optimizers`).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedshield_flwr.dp.client import ClientDp
from fedshield_flwr.optimizers import ServerOptimizer
from fedshield_flwr.protocol import ARRAYS, CONFIG, NUM_EXAMPLES, check_reply_round, reply_metrics
from fedshield_flwr.wire import PayloadError, decode_adapter, decode_arrays, encode_arrays
from strategies.base import MetricsFold, RoundLoop, WeightedSum, accepted, evaluate_metrics

log = logging.getLogger("fedshield.server")


def weighted_average(
    states: list[Mapping[str, np.ndarray]], weights: list[float]
) -> "OrderedDict[str, np.ndarray]":
    """Exact weighted mean of a list of adapter states (accumulated in float64).

    Contributions are summed in a canonical order (by weight, then content digest), so the
    result does not depend on the order of the list. The strategies do not build such a list:
    they fold each reply into a :class:`~strategies.base.WeightedSum` as it arrives (the same
    float64 sums in arrival order); this is the reference they are tested against.
    """
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weighted_average: the weights sum to zero")

    def digest(state: Mapping[str, np.ndarray]) -> str:
        h = hashlib.sha256()
        for v in state.values():
            h.update(np.ascontiguousarray(v).tobytes())
        return h.hexdigest()

    order = sorted(range(len(states)), key=lambda i: (weights[i], digest(states[i])))
    acc = WeightedSum()
    for i in order:
        acc.add(states[i], weights[i])
    return acc.mean()


class LoraFedAvg(RoundLoop, FedAvg):
    """FedAvg over LoRA adapters with per-reply validation.

    Parameters
    ----------
    template : Mapping[str, np.ndarray]
        The adapter the silos must send back: names, shapes and dtypes are checked against it.
    optimizer : ServerOptimizer, optional
        The server optimizer applied to the weighted mean (default: none, plain FedAvg).
    client_dp : ClientDp, optional
        Client-level DP (``dp.level='client'``): updates are clipped and the uniform mean
        noised (:mod:`fedshield_flwr.dp.client`) before the server optimizer.
    **kwargs
        Passed to ``flwr.serverapp.strategy.FedAvg`` (fractions, minimum node counts).
    """

    def __init__(self, template: Mapping[str, np.ndarray],
                 optimizer: ServerOptimizer | None = None, client_dp: ClientDp | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.client_dp = client_dp
        self.template = OrderedDict((k, np.asarray(v)) for k, v in template.items())
        self.optimizer = optimizer or ServerOptimizer("fedavg")
        self.current_arrays: ArrayRecord | None = None  # the global arrays sent this round
        self.accepted_replies = 0
        self.rejected_replies = 0
        self.problems: list[str] = []

    def validate_train_reply(self, msg: Message, server_round: int) -> tuple[dict, float]:
        """Decoded adapter and weight of one reply, or :class:`PayloadError` naming the silo."""
        node = msg.metadata.src_node_id
        try:
            check_reply_round(msg, server_round)
        except ValueError as exc:
            raise PayloadError(str(exc)) from exc
        if ARRAYS not in msg.content.array_records:
            raise PayloadError(f"silo node {node} sent no '{ARRAYS}' in round {server_round}")
        weight = float(reply_metrics(msg).get(NUM_EXAMPLES, 0))
        if not weight > 0:
            raise PayloadError(f"silo node {node} reported num-examples={weight} in round "
                               f"{server_round}; it must be positive")
        who = f"silo node {node} in round {server_round}"
        return decode_adapter(msg.content.array_records[ARRAYS], self.template, who), weight

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays  # what the server optimizer steps from
        if self.client_dp is None:
            return super().configure_train(server_round, arrays, config, grid)
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self.client_dp.begin_round(server_round, len(msgs), len(list(grid.get_node_ids())))
        for msg in msgs:  # the clipping norm for Flower's fixedclipping_mod on the silos
            msg.content.config_records[CONFIG].update(self.client_dp.config_entries(server_round))
        return msgs

    def dp_reference(self) -> Mapping[str, np.ndarray]:
        """Where the silos started this round: the update that is clipped is reply - this."""
        assert self.current_arrays is not None, "configure_train did not run"
        return decode_arrays(self.current_arrays, "server global adapter")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The weighted mean of the valid replies, stepped by the server optimizer if any."""
        mean, metrics = self.average_train(server_round, replies)
        if mean is None or not self.optimizer.active:
            return mean, metrics
        assert self.current_arrays is not None, "configure_train did not run"
        current = decode_arrays(self.current_arrays, "server global adapter")
        return self.optimizer.step(server_round, current, mean), metrics

    def average_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply; the exact weighted mean of the valid ones and their metrics.

    ``replies`` may be a :class:`~strategies.base.ReplyStream`: it is consumed once, in order
    of arrival, and memory holds the float64 running sums, not the replies.
    """
        problems: list[str] = []
        acc, fold = WeightedSum(), MetricsFold()
        reference = self.dp_reference() if self.client_dp is not None else None
        examples = 0.0  # under client DP acc.total counts replies, this their examples
        # Each reply is validated on its own and folded as it arrives; none is kept (a bad one
        # is named in problems and leaves the running sums untouched).
        for msg in accepted(replies, server_round, "train", lambda: self.destinations, problems):
            try:
                state, weight = self.validate_train_reply(msg, server_round)
            except PayloadError as exc:
                problems.append(str(exc))
                continue
            if self.client_dp is not None:  # its clipped update, unweighted (uniform mean)
                acc.add(self.client_dp.clip(state, reference), 1.0)
                examples += weight
            else:
                acc.add(state, weight)
            fold.add(msg)
            del state, msg
        self.settle_train(acc.count, problems)
        if not acc.count:
            return None, None
        if self.client_dp is not None:  # clipped, uniform, noised (weights would raise C/n)
            mean = self.client_dp.aggregate_sum(server_round, acc.sum(), reference)
            extra = self.client_dp.end_round(server_round, acc.count)
            return encode_arrays(mean), fold.record(examples, **extra)
        return encode_arrays(acc.mean()), fold.record(acc.total)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return evaluate_metrics(self.accepted_evaluate_replies(server_round, replies))
