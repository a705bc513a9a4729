"""The session state machine with bytes in and bytes out: no sockets, no PostgreSQL.

Decisions come from a small table-driven analyse function, so each test states exactly which
decision the rewriter made and checks what the session does with it on the wire.
"""

from __future__ import annotations

import dataclasses
import struct
import time

import pytest

from proxy.session import (
    ProtocolViolation,
    Session,
    TxStatus,
    _statements_before,
    parse_error_fields,
)
from rewriters.model import (
    Action,
    Analysis,
    LexSettings,
    Limits,
    OperatorView,
    StatementDecision,
)

VIEW = OperatorView(login="teller_sz01", role="teller", attributes={"branch": "SZ01"},
                    tables={}, limits=Limits(max_rows=3), unrestricted=False,
                    policy_version="t1")


def frame(t: bytes, payload: bytes) -> bytes:
    return t + struct.pack("!I", len(payload) + 4) + payload


def q(sql: str) -> bytes:
    return frame(b"Q", sql.encode() + b"\x00")


def data_row(*vals: bytes) -> bytes:
    body = struct.pack("!H", len(vals)) + b"".join(struct.pack("!i", len(v)) + v for v in vals)
    return frame(b"D", body)


def complete(tag: str) -> bytes:
    return frame(b"C", tag.encode() + b"\x00")


def rfq(status: bytes = b"I") -> bytes:
    return frame(b"Z", status)


ROW_DESC = frame(b"T", struct.pack("!H", 1) + b"id\x00" + struct.pack("!IhIhih", 0, 0, 23, 4, -1, 0))


def make_session(decisions: dict[str, StatementDecision]) -> tuple[Session, list[dict]]:
    audits: list[dict] = []

    def analyze(sql: str, view: OperatorView, lex: LexSettings, **kw: object) -> Analysis:
        st = decisions.get(sql) or StatementDecision(action=Action.FORWARD, sql=sql,
                                                      kind="select")
        return Analysis(sql=st.sql if st.action is Action.REWRITE else sql, statements=(st,))

    s = Session(view=VIEW, analyze=analyze, lex=LexSettings(),
                identity={"session": "s1", "operator": "teller_sz01", "role": "teller"})
    return s, audits


def test_unprotected_query_forwarded_byte_for_byte() -> None:
    s, _ = make_session({})
    raw = q("select 1")
    out = s.from_client(raw)
    assert b"".join(out.to_server) == raw
    back = ROW_DESC + data_row(b"1") + complete("SELECT 1") + rfq()
    res = s.from_server(back)
    assert b"".join(res.to_client) == back
    assert not res.audit and not res.cancel


def test_partial_frames_are_buffered() -> None:
    s, _ = make_session({})
    raw = q("select 1") + q("select 2")
    sent = b""
    for i in range(len(raw)):
        sent += b"".join(s.from_client(raw[i:i + 1]).to_server)
    assert sent == raw


def test_rewrite_sends_rewritten_sql_and_audits_rows() -> None:
    d = StatementDecision(action=Action.REWRITE, sql="SELECT masked", kind="select",
                          tables=("public.customers",), row_limit=3)
    s, _ = make_session({"select phone from customers": d})
    out = s.from_client(q("select phone from customers"))
    assert b"".join(out.to_server) == q("SELECT masked")
    res = s.from_server(ROW_DESC + data_row(b"a") + data_row(b"b") + complete("SELECT 2")
                        + rfq())
    assert res.audit and res.audit[0].fields["rows"] == 2
    assert res.audit[0].fields["decision"] == "rewritten"
    assert res.audit[0].fields["tables"] == ["public.customers"]


def test_denied_statement_becomes_server_side_raise() -> None:
    d = StatementDecision(action=Action.DENY, sql="copy customers to stdout", kind="copy",
                          tables=("public.customers",), message="COPY of customers denied")
    s, _ = make_session({"copy customers to stdout": d})
    out = s.from_client(q("copy customers to stdout"))
    sent = b"".join(out.to_server)
    assert b"RAISE EXCEPTION" in sent and b"42501" in sent and b"copy customers" not in sent
    assert out.audit[0].fields["decision"] == "blocked"
    # the server's error (with PL/pgSQL context) reaches the client without the context field
    err = frame(b"E", b"SERROR\x00VERROR\x00C42501\x00MCOPY of customers denied\x00"
                b"WPL/pgSQL function inline_code_block line 1 at RAISE\x00\x00")
    res = s.from_server(err + rfq(b"E"))
    fields = parse_error_fields(res.to_client[0][5:])
    assert fields["C"] == "42501" and "W" not in fields
    assert s.tx is TxStatus.FAILED
    assert not res.audit  # the blocked record was written once, at decision time


def test_row_cap_stops_rows_cancels_and_replaces_completion() -> None:
    d = StatementDecision(action=Action.REWRITE, sql="SELECT masked", kind="select",
                          tables=("public.customers",), row_limit=3)
    s, _ = make_session({"select * from customers": d})
    s.from_client(q("select * from customers"))
    rows = b"".join(data_row(str(i).encode()) for i in range(10))
    res = s.from_server(ROW_DESC + rows)
    forwarded = b"".join(res.to_client)
    assert forwarded.count(b"D\x00") == 3
    assert res.cancel
    res2 = s.from_server(complete("SELECT 10") + rfq())
    err = parse_error_fields(res2.to_client[0][5:])
    assert err["C"] == "42501" and "row limit of 3 exceeded for role teller" in err["M"]
    assert res2.to_client[-1] == rfq()
    assert res2.audit[0].fields["rows"] == 3 and res2.audit[0].fields["decision"] == "blocked"
    assert res2.audit[0].fields["reasons"][0] == "row limit 3 exceeded"


def test_cursor_rows_count_cumulatively() -> None:
    declare = StatementDecision(action=Action.REWRITE, sql="DECLARE c CURSOR FOR masked",
                                kind="declare", tables=("public.customers",), cursor="c",
                                row_limit=3)
    fetch = StatementDecision(action=Action.FORWARD, sql="fetch 2 from c", kind="fetch",
                              tables=("public.customers",), cursor="c", row_limit=3)
    s, _ = make_session({"declare c cursor for select id from customers": declare,
                         "fetch 2 from c": fetch})
    s.from_client(q("declare c cursor for select id from customers"))
    s.from_server(complete("DECLARE CURSOR") + rfq(b"T"))
    s.from_client(q("fetch 2 from c"))
    r1 = s.from_server(ROW_DESC + data_row(b"1") + data_row(b"2") + complete("FETCH 2") +
                       rfq(b"T"))
    assert b"".join(r1.to_client).count(b"D\x00") == 2 and not r1.cancel
    s.from_client(q("fetch 2 from c"))
    r2 = s.from_server(ROW_DESC + data_row(b"3") + data_row(b"4"))
    assert b"".join(r2.to_client).count(b"D\x00") == 1 and r2.cancel


def test_extended_parse_denial_injects_raise_and_skips() -> None:
    d = StatementDecision(action=Action.DENY, sql="select * from pg_stats", kind="select",
                          tables=("public.customers",), message="statistics denied")
    s, _ = make_session({"select * from pg_stats": d})
    parse = frame(b"P", b"s1\x00select * from pg_stats\x00\x00\x00")
    bind = frame(b"B", b"\x00s1\x00\x00\x00\x00\x00\x00\x00")
    execute = frame(b"E", b"\x00\x00\x00\x00\x00")
    sync = frame(b"S", b"")
    out = s.from_client(parse + bind + execute + sync)
    sent = b"".join(out.to_server)
    assert b"pg_stats" not in sent and b"RAISE EXCEPTION" in sent
    # the refused statement is unknown: its Bind names one that cannot exist (26000 if the
    # batch were not already failing)
    unknown = frame(b"B", b"\x00pgveil_unknown_s1\x00\x00\x00\x00\x00\x00\x00")
    assert sent.endswith(unknown + execute + sync)
    err = frame(b"E", b"SERROR\x00VERROR\x00C42501\x00Mstatistics denied\x00\x00")
    res = s.from_server(err + rfq())
    assert parse_error_fields(res.to_client[0][5:])["M"] == "statistics denied"
    assert res.to_client[-1] == rfq()


def test_parameter_status_tracks_lexing_settings() -> None:
    s, _ = make_session({})
    s.from_client(q("set standard_conforming_strings = off"))
    ps = frame(b"S", b"standard_conforming_strings\x00off\x00")
    s.from_server(ps + complete("SET") + rfq())
    assert s.lex.standard_conforming_strings is False
    s.from_server(frame(b"S", b"client_encoding\x00GBK\x00"))
    assert s.lex.client_encoding == "GBK" and s.codec == "gbk"


def test_analyzer_crash_fails_closed() -> None:
    def broken(sql: str, view: OperatorView, lex: LexSettings, **kw: object) -> Analysis:
        raise RuntimeError("bug")

    s = Session(view=VIEW, analyze=broken, lex=LexSettings(), identity={})
    out = s.from_client(q("select phone from customers"))
    sent = b"".join(out.to_server)
    assert b"RAISE EXCEPTION" in sent and b"customers" not in sent


def test_row_cap_inside_transaction_fails_it_on_the_server_too() -> None:
    d = StatementDecision(action=Action.REWRITE, sql="SELECT masked", kind="select",
                          tables=("public.customers",), row_limit=3)
    s, _ = make_session({"select * from customers": d})
    s.from_client(q("begin"))
    s.from_server(complete("BEGIN") + rfq(b"T"))
    s.from_client(q("select * from customers"))
    rows = b"".join(data_row(str(i).encode()) for i in range(5))
    s.from_server(ROW_DESC + rows)
    res = s.from_server(complete("SELECT 5") + rfq(b"T"))
    # the client has its error but not yet a ReadyForQuery; the server gets a failing statement
    assert parse_error_fields(res.to_client[-1][5:])["C"] == "42501"
    assert not any(c[:1] == b"Z" for c in res.to_client)
    assert b"RAISE EXCEPTION" in b"".join(res.to_server)
    err = frame(b"E", b"SERROR\x00VERROR\x00C42501\x00Mrow limit exceeded\x00\x00")
    res2 = s.from_server(err + rfq(b"E"))
    assert res2.to_client == [rfq(b"E")] and s.tx is TxStatus.FAILED


def test_strict_durability_holds_protected_result_until_its_record() -> None:
    from proxy.session import HeldResult

    d = StatementDecision(action=Action.REWRITE, sql="SELECT masked", kind="select",
                          tables=("public.customers",), row_limit=10)
    plain = StatementDecision(action=Action.FORWARD, sql="select 1", kind="select")
    s = Session(view=VIEW, analyze=lambda sql, v, lx, **kw: Analysis(
        sql=sql, statements=(d if "customers" in sql else plain,)), lex=LexSettings(),
        identity={}, hold_protected=True)
    s.from_client(q("select phone from customers"))
    res = s.from_server(ROW_DESC)
    assert res.to_client == []  # even the row description waits
    res = s.from_server(data_row(b"a") + complete("SELECT 1") + rfq())
    held, z = res.to_client
    assert isinstance(held, HeldResult) and held.event is res.audit[0] and held.event.held
    assert b"".join(held.data) == ROW_DESC + data_row(b"a") + complete("SELECT 1")
    assert parse_error_fields(held.failure[5:])["C"] == "42501"
    assert z == rfq()
    # unprotected statements are not held
    s.from_client(q("select 1"))
    res = s.from_server(ROW_DESC + data_row(b"1") + complete("SELECT 1") + rfq())
    assert all(isinstance(c, bytes) for c in res.to_client)


def notification(channel: str, payload: str, pid: int = 4242) -> bytes:
    return frame(b"A", struct.pack("!I", pid) + channel.encode() + b"\x00" + payload.encode()
                 + b"\x00")


def test_notifications_of_unlisted_channels_are_dropped_for_a_masked_operator() -> None:
    """Channels are database-wide; a session can be subscribed without a LISTEN pgveil saw
    (a function's static LISTEN), so the wire filters what a masked operator receives."""
    s, _ = make_session({})
    s.view = dataclasses.replace(VIEW, limits=Limits(max_rows=3, listen=("ev_*",)))
    s.from_client(q("select 1"))
    secret = notification("raw_rows", '{"phone":"13900104729"}')
    listed = notification("ev_orders", "ok")
    back = ROW_DESC + secret + data_row(b"1") + listed + complete("SELECT 1") + rfq()
    out = s.from_server(back)
    assert b"".join(out.to_client) == ROW_DESC + data_row(b"1") + listed + complete("SELECT 1") \
        + rfq()
    idle = s.from_server(secret + listed)  # between statements
    assert b"".join(idle.to_client) == listed


def test_notifications_reach_an_unrestricted_operator_unchanged() -> None:
    s, _ = make_session({})
    s.view = dataclasses.replace(VIEW, unrestricted=True)
    secret = notification("raw_rows", "anything")
    assert b"".join(s.from_server(secret).to_client) == secret


COPY_IN_RESPONSE = frame(b"G", b"\x00\x00\x01\x00\x00")


def test_a_sync_pipelined_inside_copy_data_gets_no_slot() -> None:
    """Query, CopyData, Sync, CopyDone in one write, before the CopyInResponse: PostgreSQL
    reads the Sync in COPY mode and ignores it, so only the COPY's ReadyForQuery comes."""
    s, _ = make_session({})
    s.from_client(q("copy sink from stdin") + frame(b"d", b"x\n") + frame(b"S", b"")
                  + frame(b"c", b""))
    assert [slot.kind for slot in s._slots] == ["query", "sync"]
    s.from_server(COPY_IN_RESPONSE)
    assert [slot.kind for slot in s._slots] == ["query"]
    s.from_server(complete("COPY 1") + rfq())
    assert not s._slots and s._copy_window == 0
    out = s.from_client(q("select 1"))
    assert out.to_server == [q("select 1")]
    assert [slot.kind for slot in s._slots] == ["query"]


def test_a_copy_that_fails_before_copy_mode_keeps_the_syncs() -> None:
    """No CopyInResponse (permission denied, no such table): PostgreSQL reads what followed
    as usual, so the Sync is a request after all."""
    s, _ = make_session({})
    s.from_client(q("copy nowhere from stdin") + frame(b"S", b""))
    s.from_server(frame(b"E", b"SERROR\x00C42P01\x00Mno such table\x00\x00") + rfq())
    assert [slot.kind for slot in s._slots] == ["sync"]
    s.from_server(rfq())
    assert not s._slots and s._copy_window == 0


def test_a_sync_after_copy_mode_began_is_forwarded_without_a_slot() -> None:
    s, _ = make_session({})
    s.from_client(q("copy sink from stdin"))
    s.from_server(COPY_IN_RESPONSE)
    out = s.from_client(frame(b"d", b"x\n") + frame(b"S", b"") + frame(b"c", b""))
    assert b"".join(out.to_server) == frame(b"d", b"x\n") + frame(b"S", b"") + frame(b"c", b"")
    assert [slot.kind for slot in s._slots] == ["query"]
    s.from_server(complete("COPY 1") + rfq())
    assert not s._slots


def test_a_statement_inside_copy_data_is_a_protocol_violation() -> None:
    s, _ = make_session({})
    s.from_client(q("copy sink from stdin"))
    s.from_server(COPY_IN_RESPONSE)
    with pytest.raises(ProtocolViolation, match="COPY FROM STDIN"):
        s.from_client(frame(b"d", b"x\n") + q("select 1"))


def test_a_large_message_in_many_reads_is_assembled_once() -> None:
    """Each read used to copy everything buffered so far: quadratic in the message size."""
    s, _ = make_session({})
    big = q("select '" + "x" * (32 << 20) + "'")
    sent: list[bytes] = []
    started = time.perf_counter()
    for i in range(0, len(big), 1 << 14):  # 2048 reads: the old way copied 32 GB
        sent.extend(s.from_client(big[i:i + (1 << 14)]).to_server)
    assert time.perf_counter() - started < 2.0
    assert b"".join(sent) == big
    server = frame(b"D", b"\x00\x01" + struct.pack("!i", 16 << 20) + b"y" * (16 << 20))
    back: list[bytes] = []
    for i in range(0, len(server), 1 << 16):
        back.extend(s.from_server(server[i:i + (1 << 16)]).to_client)
    assert b"".join(back) == server


@pytest.mark.parametrize("header", [
    b"Q" + struct.pack("!I", 0x7FFFFFF0),  # over PostgreSQL's 1 GB
    b"S" + struct.pack("!I", 20000),  # a Sync is never that long
])
def test_an_impossible_message_length_is_refused_at_once(header: bytes) -> None:
    s, _ = make_session({})
    with pytest.raises(ProtocolViolation, match="invalid message length"):
        s.from_client(header + b"x" * 100)


def test_a_function_call_pipelined_with_a_query_is_a_request_of_its_own() -> None:
    """The DBA's FunctionCall (psql's \\lo_* use it) is answered by FunctionCallResponse and
    ReadyForQuery; without a slot of its own, that ReadyForQuery closed the Query behind it,
    whose answer then went missing (the 'V' with it)."""
    s, _ = make_session({})
    s.view = dataclasses.replace(VIEW, unrestricted=True)
    call = frame(b"F", struct.pack("!IHHI", 1, 0, 0, 0) + b"\x00\x00")
    out = s.from_client(call + q("select 1"))
    assert b"".join(out.to_server) == call + q("select 1")
    assert [slot.kind for slot in s._slots] == ["query", "query"]
    answer = frame(b"V", struct.pack("!i", 1) + b"5") + rfq()
    result = ROW_DESC + data_row(b"1") + complete("SELECT 1") + rfq()
    back = s.from_server(answer + result)
    assert b"".join(back.to_client) == answer + result
    assert not s._slots


def test_statements_ahead_of_a_refusal_run_only_when_nothing_needs_deciding_again() -> None:
    """A refused statement in a multi-statement Query: the ones ahead run as in PostgreSQL,
    unless one of them is refused too or is an EXECUTE (its PREPARE may need redoing under
    rules changed since, which only the forwarding path does)."""
    begin = StatementDecision(Action.FORWARD, "begin", "transaction")
    insert = StatementDecision(Action.FORWARD, "insert into t values (1)", "insert")
    execute = StatementDecision(Action.FORWARD, "execute p", "execute", prepared="p")
    refused = StatementDecision(Action.DENY, "select * from customers", "select")
    assert _statements_before((begin, insert, refused), refused) == (begin, insert)
    assert _statements_before((refused, begin), refused) == ()
    assert _statements_before((begin, execute, refused), refused) == ()
    other = StatementDecision(Action.DENY, "select * from accounts", "select")
    assert _statements_before((other, begin, refused), refused) == ()


# --- a Query sent inside an unsynchronised extended batch (asyncpg: Parse, Describe, Flush)
SYNC_FRAME = frame(b"S", b"")


def test_a_query_inside_an_open_batch_waits_for_a_sync_of_pgveils_own() -> None:
    s, _ = make_session({})
    parse = frame(b"P", b"s1\x00select 1\x00\x00\x00")
    describe = frame(b"D", b"Ss1\x00")
    out = s.from_client(parse + describe + frame(b"H", b"") + q("select 2"))
    assert b"".join(out.to_server) == parse + describe + frame(b"H", b"") + SYNC_FRAME
    assert not s.from_client(SYNC_FRAME).to_server  # held behind our Sync as well
    answers = frame(b"1", b"") + frame(b"t", b"\x00\x00") + ROW_DESC
    back = s.from_server(answers + rfq())
    assert b"".join(back.to_client) == answers  # our ReadyForQuery stays ours
    assert b"".join(back.to_server) == q("select 2") + SYNC_FRAME  # the held bytes go now
    result = ROW_DESC + data_row(b"2") + complete("SELECT 1") + rfq()
    assert b"".join(s.from_server(result + rfq()).to_client) == result + rfq()
    assert not s.busy


def test_a_query_inside_a_failed_batch_is_skipped_like_postgresql_does() -> None:
    s, _ = make_session({})
    bind = frame(b"B", b"\x00nosuch\x00\x00\x00\x00\x00\x00\x00")
    out = s.from_client(bind + q("select 2") + frame(b"F", b"\x00" * 10) + SYNC_FRAME
                        + q("select 3"))
    unknown = frame(b"B", b"\x00pgveil_unknown_nosuch\x00\x00\x00\x00\x00\x00\x00")
    assert b"".join(out.to_server) == unknown + SYNC_FRAME
    error = frame(b"E", b"SERROR\x00C26000\x00Mprepared statement \"nosuch\" does not exist\x00\x00")
    back = s.from_server(error + rfq())
    assert b"".join(back.to_client) == error
    # the Query and the FunctionCall are skipped up to the client's Sync; what follows runs
    assert b"".join(back.to_server) == SYNC_FRAME + q("select 3")
    assert b"".join(s.from_server(rfq()).to_client) == rfq()
    result = ROW_DESC + data_row(b"3") + complete("SELECT 1") + rfq()
    assert b"".join(s.from_server(result).to_client) == result
    assert not s.busy


def test_a_long_analysis_leaves_the_rest_of_the_messages_for_a_later_turn() -> None:
    """One client's pipeline of statements that are slow to analyse must not hold the event
    loop for the sum: after ANALYSIS_SLICE the session stops, keeps the rest in order, and
    asks the shell to call again (Output.resume)."""
    from proxy import session as session_module

    s, _ = make_session({})
    now = [0.0]
    s.clock = lambda: now[0]
    real = s._analyze

    def slow(sql: str, *args: object, **kw: object) -> Analysis:
        now[0] += session_module.ANALYSIS_SLICE  # each statement takes a whole slice
        return real(sql, *args, **kw)

    s._analyze = slow
    raw = q("select 1") + q("select 2") + q("select 3")
    out = s.from_client(raw)
    assert out.resume and b"".join(out.to_server) == q("select 1") + q("select 2")
    s.from_server(complete("SELECT 1") + rfq())
    out = s.from_client(b"")
    assert out.resume is False and b"".join(out.to_server) == q("select 3")
    quick, _ = make_session({})
    out = quick.from_client(raw)  # a fast analysis: all at once
    assert not out.resume and b"".join(out.to_server) == raw
