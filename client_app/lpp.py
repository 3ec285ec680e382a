"""Silo handlers for ``lpp``: the base arrives quantized (once), the global adapter k-bit.

``query``: answer whether the announced base package is in this silo's cache. ``train`` /
``evaluate``: rebuild (or reuse) the quantized model from the package, load the de-quantized
k-bit global adapter, train or evaluate, reply as ``fedavg`` does. The silo never loads a base
model of its own. The wire format is :mod:`fedshield_flwr.lpp.protocol`.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context, Message

from client_app.fedavg import evaluate_reply, train_reply
from fedshield_flwr import protocol as p
from fedshield_flwr.config import NodeSettings, RunConfig
from fedshield_flwr.lpp import protocol as lp
from fedshield_flwr.lpp.package import LPP_KIND
from fedshield_flwr.lpp.silo import checked_adapter, silo_runtime
from fedshield_flwr.packages.cache import has_cached_package
from fedshield_flwr.packages.protocol import announced_hash, query_reply
from fedshield_flwr.silo import evaluate_round, generate_round, train_round

log = logging.getLogger("fedshield.silo")


def query(msg: Message, context: Context) -> Message:
    node = NodeSettings.from_flat(context.node_config)
    content_hash = announced_hash(msg, f"base query to silo {node.partition_id}", lp.HASH_KEY)
    return query_reply(msg, content_hash, has_cached_package(node, content_hash, LPP_KIND),
                       lp.HASH_KEY)


def _setup(msg: Message, context: Context):
    cfg = RunConfig.from_flat(context.run_config)
    node = NodeSettings.from_flat(context.node_config)
    server_round = p.message_round(msg)
    who = f"server message to silo {node.partition_id} in round {server_round}"
    t0 = time.time()
    content_hash, base = lp.read_base(msg, who)
    rt = silo_runtime(cfg, node, content_hash, base, who)
    load_s = time.time() - t0
    t0 = time.time()
    adapter = checked_adapter(rt, lp.read_adapter(msg, who), who)
    return cfg, node, server_round, rt, adapter, load_s, time.time() - t0, base is not None


def train(msg: Message, context: Context) -> Message:
    cfg, node, server_round, rt, adapter, load_s, decode_s, got_base = _setup(msg, context)
    result = train_round(rt, cfg, node, server_round, adapter)
    log.info("silo %d round %d: train_loss=%.4f (%d steps, %.1f s, quantized base%s)",
             node.partition_id, server_round, result.loss, result.steps, result.seconds,
             " received" if got_base else " from cache")
    return train_reply(msg, rt, result, server_round, load_s, decode_s)


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate what this silo holds: quantized base + k-bit global adapter."""
    cfg, node, server_round, rt, adapter, load_s, _, _ = _setup(msg, context)
    t0 = time.time()
    result = evaluate_round(rt, cfg, node, adapter)
    generated = generate_round(rt, cfg, node, f"round {server_round}")
    return evaluate_reply(msg, result, server_round, load_s, time.time() - t0, generated)
