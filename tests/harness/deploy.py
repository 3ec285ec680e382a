"""A real Flower deployment on loopback: SuperLink + SuperNodes with TLS and node authentication.

Tests and benchmarks start the actual ``flower-superlink`` / ``flower-supernode`` binaries, exactly
as sites do (``docker/`` runs the same commands in containers), on free ports of 127.0.0.1, each
with its own ``FLWR_HOME``:

- the SuperLink serves its Fleet, Control and Runtime APIs over HTTPS on one port with a
  certificate from :mod:`fedshield_flwr.provision`, with ``--enable-supernode-auth`` and its
  state in an SQLite ``--database`` (so it can be killed and restarted);
- every SuperNode authenticates with its own OpenSSH ECDSA key, registered beforehand through the
  Control API with ``flwr supernode register``; ClientApps run in ``subprocess`` isolation, i.e.
  a fresh ``flwr-clientapp`` process per message;
- the ``flwr`` CLI reaches the Control API through a connection in its own ``config.toml`` that
  trusts the CA (``root-certificates``).

:class:`LoopbackDeployment` owns every process it starts: each runs in its own process group, and
every descendant ever seen (SuperExec, ServerApp, ClientApp processes) is remembered by PID and
start time, so :meth:`LoopbackDeployment.stop` ends all of them, also after a test failed and also
when a parent died first. Nothing is found or killed by name.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from fedshield_flwr.provision import (
    CertificateSet,
    NodeKey,
    create_certificates,
    create_node_key,
    create_node_keys,
)
from tests.harness.localsim import BIN, ROOT, free_port

CONNECTION = "fedshield-loopback"


class DeploymentError(RuntimeError):
    """A deployment process failed to start or to do its part; the message shows its log."""


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


@dataclass
class ManagedProcess:
    """One process we started, in its own process group, with its log file."""

    name: str
    proc: subprocess.Popen
    log: Path
    cmd: list[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


@dataclass
class SiteProcess:
    """A SuperNode of the deployment and what identifies it."""

    index: int
    key: NodeKey
    node_config: str
    port: int
    home: Path
    node_id: int | None = None
    process: ManagedProcess | None = None


@dataclass
class LoopbackDeployment:
    """SuperLink + ``num_sites`` SuperNodes on 127.0.0.1 with TLS and SuperNode authentication.

    Parameters
    ----------
    root : Path
        Working directory of the deployment: certificates, keys, each party's ``FLWR_HOME``,
        the SuperLink database and every log live below it.
    num_sites : int, default 3
        SuperNodes provisioned (keys) and registered by :meth:`start`.
    node_configs : sequence of str, optional
        ``--node-config`` of each site; default ``partition-id=i num-partitions=num_sites``.
    env : mapping, optional
        Extra environment for every process (e.g. ``FEDSHIELD_CACHE``).

    The SuperLink and the SuperNodes run their apps in ``subprocess`` isolation (each starts
    its own ``flower-superexec``), as a site without containers does.
    """

    root: Path
    num_sites: int = 3
    node_configs: Sequence[str] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    certs: CertificateSet | None = None
    port: int = 0
    superlink: ManagedProcess | None = None
    sites: list[SiteProcess] = field(default_factory=list)
    _owned: list[ManagedProcess] = field(default_factory=list)
    _seen: dict[int, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ paths and environment
    @property
    def cli_home(self) -> Path:
        return self.root / "flwr-cli"

    @property
    def database(self) -> Path:
        return self.root / "superlink" / "state.db"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def process_env(self, flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
            "HF_DATASETS_OFFLINE": env.get("HF_DATASETS_OFFLINE", "1"),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{BIN}:{env.get('PATH', '')}",
        })
        env.update(self.env)
        env.update(extra or {})
        return env

    # ------------------------------------------------------------------ process bookkeeping
    def _spawn(self, name: str, cmd: list[str], env: Mapping[str, str], cwd: Path) -> ManagedProcess:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            fh.write(f"\n$ {shlex.join(cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        mp = ManagedProcess(name, proc, log, cmd)
        self._owned.append(mp)
        self._remember(psutil.Process(proc.pid))
        return mp

    def _remember(self, p: psutil.Process) -> None:
        try:
            self._seen[p.pid] = p.create_time()
        except psutil.NoSuchProcess:
            pass

    def refresh(self) -> None:
        """Remember every live descendant of our processes (so orphans can be stopped later)."""
        for mp in self._owned:
            for child in mp.descendants():
                self._remember(child)

    def _alive_seen(self) -> list[psutil.Process]:
        out = []
        for pid, created in list(self._seen.items()):
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    def kill_tree(self, mp: ManagedProcess, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to ``mp``'s process group and to every descendant (a crash, for SIGKILL)."""
        kids = mp.descendants()
        for k in kids:
            self._remember(k)
        mp.signal_group(sig)
        for k in kids:
            try:
                k.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        if sig == signal.SIGKILL:
            mp.wait(10)
            psutil.wait_procs(kids, timeout=10)

    def stop(self) -> None:
        """Stop every process this deployment started, and their descendants, by PID."""
        self.refresh()
        for mp in reversed(self._owned):
            if mp.alive():
                mp.signal_group(signal.SIGTERM)
        deadline = time.time() + 15
        for mp in reversed(self._owned):
            mp.wait(max(0.1, deadline - time.time()))
        leftovers = self._alive_seen()
        for p in leftovers:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(leftovers, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for mp in self._owned:
            if mp.alive():
                mp.signal_group(signal.SIGKILL)
                mp.wait(5)

    def running_pids(self) -> list[int]:
        """PIDs of processes started by this deployment that are still alive."""
        self.refresh()
        return sorted(p.pid for p in self._alive_seen())

    def __enter__(self) -> LoopbackDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ provisioning
    def provision(self) -> None:
        """Certificates, one key pair per site, and the ``flwr`` CLI connection."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.certs is None:
            self.certs = create_certificates(self.root / "certs", sans=["localhost", "127.0.0.1"])
        if not self.port:
            self.port = free_port()
        if not self.sites:
            keys = create_node_keys(self.root / "keys", self.num_sites)
            configs = list(self.node_configs or [
                f"partition-id={i} num-partitions={self.num_sites}" for i in range(self.num_sites)])
            if len(configs) != self.num_sites:
                raise ValueError(f"{len(configs)} node configs for {self.num_sites} sites")
            self.sites = [SiteProcess(i, k, c, free_port(), self.root / k.name / "flwr-home")
                          for i, (k, c) in enumerate(zip(keys, configs))]
        self.write_cli_config()

    def write_cli_config(self) -> Path:
        """``$FLWR_HOME/config.toml`` of the CLI with a TLS connection to the SuperLink."""
        assert self.certs is not None
        self.cli_home.mkdir(parents=True, exist_ok=True)
        path = self.cli_home / "config.toml"
        path.write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.certs.ca_cert}"\n')
        return path

    # ------------------------------------------------------------------ SuperLink
    def start_superlink(self, timeout: float = 90) -> ManagedProcess:
        """Start (or restart, on the same port and database) the SuperLink and wait for health."""
        assert self.certs is not None, "call provision() first"
        home = self.root / "superlink" / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        cmd = [str(BIN / "flower-superlink"), *self.certs.superlink_args(),
               "--enable-supernode-auth", "--database", str(self.database),
               "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(self.port)]
        self.superlink = self._spawn("superlink", cmd, self.process_env(home), self.root)
        trust = ssl.create_default_context(cafile=str(self.certs.ca_cert))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.superlink.alive():
                raise DeploymentError(f"the SuperLink exited with code {self.superlink.proc.returncode}"
                                      f":\n{_tail(self.superlink.log)}")
            try:
                r = httpx.get(f"https://{self.address}/health", verify=trust, timeout=1.0)
                if r.is_success:
                    return self.superlink
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise DeploymentError(f"the SuperLink was not healthy after {timeout:.0f} s:\n"
                              f"{_tail(self.superlink.log)}")

    def kill_superlink(self) -> None:
        """Crash the SuperLink: SIGKILL it with its SuperExec and the ServerApp it runs."""
        if self.superlink is not None:
            self.kill_tree(self.superlink)

    # ------------------------------------------------------------------ flwr CLI
    def flwr(self, *args: str, timeout: float = 120, check: bool = True,
             cwd: Path = ROOT) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI with this deployment's connection (its own ``FLWR_HOME``)."""
        cmd = [str(BIN / "flwr"), *args]
        out = subprocess.run(cmd, cwd=cwd, env=self.process_env(self.cli_home),
                             capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise DeploymentError(f"`{shlex.join(cmd)}` failed ({out.returncode}):\n"
                                  f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        return out

    def register(self, key: NodeKey) -> int:
        """Register ``key`` on the SuperLink through the Control API; returns the node id."""
        out = self.flwr("supernode", "register", str(key.public_key), CONNECTION,
                        "--name", key.name, "--format", "json")
        doc = json.loads(out.stdout[out.stdout.index("{"):])
        if not doc.get("success"):
            raise DeploymentError(f"registering SuperNode '{key.name}' failed: {out.stdout}")
        return int(doc["node-id"])

    def node_status(self) -> dict[int, str]:
        """``{node_id: status}`` as ``flwr supernode list`` reports it."""
        out = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        doc = json.loads(out.stdout[out.stdout.index("{"):])
        return {int(n["node-id"]): n["status"] for n in doc.get("nodes", [])}

    # ------------------------------------------------------------------ SuperNodes
    def start_site(self, site: SiteProcess, key: NodeKey | None = None,
                   extra_args: Sequence[str] = ()) -> ManagedProcess:
        """Start the SuperNode of ``site`` (authenticating with ``key``, default its own)."""
        assert self.certs is not None
        site.home.mkdir(parents=True, exist_ok=True)
        key = key or site.key
        cmd = [str(BIN / "flower-supernode"), "--superlink", self.address,
               "--root-certificates", str(self.certs.ca_cert), *key.supernode_args(),
               "--node-config", site.node_config, "--isolation", "subprocess",
               "--host", "127.0.0.1", "--port", str(site.port), *extra_args]
        site.process = self._spawn(f"supernode-{site.index}-{key.name}", cmd,
                                   self.process_env(site.home), self.root)
        return site.process

    def wait_site_online(self, site: SiteProcess, timeout: float = 90) -> int:
        """Wait until the SuperNode logs its node id (it is then activated on the SuperLink)."""
        assert site.process is not None
        deadline = time.time() + timeout
        pattern = re.compile(r"SuperNode ID: (\d+)")
        while time.time() < deadline:
            m = pattern.search(_tail(site.process.log, 200_000))
            if m:
                return int(m.group(1))
            if not site.process.alive():
                raise DeploymentError(f"SuperNode {site.key.name} exited with code "
                                      f"{site.process.proc.returncode}:\n{_tail(site.process.log)}")
            time.sleep(0.3)
        raise DeploymentError(f"SuperNode {site.key.name} did not connect within {timeout:.0f} s:"
                              f"\n{_tail(site.process.log)}")

    def kill_site(self, index: int) -> None:
        """Crash a site: SIGKILL its SuperNode, SuperExec and running ClientApp processes."""
        site = self.sites[index]
        if site.process is not None:
            self.kill_tree(site.process)

    def clientapp_processes(self, index: int) -> list[psutil.Process]:
        """The ``flwr-clientapp`` processes currently running for site ``index``."""
        site = self.sites[index]
        procs = site.process.descendants() if site.process else []
        return [p for p in procs if _cmdline_has(p, "flwr-clientapp")]

    def serverapp_processes(self) -> list[psutil.Process]:
        """The ``flwr-serverapp`` processes the SuperLink currently runs."""
        procs = self.superlink.descendants() if self.superlink else []
        return [p for p in procs if _cmdline_has(p, "flwr-serverapp")]

    def unregistered_site(self, node_config: str = "partition-id=0 num-partitions=1") -> SiteProcess:
        """A site with a well-formed key pair that was never registered on the SuperLink."""
        n = sum(1 for _ in (self.root / "unregistered").glob("*.pub")) if (
            self.root / "unregistered").exists() else 0
        key = create_node_key(self.root / "unregistered", f"unregistered-{n}")
        return SiteProcess(100 + n, key, node_config, free_port(),
                           self.root / key.name / "flwr-home")

    # ------------------------------------------------------------------ whole deployment
    def start(self) -> LoopbackDeployment:
        """Provision, start the SuperLink, register every site and start its SuperNode."""
        self.provision()
        self.start_superlink()
        for site in self.sites:
            if site.node_id is None:
                site.node_id = self.register(site.key)
        for site in self.sites:
            self.start_site(site)
        for site in self.sites:
            online = self.wait_site_online(site)
            if online != site.node_id:
                raise DeploymentError(f"SuperNode {site.key.name} came up as node {online}, "
                                      f"registered as {site.node_id}")
        return self

    # ------------------------------------------------------------------ runs
    def start_run(self, run_config: str, app: Path = ROOT) -> ManagedProcess:
        """``flwr run <app> <connection> --stream`` in the background (a log streamer)."""
        cmd = [str(BIN / "flwr"), "run", str(app), CONNECTION, "--stream",
               "--run-config", run_config]
        name = f"flwr-run-{len([m for m in self._owned if m.name.startswith('flwr-run')])}"
        return self._spawn(name, cmd, self.process_env(self.cli_home), app)

    def run(self, run_config: str, timeout: float = 600, app: Path = ROOT,
            until: Callable[[ManagedProcess], bool] | None = None) -> RunOutcome:
        """Run the app and wait until the stream ends, or ``until(streamer)`` is true.

        With ``until`` the run may still be going on when this returns (a test then crashes
        something); the streamer is ``outcome.process``.
        """
        mp = self.start_run(run_config, app)
        t0 = time.time()
        while time.time() - t0 < timeout:
            self.refresh()
            if not mp.alive() or (until is not None and until(mp)):
                break
            time.sleep(0.5)
        else:
            self.kill_tree(mp)
            raise DeploymentError(f"`flwr run` did not finish within {timeout:.0f} s:\n"
                                  f"{_tail(mp.log)}")
        return RunOutcome(mp, _tail(mp.log, 1_000_000), time.time() - t0)

    def stop_run(self, run_id: int) -> None:
        """Ask the SuperLink to stop a run (its ServerApp and pending messages)."""
        self.flwr("stop", str(run_id), CONNECTION, check=False)


@dataclass
class RunOutcome:
    """What ``flwr run --stream`` printed and how long it took."""

    process: ManagedProcess
    output: str
    seconds: float

    @property
    def run_id(self) -> int | None:
        m = re.search(r"Successfully started run (\d+)", self.output)
        return int(m.group(1)) if m else None


def _cmdline_has(p: psutil.Process, word: str) -> bool:
    try:
        return any(word in part for part in p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Start a loopback deployment and keep it up until Ctrl-C (a local demo of the setup)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--root", default=None,
                        help="working directory (default: a new temporary directory)")
    parser.add_argument("--sites", type=int, default=3)
    args = parser.parse_args(argv)
    import tempfile

    root = Path(args.root or tempfile.mkdtemp(prefix="fedshield-deploy-")).resolve()
    dep = LoopbackDeployment(root, num_sites=args.sites)
    try:
        dep.start()
        print(f"SuperLink https://{dep.address} (CA {dep.certs.ca_cert}); run the app with:\n"
              f"  FLWR_HOME={dep.cli_home} flwr run . {CONNECTION} --stream\nCtrl-C stops all.")
        while dep.superlink and dep.superlink.alive():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        dep.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
