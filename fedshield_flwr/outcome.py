"""``flwr run`` with an exit status that says how the run ended (``fedshield run``).

flwr 1.42's ``flwr run --stream`` exits 0 once the run's log stream ends, whether the ServerApp
completed or raised: it streams the logs and never looks at the run's status. The SuperLink knows
(``flwr ls --run-id N``: ``finished:completed``, ``finished:failed`` with the exception,
``finished:stopped``). :func:`run_and_check` runs ``flwr run --stream``, passes its output through,
asks the SuperLink how the run ended and returns 0 only for a completed run; otherwise its last
lines are the run's status and the ServerApp's error (party, round, remedy).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

COMPLETED = "finished:completed"
_STARTED = re.compile(r"Successfully started run (\d+)|\"run-id\": \"(\d+)\"")
# The line the ServerApp logs when it fails (fedshield_flwr.results.record_outcome).
_SERVER_ERROR = re.compile(r"^ERROR\s*:\s*server: run .*failed")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# `flwr run` options that take a value; everything else that is not an option is positional.
_VALUE_OPTIONS = frozenset({"--federation", "--run-config", "-c", "--federation-config",
                            "--format"})


def flwr_executable() -> str:
    """The ``flwr`` next to this Python (the project's venv), else the one on ``PATH``."""
    here = Path(sys.executable).parent / "flwr"
    return str(here) if here.exists() else (shutil.which("flwr") or "flwr")


def superlink_of(flwr_run_args: Sequence[str]) -> str | None:
    """The SuperLink connection named in ``flwr run APP [SUPERLINK] ...`` (None: the default)."""
    positional, i = [], 0
    while i < len(flwr_run_args):
        arg = flwr_run_args[i]
        if arg in _VALUE_OPTIONS:
            i += 2
            continue
        if not arg.startswith("-"):
            positional.append(arg)
        i += 1
    return positional[1] if len(positional) > 1 else None


def run_status(run_id: int, superlink: str | None, flwr: str | None = None,
               wait: float = 30.0) -> tuple[str, str]:
    """``(status, details)`` of a run from ``flwr ls``, waiting up to ``wait`` s for it to finish.

    ``status`` is Flower's ``status:sub-status`` (``finished:failed``, ...), ``details`` what the
    SuperLink recorded (for a failed run: the exception).
    """
    cmd = [flwr or flwr_executable(), "ls", *([superlink] if superlink else []),
           "--run-id", str(run_id), "--format", "json"]
    deadline = time.time() + wait
    while True:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        try:
            doc = json.loads(out.stdout[out.stdout.index("{"):])
            run = doc["runs"][0]
            status, details = str(run["status"]), str(run.get("status-details", ""))
        except (ValueError, KeyError, IndexError):
            status = "unknown"
            details = f"`{' '.join(cmd)}` answered: {(out.stdout + out.stderr).strip()[-500:]}"
        if status.startswith("finished") or time.time() > deadline:
            return status, details
        time.sleep(1.0)


def run_and_check(flwr_run_args: Sequence[str], out: TextIO | None = None,
                  err: TextIO | None = None, flwr: str | None = None) -> int:
    """Run ``flwr run <flwr_run_args> --stream``; 0 only if the run completed.

    The run's output goes to ``out`` as it comes. For a run that did not complete, the last lines
    (on ``err``) are its status and the ServerApp's error.
    """
    out, err = out or sys.stdout, err or sys.stderr
    args = list(flwr_run_args)
    if "--stream" not in args:
        args.append("--stream")
    flwr = flwr or flwr_executable()
    run_id, server_error = None, None
    proc = subprocess.Popen([flwr, "run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()
            plain = _ANSI.sub("", line).rstrip("\n")
            if run_id is None and (m := _STARTED.search(plain)):
                run_id = int(m.group(1) or m.group(2))
            if _SERVER_ERROR.match(plain):
                server_error = plain
        code = proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        if run_id is not None:
            print(f"fedshield run: stopped following run {run_id}; it goes on on the SuperLink "
                  f"(`flwr ls --run-id {run_id}`, `flwr stop {run_id}`)", file=err)
        return 130
    if code != 0 or run_id is None:
        print(f"fedshield run: `flwr run` exited with status {code} "
              f"{'before starting a run' if run_id is None else f'while following run {run_id}'}",
              file=err)
        return code or 1
    status, details = run_status(run_id, superlink_of(args), flwr)
    if status == COMPLETED:
        return 0
    print(f"fedshield run: run {run_id} is {status}, not {COMPLETED}", file=err)
    print(server_error or details, file=err)
    return 1
