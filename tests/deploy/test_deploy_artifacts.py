"""The deployment artefacts under deploy/ are wired correctly — checked without a Docker engine.

No container runtime or cluster runs here, so every artefact is checked for what it promises:

* Dockerfile: multi-stage wheel build, non-root numeric user, the HEALTHCHECK command really
  succeeds against pgveil's metrics endpoint (and fails without it), ENTRYPOINT/CMD/EXPOSE agree
  with the baked-in config, every COPY source exists.
* docker-compose.yml: services, published ports, bind-mount sources exist, the mounted config and
  policy load with the compose environment applied, Prometheus/Grafana point at the right
  services; and (live) the PostgreSQL init sequence really creates the bank and the logins.
* k8s/: every manifest's apiVersion/kind/required fields, selectors against labels, probe and
  Service ports against container ports, every file path of the ConfigMap's pgveil.yaml is
  provided by a volume mount, ConfigMap/Secret keys exist, the embedded config and policy load.
* systemd unit: the directives a DBA relies on, hardening, and ``systemd-analyze verify``.
* Prometheus: ``promtool check rules``/``check config``/``test rules`` (promtool is required),
  every metric named in alerts and dashboard panels exists in proxy/metrics.py, every SPEC §7
  metric has a panel, and every panel's PromQL parses (through promtool).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from proxy.cli import build_parser
from proxy.config import Config, parse_config
from proxy.metrics import Metrics, MetricsServer
from rewriters.policy import parse_policy

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"

SPEC_METRICS = (
    "pgveil_connections", "pgveil_statements_total", "pgveil_protected_rows_total",
    "pgveil_blocked_total", "pgveil_statement_duration_seconds",
    "pgveil_rewrite_duration_seconds", "pgveil_rewrite_cache_total",
    "pgveil_audit_records_total", "pgveil_audit_failures_total", "pgveil_audit_queue",
    "pgveil_policy_reloads_total", "pgveil_policy_info", "pgveil_upstream_errors_total",
)
_METRIC_RE = re.compile(r"\bpgveil_[a-z0-9_]+")


def _metric_names() -> dict[str, str]:
    """Every series name proxy/metrics.py exposes -> its family (for histograms and counters)."""
    names: dict[str, str] = {}
    for fam in Metrics().registry.collect():
        if fam.type == "counter":
            suffixes = ("_total", "_created")
        elif fam.type == "histogram":
            suffixes = ("_bucket", "_sum", "_count", "_created", "")
        else:
            suffixes = ("",)
        for s in suffixes:
            names[fam.name + s] = fam.name
    return names


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------ Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _instr(name: str) -> list[str]:
    return [args for word, args in _dockerfile() if word == name]


def test_dockerfile_is_multi_stage_wheel_build() -> None:
    froms = _instr("FROM")
    assert froms[0] == "python:3.11-slim AS builder"
    assert froms[-1] == "python:3.11-slim"
    runs = _instr("RUN")
    assert any("pip wheel" in r and r.rstrip().endswith(" .") for r in runs)
    install = next(r for r in runs if "pip install" in r)
    assert "--no-index" in install and "from=builder" in install and " pgveil" in install
    # the runtime stage copies nothing from the source tree except the default config files
    runtime = _dockerfile()[[w for w, _ in _dockerfile()].index("FROM", 1):]
    copies = [a for w, a in runtime if w == "COPY"]
    assert all(c.split()[0] in ("deploy/pgveil.yaml", "config/policy.yaml") for c in copies)


def test_dockerfile_copy_sources_exist() -> None:
    for args in _instr("COPY"):
        parts = [p for p in args.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"COPY source {src} does not exist"
    # pyproject's readme must be in the build context or the wheel build fails
    readme = _load_toml_readme()
    assert any(readme in a.split() for a in _instr("COPY"))


def _load_toml_readme() -> str:
    import tomllib

    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"])


def test_dockerfile_runs_as_non_root_with_entrypoint_and_ports() -> None:
    user = _instr("USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid"
    assert json.loads(_instr("ENTRYPOINT")[-1]) == ["pgveil"]
    cmd = json.loads(_instr("CMD")[-1])
    assert cmd == ["serve", "-c", "/etc/pgveil/pgveil.yaml"]
    assert build_parser().parse_args(cmd).command == "serve"
    assert set(" ".join(_instr("EXPOSE")).split()) == {"6432", "9187"}
    # the baked-in default config matches what the image exposes and checks
    config = _container_config()
    assert config.listen.port == 6432 and config.metrics.port == 9187
    assert config.metrics.host == "0.0.0.0" and config.listen.host == "0.0.0.0"
    assert str(config.policy) == "/etc/pgveil/policy.yaml"
    instructions = " ".join(args for _, args in _dockerfile()).lower()
    assert "curl" not in instructions and "wget" not in instructions


def _container_config(environ: dict[str, str] | None = None) -> Config:
    text = (DEPLOY / "pgveil.yaml").read_text(encoding="utf-8")
    return parse_config(text, "/etc/pgveil/pgveil.yaml", environ=environ or {})


def _healthcheck_code() -> str:
    hc = _instr("HEALTHCHECK")[-1]
    cmd = json.loads(hc[hc.index("CMD") + 3:].strip())
    assert cmd[:2] == ["python", "-c"]
    assert "http://127.0.0.1:9187/healthz" in cmd[2]
    return str(cmd[2])


@pytest.fixture
def metrics_endpoint() -> Iterator[tuple[int, threading.Event]]:
    """pgveil's real metrics HTTP server on an OS-picked port, in a thread; stop() ends it."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = threading.Event()
    port: list[int] = []

    async def main() -> None:
        server = MetricsServer(Metrics(), ready=lambda: True)
        port.append(await server.start("127.0.0.1", 0))
        started.set()
        while not stop.is_set():
            await asyncio.sleep(0.02)
        await server.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield port[0], stop
    finally:
        stop.set()
        thread.join(10)
        loop.close()


def test_dockerfile_healthcheck_really_checks_healthz(
        metrics_endpoint: tuple[int, threading.Event]) -> None:
    port, stop = metrics_endpoint
    code = _healthcheck_code().replace("127.0.0.1:9187", f"127.0.0.1:{port}")
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=20)
    assert ok.returncode == 0, ok.stderr
    stop.set()
    import time

    time.sleep(0.3)
    down = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=20)
    assert down.returncode != 0


def test_dockerignore_keeps_what_the_build_needs() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for needed in ("pyproject.toml", "setup.py", "README.md", "proxy/", "rewriters/", "config/policy.yaml",
                   "deploy/pgveil.yaml"):
        assert f"!{needed}" in ignore


# -------------------------------------------------------------------------------- docker-compose

_INTERP = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with an empty environment."""
    return _INTERP.sub(lambda m: m.group(2) or "", value)


def _compose() -> dict[str, Any]:
    data = _load_yaml(DEPLOY / "docker-compose.yml")
    assert isinstance(data, dict)
    return data


def _binds(service: dict[str, Any]) -> list[tuple[Path, str, bool]]:
    """(host path, container path, read-only) of a service's bind mounts."""
    out = []
    for v in service.get("volumes", []):
        parts = v.split(":")
        if parts[0].startswith((".", "/")):
            out.append(((DEPLOY / parts[0]).resolve(), parts[1],
                        len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def _host_path(service: dict[str, Any], container_path: str) -> Path:
    """The host file a container path comes from, through the service's bind mounts."""
    for host, target, _ro in _binds(service):
        rel = PurePosixPath(container_path)
        if rel == PurePosixPath(target):
            return host
        if PurePosixPath(target) in rel.parents:
            return host / rel.relative_to(target)
    raise AssertionError(f"{container_path} is not provided by any bind mount")


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: _interpolate(str(v)) for k, v in env.items()}


def test_compose_services_and_bind_mounts() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "pgveil", "pgveil-keygen", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        for host, _target, _ro in _binds(svc):
            assert host.exists(), f"{name}: bind mount source {host} does not exist"
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if not src.startswith((".", "/")):
                assert src in compose["volumes"], f"{name}: volume {src} is not declared"
    pgveil = services["pgveil"]
    build = pgveil["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert services["pgveil-keygen"]["image"] == pgveil["image"]


def test_compose_postgres_is_reachable_only_through_pgveil() -> None:
    compose = _compose()
    services = compose["services"]
    pg, pgveil = services["postgres"], services["pgveil"]
    assert "ports" not in pg, "PostgreSQL must not be published: clients go through pgveil"
    shared = set(pg["networks"]) & set(pgveil["networks"])
    assert shared and all(compose["networks"][n].get("internal") for n in pg["networks"])
    assert "6432:6432" in pgveil["ports"]
    assert pgveil["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert pgveil["depends_on"]["pgveil-keygen"]["condition"] == \
        "service_completed_successfully"
    # the healthcheck goes over TCP, which the entrypoint's init-time server does not open
    assert "-h" in pg["healthcheck"]["test"]


def test_compose_initdb_loads_bank_with_logins_in_order() -> None:
    pg = _compose()["services"]["postgres"]
    init = sorted((PurePosixPath(t).name, h) for h, t, _ in _binds(pg)
                  if t.startswith("/docker-entrypoint-initdb.d/"))
    assert [h.name for _, h in init] == ["00-logins.sh", "bank.sql", "20-grants.sql"]
    assert init[1][1] == REPO / "proxy" / "data" / "bank.sql"
    assert _env(pg)["POSTGRES_DB"] == "bank"
    logins = (DEPLOY / "compose" / "initdb" / "00-logins.sh").read_text()
    for login in ("dba", "teller_sz01", "teller_gz01", "manager_sz01", "auditor1", "stranger",
                  "pgveil_admin"):
        assert f"CREATE ROLE {login} " in logins
    # pgveil's control password and the database's agree
    assert _env(pg)["PGVEIL_CONTROL_PASSWORD"] == \
        _env(_compose()["services"]["pgveil"])["PGVEIL_CONTROL_PASSWORD"]
    assert subprocess.run(["sh", "-n", str(DEPLOY / "compose/initdb/00-logins.sh")]).returncode == 0


def test_compose_pgveil_config_and_policy_load() -> None:
    pgveil = _compose()["services"]["pgveil"]
    command = pgveil["command"]
    assert build_parser().parse_args(command).command == "serve"
    config_path = command[command.index("-c") + 1]
    host_config = _host_path(pgveil, config_path)
    env = {k: v for k, v in _env(pgveil).items() if k != "PGVEIL_CONTROL_PASSWORD"}
    config = parse_config(host_config.read_text(encoding="utf-8"), config_path, environ=env)
    assert config.upstream.host == "postgres"  # the compose service
    assert config.metrics.host == "0.0.0.0"
    policy_host = _host_path(pgveil, str(config.policy))
    policy = parse_policy(policy_host.read_text(encoding="utf-8"), str(policy_host), {})
    assert "public.customers" in policy.tables
    # state goes to named volumes (writable), the keys the keygen service made
    mounts = {v.split(":")[1]: v for v in pgveil["volumes"]}
    assert str(config.audit.file.parent) in mounts
    assert str(config.audit.signing_key.parent) in mounts
    assert f"{config.listen.port}:{config.listen.port}" in pgveil["ports"]


def test_compose_keygen_uses_a_real_command() -> None:
    keygen = _compose()["services"]["pgveil-keygen"]
    script = keygen["command"][0]
    argv = shlex.split(script.split("||", 1)[1])
    assert argv[0] == "pgveil"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "keygen"
    key_dir = argv[argv.index("--out") + 1]
    config = _container_config()
    assert str(config.audit.signing_key) == f"{key_dir}/audit.key"
    assert any(v.endswith(f":{key_dir}") for v in keygen["volumes"])


def test_compose_prometheus_and_grafana_wiring() -> None:
    services = _compose()["services"]
    prom, grafana = services["prometheus"], services["grafana"]
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    prom_config_path = config_arg.split("=", 1)[1]
    prom_config = _load_yaml(_host_path(prom, prom_config_path))
    assert _host_path(prom, prom_config_path) == PROM / "prometheus.yml"
    for rule_file in prom_config["rule_files"]:
        in_container = str(PurePosixPath(prom_config_path).parent / rule_file)
        assert _host_path(prom, in_container).exists()
    targets = [t for job in prom_config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    host, port = targets[0].split(":")
    assert host in services and int(port) == _container_config().metrics.port
    assert set(prom["networks"]) & set(services[host]["networks"])
    # grafana: datasource -> prometheus service; dashboard file -> provider path
    ds_file = _host_path(grafana, "/etc/grafana/provisioning/datasources/prometheus.yml")
    ds = _load_yaml(ds_file)["datasources"][0]
    assert ds["type"] == "prometheus"
    ds_host = ds["url"].split("//")[1].split(":")[0]
    assert ds_host in services and set(grafana["networks"]) & set(services[ds_host]["networks"])
    provider = _load_yaml(_host_path(
        grafana, "/etc/grafana/provisioning/dashboards/pgveil.yml"))["providers"][0]
    dash_targets = [t for h, t, _ in _binds(grafana) if h == GRAFANA / "dashboard.json"]
    assert dash_targets and PurePosixPath(dash_targets[0]).parent == \
        PurePosixPath(provider["options"]["path"])
    dashboard = json.loads((GRAFANA / "dashboard.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {ds["uid"]}


@pytest.mark.live
def test_compose_initdb_sequence_on_a_fresh_server() -> None:
    """Run 00-logins.sh, bank.sql and 20-grants.sql exactly as the postgres image would."""
    import psycopg

    from proxy.localpg import PostgresCluster

    pg = _compose()["services"]["postgres"]
    init = sorted((PurePosixPath(t).name, h) for h, t, _ in _binds(pg)
                  if t.startswith("/docker-entrypoint-initdb.d/"))
    cluster = PostgresCluster.create(provision=False)
    try:
        cluster.psql("CREATE DATABASE bank", db="postgres")
        env = dict(os.environ, PATH=f"{cluster.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                   PGHOST=str(cluster.socket_dir), PGPORT=str(cluster.port),
                   POSTGRES_USER="postgres", POSTGRES_DB="bank",
                   PGVEIL_CONTROL_PASSWORD="control-pw")
        for name, host in init:
            if name.endswith(".sh"):
                argv = ["sh", str(host)]
            else:  # what docker-entrypoint.sh does with *.sql
                argv = ["psql", "-v", "ON_ERROR_STOP=1", "--username", "postgres",
                        "--no-password", "--no-psqlrc", "--dbname", "bank", "-q", "-f", str(host)]
            run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, f"{name}: {run.stderr}"
        with psycopg.connect(cluster.dsn("teller_sz01", "bank")) as conn:
            assert conn.execute("SELECT count(*) FROM customers").fetchone() == (2000,)
        control = cluster.dsn("teller_sz01", "postgres").replace(
            "teller_sz01:pw_teller_sz01", "pgveil_admin:control-pw")
        with psycopg.connect(control) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("pgveil_admin",)
    finally:
        cluster.cleanup()


# ------------------------------------------------------------------------------------ Kubernetes

_API = {
    "Namespace": "v1", "ConfigMap": "v1", "Secret": "v1", "Service": "v1",
    "Deployment": "apps/v1", "PodDisruptionBudget": "policy/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2", "NetworkPolicy": "networking.k8s.io/v1",
}
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _manifests() -> dict[str, dict[str, Any]]:
    """kind/name -> object, for every file listed in kustomization.yaml."""
    out: dict[str, dict[str, Any]] = {}
    for res in _load_yaml(K8S / "kustomization.yaml")["resources"]:
        for doc in yaml.safe_load_all((K8S / res).read_text(encoding="utf-8")):
            if doc is None:
                continue
            key = f"{doc['kind']}/{doc['metadata']['name']}"
            assert key not in out, f"{key} defined twice"
            out[key] = doc
    return out


def _one(kind: str) -> dict[str, Any]:
    found = [v for k, v in _manifests().items() if k.startswith(kind + "/")]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_k8s_kustomization_lists_every_manifest() -> None:
    kust = _load_yaml(K8S / "kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    ns = _one("Namespace")
    assert kust["namespace"] == ns["metadata"]["name"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_k8s_every_manifest_has_api_version_kind_and_metadata() -> None:
    manifests = _manifests()
    assert {k.split("/")[0] for k in manifests} == set(_API)
    for key, obj in manifests.items():
        assert obj["apiVersion"] == _API[obj["kind"]], key
        assert _DNS1123.match(obj["metadata"]["name"]), key
        required = {"Deployment": "spec", "Service": "spec", "PodDisruptionBudget": "spec",
                    "HorizontalPodAutoscaler": "spec", "NetworkPolicy": "spec",
                    "ConfigMap": "data"}.get(obj["kind"])
        if required:
            assert obj.get(required), f"{key}: missing {required}"
        if obj["kind"] == "Secret":
            assert obj.get("stringData") or obj.get("data"), key


def _container() -> dict[str, Any]:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _configmap_config() -> Config:
    cm = _one("ConfigMap")
    env = {k: v for k, v in _secret_values("pgveil-secrets").items() if k.startswith("PGVEIL_")
           and k not in ("PGVEIL_CONTROL_PASSWORD", "PGVEIL_HASH_KEY")}
    return parse_config(cm["data"]["pgveil.yaml"], "/etc/pgveil/pgveil.yaml", environ=env)


def _secret_values(name: str) -> dict[str, str]:
    secret = _manifests()[f"Secret/{name}"]
    return {**secret.get("data", {}), **secret.get("stringData", {})}


def test_k8s_deployment_shape_and_security() -> None:
    dep = _one("Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 3
    assert _matches(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = int(_instr("USER")[-1].split(":")[0])
    assert pod["securityContext"]["runAsUser"] == uid  # the image's user
    c = _container()
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][part])
    # the container runs what the image's CMD runs
    assert c["args"] == json.loads(_instr("CMD")[-1])
    assert pod["terminationGracePeriodSeconds"] >= 30


def test_k8s_probes_and_ports_match_the_config() -> None:
    c = _container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    config = _configmap_config()
    assert ports["postgres"] == config.listen.port
    assert ports["metrics"] == config.metrics.port
    assert config.metrics.host == "0.0.0.0" and config.workers == 1
    paths = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    for probe, path in paths.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path
        port = get["port"]
        assert (ports.get(port) if isinstance(port, str) else port) == config.metrics.port
    svc = _one("Service")
    assert _matches(svc["spec"]["selector"],
                    _one("Deployment")["spec"]["template"]["metadata"]["labels"])
    for p in svc["spec"]["ports"]:
        target = p["targetPort"]
        assert (ports.get(target) if isinstance(target, str) else target) in ports.values()
    assert {p["port"] for p in svc["spec"]["ports"]} == set(ports.values())


def test_k8s_every_config_path_is_provided_by_a_mount() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in _container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    manifests = _manifests()
    assert {m["name"] for m in mounts.values()} <= set(volumes)
    config = _configmap_config()

    def source_of(path: Path, writable: bool = False) -> None:
        assert path.is_absolute(), f"{path}: use absolute paths (ConfigMap symlink swap)"
        mount_path = next((m for m in mounts if PurePosixPath(m) in PurePosixPath(path).parents),
                          None)
        assert mount_path, f"{path} is not under any volume mount"
        mount = mounts[mount_path]
        assert "subPath" not in mount, "subPath mounts never see ConfigMap/Secret updates"
        volume = volumes[mount["name"]]
        rel = str(PurePosixPath(path).relative_to(mount_path))
        if writable:
            assert "emptyDir" in volume or "persistentVolumeClaim" in volume
            assert not mount.get("readOnly")
            return
        if "configMap" in volume:
            data = manifests[f"ConfigMap/{volume['configMap']['name']}"]["data"]
        else:
            data = _secret_values(volume["secret"]["secretName"])
        items = (volume.get("configMap") or volume.get("secret") or {}).get("items")
        keys = {i["path"]: i["key"] for i in items} if items else {k: k for k in data}
        assert rel in keys and keys[rel] in data, f"{path}: no key provides {rel}"

    source_of(Path("/etc/pgveil/pgveil.yaml"))
    source_of(config.policy)
    assert config.audit.signing_key is not None and config.audit.file is not None
    source_of(config.audit.signing_key)
    source_of(config.audit.file.parent / "x", writable=True)
    assert config.tls is not None and config.tls.cert and config.tls.key
    source_of(config.tls.cert)
    source_of(config.tls.key)
    assert config.upstream.ca is not None
    source_of(config.upstream.ca)
    # /tmp is writable for workers and prometheus multiprocess files (read-only root fs)
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_k8s_secret_env_and_audit_sink() -> None:
    values = _secret_values("pgveil-secrets")
    for env in _container()["env"]:
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in _secret_values(ref["name"]), ref
    names = {e["name"] for e in _container()["env"]}
    assert {"PGVEIL_CONTROL_PASSWORD", "PGVEIL_HASH_KEY"} <= names
    assert "audit.key" in values
    # the shared audit sink in the Secret is a valid override of audit.postgres
    config = _configmap_config()
    assert config.audit.postgres is not None and config.audit.postgres.table == "pgveil.audit"


def test_k8s_configmap_policy_is_the_reference_policy() -> None:
    text = _one("ConfigMap")["data"]["policy.yaml"]
    mine = parse_policy(text, "configmap/policy.yaml", {})
    ref_path = REPO / "config" / "policy.yaml"
    ref = parse_policy(ref_path.read_text(encoding="utf-8"), str(ref_path), {})
    assert mine.protected_tables == ref.protected_tables
    assert set(mine.roles) == set(ref.roles)


def test_k8s_pdb_hpa_and_network_policy() -> None:
    dep = _one("Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    pdb = _one("PodDisruptionBudget")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], labels)
    assert 0 < pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]
    hpa = _one("HorizontalPodAutoscaler")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == \
        (dep["apiVersion"], dep["kind"], dep["metadata"]["name"])
    assert pdb["spec"]["minAvailable"] < hpa["minReplicas"] <= dep["spec"]["replicas"] \
        <= hpa["maxReplicas"]
    cpu = [m for m in hpa["metrics"] if m["type"] == "Resource"
           and m["resource"]["name"] == "cpu"]
    assert cpu and "cpu" in _container()["resources"]["requests"]  # Utilization needs requests
    netpol = _one("NetworkPolicy")["spec"]
    assert _matches(netpol["podSelector"]["matchLabels"], labels)
    allowed = {p["port"] for rule in netpol["ingress"] for p in rule["ports"]}
    assert allowed == {p["containerPort"] for p in _container()["ports"]}
    egress = {p["port"] for rule in netpol["egress"] for p in rule["ports"]}
    assert _configmap_config().upstream.port in egress and 53 in egress


# ----------------------------------------------------------------------------------------- systemd


def _unit() -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in (DEPLOY / "systemd" / "pgveil.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        assert current is not None and "=" in line, line
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def _get(section: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in section if k == key]
    assert values, f"missing {key}="
    return values[-1]


def test_systemd_unit_directives() -> None:
    unit = _unit()
    assert set(unit) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    assert _get(svc, "Type") == "simple"
    assert _get(svc, "User") == "pgveil"
    assert _get(svc, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert _get(svc, "KillSignal") == "SIGTERM"
    assert _get(svc, "KillMode") == "mixed"
    assert int(_get(svc, "TimeoutStopSec").rstrip("s")) >= 30
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
                       "RestrictSUIDSGID": "yes", "CapabilityBoundingSet": ""}.items():
        assert _get(svc, key) == value, key
    # the commands it runs are real pgveil commands
    for key in ("ExecStart", "ExecStartPre"):
        argv = shlex.split(_get(svc, key))
        assert argv[0].endswith("/pgveil")
        build_parser().parse_args(argv[1:])
    assert "multi-user.target" in _get(unit["Install"], "WantedBy")


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` where systemd is installed; the parse above runs everywhere."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        # structural checks in test_systemd_unit_directives still apply
        assert _unit()["Service"]
        return
    pgveil = Path(sys.executable).parent / "pgveil"
    text = (DEPLOY / "systemd" / "pgveil.service").read_text()
    unit = tmp_path / "pgveil.service"
    unit.write_text(text.replace("/opt/pgveil/bin/pgveil", str(pgveil)))
    run = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                         timeout=60)
    problems = [ln for ln in (run.stdout + run.stderr).splitlines() if "pgveil.service" in ln]
    assert run.returncode == 0 and not problems, run.stdout + run.stderr


# -------------------------------------------------------------------------------------- Prometheus


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is required to check deploy/prometheus (alert rules and their unit tests). "
            "Install it: apt-get download prometheus && dpkg-deb --fsys-tarfile prometheus_*.deb "
            "| tar -xO ./usr/bin/promtool > /usr/local/bin/promtool && chmod 755 "
            "/usr/local/bin/promtool   (or: apt-get install -y prometheus)")
    return path


def _promtool_run(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_promtool_check_rules() -> None:
    run = _promtool_run("check", "rules", "alerts.yml")
    assert run.returncode == 0, run.stdout + run.stderr


def test_promtool_check_config() -> None:
    run = _promtool_run("check", "config", "prometheus.yml")
    assert run.returncode == 0, run.stdout + run.stderr


def test_promtool_alert_unit_tests() -> None:
    run = _promtool_run("test", "rules", "alerts_test.yml")
    assert run.returncode == 0, run.stdout + run.stderr


def _alert_rules() -> list[dict[str, Any]]:
    return [r for g in _load_yaml(PROM / "alerts.yml")["groups"] for r in g["rules"]
            if "alert" in r]


def test_alerts_cover_the_failure_modes_and_use_real_metrics() -> None:
    rules = _alert_rules()
    exprs = {r["alert"]: r["expr"] for r in rules}
    known = _metric_names()
    for name, expr in exprs.items():
        for metric in _METRIC_RE.findall(expr):
            assert metric in known, f"{name}: {metric} is not a pgveil metric"
    wanted = {
        "pgveil_audit_failures_total": "audit failures",
        "pgveil_blocked_total": "blocked-statement spike",
        "pgveil_upstream_errors_total": "upstream errors",
        "pgveil_policy_reloads_total": "policy reload failures",
        "pgveil_audit_queue": "audit queue growing",
    }
    for metric, what in wanted.items():
        assert any(metric in e for e in exprs.values()), f"no alert on {what}"
    assert any(re.search(r'\bup\{job="pgveil"\}\s*==\s*0', e) for e in exprs.values())
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning", "info")
        assert r["annotations"]["summary"] and r["annotations"]["description"]
    # the unit tests exercise every alert
    tested = {t["alertname"] for case in _load_yaml(PROM / "alerts_test.yml")["tests"]
              for t in case["alert_rule_test"]}
    assert tested >= set(exprs) - {"PgveilSlowStatements"}


# ----------------------------------------------------------------------------------------- Grafana


def _panels() -> list[dict[str, Any]]:
    dashboard = json.loads((GRAFANA / "dashboard.json").read_text(encoding="utf-8"))
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_panels_use_real_metrics_and_cover_spec() -> None:
    known = _metric_names()
    seen: set[str] = set()
    panels = _panels()
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            names = _METRIC_RE.findall(t["expr"])
            assert names or "up{" in t["expr"], f"{p['title']}: no metric in {t['expr']}"
            for n in names:
                assert n in known, f"{p['title']}: {n} does not exist in proxy/metrics.py"
                seen.add(known[n])
    families = {known[m] for m in SPEC_METRICS}
    assert families <= seen, f"no panel for {sorted(families - seen)}"
    titles = " ".join(p["title"].lower() for p in panels)
    for word in ("p50", "p99", "hit ratio", "blocked", "audit", "reload", "upstream"):
        assert word in titles


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in json.loads((GRAFANA / "dashboard.json").read_text())["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Every panel query is valid PromQL: promtool checks them as recording rules."""
    rules = []
    for i, p in enumerate(_panels()):
        for t in p["targets"]:
            expr = t["expr"].replace("$__rate_interval", "5m").replace("$__interval", "1m")
            rules.append({"record": f"pgveil:panel_{i}_{t['refId'].lower()}", "expr": expr})
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    run = _promtool_run("check", "rules", str(path), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr


def test_prometheus_scrape_target_is_a_valid_address() -> None:
    prom = _load_yaml(PROM / "prometheus.yml")
    for job in prom["scrape_configs"]:
        assert job["metrics_path"] == "/metrics"
        for sc in job["static_configs"]:
            for target in sc["targets"]:
                host, port = target.rsplit(":", 1)
                assert 0 < int(port) < 65536
                with pytest.raises(ValueError):
                    ipaddress.ip_address(host)  # a service name, not a hard-coded address
