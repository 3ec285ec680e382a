"""``fedshield`` command line: run summaries, provisioning (keys, certs, nodes), export.

Each sub-command is a thin wrapper over a library function; ``fedshield <cmd> --help`` says more.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, setup: Callable[[argparse.ArgumentParser], None]):
    def register(fn):
        COMMANDS[name] = (setup, fn)
        return fn
    return register


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _summary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", default="results/latest",
                   help="a run directory (default: results/latest)")


@command("summary", _summary_args)
def summary(args: argparse.Namespace) -> int:
    """Print the per-round table of a run's metrics.json."""
    run_dir = Path(args.run_dir)
    path = run_dir / "metrics.json"
    if not path.exists():
        print(f"no metrics.json in {run_dir}", file=sys.stderr)
        return 1
    doc = json.loads(path.read_text())
    rounds = doc.get("rounds", [])
    print(f"\nrun {run_dir.resolve().name}: {doc['config'].get('strategy.name')} on "
          f"{doc['config'].get('model.name')}")
    print(f"{'round':>5} {'train_loss':>10} {'eval_loss':>10} {'ppl':>9} {'up MB':>8} "
          f"{'down MB':>8} {'sec':>7}")
    for r in rounds:
        print(f"{r['round']:>5} {_fmt(r.get('train_loss'), '10.4f')} "
              f"{_fmt(r.get('eval_loss'), '10.4f')} {_fmt(r.get('eval_perplexity'), '9.2f')} "
              f"{r.get('bytes_up', 0) / 1e6:8.2f} {r.get('bytes_down', 0) / 1e6:8.2f} "
              f"{r.get('seconds', 0):7.1f}")
    evals = [r for r in rounds if r.get("eval_loss") is not None]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        change = (last["eval_loss"] - first["eval_loss"]) / first["eval_loss"] * 100
        print(f"eval loss round {first['round']} -> {last['round']}: {first['eval_loss']:.4f} -> "
              f"{last['eval_loss']:.4f} ({change:+.1f}%)")
    adapter = run_dir / "adapter"
    if adapter.exists():
        print(f"adapter (PEFT format): {adapter.resolve()}")
    print(f"metrics: {path.resolve()}  plot: {(run_dir / 'loss.png').resolve()}")
    return 0


def _keys_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["init"], help="init: create a new shield keyset")
    p.add_argument("--out", required=True, help="directory for shield-silo.key / shield-server.key")
    p.add_argument("--force", action="store_true", help="replace existing key files")


@command("keys", _keys_args)
def keys(args: argparse.Namespace) -> int:
    """Create the CKKS keyset of the shield mode (silo file with secret, server file without)."""
    from .crypto import write_keyset_files
    from .crypto.keys import ServerKeyset

    try:
        silo_path, server_path = write_keyset_files(args.out, overwrite=args.force)
    except FileExistsError as exc:
        print(f"fedshield keys: {exc} (nothing was changed; use --force to replace)",
              file=sys.stderr)
        return 1
    key_id = ServerKeyset.load(server_path).key_id
    print(f"key id {key_id}\n  {silo_path}   -> copy to every silo (secret; mode 0600), then "
          f"--node-config \"shield-key=<path>\"\n  {server_path} -> the coordinator only: "
          f"--run-config \"shield.server-key='<path>' shield.auto-keys=false\"")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedshield", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, (setup, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0])
        setup(p)
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
