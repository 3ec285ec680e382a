"""The wire protocol of package delivery: the query, its reply, the hash every message carries.

Before the first message of a phase the server sends each silo not yet known to hold the package
a ``query`` message whose ``config`` carries the content hash under the mode's hash key (lpp:
``base-hash``, split: ``parts-hash``); the silo answers :data:`HAS_KEY`. Every train/evaluate
message then carries the hash, and the package itself (an ``ArrayRecord`` named by the mode) only
for the silos that lack it. The server side is :mod:`.delivery`.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from fedshield_flwr.protocol import CONFIG, ROUND, config_of
from fedshield_flwr.wire import PayloadError, decode_arrays

HAS_KEY = "has-base"  # the silo's answer in its query reply


def query_message(node: int, content_hash: str, hash_key: str, server_round: int) -> Message:
    """The server's question to silo ``node``: is the package with this hash in your cache?"""
    content = RecordDict({CONFIG: ConfigRecord({hash_key: content_hash, ROUND: server_round})})
    return Message(content=content, message_type="query", dst_node_id=node)


def query_reply(msg: Message, content_hash: str, has: bool, hash_key: str) -> Message:
    """A silo's answer to a package query."""
    return Message(RecordDict({CONFIG: ConfigRecord({HAS_KEY: has, hash_key: content_hash})}),
                   reply_to=msg)


def reply_holds(reply: Message, hash_key: str, content_hash: str) -> bool:
    """Whether a query reply says the silo holds exactly this package (server side)."""
    rec = config_of(reply)
    return bool(rec.get(HAS_KEY, False)) and rec.get(hash_key) == content_hash


def announced_hash(msg: Message, who: str, hash_key: str) -> str:
    """The package hash a server message announces (silo side); a clear error if it has none."""
    value = config_of(msg).get(hash_key)
    if not isinstance(value, str) or len(value) != 64:
        raise PayloadError(f"{who} carries no valid '{hash_key}'; do server and silo run the "
                           "same strategy.name and app version?")
    return value


def attached_package(msg: Message, record: str, who: str
                     ) -> OrderedDict[str, np.ndarray] | None:
    """The package arrays a server message carries under ``record``, or None (silo side)."""
    arrays = msg.content.array_records.get(record)
    return decode_arrays(arrays, who) if arrays is not None else None
