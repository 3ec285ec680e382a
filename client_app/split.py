"""Silo handlers for ``split``: head + tail here, the middle blocks through the server's relay.

A message carries round control only (:mod:`fedshield_flwr.split.protocol`): the relay ticket,
the silo parts' hash (and the package when this silo's cache lacks it) and the global head + tail
adapter. The silo trains or evaluates through one relay stream (:mod:`fedshield_flwr.split.silo`)
and replies with its head + tail adapter (train) or its held-out loss (evaluate).

With ``split.aggregation='shield'`` the head + tail adapter is aggregated as in ``shield``
(:mod:`fedshield_flwr.shield.silo`): the message carries the encrypted aggregates this silo has
not applied yet, the silo uploads the CKKS ciphertexts of its pruned update, and on the final
round the silos that export merge the global head + tail adapter with the middle adapter the
server sends then into one PEFT adapter.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context, Message

from fedshield_flwr import protocol as p
from fedshield_flwr.config import NodeSettings, RunConfig
from fedshield_flwr.models import export_adapter, public_model_name
from fedshield_flwr.packages.cache import has_cached_package
from fedshield_flwr.packages.protocol import announced_hash, attached_package, query_reply
from fedshield_flwr.shield import protocol as sp
from fedshield_flwr.shield import silo as shield_silo
from fedshield_flwr.shield.settings import ShieldSettings
from fedshield_flwr.split import protocol as splp
from fedshield_flwr.split.arch import merge_adapter_states
from fedshield_flwr.split.parts import PARTS_KIND
from fedshield_flwr.split.settings import SplitSettings
from fedshield_flwr.split.silo import (
    SplitRound,
    SplitRoundError,
    evaluate_through_relay,
    split_runtime,
    train_through_relay,
)
from fedshield_flwr.wire import encode_arrays

log = logging.getLogger("fedshield.silo")


def query(msg: Message, context: Context) -> Message:
    """Whether the announced silo parts package is in this silo's cache."""
    node = NodeSettings.from_flat(context.node_config)
    content_hash = announced_hash(msg, f"parts query to silo {node.partition_id}",
                                  splp.PARTS_HASH_KEY)
    return query_reply(msg, content_hash, has_cached_package(node, content_hash, PARTS_KIND),
                       splp.PARTS_HASH_KEY)


def _setup(msg: Message, context: Context) -> SplitRound:
    cfg = RunConfig.from_flat(context.run_config)
    node = NodeSettings.from_flat(context.node_config)
    settings = SplitSettings.from_config(cfg)
    server_round = p.message_round(msg)
    who = f"silo {node.partition_id} (node {context.node_id}) in round {server_round}"
    ticket = splp.RelayTicket.from_config(p.config_of(msg), who)
    t0 = time.time()
    content_hash = announced_hash(msg, f"server message to {who}", splp.PARTS_HASH_KEY)
    arrays = attached_package(msg, splp.PARTS_RECORD, f"silo parts for {who}")
    rt, silo = split_runtime(cfg, node, settings, content_hash, arrays, who)
    return SplitRound(cfg, node, settings, server_round, who, ticket, rt, silo, time.time() - t0)


def _with_global(msg: Message, r: SplitRound) -> SplitRound:
    """fedavg aggregation: load the message's global head + tail adapter into the silo."""
    r.silo.load_adapter_state(splp.read_global(msg, r.rt.initial, r.who))
    return r


def train(msg: Message, context: Context) -> Message:
    r = _setup(msg, context)
    if r.settings.aggregation == "shield":
        return _shield_train(msg, context, r)
    metrics = train_through_relay(_with_global(msg, r))
    t0 = time.time()
    arrays = encode_arrays(r.silo.adapter_state())
    metrics.update({p.LOAD_S: r.load_s, p.SERIALIZE_S: time.time() - t0})
    return p.reply(msg, metrics, **{p.ARRAYS: arrays})


def evaluate(msg: Message, context: Context) -> Message:
    r = _setup(msg, context)
    if r.settings.aggregation == "shield":
        return _shield_evaluate(msg, context, r)
    metrics = evaluate_through_relay(_with_global(msg, r))
    metrics[p.LOAD_S] = r.load_s
    return p.reply(msg, metrics)


# ---------------------------------------------------------------------- split.aggregation=shield
def _shield_global(msg: Message, context: Context, r: SplitRound):
    """Decrypt the downlink onto the global head + tail adapter this silo holds."""
    sh = ShieldSettings.from_config(r.cfg)
    keyset = shield_silo.load_keyset(context.node_config, sh, sp.keys_tag(msg),
                                     sp.keys_max_silos(msg))
    global_adapter, state = shield_silo.caught_up(context.state, keyset, r.rt.initial,
                                                  sp.read_downlink(msg), str(context.node_id))
    return sh, keyset, global_adapter, state


def _shield_train(msg: Message, context: Context, r: SplitRound) -> Message:
    t0 = time.time()
    sh, keyset, global_adapter, state = _shield_global(msg, context, r)
    decrypt_s = time.time() - t0
    start = shield_silo.training_start(global_adapter, state, sh)
    r.silo.load_adapter_state(start)
    metrics = train_through_relay(r)
    t0 = time.time()
    payload, state = shield_silo.encrypt_progress(
        keyset, start, r.silo.adapter_state(), server_round=r.server_round,
        silo=str(context.node_id), num_examples=metrics[p.NUM_EXAMPLES], settings=sh,
        num_rounds=r.cfg.num_server_rounds, state=state)
    shield_silo.save(context.state, global_adapter, state)
    metrics.update({sp.GLOBAL_ROUND: state.global_round, p.LOAD_S: r.load_s,
                    p.SERIALIZE_S: decrypt_s + time.time() - t0})
    return p.reply(msg, metrics, **{sp.PAYLOAD: sp.payload_record(payload)})


def _shield_evaluate(msg: Message, context: Context, r: SplitRound) -> Message:
    t0 = time.time()
    _, _, global_adapter, state = _shield_global(msg, context, r)
    decrypt_s = time.time() - t0
    shield_silo.save(context.state, global_adapter, state)
    r.silo.load_adapter_state(global_adapter)
    metrics = evaluate_through_relay(r)
    export_dir = sp.export_target(msg, context.node_config, r.node.partition_id)
    if export_dir:
        _export_merged(msg, r, global_adapter, state.global_round, export_dir)
    metrics.update({sp.GLOBAL_ROUND: state.global_round, p.LOAD_S: r.load_s,
                    p.SERIALIZE_S: decrypt_s})
    return p.reply(msg, metrics)


def _export_merged(msg: Message, r: SplitRound, global_adapter, global_round: int,
                   export_dir: str) -> None:
    """Merge the global head + tail with the server's middle adapter into one PEFT adapter."""
    try:
        middle = splp.read_middle(msg, r.who)
    except ValueError as exc:
        raise SplitRoundError(str(exc)) from exc
    export_adapter(export_dir, merge_adapter_states(global_adapter, middle),
                   r.silo.layout.model_type, r.cfg.model.lora, public_model_name(r.rt.model_path),
                   {"fedshield-round": str(global_round), "fedshield-mode": "split"})
    log.info("silo %d exported the merged split adapter (round %d) to %s", r.node.partition_id,
             global_round, export_dir)
