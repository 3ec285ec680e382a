"""The relay a ServerApp hosts for one ``split`` run: lifecycle, per-round tokens, middle schedule.

:class:`RelayControl` binds the :class:`~fedshield_flwr.split.relay.server.RelayServer` for the
whole run, issues each sampled silo a token for one round (:meth:`RelayControl.tickets`), revokes
them when the round's phase ends, and reports the relay's counters per round. The strategy
(``strategies/split.py``) calls it around its hooks.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable

import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedshield_flwr.protocol import CONFIG
from fedshield_flwr.split.middle import MiddleServer
from fedshield_flwr.split.protocol import RelayTicket
from fedshield_flwr.split.relay.server import RelayServer
from fedshield_flwr.split.settings import SplitSettings

log = logging.getLogger("fedshield.server")


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
            ticket = RelayTicket(self.public_address,
                                 server.issue_token(silo=str(node), round=server_round),
                                 str(node), self.ca_pem.encode() if self.ca_pem else None)
            config = dict(msg.content.config_records.get(CONFIG, ConfigRecord()))
            config.update(ticket.as_config())
            content = RecordDict({k: v for k, v in msg.content.items() if k != CONFIG})
            content[CONFIG] = ConfigRecord(config)
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
