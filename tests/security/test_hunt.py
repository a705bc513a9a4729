"""Bypass hunt: attempts not covered by the other files of this suite.

Categories:

* SQL handed to a built-in as text: ``ts_rewrite(tsquery, text)`` runs its second argument as a
  query. Written so that no protected name appears in the statement (``concat``, ``||``,
  ``format``, a bind parameter), the statement used to take the fast path and the query ran on
  the raw table (every branch's phones in one row).
* Lexing settings changed by a statement that is still in flight: a pipelined
  ``SET standard_conforming_strings = off`` or ``SET client_encoding = 'GBK'`` changes how the
  server reads the *next* statement before pgveil sees the ParameterStatus (PostgreSQL reports
  it with ReadyForQuery), so pgveil analysed the attack under the old settings.
* Row packing that max_rows does not see: ``percentile_disc(ARRAY[...]) WITHIN GROUP``.
* PostgreSQL syntax sqlglot may read differently (ROLLUP / CUBE / GROUPING SETS, DISTINCT ON,
  WITH TIES, FILTER, WITHIN GROUP, named windows, ROWS FROM ... WITH ORDINALITY, TABLE ONLY,
  ``customers *``, row comparisons, COLLATE, OPERATOR(), nested comments, comments splitting
  keywords, dollar quotes), checked against the masked-view oracle where the answer is a value.
* Exact-lookup misuse not covered elsewhere, and DML row counts as existence oracles.
"""

from __future__ import annotations

import struct
from typing import Any

import psycopg
import pytest

from tests.security.conftest import (
    LeakChecker,
    Protocol,
    Received,
    ResultSet,
    expect_error,
    expect_rows,
    expect_status,
)


def case(case_id: str, sql: Any, **opts: Any) -> Any:
    return pytest.param(sql, opts, id=case_id)


def denied(received: Received) -> None:
    assert received.denied, f"expected a 42501 denial, got {received.describe()}"


IDS = "where id in (3, 6, 9)"

# ------------------------------------------------------------------ SQL given as text

TS_REWRITE_SQL = "select ''x''::tsquery, plainto_tsquery(''simple'', string_agg(phone, '' '')) "

SQL_AS_TEXT = [
    case("ts_rewrite-concat", "select ts_rewrite('x'::tsquery, concat('select ''x''::tsquery, "
         "phone::tsquery from cust', 'omers where id = 1'))::text", expect=denied),
    case("ts_rewrite-pipes", "select ts_rewrite('x'::tsquery, '" + TS_REWRITE_SQL
         + "from cust' || 'omers where id < 5')::text", expect=denied),
    case("ts_rewrite-plain-name", "select ts_rewrite('x'::tsquery, 'select ''x''::tsquery, "
         "phone::tsquery from customers where id = 1')::text", expect=denied),
    case("ts_rewrite-format", "select ts_rewrite('x'::tsquery, format('select ''x''::tsquery, "
         "id_number::tsquery from %s where id = 1', 'cust' || 'omers'))::text", expect=denied),
    case("ts_rewrite-reverse", "select ts_rewrite('x'::tsquery, reverse('1 = di erehw "
         "sremotsuc morf yreuqst::enohp ,yreuqst::''x'' tceles'))::text", expect=denied),
    case("ts_rewrite-qualified-quoted", "select pg_catalog.\"ts_rewrite\"('x'::tsquery, "
         "concat('select ''x''::tsquery, phone::tsquery from public.cust', 'omers "
         "where id = 2'))::text", expect=denied),
    case("ts_rewrite-accounts", "select ts_rewrite('x'::tsquery, concat('select ''x''::tsquery,"
         " card_no::tsquery from acc', 'ounts where customer_id = 1 limit 1'))::text",
         expect=denied),
    case("ts_rewrite-from-values", "select ts_rewrite('x'::tsquery, q)::text from (values "
         "(concat('select ''x''::tsquery, phone::tsquery from cust', 'omers where id = 1'))) "
         "v(q)", expect=denied),
    case("ts_rewrite-in-where", "select 1 where ts_rewrite('x'::tsquery, concat('select "
         "''x''::tsquery, phone::tsquery from cust', 'omers where id = 1'))::text "
         "like '''13%'", expect=denied),
    case("ts_rewrite-prepared", ["prepare sec_h_tr(text) as select ts_rewrite('x'::tsquery, "
                                 "$1)::text", "execute sec_h_tr(concat('select ''x''::tsquery, "
                                 "phone::tsquery from cust', 'omers where id = 1'))"]),
    case("ts_rewrite-param-extended", "select ts_rewrite('x'::tsquery, %s)::text",
         params=("select 'x'::tsquery, phone::tsquery from customers where id = 1",),
         protocol=Protocol.EXTENDED, expect=denied),
    case("ts_rewrite-param-prepared", "select ts_rewrite('x'::tsquery, %s)::text",
         params=("select 'x'::tsquery, id_number::tsquery from customers where id = 2",),
         protocol=Protocol.PREPARED, expect=denied),
    case("ts_rewrite-three-args-allowed", "select ts_rewrite('a & b'::tsquery, 'a'::tsquery, "
         "'c'::tsquery)::text", expect=expect_rows([("'b' & 'c'",)])),
]

# ------------------------------------------------------------------ settings still in flight

SCS_OFF_ATTACK = "select 'x\\'' , (select phone from customers where id = 1) as p -- '"
# UTF-8 '中' is E4 B8 AD; GBK reads E4 B8 as one character and AD 5C as another, swallowing the
# backslash that, for pgveil, escapes the quote.
GBK_E_ATTACK = (b"select E'\xe4\xb8\xad\\' as a, (select phone from customers where id = 1) "
                b"as p -- '")
GBK_SCS_ATTACK = (b"select '\xe4\xb8\xad\\' as a, (select id_number from customers "
                  b"where id = 2) as p -- '")

PIPELINED = [
    case("pipeline-scs-off", ["set standard_conforming_strings = off", SCS_OFF_ATTACK]),
    case("pipeline-scs-off-set-config", ["select set_config('standard_conforming_strings', "
                                         "'off', false)", SCS_OFF_ATTACK]),
    case("pipeline-gbk-e-string", ["set client_encoding = 'GBK'", GBK_E_ATTACK]),
    case("pipeline-gbk-then-scs-off", ["set client_encoding = 'GBK'",
                                       "set standard_conforming_strings = off",
                                       GBK_SCS_ATTACK]),
    case("pipeline-gb18030", ["set client_encoding = 'GB18030'", GBK_E_ATTACK]),
    case("pipeline-set-local-in-tx", ["begin", "set local standard_conforming_strings = off",
                                      SCS_OFF_ATTACK, "rollback"]),
    case("pipeline-reset-then-attack", ["set standard_conforming_strings = off",
                                        "reset standard_conforming_strings",
                                        "set standard_conforming_strings = off",
                                        SCS_OFF_ATTACK]),
]


def _query(sql: bytes) -> bytes:
    body = sql + b"\x00"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def _raw_pipeline(leak: LeakChecker, statements: list[bytes], login: str = "teller_sz01"
                  ) -> Received:
    """Send several simple Query messages in one write (no waiting in between) and collect
    everything until each has its ReadyForQuery."""
    import socket

    received = Received()
    conn = leak.connect(login)
    try:
        sock = socket.socket(fileno=conn.pgconn.socket)
        try:
            sock.settimeout(10)
            sock.sendall(b"".join(_query(s) for s in statements))
            buf = b""
            ready = 0
            rows: list[tuple[Any, ...]] = []
            while ready < len(statements):
                while len(buf) < 5 or len(buf) < 1 + struct.unpack_from("!I", buf, 1)[0]:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise AssertionError("pgveil closed the connection")
                    buf += chunk
                mtype = buf[:1]
                end = 1 + struct.unpack_from("!I", buf, 1)[0]
                body, buf = buf[5:end], buf[end:]
                if mtype == b"D":
                    count = struct.unpack_from("!H", body, 0)[0]
                    pos, row = 2, []
                    for _ in range(count):
                        size = struct.unpack_from("!i", body, pos)[0]
                        pos += 4
                        if size < 0:
                            row.append(None)
                        else:
                            row.append(body[pos:pos + size].decode("utf-8", "replace"))
                            pos += size
                    rows.append(tuple(row))
                elif mtype in (b"E", b"N"):
                    fields = {}
                    for part in body.split(b"\x00"):
                        if part:
                            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
                    item = {"sqlstate": fields.get("C", ""), "message_primary": fields.get("M", ""),
                            "message_detail": fields.get("D", ""), "text": fields.get("M", "")}
                    (received.errors if mtype == b"E" else received.notices).append(item)
                elif mtype == b"C":
                    received.results.append(ResultSet([], rows, body.rstrip(b"\x00").decode()))
                    rows = []
                elif mtype == b"Z":
                    ready += 1
                elif mtype == b"S":
                    name, value = body.rstrip(b"\x00").split(b"\x00", 1)
                    received.params[name.decode()] = value.decode("utf-8", "replace")
        finally:
            sock.detach()
        conn.execute("rollback")
        received.alive = conn.execute("select 1").fetchone() == (1,)
    finally:
        conn.close()
    return received


RAW_PIPELINED = [
    pytest.param([b"set standard_conforming_strings = off", SCS_OFF_ATTACK.encode()],
                 id="simple-scs-off"),
    pytest.param([b"set client_encoding = 'GBK'", GBK_E_ATTACK], id="simple-gbk"),
    pytest.param([b"select set_config('client_encoding', 'SJIS', false)",
                  GBK_E_ATTACK.replace(b"\xe4\xb8\xad", b"\xe3\x81\x95")], id="simple-sjis"),
    pytest.param([b"set standard_conforming_strings = off", b"select 1",
                  SCS_OFF_ATTACK.encode()], id="simple-scs-off-two-later"),
]

# ------------------------------------------------------------------ packing and syntax

PACKING = [
    case("percentile_disc-array", "select percentile_disc(array[0, 0.25, 0.5, 0.75, 1]) "
         "within group (order by phone) from customers where id > 0", expect=denied),
    case("percentile_disc-array-literal", "select percentile_disc('{0,0.1,0.2,0.3,0.4,0.5,0.6,"
         "0.7,0.8,0.9,1}'::float8[]) within group (order by id_number) from customers "
         "where id > 0", expect=denied),
    case("percentile_disc-generated-fractions", "select percentile_disc(array(select g / 700.0 "
         "from generate_series(0, 700) g)) within group (order by id) from customers "
         "where id > 0", expect=denied),
    case("percentile_cont-array-accounts", "select percentile_cont(array[0, 0.5, 1]) within "
         "group (order by balance) from accounts where customer_id > 0", expect=denied),
    case("percentile_disc-manager", "select percentile_disc(array[0, 0.01, 0.02, 0.03, 0.5, 1])"
         " within group (order by phone) from customers where id > 0", login="manager_sz01",
         expect=denied),
    case("percentile_disc-scalar-allowed", "select percentile_disc(0.5) within group "
         "(order by level) from customers where id > 0"),
    # one value per (SELECT ...): 60 customers in one row, over the teller's 50-row cap
    case("scalar-subqueries-over-max_rows", "select " + ", ".join(
        f"(select phone from customers where id = {3 * i})" for i in range(1, 61)),
        expect=denied),
    case("scalar-subqueries-over-max_rows-in-where", "select 1 where " + " and ".join(
        f"(select level from customers where id = {3 * i}) > 0" for i in range(1, 61)),
        expect=denied),
    case("scalar-subqueries-within-max_rows", "select " + ", ".join(
        f"(select phone from customers where id = {3 * i})" for i in range(1, 6))),
]

SYNTAX = [
    case("rollup", f"select phone, id_number, count(*) from customers {IDS} "
         "group by rollup (phone, id_number)", masked_equiv=True),
    case("cube", f"select name, email, count(*) from customers {IDS} group by cube (name, email)",
         masked_equiv=True),
    case("grouping-sets-substr", "select substr(phone, 4, 4), grouping(substr(phone, 4, 4)), "
         f"count(*) from customers {IDS} group by grouping sets ((substr(phone, 4, 4)), ())",
         masked_equiv=True),
    case("distinct-on-masked", "select distinct on (substr(id_number, 7, 8)) id, "
         "substr(id_number, 7, 8) from customers where id < 40 order by substr(id_number, 7, 8),"
         " id", masked_equiv=True),
    case("with-ties-order-by-masked", "select id from customers where id < 30 "
         "order by substr(phone, 5, 3) fetch first 2 rows with ties", masked_equiv=True),
    case("filter-clause", "select count(*) filter (where phone like '1860%'), "
         "count(*) filter (where id_number like '%1983%') from customers where id > 0",
         masked_equiv=True),
    case("within-group-mode", "select mode() within group (order by substr(phone, 4, 1)) "
         "from customers where id > 0", masked_equiv=True),
    case("named-window", f"select id, first_value(phone) over w, lag(id_number) over w "
         f"from customers {IDS} window w as (order by id)", masked_equiv=True),
    case("named-window-ordered-by-masked", "select id, row_number() over w from customers "
         "where id in (3, 6, 9, 12, 15) window w as (order by substr(phone, 5, 4))",
         masked_equiv=True),
    case("jsonb_path_query", f"select jsonb_path_query(to_jsonb(c), '$.phone') from customers c "
         f"{IDS}", masked_equiv=True),
    case("jsonb_path_exists-filter", "select count(*) from customers c where jsonb_path_exists("
         "to_jsonb(c), '$.phone ? (@ starts with \"1860\")')", masked_equiv=True),
    case("json_table-like-lateral", "select x.key, x.value from customers c, "
         "jsonb_each_text(to_jsonb(c)) x where c.id = 3 and x.key in ('phone', 'id_number')",
         masked_equiv=True),
    case("rows-from-ordinality", "select g.n, c.phone from rows from (generate_series(1, 2)) "
         "with ordinality g(a, n), customers c where c.id = 3", masked_equiv=True),
    case("unnest-with-ordinality-of-masked", "select u.ch, u.n from customers c, "
         "unnest(string_to_array(c.phone, NULL)) with ordinality u(ch, n) where c.id = 3",
         masked_equiv=True),
    case("table-only-limit", "table only customers limit 3"),
    case("inheritance-star-out-of-scope", "select * from customers * where id = 1",
         expect=expect_rows([])),
    case("only-parenthesised", "select phone from only (customers) where id = 3"),
    case("for-update-of-table", "select phone, id_number from customers where id = 3 "
         "for update of customers", tx=True),
    case("is-distinct-from-masked", "select count(*) from customers "
         "where phone is not distinct from '<<phone:3>>'", masked_equiv=True),
    case("row-comparison-gt", "select count(*) from customers where (phone, id) > "
         "('1860', 0) and id > 0", masked_equiv=True),
    case("all-array", "select count(*) from customers where phone <> all(array['<<phone:3>>'])"
         " and id > 0", masked_equiv=True),
    case("like-escape", "select count(*) from customers where phone like '1860#%' escape '#' "
         "or phone like '186%0%' escape '#'", masked_equiv=True),
    case("similar-to-escape", "select count(*) from customers where id_number similar to "
         "'%#(19%' escape '#' or id_number similar to '%(1983)%'", masked_equiv=True),
    case("collate-c-order", "select id from customers where id < 30 "
         "order by substr(phone, 4, 4) collate \"C\" desc, id limit 5", masked_equiv=True),
    case("operator-syntax-lookup", "select count(*) from customers "
         "where phone operator(pg_catalog.=) '<<phone:3>>'", masked_equiv=True),
    case("operator-syntax-like", "select count(*) from customers "
         "where phone operator(pg_catalog.~~) '1860%'", masked_equiv=True),
    # a regclass value reads nothing by itself (catalog queries, psql \d and ORM reflection
    # use it); what reads a table given as one -- table_to_xml -- is denied by name
    case("regclass-cast", "select 'customers'::regclass::oid > 0"),
    case("regclass-function-style", "select regclass('customers')::oid > 0"),
    case("regclass-cast-syntax", "select cast('public.customers' as pg_catalog.regclass)"),
    case("regclass-to-table_to_xml", "select table_to_xml('customers'::regclass, true, true, '')",
         expect=denied),
    case("nested-comment-hides-nothing", "select /* a /* b */ phone from accounts */ phone "
         "from customers where id = 3"),
    case("comment-splitting-keywords", "sel/**/ect phone fr/**/om customers where id = 3"),
    case("line-comment-before-from", "select phone --\nfrom--\ncustomers--\nwhere id = 3"),
    case("dollar-quoted-lookup", "select count(*) from customers "
         "where phone = $x$<<phone:3>>$x$", masked_equiv=True),
    case("e-string-lookup", "select count(*) from customers where phone = E'<<phone:3>>'",
         masked_equiv=True),
]

LOOKUP_MISUSE = [
    case("lower-literal", "select count(*) from customers where phone = lower('<<phone:3>>')",
         masked_equiv=True),
    case("cast-column", "select count(*) from customers where phone::text = '<<phone:3>>'",
         masked_equiv=True),
    case("collate-literal", "select count(*) from customers "
         "where phone = '<<phone:3>>' collate \"C\"", masked_equiv=True),
    case("collate-column", "select count(*) from customers "
         "where phone collate \"C\" = '<<phone:3>>'", masked_equiv=True),
    case("parenthesised-column", "select count(*) from customers where (phone) = '<<phone:3>>'",
         masked_equiv=True),
    case("between-equal-ends", "select count(*) from customers "
         "where phone between '<<phone:3>>' and '<<phone:3>>'", masked_equiv=True),
    case("ge-and-le", "select count(*) from customers where id_number >= '<<id_number:3>>' "
         "and id_number <= '<<id_number:3>>'", masked_equiv=True),
    case("eq-is-not-false-suffix", "select count(*) from customers c "
         "where c.phone = '<<phone:3>>' is not false", masked_equiv=True),
    case("lookup-in-join-on", "select count(*) from branches b join customers c "
         "on c.phone = '<<phone:3>>' and c.branch_id = b.id", masked_equiv=True),
    case("lookup-other-branch-in-exists", "select count(*) from branches b where exists "
         "(select 1 from customers c where c.phone = '<<phone:1>>')", expect=expect_rows([(0,)])),
    case("lookup-other-branch-lateral", "select count(*) from branches b, lateral (select id "
         "from customers c where c.id_number = '<<id_number:2>>') x", expect=expect_rows([(0,)])),
    case("lookup-other-branch-cte", "with x as (select id from customers "
         "where phone in ('<<phone:1>>', '<<phone:2>>')) select count(*) from x",
         expect=expect_rows([(0,)])),
    case("lookup-other-branch-union", "select id from customers where phone = '<<phone:1>>' "
         "union all select id from customers where id_number = '<<id_number:2>>'",
         expect=expect_rows([])),
]

DML_ORACLES = [
    case("update-lookup-other-branch-returning", "update customers set level = level "
         "where phone = '<<phone:1>>' returning id", tx=True, expect=expect_status("UPDATE 0")),
    case("update-lookup-in-list-other-branch", "update customers set level = level "
         "where id_number in ('<<id_number:1>>', '<<id_number:2>>')", tx=True,
         expect=expect_status("UPDATE 0")),
    case("delete-orders-by-lookup-other-branch", "delete from orders where customer_id in "
         "(select id from customers where phone = '<<phone:1>>')", tx=True,
         expect=expect_status("DELETE 0")),
    case("update-where-functional-field", "update customers set level = level "
         "where id = 3 and phone(customers) like '186%'", tx=True, expect=expect_error),
    case("update-where-composite-field", "update customers c set level = level "
         "where id = 3 and (c).id_number like '3301%'", tx=True, expect=expect_error),
    case("delete-returning-functional-field", "delete from orders o where id = -1 "
         "returning (select phone(c) from customers c where c.id = 3)", tx=True),
    case("update-set-multi-column-swap", "update customers set (name, phone) = (phone, name) "
         "where id = 3 returning id", tx=True, expect=expect_error),
    case("update-set-row-subquery", "update customers set (level) = (select length(phone)) "
         "where id = 3", tx=True, expect=expect_error),
]


# A failed PREPARE / DEALLOCATE must not change which decision an EXECUTE inherits: PostgreSQL
# keeps the old (rewritten, protected) statement, pgveil used to record the new one.
NAME_REUSE = [
    case("prepare-twice-explain-analyze", [
        "prepare sec_h_p1(int) as select id from customers where id = $1",
        "prepare sec_h_p1 as select 1",
        "explain (analyze, costs off, timing off, summary off) execute sec_h_p1(1)"],
        expect=lambda r: _no_plan_rows(r)),
    case("prepare-twice-row-cap", [
        "prepare sec_h_p2 as select id, phone from customers where id > 0",
        "prepare sec_h_p2 as select 1", "execute sec_h_p2"]),
    case("failed-deallocate-in-aborted-tx", [
        "prepare sec_h_p3 as select id, phone from customers where id > 0",
        "begin", "select 1/0", "deallocate sec_h_p3", "rollback",
        "prepare sec_h_p3 as select 1", "execute sec_h_p3"]),
    case("failed-deallocate-then-explain-analyze", [
        "prepare sec_h_p4(int) as select id from customers where id = $1",
        "begin", "select 1/0", "deallocate sec_h_p4", "rollback",
        "prepare sec_h_p4(int) as select $1",
        "explain (analyze, costs off, timing off, summary off) execute sec_h_p4(1)"],
        expect=lambda r: _no_plan_rows(r)),
    case("deallocate-then-reprepare-works", [
        "prepare sec_h_p5 as select id, phone from customers where id > 0 limit 3",
        "deallocate sec_h_p5", "prepare sec_h_p5 as select id, phone from customers where id = 3",
        "execute sec_h_p5"], expect=lambda r: _rows_exactly(r, [(3, "186****4187")])),
    case("discard-all-then-reprepare-works", [
        "prepare sec_h_p6 as select id, phone from customers where id = 3",
        "discard all", "prepare sec_h_p6 as select 2", "execute sec_h_p6"],
        expect=lambda r: _rows_exactly(r, [(2,)])),
    case("failed-prepare-name-reusable", [
        "prepare sec_h_p7 as select nosuchcol from customers where id = 3",
        "prepare sec_h_p7 as select id from customers where id = 3", "execute sec_h_p7"],
        expect=lambda r: _rows_exactly(r, [(3,)])),
]


def _no_plan_rows(received: Received) -> None:
    plan = " ".join(str(v) for row in received.rows for v in row)
    assert "Rows Removed by Filter" not in plan, plan


def _rows_exactly(received: Received, rows: list[tuple[Any, ...]]) -> None:
    assert received.rows == rows, received.describe()


@pytest.mark.parametrize(("sql", "opts"), NAME_REUSE)
def test_prepared_name_reuse(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


def test_protocol_parse_over_protected_name(leak: LeakChecker) -> None:
    """A wire Parse of a name that holds a protected SQL-level statement is refused (PostgreSQL
    would keep the old one), so EXECUTE still runs under the protected decision's row cap."""
    conn = leak.connect()
    received = Received()
    try:
        conn.execute("prepare sec_h_w1 as select id, phone from customers where id > 0")
        res = conn.pgconn.prepare(b"sec_h_w1", b"select 1")
        received.errors.append({"sqlstate": res.error_field(psycopg.pq.DiagnosticField.SQLSTATE)
                                .decode() if res.error_field(psycopg.pq.DiagnosticField.SQLSTATE)
                                else ""})
        try:
            rows = conn.execute("execute sec_h_w1").fetchall()
            received.results.append(ResultSet(["id", "phone"], rows))
        except psycopg.Error as exc:
            received.errors.append({"sqlstate": exc.sqlstate or "", "text": str(exc)})
        received.alive = conn.execute("select 1").fetchone() == (1,)
    finally:
        conn.close()
    leak.check(received, "prepare sec_h_w1 as select id, phone from customers where id > 0")
    assert "42P05" in received.sqlstates, received.describe()


@pytest.mark.parametrize(("sql", "opts"), SQL_AS_TEXT)
def test_sql_given_as_text(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


@pytest.mark.parametrize(("sql", "opts"), PIPELINED)
def test_pipelined_lexing_settings(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, protocol=Protocol.PIPELINE, **opts)


@pytest.mark.parametrize("statements", RAW_PIPELINED)
def test_back_to_back_simple_queries(leak: LeakChecker, statements: list[bytes]) -> None:
    received = _raw_pipeline(leak, statements)
    leak.check(received, [s.decode("latin-1") for s in statements])
    assert received.denied, received.describe()


def test_pipelined_lookup_with_non_ascii_still_works(leak: LeakChecker) -> None:
    """Control: text without backslashes is read the same under any setting, so a pipelined
    statement with CJK text is still analysed (and answered) normally."""
    received = leak.assert_no_leak(
        ["set client_encoding = 'UTF8'",
         "select id, '客户' as t from customers where phone = '<<phone:3>>'"],
        protocol=Protocol.PIPELINE)
    assert [r[0] for r in received.rows if isinstance(r[0], int)] == [3], received.describe()


def test_settings_known_again_after_ready(leak: LeakChecker) -> None:
    """Control: once the server answered, pgveil knows the new setting and its usual guard
    applies (not the in-flight one); the session keeps working."""
    conn = leak.connect()
    try:
        conn.execute("set standard_conforming_strings = off")
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(SCS_OFF_ATTACK)
        assert refused.value.sqlstate == "42501"
        assert "standard_conforming_strings off" in str(refused.value)
        assert conn.execute("select 1").fetchone() == (1,)
    finally:
        conn.close()


@pytest.mark.parametrize(("sql", "opts"), PACKING)
def test_row_packing(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


@pytest.mark.parametrize(("sql", "opts"), SYNTAX)
def test_postgres_syntax(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


@pytest.mark.parametrize(("sql", "opts"), LOOKUP_MISUSE)
def test_lookup_misuse(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


@pytest.mark.parametrize(("sql", "opts"), DML_ORACLES)
def test_dml_oracles(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)
