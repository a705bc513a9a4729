"""pgveil.yaml loading: validation with file:line errors, env overrides, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config, parse_config

GOOD = """\
listen: {host: 127.0.0.1, port: 7000}
upstream:
  host: db1
  port: 5433
  tls: require
audit:
  file: audit/log.jsonl
  signing_key: keys/audit.key
policy: policy.yaml
"""


def test_reference_config_loads() -> None:
    cfg = load_config(Path(__file__).parents[2] / "config" / "pgveil.yaml", environ={})
    assert cfg.listen.port == 6432 and cfg.auth.mode == "passthrough"
    assert cfg.policy.name == "policy.yaml" and cfg.policy.is_absolute()


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "pgveil.yaml"
    path.parent.mkdir()
    path.write_text(GOOD)
    cfg = load_config(path, environ={})
    assert cfg.policy == tmp_path / "etc" / "policy.yaml"
    assert cfg.audit.file == tmp_path / "etc" / "audit" / "log.jsonl"
    assert cfg.upstream.host == "db1" and cfg.upstream.tls == "require"


def test_unknown_key_is_named_with_its_line() -> None:
    text = GOOD + "upstream_typo: 1\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "pgveil.yaml", environ={})
    assert err.value.errors == ["pgveil.yaml:10: upstream_typo: unknown key"]


def test_nested_bad_value_is_named_with_its_line() -> None:
    text = GOOD.replace("tls: require", "tls: sometimes")
    with pytest.raises(ConfigError) as err:
        parse_config(text, "cfg.yaml", environ={})
    (line,) = err.value.errors
    assert line.startswith("cfg.yaml:5: upstream.tls:")


def test_invalid_yaml_reports_line() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("listen: {host: [\n", "bad.yaml", environ={})
    assert err.value.errors[0].startswith("bad.yaml:")


def test_env_overrides_sections_and_top_level_keys() -> None:
    env = {"PGVEIL_UPSTREAM_HOST": "db2", "PGVEIL_LISTEN_MAX_CONNECTIONS": "50",
           "PGVEIL_WORKERS": "3", "PGVEIL_AUDIT_ON_FAILURE": "allow",
           "PGVEIL_CONTROL_PASSWORD": "not-a-setting"}
    cfg = parse_config(GOOD, "/etc/pgveil/pgveil.yaml", environ=env)
    assert cfg.upstream.host == "db2" and cfg.upstream.port == 5433
    assert cfg.listen.max_connections == 50 and cfg.workers == 3
    assert cfg.audit.on_failure == "allow"


def test_env_override_with_unknown_name_fails_validation() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD, "pgveil.yaml", environ={"PGVEIL_LISTEN_PROT": "1"})
    assert "listen.prot: unknown key" in err.value.errors[0]


def test_workers_zero_means_one_per_core() -> None:
    cfg = parse_config("workers: 0\n", "pgveil.yaml", environ={})
    assert cfg.workers >= 1


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml")
    assert "cannot read config" in err.value.errors[0]
