"""Data loading: every local format, save_to_disk, column mapping, embedded corpus."""

import json

import datasets
import pandas as pd
import pytest

from fedshield_flwr.data import ColumnMap, DataLoadError, load_instruction_dataset

ROWS = [
    {"q": f"question {i}?", "ctx": "" if i % 2 else f"context {i}", "a": f"answer {i}.",
     "topic": "even" if i % 2 == 0 else "odd"}
    for i in range(12)
]
MAP = ColumnMap(instruction="q", input="ctx", response="a")


def _check(ds):
    assert len(ds) == len(ROWS)
    assert {"instruction", "input", "response", "topic"} <= set(ds.column_names)
    assert ds[0]["instruction"] == "question 0?" and ds[0]["response"] == "answer 0."
    assert ds[0]["input"] == "context 0" and ds[1]["input"] == ""


def test_json_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(ROWS))
    _check(load_instruction_dataset(str(p), MAP))


def test_jsonl_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS))
    _check(load_instruction_dataset(str(p), MAP))


def test_csv_file(tmp_path):
    p = tmp_path / "d.csv"
    pd.DataFrame(ROWS).to_csv(p, index=False)
    _check(load_instruction_dataset(str(p), MAP))


def test_parquet_file(tmp_path):
    p = tmp_path / "d.parquet"
    pd.DataFrame(ROWS).to_parquet(p)
    _check(load_instruction_dataset(str(p), MAP))


def test_save_to_disk_directory_and_datasetdict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "plain"))
    _check(load_instruction_dataset(str(tmp_path / "plain"), MAP))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "dd"))
    _check(load_instruction_dataset(str(tmp_path / "dd"), MAP))


def test_missing_input_column_is_filled_with_empty_strings(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"q": r["q"], "a": r["a"]}) for r in ROWS))
    ds = load_instruction_dataset(str(p), MAP)
    assert set(ds["input"]) == {""}


def test_missing_response_column_names_the_setting(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(ROWS))
    with pytest.raises(DataLoadError, match="data.response-column"):
        load_instruction_dataset(str(p), ColumnMap(instruction="q", response="nope"))


def test_missing_file_and_unreachable_hub_fail_clearly(tmp_path):
    with pytest.raises(DataLoadError, match="does not exist"):
        load_instruction_dataset(str(tmp_path / "absent.csv"))
    with pytest.raises(DataLoadError, match="cannot load data set"):
        load_instruction_dataset("no-such-org/no-such-dataset-xyz")


def test_embedded_chatterbot_corpus_has_english_qa_pairs():
    ds = load_instruction_dataset("embedded:chatterbot-english")
    assert len(ds) > 2000
    assert "category" in ds.column_names and len(set(ds["category"])) > 10
    assert all(r.strip() for r in ds["response"][:50])
