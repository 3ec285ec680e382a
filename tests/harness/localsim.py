"""Run this app as a local simulation on a SuperLink we own: own ports, FLWR_HOME, PID.

`flwr run . local` starts a detached SuperLink that outlives it. Tests and benchmarks need one they
can stop, on ports that do not collide with a user's, so they start it themselves.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]  # the repository (tests/harness/localsim.py)
BIN = Path(sys.executable).parent


def _exit_on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise SystemExit(128 + signum)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSimulationSuperLink:
    """``flower-superlink --simulation`` exactly as ``flwr run . local`` would start it.

    ``flwr run`` finds it through ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` and reuses it instead
    of spawning its own detached one, so the test owns the PID and stops it.
    """

    def __init__(self, home: Path):
        self.home = home
        self.http_port = free_port()
        self.control_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = home / "superlink.log"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "FLWR_HOME": str(self.home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(self.control_port),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PATH": f"{BIN}:{env.get('PATH', '')}",
        })
        return env

    def start(self) -> "LocalSimulationSuperLink":
        """Start the SuperLink (own session: stop() kills its simulation processes with it).

        In a script's main thread a default SIGTERM handler is replaced by one that raises
        ``SystemExit``, so that a ``kill`` of the script still runs its ``finally: stop()``
        instead of leaving the SuperLink and its simulation running.
        """
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        self.home.mkdir(parents=True, exist_ok=True)
        cmd = [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation",
               "subprocess", "--control-api-address", f"127.0.0.1:{self.control_port}",
               "--host", "127.0.0.1", "--port", str(self.http_port)]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"superlink exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.http_port}/health", timeout=0.5).is_success:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("superlink did not become healthy in 60 s")

    def flwr_run(self, run_config: str, num_supernodes: int = 2, timeout: float = 600,
                 checked: bool = False, federation: str = "") -> subprocess.CompletedProcess:
        """``flwr run . local --stream`` of this app.

        ``federation`` adds simulation settings, e.g. ``client-resources-num-cpus=1``.
        ``checked=True`` runs it through ``fedshield run``, whose exit status says whether the run
        completed (that of flwr 1.42's ``flwr run`` is 0 either way).
        """
        flwr_args = [".", "local", "--stream", "--federation-config",
                     f"num-supernodes={num_supernodes} {federation}".strip(),
                     "--run-config", run_config]
        cmd = ([sys.executable, "-m", "fedshield_flwr.cli", "run"] if checked
               else [str(BIN / "flwr"), "run"]) + flwr_args
        return subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
