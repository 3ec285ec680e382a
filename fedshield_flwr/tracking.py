"""Experiment tracking: round metrics, the run config and the results, to TensorBoard or MLflow.

``tracking.backend`` picks a :class:`Tracker` (:func:`open_tracker`); ``results/`` stays the
record of a run either way, a tracker mirrors it:

========================  ===================================  ======================================
                          ``tensorboard``                       ``mlflow``
========================  ===================================  ======================================
where                     ``<run dir>/tensorboard``, or          the file store ``<run dir>/mlruns``,
                          ``<tracking.uri>/<run id>``            or the tracking URI ``tracking.uri``
the run config            hparams (the HPARAMS tab)              parameters
each round's row          scalars, step = round                  metrics, step = round
``loss.png``              an image                               an artifact
the exported adapter      its path, as text                      an artifact (the PEFT directory)
========================  ===================================  ======================================

A backend's library is imported by its tracker only: a run with ``tracking.backend = "none"``
imports neither (``pip install 'fedshield-flwr[tracking]'`` installs both).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fedshield_flwr.config import TrackingSettings

EXTRA = "fedshield-flwr[tracking]"
log = logging.getLogger("fedshield.server")


class TrackingError(RuntimeError):
    """A tracking backend cannot be used (library missing, store unusable)."""


def _require(module: str, package: str, backend: str):
    """Import ``module`` or fail naming the pip package and the extra that provide it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TrackingError(
            f"tracking.backend = '{backend}' needs the '{package}' package, which is not "
            f"installed here ({exc}); pip install '{EXTRA}' (or pip install {package}), or set "
            "tracking.backend = 'none'"
        ) from exc


def _flatten(values: Mapping[str, Any], sep: str, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from _flatten(value, sep, name)
        elif isinstance(value, list | tuple):
            yield from _flatten({str(i): v for i, v in enumerate(value)}, sep, name)
        else:
            yield name, value


def numeric_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a ``metrics.json`` row, nested keys joined with ``/``.

    ``round`` (the step) is left out, and so are ``None``, strings and non-finite numbers
    (``metrics.json`` stores those as ``null``). Booleans count as 0 / 1.
    """
    out: dict[str, float] = {}
    for key, value in _flatten({k: v for k, v in row.items() if k != "round"}, "/"):
        if hasattr(value, "item") and callable(value.item):  # numpy and torch scalars
            try:
                value = value.item()
            except (TypeError, ValueError):
                continue
        if isinstance(value, bool | int | float) and math.isfinite(value):
            out[key] = float(value)
    return out


def flat_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The run config as flat dotted keys (Flower's run config already is)."""
    return {k: v for k, v in _flatten(params, ".") if v is not None}


class Tracker:
    """What the ServerApp tells a tracking backend; this base class records nothing."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record the resolved run config once, at the start of a fresh run."""

    def log_round(self, server_round: int, row: Mapping[str, Any]) -> None:
        """Record the numeric values of one round's ``metrics.json`` row at step ``server_round``."""

    def log_artifact(self, path: str | os.PathLike) -> None:
        """Record a file or a directory that the run produced."""

    def close(self, status: str = "FINISHED") -> None:
        """End the run: ``FINISHED`` or ``FAILED``."""


class NoTracker(Tracker):
    """``tracking.backend = "none"``: ``results/`` is the only record."""


class TolerantTracker(Tracker):
    """A tracker whose failures, once it is open, are warnings.

    A tracking server that goes away must not stop a federation: ``results/`` holds every round
    whatever the tracker does. Opening the tracker (library, store, experiment) still fails the
    run at the start, before any round, where a wrong ``tracking.*`` value should.
    """

    def __init__(self, inner: Tracker, backend: str):
        self.inner, self.backend = inner, backend

    def _call(self, what: str, method, *args) -> None:
        try:
            method(*args)
        except Exception as exc:
            log.warning("tracking.backend '%s' could not record %s (%s: %s); the run goes on and "
                        "results/ has it", self.backend, what, type(exc).__name__, exc)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._call("the run config", self.inner.log_params, params)

    def log_round(self, server_round: int, row: Mapping[str, Any]) -> None:
        self._call(f"round {server_round}", self.inner.log_round, server_round, row)

    def log_artifact(self, path: str | os.PathLike) -> None:
        self._call(f"artifact {path}", self.inner.log_artifact, path)

    def close(self, status: str = "FINISHED") -> None:
        self._call(f"the end of the run ({status})", self.inner.close, status)


class TensorBoardTracker(Tracker):
    """Event files for TensorBoard, through ``torch.utils.tensorboard.SummaryWriter``.

    Parameters
    ----------
    log_dir
        Directory of this run's event files.
    purge_step
        When resuming: the first round run again. TensorBoard then drops the events an earlier
        process wrote for that round and later ones, so a resumed run shows each round once.
    """

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None):
        _require("tensorboard", "tensorboard", "tensorboard")
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import metadata, plugin_data_pb2
        from torch.utils.tensorboard import SummaryWriter

        self._summary, self._hparams, self._plugin_data = Summary, metadata, plugin_data_pb2
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
        self.step = 0  # the last round logged: artifacts are shown at it

    def log_params(self, params: Mapping[str, Any]) -> None:
        # A session-start record, as the hparams plugin reads it; without an experiment record
        # TensorBoard lists these hparams beside every scalar of the run.
        start = self._plugin_data.SessionStartInfo(start_time_secs=time.time())
        for key, value in flat_params(params).items():
            if isinstance(value, bool):
                start.hparams[key].bool_value = value
            elif isinstance(value, int | float):
                start.hparams[key].number_value = value
            else:
                start.hparams[key].string_value = str(value)
        self._write_hparams(self._hparams.SESSION_START_INFO_TAG,
                            self._plugin_data.HParamsPluginData(session_start_info=start))

    def log_round(self, server_round: int, row: Mapping[str, Any]) -> None:
        for key, value in numeric_metrics(row).items():
            self.writer.add_scalar(key, value, global_step=server_round)
        self.step = server_round
        self.writer.flush()  # a run killed later still has this round on disk

    def log_artifact(self, path: str | os.PathLike) -> None:
        # TensorBoard has no artifact store: a PNG becomes an image (its bytes unchanged),
        # anything else is noted by its path; the files stay in the run's results.
        path = Path(path)
        if path.suffix.lower() == ".png" and path.is_file():
            data = path.read_bytes()
            width, height = struct.unpack(">II", data[16:24])  # the PNG's IHDR chunk
            image = self._summary.Image(height=height, width=width, colorspace=4,
                                        encoded_image_string=data)
            self.writer.file_writer.add_summary(
                self._summary(value=[self._summary.Value(tag=path.stem, image=image)]),
                self.step)
        else:
            self.writer.add_text(f"artifacts/{path.name}", str(path.resolve()), self.step)
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        done = self._plugin_data.SessionEndInfo(
            status="STATUS_SUCCESS" if status == "FINISHED" else "STATUS_FAILURE",
            end_time_secs=time.time())
        self._write_hparams(self._hparams.SESSION_END_INFO_TAG,
                            self._plugin_data.HParamsPluginData(session_end_info=done))
        self.writer.close()

    def _write_hparams(self, tag: str, data: Any) -> None:
        value = self._summary.Value(tag=tag, metadata=self._hparams.create_summary_metadata(data),
                                    tensor=self._hparams.NULL_TENSOR)
        self.writer.file_writer.add_summary(self._summary(value=[value]), self.step)
        self.writer.flush()


class MlflowTracker(Tracker):
    """One MLflow run, through ``mlflow.tracking.MlflowClient`` (no global active run).

    Parameters
    ----------
    uri
        The tracking URI: ``file:...`` (a local file store), ``sqlite:///...``, ``http(s)://...``.
    experiment
        The experiment's name; created when missing.
    run_name
        The MLflow run's name: the results run id.
    resume
        Reopen the run of this name if the experiment has one (a resumed FedShield run keeps
        one MLflow run), else start one.
    """

    def __init__(self, uri: str, experiment: str, run_name: str, resume: bool = False):
        if urlparse(uri).scheme in ("", "file"):
            # MLflow 3 refuses its file store (in maintenance mode) unless told to allow it;
            # a run's own store under its results is what a file store is for.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        tracking = _require("mlflow.tracking", "mlflow-skinny", "mlflow")
        entities = _require("mlflow.entities", "mlflow-skinny", "mlflow")
        self._metric, self._param = entities.Metric, entities.Param
        try:
            self.client = tracking.MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (found.experiment_id if found is not None
                             else self.client.create_experiment(experiment))
            runs = self.client.search_runs(
                [experiment_id], filter_string=f"attributes.run_name = '{_quote(run_name)}'",
                max_results=1) if resume else []
            if runs:
                self.run_id = runs[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        except Exception as exc:
            raise TrackingError(f"tracking.backend = 'mlflow': cannot open run '{run_name}' of "
                                f"experiment '{experiment}' at tracking.uri '{uri}': {exc}") from exc

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [self._param(k, str(v)) for k, v in flat_params(params).items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_round(self, server_round: int, row: Mapping[str, Any]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(k, v, now, server_round) for k, v in numeric_metrics(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifact(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
        else:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def open_tracker(settings: TrackingSettings, run_dir: str | os.PathLike, run_name: str,
                 resume_round: int | None = None) -> Tracker:
    """The tracker of ``tracking.backend`` for the run in ``run_dir`` named ``run_name``.

    ``resume_round`` is the last round a resumed run had completed (``None`` for a fresh run):
    TensorBoard then purges what came after it and MLflow reopens the run of the same name.
    Opening fails with :class:`TrackingError`; afterwards failures are warnings
    (:class:`TolerantTracker`).
    """
    run_dir = Path(run_dir)
    if settings.backend == "tensorboard":
        root = Path(settings.uri).expanduser() / run_name if settings.uri else run_dir / "tensorboard"
        tracker: Tracker = TensorBoardTracker(
            root, None if resume_round is None else resume_round + 1)
        log.info("tracking: TensorBoard event files in %s", root)
    elif settings.backend == "mlflow":
        uri = settings.uri or (run_dir / "mlruns").resolve().as_uri()
        tracker = MlflowTracker(uri, settings.experiment, run_name, resume=resume_round is not None)
        log.info("tracking: MLflow run '%s' of experiment '%s' at %s", run_name,
                 settings.experiment, uri)
    else:
        return NoTracker()
    return TolerantTracker(tracker, settings.backend)
