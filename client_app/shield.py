"""Silo handlers for ``shield``: decrypt the downlink, train, upload an encrypted pruned update.

The silo steps (catch-up, residual, encryption, state kept in ``context.state``) are
:mod:`fedshield_flwr.shield.silo`; the wire format is :mod:`fedshield_flwr.shield.protocol`.
The server never receives a plaintext tensor.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context, Message

from fedshield_flwr import protocol as p
from fedshield_flwr.config import NodeSettings, RunConfig
from fedshield_flwr.models import export_adapter, public_model_name
from fedshield_flwr.optimizers import ServerOptimizer
from fedshield_flwr.shield import protocol as sp
from fedshield_flwr.shield import silo as shield_silo
from fedshield_flwr.shield.settings import ShieldSettings
from fedshield_flwr.silo import evaluate_round, generate_round, get_runtime, train_round

log = logging.getLogger("fedshield.silo")


def _setup(msg: Message, context: Context):
    cfg = RunConfig.from_flat(context.run_config)
    node = NodeSettings.from_flat(context.node_config)
    sh = ShieldSettings.from_config(cfg)
    server_round = p.message_round(msg)
    t0 = time.time()
    rt = get_runtime(cfg, node)
    keyset = shield_silo.load_keyset(context.node_config, sh, sp.keys_tag(msg),
                                     sp.keys_max_silos(msg))
    load_s = time.time() - t0
    t0 = time.time()
    optimizer = ServerOptimizer.from_settings(cfg.strategy)  # stepped here, never on the server
    global_adapter, state = shield_silo.caught_up(context.state, keyset, rt.initial,
                                                  sp.read_downlink(msg), str(context.node_id),
                                                  optimizer)
    return (cfg, node, sh, server_round, rt, keyset, global_adapter, state, optimizer, load_s,
            time.time() - t0)


def train(msg: Message, context: Context) -> Message:
    (cfg, node, sh, server_round, rt, keyset, global_adapter, state, optimizer, load_s,
     decrypt_s) = _setup(msg, context)
    start = shield_silo.training_start(global_adapter, state, sh)
    result = train_round(rt, cfg, node, server_round, start)
    t0 = time.time()
    payload, state = shield_silo.encrypt_progress(
        keyset, start, rt.adapter_state(), server_round=server_round, silo=str(context.node_id),
        num_examples=result.num_examples, settings=sh, num_rounds=cfg.num_server_rounds,
        state=state, dp=p.config_of(msg) if cfg.dp.level == "client" else None)
    encrypt_s = time.time() - t0
    shield_silo.save(context.state, global_adapter, state, optimizer)
    log.info("silo %d round %d: train_loss=%.4f, encrypted upload %.2f MB", node.partition_id,
             server_round, result.loss, len(payload) / 1e6)
    metrics = p.train_metrics(result, server_round, **{
        sp.GLOBAL_ROUND: state.global_round, p.LOAD_S: load_s,
        p.SERIALIZE_S: decrypt_s + encrypt_s})
    return p.reply(msg, metrics, **{sp.PAYLOAD: sp.payload_record(payload)})


def evaluate(msg: Message, context: Context) -> Message:
    (cfg, node, sh, server_round, rt, keyset, global_adapter, state, optimizer, load_s,
     decrypt_s) = _setup(msg, context)
    shield_silo.save(context.state, global_adapter, state, optimizer)
    t0 = time.time()
    result = evaluate_round(rt, cfg, node, global_adapter)
    generated = generate_round(rt, cfg, node, f"round {server_round}")
    eval_s = time.time() - t0
    export_dir = sp.export_target(msg, context.node_config, node.partition_id)
    if export_dir:
        export_adapter(export_dir, global_adapter, rt.model.config.model_type, cfg.model.lora,
                       public_model_name(cfg.model.name), {"fedshield-round": str(state.global_round)})
        log.info("silo %d exported the final adapter (round %d) to %s", node.partition_id,
                 state.global_round, export_dir)
    metrics = p.eval_metrics(result, server_round, generated, **{
        sp.GLOBAL_ROUND: state.global_round, p.LOAD_S: load_s, p.EVAL_S: eval_s,
        p.SERIALIZE_S: decrypt_s})
    return p.reply(msg, metrics)
