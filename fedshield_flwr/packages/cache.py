"""A silo's cache of packages the server sent it (lpp's quantized base, split's silo parts).

Each package is kept under ``<cache>/silo/<kind>/<hash>`` and verified on every load. The silo's
cache is separate from the server's build cache (``<cache>/lpp-base``) even when both live on one
machine, so a simulation exercises the same delivery a deployment does.
"""

from __future__ import annotations

from pathlib import Path

from fedshield_flwr.config import NodeSettings
from fedshield_flwr.models import cache_root
from fedshield_flwr.packages.format import (
    PackageError,
    Reader,
    cached_package,
    package_dir,
    save_package,
)


def silo_cache_dir(node: NodeSettings) -> Path:
    """Where this silo keeps received packages (``<cache>/silo``; see the module docstring)."""
    return cache_root(node.cache_dir or None) / "silo"


def has_cached_package(node: NodeSettings, content_hash: str, kind: str) -> bool:
    """Whether the package is on this silo's disk (cheap: no hashing; loading verifies).

    ``kind`` is the package family (``"lpp-base"``, ``"split-parts"``).
    """
    try:
        return (package_dir(silo_cache_dir(node), content_hash, kind)
                / "package.safetensors").exists()
    except PackageError:
        return False


def receive_package(arrays: dict | None, content_hash: str, node: NodeSettings, who: str,
                    kind: str, reader: Reader, what: str = ""):
    """The verified package: from ``arrays`` when the server sent it (then cached), else disk.

    ``reader(arrays, expected_hash=, who=)`` validates a package of ``kind``. Raises
    :class:`PackageError` when neither holds it (the server must resend: it does so when the
    silo's next query answers "missing") or when the content does not match the hash. ``what``
    names the package in that error ("base"; default: the kind).
    """
    cache = silo_cache_dir(node)
    if arrays is not None:
        pkg = reader(arrays, expected_hash=content_hash, who=who)
        save_package(pkg, cache, kind)
        return pkg
    pkg = cached_package(cache, content_hash, kind, reader)
    if pkg is None:
        raise PackageError(
            f"silo {node.partition_id} has no cached {what or kind} {content_hash[:12]} and "
            f"{who} did not send it; its cache {cache} was cleared or lost: the server resends "
            "it after the next query round"
        )
    return pkg
