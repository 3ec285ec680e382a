"""The artifacts an attacker sees, built with the product's own code paths.

- a silo's rows and the curious server's public text: the run config's data set, partitioned by
  :mod:`fedshield_flwr.data.partition` (silo = partition 0, public text = partition 1), tokenized
  with the project's template;
- split: :class:`SplitSilo` / :class:`MiddleServer` / :class:`SiloTrainer` from ``split.*``;
- fedavg / lpp / shield: a real local round (:func:`fedshield_flwr.train.train_lora`) on the silo's
  rows from the seeded initial adapter; lpp trains against the quantized base package
  (:mod:`fedshield_flwr.lpp`); shield encrypts the update with :mod:`fedshield_flwr.shield`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from fedshield_flwr.audit.tokens import content_mask
from fedshield_flwr.config import RunConfig


@dataclass
class AuditData:
    """Raw and tokenized rows of the silo (train, held-out) and of the server's public text."""

    silo_train: list[dict]
    silo_eval: list[dict]
    public: list[dict]
    silo_train_tok: list[dict]
    silo_eval_tok: list[dict]
    public_tok: list[dict]
    silo_eval_masks: list[np.ndarray]
    public_masks: list[np.ndarray]


def build_data(cfg: RunConfig, tokenizer, *, public_rows: int, eval_rows: int) -> AuditData:
    """Silo partition 0 (train / held-out) and public text from partition 1 of 2."""
    from fedshield_flwr.data.load import ColumnMap, load_instruction_dataset
    from fedshield_flwr.data.partition import partition_dataset, split_eval, tokenize_rows

    d = cfg.data
    full = load_instruction_dataset(d.name, ColumnMap(d.instruction_column, d.input_column,
                                                      d.response_column))
    seed = cfg.train.seed
    parts = [partition_dataset(full, 2, i, d.partitioner, seed, d.dirichlet_alpha,
                               d.dirichlet_column) for i in (0, 1)]
    train_ds, eval_ds = split_eval(parts[0], d.eval_fraction, seed, max(eval_rows, 1))
    public_ds = parts[1].shuffle(seed=seed).select(range(min(public_rows, len(parts[1]))))
    silo_train, silo_eval, public = (list(ds) for ds in (train_ds, eval_ds, public_ds))
    # a row that is both in the silo's data and in the public text would be a free win
    seen = {(r["instruction"], r["response"]) for r in silo_train + silo_eval}
    public = [r for r in public if (r["instruction"], r["response"]) not in seen]
    tok = [tokenize_rows(ds, tokenizer, d) for ds in (train_ds, eval_ds)]
    import datasets

    public_tok = tokenize_rows(datasets.Dataset.from_list(public), tokenizer, d) if public else []
    return AuditData(
        silo_train, silo_eval, public, tok[0], tok[1], public_tok,
        [content_mask(r, t, tokenizer) for r, t in zip(silo_eval, tok[1])],
        [content_mask(r, t, tokenizer) for r, t in zip(public, public_tok)],
    )


def split_settings(cfg: RunConfig, **override):
    """The run's ``split.*`` section with ``override`` applied (a frozen dataclass copy)."""
    from dataclasses import replace

    from fedshield_flwr.split.settings import SplitSettings

    return replace(SplitSettings.from_flat(cfg.extra), **override)


def full_model(cfg: RunConfig, quantized: bool = False):
    """The base + the seeded initial LoRA (lpp: the base rebuilt from its quantized package)."""
    from fedshield_flwr.models.load import load_base_model, resolve_model_path
    from fedshield_flwr.models.lora import apply_lora

    base = load_base_model(cfg.model.name, 0)
    if quantized:
        from fedshield_flwr.lpp.quantize import BaseQuantSpec, build_quantized_package
        from fedshield_flwr.lpp.rebuild import build_model_from_package
        from fedshield_flwr.lpp.settings import LppSettings

        lpp = LppSettings.from_flat(cfg.extra)
        spec = BaseQuantSpec(quant_type=lpp.quant_type, blocksize=lpp.base_blocksize,
                             clip_search=lpp.clip_search)
        base = build_model_from_package(build_quantized_package(base, spec))
    return apply_lora(base, cfg.model.lora, seed=cfg.train.seed,
                      base_path=resolve_model_path(cfg.model.name))


def local_round(cfg: RunConfig, model, rows: list[dict], pad_id: int, *, steps: int | None = None):
    """One real local round (round 1, silo 0): ``(global, update, member_indices, model)``."""
    from dataclasses import replace

    from fedshield_flwr.audit.updates import trained_rows
    from fedshield_flwr.models.lora import get_adapter_state
    from fedshield_flwr.train import cosine_lr, train_lora

    t = cfg.train if steps is None else replace(cfg.train, max_steps=steps)
    t = replace(t, progress=False)
    start = copy.deepcopy(get_adapter_state(model))
    lr = cosine_lr(1, cfg.num_server_rounds, t.learning_rate_max, t.learning_rate_min)
    seed = t.seed + 1000  # train_round's seed for round 1, silo 0
    train_lora(model, rows, t, lr, pad_id, seed, desc="audit silo 0 round 1")
    after = get_adapter_state(model)
    update = {k: after[k] - start[k] for k in start}
    members = trained_rows(len(rows), t.batch_size, t.max_steps * t.gradient_accumulation_steps,
                           seed)
    return start, update, members
