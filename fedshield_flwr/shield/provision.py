"""Where each party finds its shield keyset, in simulation and in deployment.

Deployment: ``fedshield keys init --out DIR`` once; ``shield-silo.key`` goes to every silo (node
config ``shield-key=/path/shield-silo.key``), ``shield-server.key`` to the coordinator (run config
``shield.server-key``). Simulation (``shield.auto-keys=true``): the first silo that needs keys
generates a keyset under ``$FEDSHIELD_CACHE/shield-keys/<tag>/`` (``<tag>`` = the results run id,
so ``resume`` finds the same keys) and the server waits for the *server* file only. The server
process never opens the silo file, so it cannot hold a secret key.
"""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

from fedshield_flwr.models.load import cache_root
from fedshield_flwr.shield.errors import KeysetError
from fedshield_flwr.shield.keys import (
    SERVER_KEY_FILE,
    SILO_KEY_FILE,
    ServerKeyset,
    SiloKeyset,
    write_keyset_files,
)
from fedshield_flwr.shield.params import params_for_silos


def simulation_key_dir(tag: str) -> Path:
    if not tag or "/" in tag or tag.startswith("."):
        raise KeysetError(f"invalid shield key tag {tag!r}")
    return cache_root() / "shield-keys" / tag


def silo_keyset(node_key_path: str, auto_keys: bool, tag: str, max_silos: int = 0) -> SiloKeyset:
    """The silo's keyset: its node-config file, or (simulation) the run's shared keyset.

    A simulated keyset is sized for ``max_silos`` updates per round (the server's count of the
    silos it samples, :func:`~fedshield_flwr.shield.params.params_for_silos`; 0: the default).
    """
    if node_key_path:
        return SiloKeyset.load(node_key_path)
    if not auto_keys:
        raise KeysetError(
            "this silo has no shield keyset: set --node-config \"shield-key=/path/shield-silo.key\" "
            "(created by `fedshield keys init`), or shield.auto-keys=true in simulation"
        )
    directory = simulation_key_dir(tag)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / SILO_KEY_FILE).exists():
            write_keyset_files(directory, params_for_silos(max_silos) if max_silos else None)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return SiloKeyset.load(directory / SILO_KEY_FILE)


def server_keyset(server_key_path: str, auto_keys: bool, tag: str,
                  wait_seconds: float = 600.0) -> ServerKeyset:
    """The server's public keyset; in simulation wait until the silos have provisioned it."""
    if server_key_path:
        return ServerKeyset.load(server_key_path)
    if not auto_keys:
        raise KeysetError("the server has no shield keyset: set shield.server-key to the path of "
                          "shield-server.key (created by `fedshield keys init`)")
    path = simulation_key_dir(tag) / SERVER_KEY_FILE
    deadline = time.time() + wait_seconds
    while not path.exists():
        if time.time() > deadline:
            raise KeysetError(f"no silo provisioned {path} within {wait_seconds:.0f} s")
        time.sleep(0.5)
    return ServerKeyset.load(path)
