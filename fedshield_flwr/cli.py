"""``fedshield`` command line: runs, run summaries, provisioning (keys, certs, nodes), export.

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
    generated = any(r.get("eval_rouge_l") is not None for r in rounds)  # eval.generate
    dp = any(r.get("dp_epsilon") is not None for r in rounds)  # dp.level: epsilon spent
    print(f"{'round':>5} {'train_loss':>10} {'eval_loss':>10} {'ppl':>9} "
          + (f"{'exact':>6} {'rougeL':>6} " if generated else "")
          + (f"{'eps':>7} " if dp else "")
          + f"{'up MB':>8} {'down MB':>8} {'sec':>7}")
    for r in rounds:
        gen = (f"{_fmt(r.get('eval_exact_match'), '6.3f')} {_fmt(r.get('eval_rouge_l'), '6.3f')} "
               if generated else "")
        print(f"{r['round']:>5} {_fmt(r.get('train_loss'), '10.4f')} "
              f"{_fmt(r.get('eval_loss'), '10.4f')} {_fmt(r.get('eval_perplexity'), '9.2f')} "
              f"{gen}{(_fmt(r.get('dp_epsilon'), '7.3f') + ' ') if dp else ''}"
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
    status = doc.get("status", "unknown (written before runs recorded their status)")
    print(f"status: {status}")
    if doc.get("error"):
        print(f"error: {doc['error']}")  # last, where a reader looks first
    return 1 if status == "failed" else 0


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("flwr_args", nargs=argparse.REMAINDER, metavar="APP [SUPERLINK] [OPTIONS]",
                   help="what `flwr run` takes, e.g. . local --run-config \"num-server-rounds=5\"")


@command("run", _run_args)
def run(args: argparse.Namespace) -> int:
    """`flwr run --stream` that exits non-zero, with the error last, when the run failed."""
    from fedshield_flwr.outcome import run_and_check

    return run_and_check(args.flwr_args or ["."])


def _keys_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["init"], help="init: create a new shield keyset")
    p.add_argument("--out", required=True, help="directory for shield-silo.key / shield-server.key")
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p.add_argument("--silos", type=int, default=0, help="silos a round samples: sizes the keyset "
                   "(max_silos = next power of two, at least 64, at most 1024; default 64)")


@command("keys", _keys_args)
def keys(args: argparse.Namespace) -> int:
    """Create the CKKS keyset of the shield mode (silo file with secret, server file without)."""
    from fedshield_flwr.shield import write_keyset_files
    from fedshield_flwr.shield.errors import KeysetError
    from fedshield_flwr.shield.keys import ServerKeyset
    from fedshield_flwr.shield.params import params_for_silos

    try:
        params = params_for_silos(args.silos) if args.silos else None
        silo_path, server_path = write_keyset_files(args.out, params, overwrite=args.force)
    except KeysetError as exc:
        print(f"fedshield keys: {exc}", file=sys.stderr)
        return 1
    except FileExistsError as exc:
        print(f"fedshield keys: {exc} (nothing was changed; use --force to replace)",
              file=sys.stderr)
        return 1
    key_id = ServerKeyset.load(server_path).key_id
    print(f"key id {key_id}\n  {silo_path}   -> copy to every silo (secret; mode 0600), then "
          f"--node-config \"shield-key=<path>\"\n  {server_path} -> the coordinator only: "
          f"--run-config \"shield.server-key='<path>' shield.auto-keys=false\"")
    return 0


def _certs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory for ca.crt, ca.key, server.pem, "
                   "server.key")
    p.add_argument("--san", default="", help="comma-separated host names / IPs under which sites "
                   "reach the SuperLink (localhost,127.0.0.1 are always included)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.add_argument("--force", action="store_true", help="replace existing files")


@command("certs", _certs_args)
def certs(args: argparse.Namespace) -> int:
    """Create a CA and the SuperLink's TLS certificate (for --ssl-* and root-certificates)."""
    from fedshield_flwr.provision import ProvisionError, create_certificates

    try:
        c = create_certificates(args.out, sans=args.san, days=args.days, force=args.force)
    except ProvisionError as exc:
        print(f"fedshield certs: {exc}", file=sys.stderr)
        return 1
    print(f"SANs: {', '.join(c.sans)} (valid {args.days} days)\n"
          f"  {c.ca_cert}      -> every site (--root-certificates) and every flwr user "
          f"(root-certificates in config.toml)\n"
          f"  {c.server_cert}, {c.server_key} -> the coordinator only\n"
          f"  {c.ca_key}      -> keep offline (only to issue a new server certificate)\n"
          f"SuperLink: flower-superlink {' '.join(c.superlink_args())} --enable-supernode-auth")
    return 0


def _nodes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["add"],
                   help="add: one key pair named --name (default: --count pairs site-1..N)")
    p.add_argument("--out", required=True, help="directory for the key files")
    p.add_argument("--count", type=int, default=None, help="number of key pairs (site-1..N)")
    p.add_argument("--prefix", default="site", help="name prefix with --count (default: site)")
    p.add_argument("--name", default=None, help="with `add`: the site's name, e.g. site-4")
    p.add_argument("--superlink", default="COORDINATOR:8000", help="SuperLink address printed "
                   "in the instructions")
    p.add_argument("--connection", default="fedshield", help="flwr connection name printed in "
                   "the instructions")
    p.add_argument("--force", action="store_true", help="replace existing key files")


@command("nodes", _nodes_args)
def nodes(args: argparse.Namespace) -> int:
    """Create SuperNode key pairs (OpenSSH ECDSA P-384) and print how to register them."""
    from fedshield_flwr.provision import (
        ProvisionError,
        create_node_key,
        create_node_keys,
        registration_instructions,
    )

    try:
        if args.action == "add":
            if not args.name or args.count is not None:
                print("fedshield nodes add: give --name (and no --count)", file=sys.stderr)
                return 2
            keys = [create_node_key(args.out, args.name, force=args.force)]
        else:
            if args.count is None or args.name:
                print("fedshield nodes: give --count N (or use `nodes add --name NAME`)",
                      file=sys.stderr)
                return 2
            keys = create_node_keys(args.out, args.count, prefix=args.prefix, force=args.force)
    except ProvisionError as exc:
        print(f"fedshield nodes: {exc}", file=sys.stderr)
        return 1
    for k in keys:
        print(f"  {k.private_key}  (secret, stays on {k.name})   {k.public_key}  (to register)")
    print(registration_instructions(keys, args.connection, args.superlink))
    return 0


# ---- audit (issue 17) ------------------------------------------------------------------------
def _audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-config", action="append", default=[], metavar="'K=V ...'",
                   help="run config overrides, as `flwr run --run-config` (repeatable)")
    p.add_argument("--modes", default="fedavg,lpp,shield,split", help="modes to attack")
    p.add_argument("--sigmas", default="0,0.1,0.5,1,2", help="split.noise-sigma sweep")
    p.add_argument("--head-layers", default="1,2,4", help="split.head-layers sweep")
    p.add_argument("--dp-multipliers", default="0.5,1,2,4",
                   help="split.noise-multiplier sweep (clip-norm: the run's, else the median norm)")
    p.add_argument("--public-rows", type=int, default=120, help="the server's public text rows")
    p.add_argument("--eval-rows", type=int, default=24, help="held-out silo rows attacked")
    p.add_argument("--split-steps", type=int, default=8, help="split training steps")
    p.add_argument("--no-frontier", action="store_true", help="skip the loss-cost frontier")
    p.add_argument("--shield-views", type=int, default=8,
                   help="shield uploads the shield server attacks (its AUC is their mean)")
    p.add_argument("--out", default="results/audit", help="directory for audit.json, audit.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command("audit", _audit_args)
def audit(args: argparse.Namespace) -> int:
    """Attack every mode's artifacts built from a run config; print, write JSON and a plot."""
    from fedshield_flwr.audit.report import plot, table, write_json
    from fedshield_flwr.audit.run import AuditError, AuditOptions, run_audit, run_config
    from fedshield_flwr.config import ConfigError

    try:
        opts = AuditOptions(
            modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
            sigmas=tuple(float(x) for x in args.sigmas.split(",")),
            head_layers=tuple(int(x) for x in args.head_layers.split(",")),
            dp_multipliers=tuple(float(x) for x in args.dp_multipliers.split(",") if x.strip()),
            public_rows=args.public_rows, eval_rows=args.eval_rows,
            split_steps=args.split_steps, frontier=not args.no_frontier,
            shield_views=args.shield_views, progress=not args.quiet)
        res = run_audit(run_config(args.run_config), opts)
    except (AuditError, ConfigError, ValueError) as exc:
        print(f"fedshield audit: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    path = write_json(res, out / "audit.json")
    png = plot(res, out / "audit.png")
    print(table(res))
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return 0
# ---- end audit --------------------------------------------------------------------------------


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
