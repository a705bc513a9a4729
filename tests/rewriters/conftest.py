"""Fixtures for the rewriters tests.

``pg_dsn``: a superuser libpq URL of a PostgreSQL holding the ``bank`` database, for the tests
that evaluate generated SQL for real. ``PGVEIL_TEST_DSN`` when set (e.g. a dev server), else the
session cluster from ``tests/conftest.py``.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def pg_dsn(request: pytest.FixtureRequest) -> str:
    dsn = os.environ.get("PGVEIL_TEST_DSN")
    if dsn:
        return dsn
    pg = request.getfixturevalue("pg")
    return str(pg.dsn(login="postgres", db="bank"))
