"""pgveil.yaml: the proxy's own settings (SPEC §3), loaded, validated and overridable by env.

Flow: ``load_config(path)`` reads YAML → applies ``PGVEIL_*`` environment overrides → validates
with pydantic (unknown keys rejected) → returns a frozen :class:`Config`. Errors raise
:class:`ConfigError` whose lines read ``file:line: key.path: message`` so a DBA can jump to the
spot. Relative paths in the file (policy, certificates, audit file, keys) are resolved against
the directory of the config file, so ``pgveil serve -c /etc/pgveil/pgveil.yaml`` works from any
working directory.

Environment overrides follow 12-factor: ``PGVEIL_UPSTREAM_HOST=db1`` sets ``upstream.host``;
``PGVEIL_LISTEN_PORT=6432`` sets ``listen.port``; values are parsed as YAML scalars (so ``6432``
is an int and ``true`` a bool). ``PGVEIL_CONTROL_PASSWORD`` is the control connection's password
and never appears in the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_ENV_PREFIX = "PGVEIL_"
# env vars with this prefix that are not config paths
_ENV_NOT_CONFIG = {"PGVEIL_CONTROL_PASSWORD", "PGVEIL_HASH_KEY", "PGVEIL_TEST_DSN", "PGVEIL_CONFIG",
                   "PGVEIL_BUILD_PURE"}


class ConfigError(Exception):
    """Invalid pgveil.yaml; ``errors`` holds ``file:line: key: message`` strings."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(6432, ge=0, le=65535)
    max_connections: int = Field(1000, ge=1)
    idle_timeout: float = Field(0, ge=0, description="seconds; 0 = never close idle clients")
    # like PostgreSQL's authentication_timeout: a client that has not finished its startup
    # (startup packet, TLS, authentication) by then is closed, so idle or slow sockets cannot
    # hold max_connections
    startup_timeout: float = Field(60.0, gt=0, description="seconds to complete the startup")
    backlog: int = 1024


class TlsConfig(_Strict):
    cert: Path | None = None
    key: Path | None = None
    mode: Literal["disable", "prefer", "require"] = "prefer"


class UpstreamConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(5432, ge=1, le=65535)
    tls: Literal["disable", "prefer", "require", "verify-ca", "verify-full"] = "prefer"
    ca: Path | None = None
    connect_timeout: float = 10.0
    # Run a rewritten SELECT that a client repeats with new literals (simple Query protocol)
    # as a statement pgveil prepares on that connection once, with the literals as typed
    # parameters: PostgreSQL then skips parsing and planning the larger rewritten text.
    prepare_rewritten: bool = True


class AuthConfig(_Strict):
    mode: Literal["passthrough", "scram", "userlist"] = "passthrough"
    userlist: Path | None = None
    auth_query: str = (
        "SELECT rolname, rolpassword FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin"
    )


class ControlConfig(_Strict):
    dsn: str | None = None


class MetricsConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(9187, ge=0, le=65535)
    enabled: bool = True


class AuditPostgresConfig(_Strict):
    dsn: str
    table: str = "pgveil.audit"


class AuditConfig(_Strict):
    file: Path | None = None
    postgres: AuditPostgresConfig | None = None
    signing_key: Path | None = None
    durability: Literal["strict", "batch"] = "strict"
    fsync: bool = False  # strict: also wait for the disk before releasing a result
    on_failure: Literal["block", "allow"] = "block"
    redact_literals: bool = True
    all: bool = False
    checkpoint_every: int = Field(1000, ge=1)
    checkpoint_seconds: float = Field(10.0, gt=0)
    rotate_bytes: int = Field(100 * 1024 * 1024, ge=1024)
    keep_files: int = Field(0, ge=0)


class Config(_Strict):
    listen: ListenConfig = ListenConfig()
    tls: TlsConfig | None = None
    upstream: UpstreamConfig = UpstreamConfig()
    auth: AuthConfig = AuthConfig()
    control: ControlConfig = ControlConfig()
    workers: int = Field(1, ge=0)
    metrics: MetricsConfig = MetricsConfig()
    audit: AuditConfig = AuditConfig()
    policy: Path = Path("policy.yaml")
    catalog_refresh_seconds: float = Field(300.0, gt=0)
    catalog_poll_seconds: float = Field(1.0, gt=0)
    # how often the policy file is checked for a change; 0: only SIGHUP reloads it
    policy_watch_seconds: float = Field(1.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    source: Path | None = Field(None, exclude=True)

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int) -> int:
        return v if v > 0 else (os.cpu_count() or 1)

    @property
    def control_password(self) -> str | None:
        return os.environ.get("PGVEIL_CONTROL_PASSWORD")


def _line_of(node: yaml.Node | None, path: tuple[Any, ...]) -> int | None:
    """Walk a composed YAML node tree along ``path`` and return the 1-based line of the key."""
    line = None
    for key in path:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if k.value == str(key):
                line, node = k.start_mark.line + 1, v
                break
        else:
            break
    return line


_SECTIONS = ("listen", "tls", "upstream", "auth", "control", "metrics", "audit")


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> None:
    """Apply ``PGVEIL_SECTION_KEY=value`` overrides (``PGVEIL_LISTEN_MAX_CONNECTIONS=50``).

    The first word names a section when it is one (listen, upstream, …), else the whole rest is a
    top-level key (``PGVEIL_WORKERS=4``). Unknown names fail validation like unknown file keys.
    """
    for name, raw in sorted(environ.items()):
        if not name.startswith(_ENV_PREFIX) or name in _ENV_NOT_CONFIG:
            continue
        key = name[len(_ENV_PREFIX):].lower()
        value = yaml.safe_load(raw) if raw != "" else ""
        section, _, rest = key.partition("_")
        if section in _SECTIONS and rest:
            current = data.get(section)
            if not isinstance(current, dict):
                current = {}
                data[section] = current
            current[rest] = value
        else:
            data[key] = value


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def fix(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else base / p)

    tls = cfg.tls and cfg.tls.model_copy(update={"cert": fix(cfg.tls.cert), "key": fix(cfg.tls.key)})
    audit = cfg.audit.model_copy(
        update={"file": fix(cfg.audit.file), "signing_key": fix(cfg.audit.signing_key)}
    )
    upstream = cfg.upstream.model_copy(update={"ca": fix(cfg.upstream.ca)})
    auth = cfg.auth.model_copy(update={"userlist": fix(cfg.auth.userlist)})
    return cfg.model_copy(
        update={"tls": tls, "audit": audit, "upstream": upstream, "auth": auth,
                "policy": fix(cfg.policy)}
    )


def parse_config(text: str, filename: str = "pgveil.yaml",
                 environ: dict[str, str] | None = None) -> Config:
    """Parse and validate config text; see module docstring."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise ConfigError([f"{filename}:{line}: invalid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{filename}:1: the top level must be a mapping of settings"])
    _apply_env(data, dict(os.environ) if environ is None else environ)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = _line_of(node, loc) or 1
            key = ".".join(str(p) for p in loc) or "(top)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            errors.append(f"{filename}:{line}: {key}: {msg}")
        raise ConfigError(errors) from None
    # abspath, not resolve(): a Kubernetes ConfigMap mounts files through symlinks into a
    # timestamped directory that is replaced on update; resolving would pin the old one
    source = Path(os.path.abspath(filename))
    return _resolve_paths(cfg, source.parent).model_copy(update={"source": source})


def load_config(path: str | Path, environ: dict[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}:0: cannot read config: {exc.strerror}"]) from None
    return parse_config(text, str(p), environ)
