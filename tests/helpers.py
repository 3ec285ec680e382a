"""Small builders for real Flower Messages and Contexts used by several tests."""

from __future__ import annotations

from typing import Any

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
