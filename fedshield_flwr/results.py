"""Results of a run: metrics log (JSON + CSV), loss plot, checkpoints, exported adapter.

Layout of ``<results.dir>/<run-id>/``::

    metrics.json     {"config": {...resolved run config...}, "status": "running" | "completed" |
                     "failed", "error": null | "<what failed, after which round>",
                     "rounds": [{round, train_loss, ...}]}
    metrics.csv      the same rounds as a table
    loss.png         train and eval loss per round; below, ROUGE-L and exact match (eval.generate)
    checkpoints/     round-0003.safetensors (+ latest.json): what the server needs to resume
    adapter/         the final adapter as a standard PEFT directory (when the server holds it)

``<results.dir>/latest`` is a symlink to the newest run. Files are rewritten after every round so a
run killed mid-way leaves consistent results up to its last completed round. ``status`` is
``running`` from creation (and again on resume), ``completed`` once the run has ended and
exported, ``failed`` with ``error`` when the ServerApp raised (:func:`record_outcome`, which the
ServerApp's ``main`` wears); a run killed from outside stays ``running``.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ROUND_FIELDS = (
    "round", "train_loss", "eval_loss", "eval_perplexity", "bytes_up", "bytes_down", "seconds",
)


RUNNING, COMPLETED, FAILED = "running", "completed", "failed"


class ResumeError(RuntimeError):
    pass


# The results the current ServerApp call opened (create / resume), for record_outcome.
_OPENED: ContextVar["RunResults | None"] = ContextVar("fedshield_opened_results", default=None)


def _jsonable(value: Any) -> Any:
    if is_dataclass(value):
        return _jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


class RunResults:
    """The results directory of one run; create with :meth:`create` or :meth:`resume`."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any], rounds: list[dict] | None = None):
        self.dir = run_dir
        self.config = dict(config)
        self.rounds: list[dict] = rounds or []
        self.status = RUNNING
        self.error: str | None = None
        (self.dir / "checkpoints").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ creation / resume
    @classmethod
    def create(cls, root: str | os.PathLike, run_id: str, config: Mapping[str, Any]) -> "RunResults":
        root = Path(root).expanduser().resolve()
        run_dir = root / run_id
        run_dir.mkdir(parents=True, exist_ok=False)
        res = cls(run_dir, config)
        res._point_latest()
        res.write_metrics()
        _OPENED.set(res)
        return res

    @classmethod
    def resume(cls, root: str | os.PathLike, run: str = "latest") -> "RunResults":
        """Reopen an earlier run (``latest`` or a run id / directory) to continue it."""
        root = Path(root).expanduser().resolve()
        run_dir = Path(run) if Path(run).is_absolute() else root / run
        if not run_dir.exists():
            raise ResumeError(
                f"resume=true but there is no run at {run_dir}; start without resume first"
            )
        run_dir = run_dir.resolve()
        meta = json.loads((run_dir / "metrics.json").read_text())
        res = cls(run_dir, meta.get("config", {}), meta.get("rounds", []))
        res._point_latest()
        res.write_metrics()  # running again: an earlier failure no longer describes the run
        _OPENED.set(res)
        return res

    def _point_latest(self) -> None:
        link = self.dir.parent / "latest"
        tmp = self.dir.parent / f".latest.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(self.dir.name)
        os.replace(tmp, link)

    # ------------------------------------------------------------------ metrics
    def add_round(self, record: Mapping[str, Any]) -> None:
        rnd = int(record["round"])
        self.rounds = [r for r in self.rounds if int(r["round"]) != rnd]
        self.rounds.append({k: _jsonable(v) for k, v in record.items()})
        self.rounds.sort(key=lambda r: int(r["round"]))
        self.write_metrics()

    @property
    def last_round(self) -> int | None:
        """The last completed round (0 = the initial evaluation), ``None`` before any."""
        return max((int(r["round"]) for r in self.rounds), default=None)

    def complete(self) -> None:
        """The run ended and exported its results."""
        self.status, self.error = COMPLETED, None
        self.write_metrics()

    def fail(self, exc: BaseException) -> str:
        """Record that the run failed with ``exc``; returns the error as written to metrics.json.

        The error names the round reached (the last one completed) so that a reader of
        metrics.json, or of the log line built from it, knows how far the run got.
        """
        done = self.last_round
        where = "before completing any round" if done is None else f"after round {done}"
        self.status = FAILED
        self.error = f"server: run {self.dir.name} failed {where}: {type(exc).__name__}: {exc}"
        try:
            self.write_metrics()
        except Exception as write_exc:  # never hide the run's own error behind this one
            log.warning("could not record the failure in %s (%s)", self.dir / "metrics.json",
                        write_exc)
        return self.error

    def write_metrics(self) -> None:
        doc = {"config": _jsonable(self.config), "status": self.status, "error": self.error,
               "rounds": self.rounds}
        tmp = self.dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, self.dir / "metrics.json")
        fields = list(ROUND_FIELDS) + sorted(
            {k for r in self.rounds for k in r} - set(ROUND_FIELDS)
        )
        with open(self.dir / "metrics.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            for r in self.rounds:
                writer.writerow({k: r.get(k, "") for k in fields})
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def draw(ax, series: Mapping[str, str]) -> None:
            for label, key in series.items():
                pts = [(r["round"], r[key]) for r in self.rounds if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=label)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend()

        generated = any(r.get("eval_rouge_l") is not None for r in self.rounds)
        if generated:  # a second panel: scores in [0, 1] do not share the loss axis
            fig, (ax, gen_ax) = plt.subplots(2, 1, figsize=(6, 6), sharex=True,
                                             height_ratios=(3, 2))
        else:
            fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax, {
            "train loss": "train_loss", "eval loss (silos)": "eval_loss",
            "server model eval loss": "server_eval_loss", "silo proxy eval loss": "proxy_eval_loss",
        })
        ax.set_ylabel("loss")
        eps = [(r["round"], r["dp_epsilon"]) for r in self.rounds
               if r.get("dp_epsilon") is not None]
        if eps:  # differential privacy: epsilon spent so far, on its own axis
            eps_ax = ax.twinx()
            eps_ax.plot(*zip(*eps), marker="s", linestyle="--", color="tab:red",
                        label="DP epsilon spent")
            eps_ax.set_ylabel("epsilon", color="tab:red")
            eps_ax.legend(loc="upper center")
        if generated:
            draw(gen_ax, {"ROUGE-L (silos)": "eval_rouge_l", "exact match": "eval_exact_match"})
            gen_ax.set_ylabel("score")
            gen_ax.set_ylim(-0.02, 1.02)
            gen_ax.set_xlabel("round")
        else:
            ax.set_xlabel("round")
        fig.tight_layout()
        fig.savefig(self.dir / "loss.png", dpi=100)
        plt.close(fig)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, server_round: int, arrays: Mapping[str, np.ndarray],
                        meta: Mapping[str, Any] | None = None) -> Path:
        from safetensors.numpy import save_file

        path = self.dir / "checkpoints" / f"round-{server_round:04d}.safetensors"
        info = {"round": server_round, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {})}
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path),
                  metadata={"fedshield": json.dumps(_jsonable(info))})
        latest = self.dir / "checkpoints" / "latest.json"
        tmp = latest.with_suffix(".tmp")
        tmp.write_text(json.dumps({"round": server_round, "file": path.name}))
        os.replace(tmp, latest)
        return path

    def load_checkpoint(self) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
        """(round, arrays, meta) of the last checkpoint of this run."""
        from safetensors import safe_open

        latest = self.dir / "checkpoints" / "latest.json"
        if not latest.exists():
            raise ResumeError(f"run {self.dir.name} has no checkpoint to resume from")
        info = json.loads(latest.read_text())
        path = self.dir / "checkpoints" / info["file"]
        with safe_open(str(path), framework="numpy") as fh:
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
            meta = json.loads((fh.metadata() or {}).get("fedshield", "{}"))
        return int(info["round"]), arrays, meta


def record_outcome(main: Callable[..., None]) -> Callable[..., None]:
    """Wrap the ServerApp's ``main`` so that its run's metrics.json says how the run ended.

    ``completed`` when ``main`` returns; ``failed`` with the error and the round reached when it
    raises, logged as the run's last line, then re-raised so that Flower marks the run failed
    (``flwr ls``: ``finished:failed``). The results are the ones ``main`` opened with
    :meth:`RunResults.create` or :meth:`RunResults.resume`; an error before that (a bad run
    config) has no results directory to go to and is only logged.
    """

    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> None:
        token = _OPENED.set(None)
        try:
            main(*args, **kwargs)
        except Exception as exc:
            results = _OPENED.get()
            if results is None:
                log.error("server: run failed before its results directory was created: %s: %s",
                          type(exc).__name__, exc)
            else:
                log.error("%s (recorded in %s)", results.fail(exc), results.dir / "metrics.json")
            raise
        else:
            results = _OPENED.get()
            if results is not None:
                results.complete()
        finally:
            _OPENED.reset(token)

    return run
