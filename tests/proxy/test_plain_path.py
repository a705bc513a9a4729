"""The pass-through hot path: a single plain statement is decided once per text shape (digits
zeroed) and per view, and its results are accounted for without per-message dispatch."""

from __future__ import annotations

import dataclasses

from proxy.session import Session, TxStatus
from rewriters.analyze import Analyzer
from rewriters.model import Action, Analysis, LexSettings, OperatorView, StatementDecision
from tests.proxy.test_server_prepare import VIEW
from tests.proxy.test_session import ROW_DESC, complete, data_row, frame, q, rfq


def make(memoizable: bool = True) -> tuple[Session, list[str]]:
    calls: list[str] = []

    def plain(sql: str, view: OperatorView) -> str | None:
        calls.append(sql)
        return "" if "customers" in sql else "select"

    def analyze(sql: str, view: OperatorView, lex: LexSettings, **kw: object) -> Analysis:
        if "customers" not in sql:
            return Analysis(sql=sql, statements=(StatementDecision(Action.FORWARD, sql,
                                                                   "select"),))
        st = StatementDecision(Action.REWRITE, "SELECT masked", "select",
                               tables=("public.customers",))
        return Analysis(sql="SELECT masked", statements=(st,))

    s = Session(view=VIEW, analyze=analyze, lex=LexSettings(), identity={},
                plain_kind=plain, plain_memoizable=lambda v: memoizable)
    return s, calls


def test_digits_do_not_make_a_new_decision() -> None:
    s, calls = make()
    for n in (1, 22, 333, 9):
        frame = q(f"select abalance from pgbench_accounts where aid = {n}")
        assert s.fast_query(frame) is frame
        assert s.plain_response(ROW_DESC + data_row(b"0") + complete("SELECT 1") + rfq()) > 0
    assert len(calls) == 3  # 1 and 9 share a key ("0"), 22 and 333 have their own
    assert s.tx is TxStatus.IDLE and not s.busy


def test_a_new_view_decides_again() -> None:
    s, calls = make()
    frame = q("select 1")
    assert s.fast_query(frame) is frame
    s.plain_response(complete("SELECT 1") + rfq())
    s.view = dataclasses.replace(VIEW, policy_version="t2")  # a grant or a reload
    assert s.fast_query(frame) is frame
    assert len(calls) == 2


def test_without_a_memo_every_text_is_decided() -> None:
    s, calls = make(memoizable=False)
    for _ in range(3):
        assert s.fast_query(q("select 1")) is not None
        s.plain_response(complete("SELECT 1") + rfq())
    assert len(calls) == 3


def test_sensitive_text_goes_to_the_full_analysis_once() -> None:
    s, calls = make()
    frame = q("select phone from customers where id = 3")
    assert s.fast_query(frame) is None
    out = s.from_client(frame)
    assert b"SELECT masked" in b"".join(out.to_server)
    assert len(calls) == 1  # from_client reused the plain check's answer


def test_plain_response_stops_at_what_needs_the_general_path() -> None:
    s, _ = make()
    assert s.fast_query(q("set x = 1")) is not None
    status = frame(b"S", b"x\x001\x00")
    data = complete("SET") + status + rfq()
    # ParameterStatus is tracked by the general path: the prefix stops in front of it
    assert s.plain_response(data) == len(complete("SET"))


def _view_with_table(name: str) -> OperatorView:
    from rewriters.model import ColumnView, TableView

    table = TableView(name=f"public.{name}", columns=(ColumnView("id", "integer"),))
    return dataclasses.replace(VIEW, tables={f"public.{name}": table})


def test_no_memo_when_a_sensitive_name_holds_a_digit() -> None:
    analyzer = Analyzer()
    assert analyzer.plain_memoizable(_view_with_table("customers"))
    # "t1" vs "t2" would share a digit-zeroed key: no memo for such a view
    view = _view_with_table("t1")
    assert not analyzer.plain_memoizable(view)
    assert analyzer.plain_kind("select * from t2", view) == "select"
    assert analyzer.plain_kind("select * from t1", view) == ""


def _bind(portal: bytes, stmt: bytes, *params: bytes) -> bytes:
    body = portal + b"\x00" + stmt + b"\x00" + b"\x00\x00" + len(params).to_bytes(2, "big")
    for p in params:
        body += len(p).to_bytes(4, "big") + p
    return frame(b"B", body + b"\x00\x00")


def _batch(stmt: bytes = b"s1", portal: bytes = b"", describe: bool = True,
           exec_portal: bytes | None = None) -> bytes:
    out = _bind(portal, stmt, b"42")
    if describe:
        out += frame(b"D", b"P" + portal + b"\x00")
    out += frame(b"E", (portal if exec_portal is None else exec_portal) + b"\x00\x00\x00\x00\x00")
    return out + frame(b"S", b"")


def _parsed(s: Session, sql: str, name: bytes = b"s1") -> None:
    s.from_client(frame(b"P", name + b"\x00" + sql.encode() + b"\x00\x00\x00") + frame(b"S", b""))
    s.from_server(frame(b"1", b"") + rfq())


def test_pass_through_bind_execute_sync_is_tracked_like_the_general_path() -> None:
    fast, _ = make()
    slow, _ = make()
    for s in (fast, slow):
        _parsed(s, "select 1")
    for describe in (True, False):
        data = _batch(describe=describe)
        assert fast.fast_batch(data)
        out = slow.from_client(data)
        assert b"".join(out.to_server) == data
        assert [x.kind for x in fast._slots] == [x.kind for x in slow._slots] == \
            ["execute", "sync"]
        back = frame(b"2", b"") + ROW_DESC + data_row(b"1") + complete("SELECT 1") + rfq()
        assert fast.plain_response(back) == len(back)
        assert b"".join(slow.from_server(back).to_client) == back
        assert not fast._slots and not slow._slots and fast.tx is slow.tx is TxStatus.IDLE


def test_batches_needing_the_general_path_are_refused() -> None:
    s, _ = make()
    _parsed(s, "select phone from customers where id = $1")  # protected: has a decision
    assert not s.fast_batch(_batch())
    _parsed(s, "select 1", b"s2")
    assert not s.fast_batch(_batch(b"s2", exec_portal=b"other"))  # Execute of another portal
    assert not s.fast_batch(_batch(b"s2")[:-5])  # no Sync: a pipeline continues
    assert not s.fast_batch(_batch(b"s2") + frame(b"S", b""))  # more than one batch
    assert s.fast_batch(_batch(b"s2"))
