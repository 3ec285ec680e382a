"""Silo handlers for ``fedavg``: receive the global adapter, train or evaluate, reply."""

from __future__ import annotations

import logging
import time

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedshield_flwr import protocol as p
from fedshield_flwr.config import NodeSettings, RunConfig
from fedshield_flwr.generation import GenerationResult
from fedshield_flwr.silo import evaluate_round, generate_round, get_runtime, train_round
from fedshield_flwr.wire import decode_adapter, encode_arrays

log = logging.getLogger("fedshield.silo")


def _setup(msg: Message, context: Context):
    cfg = RunConfig.from_flat(context.run_config)
    node = NodeSettings.from_flat(context.node_config)
    server_round = p.message_round(msg)
    t0 = time.time()
    rt = get_runtime(cfg, node)
    load_s = time.time() - t0
    t0 = time.time()
    who = f"server message to silo {node.partition_id} in round {server_round}"
    adapter = decode_adapter(msg.content[p.ARRAYS], rt.adapter_state(), who)
    return cfg, node, server_round, rt, adapter, load_s, time.time() - t0


def train(msg: Message, context: Context) -> Message:
    if p.config_of(msg).get(KEY_CLIPPING_NORM) is not None:
        # dp.level='client': Flower's mod clips (reply - received) to the norm the server sent,
        # so this silo never sends an unclipped update (the server clips again, idempotently)
        return fixedclipping_mod(msg, context, _train)
    return _train(msg, context)


def _train(msg: Message, context: Context) -> Message:
    cfg, node, server_round, rt, adapter, load_s, decode_s = _setup(msg, context)
    result = train_round(rt, cfg, node, server_round, adapter)
    log.info("silo %d round %d: train_loss=%.4f (%d steps, %.1f s)", node.partition_id,
             server_round, result.loss, result.steps, result.seconds)
    return train_reply(msg, rt, result, server_round, load_s, decode_s)


def train_reply(msg: Message, rt, result, server_round: int, load_s: float,
                decode_s: float) -> Message:
    """The reply a plaintext-adapter silo sends after training: its adapter + ``TrainResult``."""
    t0 = time.time()
    arrays = encode_arrays(rt.adapter_state())
    metrics = p.train_metrics(result, server_round, **{
        p.LOAD_S: load_s, p.SERIALIZE_S: decode_s + time.time() - t0})
    return p.reply(msg, metrics, **{p.ARRAYS: arrays})


def evaluate(msg: Message, context: Context) -> Message:
    cfg, node, server_round, rt, adapter, load_s, _ = _setup(msg, context)
    t0 = time.time()
    result = evaluate_round(rt, cfg, node, adapter)
    generated = generate_round(rt, cfg, node, f"round {server_round}")
    return evaluate_reply(msg, result, server_round, load_s, time.time() - t0, generated)


def evaluate_reply(msg: Message, result, server_round: int, load_s: float,
                   eval_s: float, generated: GenerationResult | None = None) -> Message:
    """The reply every plaintext-adapter silo sends after evaluating (``EvalResult`` + timings,
    with ``eval.generate`` the ``GenerationResult``)."""
    return p.reply(msg, p.eval_metrics(result, server_round, generated,
                                       **{p.LOAD_S: load_s, p.EVAL_S: eval_s}))
