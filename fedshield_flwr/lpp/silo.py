"""The silo side of ``lpp``: its model rebuilt from the quantized base package alone.

The quantized base arrives once next to its content hash, is verified and kept in the silo's
package cache (:mod:`fedshield_flwr.packages.cache`, ``<cache>/silo/lpp-base/<hash>``), and the
silo's model is rebuilt from that package (:func:`silo_runtime`): no hub, no local path of its
own. Later messages carry only the hash. The global adapter arrives k-bit; the silo trains and
replies as ``fedavg`` does.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import numpy as np

from fedshield_flwr.config import NodeSettings, RunConfig
from fedshield_flwr.lpp.package import LPP_KIND, package_from_arrays
from fedshield_flwr.lpp.rebuild import build_model_from_package
from fedshield_flwr.models import apply_lora, get_adapter_state
from fedshield_flwr.models.lora import AdapterMismatchError, check_adapter_state
from fedshield_flwr.packages.cache import receive_package
from fedshield_flwr.packages.format import PackageError
from fedshield_flwr.packages.model import package_tokenizer
from fedshield_flwr.silo import SiloRuntime, cached_runtime
from fedshield_flwr.wire import PayloadError

log = logging.getLogger("fedshield.lpp")


def receive_base(arrays: dict | None, content_hash: str, node: NodeSettings, who: str):
    """The verified base package: from ``arrays`` if sent (then cached), else this silo's cache."""
    return receive_package(arrays, content_hash, node, who, LPP_KIND, package_from_arrays,
                           what="base")


def silo_runtime(
    cfg: RunConfig, node: NodeSettings, content_hash: str, arrays: dict | None, who: str
) -> SiloRuntime:
    """Quantized base + LoRA built from the package (cached per process, per hash and LoRA)."""
    def build() -> SiloRuntime:
        t0 = time.time()
        pkg = receive_base(arrays, content_hash, node, who)
        tok = package_tokenizer(pkg)
        if tok is None:
            raise PackageError(f"base {content_hash[:12]} from {who} ships no tokenizer; the "
                               "server must build it with include_tokenizer=True")
        model = apply_lora(build_model_from_package(pkg), cfg.model.lora, seed=cfg.train.seed)
        log.info("silo %d: rebuilt %s base %s (+LoRA r=%d) in %.1f s", node.partition_id,
                 pkg.quant_type, content_hash[:12], cfg.model.lora.r, time.time() - t0)
        return SiloRuntime(model, tok, f"lpp:{content_hash}", time.time() - t0,
                           initial=get_adapter_state(model))

    key = ("lpp", content_hash, cfg.model.lora, cfg.train.seed, node.cache_dir)
    built = []
    rt = cached_runtime(key, lambda: built.append(1) or build())
    if arrays is not None and not built:  # resent (e.g. after the cache was lost): keep it
        receive_base(arrays, content_hash, node, who)
    return rt


def checked_adapter(rt: SiloRuntime, adapter: OrderedDict[str, np.ndarray], who: str
                    ) -> OrderedDict[str, np.ndarray]:
    """The de-quantized global adapter, refused unless it fits this silo's LoRA."""
    try:
        check_adapter_state(rt.adapter_state(), adapter, who)
    except AdapterMismatchError as exc:
        raise PayloadError(f"{exc} (the k-bit adapter does not match this silo's LoRA: "
                           "model.lora settings differ between server and silo)") from exc
    return adapter
