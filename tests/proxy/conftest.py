"""Fixtures for the proxy tests that need a database but not a running pgveil.

``pg_dsn`` is the superuser ``dba`` login on the ``bank`` database of the session's PostgreSQL
(the ``pg`` fixture of tests/conftest.py, which itself honours ``PGVEIL_TEST_DSN``). Depending on
``pg`` marks the test ``live`` automatically.
"""

from __future__ import annotations

import pytest

from proxy.localpg import PostgresCluster


@pytest.fixture(scope="session")
def pg_dsn(pg: PostgresCluster) -> str:
    """A libpq URL for ``dba`` (superuser, password ``pw_dba``) on the ``bank`` database."""
    return pg.dsn("dba", "bank")
