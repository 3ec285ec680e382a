"""``lpp`` glue helpers shared by the ServerApp and the ClientApp (no Flower round logic here).

Silo side: the quantized base arrives once as an ``ArrayRecord`` (``"base"``) next to its content
hash, is verified and kept in the silo's package cache (:mod:`.package_cache`,
``<cache>/silo/lpp-base/<hash>``), and the silo's model is rebuilt from that package alone
(:func:`silo_runtime`): no hub, no local path of its own. Later messages carry only the hash.

Server side: the specs from ``lpp.*`` settings and the held-out evaluation rows the server uses
for the per-round IP margin (:func:`server_eval_rows`).
"""

from __future__ import annotations

import logging
import time

from .config import LppSettings, NodeSettings, RunConfig
from .data import cached_silo_data
from .models import apply_lora, cache_root, get_adapter_state
from .models.adapter_quant import AdapterQuantSpec
from .models.quantize import (
    BaseQuantSpec,
    PackageError,
    build_model_from_package,
    package_tokenizer,
)
from .package_cache import receive_package
from .silo import SiloRuntime

log = logging.getLogger("fedshield.lpp")

BASE_RECORD = "base"  # ArrayRecord of the quantized base (first delivery only)
ADAPTER_RECORD = "adapter"  # ArrayRecord of the k-bit global adapter
HASH_KEY = "base-hash"  # ConfigRecord key: content hash of the base the silo must use


def base_spec(s: LppSettings) -> BaseQuantSpec:
    return BaseQuantSpec(quant_type=s.quant_type, blocksize=s.base_blocksize,
                         clip_search=s.clip_search)


def adapter_spec(s: LppSettings) -> AdapterQuantSpec:
    return AdapterQuantSpec(bits=s.adapter_bits, blocksize=s.adapter_blocksize)


_RUNTIMES: dict[tuple, SiloRuntime] = {}


def silo_runtime(
    cfg: RunConfig, node: NodeSettings, content_hash: str, arrays: dict | None, who: str
) -> SiloRuntime:
    """Quantized base + LoRA built from the package (cached per process, per hash and LoRA)."""
    key = (content_hash, cfg.model.lora, cfg.train.seed, node.cache_dir)
    if key not in _RUNTIMES:
        t0 = time.time()
        pkg = receive_package(arrays, content_hash, node, who)
        tok = package_tokenizer(pkg)
        if tok is None:
            raise PackageError(f"base {content_hash[:12]} from {who} ships no tokenizer; the "
                               "server must build it with include_tokenizer=True")
        model = apply_lora(build_model_from_package(pkg), cfg.model.lora, seed=cfg.train.seed)
        _RUNTIMES.clear()  # one model per process
        _RUNTIMES[key] = SiloRuntime(model, tok, f"lpp:{content_hash}", time.time() - t0,
                                     initial=get_adapter_state(model))
        log.info("silo %d: rebuilt %s base %s (+LoRA r=%d) in %.1f s", node.partition_id,
                 pkg.quant_type, content_hash[:12], cfg.model.lora.r, time.time() - t0)
    elif arrays is not None:  # resent (e.g. after the cache was lost): make sure it is on disk
        receive_package(arrays, content_hash, node, who)
    return _RUNTIMES[key]


def server_eval_rows(cfg: RunConfig, s: LppSettings, tokenizer, model_path: str) -> list[dict]:
    """Tokenized held-out rows the server evaluates on every round.

    ``lpp.eval-data`` names a file, directory or hub dataset the coordinator holds (all of it is
    used, capped at ``4 * data.max-eval-examples`` rows). Empty (simulation): the union of the
    held-out splits of ``lpp.eval-partitions`` simulated silos, the rows their own evaluation
    uses, which none of them trains on.
    """
    from .data import load_silo_data

    cache = cache_root() / "silo-data"
    if s.eval_data:
        from .data.load import ColumnMap, load_instruction_dataset
        from .data.partition import tokenize_rows

        d = cfg.data
        ds = load_instruction_dataset(
            s.eval_data, ColumnMap(d.instruction_column, d.input_column, d.response_column))
        ds = ds.select(range(min(len(ds), 4 * d.max_eval_examples)))
        return tokenize_rows(ds, tokenizer, d)
    rows: list[dict] = []
    for i in range(s.eval_partitions):
        node = NodeSettings(i, s.eval_partitions)
        silo = cached_silo_data(cfg.data, node, tokenizer, cfg.train.seed, model_path, cache,
                                lambda node=node: load_silo_data(cfg.data, node, tokenizer,
                                                                 cfg.train.seed))
        rows.extend(silo.eval)
    return rows
