"""Silo handlers for ``lpp``: the base arrives quantized (once), the global adapter k-bit.

``query``: answer whether the announced base package is in this silo's cache. ``train`` /
``evaluate``: rebuild (or reuse) the quantized model from the package, load the de-quantized
k-bit global adapter, train or evaluate, reply as ``fedavg`` does. The silo never loads a base
model of its own.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context, Message

from fedshield_flwr.config import NodeSettings, RunConfig
from fedshield_flwr.lpp import ADAPTER_RECORD, BASE_RECORD, HASH_KEY, silo_runtime
from fedshield_flwr.models.adapter_quant import adapter_from_arrays, dequantize_adapter
from fedshield_flwr.models.lora import AdapterMismatchError, check_adapter_state
from fedshield_flwr.package_cache import has_cached_package
from fedshield_flwr.silo import evaluate_round, train_round
from fedshield_flwr.wire import PayloadError, decode_arrays
from strategies.delivery import announced_hash, query_reply

from .fedavg import evaluate_reply, train_reply

log = logging.getLogger("fedshield.silo")


def query(msg: Message, context: Context) -> Message:
    node = NodeSettings.from_flat(context.node_config)
    content_hash = announced_hash(msg, f"base query to silo {node.partition_id}", HASH_KEY)
    return query_reply(msg, content_hash, has_cached_package(node, content_hash), HASH_KEY)


def _setup(msg: Message, context: Context):
    cfg = RunConfig.from_flat(context.run_config)
    node = NodeSettings.from_flat(context.node_config)
    server_round = int(msg.content["config"]["server-round"])
    who = f"server message to silo {node.partition_id} in round {server_round}"
    content_hash = announced_hash(msg, who, HASH_KEY)
    t0 = time.time()
    base = msg.content.array_records.get(BASE_RECORD)
    arrays = dict(decode_arrays(base, who)) if base is not None else None
    rt = silo_runtime(cfg, node, content_hash, arrays, who)
    load_s = time.time() - t0
    t0 = time.time()
    if ADAPTER_RECORD not in msg.content.array_records:
        raise PayloadError(f"{who} carries no '{ADAPTER_RECORD}' (k-bit global adapter)")
    qa = adapter_from_arrays(decode_arrays(msg.content[ADAPTER_RECORD], who), who)
    adapter = dequantize_adapter(qa)
    try:
        check_adapter_state(rt.adapter_state(), adapter, who)
    except AdapterMismatchError as exc:
        raise PayloadError(f"{exc} (the k-bit adapter does not match this silo's LoRA: "
                           "model.lora settings differ between server and silo)") from exc
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
    return evaluate_reply(msg, result, server_round, load_s, time.time() - t0)
