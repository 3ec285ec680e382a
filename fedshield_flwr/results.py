"""Results of a run: metrics log (JSON + CSV), loss plot, checkpoints, exported adapter.

Layout of ``<results.dir>/<run-id>/``::

    metrics.json     {"config": {...resolved run config...}, "rounds": [{round, train_loss, ...}]}
    metrics.csv      the same rounds as a table
    loss.png         train and eval loss per round
    checkpoints/     round-0003.safetensors (+ latest.json): what the server needs to resume
    adapter/         the final adapter as a standard PEFT directory (when the server holds it)

``<results.dir>/latest`` is a symlink to the newest run. Files are rewritten after every round so a
run killed mid-way leaves consistent results up to its last completed round.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ROUND_FIELDS = (
    "round", "train_loss", "eval_loss", "eval_perplexity", "bytes_up", "bytes_down", "seconds",
)


class ResumeError(RuntimeError):
    pass


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

    def write_metrics(self) -> None:
        doc = {"config": _jsonable(self.config), "rounds": self.rounds}
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

        fig, ax = plt.subplots(figsize=(6, 4))
        series = {
            "train loss": "train_loss", "eval loss (silos)": "eval_loss",
            "server model eval loss": "server_eval_loss", "silo proxy eval loss": "proxy_eval_loss",
        }
        for label, key in series.items():
            pts = [(r["round"], r[key]) for r in self.rounds if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
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
