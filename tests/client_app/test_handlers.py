"""ClientApp handlers called directly with real Flower Messages and Contexts."""

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from client_app.app import evaluate, train
from fedshield_flwr.config import RunConfig
from fedshield_flwr.silo import initial_adapter
from fedshield_flwr.wire import encode_arrays
from tests.helpers import context, server_message, tiny_run_config


@pytest.fixture(scope="module")
def run_config():
    return tiny_run_config()


def _msg(adapter, rnd, mtype):
    content = RecordDict({"arrays": encode_arrays(adapter),
                          "config": ConfigRecord({"server-round": rnd})})
    return server_message(content, node_id=5, message_type=mtype)


def test_train_handler_returns_a_trained_adapter_and_metrics(flower_identity, run_config):
    start = initial_adapter(RunConfig.from_flat(run_config))
    ctx = context(run_config, {"partition-id": 1, "num-partitions": 2})
    out = train(_msg(start, 3, "train"), ctx)
    assert not out.has_error()
    assert out.metadata.src_node_id == 5 and out.metadata.message_type == "train"
    metrics = out.content.metric_records["metrics"]
    assert metrics["server-round"] == 3 and metrics["num-examples"] == 2 * 4
    assert metrics["train_loss"] > 0
    got = OrderedDict((k, a.numpy()) for k, a in out.content.array_records["arrays"].items())
    assert list(got) == list(start)
    assert any(not np.array_equal(got[k], start[k]) for k in start)  # it trained


def test_evaluate_handler_reports_loss_and_perplexity(flower_identity, run_config):
    start = initial_adapter(RunConfig.from_flat(run_config))
    ctx = context(run_config, {"partition-id": 0, "num-partitions": 2})
    out = evaluate(_msg(start, 0, "evaluate"), ctx)
    m = out.content.metric_records["metrics"]
    assert m["server-round"] == 0 and m["num-tokens"] > 0
    assert m["eval_perplexity"] == pytest.approx(np.exp(m["eval_loss"]), rel=1e-6)


def test_train_handler_refuses_a_malformed_global_adapter(flower_identity, run_config):
    start = initial_adapter(RunConfig.from_flat(run_config))
    bad = OrderedDict(start)
    key = next(iter(bad))
    bad[key] = np.zeros((3, 3), np.float32)
    ctx = context(run_config, {"partition-id": 0, "num-partitions": 2})
    with pytest.raises(ValueError, match="server message to silo 0 in round 2"):
        train(_msg(bad, 2, "train"), ctx)


def test_unknown_mode_is_a_clear_error(flower_identity, run_config):
    ctx = context(dict(run_config) | {"strategy.name": "nope"})
    with pytest.raises(ValueError, match="no handler"):
        train(_msg({}, 1, "train"), ctx)
