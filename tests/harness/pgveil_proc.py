"""Run ``pgveil serve -c <config>`` as a real subprocess in front of the test cluster.

Why a subprocess and not an in-process server: the live tests must exercise exactly what a DBA
runs — the CLI, config loading, worker processes, signals — and a crash of the proxy must not take
the test session with it.

Data flow::

    PgveilProcess(cluster, overrides)    default config (SPEC §3) deep-merged with overrides
      .start()  -> writes <tmp>/pgveil.yaml, spawns `pgveil serve -c <tmp>/pgveil.yaml`
                   (the venv's console script, else `python -m proxy`), output -> <tmp>/pgveil.log;
                   waits until the listen (and metrics) port accepts; if the process exits first,
                   raises with the log tail; a port lost to a race is retried with fresh ports
      .dsn(login)  -> libpq URL through the proxy with the login's `pw_<login>` password
      .stop()   -> SIGTERM (graceful drain), SIGKILL after 10 s, then any leftover of its
                   process group (the workers)

Ports: pgveil binds the numbers in its config, so they are picked free below 32768 (see
cluster.PORT_RANGE), never left to the kernel's ephemeral range.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import yaml

from proxy.localpg import PostgresCluster as _Cluster
from proxy.localpg import (
    RunAs,
    make_temp_dir,
    password_for,
    pick_free_port,
    wait_for_port,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_POLICY = REPO_ROOT / "config" / "policy.yaml"
_HOST = "127.0.0.1"
_START_TIMEOUT = 30.0
_STOP_GRACE = 10.0
_START_ATTEMPTS = 3
_BIND_ERRORS = ("Address already in use", "address already in use", "EADDRINUSE", "Errno 98")


class PgveilError(RuntimeError):
    """pgveil did not start, or exited while a test needed it; ``log_tail`` says why."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class ProcState(enum.Enum):
    """Lifecycle of one pgveil subprocess."""

    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge overrides into a copy of base, recursing into dicts; ``None`` deletes a key.

    Example: ``deep_merge({"audit": {"file": "a"}}, {"audit": {"durability": "batch"}})``
    keeps ``file`` and adds ``durability``; ``{"metrics": None}`` removes the metrics section.
    """
    merged: dict[str, Any] = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def pgveil_command(config_path: Path) -> list[str]:
    """How to run `pgveil serve`: the console script beside this interpreter, else `-m proxy`."""
    script = Path(sys.executable).parent / "pgveil"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), "serve", "-c", str(config_path)]
    return [sys.executable, "-m", "proxy", "serve", "-c", str(config_path)]


class PgveilProcess:
    """One ``pgveil serve`` subprocess with its own config, audit file and log.

    ``config_overrides`` is deep-merged into the default config (see ``default_config``);
    ``policy_path`` replaces config/policy.yaml. ``env`` adds environment variables (e.g.
    ``PGVEIL_CONTROL_PASSWORD``); inherited ``PGVEIL_*`` variables are dropped so that the
    generated file is the whole truth.
    """

    def __init__(
        self,
        cluster: _Cluster,
        config_overrides: Mapping[str, Any] | None = None,
        policy_path: Path | str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.overrides: dict[str, Any] = dict(config_overrides or {})
        self.policy_path = Path(policy_path) if policy_path is not None else DEFAULT_POLICY
        self.extra_env = dict(env or {})
        self.dir = make_temp_dir("pgveil-proxy-", RunAs(None, None, None))
        self.config_path = self.dir / "pgveil.yaml"
        self.log_path = self.dir / "pgveil.log"
        self.audit_path = self.dir / "audit" / "audit.jsonl"
        self.port = 0
        self.metrics_port = 0
        self.config: dict[str, Any] = {}
        self.state = ProcState.NEW
        self._proc: subprocess.Popen[bytes] | None = None

    # ----------------------------------------------------------------- config

    def default_config(self) -> dict[str, Any]:
        """SPEC §3 settings for a test run: passthrough auth, strict audit, no TLS upstream."""
        control_dsn = self.cluster.dsn("dba", db="postgres")
        return {
            "listen": {"host": _HOST, "port": self.port},
            "upstream": {"host": self.cluster.host, "port": self.cluster.port, "tls": "disable"},
            "auth": {"mode": "passthrough"},
            "control": {"dsn": control_dsn},
            "metrics": {"host": _HOST, "port": self.metrics_port},
            "audit": {
                "file": str(self.audit_path),
                "on_failure": "block",
                "redact_literals": True,
                "durability": "strict",
            },
            "policy": str(self.policy_path),
        }

    def write_config(self) -> Path:
        """Write the config file without starting pgveil (for ``pgveil check``/``explain``)."""
        self._write_config()
        return self.config_path

    def _write_config(self) -> None:
        self.config = deep_merge(self.default_config(), self.overrides)
        # Overrides may pin ports; keep the attributes in step with what pgveil will bind.
        self.port = int(self.config.get("listen", {}).get("port", self.port))
        metrics = self.config.get("metrics")
        self.metrics_port = int(metrics.get("port", 0)) if isinstance(metrics, Mapping) else 0
        self.audit_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            yaml.safe_dump(self.config, sort_keys=False, allow_unicode=True), encoding="utf-8"
        )

    # ----------------------------------------------------------------- lifecycle

    def start(self, timeout: float = _START_TIMEOUT) -> PgveilProcess:
        """Spawn pgveil and wait until it accepts connections; raise with its log otherwise."""
        if self.state is ProcState.RUNNING:
            return self
        last = ""
        for _attempt in range(_START_ATTEMPTS):
            self.port = pick_free_port()
            self.metrics_port = pick_free_port(exclude={self.port})
            self._write_config()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn()
            if self._wait_ready(timeout):
                self.state = ProcState.RUNNING
                return self
            last = self._log_from(offset)
            self._terminate()
            if not any(marker in last for marker in _BIND_ERRORS):
                break
        self.state = ProcState.STOPPED
        tail = _tail(last)
        raise PgveilError(
            f"pgveil did not start ({' '.join(pgveil_command(self.config_path))}); "
            f"log tail:\n{tail}\n--- config ---\n{self.config_path.read_text()}",
            log_tail=tail,
        )

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PGVEIL_", "PG"))}
        env.update(self.extra_env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with self.log_path.open("ab") as log:
            # A new session = a new process group: stop() can reach forked workers by group id.
            self._proc = subprocess.Popen(
                pgveil_command(self.config_path),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=env,
                start_new_session=True,
            )

    def _wait_ready(self, timeout: float) -> bool:
        """Ready = the listen port (and the metrics port, when configured) accept."""
        deadline = time.monotonic() + timeout
        ports = [self.port] + ([self.metrics_port] if self.metrics_port else [])
        for port in ports:
            while True:
                if self._proc is None or self._proc.poll() is not None:
                    return False
                if wait_for_port(_HOST, port, timeout=0.2):
                    break
                if time.monotonic() > deadline:
                    return False
        return True

    def stop(self, grace: float = _STOP_GRACE) -> int | None:
        """SIGTERM (graceful drain), SIGKILL after ``grace`` seconds; returns the exit code."""
        code = self._terminate(grace)
        self.state = ProcState.STOPPED
        return code

    def _terminate(self, grace: float = _STOP_GRACE) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        # Workers forked by pgveil share its process group (= its pid, see _spawn).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode

    def signal(self, sig: int) -> None:
        """Send a signal to the main process (e.g. SIGHUP to reload the policy)."""
        if self._proc is None or self._proc.poll() is not None:
            raise PgveilError("pgveil is not running")
        self._proc.send_signal(sig)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def returncode(self) -> int | None:
        """The exit code if the process has exited, else None."""
        return self._proc.poll() if self._proc is not None else None

    def cleanup(self) -> None:
        """Stop the process and delete its temp dir (config, audit file, log)."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgveilProcess:
        try:
            return self.start()
        except BaseException:  # a failed start leaves no process and no temp dir behind
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # ----------------------------------------------------------------- access

    def dsn(self, login: str, db: str = "bank", **params: str) -> str:
        """libpq URL through pgveil for ``login`` (password ``pw_<login>``); params -> query."""
        url = (
            f"postgresql://{quote(login, safe='')}:{quote(password_for(login), safe='')}"
            f"@{_HOST}:{self.port}/{quote(db, safe='')}"
        )
        return f"{url}?{urlencode(params)}" if params else url

    def log_text(self) -> str:
        """Everything pgveil printed so far (stdout and stderr)."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _log_from(self, offset: int) -> str:
        """The log from a byte offset on: what one start attempt printed."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def metrics_url(self, path: str = "/metrics") -> str:
        return f"http://{_HOST}:{self.metrics_port}{path}"

    def __repr__(self) -> str:
        return f"<PgveilProcess pid={self.pid} port={self.port} {self.state.value}>"


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


__all__ = [
    "DEFAULT_POLICY",
    "PgveilError",
    "PgveilProcess",
    "ProcState",
    "deep_merge",
    "pgveil_command",
]


def policy_with_teller_quota(directory: Path, rows: int) -> Path:
    """A copy of the fixture policy with another teller quota."""
    policy = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    policy["roles"]["teller"]["quota"] = {"rows": rows, "per": "1h"}
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, allow_unicode=True, sort_keys=False),
                    encoding="utf-8")
    return path
