"""``pgveil discover``: the validators, the name rules, the snippet, and live scans.

The pure tests pin the validators on published examples (GB 11643's ID number, the standard test
card numbers) and on real values of proxy/data/bank.sql, and pin the false positives we must
not produce (branch names, city names, free text, amounts). The live tests scan the bank
database and require exactly the policy's sensitive columns — no more, no less — and scan a
scratch database for the harder cases: value-only detection, phones stored as bigint,
TABLESAMPLE on a large table, a table the login may not read, and ``pgveil check``'s warnings.
"""

from __future__ import annotations

import argparse
import random
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import yaml

from proxy import discover as d
from proxy.config import parse_config
from rewriters.policy import parse_policy

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "config" / "policy.yaml"

# ---------------------------------------------------------------------------------- validators


@pytest.mark.parametrize("value", [
    "11010519491231002X",  # the example of GB 11643
    "11010519491231002x",
    "310115198109060373",  # bank.sql customer 1
    "440106196204180748",  # bank.sql customer 2
    " 330106198312231112 ",
])
def test_prc_id_valid(value: str) -> None:
    assert d.is_prc_id(value)


@pytest.mark.parametrize("value", [
    "110105194912310021",  # wrong check digit
    "310115198109060374",  # wrong check digit
    "310115198102300378",  # February 30th
    "990115198109060373",  # no such province
    "310115180009060373",  # born before 1900
    "31011519810906037",  # 17 characters
    "3101151981090603730",  # 19 characters
    "31011519810906037Y",
    "",
])
def test_prc_id_invalid(value: str) -> None:
    assert not d.is_prc_id(value)


def test_prc_id_check_digit_maps_ten_to_x() -> None:
    assert d.prc_id_check_digit("11010519491231002") == "X"
    assert d.prc_id_check_digit("31011519810906037") == "3"
    with pytest.raises(ValueError):
        d.prc_id_check_digit("1234")


@pytest.mark.parametrize("digits,ok", [
    ("4111111111111111", True), ("4111111111111112", False), ("5500000000000004", True),
    ("378282246310005", True), ("6222020000618162", True), ("6222020000618163", False),
    ("0", True), ("12a4", False),
])
def test_luhn(digits: str, ok: bool) -> None:
    assert d.luhn_valid(digits) is ok


@pytest.mark.parametrize("value,ok", [
    ("6222020000618162", True), ("6222 0200 0061 8162", True), ("6222-0200-0061-8162", True),
    ("4111111111111111", True), ("378282246310005", True),
    ("0000000000000000", False),  # passes Luhn, but a placeholder
    ("411111111111", False),  # 12 digits
    ("41111111111111111113", False),  # 20 digits
    ("6222020000618163", False), ("13900104729", False), ("79.19", False),
])
def test_bank_card(value: str, ok: bool) -> None:
    assert d.is_bank_card(value) is ok


@pytest.mark.parametrize("value,ok", [
    ("13900104729", True), ("15800209458", True), ("19912345678", True),
    ("+86 139 0010 4729", True), ("8613900104729", True), ("0086-139-0010-4729", True),
    ("12900104729", False), ("1390010472", False), ("139001047290", False),
    ("23900104729", False), ("0755-88888888", False), ("order 1", False),
])
def test_cn_mobile(value: str, ok: bool) -> None:
    assert d.is_cn_mobile(value) is ok


@pytest.mark.parametrize("value,ok", [
    ("user1@example.com", True), ("zhang.san+bank@mail.example.cn", True),
    ("user1@localhost", False), ("user1example.com", False), ("a b@example.com", False),
    ("@example.com", False),
])
def test_email(value: str, ok: bool) -> None:
    assert d.is_email(value) is ok


@pytest.mark.parametrize("value", ["赵涛", "胡娜", "李超", "王秀英", "欧阳建华", "司马光", "张志强"])
def test_chinese_name_valid(value: str) -> None:
    assert d.is_chinese_name(value)


@pytest.mark.parametrize("value", [
    "深圳福田营业厅", "广州天河营业厅", "深圳", "广州", "北京", "上海",  # branches.name / city
    "高州市", "黄山路", "王", "王小明的朋友们", "order 1", "Wang Wei", "欧阳",
])
def test_chinese_name_invalid(value: str) -> None:
    assert not d.is_chinese_name(value)


@pytest.mark.parametrize("value,ok", [
    ("广东省深圳市福田区深南大道2号", True), ("北京市朝阳区建国路3号", True),
    ("上海市浦东新区世纪大道100弄5栋1201室", True), ("221B Baker Street", True),
    ("10 Downing St", True),
    ("深圳福田营业厅", False), ("深圳", False), ("order 12", False), ("广东省深圳市", False),
])
def test_address(value: str, ok: bool) -> None:
    assert d.is_address(value) is ok


# ---------------------------------------------------------------------------------- name rules

C = d.Category


@pytest.mark.parametrize("table,column,type_sql,expected", [
    ("customers", "name", "text", C.PERSON_NAME),
    ("branches", "name", "text", None),  # a branch, not a person
    ("products", "name", "text", None),
    ("t_user_info", "name", "character varying(32)", C.PERSON_NAME),
    ("orders", "customer_name", "text", C.PERSON_NAME),
    ("orders", "branch_name", "text", None),
    ("accounts", "card_holder", "text", C.PERSON_NAME),
    ("accounts", "card_holder_name", "text", C.PERSON_NAME),
    ("staff", "realName", "text", C.PERSON_NAME),
    ("customers", "name_en", "text", C.PERSON_NAME),
    ("branches", "name_en", "text", None),
    ("customers", "phone", "text", C.PHONE),
    ("customers", "mobile_no", "varchar(20)", C.PHONE),
    ("customers", "tel", "text", C.PHONE),
    ("customers", "phone", "bigint", C.PHONE),
    ("customers", "phone_verified", "boolean", None),
    ("customers", "phone_count", "integer", None),
    ("customers", "手机号码", "text", C.PHONE),
    ("customers", "id_number", "text", C.ID_NUMBER),
    ("customers", "IDCardNo", "text", C.ID_NUMBER),
    ("customers", "idcard", "text", C.ID_NUMBER),
    ("customers", "身份证号", "text", C.ID_NUMBER),
    ("customers", "id", "integer", None),
    ("orders", "customer_id", "integer", None),
    ("customers", "id_card_type", "text", None),
    ("customers", "email", "text", C.EMAIL),
    ("customers", "e_mail", "text", C.EMAIL),
    ("customers", "email_domain", "text", None),
    ("customers", "address", "text", C.ADDRESS),
    ("customers", "home_addr", "text", C.ADDRESS),
    ("customers", "mailing_address", "text", C.ADDRESS),
    ("sessions", "ip_address", "inet", None),
    ("sessions", "ip_address", "text", None),
    ("customers", "联系地址", "text", C.ADDRESS),
    ("accounts", "card_no", "text", C.BANK_CARD),
    ("accounts", "card", "text", C.BANK_CARD),
    ("accounts", "bank_card", "text", C.BANK_CARD),
    ("accounts", "card_type", "text", None),
    ("accounts", "account_no", "text", C.BANK_CARD),
    ("customers", "birthday", "date", C.BIRTHDAY),
    ("customers", "date_of_birth", "date", C.BIRTHDAY),
    ("customers", "dob", "text", C.BIRTHDAY),
    ("customers", "birth_place", "text", None),
    ("accounts", "balance", "numeric(14,2)", C.FINANCIAL),
    ("accounts", "credit_limit", "numeric", C.FINANCIAL),
    ("orders", "amount", "numeric(12,2)", None),
    ("orders", "note", "text", None),
    ("accounts", "opened_on", "date", None),
    ("customers", "created_at", "timestamp with time zone", None),
    ("customers", "level", "integer", None),
    ("branches", "city", "text", None),
    ("users", "password_hash", "text", C.SECRET),
])
def test_name_category(table: str, column: str, type_sql: str,
                       expected: d.Category | None) -> None:
    assert d.name_category(table, column, type_sql) is expected


def test_name_tokens() -> None:
    assert d.name_tokens("IDCardNo") == ("id", "card", "no")
    assert d.name_tokens("customer_phone2") == ("customer", "phone", "2")
    assert d.name_tokens("e-mail") == ("e", "mail")


@pytest.mark.parametrize("category,type_sql,mask", [
    (C.PHONE, "text", "phone"), (C.PHONE, "bigint", "null"), (C.ID_NUMBER, "text", "id_number"),
    (C.BANK_CARD, "character varying(19)", "bank_card"), (C.BANK_CARD, "numeric(19,0)", "null"),
    (C.EMAIL, "text", "email"), (C.PERSON_NAME, "text", "chinese_name"),
    (C.ADDRESS, "text", '{redact: "******"}'), (C.BIRTHDAY, "date", "{truncate: year}"),
    (C.BIRTHDAY, "timestamp without time zone", "{truncate: year}"),
    (C.BIRTHDAY, "text", "{keep: [4, 0]}"), (C.FINANCIAL, "numeric(14,2)", "null"),
])
def test_propose_mask(category: d.Category, type_sql: str, mask: str) -> None:
    assert d.propose_mask(category, type_sql) == mask


# ------------------------------------------------------------------------------ value matching


def test_value_match_needs_most_values() -> None:
    rng = random.Random(7)
    # random 16-digit numbers: about one in ten passes Luhn -> not a card column
    numbers = [str(rng.randrange(10**15, 10**16)) for _ in range(200)]
    assert d.value_match(numbers) is None
    phones = ["13900104729"] * 90 + ["n/a"] * 10
    m = d.value_match(phones + [None, "", "  "])
    assert m == d.ValueMatch(C.PHONE, 90, 100)
    assert d.value_match(["13900104729"] * 70 + ["n/a"] * 30) is None
    assert d.value_match([None, None]) is None


def test_value_match_prefers_the_specific_validator() -> None:
    ids = ["310115198109060373", "440106196204180748", "330106198312231112"]
    assert d.value_match(ids).category is C.ID_NUMBER  # type: ignore[union-attr]


def test_value_match_no_false_positives_on_bank_lookalikes() -> None:
    assert d.value_match(["深圳福田营业厅", "广州天河营业厅", "北京朝阳营业厅"]) is None  # branches.name
    assert d.value_match(["深圳", "广州", "北京"]) is None  # branches.city
    assert d.value_match([f"order {i}" for i in range(1, 200)]) is None  # orders.note
    assert d.value_match(["79.19", "158.38", "237.57", "1126.48"]) is None  # amounts
    assert d.value_match(["SZ01", "GZ01", "BJ01"]) is None
    # two names are not enough evidence to call a column "names"
    assert d.value_match(["王伟", "李娜"]) is None
    assert d.value_match(["王伟", "李娜", "张敏"]).category is C.PERSON_NAME  # type: ignore[union-attr]


def _table(name: str, *cols: tuple[str, str], schema: str = "public") -> d.TableInfo:
    return d.TableInfo(schema, name, "r", 100.0,
                       tuple(d.ColumnInfo(c, t) for c, t in cols))


def test_classify_column_evidence() -> None:
    t = _table("contacts", ("col_a", "text"), ("phone", "text"), ("dob", "date"),
               ("mobile", "text"))
    f = d.classify_column(t, t.columns[0], ["310115198109060373"] * 5)
    assert f is not None and f.category is C.ID_NUMBER and f.by_name is None
    assert f.reason == "5 of 5 sampled values are PRC ID numbers (checksum valid)"
    f = d.classify_column(t, t.columns[1], ["13900104729", "15800209458"])
    assert f is not None and f.reason == "name match; 2 of 2 sampled values are mobile numbers"
    f = d.classify_column(t, t.columns[2], None)
    assert f is not None and f.reason == "name match (birth dates)" and f.mask == "{truncate: year}"
    # the data wins over the name, and says so
    f = d.classify_column(t, t.columns[3], ["user1@example.com"] * 3)
    assert f is not None and f.category is C.EMAIL and f.by_name is C.PHONE
    assert f.reason.startswith("name suggests mobile numbers; 3 of 3")
    f = d.classify_column(t, t.columns[1], ["n/a", "unknown"])
    assert f is not None and f.category is C.PHONE and "0 of 2 sampled values matched" in f.reason
    assert d.classify_column(_table("branches", ("name", "text")),
                             d.ColumnInfo("name", "text"), ["深圳福田营业厅"]) is None


# ----------------------------------------------------------------------------------- rendering

_ROLES = "roles:\n  default: {}\n"


def _snippet_policy(text: str) -> object:
    return parse_policy(text + _ROLES, "snippet.yaml", {})


def test_render_snippet_is_a_valid_policy_section() -> None:
    customers = _table("customers", ("id", "integer"), ("name", "text"), ("phone", "text"),
                       ("no", "text"), ("手机", "text"), ("birthday", "date"))
    orders = d.TableInfo("public", "orders", "r", 10.0,
                         (d.ColumnInfo("amount", "numeric"),),
                         (("public.customers", "customer_id"),))
    values: dict[str, list[str | None]] = {
        "name": ["王伟", "李娜", "张敏"], "phone": ["13900104729"] * 3,
        "no": ["6222020000618162"] * 3, "手机": ["13900104729"] * 3,
    }
    findings = tuple(f for c in customers.columns
                     if (f := d.classify_column(customers, c, values.get(c.name))) is not None)
    assert [f.column for f in findings] == ["name", "phone", "no", "手机", "birthday"]
    result = d.ScanResult((customers, orders), findings, ("public.x: not sampled",), 50)
    text = d.render_policy_snippet(result, "bank on db:5432")
    assert text.startswith("# pgveil discover: bank on db:5432 — 2 tables scanned, up to 50")
    assert "# note: public.x: not sampled" in text
    # "no" would read back as the boolean False unquoted
    assert '      "no":' in text
    # a column the policy cannot name is suggested commented out, with the reason
    line = next(ln for ln in text.splitlines() if "手机" in ln)
    assert line.lstrip().startswith("#") and "cannot be listed" in line
    assert "# public.orders: {}" in text and "references public.customers (customer_id)" in text
    policy = _snippet_policy(text)
    cols = policy.tables["public.customers"].columns  # type: ignore[attr-defined]
    assert sorted(cols) == ["birthday", "name", "no", "phone"]
    assert cols["no"].level == 3 and cols["no"].mask.name == "bank_card"
    assert "public.orders" not in policy.tables  # type: ignore[attr-defined]
    # comments are aligned: every column line has its "#" at the same offset
    col_lines = [ln for ln in text.splitlines() if ln.startswith("      ") and "{level" in ln]
    assert len({ln.index("  # ", ln.index("}")) for ln in col_lines}) == 1


def test_render_snippet_nothing_found() -> None:
    text = d.render_policy_snippet(d.ScanResult((), (), (), 10))
    assert yaml.safe_load(text) == {"protected": {}}


# ------------------------------------------------------------------------------------ live: bank

EXPECTED_BANK = {
    ("public.customers", "name"): (1, "chinese_name"),
    ("public.customers", "phone"): (1, "phone"),
    ("public.customers", "id_number"): (1, "id_number"),
    ("public.customers", "email"): (1, "email"),
    ("public.customers", "address"): (1, '{redact: "******"}'),
    ("public.customers", "birthday"): (1, "{truncate: year}"),
    ("public.accounts", "card_no"): (3, "bank_card"),
    ("public.accounts", "balance"): (2, "null"),
}


async def test_discover_bank_finds_every_sensitive_column_and_nothing_else(pg_dsn: str) -> None:
    messages: list[str] = []
    result = await d.discover(pg_dsn, sample=200, schemas=["public"], progress=messages.append)
    got = {(f.table, f.column): (f.level, f.mask) for f in result.findings}
    assert got == EXPECTED_BANK
    assert not [f for f in result.findings if f.table in ("public.orders", "public.branches")]
    by_value = {(f.table, f.column) for f in result.findings if f.by_value is not None}
    # every column with a validator was confirmed by its data, not only by its name
    assert by_value == set(EXPECTED_BANK) - {("public.customers", "birthday"),
                                             ("public.accounts", "balance")}
    assert any("public.customers" in m and "200 rows sampled" in m for m in messages)
    # the snippet is the reference policy's classification of the bank tables
    snippet = _snippet_policy(d.render_policy_snippet(result))
    reference = parse_policy(POLICY.read_text(encoding="utf-8"), str(POLICY), {})
    for name in ("public.customers", "public.accounts"):
        mine = snippet.tables[name].columns  # type: ignore[attr-defined]
        theirs = reference.tables[name].columns
        assert {c: (v.level, v.mask) for c, v in mine.items()} == \
               {c: (v.level, v.mask) for c, v in theirs.items()}


def test_cmd_discover_prints_snippet_and_progress(pg_dsn: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(dsn=pg_dsn, sample=50, schema=None)
    assert d.cmd_discover(args) == 0
    out, err = capsys.readouterr()
    data = yaml.safe_load(out)
    assert set(data["protected"]) == {"public.customers", "public.accounts"}
    assert data["protected"]["public.customers"]["columns"]["phone"] == {"level": 1,
                                                                         "mask": "phone"}
    assert "pgveil discover: [" in err and "public.orders" in err
    assert "pw_dba" not in out + err  # the password never appears


def test_cmd_discover_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = argparse.Namespace(dsn=f"postgresql://x:secret@127.0.0.1:{port}/bank", sample=10,
                              schema=None)
    assert d.cmd_discover(args) == 3
    assert "cannot scan bank on 127.0.0.1" in capsys.readouterr().err


# ------------------------------------------------------------------------- live: scratch database


def _with_db(dsn: str, db: str, user: str | None = None, password: str | None = None) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}:{password}@{netloc.rsplit('@', 1)[1]}"
    return urlunsplit(parts._replace(path="/" + db, netloc=netloc))


@pytest.fixture(scope="module")
async def scratch_dsn(pg_dsn: str):  # type: ignore[no-untyped-def]
    """A throwaway database with the hard cases; dropped afterwards."""
    name = f"pgveil_discover_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = _with_db(pg_dsn, name)
    try:
        await _populate(dsn)
        yield dsn
    finally:
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def _populate(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("""
            CREATE SCHEMA crm;
            CREATE TABLE crm.kehu (          -- pinyin names: nothing to go by but the data
                id int PRIMARY KEY, lxr text, c1 bigint, col_a varchar(18), memo text,
                city text, ref_code text, amount numeric(12,2));
            INSERT INTO crm.kehu
            SELECT g,
                   (ARRAY['王伟','李娜','张敏','刘洋','陈静','杨磊','黄艳','赵军'])[1 + g % 8],
                   13800000000 + g * 7919,
                   (ARRAY['310115198109060373','440106196204180748',
                          '330106198312231112'])[1 + g % 3],
                   '请致电 1380000' || lpad(g::text, 4, '0') || ' 联系客户',
                   (ARRAY['深圳','广州','北京','成都','武汉'])[1 + g % 5],
                   lpad((g::bigint * 1234567891)::text, 16, '7'),
                   g * 10.5
            FROM generate_series(1, 60) g;
            CREATE TABLE public.big_contacts (id int, mobile_no text, created date);
            INSERT INTO public.big_contacts
            SELECT g, '139' || lpad(g::text, 8, '0'), date '2024-01-01'
            FROM generate_series(1, 20000) g;
            ANALYZE;
        """)
    finally:
        await conn.close()


async def test_discover_by_value_only(scratch_dsn: str) -> None:
    result = await d.discover(scratch_dsn, sample=50)
    got = {(f.table, f.column): (f.category, f.mask) for f in result.findings}
    assert got == {
        ("crm.kehu", "lxr"): (C.PERSON_NAME, "chinese_name"),
        ("crm.kehu", "c1"): (C.PHONE, "null"),  # a bigint cannot take the text mask
        ("crm.kehu", "col_a"): (C.ID_NUMBER, "id_number"),
        ("public.big_contacts", "mobile_no"): (C.PHONE, "phone"),
    }
    big = next(f for f in result.findings if f.table == "public.big_contacts")
    # sampled (TABLESAMPLE on 20000 rows), never more than asked for
    assert big.by_value is not None and 25 <= big.by_value.sampled <= 50
    assert result.notes == ()


async def test_discover_notes_tables_it_cannot_read(scratch_dsn: str) -> None:
    # "stranger" (password pw_stranger, a harness login) has no USAGE on schema crm
    dsn = _with_db(scratch_dsn, urlsplit(scratch_dsn).path.lstrip("/"), "stranger",
                   "pw_stranger")
    conn = await asyncpg.connect(scratch_dsn)
    try:
        await conn.execute("GRANT USAGE ON SCHEMA crm TO stranger")
        await conn.execute("REVOKE ALL ON crm.kehu FROM stranger, PUBLIC")
        await conn.execute("GRANT SELECT ON public.big_contacts TO stranger")
    finally:
        await conn.close()
    result = await d.discover(dsn, sample=20)
    assert any(n.startswith("crm.kehu: not sampled (InsufficientPrivilegeError")
               for n in result.notes)
    # still scanned by name; the readable table still by value
    assert {(f.table, f.column) for f in result.findings} == {
        ("public.big_contacts", "mobile_no")}
    assert "# note: crm.kehu: not sampled" in d.render_policy_snippet(result)


async def test_unclassified_warnings(scratch_dsn: str, tmp_path: Path) -> None:
    policy_text = (
        "protected:\n"
        "  public.big_contacts:\n"
        "    columns:\n"
        "      mobile_no: {level: 1, mask: phone}\n"
        "  crm.kehu:\n"
        "    columns:\n"
        "      lxr: {level: 1, mask: chinese_name}\n"
        + _ROLES
    )
    (tmp_path / "policy.yaml").write_text(policy_text, encoding="utf-8")
    parts = urlsplit(scratch_dsn)
    control = urlunsplit(parts._replace(path="/postgres"))
    config = parse_config(f"control:\n  dsn: {control}\npolicy: policy.yaml\n",
                          str(tmp_path / "pgveil.yaml"), environ={})
    policy = parse_policy(policy_text, str(tmp_path / "policy.yaml"), {})
    warnings = await d.unclassified_warnings(config, policy, parts.path.lstrip("/"))
    assert len(warnings) == 2, warnings
    c1 = next(w for w in warnings if w.startswith("crm.kehu.c1 "))
    assert "mobile numbers" in c1 and "not classified under protected.crm.kehu.columns" in c1
    assert "suggested: c1: {level: 1, mask: null}" in c1
    assert any(w.startswith("crm.kehu.col_a looks like PRC ID numbers") for w in warnings)
    # the bank policy classifies everything in the bank database
    bank = urlunsplit(parts._replace(path="/bank"))
    config = parse_config(f"control:\n  dsn: {bank}\npolicy: {POLICY}\n",
                          str(tmp_path / "pgveil.yaml"), environ={})
    reference = parse_policy(POLICY.read_text(encoding="utf-8"), str(POLICY), {})
    assert await d.unclassified_warnings(config, reference, "bank") == []
