"""``pgveil demo``: the embedded default — a working pgveil in one command on a fresh machine.

Steps (each printed as it happens): start a private PostgreSQL (system binaries when present,
else the ``pgserver`` wheel; as root the server runs as the ``postgres`` user), load the bank
dataset with the fixture logins, generate a throwaway TLS certificate and audit signing key,
write a pgveil.yaml next to them that uses ``config/policy.yaml``, start pgveil in this process,
and print ready-to-paste psql lines for a teller, a manager, an auditor and the DBA, plus the
metrics URL. Ctrl-C drains pgveil, stops PostgreSQL and removes the temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
ROLES = [("teller", "teller_sz01"), ("manager", "manager_sz01"), ("auditor", "auditor1"),
         ("dba", "dba")]


def _say(msg: str) -> None:
    print(f"[pgveil demo] {msg}", flush=True)


def _free_port(preferred: int) -> int:
    for port in [preferred, *range(preferred + 1, preferred + 200)]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port near {preferred}")


def make_self_signed(cert_path: Path, key_path: Path, hostname: str = "localhost") -> None:
    """A throwaway certificate so the demo shows TLS from client to pgveil."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)


def write_demo_config(work: Path, pg_port: int, port: int, metrics_port: int,
                      policy: Path) -> Path:
    cfg = work / "pgveil.yaml"
    cfg.write_text(
        "# written by pgveil demo\n"
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        "tls: {cert: certs/server.crt, key: certs/server.key, mode: prefer}\n"
        f"upstream: {{host: 127.0.0.1, port: {pg_port}, tls: disable}}\n"
        "auth: {mode: passthrough}\n"
        f"control: {{dsn: 'postgresql://dba:pw_dba@127.0.0.1:{pg_port}/postgres'}}\n"
        f"metrics: {{host: 127.0.0.1, port: {metrics_port}}}\n"
        "audit:\n  file: audit/pgveil-audit.jsonl\n  signing_key: keys/audit.key\n"
        "  durability: strict\n  on_failure: block\n  redact_literals: true\n"
        f"policy: {policy}\n")
    return cfg


def run_demo(port: int = 6432, workdir: str | None = None, scale: int = 2000) -> int:
    from proxy.localpg import PostgresCluster

    policy = CONFIG_DIR / "policy.yaml"
    if not policy.exists():
        print(f"pgveil demo: {policy} not found (run from a pgveil checkout)", file=sys.stderr)
        return 1
    temp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="pgveil-demo-")) if temp else Path(workdir)  # type: ignore[arg-type]
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    cluster = None
    t0 = time.monotonic()
    try:
        _say("starting a private PostgreSQL and loading the bank dataset "
             f"({scale} customers)…")
        cluster = PostgresCluster.create(provision=True, scale=scale)
        _say(f"PostgreSQL {cluster.port} ready ({time.monotonic() - t0:.1f}s)")
        _say("generating a throwaway TLS certificate and audit signing key…")
        make_self_signed(work / "certs" / "server.crt", work / "certs" / "server.key")
        from proxy.keys import generate_keypair

        generate_keypair(work / "keys")
        port = _free_port(port)
        metrics_port = _free_port(9187)
        cfg_path = write_demo_config(work, cluster.port, port, metrics_port, policy)
        from proxy.config import load_config

        config = load_config(cfg_path)
        return asyncio.run(_serve_demo(config, port, metrics_port, work))
    except KeyboardInterrupt:
        return 0
    finally:
        _say("stopping…")
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.cleanup()
        if temp:
            shutil.rmtree(work, ignore_errors=True)
        _say("stopped; nothing left running")


async def _serve_demo(config: object, port: int, metrics_port: int, work: Path) -> int:
    from proxy.runtime import Runtime

    rt = Runtime(config)  # type: ignore[arg-type]
    rt.load_policy()
    await rt.start()
    await rt.start_metrics()
    # warm the catalog so the first psql line answers at once
    await rt.catalog("bank")
    print()
    print("pgveil is running. Paste any of these lines into another terminal:")
    print()
    for role, login in ROLES:
        conninfo = (f"host=127.0.0.1 port={port} dbname=bank user={login} "
                    f"password=pw_{login} sslmode=require")
        print(f"  # {role}")
        print(f"  psql \"{conninfo}\"")
    print()
    print("try:  select id, name, phone, id_number, branch_id from customers where id < 10;")
    print(f"metrics: http://127.0.0.1:{metrics_port}/metrics")
    print(f"audit log: {work / 'audit' / 'pgveil-audit.jsonl'}  (verify: pgveil audit verify "
          f"{work / 'audit' / 'pgveil-audit.jsonl'} --key {work / 'keys' / 'audit.pub'})")
    print("Ctrl-C stops everything.", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await rt.drain(timeout=5)
    return 0
