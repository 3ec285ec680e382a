"""Experiment tracking: what the trackers write, read back with TensorBoard's and MLflow's readers."""

import logging
import subprocess
import sys

import numpy as np
import pytest

from fedshield_flwr.config import ConfigError, RunConfig, TrackingSettings, default_flat_config
from fedshield_flwr.results import RunResults
from fedshield_flwr.tracking import NoTracker, TrackingError, numeric_metrics, open_tracker

PARAMS = {"strategy.name": "fedavg", "train.max-steps": 8, "train.learning-rate-max": 5e-4,
          "train.progress": True, "model.lora.target-modules": ""}


def _rows(n: int = 3, shift: float = 0.0) -> list[dict]:
    """Rows shaped like ``RoundRecord.as_row()``: round 0 has no train loss."""
    return [{"round": r, "train_loss": None if r == 0 else 2.0 - 0.25 * r + shift,
             "eval_loss": 2.5 - 0.5 * r + shift, "eval_perplexity": float(np.exp(2.5 - 0.5 * r)),
             "bytes_up": 1000 * r, "seconds": np.float64(0.5 * r), "mode": "fedavg",
             "silo_time_s": {"0": 1.0 + r, "1": 2.0 + r}, "ip_margin": float("nan")}
            for r in range(n)]


def _run(settings: TrackingSettings, tmp_path, rows: list[dict]) -> RunResults:
    """Track a run as the ServerApp does; return its results (loss.png, adapter/)."""
    results = RunResults.create(tmp_path / "results", "run-1", PARAMS)
    tracker = open_tracker(settings, results.dir, results.dir.name)
    tracker.log_params(results.config)
    for row in rows:
        results.add_round(row)
        tracker.log_round(row["round"], row)
    adapter = results.dir / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    tracker.log_artifact(results.dir / "loss.png")
    tracker.log_artifact(adapter)
    tracker.close("FINISHED")
    return results


def test_numeric_metrics_flatten_nested_keys_and_skip_none_text_and_nan():
    row = _rows(2)[1] | {"flushed": True, "per_silo": [0.5, None]}
    assert numeric_metrics(row) == {
        "train_loss": 1.75, "eval_loss": 2.0, "eval_perplexity": pytest.approx(np.exp(2.0)),
        "bytes_up": 1000.0, "seconds": 0.5, "silo_time_s/0": 2.0, "silo_time_s/1": 3.0,
        "flushed": 1.0, "per_silo/0": 0.5}


def _assert_series(got: list[tuple[int, float]], want: list[tuple[int, float]], key: str):
    assert [step for step, _ in got] == [step for step, _ in want], key
    assert [value for _, value in got] == pytest.approx([value for _, value in want]), key


def _accumulator(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    return acc


def test_tensorboard_event_file_holds_each_round_metric_the_config_and_loss_png(tmp_path):
    from tensorboard.plugins.hparams import metadata

    rows = _rows(3)
    results = _run(TrackingSettings(backend="tensorboard"), tmp_path, rows)

    acc = _accumulator(results.dir / "tensorboard")
    scalars = set(acc.Tags()["scalars"])
    assert {"train_loss", "eval_loss", "bytes_up", "silo_time_s/1"} <= scalars
    assert not scalars & {"round", "mode", "ip_margin"}
    for key in ("eval_loss", "eval_perplexity", "bytes_up", "seconds", "silo_time_s/0"):
        want = [(r["round"], numeric_metrics(r)[key]) for r in rows]
        _assert_series([(e.step, e.value) for e in acc.Scalars(key)], want, key)
    assert [e.step for e in acc.Scalars("train_loss")] == [1, 2]  # round 0 has none

    [image] = acc.Images("loss")
    assert image.encoded_image_string == (results.dir / "loss.png").read_bytes()
    assert image.step == 2
    [text] = acc.Tensors("artifacts/adapter/text_summary")  # no artifact store: its path
    assert text.tensor_proto.string_val == [str(results.dir / "adapter").encode()]

    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["train.max-steps"].number_value == 8
    assert start.hparams["strategy.name"].string_value == "fedavg"
    assert start.hparams["train.progress"].bool_value is True
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == 1  # STATUS_SUCCESS


def test_tensorboard_uri_is_a_log_root_and_a_resumed_run_shows_each_round_once(tmp_path):
    settings = TrackingSettings(backend="tensorboard", uri=str(tmp_path / "tb"))
    first = open_tracker(settings, tmp_path / "unused", "run-1")
    for row in _rows(4):
        first.log_round(row["round"], row)
    first.close("FAILED")  # killed after round 3, resumed from the checkpoint of round 1
    again = open_tracker(settings, tmp_path / "unused", "run-1", resume_round=1)
    for row in _rows(4, shift=10.0)[2:]:
        again.log_round(row["round"], row)
    again.close()

    assert not (tmp_path / "unused").exists()
    events = _accumulator(tmp_path / "tb" / "run-1").Scalars("eval_loss")
    _assert_series([(e.step, e.value) for e in events],
                   [(0, 2.5), (1, 2.0), (2, 11.5), (3, 11.0)], "eval_loss")


@pytest.fixture
def file_store_env(monkeypatch):
    """Leave ``MLFLOW_ALLOW_FILE_STORE`` unset during the test and as it was after it."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")


def _mlflow_run(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fedshield")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == name
    return client, run


def test_mlflow_file_store_under_the_run_holds_params_metrics_and_artifacts(tmp_path,
                                                                           file_store_env):
    rows = _rows(3)
    results = _run(TrackingSettings(backend="mlflow"), tmp_path, rows)

    client, run = _mlflow_run((results.dir / "mlruns").as_uri(), "run-1")
    assert run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in PARAMS.items() if v is not None}
    for key in ("train_loss", "eval_loss", "bytes_up", "seconds", "silo_time_s/1"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                              key))
        want = [(r["round"], numeric_metrics(r)[key]) for r in rows if key in numeric_metrics(r)]
        _assert_series(history, want, key)
    assert not {"mode", "ip_margin", "round"} & set(run.data.metrics)

    artifacts = {a.path: a for a in client.list_artifacts(run.info.run_id)}
    assert not artifacts["adapter"].file_size and artifacts["loss.png"].file_size == (
        results.dir / "loss.png").stat().st_size
    assert {a.path for a in client.list_artifacts(run.info.run_id, "adapter")} == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}


def test_mlflow_uri_and_experiment_are_honoured_and_resume_reopens_the_same_run(tmp_path,
                                                                               file_store_env):
    uri = (tmp_path / "store").as_uri()
    settings = TrackingSettings(backend="mlflow", uri=uri, experiment="fedshield")
    first = open_tracker(settings, tmp_path / "unused", "run-7")
    first.log_params(PARAMS)
    for row in _rows(2):
        first.log_round(row["round"], row)
    first.close("FAILED")
    client, run = _mlflow_run(uri, "run-7")
    assert run.info.status == "FAILED"

    again = open_tracker(settings, tmp_path / "unused", "run-7", resume_round=1)
    row = _rows(3)[2]
    again.log_round(2, row)
    again.close("FINISHED")
    client, resumed = _mlflow_run(uri, "run-7")  # still one run in the experiment
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [0, 1, 2]
    assert not (tmp_path / "unused").exists()


def test_backend_none_imports_neither_tensorboard_nor_mlflow(tmp_path):
    code = (
        "import sys\n"
        "import server_app.app\n"
        "from fedshield_flwr.config import RunConfig, default_flat_config\n"
        "from fedshield_flwr.tracking import NoTracker, open_tracker\n"
        "cfg = RunConfig.from_flat(default_flat_config())\n"
        f"t = open_tracker(cfg.tracking, {str(tmp_path)!r}, 'run-1')\n"
        "assert isinstance(t, NoTracker)\n"
        "t.log_params({'a': 1}); t.log_round(1, {'round': 1, 'eval_loss': 1.0})\n"
        f"t.log_artifact({str(tmp_path)!r}); t.close('FINISHED')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorboard', 'mlflow'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend,modules,package", [
    ("tensorboard", ["tensorboard"], "tensorboard"),
    ("mlflow", ["mlflow", "mlflow.tracking", "mlflow.entities"], "mlflow-skinny"),
])
def test_a_missing_library_names_the_pip_package_and_the_extra(tmp_path, monkeypatch, backend,
                                                               modules, package):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(TrackingError, match=rf"needs the '{package}' package") as info:
        open_tracker(TrackingSettings(backend=backend), tmp_path, "run-1")
    assert "pip install 'fedshield-flwr[tracking]'" in str(info.value)


def test_an_open_tracker_that_fails_warns_and_the_run_goes_on(tmp_path, caplog, file_store_env):
    tracker = open_tracker(TrackingSettings(backend="mlflow"), tmp_path, "run-1")
    tracker.inner.run_id = "no-such-run"  # the store lost the run: every call fails
    logger = logging.getLogger("fedshield.server")  # configure_logging stops propagation
    logger.addHandler(caplog.handler)
    try:
        tracker.log_round(4, {"round": 4, "eval_loss": 1.0})
        tracker.close("FINISHED")
    finally:
        logger.removeHandler(caplog.handler)
    assert "could not record round 4" in caplog.text
    assert "could not record the end of the run (FINISHED)" in caplog.text


class _FakeMode:
    """A server mode whose strategy reports rounds without a federation (ServerApp wiring)."""

    server_evaluate = None

    def __init__(self, run_dir, fail: bool):
        self.run_dir, self.fail = run_dir, fail
        self.strategy = self

    def initial_arrays(self):
        from flwr.app import ArrayRecord

        return ArrayRecord()

    restore = checkpoint = lambda self, _: {}
    train_config = evaluate_config = lambda self: None

    def run(self, grid, arrays, num_rounds, start_round, on_round_end, **_):
        from strategies.base import RoundRecord

        for rnd in range(0 if start_round == 1 else start_round, num_rounds + 1):
            if self.fail and rnd == 2:
                raise RuntimeError("silo 1 vanished in round 2")
            on_round_end(RoundRecord(round=rnd, eval_loss=3.0 - rnd, bytes_up=100 * rnd), arrays)
        return arrays

    def export(self, final, run_dir):
        (run_dir / "adapter").mkdir()
        (run_dir / "adapter" / "adapter_config.json").write_text("{}")
        return run_dir / "adapter"


def test_server_app_tracks_params_once_every_round_the_artifacts_and_the_status(
        tmp_path, monkeypatch, file_store_env):
    from types import SimpleNamespace

    import server_app.app as server

    fail = {"now": True}
    monkeypatch.setattr(server, "build_mode", lambda cfg, run_dir: _FakeMode(run_dir, fail["now"]))
    flat = default_flat_config() | {"results.dir": str(tmp_path), "tracking.backend": "mlflow",
                                    "num-server-rounds": 3}
    with pytest.raises(RuntimeError, match="round 2"):
        server.main(None, SimpleNamespace(run_config=flat, run_id=7))
    uri = (tmp_path / "latest").resolve().joinpath("mlruns").as_uri()
    client, run = _mlflow_run(uri, (tmp_path / "latest").resolve().name)
    assert run.info.status == "FAILED" and run.data.params["resume"] == "False"
    assert run.data.params["tracking.backend"] == "mlflow" and len(run.data.params) == len(flat)

    fail["now"] = False  # resume after round 1 (its checkpoint): rounds 2 and 3, then export
    server.main(None, SimpleNamespace(run_config=flat | {"resume": True}, run_id=8))
    client, run = _mlflow_run(uri, run.info.run_name)
    assert run.info.status == "FINISHED" and run.data.params["resume"] == "False"
    history = client.get_metric_history(run.info.run_id, "eval_loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 3.0), (1, 2.0), (2, 1.0), (3, 0.0)]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"loss.png", "adapter"}


def test_tracking_config_defaults_and_a_bad_backend_is_named():
    cfg = RunConfig.from_flat(default_flat_config())
    assert cfg.tracking == TrackingSettings(backend="none", uri="", experiment="fedshield")
    assert isinstance(open_tracker(cfg.tracking, ".", "run-1"), NoTracker)
    with pytest.raises(ConfigError, match="tracking.backend.*wandb.*none, tensorboard or mlflow"):
        RunConfig.from_flat(default_flat_config() | {"tracking.backend": "wandb"})
    with pytest.raises(ConfigError, match="did you mean 'tracking.backend'"):
        RunConfig.from_flat(default_flat_config() | {"tracking.backnd": "mlflow"})
