"""Small builders for real Flower Messages and Contexts used by several tests."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict


def server_message(content: RecordDict, node_id: int, message_type: str = "train") -> Message:
    """A message from the server (node 0) to ``node_id``, as a Grid would build it."""
    return Message(content, dst_node_id=node_id, message_type=message_type)


def reply(msg: Message, content: RecordDict) -> Message:
    """The reply of ``msg``'s destination node carrying ``content``."""
    return Message(content, reply_to=msg)


def context(run_config: dict[str, Any], node_config: dict[str, Any] | None = None,
            node_id: int = 1) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=node_config or {},
                   state=RecordDict(), run_config=run_config)


def tiny_run_config(**overrides: Any) -> dict[str, Any]:
    """The project's default run config with a tiny model and very short training."""
    from fedshield_flwr.config import default_flat_config

    cfg = default_flat_config()
    cfg.update({
        "model.name": "tiny:llama",
        "train.max-steps": 2,
        "train.batch-size": 4,
        "train.progress": False,
        "data.max-eval-examples": 8,
        "data.max-length": 64,
    })
    cfg.update(overrides)
    return cfg


class PushPull:
    """``push_messages``/``pull_messages`` (what the strategies stream train replies with) for a
    test grid that defines ``send_and_receive``: pushing delivers and keeps the replies by the id
    of the message they answer; pulling hands each one out once."""

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            if not m.metadata.message_id:
                m.metadata.__dict__["_message_id"] = str(uuid4())
        box = self.__dict__.setdefault("_replies", {})
        for r in self.send_and_receive(messages):
            box[r.metadata.reply_to_message_id] = r
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        box = self.__dict__.setdefault("_replies", {})
        return [box.pop(i) for i in list(message_ids) if i in box]
