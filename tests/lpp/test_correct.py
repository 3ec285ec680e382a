"""The owner's correction step: the global adapter refitted to the full base on its own rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedshield_flwr.config import (
    DataSettings,
    LoraSettings,
    NodeSettings,
    RunConfig,
    TrainSettings,
)
from fedshield_flwr.data import load_silo_data
from fedshield_flwr.lpp.correct import CorrectionDataError, correct_adapter, disjoint_rows, row_key
from fedshield_flwr.lpp.margin import owner_rows
from fedshield_flwr.lpp.settings import LppSettings
from fedshield_flwr.models import apply_lora, get_adapter_state, load_base_model, load_tokenizer
from fedshield_flwr.train import evaluate
from fedshield_flwr.wire import encode_arrays
from tests.helpers import tiny_run_config


def _tiny():
    tok = load_tokenizer("tiny:llama")
    model = apply_lora(load_base_model("tiny:llama"), LoraSettings(r=4), seed=0)
    data = load_silo_data(DataSettings(max_length=48, max_eval_examples=16),
                          NodeSettings(partition_id=0, num_partitions=4), tok, seed=0)
    return tok, model, data


def test_correction_lowers_the_full_base_loss_and_leaves_the_sent_adapter_alone():
    tok, model, data = _tiny()
    pad = tok.pad_token_id
    adapter = get_adapter_state(model)
    copy = {k: v.copy() for k, v in adapter.items()}
    before_own = evaluate(model, data.train, 16, pad).loss
    before_held = evaluate(model, data.eval, 16, pad).loss
    result = correct_adapter(model, adapter, data.train,
                             TrainSettings(batch_size=8, progress=False), 15, 3e-3, pad, seed=1)
    assert all(np.array_equal(adapter[k], copy[k]) for k in copy)  # the input is not modified
    assert any(not np.array_equal(result.adapter[k], copy[k]) for k in copy)
    assert result.steps == 15 and math.isfinite(result.loss)
    # on the full base, on the owner's rows and on rows it never saw
    assert evaluate(model, data.train, 16, pad).loss < before_own
    assert evaluate(model, data.eval, 16, pad).loss < before_held


def test_zero_steps_return_the_adapter_unchanged():
    tok, model, data = _tiny()
    adapter = get_adapter_state(model)
    result = correct_adapter(model, adapter, data.train, TrainSettings(progress=False), 0, 1e-3,
                             tok.pad_token_id, seed=1)
    assert result.adapter is adapter and result.steps == 0


def test_rows_that_are_also_eval_rows_are_dropped_and_a_full_overlap_is_refused():
    _, _, data = _tiny()
    held = {row_key(r) for r in data.eval}
    mixed = data.train[:20] + data.eval[:3]
    kept = [row_key(r) for r in disjoint_rows(mixed, data.eval, "owner.jsonl")]
    # the embedded set repeats some pairs, so a few training rows equal eval rows: dropped too
    assert kept == [row_key(r) for r in data.train[:20] if row_key(r) not in held]
    assert kept and not set(kept) & held
    with pytest.raises(CorrectionDataError, match=r"server: all 3 correction rows of "
                       r"lpp.correction-data='owner.jsonl'.*lpp.correction-steps=0"):
        disjoint_rows(data.eval[:3], data.eval, "owner.jsonl")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_server_corrects_on_the_owner_file_only_minus_its_eval_rows(tmp_path):
    """LppMode's step reads lpp.correction-data and nothing else (no silo's partition), leaves
    out the rows it evaluates on, and reports what it did every round."""
    from server_app.lpp import LppMode

    owner = [{"instruction": f"Owner question {i}?", "input": "",
              "response": f"Owner answer number {i}."} for i in range(12)]
    evals = owner[:4]  # the owner evaluates on 4 of its own rows: they must be left out
    _write(tmp_path / "owner.jsonl", owner)
    _write(tmp_path / "eval.jsonl", evals)
    cfg = RunConfig.from_flat(tiny_run_config(**{
        "strategy.name": "lpp", "num-server-rounds": 2,
        "lpp.eval-data": str(tmp_path / "eval.jsonl"),
        "lpp.correction-data": str(tmp_path / "owner.jsonl"), "lpp.correction-steps": 2}))
    mode = LppMode(cfg, tmp_path / "run")
    assert mode.strategy.correct is not None
    fp = get_adapter_state(mode.full)
    corrected = mode.correct(1, fp)
    tok = load_tokenizer("tiny:llama")
    used = {row_key(r) for r in mode._correction_rows}
    assert used == {row_key(r) for r in owner_rows(cfg, str(tmp_path / "owner.jsonl"), tok)[4:]}
    assert not used & {row_key(r) for r in mode.eval_rows()}
    assert any(not np.array_equal(corrected[k], fp[k]) for k in fp)
    metrics = mode.ip_margin(1, encode_arrays(corrected))
    assert metrics["correction_seconds"] > 0 and math.isfinite(metrics["correction_train_loss"])


def test_no_correction_data_means_no_step():
    assert not LppSettings().corrects
    assert not LppSettings.from_section({"correction-data": "x.jsonl",
                                         "correction-steps": 0}).corrects
    assert LppSettings.from_section({"correction-data": "x.jsonl"}).corrects
