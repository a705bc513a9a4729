"""pgveil's record of the client's prepared statements stays what the server really holds.

Why: a Bind of a statement pgveil does not know runs as pass-through (no row cap, no audit
record), so pgveil must never believe a protected statement is gone (or replaced by a harmless
one) while the server still has it. PostgreSQL skips every message after an error until Sync,
a failed Parse creates nothing, and a named Parse of an existing name fails: pgveil settles
each Parse and Close only when the server answers it (ParseComplete / CloseComplete), and takes
back at ReadyForQuery what the server skipped.

Each test speaks the extended protocol over the socket of an authenticated psycopg connection,
in batches of its own making, and then runs the statement: a teller of SZ01 (max_rows 50)
reading all 666 of the branch's customers must be stopped by the row cap.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.wire import SYNC, Wire, bind, close_statement, execute, open_wire, parse

MANY = b"select id from customers where level >= $1"  # 666 rows of SZ01 for $1 = 1


@pytest.fixture
def wire(pgveil, logins) -> Iterator[Wire]:  # noqa: F811 - the fixture imported above
    # a teller of SZ01 of its own: capped reads count against the per-login quota
    with open_wire(pgveil.dsn(logins("sz"))) as w:
        yield w


def test_close_skipped_after_an_error_keeps_the_statement(wire: Wire) -> None:
    assert wire.batch(parse(b"s1", MANY), SYNC).types == ["1", "Z"]
    skipped = wire.batch(bind(b"no_such_statement"), close_statement(b"s1"), SYNC)
    assert skipped.sqlstates == ["26000"] and "3" not in skipped.types  # Close skipped
    wire.capped(b"s1")


def test_unnamed_parse_skipped_after_an_error_keeps_the_old_one(wire: Wire) -> None:
    assert wire.batch(parse(b"", MANY), SYNC).types == ["1", "Z"]
    skipped = wire.batch(bind(b"no_such_statement"), parse(b"", b"select 1"), SYNC)
    assert skipped.sqlstates == ["26000"] and "1" not in skipped.types  # Parse skipped
    wire.capped(b"")


def test_denied_parse_of_a_held_name_keeps_the_old_one(wire: Wire) -> None:
    assert wire.batch(parse(b"s2", MANY), SYNC).types == ["1", "Z"]
    denied = wire.batch(parse(b"s2", b"select id from customers"), SYNC)  # unbounded: denied
    assert denied.sqlstates == ["42501"]
    wire.capped(b"s2")


def test_parse_that_fails_on_the_server_records_nothing(wire: Wire) -> None:
    assert wire.batch(parse(b"s3", MANY), SYNC).types == ["1", "Z"]
    # PostgreSQL refuses a second Parse of the name (42P05) and keeps the first statement
    refused = wire.batch(parse(b"s3", b"select id from customers where id = $1"), SYNC)
    assert refused.sqlstates == ["42P05"]
    wire.capped(b"s3")


def test_parse_answered_before_a_later_error_stands(wire: Wire) -> None:
    """Control: the server created the statement before the batch failed, so it is kept."""
    failed = wire.batch(parse(b"s4", MANY), bind(b"s4", b"not a number"), SYNC)
    assert failed.types[0] == "1" and failed.sqlstates == ["22P02"]
    wire.capped(b"s4")


def test_statement_really_closed_is_forgotten(wire: Wire) -> None:
    """Control: after a Close the server answered, the name is free for a new statement."""
    assert wire.batch(parse(b"s5", MANY), SYNC).types == ["1", "Z"]
    assert wire.batch(close_statement(b"s5"), SYNC).types == ["3", "Z"]
    assert wire.batch(parse(b"s5", b"select 1"), SYNC).types == ["1", "Z"]
    got = wire.batch(bind(b"s5"), execute(), SYNC)
    assert got.rows == 1 and not got.sqlstates
