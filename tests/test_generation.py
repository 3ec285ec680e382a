"""Generation metrics (eval.generate): the library, the silo's evaluate reply, aggregation."""

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client_app.app import evaluate
from fedshield_flwr.config import ConfigError, NodeSettings, RunConfig
from fedshield_flwr.data.templates import IGNORE_INDEX
from fedshield_flwr.generation import (
    exact_match,
    generation_metrics,
    greedy_continuations,
    prompt_and_reference,
    rouge_l,
)
from fedshield_flwr.silo import get_runtime, initial_adapter
from fedshield_flwr.wire import encode_arrays
from strategies.base import evaluate_metrics
from tests.helpers import context, reply, server_message, tiny_run_config

GEN = {"eval.generate": True, "eval.max-new-tokens": 6, "eval.max-examples": 4}


@pytest.fixture(scope="module")
def silo():
    cfg = RunConfig.from_flat(tiny_run_config(**GEN))
    node = NodeSettings(partition_id=0, num_partitions=2)
    rt = get_runtime(cfg, node)
    rt.set_adapter(rt.initial)
    return rt, rt.silo_data(cfg, node).eval


def test_prompt_is_the_ignored_labels_before_the_first_response_token():
    row = {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9]}
    assert prompt_and_reference(row) == ([5, 6], [7, 8, 9])


def test_generation_metrics_are_fractions_over_at_most_max_examples(silo):
    rt, rows = silo
    result = generation_metrics(rt.model, rt.tokenizer, rows, max_new_tokens=6, max_examples=4,
                                batch_size=3)
    assert result.num_generated == min(4, len(rows))
    assert 0.0 <= result.exact_match <= 1.0 and 0.0 <= result.rouge_l <= 1.0


def test_exact_match_is_one_when_the_reference_is_the_models_own_greedy_answer(silo):
    rt, rows = silo
    prompts = [prompt_and_reference(r)[0] for r in rows[:4]]
    answers = greedy_continuations(rt.model, rt.tokenizer, prompts, max_new_tokens=6,
                                   batch_size=4)
    own = [{"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a}
           for p, a in zip(prompts, answers)
           if rt.tokenizer.decode(a, skip_special_tokens=True).strip()]
    assert own, "the tiny model answered every prompt with nothing but special tokens"
    result = generation_metrics(rt.model, rt.tokenizer, own, max_new_tokens=6, max_examples=4,
                                batch_size=4)
    assert result.exact_match == 1.0 and result.num_generated == len(own)
    assert result.rouge_l == pytest.approx(1.0)


def test_rouge_l_equals_rouge_score_for_a_known_pair():
    from rouge_score import rouge_scorer

    pred, ref = "The cat sat on the mat", "the cat on the mat"
    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)
    assert rouge_l(pred, ref) == pytest.approx(expected["rougeL"].fmeasure)
    assert rouge_l(pred, ref) == pytest.approx(10 / 11)  # LCS 5 of 6 predicted, 5 reference
    assert rouge_l("cats running", "cat runs") == pytest.approx(1.0)  # stemmed


def test_exact_match_ignores_case_and_whitespace():
    assert exact_match("  Hello\n  World ", "hello world") == 1.0
    assert exact_match("hello", "hello world") == 0.0


def _evaluate_reply(run_config):
    start = initial_adapter(RunConfig.from_flat(run_config))
    content = RecordDict({"arrays": encode_arrays(start),
                          "config": ConfigRecord({"server-round": 1})})
    ctx = context(run_config, {"partition-id": 0, "num-partitions": 2})
    return evaluate(server_message(content, node_id=5, message_type="evaluate"), ctx)


def test_evaluate_handler_reports_generation_metrics_only_with_eval_generate(flower_identity):
    off = _evaluate_reply(tiny_run_config()).content.metric_records["metrics"]
    assert not {"eval_exact_match", "eval_rouge_l", "num-generated"} & set(off)
    on = _evaluate_reply(tiny_run_config(**GEN)).content.metric_records["metrics"]
    assert 0.0 <= on["eval_exact_match"] <= 1.0 and 0.0 <= on["eval_rouge_l"] <= 1.0
    assert on["num-generated"] == 4 and on["eval_loss"] == pytest.approx(off["eval_loss"])


def _silo_reply(node_id, **metrics):
    msg = server_message(RecordDict({"config": ConfigRecord({"server-round": 1})}), node_id,
                         message_type="evaluate")
    base = {"eval_loss": 1.0, "num-tokens": 10, "server-round": 1}
    return reply(msg, RecordDict({"metrics": MetricRecord(base | metrics)}))


def test_aggregate_weights_generation_metrics_by_answers_generated():
    good = [_silo_reply(1, eval_exact_match=1.0, eval_rouge_l=0.5, **{"num-generated": 3}),
            _silo_reply(2, eval_exact_match=0.0, eval_rouge_l=0.1, **{"num-generated": 1})]
    out = evaluate_metrics(good)
    assert out["eval_exact_match"] == pytest.approx(0.75)
    assert out["eval_rouge_l"] == pytest.approx((3 * 0.5 + 0.1) / 4)
    plain = evaluate_metrics([_silo_reply(1), _silo_reply(2)])
    assert "eval_exact_match" not in plain and "eval_rouge_l" not in plain


def test_split_silo_generates_through_the_relay_as_the_unsplit_model_does(
        tmp_path, flower_identity, silo):
    """eval.generate in split: greedy answers through the real relay (head and tail on the silo,
    the middle on the server, a KV cache on each) score exactly as the whole model's."""
    from client_app import split as silo_split
    from server_app.split import SplitMode
    from tests.strategies.test_split_strategy import FakeGrid, _sorted

    flat = tiny_run_config(**{"strategy.name": "split", **GEN})
    mode = SplitMode(RunConfig.from_flat(flat), tmp_path)
    mode.relay.start()
    try:
        msgs = _sorted(mode.strategy.configure_evaluate(
            0, mode.initial_arrays(), ConfigRecord({}), FakeGrid()))
        ctx = context(flat, {"partition-id": 0, "num-partitions": 2})
        metrics = silo_split.evaluate(msgs[0], ctx).content.metric_records["metrics"]
    finally:
        mode.relay.stop()
    rt, rows = silo  # the same silo's held-out rows, the whole model, the initial adapter
    want = generation_metrics(rt.model, rt.tokenizer, rows, max_new_tokens=6, max_examples=4,
                              batch_size=4)
    assert metrics["num-generated"] == want.num_generated == 4
    assert metrics["eval_exact_match"] == pytest.approx(want.exact_match)
    assert metrics["eval_rouge_l"] == pytest.approx(want.rouge_l)
    assert metrics["relay-bytes-up"] > 0  # it went through the relay


def test_score_generations_refuses_a_generator_that_drops_answers(silo):
    from fedshield_flwr.generation import score_generations

    rt, rows = silo
    with pytest.raises(ValueError, match="3 answers for 4 prompts"):
        score_generations(lambda prompts: [[1]] * (len(prompts) - 1), rt.tokenizer, rows, 4)


@pytest.mark.parametrize("key", ["eval.max-new-tokens", "eval.max-examples"])
def test_eval_counts_must_be_positive(key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.from_flat(tiny_run_config(**{key: 0}))


def test_lpp_silo_generates_with_its_rebuilt_quantized_model(flower_identity, tmp_path,
                                                             monkeypatch):
    from fedshield_flwr.lpp.adapter import (
        AdapterQuantSpec,
        adapter_to_arrays,
        prepare_global_adapter,
    )
    from fedshield_flwr.lpp.quantize import BaseQuantSpec, build_quantized_package
    from fedshield_flwr.models import load_base_model, load_tokenizer
    from fedshield_flwr.packages.format import package_to_arrays
    from fedshield_flwr.silo import clear_runtimes

    monkeypatch.setenv("FEDSHIELD_CACHE", str(tmp_path / "cache"))
    clear_runtimes()
    run_config = tiny_run_config(**{"strategy.name": "lpp", **GEN})
    pkg = build_quantized_package(load_base_model("tiny:llama"), BaseQuantSpec(),
                                  load_tokenizer("tiny:llama"))
    sent, _ = prepare_global_adapter(initial_adapter(RunConfig.from_flat(run_config)),
                                     AdapterQuantSpec())
    msg = server_message(RecordDict({
        "adapter": encode_arrays(adapter_to_arrays(sent)),
        "base": encode_arrays(package_to_arrays(pkg)),
        "config": ConfigRecord({"base-hash": pkg.content_hash, "server-round": 1})}),
        node_id=4, message_type="evaluate")
    ctx = context(run_config, {"partition-id": 1, "num-partitions": 3})
    m = evaluate(msg, ctx).content.metric_records["metrics"]
    clear_runtimes()
    assert m["num-generated"] == 4 and 0.0 <= m["eval_rouge_l"] <= 1.0


def test_shield_silo_reports_generation_metrics_in_its_evaluate_reply(flower_identity, tmp_path,
                                                                       monkeypatch):
    from fedshield_flwr.shield.protocol import FINAL_ROUND, KEYS_TAG

    monkeypatch.setenv("FEDSHIELD_CACHE", str(tmp_path / "cache"))  # the run's simulated keyset
    run_config = tiny_run_config(**{"strategy.name": "shield", **GEN})
    config = ConfigRecord({"server-round": 0, KEYS_TAG: "gen-test", FINAL_ROUND: False})
    msg = server_message(RecordDict({"config": config}), node_id=5, message_type="evaluate")
    ctx = context(run_config, {"partition-id": 0, "num-partitions": 2})
    m = evaluate(msg, ctx).content.metric_records["metrics"]
    assert m["num-generated"] == 4 and 0.0 <= m["eval_exact_match"] <= 1.0
