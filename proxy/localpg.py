"""A throwaway PostgreSQL cluster for `pgveil demo`, the live tests and the benchmarks.

Why: SPEC §8 says tests run against a real PostgreSQL that the test session starts itself — never
a mock. This module owns that server's whole life:

    find_bin_dir()                 $PGBIN > pg_config --bindir > /usr/lib/postgresql/*/bin
                                   (highest) > the `pgserver` wheel's binaries
    PostgresCluster.create()       initdb (UTF8, SCRAM for TCP, trust on the private socket)
      -> start()                   pg_ctl start on a free port in 20000-32000 (retried on a
                                   collision), socket in the temp dir, fsync off
      -> provision()               logins `pw_<login>`, database `bank` from proxy/data/bank.sql,
                                   GRANT ALL to PUBLIC
    ... tests use .dsn() / .psql() / .restart() ...
    cleanup()                      pg_ctl stop (then the postmaster pid) and rm -r the temp dir

`PGVEIL_TEST_DSN` (a superuser libpq URL) points the suite at an existing server instead
(`PostgresCluster.external()`): logins and the bank database are then created only if missing,
and the server is never stopped or restarted.

PostgreSQL refuses to run as root: when the harness runs as root, initdb / pg_ctl run as the
`postgres` system user (subprocess `user=`), and the temp dir is chowned to it.

Pure stdlib + the PostgreSQL client binaries, so `bench/run.py` and `pgveil demo`-like scripts can
import it without pytest.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import glob
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit

PACKAGE_DIR = Path(__file__).resolve().parent
BANK_SQL = PACKAGE_DIR / "data" / "bank.sql"

#: Logins every live test may rely on; each has the password ``pw_<login>``.
LOGINS: tuple[str, ...] = (
    "dba",
    "teller_sz01",
    "teller_gz01",
    "manager_sz01",
    "auditor1",
    "stranger",
)
SUPERUSER_LOGINS: frozenset[str] = frozenset({"dba"})
DEFAULT_SCALE = 2000

#: Ports for servers that need a number up front (PostgreSQL, pgveil's listen/metrics, PgBouncer).
#: Kept below 32768 so they never collide with the kernel's ephemeral range.
PORT_RANGE: tuple[int, int] = (20000, 32000)

_HOST = "127.0.0.1"
_START_ATTEMPTS = 6
_BIND_ERRORS = ("could not bind", "Address already in use", "could not create any TCP/IP sockets")


class ClusterError(RuntimeError):
    """The throwaway server could not be found, created, started or stopped."""


class PsqlError(RuntimeError):
    """psql exited non-zero; ``stderr`` holds PostgreSQL's message."""

    def __init__(self, returncode: int, stderr: str, sql: str) -> None:
        super().__init__(f"psql exited {returncode}: {stderr.strip()}\n--- sql ---\n{sql[:2000]}")
        self.returncode = returncode
        self.stderr = stderr


class ClusterState(enum.Enum):
    """Whether the server this object manages is up; external servers are always RUNNING."""

    STOPPED = "stopped"
    RUNNING = "running"


def password_for(login: str) -> str:
    """The fixture convention: every test login's password is ``pw_<login>``."""
    return f"pw_{login}"


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for client/server subprocesses, without a developer's PG* settings.

    Why: a stray PGHOST/PGPORT/PGPASSWORD/PGSSLMODE in the shell would silently point psql or
    pgbench somewhere else; the harness says everything explicitly instead.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCLIENTENCODING"] = "UTF8"
    env["PGCONNECT_TIMEOUT"] = "10"
    env.setdefault("LC_ALL", "C.UTF-8")
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------- binaries


def _has_server(bin_dir: Path) -> bool:
    return (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file()


def _version_key(path: str) -> tuple[int, ...]:
    """Sort key for /usr/lib/postgresql/<version>/bin, numerically (16 > 9.6)."""
    version = Path(path).parent.name
    return tuple(int(p) for p in re.findall(r"\d+", version)) or (0,)


def _pgserver_bin_dir() -> Path | None:
    """The binaries shipped inside the `pgserver` wheel, if that package is installed."""
    for module in ("pgserver._commands", "pgserver.postgres_server"):
        try:
            mod = __import__(module, fromlist=["POSTGRES_BIN_PATH"])
        except ImportError:
            continue
        path = getattr(mod, "POSTGRES_BIN_PATH", None)
        if path is not None and _has_server(Path(path)):
            return Path(path)
    try:
        import pgserver  # type: ignore[import-not-found]
    except ImportError:
        return None
    candidate = Path(pgserver.__file__).parent / "pginstall" / "bin"
    return candidate if _has_server(candidate) else None


def find_bin_dir() -> Path:
    """Locate PostgreSQL server binaries (initdb, pg_ctl, postgres, psql, pgbench).

    Order: ``$PGBIN``; ``pg_config --bindir`` when it has initdb; the highest
    ``/usr/lib/postgresql/*/bin``; the ``pgserver`` wheel. Raises ClusterError naming what to
    install when none is found.
    """
    env_bin = os.environ.get("PGBIN")
    if env_bin:
        if not _has_server(Path(env_bin)):
            raise ClusterError(f"$PGBIN={env_bin} has no initdb/pg_ctl")
        return Path(env_bin)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out and _has_server(Path(out)):
                return Path(out)
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for candidate in debian:
        if _has_server(Path(candidate)):
            return Path(candidate)
    wheel = _pgserver_bin_dir()
    if wheel is not None:
        return wheel
    raise ClusterError(
        "no PostgreSQL server binaries: apt-get install postgresql, set $PGBIN, "
        "or pip install pgserver"
    )


def client_binary(bin_dir: Path | None, name: str) -> str:
    """Path of a client program (psql, pgbench, pg_dump): the server's own, else $PATH."""
    if bin_dir is not None and (bin_dir / name).is_file():
        return str(bin_dir / name)
    found = shutil.which(name)
    if not found:
        raise ClusterError(f"{name} not found (bin dir {bin_dir}, $PATH)")
    return found


# --------------------------------------------------------------------------- ports


def port_is_free(port: int, host: str = _HOST) -> bool:
    """True when nothing is bound to host:port right now (a race remains: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_free_port(exclude: Iterable[int] = (), host: str = _HOST) -> int:
    """A currently free TCP port in PORT_RANGE, scanning from a random start.

    Why not bind(0): the kernel hands out ephemeral ports (>= 32768), and a server that takes a
    port number in its config must stay below that range here.
    """
    lo, hi = PORT_RANGE
    excluded = set(exclude)
    start = random.randrange(lo, hi)
    for offset in range(hi - lo):
        port = lo + (start - lo + offset) % (hi - lo)
        if port not in excluded and port_is_free(port, host):
            return port
    raise ClusterError(f"no free TCP port in {lo}-{hi}")


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """Poll until a TCP connect to host:port succeeds or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- running as postgres


@dataclass(frozen=True)
class RunAs:
    """Which OS user runs the server processes; ``None`` fields mean "the current user"."""

    user: str | None
    uid: int | None
    gid: int | None

    @classmethod
    def for_server(cls) -> RunAs:
        """As root, the `postgres` system user (PostgreSQL and PgBouncer refuse root)."""
        if os.geteuid() != 0:
            return cls(None, None, None)
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise ClusterError(
                "running as root but there is no 'postgres' system user to run the server as "
                "(apt-get install postgresql creates it)"
            ) from exc
        return cls("postgres", entry.pw_uid, entry.pw_gid)

    def popen_kwargs(self) -> dict[str, object]:
        """Keyword arguments for subprocess that drop privileges when needed."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def own(self, *paths: Path) -> None:
        """chown paths to the server user so it can write there."""
        if self.uid is None or self.gid is None:
            return
        for path in paths:
            os.chown(path, self.uid, self.gid)


def make_temp_dir(prefix: str, run_as: RunAs) -> Path:
    """A private temp dir the server user can use: mode 0700, owned by that user.

    When $TMPDIR is under a directory the server user cannot traverse (e.g. /root), fall back to
    /tmp so the unprivileged server can reach its own data directory.
    """
    base = Path(tempfile.gettempdir())
    if run_as.uid is not None and not _traversable_by_others(base):
        base = Path("/tmp")
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    run_as.own(path)
    return path


def _traversable_by_others(path: Path) -> bool:
    for part in [path, *path.parents]:
        if not os.stat(part).st_mode & 0o001:
            return False
    return True


# --------------------------------------------------------------------------- the cluster


class PostgresCluster:
    """One PostgreSQL server for a test session or a benchmark run.

    Attributes used by tests: ``host``, ``port``, ``socket_dir`` (None for an external
    server), ``bin_dir``, ``owned`` (False when PGVEIL_TEST_DSN points at an existing server).
    """

    host: str
    port: int
    socket_dir: Path | None
    bin_dir: Path | None
    owned: bool

    def __init__(
        self,
        *,
        bin_dir: Path | None,
        base_dir: Path | None,
        port: int,
        owned: bool,
        run_as: RunAs,
        admin_url: str | None = None,
        extra_settings: Mapping[str, str] | None = None,
    ) -> None:
        self.host = _HOST
        self.port = port
        self.bin_dir = bin_dir
        self.owned = owned
        self.base_dir = base_dir
        self.socket_dir = base_dir / "sock" if base_dir is not None else None
        self.data_dir = base_dir / "data" if base_dir is not None else None
        self.log_path = base_dir / "postgres.log" if base_dir is not None else None
        self.state = ClusterState.RUNNING if not owned else ClusterState.STOPPED
        self._run_as = run_as
        self._admin_url = admin_url
        self._admin_user = (urlsplit(admin_url).username or "postgres") if admin_url else "postgres"
        self._admin_password = (
            unquote(urlsplit(admin_url).password or "") if admin_url else password_for("postgres")
        )
        self._extra_settings = dict(extra_settings or {})
        self._cleaned = False
        self._atexit_registered = False

    # ----------------------------------------------------------------- construction

    @classmethod
    def create(
        cls,
        *,
        provision: bool = True,
        scale: int = DEFAULT_SCALE,
        bin_dir: Path | None = None,
        extra_settings: Mapping[str, str] | None = None,
    ) -> PostgresCluster:
        """initdb + start a new private server; with ``provision`` add logins and ``bank``.

        Cleans up after itself if any step fails, so a failed fixture leaves no server behind.
        """
        run_as = RunAs.for_server()
        bins = bin_dir or find_bin_dir()
        base = make_temp_dir("pgveil-pg-", run_as)
        cluster = cls(
            bin_dir=bins,
            base_dir=base,
            port=0,
            owned=True,
            run_as=run_as,
            extra_settings=extra_settings,
        )
        try:
            cluster._initdb()
            cluster.start()
            cluster._set_postgres_password()
            if provision:
                cluster.provision(scale=scale)
        except BaseException:
            cluster.cleanup()
            raise
        return cluster

    @classmethod
    def external(
        cls, admin_url: str, *, provision: bool = True, scale: int = DEFAULT_SCALE
    ) -> PostgresCluster:
        """Wrap an existing server reached with a superuser URL; provision only what is missing."""
        parts = urlsplit(admin_url)
        query = dict(parse_qsl(parts.query))
        host = query.get("host") or parts.hostname or _HOST
        port = int(query.get("port") or parts.port or 5432)
        bin_dir: Path | None
        try:
            bin_dir = find_bin_dir()
        except ClusterError:
            bin_dir = None  # client programs then come from $PATH
        cluster = cls(
            bin_dir=bin_dir,
            base_dir=None,
            port=port,
            owned=False,
            run_as=RunAs(None, None, None),
            admin_url=admin_url,
        )
        if host.startswith("/"):
            # The admin URL uses a unix socket; the test logins still come over TCP (SCRAM).
            cluster.socket_dir = Path(host)
            host = _HOST
        cluster.host = host
        if provision:
            cluster.provision(scale=scale)
        return cluster

    @classmethod
    def for_tests(cls) -> PostgresCluster:
        """The session server: PGVEIL_TEST_DSN's server when set, else a new private one."""
        url = os.environ.get("PGVEIL_TEST_DSN")
        if url:
            return cls.external(url)
        return cls.create()

    # ----------------------------------------------------------------- connection strings

    @property
    def admin_user(self) -> str:
        """The superuser the harness administers with ("postgres" for its own clusters)."""
        return self._admin_user

    def dsn(self, login: str = "postgres", db: str = "bank", port: int | None = None) -> str:
        """A libpq URL for ``login`` over TCP with its password (``pw_<login>``).

        ``port`` points the same credentials at another listener (pgveil, PgBouncer).
        """
        password = self._admin_password if login == self._admin_user else password_for(login)
        host = self.host if port is None else _HOST
        return (
            f"postgresql://{quote(login, safe='')}:{quote(password, safe='')}"
            f"@{host}:{port or self.port}/{quote(db, safe='')}"
        )

    def _conninfo(self, login: str, db: str) -> str:
        """What psql connects with: the private socket for postgres (trust), else TCP."""
        if self.owned and login == "postgres" and self.socket_dir is not None:
            return f"host={self.socket_dir} port={self.port} user=postgres dbname={db}"
        if not self.owned and login in (self._admin_user, "postgres") and self._admin_url:
            # On an external server "postgres" (psql's default) means its admin URL's superuser.
            parts = urlsplit(self._admin_url)
            return parts._replace(path="/" + quote(db, safe="")).geturl()
        return self.dsn(login, db)

    # ----------------------------------------------------------------- psql

    def psql(self, sql: str, db: str = "bank", login: str = "postgres") -> str:
        """Run SQL (psql meta-commands allowed) and return unaligned, tuples-only output.

        Raises PsqlError on any error (ON_ERROR_STOP). Example: ``pg.psql("select 1")`` -> "1\\n".
        """
        return self._run_psql(["-f", "-"], db=db, login=login, stdin=sql)

    def psql_file(
        self,
        path: Path,
        db: str = "bank",
        login: str = "postgres",
        variables: Mapping[str, str] | None = None,
    ) -> str:
        """Run a SQL file with psql ``-v`` variables (how bank.sql takes ``scale``)."""
        args: list[str] = []
        for key, value in (variables or {}).items():
            args += ["-v", f"{key}={value}"]
        return self._run_psql([*args, "-f", str(path)], db=db, login=login, stdin=None)

    def _run_psql(self, args: Sequence[str], *, db: str, login: str, stdin: str | None) -> str:
        cmd = [
            client_binary(self.bin_dir, "psql"),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            self._conninfo(login, db),
            *args,
        ]
        proc = subprocess.run(
            cmd,
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=600,
            check=False,
        )
        if proc.returncode != 0:
            raise PsqlError(proc.returncode, proc.stderr, stdin or " ".join(args))
        return proc.stdout

    # ----------------------------------------------------------------- provisioning

    def provision(self, scale: int = DEFAULT_SCALE) -> None:
        """Create the test logins and the ``bank`` database, each only if missing.

        On a private server everything is new; on an external one an existing ``bank`` with a
        ``customers`` table is left as it is (bank.sql drops and recreates its tables).
        """
        statements = []
        for login in LOGINS:
            attrs = "LOGIN SUPERUSER" if login in SUPERUSER_LOGINS else "LOGIN"
            pw = password_for(login)
            statements.append(
                f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{login}') THEN "
                f"CREATE ROLE {login} {attrs} PASSWORD '{pw}'; END IF;"
            )
        self.psql(
            "SET password_encryption = 'scram-sha-256';\n"
            "DO $$ BEGIN\n" + "\n".join(statements) + "\nEND $$;",
            db="postgres",
        )
        have_bank = self.psql("SELECT 1 FROM pg_database WHERE datname = 'bank'", db="postgres")
        if not have_bank.strip():
            self.psql("CREATE DATABASE bank", db="postgres")
        have_customers = self.psql("SELECT to_regclass('public.customers') IS NOT NULL", db="bank")
        if have_customers.strip() != "t":
            self.psql_file(BANK_SQL, db="bank", variables={"scale": str(scale)})
            self.psql("ANALYZE", db="bank")
        self.psql(
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;\n"
            "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO PUBLIC;",
            db="bank",
        )

    def _set_postgres_password(self) -> None:
        """Give the bootstrap superuser a password too, so ``dsn('postgres')`` works over TCP."""
        self.psql(
            "SET password_encryption = 'scram-sha-256';\n"
            f"ALTER ROLE postgres PASSWORD '{password_for('postgres')}';",
            db="postgres",
        )

    # ----------------------------------------------------------------- server lifecycle

    def _require_owned(self, what: str) -> tuple[Path, Path, Path, Path]:
        if (
            not self.owned
            or self.base_dir is None
            or self.data_dir is None
            or self.socket_dir is None
            or self.log_path is None
        ):
            raise ClusterError(f"{what} needs a server started by the harness, not PGVEIL_TEST_DSN")
        return self.base_dir, self.data_dir, self.socket_dir, self.log_path

    def _server_cmd(self, name: str) -> str:
        if self.bin_dir is None:
            raise ClusterError(f"{name}: no server binaries")
        return str(self.bin_dir / name)

    def _run_server_tool(
        self, cmd: Sequence[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        base, *_ = self._require_owned(cmd[0])
        return subprocess.run(  # type: ignore[call-overload,no-any-return]
            list(cmd),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=base,
            env=clean_env(),
            timeout=timeout,
            check=False,
            **self._run_as.popen_kwargs(),
        )

    def _initdb(self) -> None:
        base, data, sock, _log = self._require_owned("initdb")
        sock.mkdir(mode=0o700)
        self._run_as.own(sock)
        proc = self._run_server_tool(
            [
                self._server_cmd("initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ],
            timeout=300,
        )
        if proc.returncode != 0:
            raise ClusterError(f"initdb failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
        conf = data / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as fh:
            fh.write("\n# added by pgveil (proxy/localpg.py)\ninclude_if_exists = 'harness.conf'\n")

    def _write_settings(self) -> None:
        """harness.conf: the settings of this run (port may change between attempts)."""
        _base, data, sock, _log = self._require_owned("settings")
        settings = {
            "port": str(self.port),
            "listen_addresses": f"'{_HOST}'",
            "unix_socket_directories": f"'{sock}'",
            "max_connections": "400",
            "password_encryption": "'scram-sha-256'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        settings.update(self._extra_settings)
        path = data / "harness.conf"
        path.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()), encoding="utf-8")
        self._run_as.own(path)

    def start(self) -> None:
        """Start the server, on its previous port if it had one, else on a fresh free port.

        A port taken between the check and the bind (another engineer's test run, say) makes the
        postmaster exit with "could not bind"; a first start then tries another free port, a
        restart retries its own port (clients and pgveil's config point at it).
        """
        _base, data, _sock, log = self._require_owned("start")
        if self.state is ClusterState.RUNNING:
            return
        keep_port = self.port != 0
        last_error = ""
        tried: set[int] = set()
        for attempt in range(_START_ATTEMPTS):
            if not keep_port:
                # A restart keeps its port (pgveil's upstream config points at it); only a
                # first start moves on to another free port after a collision.
                self.port = pick_free_port(exclude=tried)
            tried.add(self.port)
            self._write_settings()
            log_offset = log.stat().st_size if log.exists() else 0
            proc = self._run_server_tool(
                [
                    self._server_cmd("pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-w",
                    "-t",
                    "120",
                    "start",
                ],
                timeout=180,
            )
            if proc.returncode == 0:
                self.state = ClusterState.RUNNING
                if not self._atexit_registered:
                    atexit.register(self._atexit_stop)
                    self._atexit_registered = True
                return
            new_log = _read_from(log, log_offset)
            last_error = f"{proc.stderr}{proc.stdout}\n--- postgres.log ---\n{new_log}"
            self._kill_leftover_postmaster()
            if not any(marker in new_log for marker in _BIND_ERRORS):
                break
            time.sleep(0.2 * (attempt + 1))
        raise ClusterError(f"PostgreSQL did not start: {last_error}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (pg_ctl stop -m MODE), then make sure the postmaster is gone."""
        _base, data, _sock, _log = self._require_owned("stop")
        if self.state is ClusterState.STOPPED:
            return
        proc = self._run_server_tool(
            [self._server_cmd("pg_ctl"), "-D", str(data), "-m", mode, "-w", "-t", "60", "stop"],
            timeout=90,
        )
        if proc.returncode != 0:
            self._kill_leftover_postmaster()
        self.state = ClusterState.STOPPED

    def restart(self, mode: str = "immediate") -> None:
        """Stop (``immediate`` = crash-like, no checkpoint) and start again on the same port."""
        self.stop(mode=mode)
        self.start()

    def postmaster_pid(self) -> int | None:
        """The running postmaster's pid from postmaster.pid, or None.

        A stale pid file (after a crash) may name a pid the OS has since reused: the pid only
        counts when that process's command line names this cluster's data directory.
        """
        if self.data_dir is None:
            return None
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text(encoding="utf-8").splitlines()[0].strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        return pid if os.fsencode(str(self.data_dir)) in cmdline else None

    def _kill_leftover_postmaster(self) -> None:
        """Last resort after a failed pg_ctl: SIGQUIT, then SIGKILL, the postmaster by pid."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        for sig, wait in ((signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not _pid_alive(pid):
                    return
                time.sleep(0.05)

    def log_text(self) -> str:
        """The server log so far ('' for an external server)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def cleanup(self) -> None:
        """Stop an owned server and delete its temp dir; an external server is left alone."""
        if self._cleaned:
            return
        self._cleaned = True
        if not self.owned:
            return
        try:
            if self.state is ClusterState.RUNNING or self.postmaster_pid() is not None:
                self.state = ClusterState.RUNNING
                self.stop(mode="fast")
        finally:
            if self.base_dir is not None:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def _atexit_stop(self) -> None:
        with contextlib.suppress(Exception):
            self.cleanup()

    def __enter__(self) -> PostgresCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        kind = "owned" if self.owned else "external"
        return f"<PostgresCluster {kind} {self.host}:{self.port} {self.state.value}>"


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True
