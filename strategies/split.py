"""``split``: U-shaped split learning; the ServerApp's relay trains the middle, FedAvg the rest.

The silos hold the embeddings, the first ``split.head-layers`` blocks, the last
``split.tail-layers`` blocks and the LM head; the server holds the middle blocks and their LoRA
adapter behind a gRPC relay (:class:`~fedshield_flwr.split.relay.control.RelayControl`) that this
strategy hosts for the whole run; the message keys are :mod:`fedshield_flwr.split.protocol`'s. Per round ``t``:

1. ``configure_train`` sets the middle adapter's learning rate (the silos' cosine schedule),
   gives it a fresh optimizer (as every silo's is), and sends each sampled silo only round
   control: the relay address, a bearer token issued to that silo for round ``t``, the silo
   name the token is bound to, the CA certificate when the relay serves TLS, and the global
   silo-side (head + tail) adapter. The global adapter is empty until a round has produced one:
   every silo then starts from the initial adapter in its silo parts package (the seeded LoRA
   of the unsplit model). With ``delivery``, the first message to a silo that lacks the package
   carries it (:class:`RelayRounds`); the middle blocks never leave the server.
2. Each silo trains through the relay: its head outputs go up, the middle outputs come back, its
   gradient w.r.t. them goes up, the gradient w.r.t. its head outputs comes back. The relay
   batches concurrent silos into one middle step and trains the middle adapter.
3. ``aggregate_train`` revokes the round's tokens (a straggler's stream fails on its next
   message) and averages the head + tail adapters weighted by examples, validating every reply
   like ``fedavg`` does (:class:`~strategies.fedavg.LoraFedAvg`).
4. ``configure_evaluate`` sends fresh tokens and the new adapter; silos report their held-out
   loss computed through the relay (the middle runs without gradients), tokens are revoked.

Flower messages never carry activations, gradients or the middle adapter. :meth:`run` starts the
relay and stops it when the run ends, also on an exception.

With ``split.aggregation='shield'`` (:class:`SplitShield`) steps 1, 3 and 4 are those of
``shield`` instead: messages carry encrypted aggregates, replies CKKS ciphertexts of pruned
head + tail updates, the server only adds them; the final evaluate messages also carry the middle
adapter so that a silo can export the merged adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedshield_flwr.packages.delivery import PackageDelivery
from fedshield_flwr.split.protocol import MIDDLE_RECORD, relay_traffic
from fedshield_flwr.split.relay.control import RelayControl
from fedshield_flwr.wire import encode_arrays
from strategies.base import tap
from strategies.fedavg import LoraFedAvg
from strategies.shield import ShieldStrategy

log = logging.getLogger("fedshield.server")


class RelayRounds:
    """Mixin for a strategy of ``split``: adds relay round control around its hooks.

    With ``delivery`` set, every message also carries the silo parts' hash, and the parts
    package itself goes to each silo that does not hold it yet (asked by a ``query``). The
    aggregation itself (``fedavg`` or ``shield``) is the next class in the MRO.
    """

    relay: RelayControl
    delivery: PackageDelivery | None = None

    def _out(self, messages: Iterable[Message], grid: Grid, server_round: int) -> list[Message]:
        messages = self.relay.attach(messages, server_round)
        if self.delivery is not None and messages:
            messages = self.delivery.attach(messages, grid, server_round)
        return messages

    def _track(self, replies: list[Message]) -> None:
        if self.delivery is not None:
            self.delivery.track(replies, self.destinations)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.relay.begin_round(server_round)
        return self._out(super().configure_train(server_round, arrays, config, grid), grid,
                         server_round)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        traffic = {"relay_bytes_up": 0.0, "relay_bytes_down": 0.0}

        def observe(msg: Message) -> None:  # per reply, as it arrives: none is kept
            self._track([msg])
            for k, v in relay_traffic([msg], server_round).items():
                traffic[k] += v

        def then_revoke() -> Iterator[Message]:
            # the tokens are revoked once every reply is in (or the round timed out), not when
            # aggregation starts: a ReplyStream is consumed while the silos still train
            try:
                yield from tap(replies, observe)
            finally:
                self.relay.end_phase(server_round)

        arrays, metrics = super().aggregate_train(server_round, then_revoke())
        self.relay.end_phase(server_round)  # whatever the aggregation consumed
        relay_metrics = {**self.relay.round_metrics(), **traffic}
        if metrics is not None:
            for k, v in relay_metrics.items():
                metrics[k] = v
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._out(super().configure_evaluate(server_round, arrays, config, grid), grid,
                         server_round)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        self.relay.end_phase(server_round)
        self._track(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            traffic = relay_traffic(replies, server_round)
            metrics["relay_eval_bytes"] = traffic["relay_bytes_up"] + traffic["relay_bytes_down"]
        return metrics

    def run(self, *args, **kwargs) -> ArrayRecord:
        """The shared round loop with the relay up; it is stopped however the loop ends."""
        self.relay.start()
        try:
            return super().run(*args, **kwargs)
        finally:
            self.relay.stop()


class SplitFedAvg(RelayRounds, LoraFedAvg):
    """``split`` with FedAvg of the silo-side adapters.

    Parameters
    ----------
    relay : RelayControl
        The run's relay (started by :meth:`run`).
    template : Mapping[str, np.ndarray]
        Names, shapes and dtypes of the head + tail adapter the silos send back (values unused:
        the server holds no trained silo-side weights, only the initial ones it packaged).
    delivery : PackageDelivery, optional
        Sends the silo parts package once per silo (see :class:`RelayRounds`).
    **kwargs
        Passed to ``flwr.serverapp.strategy.FedAvg`` (fractions, minimum node counts).
    """

    def __init__(self, relay: RelayControl, template: Mapping[str, np.ndarray],
                 delivery: PackageDelivery | None = None, **kwargs) -> None:
        super().__init__(template, **kwargs)
        self.relay = relay
        self.delivery = delivery


class SplitShield(RelayRounds, ShieldStrategy):
    """``split`` with the silo-side adapters aggregated by ``shield`` (CKKS, block pruning).

    Parameters
    ----------
    relay : RelayControl
        The run's relay (started by :meth:`run`).
    *args, **kwargs
        Passed to :class:`~strategies.shield.ShieldStrategy` (keyset loader, schedule, rounds,
        extra config entries, fractions, minimum node counts).
    delivery : PackageDelivery, optional
        Sends the silo parts package once per silo (see :class:`RelayRounds`).
    """

    def __init__(self, relay: RelayControl, *args, delivery: PackageDelivery | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relay = relay
        self.delivery = delivery

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        if server_round == self.num_rounds and messages:
            middle = encode_arrays(self.relay.middle.adapter_state())
            for msg in messages:
                msg.content[MIDDLE_RECORD] = middle
        return messages
