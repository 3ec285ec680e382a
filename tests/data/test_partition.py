"""Partitioning across silos (flwr-datasets), held-out split, templates with masked prompts."""

import datasets
import pytest

from fedshield_flwr.config import DataSettings, NodeSettings
from fedshield_flwr.data import (
    IGNORE_INDEX,
    load_instruction_dataset,
    load_silo_data,
    partition_dataset,
    split_eval,
    tokenize_example,
)
from fedshield_flwr.models import load_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return load_instruction_dataset("embedded:chatterbot-english")


def test_iid_partitions_are_disjoint_and_cover_the_data(corpus):
    indexed = corpus.add_column("idx", list(range(len(corpus))))
    parts = [partition_dataset(indexed, 3, i, "iid", seed=1) for i in range(3)]
    ids = [set(p["idx"]) for p in parts]
    assert set().union(*ids) == set(range(len(corpus)))
    assert sum(len(s) for s in ids) == len(corpus)  # disjoint
    # IID after shuffling: every silo sees several topics
    assert all(len(set(p["category"])) > 5 for p in parts)


def test_dirichlet_partitions_skew_topics(corpus):
    parts = [partition_dataset(corpus, 3, i, "dirichlet", seed=1, dirichlet_alpha=0.1)
             for i in range(3)]
    assert sum(len(p) for p in parts) == len(corpus)
    # with alpha=0.1 the topic mixes of the silos differ strongly
    names = corpus.features["category"] if isinstance(corpus.features["category"],
                                                      datasets.ClassLabel) else None
    del names
    tops = [max(set(p["category"]), key=list(p["category"]).count) for p in parts]
    shares = [list(p["category"]).count(t) / len(p) for p, t in zip(parts, tops)]
    assert max(shares) > 0.5


def test_dirichlet_without_label_column_fails_clearly(corpus):
    with pytest.raises(Exception, match="data.dirichlet-column"):
        partition_dataset(corpus, 3, 0, "dirichlet", dirichlet_column="nope")


def test_held_out_split_is_seeded_and_capped(corpus):
    a_train, a_eval = split_eval(corpus, 0.1, seed=3, max_eval=50)
    b_train, b_eval = split_eval(corpus, 0.1, seed=3, max_eval=50)
    assert len(a_eval) == 50 and a_eval["instruction"] == b_eval["instruction"]
    assert len(a_train) + len(a_eval) == len(corpus)


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_loss_only_on_response_tokens(template):
    tok = load_tokenizer("tiny:llama")
    row = {"instruction": "What is AI?", "input": "", "response": "A field of study."}
    ex = tokenize_example(row, tok, template, max_length=128)
    n_prompt = sum(1 for x in ex["labels"] if x == IGNORE_INDEX)
    assert 0 < n_prompt < len(ex["labels"])
    target = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
    assert "A field of study." in tok.decode(target)
    assert "What is AI?" not in tok.decode(target)


def test_truncation_keeps_part_of_the_response():
    tok = load_tokenizer("tiny:llama")
    row = {"instruction": "word " * 200, "input": "", "response": "yes " * 200}
    ex = tokenize_example(row, tok, "alpaca", max_length=32)
    assert len(ex["input_ids"]) <= 32
    assert sum(1 for x in ex["labels"] if x != IGNORE_INDEX) >= 1


def test_deployment_silo_uses_its_own_data_path(tmp_path):
    import json

    p = tmp_path / "mine.jsonl"
    p.write_text("\n".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}"})
                           for i in range(20)))
    tok = load_tokenizer("tiny:llama")
    data = load_silo_data(DataSettings(eval_fraction=0.2, max_eval_examples=4), NodeSettings(data_path=str(p)),
                          tok, seed=0)
    assert len(data.train) == 16 and len(data.eval) == 4
    assert "local file" in data.source
