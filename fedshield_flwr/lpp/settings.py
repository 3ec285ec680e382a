"""The ``lpp.*`` run config section: how the base and the global adapter are quantized for silos."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fedshield_flwr.config import Section, check

if TYPE_CHECKING:  # the specs' modules import torch; settings are read by every process
    from fedshield_flwr.lpp.adapter import AdapterQuantSpec
    from fedshield_flwr.lpp.quantize import BaseQuantSpec

QUANT_TYPES = ("nf4", "fp4", "int8")
ADAPTER_BITS = (2, 3, 4, 8)
MARGIN_ACTIONS = ("warn", "lower-adapter-bits")


@dataclass(frozen=True)
class LppSettings(Section):
    """``lpp.*`` keys: how the base and the global adapter are quantized for silos."""

    prefix: ClassVar[str] = "lpp"
    quant_type: str = "nf4"  # base weights, embeddings and head: nf4 | fp4 | int8
    base_blocksize: int = 32  # values per 4-bit block of the base
    clip_search: bool = True  # per-block MSE-optimal clipping before 4-bit quantization
    adapter_bits: int = 4  # bits per value of the global adapter sent to silos
    adapter_blocksize: int = 64  # values per absmax block of the k-bit adapter
    server_lr: float = 1.0  # fp_adapter += server_lr * (mean(silo adapters) - sent adapter)
    eval_data: str = ""  # server's held-out set: file/dir/hub name; "" = simulated silos' splits
    eval_partitions: int = 3  # with eval_data == "": how many simulated silos to rebuild
    server_eval: bool = True  # measure the IP margin (full vs silo proxy) every round
    min_ip_margin: float = 0.05  # nats: warn when the silo proxy gets closer than this
    # below min_ip_margin: "warn" only, or also send the next rounds' adapter with fewer bits
    margin_action: str = "warn"
    correction_data: str = ""  # the owner's own rows for the correction step ("" = no step)
    correction_steps: int = 8  # optimizer steps on the full base after every FedLPP update

    def validate(self) -> None:
        check(self.quant_type in QUANT_TYPES, "lpp.quant-type", self.quant_type,
              f"one of {', '.join(QUANT_TYPES)}")
        check(self.adapter_bits in ADAPTER_BITS, "lpp.adapter-bits", self.adapter_bits,
              f"one of {ADAPTER_BITS}")
        check(self.adapter_blocksize >= 1, "lpp.adapter-blocksize", self.adapter_blocksize,
              ">= 1")
        check(self.base_blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096),
              "lpp.base-blocksize", self.base_blocksize, "a power of two in [32, 4096]")
        check(self.server_lr > 0 and math.isfinite(self.server_lr), "lpp.server-lr",
              self.server_lr, "finite and > 0")
        check(self.eval_partitions >= 1, "lpp.eval-partitions", self.eval_partitions, ">= 1")
        check(math.isfinite(self.min_ip_margin) and self.min_ip_margin >= 0,
              "lpp.min-ip-margin", self.min_ip_margin, "nats, finite and >= 0 (0 = never warn)")
        check(self.margin_action in MARGIN_ACTIONS, "lpp.margin-action", self.margin_action,
              f"one of {', '.join(MARGIN_ACTIONS)}")
        check(self.margin_action == "warn" or (self.server_eval and self.min_ip_margin > 0),
              "lpp.margin-action", self.margin_action,
              "'warn' unless the margin is measured (lpp.server-eval=true, lpp.min-ip-margin > 0)")
        check(self.correction_steps >= 0, "lpp.correction-steps", self.correction_steps,
              ">= 0 (0 = no correction step)")

    @property
    def corrects(self) -> bool:
        """Whether the server runs the correction step (it has rows and steps to take)."""
        return bool(self.correction_data) and self.correction_steps > 0

    def base_spec(self) -> BaseQuantSpec:
        """How the server quantizes the base package."""
        from fedshield_flwr.lpp.quantize import BaseQuantSpec

        return BaseQuantSpec(quant_type=self.quant_type, blocksize=self.base_blocksize,
                             clip_search=self.clip_search)

    def adapter_spec(self) -> AdapterQuantSpec:
        """How the server quantizes the global adapter it sends to silos."""
        from fedshield_flwr.lpp.adapter import AdapterQuantSpec

        return AdapterQuantSpec(bits=self.adapter_bits, blocksize=self.adapter_blocksize)
