"""Data: loading (hub, files, save_to_disk, embedded), templates, partitioning across silos."""

from .load import ColumnMap, DataLoadError, load_instruction_dataset
from .partition import SiloData, load_silo_data, partition_dataset, split_eval
from .templates import IGNORE_INDEX, tokenize_example

__all__ = [
    "IGNORE_INDEX",
    "ColumnMap",
    "DataLoadError",
    "SiloData",
    "load_instruction_dataset",
    "load_silo_data",
    "partition_dataset",
    "split_eval",
    "tokenize_example",
]
