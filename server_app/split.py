"""Server setup of ``split``: the middle blocks, the run's relay, checkpoint/restore, export.

The server loads the base model once, keeps only the middle blocks (``split.head-layers`` /
``split.tail-layers`` say where to cut) and their LoRA adapter, and hosts the relay for the run
(:class:`~fedshield_flwr.split.relay.control.RelayControl`, started and stopped by the
strategy's ``run``). Of the
silo-side (head + tail) adapter it keeps the names and shapes, to validate replies, and the
aggregate the strategy computes. A checkpoint holds both adapters (``silo/`` and ``middle/``
prefixes); the export merges them into one PEFT adapter for the unsplit model.

With ``split.aggregation='shield'`` the server holds the encrypted aggregate log instead of a
silo-side adapter (checkpoint: ``aggregate-log`` + ``middle/``), and the silos export: the final
evaluate messages carry the middle adapter for that.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from fedshield_flwr.config import RunConfig
from fedshield_flwr.models import (
    apply_lora,
    check_adapter_state,
    export_adapter,
    get_adapter_state,
    load_base_model,
    load_tokenizer,
    public_model_name,
)
from fedshield_flwr.packages.delivery import PackageDelivery
from fedshield_flwr.packages.format import package_to_arrays
from fedshield_flwr.silo import skip_unused_bitsandbytes
from fedshield_flwr.split.arch import SplitLayout, merge_adapter_states
from fedshield_flwr.split.middle import MiddleServer
from fedshield_flwr.split.noise import exposure_warning
from fedshield_flwr.split.parts import SiloPartsPackage, build_parts_package
from fedshield_flwr.split.protocol import PARTS_HASH_KEY, PARTS_RECORD
from fedshield_flwr.split.relay.control import RelayControl
from fedshield_flwr.split.settings import SplitSettings
from fedshield_flwr.train import cosine_lr
from fedshield_flwr.wire import decode_arrays, encode_arrays
from server_app.base import ServerMode
from server_app.shield import LOG_KEY, log_checkpoint, restore_log, shield_strategy_args
from strategies.split import SplitFedAvg, SplitShield

log = logging.getLogger("fedshield.server")

SILO_PREFIX, MIDDLE_PREFIX = "silo/", "middle/"


def load_middle(cfg: RunConfig, settings: SplitSettings
                ) -> tuple[MiddleServer, OrderedDict[str, np.ndarray], SiloPartsPackage]:
    """The server's middle blocks, the silo-side adapter's names and shapes (zeros), and the
    silo parts package.

    The seeded LoRA of every block is built, as for unsplit LoRA, so that the middle adapter
    starts where unsplit LoRA would; the head/tail blocks, embeddings and LM head are then
    dropped. The silo parts (embeddings, head and tail blocks, norm, LM head, tokenizer) and the
    seeded initial head + tail LoRA go into the package the silos receive; of the silo-side LoRA
    the server keeps only the shapes.
    """
    skip_unused_bitsandbytes(cfg)  # a deployed flwr-serverapp process at full precision
    peft = apply_lora(load_base_model(cfg.model.name, cfg.model.quantization), cfg.model.lora,
                      seed=cfg.train.seed)
    layout = SplitLayout.for_model(peft, settings.head_layers, settings.tail_layers)
    initial = get_adapter_state(peft)
    middle = MiddleServer(
        peft, layout,
        learning_rate=cfg.train.learning_rate_max,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        max_sessions=settings.max_sessions,
    )
    in_middle = set(middle.adapter_state())
    silo_initial = OrderedDict((k, v) for k, v in initial.items() if k not in in_middle)
    template = OrderedDict((k, np.zeros_like(v)) for k, v in silo_initial.items())
    # the silo parts come from a fresh full-precision copy (the LoRA-wrapped one lost them)
    base = load_base_model(cfg.model.name)
    parts = build_parts_package(base, layout, load_tokenizer(cfg.model.name), silo_initial,
                                source=cfg.model.name)
    del base
    log.info("split: silo parts package %s: %.1f MB (%d of %d base parameters; the middle "
             "blocks stay here)", parts.content_hash[:12], parts.nbytes / 1e6,
             sum(int(np.prod(s)) for s in parts.manifest["params"].values()),
             parts.manifest["num_params_full"])
    return middle, template, parts


class SplitMode(ServerMode):
    """split: the server trains the middle through its relay and aggregates head + tail."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        super().__init__(cfg, run_dir)
        self.settings = SplitSettings.from_config(cfg)
        self.middle, self.template, self.parts = load_middle(cfg, self.settings)
        self.delivery = PackageDelivery(lambda: package_to_arrays(self.parts),
                                        self.parts.content_hash, PARTS_RECORD, PARTS_HASH_KEY,
                                        "silo parts")
        t = cfg.train
        self.relay = RelayControl(
            self.middle, self.settings,
            lambda r: cosine_lr(r, cfg.num_server_rounds, t.learning_rate_max, t.learning_rate_min),
            seed=t.seed)
        self.shield = self.settings.aggregation == "shield"
        if self.shield:
            self.strategy = SplitShield(self.relay, delivery=self.delivery,
                                        **shield_strategy_args(cfg, run_dir))
        else:
            self.strategy = SplitFedAvg(self.relay, self.template, delivery=self.delivery,
                                        **cfg.strategy.flower_kwargs())
        log.info("split: server holds middle blocks %s of %d; silo-side adapter %d tensors "
                 "aggregated with %s", list(self.middle.layout.middle),
                 self.middle.layout.num_layers, len(self.template), self.settings.aggregation)
        log.warning(exposure_warning(self.settings))  # issue 17: measured, docs/privacy.md

    def initial_arrays(self) -> ArrayRecord:
        # Empty: the silos start from the initial adapter of their parts package (all the same).
        return ArrayRecord()

    def checkpoint(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        if self.shield:  # ciphertexts only: the server cannot read the silo-side adapter
            state = log_checkpoint(self.strategy)
        else:
            state = {SILO_PREFIX + k: v
                     for k, v in decode_arrays(arrays, "server checkpoint").items()}
        state.update({MIDDLE_PREFIX + k: v for k, v in self.middle.adapter_state().items()})
        return state

    def restore(self, state: dict[str, np.ndarray]) -> ArrayRecord:
        middle = {k[len(MIDDLE_PREFIX):]: v for k, v in state.items()
                  if k.startswith(MIDDLE_PREFIX)}
        if not middle:
            raise ValueError("checkpoint has no 'middle/' tensors; was it written by "
                             "strategy.name='split'?")
        who = "split checkpoint"
        check_adapter_state(self.middle.adapter_state(), middle, f"{who} (middle adapter)")
        self.middle.load_adapter_state(middle)
        if self.shield:
            restore_log(self.strategy, state, "it was written with split.aggregation='fedavg': "
                        "resume with that setting")
            return ArrayRecord()
        silo = OrderedDict((k[len(SILO_PREFIX):], v) for k, v in state.items()
                           if k.startswith(SILO_PREFIX))
        if not silo:  # no round had produced a silo-side aggregate yet
            if LOG_KEY in state:
                raise ValueError("checkpoint was written with split.aggregation='shield': "
                                 "resume with that setting")
            return ArrayRecord()
        check_adapter_state(self.template, silo, f"{who} (silo-side adapter)")
        return encode_arrays(OrderedDict((k, silo[k]) for k in self.template))

    def export(self, arrays: ArrayRecord, run_dir: Path) -> Path | None:
        if self.shield:
            return None  # the silos decrypt head + tail and export the merged adapter
        silo = decode_arrays(arrays, "final silo-side adapter")
        if not silo:
            log.warning("split: no round produced a silo-side adapter; nothing to export")
            return None
        merged = merge_adapter_states(silo, self.middle.adapter_state())
        return export_adapter(run_dir / "adapter", merged, self.middle.layout.model_type,
                              self.cfg.model.lora, public_model_name(self.cfg.model.name),
                              {"fedshield-mode": "split"})
