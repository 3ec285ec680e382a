"""The layout holds: every module imports on its own, and no side imports the other's code.

A mode is a package (``fedshield_flwr/<mode>/``) whose ``protocol.py`` both its strategy and its
ClientApp handlers import; the library never imports the Flower glue, a silo's handlers never
import the server's code, and the server's code never imports a silo's handlers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedshield_flwr", "server_app", "client_app", "strategies")


def _modules() -> list[str]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            out.append(".".join(parts))
    return out


def _module_level_imports(module: str) -> set[str]:
    """Modules a module imports at import time (not inside functions or TYPE_CHECKING)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom)) else [node]:
            if isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.module:
                found.add(sub.module)
                found.update(f"{sub.module}.{a.name}" for a in sub.names)  # may be a module
    return found


def test_every_module_imports_on_its_own_in_a_fresh_process():
    """No import cycle: each module is the first of the project imported in its own process."""
    script = textwrap.dedent(f"""
        import importlib, os, sys, traceback
        sys.path.insert(0, {str(ROOT)!r})
        import numpy, torch, flwr, transformers  # third-party, shared to keep this fast
        failed, running = [], {{}}

        def reap():
            pid, status = os.wait()
            name = running.pop(pid)
            if status != 0:
                failed.append(name)

        for name in {_modules()!r}:
            if len(running) >= max(2, os.cpu_count() or 1):
                reap()
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            running[pid] = name
        while running:
            reap()
        print("FAILED", failed)
        sys.exit(1 if failed else 0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


@pytest.mark.parametrize("module", [m for m in _modules() if m.startswith("fedshield_flwr")])
def test_the_library_imports_no_flower_glue(module):
    glue = {i for i in _module_level_imports(module)
            if i.split(".")[0] in ("server_app", "client_app", "strategies")}
    assert not glue, f"{module} imports {sorted(glue)}"


@pytest.mark.parametrize("module", [m for m in _modules() if m.startswith("client_app")])
def test_silo_handlers_import_no_server_code(module):
    server = {i for i in _module_level_imports(module)
              if i.split(".")[0] in ("server_app", "strategies")}
    assert not server, f"{module} imports {sorted(server)}"


@pytest.mark.parametrize("module", [m for m in _modules()
                                    if m.startswith(("server_app", "strategies"))])
def test_server_code_imports_no_silo_handlers(module):
    silo = {i for i in _module_level_imports(module) if i.split(".")[0] == "client_app"}
    assert not silo, f"{module} imports {sorted(silo)}"


@pytest.mark.parametrize("mode", ["shield", "lpp", "split"])
def test_each_mode_strategy_and_handlers_share_the_mode_protocol(mode):
    protocol = f"fedshield_flwr.{mode}.protocol"
    assert protocol in _module_level_imports(f"strategies.{mode}")
    assert protocol in _module_level_imports(f"client_app.{mode}")


def test_server_round_key_is_written_in_one_place():
    """The wire keys every mode shares are constants of fedshield_flwr/protocol.py."""
    holders = [p.relative_to(ROOT).as_posix() for pkg in PACKAGES
               for p in (ROOT / pkg).rglob("*.py") if '"server-round"' in p.read_text()]
    assert holders == ["fedshield_flwr/protocol.py"]
