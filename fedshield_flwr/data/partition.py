"""A silo's training and held-out evaluation data, in simulation and in deployment.

Simulation: the whole data set is split across ``num-partitions`` silos with Flower's own
``flwr-datasets`` partitioners (IID, or Dirichlet over a label column for non-IID skew).
Deployment: a silo sets ``data-path`` in its node config and uses all of its own local data;
nothing about it leaves the silo. Either way a seeded held-out split is kept for evaluation.
"""

from __future__ import annotations

import datasets

from fedshield_flwr.config import DataSettings, NodeSettings
from fedshield_flwr.data.load import ColumnMap, DataLoadError, load_instruction_dataset
from fedshield_flwr.data.silo_cache import SiloData
from fedshield_flwr.data.templates import resolve_template, tokenize_example


def partition_dataset(
    ds: datasets.Dataset,
    num_partitions: int,
    partition_id: int,
    partitioner: str = "iid",
    seed: int = 42,
    dirichlet_alpha: float = 0.5,
    dirichlet_column: str = "category",
) -> datasets.Dataset:
    """One partition of ``ds`` using ``flwr_datasets`` partitioners (IID or Dirichlet)."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    if partitioner == "iid":
        # IidPartitioner shards contiguously: shuffle first so topics are mixed.
        part = IidPartitioner(num_partitions=num_partitions)
        part.dataset = ds.shuffle(seed=seed)
    elif partitioner == "dirichlet":
        if dirichlet_column not in ds.column_names:
            raise DataLoadError(
                f"data.partitioner=dirichlet needs a label column '{dirichlet_column}'; "
                f"columns are {ds.column_names}; set data.dirichlet-column"
            )
        if not isinstance(ds.features[dirichlet_column], datasets.ClassLabel):
            ds = ds.class_encode_column(dirichlet_column)
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=dirichlet_column,
            alpha=dirichlet_alpha,
            min_partition_size=2,
            self_balancing=True,
            seed=seed,
        )
        part.dataset = ds
    else:
        raise ValueError(f"unknown partitioner '{partitioner}'")
    return part.load_partition(partition_id)


def split_eval(ds: datasets.Dataset, fraction: float, seed: int, max_eval: int):
    """Seeded (train, held-out eval) split; eval capped at ``max_eval`` rows."""
    if len(ds) < 2:
        raise DataLoadError(f"a silo needs at least 2 examples, it has {len(ds)}")
    n_eval = max(1, min(int(round(len(ds) * fraction)), max_eval, len(ds) - 1))
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def tokenize_rows(ds: datasets.Dataset, tokenizer, data: DataSettings) -> list[dict]:
    template = resolve_template(data.template, tokenizer)
    return [tokenize_example(row, tokenizer, template, data.max_length) for row in ds]


def load_silo_data(data: DataSettings, node: NodeSettings, tokenizer, seed: int) -> SiloData:
    """Train/eval rows for this silo: its own ``data-path`` if set, else its partition."""
    columns = ColumnMap(data.instruction_column, data.input_column, data.response_column)
    if node.data_path:
        ds = load_instruction_dataset(node.data_path, columns)
        source = f"local file {node.data_path}"
    else:
        full = load_instruction_dataset(data.name, columns)
        ds = partition_dataset(
            full, node.num_partitions, node.partition_id, data.partitioner, seed,
            data.dirichlet_alpha, data.dirichlet_column,
        )
        source = f"{data.name} partition {node.partition_id}/{node.num_partitions} ({data.partitioner})"
    train_ds, eval_ds = split_eval(ds, data.eval_fraction, seed, data.max_eval_examples)
    return SiloData(tokenize_rows(train_ds, tokenizer, data), tokenize_rows(eval_ds, tokenizer, data), source)
