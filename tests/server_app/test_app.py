"""The ServerApp's main called in process: a failed run says so in metrics.json and its log."""

from __future__ import annotations

import json
import logging

import pytest

from fedshield_flwr.results import RunResults, record_outcome
from server_app.app import main
from tests.helpers import PushPull, context, tiny_run_config


class GoneGrid(PushPull):
    """Two silos that never answer an evaluation, and a SuperLink gone by the first training."""

    def get_node_ids(self):
        return [1, 2]

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            raise RuntimeError("the SuperLink went away; restart it and resume the run")
        return []


@pytest.fixture
def server_log():
    """The records of the library's loggers (they do not propagate to pytest's caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    lib = logging.getLogger("fedshield_flwr")
    lib.addHandler(handler)
    yield records
    lib.removeHandler(handler)


def _metrics(results_dir):
    return json.loads(((results_dir / "latest").resolve() / "metrics.json").read_text())


def test_a_serverapp_that_fails_at_start_leaves_metrics_json_failed_with_the_error(
        flower_identity, tmp_path, server_log):
    from fedshield_flwr.split.arch import SplitError

    cfg = tiny_run_config(**{"strategy.name": "split", "split.head-layers": 99,
                             "results.dir": str(tmp_path)})
    with pytest.raises(SplitError, match="split.head-layers=99"):  # re-raised for Flower
        main(GoneGrid(), context(cfg))
    doc = _metrics(tmp_path)
    assert doc["status"] == "failed" and doc["rounds"] == []
    assert "failed before completing any round: SplitError: split.head-layers=99" in doc["error"]
    assert doc["error"].endswith("lower them")  # the remedy travels with it
    last = server_log[-1]
    assert last.levelno == logging.ERROR and doc["error"] in last.getMessage()


def test_a_failure_in_a_round_names_the_last_completed_round(
        flower_identity, tmp_path, server_log):
    cfg = tiny_run_config(**{"results.dir": str(tmp_path), "num-server-rounds": 2})
    with pytest.raises(RuntimeError, match="SuperLink went away"):
        main(GoneGrid(), context(cfg))
    doc = _metrics(tmp_path)
    assert doc["status"] == "failed" and [r["round"] for r in doc["rounds"]] == [0]
    assert "failed after round 0: RuntimeError: the SuperLink went away" in doc["error"]
    assert server_log[-1].levelno == logging.ERROR


def test_a_run_that_returns_is_completed_and_a_resumed_one_running_again(tmp_path):
    @record_outcome
    def ok():
        RunResults.create(tmp_path, "run-1", {})

    ok()
    assert _metrics(tmp_path)["status"] == "completed"
    RunResults.resume(tmp_path)
    assert _metrics(tmp_path)["status"] == "running" and _metrics(tmp_path)["error"] is None


def test_an_error_before_the_results_exist_is_logged_and_reraised(tmp_path, server_log):
    @record_outcome
    def bad_config():
        raise ValueError("num-server-rounds=0 must be >= 1")

    with pytest.raises(ValueError):
        bad_config()
    assert not list(tmp_path.iterdir())
    assert "before its results directory was created: ValueError: num-server-rounds=0" in (
        server_log[-1].getMessage())
