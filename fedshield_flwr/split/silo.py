"""The silo side of ``split``: its parts from the package, and its rounds through the relay.

A silo never loads a base model: it builds its parts (embeddings, head and tail blocks, norm, LM
head, tokenizer, initial adapter) from the server's parts package (:func:`split_runtime`), then
trains or evaluates one round by opening one relay stream (:func:`train_through_relay`,
:func:`evaluate_through_relay`). Activations and gradients go through the relay only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import torch

from fedshield_flwr import protocol as p
from fedshield_flwr.config import NodeSettings, RunConfig
from fedshield_flwr.data import IGNORE_INDEX
from fedshield_flwr.generation import GenerationResult, score_generations
from fedshield_flwr.packages.cache import receive_package
from fedshield_flwr.packages.model import package_tokenizer
from fedshield_flwr.silo import SiloRuntime, cached_runtime, skip_unused_bitsandbytes
from fedshield_flwr.split.arch import SplitError
from fedshield_flwr.split.parts import PARTS_KIND, parts_from_arrays, silo_from_parts
from fedshield_flwr.split.protocol import RELAY_DOWN_KEY, RELAY_UP_KEY, RelayTicket
from fedshield_flwr.split.relay import FrameError, RelayClient, RelayError
from fedshield_flwr.split.settings import SplitSettings
from fedshield_flwr.split.silo_model import SiloTrainer, SplitSilo, run_silo_round
from fedshield_flwr.train import batch_schedule, collate, cosine_lr

log = logging.getLogger("fedshield.silo")


class SplitRoundError(RuntimeError):
    """A silo could not finish its split round; names the silo, the round and the remedy."""


def receive_parts(arrays: dict | None, content_hash: str, node: NodeSettings, who: str):
    """The verified parts package: from ``arrays`` if sent (then cached), else this silo's cache."""
    return receive_package(arrays, content_hash, node, who, PARTS_KIND, parts_from_arrays,
                           what="silo parts")


def split_runtime(cfg: RunConfig, node: NodeSettings, settings: SplitSettings,
                  content_hash: str, arrays: dict | None, who: str
                  ) -> tuple[SiloRuntime, SplitSilo]:
    """The silo's parts of the model, rebuilt from the server's parts package (once per process).

    ``arrays`` is the package when the message carried it (it is verified against
    ``content_hash`` and cached on disk), else the silo's cached copy is used. The middle blocks
    never reach the silo. The :class:`SiloRuntime` wraps the silo's PEFT model for its tokenizer
    and data cache; ``initial`` is the seeded head + tail LoRA of the unsplit model.
    """
    def build() -> tuple[SiloRuntime, SplitSilo]:
        t0 = time.time()
        skip_unused_bitsandbytes(cfg)  # a deployed one-shot ClientApp at full precision
        pkg = receive_parts(arrays, content_hash, node, who)
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
        source = str(pkg.manifest.get("source") or f"split:{content_hash}")
        rt = SiloRuntime(silo.peft_model, tok, source, time.time() - t0,
                         initial=silo.adapter_state())
        log.info("split silo %d: parts %s of %s: blocks %s + %s (+LoRA r=%d), %.1f MB, %s, "
                 "%.1f s", node.partition_id, content_hash[:12], layout.fingerprint(),
                 list(layout.head), list(layout.tail), cfg.model.lora.r, pkg.nbytes / 1e6,
                 "received" if arrays is not None else "from cache", rt.load_seconds)
        return rt, silo

    built = []
    out = cached_runtime(("split", content_hash, cfg.model.lora, cfg.train.seed,
                          node.cache_dir), lambda: built.append(1) or build())
    if arrays is not None and not built:  # resent (e.g. after the cache was lost): keep it
        receive_parts(arrays, content_hash, node, who)
    return out


def remedy(exc: Exception) -> str:
    """What to change when a relay round failed with ``exc``."""
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
class SplitRound:
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


@contextlib.contextmanager
def relay_session(r: SplitRound, lr: float, seed: int, what: str
                  ) -> Iterator[tuple[SiloTrainer, dict[str, float]]]:
    """A trainer on one relay stream for this round; its traffic lands in the yielded dict.

    A relay, frame or split failure becomes a :class:`SplitRoundError` naming the silo, the
    round, the relay and the remedy.
    """
    traffic: dict[str, float] = {}
    s = r.settings
    try:
        with RelayClient(r.ticket.address, r.ticket.token, r.ticket.silo,
                         r.silo.layout.fingerprint(), activation_dtype=s.activation_dtype,
                         root_certificates=r.ticket.ca_pem,
                         timeout_s=max(600.0, 2 * s.step_timeout_s + 60.0)) as link:
            t = r.cfg.train
            yield SiloTrainer(r.silo, link, learning_rate=lr, weight_decay=t.weight_decay,
                              max_grad_norm=t.max_grad_norm, noise_sigma=s.noise_sigma,
                              clip_norm=s.clip_norm, noise_multiplier=s.noise_multiplier,
                              seed=seed, name=f"silo {r.node.partition_id}"), traffic
            traffic.update({RELAY_UP_KEY: float(sum(link.bytes_sent.values())),
                            RELAY_DOWN_KEY: float(sum(link.bytes_received.values()))})
    except (RelayError, FrameError, SplitError) as exc:
        raise SplitRoundError(f"{r.who}: split {what} through the relay at {r.ticket.address} "
                              f"failed: {exc}; {remedy(exc)}") from exc


def train_through_relay(r: SplitRound) -> dict[str, float]:
    """One round of split training from the adapter loaded in ``r.silo``; reply metrics."""
    cfg, node, server_round = r.cfg, r.node, r.server_round
    data = r.rt.silo_data(cfg, node)
    if not data.train:
        raise SplitRoundError(f"{r.who}: no training rows; check data.name / data-path")
    t = cfg.train
    lr = cosine_lr(server_round, cfg.num_server_rounds, t.learning_rate_max, t.learning_rate_min)
    # Seed depends on round and silo: silos draw different batches, reruns draw the same.
    seed = t.seed + 1000 * server_round + node.partition_id
    # One relay step per optimizer step: accumulation becomes a larger batch (same gradient).
    rows = t.batch_size * t.gradient_accumulation_steps
    schedule = batch_schedule(len(data.train), rows, t.max_steps, seed)
    batches = (collate([data.train[i] for i in idx], r.rt.pad_id) for idx in schedule)
    torch.manual_seed(seed)  # LoRA dropout
    t0 = time.time()
    with relay_session(r, lr, seed, "training") as (trainer, traffic):
        result = run_silo_round(trainer, batches, t.max_steps)
    train_s = time.time() - t0
    if not math.isfinite(result["train_loss"]):
        raise SplitRoundError(f"{r.who}: training loss is {result['train_loss']}; lower "
                              "train.learning-rate-max or check the data")
    log.info("silo %d round %d: split train_loss=%.4f (%d steps, %.1f s, relay %.2f MB)",
             node.partition_id, server_round, result["train_loss"], int(result["steps"]),
             train_s, (traffic[RELAY_UP_KEY] + traffic[RELAY_DOWN_KEY]) / 1e6)
    return {p.TRAIN_LOSS: float(result["train_loss"]),
            p.NUM_EXAMPLES: int(result["steps"]) * rows, p.NUM_TOKENS: int(result["tokens"]),
            p.ROUND: server_round, p.TRAIN_S: train_s, **traffic}


def evaluate_through_relay(r: SplitRound) -> dict[str, float]:
    """Held-out loss (token-weighted, response tokens) of the adapter loaded in ``r.silo``."""
    cfg, node = r.cfg, r.node
    data = r.rt.silo_data(cfg, node)
    if not data.eval:
        raise SplitRoundError(f"{r.who}: no held-out rows; raise data.eval-fraction")
    # Batches of similar length waste no compute on padding; the mean is order-independent.
    rows = sorted(data.eval, key=lambda row: len(row["input_ids"]))
    size = cfg.train.eval_batch_size
    total, count = 0.0, 0
    t0 = time.time()
    with relay_session(r, 0.0, cfg.train.seed, "evaluation") as (trainer, traffic):
        for i in range(0, len(rows), size):
            batch = collate(rows[i:i + size], r.rt.pad_id)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n == 0:
                continue
            loss = trainer.evaluate(batch["input_ids"], batch["attention_mask"], batch["labels"])
            total += loss * n
            count += n
        generated = generate_through_relay(r, trainer, data.eval)
    loss = total / max(count, 1)
    gen = {} if generated is None else {
        p.EVAL_EXACT_MATCH: generated.exact_match, p.EVAL_ROUGE_L: generated.rouge_l,
        p.NUM_GENERATED: generated.num_generated}
    return {p.EVAL_LOSS: loss, p.EVAL_PERPLEXITY: math.exp(min(loss, 50.0)),
            p.NUM_TOKENS: count, p.NUM_EXAMPLES: len(rows), p.ROUND: r.server_round,
            p.EVAL_S: time.time() - t0, **gen, **traffic}


def generate_through_relay(r: SplitRound, trainer: SiloTrainer, rows: list[dict]
                           ) -> GenerationResult | None:
    """With ``eval.generate``: greedy answers through the relay (a KV cache on each party, the
    middle on the server), scored like every other mode's; None when off."""
    cfg = r.cfg
    if not cfg.eval.generate:
        return None
    size, eos = cfg.train.eval_batch_size, r.rt.tokenizer.eos_token_id

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        out: list[list[int]] = []
        for i in range(0, len(prompts), size):
            out += trainer.generate(prompts[i:i + size], cfg.eval.max_new_tokens, eos)
        return out

    result = score_generations(generate, r.rt.tokenizer, rows, cfg.eval.max_examples,
                               desc=f"{r.who} generate")
    log.info("silo %d: exact match %.3f, ROUGE-L %.3f over %d answers generated through the "
             "relay (%.1f s)", r.node.partition_id, result.exact_match, result.rouge_l,
             result.num_generated, result.seconds)
    return result
