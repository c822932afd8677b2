"""Container and Kubernetes material: compose config, YAML, the Dockerfile's install line, and the
mTLS health check script run against a real gRPC health server."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers_pki import make_ca, make_identity

from fednode.config import parse_config
from fednode.security import tls

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
HEALTHCHECK = DOCKER / "healthcheck.py"
STATEFULSET = ROOT / "deploy" / "k8s" / "statefulset.yaml"
SITES = ("site-a", "site-b", "site-c")


def _yaml():
    return pytest.importorskip("yaml", reason="PyYAML is not installed: the YAML structure checks need it")


# ------------------------------------------------------------------------------------- compose


def test_compose_config_validates_with_docker_compose(tmp_path: Path):
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed: `docker compose config` cannot validate compose.yaml here")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0:
        reason = (version.stderr or version.stdout).strip().splitlines()[0:1]
        pytest.skip(f"`docker compose` is not available ({' '.join(reason)}): compose.yaml is only parsed")
    found = re.search(r"v?(\d+)\.(\d+)\.(\d+)", version.stdout)
    if found and tuple(int(x) for x in found.groups()) < (2, 23, 1):
        pytest.skip(f"{version.stdout.strip()} is older than 2.23.1, which compose.yaml needs (configs: content)")
    # `config` resolves and validates the file; it needs no engine
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warn" not in result.stderr.lower(), result.stderr


def _compose() -> dict[str, Any]:
    return _yaml().safe_load(COMPOSE.read_text())


def test_compose_runs_three_sites_after_the_pki_job():
    doc = _compose()
    services = doc["services"]
    assert set(services) == {"pki", *SITES}
    volumes = set(doc["volumes"])
    for site in SITES:
        svc = services[site]
        assert svc["image"] == services["pki"]["image"]
        assert svc["depends_on"] == {"pki": {"condition": "service_completed_successfully"}}
        assert int(svc["stop_grace_period"].rstrip("s")) >= 45, "docker's 10 s default would kill a drain"
        assert "pki:/etc/fednode/pki:ro" in svc["volumes"]
        assert f"{site}-data:/var/lib/fednode" in svc["volumes"]
        assert {f"{site}-data", "pki"} <= volumes
        assert svc["configs"] == [{"source": site, "target": "/etc/fednode/fednode.toml"}]
    script = services["pki"]["command"][0]
    assert "fednode ca init --dir /etc/fednode/pki" in script
    assert 'fednode ca issue --dir /etc/fednode/pki "$$site" --addr "$$site"' in script
    assert f"for site in {' '.join(SITES)};" in script


@pytest.mark.parametrize("site", SITES)
def test_compose_site_configs_are_valid_node_configs(site: str):
    raw = tomllib.loads(_compose()["configs"][site]["content"])
    cfg = parse_config(raw, Path("/etc/fednode"))
    assert cfg.node.name == site
    assert cfg.tls.cert == Path(f"/etc/fednode/pki/{site}.crt") and cfg.tls.key == Path(f"/etc/fednode/pki/{site}.key")
    assert cfg.tls.ca == Path("/etc/fednode/pki/ca.crt")
    assert cfg.node.data_dir == Path("/var/lib/fednode")
    assert cfg.advertise == f"{site}:7700"  # the certificate is issued for --addr SITE
    assert sorted(cfg.mesh.seeds) == sorted(f"{other}:7700" for other in SITES if other != site)
    assert cfg.metrics.listen.endswith(":9700")


# ------------------------------------------------------------------------------------ kubernetes


def test_statefulset_example_is_consistent():
    docs = [d for d in _yaml().safe_load_all(STATEFULSET.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"ConfigMap", "Service", "StatefulSet"}
    service, sts = by_kind["Service"], by_kind["StatefulSet"]
    assert service["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    pod = sts["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 45
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls-secret"]["secret"]["secretName"] == "fednode-tls"
    (main,) = pod["containers"]
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert mounts["/var/lib/fednode"] == sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert "tls-secret" not in mounts.values(), "the key reaches the node only through the 0600 copy"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["exec"]["command"][-2:] == ["/opt/fednode/healthcheck.py", "--quiet"]
    cfg = parse_config(tomllib.loads(by_kind["ConfigMap"]["data"]["fednode.toml"]), Path("/etc/fednode"))
    assert cfg.node.data_dir == Path("/var/lib/fednode")
    assert {cfg.tls.ca.parent, cfg.tls.cert.parent, cfg.tls.key.parent} == {Path("/etc/fednode/pki")}
    init_script = " ".join(pod["initContainers"][0]["args"])
    assert f"install -m 0600 /secret/node.key {cfg.tls.key}" in init_script


# ------------------------------------------------------------------------------------ Dockerfile


def _pip_installs(commands: str) -> list[str]:
    """The `pip install ...` commands of a shell line, package-index options dropped (where torch
    comes from is a property of the machine, not of the install)."""
    out = []
    for command in commands.split("&&"):
        words = shlex.split(command.strip())
        if words[:2] != ["pip", "install"]:
            continue
        kept, skip = [], False
        for word in words:
            if skip:
                skip = False
            elif word in ("--index-url", "--extra-index-url", "-i"):
                skip = True
            elif not word.startswith(("--index-url=", "--extra-index-url=")):
                kept.append(word)
        out.append(" ".join(kept))
    return out


def _dockerfile_instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_installs_like_the_readme_but_not_editable():
    readme_demo = next(line.strip() for line in (ROOT / "README.md").read_text().splitlines()
                       if line.strip().startswith("python3 -m venv .venv"))
    expected = _pip_installs(readme_demo)
    assert expected == ["pip install -q torch==2.13.0", "pip install -q -e ."], "README install changed"
    runs = " && ".join(rest for keyword, rest in _dockerfile_instructions() if keyword == "RUN")
    assert _pip_installs(runs) == ["pip install -q torch==2.13.0", "pip install -q ."]  # a copy, not a checkout


def test_dockerfile_runs_unprivileged_with_an_mtls_healthcheck():
    instructions = _dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    values = dict(instructions)  # last one wins, as in Docker
    assert values["FROM"] == "python:3.11-slim"
    assert values["USER"].split(":")[0] == "fednode"
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN"), "RUN after USER"
    assert "healthcheck.py" in values["HEALTHCHECK"]
    assert "COPY" in keywords and any("deploy/docker/healthcheck.py" in v for k, v in instructions if k == "COPY")
    assert "7700" in values["EXPOSE"].split()
    assert values["CMD"] == '["run", "--config", "/etc/fednode/fednode.toml"]'
    assert "FEDNODE_CONFIG=/etc/fednode/fednode.toml" in values["ENV"]


# --------------------------------------------------------------------------------- health check


@pytest.fixture(scope="module")
def node_files(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("hc")
    ca = make_ca(directory / "pki")
    make_identity(ca, "site-a", ["site-a.example"])  # note: not issued for 127.0.0.1
    make_identity(ca, "site-b", ["127.0.0.1"])
    return {"dir": directory, "pki": ca}


def _write_config(node_files: dict[str, Path], name: str, listen: str) -> Path:
    path = node_files["dir"] / f"{name}.toml"
    path.write_text(f'[node]\nname = "{name}"\nlisten = "{listen}"\n[tls]\nca = "pki/ca.crt"\n'
                    f'cert = "pki/{name}.crt"\nkey = "pki/{name}.key"\n')
    return path


def _health_server(identity, status_name: str):
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(ThreadPoolExecutor(max_workers=2), options=tls.server_options())
    servicer = health.HealthServicer()
    servicer.set("", getattr(health_pb2.HealthCheckResponse, status_name))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(identity))
    server.start()
    return server, port


def _run_healthcheck(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), "--config", str(config), "--timeout", "5", *extra],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("status", "code"), [("SERVING", 0), ("NOT_SERVING", 1)])
def test_healthcheck_reports_the_nodes_grpc_health(node_files, status, code):
    from fednode.security.identity import load_identity

    pki = node_files["pki"]
    identity = load_identity(pki / "site-a.crt", pki / "site-a.key", pki / "ca.crt")
    server, port = _health_server(identity, status)
    try:
        # a wildcard listen is checked on loopback, and the server's name is checked as "site-a"
        result = _run_healthcheck(_write_config(node_files, "site-a", f"0.0.0.0:{port}"))
    finally:
        server.stop(None)
    assert result.returncode == code, result.stderr
    if code:
        assert "unhealthy" in result.stderr and status in result.stderr
    else:
        assert "site-a" in result.stdout and "SERVING" in result.stdout


def test_healthcheck_refuses_a_server_with_another_identity(node_files):
    """The check pins the node's own name: another mesh member answering on the port is unhealthy."""
    from fednode.security.identity import load_identity

    pki = node_files["pki"]
    other = load_identity(pki / "site-b.crt", pki / "site-b.key", pki / "ca.crt")
    server, port = _health_server(other, "SERVING")
    try:
        result = _run_healthcheck(_write_config(node_files, "site-a", f"127.0.0.1:{port}"))
    finally:
        server.stop(None)
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr


def test_healthcheck_fails_cleanly_when_nothing_listens(node_files):
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _run_healthcheck(_write_config(node_files, "site-a", f"127.0.0.1:{port}"), "--quiet")
    assert result.returncode == 1
    assert result.stderr.startswith("fednode-healthcheck: unhealthy:") and result.stdout == ""


def test_healthcheck_bad_config_is_one_line(node_files):
    result = _run_healthcheck(node_files["dir"] / "missing.toml")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr
