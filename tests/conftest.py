"""Session fixtures for the live tests: the throwaway PostgreSQL and pgveil processes.

Fixtures (all lazy: a pure unit-test run never starts a server):

* ``pg`` (session) — proxy.localpg.PostgresCluster: a private PostgreSQL with the test
  logins (password ``pw_<login>``) and the ``bank`` database, or the server named by
  ``PGVEIL_TEST_DSN``. ``pg.dsn(login, db)``, ``pg.psql(sql)``, ``pg.restart()``.
* ``pgveil`` (session) — one ``pgveil serve`` with the default test config in front of ``pg``.
  Shared by many tests: do not stop or reconfigure it; use ``pgveil_factory`` for that.
* ``pgveil_factory`` (function) — ``pgveil_factory(config_overrides=None, policy_path=None,
  env=None, start=True) -> PgveilProcess``; everything it made is stopped after the test.

Tests that use any of them are marked ``live`` automatically (``pytest -m "not live"`` runs the
pure tests only).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from proxy.localpg import PostgresCluster, password_for
from tests.harness.pgveil_proc import PgveilProcess

_LIVE_FIXTURES = frozenset({"pg", "pgveil", "pgveil_factory"})

PgveilFactory = Callable[..., PgveilProcess]


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresCluster]:
    """The session's PostgreSQL; stopped and deleted at the end of the session."""
    cluster = PostgresCluster.for_tests()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def pgveil(pg: PostgresCluster) -> Iterator[PgveilProcess]:
    """One pgveil with the default test config (passthrough auth, strict audit)."""
    with PgveilProcess(pg) as proc:
        yield proc


@pytest.fixture
def pgveil_factory(pg: PostgresCluster) -> Iterator[PgveilFactory]:
    """Make pgveil processes with their own config; all are stopped after the test."""
    made: list[PgveilProcess] = []

    def make(
        config_overrides: Mapping[str, Any] | None = None,
        policy_path: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        start: bool = True,
    ) -> PgveilProcess:
        proc = PgveilProcess(pg, config_overrides, policy_path=policy_path, env=env)
        made.append(proc)
        return proc.start() if start else proc

    try:
        yield make
    finally:
        for proc in reversed(made):
            proc.cleanup()


@pytest.fixture
def logins(pg: PostgresCluster) -> Iterator[Callable[[str], str]]:
    """``make("sz")`` → a new login matching ``teller_sz*``; all dropped after the test."""
    made: list[str] = []

    def make(branch: str = "sz") -> str:
        login = f"teller_{branch}_{uuid.uuid4().hex[:10]}"
        pg.psql(f"create role {login} login password '{password_for(login)}'", db="postgres")
        made.append(login)
        return login

    try:
        yield make
    finally:
        for login in made:
            pg.psql(f"drop role if exists {login}", db="postgres")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs a live server with ``live``."""
    for item in items:
        if _LIVE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.live)
