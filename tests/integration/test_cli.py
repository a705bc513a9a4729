"""The ``pgveil`` command line as a DBA uses it (SPEC §2): ``check``, ``explain``, ``keygen``,
``--version`` and every ``--help``, against the session's PostgreSQL.

Why live: ``check`` and ``explain`` read the real catalog through the control DSN, and exit codes
and ``file:line:`` messages are what scripts and editors rely on, so they are run as the real
console script (``pgveil``) or ``python -m proxy`` in a subprocess. Help texts, which need no
database, are rendered in-process through the same entry point to keep the file fast.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.localpg import PostgresCluster, clean_env, pick_free_port
from tests.harness.pgveil_proc import DEFAULT_POLICY

SCRIPT = Path(sys.executable).parent / "pgveil"


def pgveil(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The installed console script (what a DBA types), with no PGVEIL_* from our env."""
    cmd = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "proxy"]
    env = {k: v for k, v in clean_env().items() if not k.startswith("PGVEIL_")}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def write_config(directory: Path, dsn: str, policy: Path = DEFAULT_POLICY,
                 extra: dict[str, Any] | None = None) -> Path:
    config = {"listen": {"host": "127.0.0.1", "port": 6432},
              "upstream": {"host": "127.0.0.1", "port": 5432, "tls": "disable"},
              "control": {"dsn": dsn}, "policy": str(policy), **(extra or {})}
    path = directory / "pgveil.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def config(pg: PostgresCluster, tmp_path: Path) -> Path:
    """A config whose control DSN reaches the bank database as the DBA."""
    return write_config(tmp_path, pg.dsn("dba", db="bank"))


def line_of(text: str, needle: str) -> int:
    """1-based line number of the first line containing ``needle``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in text")


# --------------------------------------------------------------------------- version, help


def test_version() -> None:
    r = pgveil("--version")
    assert r.returncode == 0
    assert re.fullmatch(r"pgveil \d+\.\d+\S*\n", r.stdout), r.stdout
    m = subprocess.run([sys.executable, "-m", "proxy", "--version"], capture_output=True,
                       text=True, timeout=60, env=clean_env())
    assert m.returncode == 0 and m.stdout == r.stdout


def test_top_level_help_lists_every_command() -> None:
    r = pgveil("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: pgveil")
    for command in ("serve", "demo", "check", "explain", "discover", "grant", "audit",
                    "keygen"):
        assert re.search(rf"^\s+{command}\s", r.stdout, re.MULTILINE), command


def test_no_command_prints_help_and_exits_2() -> None:
    r = pgveil()
    assert r.returncode == 2 and "usage: pgveil" in r.stdout + r.stderr


@pytest.mark.parametrize("command", [
    ["serve"], ["demo"], ["check"], ["explain"], ["discover"], ["keygen"],
    ["grant"], ["grant", "create"], ["grant", "list"], ["grant", "revoke"],
    ["audit"], ["audit", "verify"], ["audit", "search"],
])
def test_every_subcommand_has_help(command: list[str],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli import main

    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pgveil {' '.join(command)}"), out[:200]
    assert "-h, --help" in out
    # more than the bare usage: a description of what it does and its options
    assert len(out.splitlines()) >= 5


def test_help_options_that_the_spec_names(capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli import main

    expected = {("serve",): ["-c"], ("check",): ["-c"], ("explain",): ["-c", "--as"],
                ("discover",): ["--dsn"], ("keygen",): ["--out"],
                ("audit", "verify"): ["--key"], ("audit", "search"): ["--login", "--since"],
                ("grant", "create"): ["--login", "--lift", "--expires", "--reason",
                                      "--approver"]}
    for command, options in expected.items():
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        out = capsys.readouterr().out
        for option in options:
            assert option in out, (command, option)


# --------------------------------------------------------------------------- check


def test_check_ok_with_the_database(config: Path) -> None:
    r = pgveil("check", "-c", str(config))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok" in r.stdout
    assert "error" not in (r.stdout + r.stderr).lower()


def test_check_offline(tmp_path: Path) -> None:
    # a control DSN that nothing listens on: --offline must not even try
    path = write_config(tmp_path, f"postgresql://dba:x@127.0.0.1:{pick_free_port()}/bank")
    r = pgveil("check", "-c", str(path), "--offline")
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_unreachable_database_exits_3(tmp_path: Path) -> None:
    path = write_config(tmp_path, f"postgresql://dba:x@127.0.0.1:{pick_free_port()}/bank")
    r = pgveil("check", "-c", str(path))
    assert r.returncode == 3, r.stdout + r.stderr


@pytest.mark.parametrize(("needle", "replacement"), [
    ("max_rows: 50", "max_rows: lots"),  # a bad value
    ("clearance: 2", "clearance: 2\n    clearence: 3"),  # an unknown key (typo)
    ("copy: deny", "copy: [deny"),  # broken YAML
    ("mask: phone", "mask: no_such_mask"),  # an unknown mask
])
def test_check_broken_policy_reports_file_and_line(tmp_path: Path, needle: str,
                                                   replacement: str) -> None:
    good = DEFAULT_POLICY.read_text(encoding="utf-8")
    broken = good.replace(needle, replacement, 1)
    assert broken != good
    policy = tmp_path / "broken-policy.yaml"
    policy.write_text(broken, encoding="utf-8")
    cfg = write_config(tmp_path, "postgresql://unused@127.0.0.1:1/x", policy)
    r = pgveil("check", "-c", str(cfg), "--offline")
    assert r.returncode == 1, r.stdout + r.stderr
    line = line_of(broken, replacement.splitlines()[-1].strip())
    out = r.stdout + r.stderr
    found = re.findall(r"broken-policy\.yaml:(\d+):", out)
    assert found, out
    # the reported line is the offending one (a YAML syntax error may be reported on the next)
    assert any(int(n) in (line, line + 1) for n in found), (line, out)


def test_check_broken_config_reports_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "pgveil.yaml"
    path.write_text("listen:\n  host: 127.0.0.1\n  prot: 6432\n"
                    f"policy: {DEFAULT_POLICY}\n", encoding="utf-8")
    r = pgveil("check", "-c", str(path), "--offline")
    assert r.returncode == 1
    assert re.search(r"pgveil\.yaml:3: .*prot", r.stdout + r.stderr), r.stdout + r.stderr


def test_check_missing_protected_table_exits_1(pg: PostgresCluster, tmp_path: Path) -> None:
    policy = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    policy["protected"]["public.no_such_table"] = {
        "columns": {"phone": {"level": 1, "mask": "phone"}}}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, allow_unicode=True, sort_keys=False),
                    encoding="utf-8")
    cfg = write_config(tmp_path, pg.dsn("dba", db="bank"), path)
    r = pgveil("check", "-c", str(cfg))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no_such_table" in r.stdout + r.stderr


def test_check_missing_protected_column_exits_1(pg: PostgresCluster, tmp_path: Path) -> None:
    policy = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    policy["protected"]["public.customers"]["columns"]["passport"] = {"level": 1,
                                                                      "mask": "redact"}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, allow_unicode=True, sort_keys=False),
                    encoding="utf-8")
    cfg = write_config(tmp_path, pg.dsn("dba", db="bank"), path)
    r = pgveil("check", "-c", str(cfg))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "passport" in r.stdout + r.stderr


def test_check_warns_about_unclassified_sensitive_columns(pg: PostgresCluster,
                                                          tmp_path: Path) -> None:
    policy = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    del policy["protected"]["public.customers"]["columns"]["email"]
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, allow_unicode=True, sort_keys=False),
                    encoding="utf-8")
    cfg = write_config(tmp_path, pg.dsn("dba", db="bank"), path)
    r = pgveil("check", "-c", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr  # a warning, not an error
    warnings = [ln for ln in (r.stdout + r.stderr).splitlines() if "warning" in ln.lower()]
    assert any("email" in ln for ln in warnings), r.stdout + r.stderr


def test_check_names_triggers_on_a_protected_table(pg: PostgresCluster, tmp_path: Path) -> None:
    """A trigger on a protected table sees its raw rows: masked roles may not write the table
    until the policy lists the trigger's function, and ``check`` says which ones to read."""
    import psycopg

    setup = """
        CREATE TABLE public.cli_hooked (id int, phone text);
        CREATE FUNCTION public.cli_hook_fn() RETURNS trigger LANGUAGE plpgsql
            AS $$ BEGIN RAISE NOTICE 'changed %', new.phone; RETURN new; END $$;
        CREATE TRIGGER cli_hook AFTER UPDATE ON public.cli_hooked
            FOR EACH ROW EXECUTE FUNCTION public.cli_hook_fn();
    """
    teardown = ("DROP TABLE IF EXISTS public.cli_hooked; "
                "DROP FUNCTION IF EXISTS public.cli_hook_fn()")
    policy = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    policy["protected"]["public.cli_hooked"] = {
        "columns": {"phone": {"level": 1, "mask": "phone"}}}
    path = tmp_path / "policy.yaml"
    with psycopg.connect(pg.dsn("dba", db="bank"), autocommit=True) as conn:
        conn.execute(teardown)
        conn.execute(setup)
    try:
        path.write_text(yaml.safe_dump(policy, allow_unicode=True, sort_keys=False),
                        encoding="utf-8")
        r = pgveil("check", "-c", str(write_config(tmp_path, pg.dsn("dba", db="bank"), path)))
        assert r.returncode == 0, r.stdout + r.stderr  # a warning, not an error
        warnings = [ln for ln in r.stdout.splitlines() if ln.startswith("warning: writing")]
        assert warnings == [
            "warning: writing public.cli_hooked runs public.cli_hook_fn (triggers' functions "
            "and rules) on raw rows: masked roles may not INSERT/UPDATE/DELETE it until the "
            "policy lists them in allow_dependents (for a role or for all)"], r.stdout
        policy["allow_dependents"] = [*policy.get("allow_dependents", []), "public.cli_hook_fn"]
        path.write_text(yaml.safe_dump(policy, allow_unicode=True, sort_keys=False),
                        encoding="utf-8")
        r = pgveil("check", "-c", str(write_config(tmp_path, pg.dsn("dba", db="bank"), path)))
        assert r.returncode == 0 and "warning: writing" not in r.stdout, r.stdout + r.stderr
    finally:
        with psycopg.connect(pg.dsn("dba", db="bank"), autocommit=True) as conn:
            conn.execute(teardown)


# --------------------------------------------------------------------------- explain


def _explain(config: Path, login: str, sql: str) -> subprocess.CompletedProcess[str]:
    return pgveil("explain", "-c", str(config), "--as", login, sql)


def test_explain_teller_lookup(config: Path) -> None:
    r = _explain(config, "teller_sz01", "select phone from customers where id = 3")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "teller" in out  # the role
    assert "rewrite" in out.lower()  # the decision
    assert "public.customers" in out  # the table
    assert "public.customers.phone" in out or "phone" in out  # the column
    # the rewritten SQL: the statement reads a masked, row-filtered subquery instead
    m = re.search(r"select\s+phone\s+from\s*\(\s*select", out, re.IGNORECASE)
    assert m, out
    rewritten = out[m.start():]
    assert re.search(r"branch_id\s*=\s*'SZ01'", rewritten), rewritten
    assert "'*'" in rewritten or "****" in rewritten  # the phone mask


def test_explain_dba_is_allowed_unchanged(config: Path) -> None:
    r = _explain(config, "dba", "select phone from customers where id = 3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dba" in r.stdout and "allow" in r.stdout.lower()
    assert "SZ01" not in r.stdout


def test_explain_blocked_copy_says_why(config: Path) -> None:
    r = _explain(config, "teller_sz01", "copy customers to stdout")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.lower()
    assert "block" in out or "deny" in out
    assert "copy" in out


def test_explain_unmatched_login_gets_default(config: Path) -> None:
    r = _explain(config, "somebody_new", "select phone from customers where id = 3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "default" in r.stdout


def test_explain_without_default_role_says_refused(pg: PostgresCluster, tmp_path: Path) -> None:
    policy = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    del policy["roles"]["default"]
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, allow_unicode=True, sort_keys=False),
                    encoding="utf-8")
    cfg = write_config(tmp_path, pg.dsn("dba", db="bank"), path)
    r = _explain(cfg, "somebody_new", "select 1")
    assert r.returncode == 1
    assert "refused" in (r.stdout + r.stderr).lower()


# --------------------------------------------------------------------------- keygen


def test_keygen_creates_a_working_key_pair(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    r = pgveil("keygen", "--out", str(out))
    assert r.returncode == 0, r.stderr
    key, pub = out / "audit.key", out / "audit.pub"
    assert key.is_file() and pub.is_file()
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert key.read_bytes() != pub.read_bytes()
    from proxy.keys import load_private_key, load_public_key

    message = b"pgveil-test"
    load_public_key(pub).verify(load_private_key(key).sign(message), message)
    # an existing pair is never overwritten by accident
    before = key.read_bytes()
    again = pgveil("keygen", "--out", str(out))
    assert again.returncode == 1 and key.read_bytes() == before
    assert "exist" in again.stderr.lower()
    forced = pgveil("keygen", "--out", str(out), "--force")
    assert forced.returncode == 0 and key.read_bytes() != before


def test_serve_refuses_a_port_another_pgveil_listens_on(request: pytest.FixtureRequest,
                                                        tmp_path: Path) -> None:
    """Workers share the port with SO_REUSEPORT; a second pgveil must not share it too: both
    would write one audit chain (host-port-wN), which would never verify again."""
    running = request.getfixturevalue("pgveil")
    config = yaml.safe_load(running.config_path.read_text(encoding="utf-8"))
    config["metrics"] = {"host": "127.0.0.1", "port": pick_free_port()}
    config["audit"] = {**config.get("audit", {}), "file": str(tmp_path / "audit.jsonl")}
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    r = pgveil("serve", "-c", str(path), timeout=30)
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"cannot listen on 127.0.0.1:{running.port}" in r.stderr
    assert "another pgveil" in r.stderr
