"""Silo handlers for ``shield``: decrypt the downlink, train, upload an encrypted pruned update.

What a silo keeps between messages lives in Flower's ``context.state`` (on the silo only): the
global adapter it has rebuilt, the round of it, and the error-feedback residual of what pruning
held back. The server never receives a plaintext tensor.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from fedshield_flwr.config import NodeSettings, RunConfig, ShieldSettings
from fedshield_flwr.crypto import (
    PruneSchedule,
    SiloState,
    catch_up,
    encrypt_update,
    with_residual,
)
from fedshield_flwr.crypto.provision import silo_keyset
from fedshield_flwr.models import export_adapter
from fedshield_flwr.silo import evaluate_round, get_runtime, train_round
from fedshield_flwr.wire import decode_arrays, encode_arrays

log = logging.getLogger("fedshield.silo")
STATE_KEY, GLOBAL_KEY = "shield.state", "shield.global"


def schedule_of(sh: ShieldSettings, num_rounds: int) -> PruneSchedule:
    """The public pruning schedule every silo and the server derive from the run config."""
    return PruneSchedule(target=sh.prune_ratio, start_round=sh.prune_start_round,
                         ramp_rounds=sh.prune_ramp_rounds, lead_weight=sh.prune_lead_weight,
                         flush_round=num_rounds if sh.flush_final_round else 0,
                         flush_every=sh.flush_every)


def _restore(context: Context, initial) -> tuple[OrderedDict, SiloState]:
    arrays = context.state.array_records
    if STATE_KEY not in arrays:
        return OrderedDict(initial), SiloState()
    state = SiloState.from_arrays({k: v.numpy() for k, v in arrays[STATE_KEY].items()})
    return OrderedDict(decode_arrays(arrays[GLOBAL_KEY], "silo state")), state


def _store(context: Context, global_adapter, state: SiloState) -> None:
    context.state[STATE_KEY] = ArrayRecord(OrderedDict(
        (k, Array(np.ascontiguousarray(v))) for k, v in state.to_arrays().items()))
    context.state[GLOBAL_KEY] = encode_arrays(global_adapter)


def _setup(msg: Message, context: Context):
    cfg = RunConfig.from_flat(context.run_config)
    node = NodeSettings.from_flat(context.node_config)
    sh = ShieldSettings.from_config(cfg)
    conf = msg.content["config"]
    server_round = int(conf["server-round"])
    t0 = time.time()
    rt = get_runtime(cfg, node)
    keyset = silo_keyset(str(context.node_config.get("shield-key", "")), sh.auto_keys,
                         str(conf.get("keys-tag", "")))
    load_s = time.time() - t0
    t0 = time.time()
    records = [a.numpy() for a in msg.content["downlink"].values()] \
        if "downlink" in msg.content.array_records else []
    global_adapter, state = _restore(context, rt.initial)
    global_adapter, state = catch_up(keyset, global_adapter, records, state,
                                     silo=str(context.node_id))
    return cfg, node, sh, server_round, rt, keyset, global_adapter, state, load_s, time.time() - t0


def train(msg: Message, context: Context) -> Message:
    (cfg, node, sh, server_round, rt, keyset, global_adapter, state, load_s,
     decrypt_s) = _setup(msg, context)
    start = with_residual(global_adapter, state) if sh.local_residual else global_adapter
    result = train_round(rt, cfg, node, server_round, start)
    local = rt.adapter_state()
    update = OrderedDict((k, local[k] - start[k]) for k in start)  # new progress only
    t0 = time.time()
    payload, state = encrypt_update(
        keyset, update, server_round=server_round, silo=str(context.node_id),
        weight=result.num_examples * sh.weight_scale,
        schedule=schedule_of(sh, cfg.num_server_rounds), state=state,
        workers=sh.workers if sh.workers > 0 else (os.cpu_count() or 1))
    encrypt_s = time.time() - t0
    _store(context, global_adapter, state)
    log.info("silo %d round %d: train_loss=%.4f, encrypted upload %.2f MB", node.partition_id,
             server_round, result.loss, len(payload) / 1e6)
    metrics = MetricRecord({
        "train_loss": result.loss, "num-examples": result.num_examples,
        "server-round": server_round, "global-round": state.global_round,
        "load-seconds": load_s, "train-seconds": result.seconds,
        "serialize-seconds": decrypt_s + encrypt_s,
    })
    payload_rec = ArrayRecord(OrderedDict([("payload", Array(np.frombuffer(payload, np.uint8)))]))
    return Message(RecordDict({"payload": payload_rec, "metrics": metrics}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    (cfg, node, sh, server_round, rt, keyset, global_adapter, state, load_s,
     decrypt_s) = _setup(msg, context)
    _store(context, global_adapter, state)
    t0 = time.time()
    result = evaluate_round(rt, cfg, node, global_adapter)
    eval_s = time.time() - t0
    conf = msg.content["config"]
    export_dir = str(context.node_config.get("export-dir", "")) or (
        str(conf.get("export-dir", "")) if node.partition_id == 0 else "")
    if bool(conf.get("final-round", False)) and export_dir:
        export_adapter(export_dir, global_adapter, rt.model.config.model_type, cfg.model.lora,
                       rt.model_path, {"fedshield-round": str(state.global_round)})
        log.info("silo %d exported the final adapter (round %d) to %s", node.partition_id,
                 state.global_round, export_dir)
    metrics = MetricRecord({
        "eval_loss": result.loss, "eval_perplexity": result.perplexity,
        "num-tokens": result.num_tokens, "num-examples": result.num_examples,
        "server-round": server_round, "global-round": state.global_round,
        "load-seconds": load_s, "eval-seconds": eval_s, "serialize-seconds": decrypt_s,
    })
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
