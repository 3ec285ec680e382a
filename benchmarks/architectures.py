"""Which privacy mode runs on which model family: a mode x family matrix of real `flwr run` rounds.

Each cell is one real local simulation of this app (our own SuperLink, ``--silos`` silos, one round
by default) on a tiny random model of that family (``model.name='tiny:<family>'``, built in code,
nothing downloaded), run through ``fedshield run`` so that a failed ServerApp exits non-zero. A cell
records ok/fail, the wall seconds of ``flwr run``, the final eval loss from ``metrics.json`` and,
when it fails, the last error line.

    .venv/bin/python benchmarks/architectures.py --quick     # 4 families x 4 modes
    .venv/bin/python benchmarks/architectures.py             # every tiny family x 4 modes
    .venv/bin/python benchmarks/architectures.py --families gemma,opt --modes split,lpp
    .venv/bin/python benchmarks/architectures.py --render    # the tables of the stored JSON

Prints a table and writes benchmarks/results/architectures.json (rewritten after every cell, so
a killed run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedshield_flwr.models.tiny import TINY_ARCHITECTURES  # noqa: E402
from tests.harness.localsim import LocalSimulationSuperLink  # noqa: E402

MODES = ("fedavg", "shield", "lpp", "split")
QUICK_FAMILIES = ("llama", "gemma", "gpt_neox", "phi3")


def error_line(proc) -> str:
    """The last line that names what failed (``fedshield run`` writes the error last)."""
    lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "failed" in ln or "Error" in ln:
            return ln[-400:]
    return (lines[-1] if lines else f"exit status {proc.returncode}")[-400:]


def run_cell(link: LocalSimulationSuperLink, mode: str, family: str, args, out_dir: Path) -> dict:
    results = out_dir / f"{mode}-{family}"
    cfg = (f"model.name='tiny:{family}' strategy.name='{mode}' num-server-rounds={args.rounds} "
           f"train.max-steps={args.steps} train.batch-size={args.batch_size} "
           f"train.progress=false data.max-eval-examples={args.eval_examples} "
           f"data.max-length=64 results.dir='{results}'")
    t0 = time.time()
    row = {"mode": mode, "family": family, "status": "fail", "seconds": None,
           "final_eval_loss": None, "error": None}
    try:
        proc = link.flwr_run(cfg, num_supernodes=args.silos, timeout=args.timeout, checked=True)
    except Exception as exc:  # a timeout: the cell fails, the matrix goes on
        row.update(seconds=round(time.time() - t0, 1), error=f"{type(exc).__name__}: {exc}"[-400:])
        return row
    row["seconds"] = round(time.time() - t0, 1)
    metrics = results / "latest" / "metrics.json"
    doc = json.loads(metrics.read_text()) if metrics.exists() else {}
    rounds = doc.get("rounds") or []
    if rounds:
        row["final_eval_loss"] = rounds[-1].get("eval_loss")
    done = [r for r in rounds if r.get("round", 0) >= 1]
    if proc.returncode == 0 and doc.get("status") == "completed" and len(done) == args.rounds:
        row["status"] = "ok"
    else:
        row["error"] = doc.get("error") or error_line(proc)
    return row


def table(rows: list[dict]) -> str:
    out = ["| mode | family | status | seconds | final eval loss | error |", "|---|---|---|---|---|---|"]
    for r in rows:
        loss = f"{r['final_eval_loss']:.4f}" if r["final_eval_loss"] is not None else ""
        err = (r["error"] or "").replace("|", "/")
        out.append(f"| {r['mode']} | {r['family']} | {r['status']} | {r['seconds']} | {loss} | "
                   f"{err} |")
    return "\n".join(out)


def matrix(rows: list[dict]) -> str:
    """Families down, modes across: ``ok 21 s, 6.2727`` or ``fail`` (errors listed below)."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    cells = {(r["family"], r["mode"]): r for r in rows}
    out = ["| family | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    errors = []
    for family in dict.fromkeys(r["family"] for r in rows):
        line = []
        for mode in modes:
            r = cells.get((family, mode))
            if r is None:
                line.append("")
            elif r["status"] == "ok":
                line.append(f"ok {r['seconds']:.0f} s, {r['final_eval_loss']:.4f}")
            else:
                line.append("**fail**")
                errors.append(f"- {mode} / {family}: `{r['error']}`")
        out.append(f"| {family} | " + " | ".join(line) + " |")
    return "\n".join(out + ([""] + errors if errors else []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"only the families {','.join(QUICK_FAMILIES)} (16 runs)")
    p.add_argument("--families", default=None, help="comma-separated tiny families (default: all)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--silos", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-examples", type=int, default=8)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "architectures.json"))
    p.add_argument("--render", action="store_true",
                   help="print the tables of the JSON at --out, run nothing")
    args = p.parse_args()
    if args.render:
        rows = json.loads(Path(args.out).read_text())["rows"]
        print(table(rows) + "\n\n" + matrix(rows))
        return
    families = (args.families.split(",") if args.families
                else list(QUICK_FAMILIES if args.quick else TINY_ARCHITECTURES))
    unknown = sorted(set(families) - set(TINY_ARCHITECTURES))
    if unknown:
        raise SystemExit(f"unknown tiny families {unknown}; known: {', '.join(TINY_ARCHITECTURES)}")
    modes = args.modes.split(",")

    rows: list[dict] = []
    doc = {"machine": {"platform": platform.platform(), "python": platform.python_version()},
           "settings": {k: getattr(args, k) for k in ("silos", "rounds", "steps", "batch_size",
                                                      "eval_examples")},
           "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="architectures-") as tmp:
        link = LocalSimulationSuperLink(Path(tmp) / "flwr-home").start()
        try:
            for family in families:
                for mode in modes:
                    row = run_cell(link, mode, family, args, Path(tmp))
                    rows.append(row)
                    print(f"  {mode:6s} {family:12s} {row['status']:4s} {row['seconds']} s "
                          f"loss={row['final_eval_loss']} {row['error'] or ''}", flush=True)
                    out.write_text(json.dumps(doc, indent=2) + "\n")
        finally:
            link.stop()
    print(table(rows) + "\n\n" + matrix(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
