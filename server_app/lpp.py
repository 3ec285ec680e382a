"""Server setup of ``lpp``: the full-precision base and adapter, the quantized package, IP margin.

The server (the model owner) loads the full-precision base once, builds (or reads from its
cache) the quantized package that silos receive, refuses to send it if any floating array in it
could be a full-precision weight, and keeps the fp32 global adapter: the checkpoint and the
exported PEFT adapter are full precision and never leave the server. Every round it measures
the IP margin on its own held-out rows: eval loss of (full base + fp adapter), what the owner
holds, against (quantized base + k-bit adapter), the best any silo can hold. With
``lpp.correction-data`` it refits the global adapter to the full base on those rows of its own
after every update (:mod:`fedshield_flwr.lpp.correct`); with
``lpp.margin-action='lower-adapter-bits'`` a margin below ``lpp.min-ip-margin`` sends the next
rounds' adapter with fewer bits.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedshield_flwr.config import RunConfig
from fedshield_flwr.dp.client import from_config as client_dp
from fedshield_flwr.lpp.adapter import prepare_global_adapter
from fedshield_flwr.lpp.correct import correct_adapter, disjoint_rows
from fedshield_flwr.lpp.margin import (
    margin_warning,
    next_adapter_bits,
    owner_rows,
    server_eval_rows,
)
from fedshield_flwr.lpp.package import load_or_build_package
from fedshield_flwr.lpp.quantize import assert_no_full_precision_weights, package_nbytes
from fedshield_flwr.lpp.rebuild import build_model_from_package
from fedshield_flwr.lpp.settings import LppSettings
from fedshield_flwr.models import (
    apply_lora,
    get_adapter_state,
    load_base_model,
    load_tokenizer,
    resolve_model_path,
    set_adapter_state,
)
from fedshield_flwr.optimizers import ServerOptimizer
from fedshield_flwr.packages.format import package_to_arrays
from fedshield_flwr.train import cosine_lr, evaluate
from fedshield_flwr.wire import decode_arrays
from server_app.base import ServerMode
from strategies.lpp import LppStrategy

log = logging.getLogger("fedshield.server")


class LppMode(ServerMode):
    """lpp: silos get a quantized base and a k-bit adapter; the server keeps full precision."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        super().__init__(cfg, run_dir)
        self.settings = s = LppSettings.from_config(cfg)
        self.package = load_or_build_package(cfg.model.name, s.base_spec())
        assert_no_full_precision_weights(self.package)
        sizes = package_nbytes(self.package)
        log.info("lpp: %s base package %s, %.1f MB on the wire (weights %.1f MB)",
                 s.quant_type, self.package.content_hash[:12], sizes["total"] / 1e6,
                 sizes["weights"] / 1e6)
        path = resolve_model_path(cfg.model.name)
        self.full = apply_lora(load_base_model(cfg.model.name, 0), cfg.model.lora,
                               seed=cfg.train.seed, base_path=path)
        self.template = get_adapter_state(self.full)
        self.strategy = LppStrategy(
            self.template, lambda: package_to_arrays(self.package), self.package.content_hash,
            s.adapter_spec(), s.server_lr, correct=self.correct if s.corrects else None,
            optimizer=ServerOptimizer.from_settings(cfg.strategy),
            client_dp=client_dp(cfg.dp, cfg.num_server_rounds), **cfg.strategy.flower_kwargs())
        self._proxy = None
        self._rows: list[dict] | None = None
        self._correction_rows: list[dict] | None = None
        self._correction: dict[str, float] = {}
        self._tokenizer = None
        if s.server_eval:
            self.server_evaluate = self.ip_margin

    def eval_rows(self) -> list[dict]:
        """The server's held-out rows (loaded once)."""
        if self._rows is None:
            self._tokenizer = load_tokenizer(self.cfg.model.name)
            self._rows = server_eval_rows(self.cfg, self.settings, self._tokenizer,
                                          resolve_model_path(self.cfg.model.name))
        return self._rows

    def correct(self, server_round: int, fp: OrderedDict[str, np.ndarray]
                ) -> OrderedDict[str, np.ndarray]:
        """The owner's correction step: ``fp`` refitted to the full base on its own rows."""
        cfg, source = self.cfg, self.settings.correction_data
        held_out = self.eval_rows()
        if self._correction_rows is None:
            self._correction_rows = disjoint_rows(
                owner_rows(cfg, source, self._tokenizer), held_out, source)
            log.info("lpp: correction step on %d owner rows of %s (%d held-out rows left out "
                     "of it)", len(self._correction_rows), source, len(held_out))
        t = cfg.train
        result = correct_adapter(
            self.full, fp, self._correction_rows, t, self.settings.correction_steps,
            cosine_lr(server_round, cfg.num_server_rounds, t.learning_rate_max,
                      t.learning_rate_min),
            int(self._tokenizer.pad_token_id), t.seed + 1000 * server_round + 999)
        log.info("[round %d] lpp correction: %d steps on the full base, train loss %.4f "
                 "(%.1f s)", server_round, result.steps, result.loss, result.seconds)
        self._correction = {"correction_train_loss": result.loss,
                            "correction_seconds": result.seconds}
        return result.adapter

    def ip_margin(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        """Eval loss/perplexity of the server's model and of a silo's best proxy, same rows.

        Below ``lpp.min-ip-margin`` it warns and, with ``lpp.margin-action=
        'lower-adapter-bits'``, sends the next rounds' adapter with fewer bits.
        """
        cfg, strategy = self.cfg, self.strategy
        rows = self.eval_rows()
        if self._proxy is None:
            self._proxy = apply_lora(build_model_from_package(self.package), cfg.model.lora,
                                     seed=cfg.train.seed)
        pad = int(self._tokenizer.pad_token_id)
        fp = decode_arrays(arrays, f"global adapter of round {server_round}")
        set_adapter_state(self.full, fp)
        full = evaluate(self.full, rows, cfg.train.eval_batch_size, pad)
        bits = strategy.spec.bits  # what the silos were sent this round
        _, sent = prepare_global_adapter(fp, strategy.spec)
        set_adapter_state(self._proxy, sent)
        proxy = evaluate(self._proxy, rows, cfg.train.eval_batch_size, pad)
        log.info("[round %d] IP margin: server model loss %.4f, silo proxy %.4f (+%.4f nats, "
                 "ppl x%.3f) on %d held-out rows", server_round, full.loss, proxy.loss,
                 proxy.loss - full.loss, proxy.perplexity / full.perplexity, len(rows))
        gap, s = proxy.loss - full.loss, self.settings
        warning = margin_warning(server_round, gap, s.min_ip_margin)
        if warning:
            log.warning(warning)
        if s.margin_action == "lower-adapter-bits" and server_round < cfg.num_server_rounds:
            lower = next_adapter_bits(bits, gap, s.min_ip_margin)
            if lower != bits:
                strategy.spec = replace(strategy.spec, bits=lower)
                log.warning("[round %d] lpp.margin-action: the adapter goes to silos with %d "
                            "bits instead of %d from round %d on", server_round, lower, bits,
                            server_round + 1)
            elif warning:
                log.warning("[round %d] lpp.margin-action: the adapter is already at %d bits, "
                            "the fewest; widen the margin with lpp.clip-search=false or a "
                            "larger lpp.base-blocksize", server_round, bits)
        return {
            "adapter_bits": bits,
            **self._correction,
            "server_eval_loss": full.loss,
            "server_eval_perplexity": full.perplexity,
            "proxy_eval_loss": proxy.loss,
            "proxy_eval_perplexity": proxy.perplexity,
            "ip_loss_gap": proxy.loss - full.loss,
            "ip_perplexity_ratio": proxy.perplexity / full.perplexity,
            "server_eval_tokens": full.num_tokens,
        }
