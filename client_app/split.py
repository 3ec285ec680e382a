"""Silo handlers for ``split``: head + tail here, the middle blocks through the server's relay.

A message carries round control only (relay address, this silo's token for the round, the silo
name the token is bound to, the CA certificate when the relay serves TLS), the hash of the silo
parts package (and the package itself when this silo's cache lacks it: the silo builds its parts
from it and never loads a base model of its own) and the global head + tail adapter, empty until
a round has produced one (then every silo starts from the package's initial adapter, the seeded
LoRA of the unsplit model). The silo opens one relay stream for the message, trains or
evaluates through it, and replies with its head + tail adapter (train) or its held-out loss
(evaluate). Activations and gradients go through the relay only, never through Flower.

With ``split.aggregation='shield'`` the head + tail adapter is aggregated as in ``shield``: the
message carries the encrypted aggregates this silo has not applied yet instead of a plaintext
adapter, the silo uploads the CKKS ciphertexts of its pruned update, and on the final round the
silos that export (``export-dir``) merge the global head + tail adapter with the middle adapter
the server sends then into one PEFT adapter.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from fedshield_flwr.config import NodeSettings, RunConfig, ShieldSettings
from fedshield_flwr.crypto import catch_up, encrypt_update, with_residual
from fedshield_flwr.crypto.provision import silo_keyset
from fedshield_flwr.data import IGNORE_INDEX
from fedshield_flwr.models import export_adapter
from fedshield_flwr.models.parts import PARTS_KIND, parts_from_arrays, silo_from_parts
from fedshield_flwr.models.quantize import package_tokenizer
from fedshield_flwr.models.split import (
    SiloTrainer,
    SplitError,
    SplitSettings,
    SplitSilo,
    merge_adapter_states,
    run_silo_round,
)
from fedshield_flwr.package_cache import has_cached_package, receive_package
from fedshield_flwr.relay import FrameError, RelayClient, RelayError
from fedshield_flwr.silo import SiloRuntime, skip_unused_bitsandbytes
from fedshield_flwr.train import batch_schedule, collate, cosine_lr
from fedshield_flwr.wire import decode_adapter, decode_arrays, encode_arrays
from strategies.delivery import announced_hash, query_reply
from strategies.split import (
    MIDDLE_RECORD,
    PARTS_HASH_KEY,
    PARTS_RECORD,
    RELAY_DOWN_KEY,
    RELAY_UP_KEY,
    RelayTicket,
)

from . import shield as shield_silo

log = logging.getLogger("fedshield.silo")

_RUNTIMES: dict[tuple, tuple[SiloRuntime, SplitSilo]] = {}


class SplitRoundError(RuntimeError):
    """A silo could not finish its split round; names the silo, the round and the remedy."""


def get_split_runtime(cfg: RunConfig, node: NodeSettings, settings: SplitSettings,
                      content_hash: str, arrays: dict | None, who: str
                      ) -> tuple[SiloRuntime, SplitSilo]:
    """The silo's parts of the model, rebuilt from the server's parts package (once per process).

    ``arrays`` is the package when the message carried it (it is verified against
    ``content_hash`` and cached on disk), else the silo's cached copy is used. The silo never
    loads a base model of its own: the middle blocks never reach it. The :class:`SiloRuntime`
    wraps the silo's PEFT model for its tokenizer and data cache; ``initial`` is the seeded
    head + tail LoRA of the unsplit model, from the package.
    """
    key = (content_hash, cfg.model.lora, cfg.train.seed, node.cache_dir)
    if key not in _RUNTIMES:
        t0 = time.time()
        skip_unused_bitsandbytes(cfg)  # a deployed one-shot ClientApp at full precision
        pkg = receive_package(arrays, content_hash, node, who, PARTS_KIND, parts_from_arrays)
        layout = pkg.layout
        if (layout.head_layers, layout.tail_layers) != (settings.head_layers,
                                                        settings.tail_layers):
            raise SplitRoundError(
                f"{who}: the server cut the model at head {layout.head_layers} / tail "
                f"{layout.tail_layers} blocks, this silo's run config says "
                f"{settings.head_layers} / {settings.tail_layers}; use the same split.* settings")
        tok = package_tokenizer(pkg)
        if tok is None:
            raise SplitRoundError(f"{who}: silo parts package {content_hash[:12]} ships no "
                                  "tokenizer; server and silo run different app versions")
        silo = silo_from_parts(pkg, cfg.model.lora, seed=cfg.train.seed)
        _RUNTIMES.clear()  # one model per process: free the previous one
        source = str(pkg.manifest.get("source") or f"split:{content_hash}")
        rt = SiloRuntime(silo.peft_model, tok, source, time.time() - t0,
                         initial=silo.adapter_state())
        _RUNTIMES[key] = (rt, silo)
        log.info("split silo %d: parts %s of %s: blocks %s + %s (+LoRA r=%d), %.1f MB, %s, "
                 "%.1f s", node.partition_id, content_hash[:12], layout.fingerprint(),
                 list(layout.head), list(layout.tail), cfg.model.lora.r, pkg.nbytes / 1e6,
                 "received" if arrays is not None else "from cache", rt.load_seconds)
    elif arrays is not None:  # resent (e.g. after the cache was lost): make sure it is on disk
        receive_package(arrays, content_hash, node, who, PARTS_KIND, parts_from_arrays)
    return _RUNTIMES[key]


def query(msg: Message, context: Context) -> Message:
    """Whether the announced silo parts package is in this silo's cache."""
    node = NodeSettings.from_flat(context.node_config)
    content_hash = announced_hash(msg, f"parts query to silo {node.partition_id}",
                                  PARTS_HASH_KEY)
    return query_reply(msg, content_hash, has_cached_package(node, content_hash, PARTS_KIND),
                       PARTS_HASH_KEY)


def _remedy(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    if code == grpc.StatusCode.UNAVAILABLE:
        return ("the relay is unreachable from this silo: set split.relay-host to a name of the "
                "server that silos resolve, split.relay-bind='0.0.0.0', and open "
                "split.relay-port in the firewall")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ("the relay refused the token: it was revoked (the round ended: raise "
                "strategy.round-timeout) or expired (raise split.token-ttl-s)")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return ("server and silo cut different models: use the same model.name, model.lora.* "
                "and split.head-layers / split.tail-layers on both")
    if isinstance(exc, FrameError):
        return "lower train.batch-size or data.max-length, or raise split.max-frame-mb"
    return "see the ServerApp log for the relay's side"


@dataclass
class _Round:
    """What one server message gives this silo: settings, round control and its model parts."""

    cfg: RunConfig
    node: NodeSettings
    settings: SplitSettings
    server_round: int
    who: str  # "silo 0 (node 17) in round 3", for errors
    ticket: RelayTicket
    rt: SiloRuntime
    silo: SplitSilo
    load_s: float


def _setup(msg: Message, context: Context) -> _Round:
    cfg = RunConfig.from_flat(context.run_config)
    node = NodeSettings.from_flat(context.node_config)
    settings = SplitSettings.from_run_config(cfg)
    conf = msg.content["config"]
    server_round = int(conf["server-round"])
    who = f"silo {node.partition_id} (node {context.node_id}) in round {server_round}"
    ticket = RelayTicket.from_config(conf, who)
    t0 = time.time()
    content_hash = announced_hash(msg, f"server message to {who}", PARTS_HASH_KEY)
    parts = msg.content.array_records.get(PARTS_RECORD)
    arrays = dict(decode_arrays(parts, f"silo parts for {who}")) if parts is not None else None
    rt, silo = get_split_runtime(cfg, node, settings, content_hash, arrays, who)
    return _Round(cfg, node, settings, server_round, who, ticket, rt, silo, time.time() - t0)


def _plain_global(msg: Message, rt: SiloRuntime, who: str) -> OrderedDict:
    """fedavg: the global head + tail adapter of the message, or the initial one if empty."""
    record = msg.content.array_records.get("arrays")
    if record is None or len(record) == 0:
        return OrderedDict(rt.initial)  # no aggregate yet: the package's initial adapter
    return decode_adapter(record, rt.initial, f"server message to {who}")


def _shield_global(msg: Message, context: Context, cfg: RunConfig, rt: SiloRuntime):
    """shield: decrypt the downlink onto the global adapter this silo holds (context.state)."""
    sh = ShieldSettings.from_config(cfg)
    keyset = silo_keyset(str(context.node_config.get("shield-key", "")), sh.auto_keys,
                         str(msg.content["config"].get("keys-tag", "")))
    records = ([a.numpy() for a in msg.content["downlink"].values()]
               if "downlink" in msg.content.array_records else [])
    global_adapter, state = shield_silo._restore(context, rt.initial)
    global_adapter, state = catch_up(keyset, global_adapter, records, state,
                                     silo=str(context.node_id))
    return sh, keyset, global_adapter, state


def _trainer(silo: SplitSilo, link, settings: SplitSettings, cfg: RunConfig, lr: float,
             seed: int, name: str) -> SiloTrainer:
    return SiloTrainer(silo, link, learning_rate=lr, weight_decay=cfg.train.weight_decay,
                       max_grad_norm=cfg.train.max_grad_norm, noise_sigma=settings.noise_sigma,
                       seed=seed, name=name)


def _link(ticket: RelayTicket, silo: SplitSilo, settings: SplitSettings) -> RelayClient:
    return RelayClient(ticket.address, ticket.token, ticket.silo, silo.layout.fingerprint(),
                       activation_dtype=settings.activation_dtype,
                       root_certificates=ticket.ca_pem,
                       timeout_s=max(600.0, 2 * settings.step_timeout_s + 60.0))


def _traffic(link: RelayClient) -> dict[str, float]:
    return {RELAY_UP_KEY: float(sum(link.bytes_sent.values())),
            RELAY_DOWN_KEY: float(sum(link.bytes_received.values()))}


def _train_through_relay(r: _Round) -> dict[str, float]:
    """One round of split training from the adapter loaded in ``r.silo``; reply metrics."""
    cfg, node, settings, server_round, who, ticket, rt, silo = (
        r.cfg, r.node, r.settings, r.server_round, r.who, r.ticket, r.rt, r.silo)
    data = rt.silo_data(cfg, node)
    if not data.train:
        raise SplitRoundError(f"{who}: no training rows; check data.name / data-path")
    t = cfg.train
    lr = cosine_lr(server_round, cfg.num_server_rounds, t.learning_rate_max, t.learning_rate_min)
    # Seed depends on round and silo: silos draw different batches, reruns draw the same.
    seed = t.seed + 1000 * server_round + node.partition_id
    # One relay step per optimizer step: accumulation becomes a larger batch (same gradient).
    rows = t.batch_size * t.gradient_accumulation_steps
    schedule = batch_schedule(len(data.train), rows, t.max_steps, seed)
    batches = (collate([data.train[i] for i in idx], rt.pad_id) for idx in schedule)
    torch.manual_seed(seed)  # LoRA dropout
    t0 = time.time()
    try:
        with _link(ticket, silo, settings) as link:
            trainer = _trainer(silo, link, settings, cfg, lr, seed, f"silo {node.partition_id}")
            result = run_silo_round(trainer, batches, t.max_steps)
            traffic = _traffic(link)
    except (RelayError, FrameError, SplitError) as exc:
        raise SplitRoundError(f"{who}: split training through the relay at {ticket.address} "
                              f"failed: {exc}; {_remedy(exc)}") from exc
    train_s = time.time() - t0
    if not math.isfinite(result["train_loss"]):
        raise SplitRoundError(f"{who}: training loss is {result['train_loss']}; lower "
                              "train.learning-rate-max or check the data")
    log.info("silo %d round %d: split train_loss=%.4f (%d steps, %.1f s, relay %.2f MB)",
             node.partition_id, server_round, result["train_loss"], int(result["steps"]),
             train_s, (traffic[RELAY_UP_KEY] + traffic[RELAY_DOWN_KEY]) / 1e6)
    return {
        "train_loss": float(result["train_loss"]),
        "num-examples": int(result["steps"]) * rows,
        "num-tokens": int(result["tokens"]),
        "server-round": server_round,
        "train-seconds": train_s,
        **traffic,
    }


def _evaluate_through_relay(r: _Round) -> dict[str, float]:
    """Held-out loss (token-weighted, response tokens) of the adapter loaded in ``r.silo``."""
    cfg, node, settings, server_round, who, ticket, rt, silo = (
        r.cfg, r.node, r.settings, r.server_round, r.who, r.ticket, r.rt, r.silo)
    data = rt.silo_data(cfg, node)
    if not data.eval:
        raise SplitRoundError(f"{who}: no held-out rows; raise data.eval-fraction")
    # Batches of similar length waste no compute on padding; the mean is order-independent.
    rows = sorted(data.eval, key=lambda r: len(r["input_ids"]))
    size = cfg.train.eval_batch_size
    total, count = 0.0, 0
    t0 = time.time()
    try:
        with _link(ticket, silo, settings) as link:
            trainer = _trainer(silo, link, settings, cfg, 0.0, cfg.train.seed,
                               f"silo {node.partition_id}")
            for i in range(0, len(rows), size):
                batch = collate(rows[i:i + size], rt.pad_id)
                n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                if n == 0:
                    continue
                loss = trainer.evaluate(batch["input_ids"], batch["attention_mask"],
                                        batch["labels"])
                total += loss * n
                count += n
            traffic = _traffic(link)
    except (RelayError, FrameError, SplitError) as exc:
        raise SplitRoundError(f"{who}: split evaluation through the relay at {ticket.address} "
                              f"failed: {exc}; {_remedy(exc)}") from exc
    loss = total / max(count, 1)
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(min(loss, 50.0)),
        "num-tokens": count,
        "num-examples": len(rows),
        "server-round": server_round,
        "eval-seconds": time.time() - t0,
        **traffic,
    }


def train(msg: Message, context: Context) -> Message:
    r = _setup(msg, context)
    if r.settings.aggregation == "shield":
        return _shield_train(msg, context, r)
    r.silo.load_adapter_state(_plain_global(msg, r.rt, r.who))
    metrics = _train_through_relay(r)
    t0 = time.time()
    arrays = encode_arrays(r.silo.adapter_state())
    metrics.update({"load-seconds": r.load_s, "serialize-seconds": time.time() - t0})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    r = _setup(msg, context)
    if r.settings.aggregation == "shield":
        return _shield_evaluate(msg, context, r)
    r.silo.load_adapter_state(_plain_global(msg, r.rt, r.who))
    metrics = _evaluate_through_relay(r)
    metrics["load-seconds"] = r.load_s
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


# ---------------------------------------------------------------------- split.aggregation=shield
def _shield_train(msg: Message, context: Context, r: _Round) -> Message:
    t0 = time.time()
    sh, keyset, global_adapter, state = _shield_global(msg, context, r.cfg, r.rt)
    decrypt_s = time.time() - t0
    start = with_residual(global_adapter, state) if sh.local_residual else global_adapter
    r.silo.load_adapter_state(start)
    metrics = _train_through_relay(r)
    local = r.silo.adapter_state()
    update = OrderedDict((k, local[k] - start[k]) for k in start)  # new progress only
    t0 = time.time()
    payload, state = encrypt_update(
        keyset, update, server_round=r.server_round, silo=str(context.node_id),
        weight=metrics["num-examples"] * sh.weight_scale,
        schedule=shield_silo.schedule_of(sh, r.cfg.num_server_rounds), state=state,
        workers=sh.workers if sh.workers > 0 else (os.cpu_count() or 1))
    shield_silo._store(context, global_adapter, state)
    metrics.update({"global-round": state.global_round, "load-seconds": r.load_s,
                    "serialize-seconds": decrypt_s + time.time() - t0})
    record = ArrayRecord(OrderedDict([("payload", Array(np.frombuffer(payload, np.uint8)))]))
    return Message(RecordDict({"payload": record, "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


def _shield_evaluate(msg: Message, context: Context, r: _Round) -> Message:
    t0 = time.time()
    _, _, global_adapter, state = _shield_global(msg, context, r.cfg, r.rt)
    decrypt_s = time.time() - t0
    shield_silo._store(context, global_adapter, state)
    r.silo.load_adapter_state(global_adapter)
    metrics = _evaluate_through_relay(r)
    conf = msg.content["config"]
    export_dir = str(context.node_config.get("export-dir", "")) or (
        str(conf.get("export-dir", "")) if r.node.partition_id == 0 else "")
    if bool(conf.get("final-round", False)) and export_dir:
        _export_merged(msg, r, global_adapter, state.global_round, export_dir)
    metrics.update({"global-round": state.global_round, "load-seconds": r.load_s,
                    "serialize-seconds": decrypt_s})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _export_merged(msg: Message, r: _Round, global_adapter, global_round: int,
                   export_dir: str) -> None:
    """Merge the global head + tail with the server's middle adapter into one PEFT adapter."""
    if MIDDLE_RECORD not in msg.content.array_records:
        raise SplitRoundError(f"{r.who}: the final evaluate message has no middle adapter to "
                              "merge; run the same app version on server and silos")
    middle = decode_arrays(msg.content.array_records[MIDDLE_RECORD], f"middle adapter, {r.who}")
    bad = [k for k, v in middle.items()
           if "lora_" not in k or v.dtype != np.float32 or not np.all(np.isfinite(v))]
    if bad:
        raise SplitRoundError(f"{r.who}: the server's middle adapter has invalid tensors "
                              f"({bad[:3]}); expected finite fp32 LoRA tensors")
    export_adapter(export_dir, merge_adapter_states(global_adapter, middle),
                   r.silo.layout.model_type, r.cfg.model.lora, r.rt.model_path,
                   {"fedshield-round": str(global_round), "fedshield-mode": "split"})
    log.info("silo %d exported the merged split adapter (round %d) to %s", r.node.partition_id,
             global_round, export_dir)
