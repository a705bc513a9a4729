"""The hot path for protected SELECTs: a repeated simple Query of a memoised shape and a Bind
of a prepared protected statement are run without analysis, and their whole result is
accounted for in one scan (Session.fast_query / fast_batch / protected_response).

Sans-IO, with the real analyser and shape cache over the bank catalog: every fast answer is
compared with what the general path does for the same bytes.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

from proxy.operator import LocalQuota, OperatorState
from proxy.session import Session, TxStatus
from rewriters.analyze import Analyzer
from rewriters.model import LexSettings, Limits
from tests.proxy.test_server_prepare import messages
from tests.proxy.test_session import complete, data_row, frame, q, rfq
from tests.rewriters.helpers import teller

ROW_DESC = frame(b"T", struct.pack("!H", 1) + b"id\x00" + struct.pack("!IhIhih", 0, 0, 23, 4, -1, 0))
BIND_COMPLETE = frame(b"2", b"")


class Forms:
    """Stands in for Runtime.audit_form: records what it was asked for."""

    def __init__(self) -> None:
        self.made: list[dict[str, Any]] = []

    def __call__(self, fields: dict[str, Any], standard_conforming_strings: bool) -> object:
        assert standard_conforming_strings  # the session's lex: the default, on
        self.made.append(dict(fields))
        return ("form", len(self.made))


def make(view=None, quota_exceeded: bool = False, audit_ok: bool = True
         ) -> tuple[Session, Forms]:
    analyzer = Analyzer()
    forms = Forms()
    s = Session(view=view or teller(), analyze=analyzer.analyze, lex=LexSettings(),
                identity={"session": "s1", "operator": "teller_sz01"}, server_prepare=True,
                plain_kind=analyzer.plain_kind, plain_memoizable=analyzer.plain_memoizable,
                audit_form=forms, audit_available=lambda: audit_ok, hold_protected=True)
    return s, forms


def result(*ids: int, tag: str | None = None) -> bytes:
    rows = b"".join(data_row(str(i).encode()) for i in ids)
    return ROW_DESC + rows + complete(tag or f"SELECT {len(ids)}") + rfq()


def run_text(s: Session, sql: str, prepare_reply: bool = False) -> list[bytes]:
    """One Query through the general path (as the shell does when the hot path declines)."""
    out = s.from_client(q(sql))
    kinds = [t for t, _ in messages(b"".join(out.to_server))]
    back = result(3) if kinds[0] == b"Q" else BIND_COMPLETE + result(3)
    if b"P" in kinds:  # pgveil's own Parse+Sync after the text Query
        back += frame(b"1", b"") + rfq()
    s.from_server(back)
    return kinds


def warm(s: Session, sql: str = "SELECT * FROM customers WHERE id = 3") -> None:
    assert run_text(s, sql) == [b"Q"]  # analysed, its template cached
    assert run_text(s, sql) == [b"Q", b"P", b"S"]  # a cache hit: text, then prepared upstream
    assert run_text(s, sql.replace("3", "6")) == [b"B", b"D", b"E", b"S"]  # memoised here


def test_a_repeat_runs_pgveils_statement_without_analysis() -> None:
    s, forms = make()
    warm(s)
    assert len(forms.made) == 1 and forms.made[0]["statement"] == \
        "SELECT * FROM customers WHERE id = 6"
    sent = s.fast_query(q("SELECT * FROM customers WHERE id = 9"))
    assert sent is not None
    up = messages(sent)
    assert [t for t, _ in up] == [b"B", b"D", b"E", b"S"]
    assert up[0][1] == b"\x00pgveil_1\x00\x00\x00\x00\x01\x00\x00\x00\x019\x00\x00"
    back = BIND_COMPLETE + result(9)
    done = s.protected_response(back)
    assert done is not None
    data, form, rows, duration = done
    assert data == result(9)  # pgveil's BindComplete dropped: what the text Query gives
    assert form == ("form", 1) and rows == 1 and duration >= 0
    assert not s._slots and s.tx is TxStatus.IDLE and not s.busy


def test_quoted_literals_are_unquoted_into_the_bind() -> None:
    s, _ = make()
    warm(s, "SELECT * FROM customers WHERE phone = '13800000003'")
    sent = s.fast_query(q("SELECT * FROM customers WHERE phone = '13811112222'"))
    assert sent is not None
    assert b"\x00\x00\x00\x0b13811112222\x00\x00" in messages(sent)[0][1]


def test_texts_that_differ_outside_the_literals_are_not_memo_hits() -> None:
    s, _ = make()
    warm(s, "SELECT id, level FROM customers WHERE id = 3 AND level = 1")
    assert s.fast_query(q("SELECT id, level FROM customers WHERE id = 7 AND level = 2")) \
        is not None
    s.protected_response(BIND_COMPLETE + result(7))
    # other literal lengths, another column list: the general path decides
    assert s.fast_query(q("SELECT id, level FROM customers WHERE id = 12 AND level = 1")) is None
    assert s.fast_query(q("SELECT id, name FROM customers WHERE id = 7 AND level = 2")) is None
    assert not s._slots


def test_a_digit_in_a_name_is_never_taken_for_a_literal() -> None:
    s, _ = make()
    warm(s, "SELECT c1.id FROM customers c1 WHERE c1.id = 3")
    # same bytes with digits zeroed, but another alias: not a repeat of the memoised text
    assert s.fast_query(q("SELECT c2.id FROM customers c2 WHERE c2.id = 4")) is None


def test_no_memo_for_integers_whose_type_depends_on_their_digits() -> None:
    s, _ = make()
    run_text(s, "SELECT * FROM customers WHERE id = 3000000000")
    run_text(s, "SELECT * FROM customers WHERE id = 3000000001")
    assert not s._protected_memo  # int8 now, int4 for a smaller value of the same length


def test_live_checks_send_the_statement_back_to_the_general_path() -> None:
    s, _ = make()
    warm(s)
    for limits in (Limits(hours=("09:00", "17:00")), Limits(quota_rows=10, quota_seconds=60)):
        s.view = dataclasses.replace(s.view, limits=limits)
        assert s.fast_query(q("SELECT * FROM customers WHERE id = 9")) is None
    audit_down, _ = make(audit_ok=False)
    assert audit_down.fast_query(q("SELECT * FROM customers WHERE id = 9")) is None


def test_a_result_past_the_row_cap_is_left_to_the_general_path() -> None:
    s, _ = make(view=dataclasses.replace(teller(), limits=Limits(max_rows=2)))
    warm(s)
    assert s.fast_query(q("SELECT * FROM customers WHERE id = 9")) is not None
    back = BIND_COMPLETE + result(1, 2, 3)
    assert s.protected_response(back) is None
    out = s.from_server(back)
    sent = b"".join(x if isinstance(x, bytes) else b"".join(x.data) for x in out.to_client)
    assert b"row limit of 2 exceeded" in sent and out.cancel is False or out.cancel is True
    assert sent.count(b"D\x00") == 2  # two rows, then our error


def test_errors_notices_and_partial_results_are_left_to_the_general_path() -> None:
    s, _ = make()
    warm(s)
    err = frame(b"E", b"SERROR\x00VERROR\x00C57014\x00Mcanceling statement\x00\x00")
    notice = frame(b"N", b"SNOTICE\x00VNOTICE\x00C00000\x00Mhello\x00\x00")
    for back in (BIND_COMPLETE + err + rfq(), BIND_COMPLETE + notice + result(9),
                 BIND_COMPLETE + ROW_DESC + data_row(b"9")):
        s2, _ = make()
        warm(s2)
        assert s2.fast_query(q("SELECT * FROM customers WHERE id = 9")) is not None
        assert s2.protected_response(back) is None
        assert s2._slots  # untouched: from_server takes it from the start


def test_extended_protocol_bind_of_a_protected_statement() -> None:
    fast, forms = make()
    slow, _ = make()
    parse = frame(b"P", b"s1\x00SELECT * FROM customers WHERE id = $1\x00\x00\x00")
    for s in (fast, slow):
        s.from_client(parse + frame(b"S", b""))
        s.from_server(frame(b"1", b"") + rfq())
    bind = frame(b"B", b"\x00s1\x00\x00\x00\x00\x01\x00\x00\x00\x0242\x00\x00")
    batch = bind + frame(b"D", b"P\x00") + frame(b"E", b"\x00\x00\x00\x00\x00") + frame(b"S", b"")
    assert fast.fast_batch(batch)
    assert b"".join(slow.from_client(batch).to_server) == batch
    assert [x.kind for x in fast._slots] == [x.kind for x in slow._slots] == ["execute", "sync"]
    back = BIND_COMPLETE + result(42)
    done = fast.protected_response(back)
    assert done is not None and done[0] == back and done[2] == 1
    general = slow.from_server(back)
    sent = [x if isinstance(x, bytes) else b"".join(x.data) for x in general.to_client]
    assert not isinstance(general.to_client[0], bytes)  # held for its record, as here
    assert b"".join(sent) == back  # the same bytes
    fields = general.audit[0].fields
    made = forms.made[0]
    assert {k: v for k, v in fields.items() if k not in ("rows", "duration_ms", "error")} == made
    assert not fast._slots and not slow._slots


def test_bind_meets_the_quota_each_time() -> None:
    s, _ = make()
    s.from_client(frame(b"P", b"s1\x00SELECT * FROM customers WHERE id = $1\x00\x00\x00")
                  + frame(b"S", b""))
    s.from_server(frame(b"1", b"") + rfq())

    s.view = dataclasses.replace(s.view, limits=Limits(quota_rows=10, quota_seconds=3600))
    quota = LocalQuota()
    quota.add_rows(s.view.login, 10)  # the hour's 10 rows are spent
    s.operator = OperatorState(s.view, None, quota, lambda role: s.view)
    bind = frame(b"B", b"\x00s1\x00\x00\x00\x00\x01\x00\x00\x00\x0242\x00\x00")
    batch = bind + frame(b"E", b"\x00\x00\x00\x00\x00") + frame(b"S", b"")
    assert not s.fast_batch(batch)
    out = s.from_client(batch)
    sent = b"".join(out.to_server)
    assert bind not in sent and b"quota of 10 protected rows" in sent  # raised by PostgreSQL
    assert out.audit and out.audit[0].fields["decision"] == "blocked"
    assert out.audit[0].fields["statement"] == "SELECT * FROM customers WHERE id = $1"


def test_a_new_view_or_forgotten_statements_end_the_memo() -> None:
    s, _ = make()
    warm(s)
    s.view = dataclasses.replace(s.view, policy_version="reloaded")  # a reload or a grant
    assert s.fast_query(q("SELECT * FROM customers WHERE id = 9")) is None
    s2, _ = make()
    warm(s2)
    s2._forget_server_statements()  # DISCARD ALL / DEALLOCATE ALL seen
    assert not s2._protected_memo
    assert s2.fast_query(q("SELECT * FROM customers WHERE id = 9")) is None


def test_the_general_path_audits_a_memo_hit_it_takes_over() -> None:
    s, _ = make()
    warm(s)
    assert s.fast_query(q("SELECT * FROM customers WHERE id = 9")) is not None
    err = frame(b"E", b"SERROR\x00VERROR\x00C57014\x00Mcanceling statement\x00\x00")
    back = BIND_COMPLETE + err + rfq()
    assert s.protected_response(back) is None
    out = s.from_server(back)
    fields = out.audit[0].fields
    assert fields["statement"] == "SELECT * FROM customers WHERE id = 9"
    assert fields["decision"] == "failed" and fields["error"].startswith("57014")
    assert not s._slots and s.tx is TxStatus.IDLE
