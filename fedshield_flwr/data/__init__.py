"""Data: loading (hub, files, save_to_disk, embedded), templates, partitioning across silos.

Names are imported on first use (PEP 562): a deployed ClientApp process that finds its tokenized
rows in the on-disk cache (:mod:`.silo_cache`) never pays for importing ``datasets``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "IGNORE_INDEX": ".templates",
    "ColumnMap": ".load",
    "DataLoadError": ".load",
    "SiloData": ".silo_cache",
    "cached_silo_data": ".silo_cache",
    "load_instruction_dataset": ".load",
    "load_silo_data": ".partition",
    "partition_dataset": ".partition",
    "split_eval": ".partition",
    "tokenize_example": ".templates",
}

__all__ = [
    "IGNORE_INDEX",
    "ColumnMap",
    "DataLoadError",
    "SiloData",
    "cached_silo_data",
    "load_instruction_dataset",
    "load_silo_data",
    "partition_dataset",
    "split_eval",
    "tokenize_example",
]

if TYPE_CHECKING:
    from fedshield_flwr.data.load import ColumnMap, DataLoadError, load_instruction_dataset
    from fedshield_flwr.data.partition import load_silo_data, partition_dataset, split_eval
    from fedshield_flwr.data.silo_cache import SiloData, cached_silo_data
    from fedshield_flwr.data.templates import IGNORE_INDEX, tokenize_example


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
