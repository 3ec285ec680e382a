"""Server side of package delivery: send a content-addressed package once per silo.

The packages are ``lpp``'s quantized base and ``split``'s silo parts; the wire side is
:mod:`.protocol`.

Before the first message of a phase the server asks each silo not yet known to hold the package
(a Flower ``query`` message carrying the content hash) whether it is in its disk cache, and then
attaches the package only to the messages of silos that lack it. A silo whose reply fails is
asked again next time, so a silo that lost its cache gets a fresh copy; a silo that answered
holds the package.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedshield_flwr.packages.protocol import query_message, reply_holds
from fedshield_flwr.protocol import CONFIG
from fedshield_flwr.wire import encode_arrays

log = logging.getLogger("fedshield.server")

QUERY_TIMEOUT_S = 600.0  # a deployed silo starts a fresh ClientApp process per message


class PackageDelivery:
    """Which silos hold a package, and the messages that give it to the others.

    Parameters
    ----------
    arrays : callable returning dict of str to np.ndarray
        The package as arrays; called once, for the first silo that needs it.
    content_hash : str
        Its SHA-256; every message carries it under ``hash_key``.
    record : str
        Name of the ``ArrayRecord`` the package travels in.
    hash_key : str
        ``ConfigRecord`` key of the hash (queries, replies and every train/evaluate message).
    what : str
        What the package is, for the log ("base", "silo parts").
    """

    def __init__(self, arrays: Callable[[], Mapping[str, np.ndarray]], content_hash: str,
                 record: str, hash_key: str, what: str) -> None:
        self._arrays = arrays
        self._record: ArrayRecord | None = None
        self.content_hash = content_hash
        self.record_name = record
        self.hash_key = hash_key
        self.what = what
        self.holders: set[int] = set()  # silos known to hold the package on disk
        self.sent_to: list[int] = []  # silos it was attached for (all rounds)

    def record(self) -> ArrayRecord:
        if self._record is None:
            self._record = encode_arrays(self._arrays())
        return self._record

    def query(self, grid: Grid, node_ids: Iterable[int], server_round: int) -> None:
        """Ask silos not yet known to hold the package whether their cache has it."""
        ask = [n for n in node_ids if n not in self.holders]
        if not ask:
            return
        msgs = [query_message(n, self.content_hash, self.hash_key, server_round) for n in ask]
        for msg in grid.send_and_receive(messages=msgs, timeout=QUERY_TIMEOUT_S):
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning("silo node %d failed the %s query of round %d: %s", node, self.what,
                            server_round, msg.error.reason)
                continue
            if reply_holds(msg, self.hash_key, self.content_hash):
                self.holders.add(node)
        log.info("round %d: %d of %d asked silos hold %s %s; sending it to the others",
                 server_round, len(self.holders & set(ask)), len(ask), self.what,
                 self.content_hash[:12])

    def attach(self, messages: Iterable[Message], grid: Grid, server_round: int) -> list[Message]:
        """Copies of ``messages`` with the hash in ``config`` and the package for silos without it.

        Copies, because Flower's strategies give all messages of a phase one shared RecordDict.
        """
        messages = list(messages)
        self.query(grid, [m.metadata.dst_node_id for m in messages], server_round)
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            content = RecordDict({k: v for k, v in msg.content.items() if k != CONFIG})
            config = dict(msg.content.config_records.get(CONFIG, ConfigRecord()))
            config[self.hash_key] = self.content_hash
            content[CONFIG] = ConfigRecord(config)
            if node not in self.holders:
                content[self.record_name] = self.record()
                self.sent_to.append(node)
            out.append(Message(content=content, message_type=msg.metadata.message_type,
                               dst_node_id=node))
        return out

    def track(self, replies: Iterable[Message], destinations: Mapping[str, int]) -> None:
        """A silo that answered holds the package; one that failed is asked again next time."""
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.holders.discard(destinations.get(msg.metadata.reply_to_message_id, node))
            else:
                self.holders.add(node)
