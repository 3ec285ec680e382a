"""docker/: the compose file is valid and wires TLS, node auth, state, per-silo volumes, ports.

``docker-compose config`` (Debian's docker-compose package) validates and resolves the files;
no container engine is needed. The Dockerfiles are checked statically.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
SITES = (1, 2, 3)
COMPOSE = shutil.which("docker-compose")


def _config(*files: str) -> dict:
    if COMPOSE is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install -y docker-compose); "
                    "the compose file cannot be validated here")
    args = [COMPOSE]
    for f in files:
        args += ["-f", f]
    out = subprocess.run(args + ["config"], cwd=DOCKER, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"docker-compose config rejected {files}:\n{out.stderr}"
    return yaml.safe_load(out.stdout)


@pytest.fixture(scope="module")
def compose() -> dict:
    return _config("compose.yml")


def _flags(service: dict) -> list[str]:
    return [str(c) for c in service.get("command", [])]


def _mounts(service: dict) -> dict[str, str]:
    """target -> source of each volume (named or bind)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = str(v.get("source"))
        else:
            parts = v.split(":")
            out[parts[1]] = parts[0]
    return out


def test_compose_file_validates_with_a_coordinator_and_three_silos(compose):
    names = set(compose["services"])
    assert {"superlink", "serverapp"} <= names
    assert {f"supernode-{i}" for i in SITES} | {f"clientapp-{i}" for i in SITES} <= names


def test_superlink_has_tls_node_auth_and_state_on_a_volume(compose):
    sl = compose["services"]["superlink"]
    flags = _flags(sl)
    for f in ("--ssl-ca-certfile=", "--ssl-certfile=", "--ssl-keyfile=", "--database=state/"):
        assert any(x.startswith(f) for x in flags), f
    assert "--enable-supernode-auth" in flags and "--insecure" not in flags
    assert _mounts(sl)["/app/state"] == "superlink-state" and "superlink-state" in compose["volumes"]
    assert 8000 in [_port(p) for p in sl["ports"]]


def _port(p) -> int | None:
    if isinstance(p, dict):
        return int(p.get("published", 0))
    m = re.match(r"(?:[\d.]+:)?(\d+):\d+", str(p))
    return int(m.group(1)) if m else None


def test_split_relay_port_is_published_by_the_serverapp(compose):
    assert 9099 in [_port(p) for p in compose["services"]["serverapp"]["ports"]]


def test_silos_reach_the_split_relay_on_the_coordinators_published_port_over_tls(compose):
    """The documented split run config matches the compose file: port, host name, certificates."""
    cfg = _documented_run_config("strategy.name='split'")
    svc = compose["services"]
    assert cfg["strategy.name"] == "split" and cfg["split.relay-bind"] == "0.0.0.0"
    published = {_port(p): str(p.get("target") if isinstance(p, dict) else p).split(":")[-1]
                 for p in svc["serverapp"]["ports"]}
    assert published.get(cfg["split.relay-port"]) == str(cfg["split.relay-port"])
    # Every ClientApp resolves the relay host to the Docker host (the published port), and has
    # no other route to the coordinator's containers.
    for i in SITES:
        assert f"{cfg['split.relay-host']}:host-gateway" in svc[f"clientapp-{i}"]["extra_hosts"]
        assert set(svc[f"clientapp-{i}"]["networks"]) == {f"site-{i}"}
    # TLS: the three PEM files are mounted into the ServerApp container where the config says.
    mounts = _mounts(svc["serverapp"])
    for key in ("split.relay-ca-cert", "split.relay-server-cert", "split.relay-server-key"):
        assert cfg[key] in mounts, f"{key}={cfg[key]} is not mounted into the serverapp"


def test_each_silo_authenticates_with_its_own_key_and_keeps_its_own_data_and_cache(compose):
    svc = compose["services"]
    keys, data, caches = set(), set(), set()
    for i in SITES:
        sn, ca = svc[f"supernode-{i}"], svc[f"clientapp-{i}"]
        flags = _flags(sn)
        assert f"--auth-supernode-private-key=keys/site-{i}" in flags
        assert any(f.startswith("--root-certificates=") for f in flags)
        assert "--insecure" not in flags
        assert any(f.startswith("--node-config=") and "data-path=" in f for f in flags)
        keys.add(_mounts(sn)["/app/keys"])
        data.add(_mounts(ca)["/app/data"])
        caches.add(_mounts(ca)["/app/cache"])
        # The ClientApps see their site's network only: no route to the SuperLink or other silos.
        assert set(ca["networks"]) == {f"site-{i}"}
        assert set(sn["networks"]) == {"wan", f"site-{i}"}
    assert len(keys) == len(data) == len(caches) == len(SITES)


def _documented_run_config(marker: str) -> dict:
    """The ``--run-config`` of the compose run in docs/deployment.md that contains ``marker``."""
    from flwr.common.config import parse_config_args

    text = DEPLOYMENT_DOC.read_text().replace("\\\n", " ")
    runs = re.findall(r'flwr run \. fedshield --stream --run-config "([^"]*)"', text)
    (run,) = [r for r in runs if marker in r and "/app/results" in r]
    return parse_config_args([run])


def test_shield_keys_the_secret_file_on_every_site_only_the_public_one_on_the_coordinator(
        compose):
    from flwr.common.config import parse_config_args

    cfg = _documented_run_config("strategy.name='shield'")
    svc = compose["services"]
    assert cfg["shield.auto-keys"] is False
    server_dir, server_file = cfg["shield.server-key"].rsplit("/", 1)
    assert server_file == "shield-server.key"
    coordinator = _mounts(svc["serverapp"])[server_dir]
    assert coordinator.rstrip("/").endswith("coordinator/shield")
    sources = set()
    for i in SITES:
        (flag,) = [f for f in _flags(svc[f"supernode-{i}"]) if f.startswith("--node-config=")]
        node = parse_config_args([flag.split("=", 1)[1]])
        key_dir = node["shield-key"].rsplit("/", 1)[0]
        mounts = _mounts(svc[f"clientapp-{i}"])  # the ClientApp, not the SuperNode, reads it
        assert mounts[key_dir].rstrip("/").endswith(f"sites/site-{i}/shield")
        assert mounts[node["export-dir"]].rstrip("/").endswith(f"sites/site-{i}/exports")
        sources.add(mounts[key_dir])
    assert coordinator not in sources and len(sources) == len(SITES)


def test_runtime_dependency_installation_is_disabled_everywhere(compose):
    for name, s in compose["services"].items():
        assert str(s["environment"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"]) == "1", name


def test_images_use_the_installed_flower_version(compose):
    import flwr

    version = flwr.__version__
    svc = compose["services"]
    assert svc["supernode-1"]["image"] == f"flwr/supernode:{version}"
    assert svc["superlink"]["build"]["args"]["FLWR_VERSION"] == version
    assert svc["serverapp"]["build"]["args"]["FLWR_VERSION"] == version


def test_gpu_override_gives_silos_the_cuda_image_and_a_gpu():
    cfg = _config("compose.yml", "compose.gpu.yml")
    for i in SITES:
        s = cfg["services"][f"clientapp-{i}"]
        assert s["build"]["args"]["TORCH_VARIANT"].startswith("cu")
        devices = s["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert cfg["services"]["serverapp"]["build"]["args"]["TORCH_VARIANT"] == "cpu"


def test_dockerfiles_build_from_official_flower_images_with_pinned_cpu_torch():
    app = (DOCKER / "app.Dockerfile").read_text()
    assert re.search(r"^FROM flwr/superexec:\$\{FLWR_VERSION\}", app, re.M)
    assert "ARG FLWR_VERSION=1.42.0" in app and "ARG TORCH_VERSION=2.13.0" in app
    assert "ARG TORCH_VARIANT=cpu" in app
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in app
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in app
    link = (DOCKER / "superlink.Dockerfile").read_text()
    assert re.search(r"^FROM flwr/superlink:\$\{FLWR_VERSION\}", link, re.M)


def test_dockerfile_installs_every_dependency_but_flower_itself(tmp_path):
    """Run the Dockerfile's own requirement filter on this project's pyproject.toml."""
    import tomllib

    app = (DOCKER / "app.Dockerfile").read_text()
    script = re.search(r"<<'EOF' > /tmp/requirements.txt\n(.*?)\nEOF", app, re.S).group(1)
    pyproject = tmp_path / "pyproject.toml"
    shutil.copy(ROOT / "pyproject.toml", pyproject)
    out = subprocess.run([sys.executable, "-c", script.replace(
        "/tmp/fedshield/pyproject.toml", str(pyproject))], capture_output=True, text=True,
        check=True).stdout.split()
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    assert not any(d.startswith("flwr[") or d.startswith("flwr=") for d in out)
    assert set(out) == {d for d in deps if not d.startswith("flwr[") and not d.startswith("flwr=")}
