"""fedavg aggregation over real Flower Messages: exact weighting, bad replies dropped by name."""

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from strategies.fedavg import LoraFedAvg, weighted_average
from tests.helpers import reply, server_message

TEMPLATE = OrderedDict([("a.lora_A.weight", np.zeros((2, 3), np.float32)),
                        ("a.lora_B.weight", np.zeros((3, 2), np.float32))])


def _state(value):
    return OrderedDict((k, np.full(v.shape, value, np.float32)) for k, v in TEMPLATE.items())


def _train_reply(node, state, n, rnd=1, loss=1.0):
    msg = server_message(RecordDict({}), node)
    arrays = ArrayRecord(OrderedDict((k, Array(v)) for k, v in state.items()))
    metrics = MetricRecord({"num-examples": n, "server-round": rnd, "train_loss": loss})
    return reply(msg, RecordDict({"arrays": arrays, "metrics": metrics}))


def test_weighted_average_is_exact():
    out = weighted_average([_state(1.0), _state(4.0)], [1, 3])
    assert np.allclose(out["a.lora_A.weight"], 3.25)


def test_aggregate_weights_by_num_examples(flower_identity):
    strat = LoraFedAvg(TEMPLATE)
    arrays, metrics = strat.aggregate_train(1, [_train_reply(1, _state(1.0), 10, loss=2.0),
                                               _train_reply(2, _state(2.0), 30, loss=1.0)])
    got = arrays["a.lora_B.weight"].numpy()
    assert np.allclose(got, 1.75)
    assert metrics["train_loss"] == pytest.approx(1.25)
    assert strat.accepted_replies == 2 and strat.rejected_replies == 0


@pytest.mark.parametrize("case,fragment", [
    ("wrong_round", "replied for round 7"),
    ("wrong_shape", "shape"),
    ("nan", "NaN"),
    ("wrong_dtype", "dtype"),
    ("missing_tensor", "names differ"),
    ("zero_weight", "num-examples"),
    ("error_reply", "failed train"),
    ("garbled_bytes", "not a valid numpy payload"),
])
def test_bad_reply_is_dropped_with_silo_and_round_named(flower_identity, caplog, case, fragment):
    good = _train_reply(1, _state(1.0), 10)
    state = _state(5.0)
    n, rnd = 10, 1
    if case == "wrong_round":
        rnd = 7
    elif case == "wrong_shape":
        state["a.lora_A.weight"] = np.zeros((4, 4), np.float32)
    elif case == "nan":
        state["a.lora_A.weight"][0, 0] = np.nan
    elif case == "wrong_dtype":
        state["a.lora_A.weight"] = state["a.lora_A.weight"].astype(np.float64)
    elif case == "missing_tensor":
        del state["a.lora_B.weight"]
    elif case == "zero_weight":
        n = 0
    bad = _train_reply(9, state, n, rnd=rnd)
    if case == "error_reply":
        bad = Message(Error(code=1, reason="ClientApp crashed"),
                      reply_to=server_message(RecordDict({}), 9))
    if case == "garbled_bytes":
        arr = bad.content.array_records["arrays"]["a.lora_A.weight"]
        arr.data = arr.data[:20] + b"garbage" * 3
    strat = LoraFedAvg(TEMPLATE)
    with caplog.at_level("WARNING", logger="fedshield.server"):
        arrays, _ = strat.aggregate_train(1, [good, bad])
    assert np.allclose(arrays["a.lora_A.weight"].numpy(), 1.0)  # only the good silo counted
    assert strat.accepted_replies == 1 and strat.rejected_replies == 1
    assert any("9" in p and fragment in p for p in strat.problems), strat.problems
    assert any(fragment in r.getMessage() for r in caplog.records)


def test_duplicated_reply_counts_once(flower_identity):
    first = _train_reply(3, _state(1.0), 10)
    strat = LoraFedAvg(TEMPLATE)
    arrays, _ = strat.aggregate_train(1, [first, _train_reply(3, _state(9.0), 10),
                                          _train_reply(4, _state(3.0), 10)])
    assert np.allclose(arrays["a.lora_A.weight"].numpy(), 2.0)
    assert any("duplicated" in p for p in strat.problems)


def test_all_replies_bad_keeps_global_adapter(flower_identity):
    strat = LoraFedAvg(TEMPLATE)
    arrays, metrics = strat.aggregate_train(2, [_train_reply(1, _state(1.0), 10, rnd=1)])
    assert arrays is None and metrics is None
