"""Rewritten SELECTs of the simple Query protocol run as statements pgveil prepared upstream.

Sans-IO: bytes in, bytes out. The decision table gives each text an Analysis with a
``server_form`` (as the shape cache does for a cached rewritten SELECT); the tests check the
messages sent upstream and that the client sees exactly what a text Query would have produced.
"""

from __future__ import annotations

import struct

from proxy.session import Session, TxStatus
from rewriters.model import (
    Action,
    Analysis,
    LexSettings,
    Limits,
    OperatorView,
    ServerForm,
    StatementDecision,
)
from rewriters.shape import ShapeCache, literal_parameter
from tests.proxy.test_session import ROW_DESC, complete, data_row, frame, q, rfq

VIEW = OperatorView(login="teller_sz01", role="teller", attributes={"branch": "SZ01"},
                    tables={}, limits=Limits(), unrestricted=False, policy_version="t1")
PARAM_SQL = "SELECT masked FROM customers WHERE id = $1"


def make(server_prepare: bool = True) -> Session:
    def analyze(sql: str, view: OperatorView, lex: LexSettings, **kw: object) -> Analysis:
        if "customers" not in sql:
            return Analysis(sql=sql, statements=(StatementDecision(Action.FORWARD, sql,
                                                                   "other"),))
        literal = sql.rsplit("=", 1)[1].strip()
        rewritten = f"SELECT masked FROM customers WHERE id = {literal}"
        st = StatementDecision(Action.REWRITE, rewritten, "select",
                               tables=("public.customers",))
        oid, value = literal_parameter(literal)
        return Analysis(sql=rewritten, statements=(st,), cached=True,
                        server_form=ServerForm(PARAM_SQL, (oid,), (value,)))

    return Session(view=VIEW, analyze=analyze, lex=LexSettings(), identity={"session": "s"},
                   server_prepare=server_prepare)


def messages(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        length = struct.unpack_from("!I", data, pos + 1)[0]
        out.append((data[pos:pos + 1], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


RESULT = ROW_DESC + data_row(b"7") + complete("SELECT 1") + rfq()


def assert_sent_as_text(s: Session, *ids: int) -> None:
    """Each lookup goes upstream as the client's text Query (not pgveil's statement)."""
    for n in ids:
        up = messages(b"".join(s.from_client(q(f"select * from customers where id = {n}"))
                               .to_server))
        assert [t for t, _ in up] == [b"Q"]
        s.from_server(RESULT)


def prepared(s: Session) -> None:
    """First query: sent as text, followed by pgveil's own Parse+Sync."""
    up = messages(b"".join(s.from_client(q("select * from customers where id = 3")).to_server))
    assert [t for t, _ in up] == [b"Q", b"P", b"S"]
    name, rest = up[1][1].split(b"\x00", 1)
    assert name == b"pgveil_1"
    assert rest.startswith(PARAM_SQL.encode() + b"\x00")
    assert rest.endswith(struct.pack("!HI", 1, 23))  # one parameter, int4 like the literal 3
    back = s.from_server(RESULT + frame(b"1", b"") + rfq())
    assert b"".join(back.to_client) == RESULT  # the ParseComplete and its ReadyForQuery are ours


def test_second_query_of_a_shape_runs_the_prepared_statement() -> None:
    s = make()
    prepared(s)
    out = s.from_client(q("select * from customers where id = 42"))
    up = messages(b"".join(out.to_server))
    assert [t for t, _ in up] == [b"B", b"D", b"E", b"S"]
    bind = up[0][1]
    assert bind.startswith(b"\x00pgveil_1\x00")
    assert b"\x00\x00\x00\x0242" in bind  # one text parameter: "42"
    back = s.from_server(frame(b"2", b"") + RESULT)
    assert b"".join(back.to_client) == RESULT  # what the text Query would have produced
    assert back.audit and back.audit[0].fields["statement"] == \
        "select * from customers where id = 42"
    assert s.tx is TxStatus.IDLE and not s.busy


def test_errors_pass_through_and_the_transaction_state_follows() -> None:
    s = make()
    prepared(s)
    s.from_client(q("begin"))
    s.from_server(complete("BEGIN") + rfq(b"T"))
    out = s.from_client(q("select * from customers where id = 42"))
    assert messages(b"".join(out.to_server))[0][0] == b"B"  # prepared: runs inside the block
    err = frame(b"E", b"SERROR\x00VERROR\x00C57014\x00Mcanceling statement due to statement "
                b"timeout\x00\x00")
    back = s.from_server(err + rfq(b"E"))
    assert [t for t, _ in messages(b"".join(back.to_client))] == [b"E", b"Z"]
    assert s.tx is TxStatus.FAILED


def test_inside_a_transaction_block_the_parse_is_wrapped_in_a_savepoint() -> None:
    s = make()
    s.from_client(q("begin"))
    s.from_server(complete("BEGIN") + rfq(b"T"))
    up = messages(b"".join(s.from_client(q("select * from customers where id = 3")).to_server))
    # a failed Parse must not abort the client's block: savepoint, Parse, always roll back
    assert [t for t, _ in up] == [b"Q", b"Q", b"P", b"S", b"Q"]
    assert up[1][1] == b"SAVEPOINT pgveil_prepare\x00"
    assert up[4][1].startswith(b"ROLLBACK TO SAVEPOINT pgveil_prepare; RELEASE SAVEPOINT")
    err = frame(b"E", b"SERROR\x00VERROR\x00C42P18\x00Mcould not determine data type\x00\x00")
    ours = (complete("SAVEPOINT") + rfq(b"T") + err + rfq(b"E") + complete("ROLLBACK")
            + complete("RELEASE") + rfq(b"T"))
    back = s.from_server(ROW_DESC + data_row(b"7") + complete("SELECT 1") + rfq(b"T") + ours)
    assert b"".join(back.to_client) == ROW_DESC + data_row(b"7") + complete("SELECT 1") + \
        rfq(b"T")
    assert s.tx is TxStatus.IN_TRANSACTION and not s._slots
    up = messages(b"".join(s.from_client(q("select * from customers where id = 4")).to_server))
    assert [t for t, _ in up] == [b"Q"]  # failed here: stays a text Query


def test_no_preparing_in_a_failed_transaction() -> None:
    s = make()
    s.from_client(q("begin"))
    s.from_server(complete("BEGIN") + rfq(b"E"))
    up = messages(b"".join(s.from_client(q("select * from customers where id = 3")).to_server))
    assert [t for t, _ in up] == [b"Q"]


def test_failed_prepare_is_invisible_and_not_retried() -> None:
    s = make()
    s.from_client(q("select * from customers where id = 3"))
    err = frame(b"E", b"SERROR\x00VERROR\x00C42P18\x00Mcould not determine data type\x00\x00")
    back = s.from_server(RESULT + err + rfq())
    assert b"".join(back.to_client) == RESULT
    assert_sent_as_text(s, 4, 4)


def test_discard_all_forgets_prepared_statements() -> None:
    s = make()
    prepared(s)
    s.from_client(q("discard all"))
    s.from_server(complete("DISCARD ALL") + rfq())
    up = messages(b"".join(s.from_client(q("select * from customers where id = 5")).to_server))
    assert [t for t, _ in up] == [b"Q", b"P", b"S"]  # prepared again, under a new name
    assert up[1][1].startswith(b"pgveil_2\x00")


def test_pipelined_queries_are_not_converted() -> None:
    s = make()
    prepared(s)
    both = q("select 1") + q("select * from customers where id = 5")
    up = messages(b"".join(s.from_client(both).to_server))
    assert [t for t, _ in up] == [b"Q", b"Q"]  # a BindComplete could not be attributed


def test_disabled_by_config() -> None:
    s = make(server_prepare=False)
    up = messages(b"".join(s.from_client(q("select * from customers where id = 3")).to_server))
    assert [t for t, _ in up] == [b"Q"]


def test_literal_parameter_types_follow_postgresql_literals() -> None:
    assert literal_parameter("7") == (23, "7")
    assert literal_parameter("2147483647") == (23, "2147483647")
    assert literal_parameter("2147483648") == (20, "2147483648")
    assert literal_parameter("9223372036854775808") == (1700, "9223372036854775808")
    assert literal_parameter("1.50") == (1700, "1.50")
    assert literal_parameter("1e3") == (1700, "1e3")
    assert literal_parameter("'it''s'") == (0, "it's")


def _template_form(sql: str) -> ServerForm | None:
    """The shape cache's server form for ``sql`` after a first (filling) analysis."""
    cache = ShapeCache()

    class _View:
        key = ("v",)

        @staticmethod
        def sensitive(text: str) -> bool:
            return False

    def analyse(text: str) -> Analysis:
        st = StatementDecision(Action.REWRITE, "SELECT * FROM (masked) c WHERE " +
                               text.split("where", 1)[1], "select",
                               tables=("public.customers",))
        return Analysis(sql=st.sql, statements=(st,))

    miss = cache.lookup(sql, _View, LexSettings())  # type: ignore[arg-type]
    cache.fill(miss, sql, analyse)  # type: ignore[arg-type]
    hit = cache.lookup(sql, _View, LexSettings())  # type: ignore[arg-type]
    assert isinstance(hit, Analysis)
    return hit.server_form


def test_shape_cache_gives_a_parameterised_form() -> None:
    form = _template_form("select * from customers where id = 5 and name = 'a''b'")
    assert form is not None
    assert form.sql == "SELECT * FROM (masked) c WHERE  id = $1 and name = $2"
    assert form.types == (23, 0) and form.values == ("5", "a'b")


def test_positional_integers_are_never_parameters() -> None:
    # GROUP BY a, 2 names an output column; $1 there would be a constant
    assert _template_form("select * from customers where id in (3, 6) order by name, 1") \
        is None
    assert _template_form("select * from customers where id in (3, 6)") is not None
    # ... and so do ORDER BY (2) and DISTINCT ON (2): parentheses do not make an expression
    # (tests/integration/test_server_prepare_live.py runs both against PostgreSQL)
    assert _template_form("select id, level from customers where id < 40 order by (2) desc") \
        is None


def test_a_vanished_statement_stops_preparing_on_the_connection() -> None:
    """A transaction-pooling proxy upstream loses session state: one error, then text."""
    s = make()
    prepared(s)
    s.from_client(q("select * from customers where id = 42"))
    err = frame(b"E", b"SERROR\x00VERROR\x00C26000\x00Mprepared statement \"pgveil_1\" does "
                b"not exist\x00\x00")
    s.from_server(err + rfq())
    assert_sent_as_text(s, 43, 44)


def test_a_client_bind_of_a_pgveil_statement_is_denied() -> None:
    s = make()
    prepared(s)
    bind = frame(b"B", b"\x00pgveil_1\x00\x00\x00\x00\x01\x00\x00\x00\x0299\x00\x00")
    batch = bind + frame(b"E", b"\x00\x00\x00\x00\x00") + frame(b"S", b"")
    assert not s.fast_batch(batch)
    out = s.from_client(batch)
    sent = b"".join(out.to_server)
    assert b"RAISE EXCEPTION" in sent and b"42501" in sent and b"belong to pgveil" in sent
    # the client's Bind never reaches the server: only the unnamed raise is bound
    assert not any(t == b"B" and body.startswith(b"\x00pgveil_1") for t, body in messages(sent))


def test_a_client_close_or_parse_of_a_pgveil_statement_is_denied() -> None:
    s = make()
    prepared(s)
    for message in (frame(b"C", b"Spgveil_1\x00"),
                    frame(b"P", b"pgveil_1\x00SELECT 1\x00\x00\x00")):
        out = s.from_client(message + frame(b"S", b""))
        sent = b"".join(out.to_server)
        assert b"RAISE EXCEPTION" in sent and b"belong to pgveil" in sent
        assert not any(t in (b"C", b"P") and b"pgveil_1" in body
                       for t, body in messages(sent)), sent
