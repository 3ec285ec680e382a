"""``split``: U-shaped split learning; the ServerApp's relay trains the middle, FedAvg the rest.

The silos hold the embeddings, the first ``split.head-layers`` blocks, the last
``split.tail-layers`` blocks and the LM head; the server holds the middle blocks and their LoRA
adapter behind a gRPC relay (:class:`~fedshield_flwr.relay.RelayServer`) that this strategy hosts
for the whole run. Per round ``t``:

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

import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedshield_flwr.models.split import MiddleServer, SplitSettings
from fedshield_flwr.relay import RelayServer
from fedshield_flwr.wire import encode_arrays

from .delivery import PackageDelivery
from .fedavg import LoraFedAvg
from .shield import ShieldStrategy

log = logging.getLogger("fedshield.server")

# Round control in the ConfigRecord "config" of every train/evaluate message (silo side:
# :meth:`RelayTicket.from_config`).
ADDRESS_KEY, TOKEN_KEY, SILO_KEY, CA_KEY = "relay-address", "relay-token", "silo-name", "relay-ca"
# Relay traffic a silo reports in its reply metrics (bytes of serialized relay messages).
RELAY_UP_KEY, RELAY_DOWN_KEY = "relay-bytes-up", "relay-bytes-down"
# split.aggregation='shield': the middle adapter in the final evaluate messages, for the silos
# that export the merged adapter (the server cannot: it never decrypts head + tail).
MIDDLE_RECORD = "middle"
# The silo parts package (fedshield_flwr.models.parts), sent once per silo, and its hash.
PARTS_RECORD, PARTS_HASH_KEY = "parts", "parts-hash"


@dataclass(frozen=True)
class RelayTicket:
    """What a silo needs to open its relay stream for one round (read from the message)."""

    address: str
    token: str
    silo: str
    ca_pem: bytes | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], who: str) -> RelayTicket:
        missing = [k for k in (ADDRESS_KEY, TOKEN_KEY, SILO_KEY) if not config.get(k)]
        if missing:
            raise ValueError(
                f"{who}: the server message lacks {', '.join(missing)}; the ServerApp and this "
                "ClientApp must both run strategy.name='split' from the same app version")
        ca = str(config.get(CA_KEY, ""))
        return cls(str(config[ADDRESS_KEY]), str(config[TOKEN_KEY]), str(config[SILO_KEY]),
                   ca.encode() if ca else None)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RelayControl:
    """The relay a ServerApp hosts for one run: lifecycle, per-round tokens, middle schedule.

    Parameters
    ----------
    middle : MiddleServer
        The server's middle blocks and their adapter.
    settings : SplitSettings
        ``split.*``: port, bind address, host silos dial, certificates, token lifetime.
    learning_rate : callable
        ``learning_rate(server_round)`` of the middle adapter (the silos use the same schedule).
    seed : int
        Seeds the server's random draws (the middle's LoRA dropout) per round.
    """

    def __init__(self, middle: MiddleServer, settings: SplitSettings,
                 learning_rate: Callable[[int], float], seed: int = 0) -> None:
        self.middle = middle
        self.settings = settings
        self.learning_rate = learning_rate
        self.seed = seed
        self.server: RelayServer | None = None
        self.public_address = ""
        self.ca_pem = ""
        self._last: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        """Bind the relay (``split.relay-port``; 0 = a free port) and return the address silos dial."""
        if self.server is not None:
            return self.public_address
        s = self.settings
        certificates = s.server_certificates()
        host = s.relay_host or "127.0.0.1"
        if not _is_loopback(host) and _is_loopback(s.relay_bind):
            raise ValueError(
                f"split.relay-host='{host}' but split.relay-bind='{s.relay_bind}' only accepts "
                "connections from this machine; set split.relay-bind='0.0.0.0' (or the interface "
                "the silos reach) so remote silos can connect")
        if certificates is None and not _is_loopback(s.relay_bind):
            log.warning("split: the relay serves plaintext on %s; set split.relay-ca-cert, "
                        "split.relay-server-cert and split.relay-server-key for TLS",
                        s.relay_bind)
        server = RelayServer(self.middle, s)
        port = server.start(port=s.relay_port, host=s.relay_bind, certificates=certificates)
        self.server = server
        self.public_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.ca_pem = certificates[0].decode() if certificates else ""
        self._last = self._counters()
        log.info("split: relay for the middle blocks %s, silos dial %s%s",
                 self.middle.layout.fingerprint(), self.public_address,
                 " (TLS)" if certificates else "")
        return self.public_address

    def stop(self) -> None:
        """Stop the relay (idempotent); the middle adapter stays for checkpoint and export."""
        if self.server is not None:
            server, self.server = self.server, None
            server.stop()
            log.info("split: relay stopped")

    @property
    def running(self) -> bool:
        return self.server is not None

    def _require(self) -> RelayServer:
        if self.server is None:
            raise RuntimeError("split: the relay is not running; the strategy's run() starts it")
        return self.server

    # ------------------------------------------------------------------ rounds
    def begin_round(self, server_round: int) -> float:
        """Middle learning rate of ``server_round``, a fresh optimizer and a reseeded dropout.

        Nothing of the middle's training state but its adapter outlives a round, so a run
        resumed from a checkpoint continues as the uninterrupted run would (when the silos'
        steps reach the relay in the same order: the middle trains on them in arrival order).
        """
        lr = float(self.learning_rate(server_round))
        self.middle.set_learning_rate(lr)
        self.middle.reset_optimizer()
        torch.manual_seed(self.seed + 1000 * server_round)
        return lr

    def attach(self, messages: Iterable[Message], server_round: int) -> list[Message]:
        """Copy ``messages`` with each silo's round control added to its ``config`` record."""
        server = self._require()
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            config = dict(msg.content.config_records.get("config", ConfigRecord()))
            config.update({
                ADDRESS_KEY: self.public_address,
                TOKEN_KEY: server.issue_token(silo=str(node), round=server_round),
                SILO_KEY: str(node),
            })
            if self.ca_pem:
                config[CA_KEY] = self.ca_pem
            content = RecordDict({k: v for k, v in msg.content.items() if k != "config"})
            content["config"] = ConfigRecord(config)
            out.append(Message(content=content, message_type=msg.metadata.message_type,
                               dst_node_id=node))
        return out

    def end_phase(self, server_round: int) -> int:
        """Revoke the tokens of ``server_round``: streams still open fail on their next message."""
        return self.server.revoke_round(server_round) if self.server is not None else 0

    def _counters(self) -> dict[str, float]:
        st = self.server.stats() if self.server else {}
        return {k: float(st.get(k, 0)) for k in ("groups", "silo_steps", "tokens",
                                                 "eval_forwards", "compute_seconds",
                                                 "rejected_auth", "rejected_frames")}

    def round_metrics(self) -> dict[str, float]:
        """Relay counters since the previous call (``relay_*``) and the middle's state."""
        now = self._counters()
        out = {f"relay_{k}": now[k] - self._last.get(k, 0.0) for k in now}
        self._last = now
        if self.server is not None:
            st = self.server.stats()
            out["relay_max_group_size"] = float(st.get("max_group_size", 0))
            out["relay_drops"] = float(len(st.get("drops", [])))
        out["middle_learning_rate"] = float(self.middle.optimizer.param_groups[0]["lr"])
        return out


def relay_traffic(replies: Iterable[Message], server_round: int) -> dict[str, float]:
    """Relay bytes the silos report for ``server_round`` (serialized relay messages)."""
    up = down = 0.0
    for msg in replies:
        if msg.has_error():
            continue
        rec = msg.content.metric_records.get("metrics")
        if rec is None or int(rec.get("server-round", -1)) != server_round:
            continue
        up += float(rec.get(RELAY_UP_KEY, 0.0))
        down += float(rec.get(RELAY_DOWN_KEY, 0.0))
    return {"relay_bytes_up": up, "relay_bytes_down": down}


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
        replies = list(replies)
        self.relay.end_phase(server_round)
        self._track(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        relay_metrics = {**self.relay.round_metrics(), **relay_traffic(replies, server_round)}
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
