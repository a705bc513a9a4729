"""``pgveil discover``: find the columns that hold personal data and propose a policy for them.

A DBA putting pgveil in front of an existing database rarely has an up-to-date list of where the
customer data lives. This module finds it two ways and prints a ``protected:`` snippet in the
format of ``config/policy.yaml`` for the DBA to review:

* **by name** — ``phone``, ``mobile``, ``id_card``, ``email``, ``address``, ``card_no``,
  ``birthday``, ``balance``, 手机, 身份证, 地址 … (a plain ``name`` column counts only in a
  person-like table such as ``customers``: ``branches.name`` is a branch, not a person);
* **by value** — a sample of each table's text (and ``bigint``/``numeric``) columns is tested
  with validators that are strict enough to keep false positives out: Chinese mobile numbers
  ``^1[3-9]\\d{9}$``, PRC resident ID numbers with a valid date and ISO 7064 MOD 11-2 check digit,
  Luhn-valid 13-19 digit card numbers, e-mail addresses, Chinese personal names (2-4 CJK
  characters starting with a common surname, not ending like a place or an organisation) and
  Chinese street addresses (administrative markers plus a house number). A column is flagged
  by value only when most of its sampled values match (a random number passes Luhn one time in
  ten; a city name may start with a surname).

Data flow::

    asyncpg connection (read-only transaction, statement_timeout)
      -> list_tables()          pg_catalog: tables, columns, base types, foreign keys
      -> sample_table()         SELECT col::text … TABLESAMPLE SYSTEM (p) / LIMIT n
      -> classify_column()      pure: name rules + value validators -> Finding
      -> render_policy_snippet  pure: YAML in the exact format of config/policy.yaml

``pgveil check`` uses the same scan through :func:`unclassified_warnings` to warn about
sensitive-looking columns that the policy in force does not classify. Nothing here writes to
the database: every query runs in a ``READ ONLY`` transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import enum
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import yaml

from rewriters.masks import TypeFamily, type_family

# --------------------------------------------------------------------------------------------
# Value validators (pure). Each takes one sampled value as text and says whether it is that
# kind of personal data. They are deliberately strict: a false positive costs a DBA's time, a
# false negative is caught by the name rules or by review.

_MOBILE = re.compile(r"^1[3-9]\d{9}$")
_PHONE_SEPARATORS = re.compile(r"[\s\-()]")


def is_cn_mobile(value: str) -> bool:
    """A mainland-China mobile number: 11 digits ``1[3-9]…``, optionally ``+86``/``0086``.

    >>> is_cn_mobile("13800000001"), is_cn_mobile("+86 138-0000-0001"), is_cn_mobile("12345678901")
    (True, True, False)
    """
    v = _PHONE_SEPARATORS.sub("", value.strip())
    for prefix in ("+86", "0086", "86"):
        if v.startswith(prefix) and len(v) == 11 + len(prefix):
            v = v[len(prefix):]
            break
    return bool(_MOBILE.match(v))


# GB/T 2260 province-level codes: the first two digits of a resident ID number.
_PRC_PROVINCES = frozenset({
    11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46,
    50, 51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82, 83,
})
_PRC_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_PRC_CHECK = "10X98765432"
_PRC_ID = re.compile(r"^\d{17}[\dXx]$")


def prc_id_check_digit(first17: str) -> str:
    """The ISO 7064 MOD 11-2 check character of the first 17 digits (GB 11643).

    >>> prc_id_check_digit("11010519491231002")
    'X'
    """
    if len(first17) != 17 or not first17.isdigit():
        raise ValueError("need exactly 17 digits")
    total = sum(int(d) * w for d, w in zip(first17, _PRC_WEIGHTS, strict=True))
    return _PRC_CHECK[total % 11]


def is_prc_id(value: str) -> bool:
    """An 18-character PRC resident ID: province code, real birth date, valid check digit.

    >>> is_prc_id("11010519491231002X"), is_prc_id("110105194912310021")
    (True, False)
    """
    v = value.strip()
    if not _PRC_ID.match(v) or int(v[:2]) not in _PRC_PROVINCES:
        return False
    try:
        born = _dt.date(int(v[6:10]), int(v[10:12]), int(v[12:14]))
    except ValueError:
        return False
    if not _dt.date(1900, 1, 1) <= born <= _dt.date.today():
        return False
    return prc_id_check_digit(v[:17]) == v[17].upper()


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check used by payment card numbers.

    >>> luhn_valid("4111111111111111"), luhn_valid("4111111111111112")
    (True, False)
    """
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_CARD_SEPARATORS = re.compile(r"[\s\-]")


def is_bank_card(value: str) -> bool:
    """A 13-19 digit, Luhn-valid card number (spaces or dashes between groups allowed).

    A run of one repeated digit (``0000000000000``) passes Luhn but is a placeholder, not a card.
    """
    v = _CARD_SEPARATORS.sub("", value.strip())
    if not (13 <= len(v) <= 19) or not v.isdigit() or len(set(v)) == 1:
        return False
    return luhn_valid(v)


_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}$"
)


def is_email(value: str) -> bool:
    """An e-mail address (``local@domain.tld``).

    >>> is_email("user1@example.com"), is_email("user1@localhost"), is_email("a b@example.com")
    (True, False, False)
    """
    return bool(_EMAIL.match(value.strip()))


# The most common Chinese surnames (about 90% of the population), and the compound ones.
# Deliberately without characters that mostly begin place names (深, 广, 北, 上, 南, 东, 西).
COMMON_SURNAMES = frozenset(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程"
    "苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付傅方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾"
    "毛郝龚邵万钱严覃武戴莫孔向汤常温康施文牛樊葛邢安齐易乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿关"
    "兰焦俞左柳甘祝包宁尚符舒阮柯纪梅童凌毕单季裴霍涂成苗谷盛曲翁冉骆蓝路游辛靳管柴蒙鲍华喻"
    "祁蒲房滕屈饶解牟艾尤阳时穆农司卓古吉缪简车项连芦麦褚娄窦戚岑景党宫费卜冷晏席卫米柏宗瞿"
    "桂全佟应臧闵苟邬边卞姬师和仇栾隋商刁沙荣巫寇桑郎甄丛仲虞敖巩佘池查麻苑迟邝"
)
COMPOUND_SURNAMES = frozenset({
    "欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙", "宇文",
    "司徒", "夏侯", "令狐", "端木", "独孤", "南宫", "西门", "呼延", "轩辕",
})
_CJK_NAME = re.compile(r"^[\u4e00-\u9fff]{2,4}$")
# Last characters of place, organisation and street names, which a given name rarely ends with.
_NOT_NAME_ENDINGS = frozenset("省市区县镇乡村街路道巷号楼店厅部局院校厂司行处室队站所馆场园湾岛山江河湖")


def is_chinese_name(value: str) -> bool:
    """A Chinese personal name: 2-4 CJK characters starting with a common surname.

    >>> is_chinese_name("王伟"), is_chinese_name("欧阳建华"), is_chinese_name("深圳福田营业厅")
    (True, True, False)
    """
    v = value.strip()
    if not _CJK_NAME.match(v) or v[-1] in _NOT_NAME_ENDINGS:
        return False
    if v[:2] in COMPOUND_SURNAMES:
        return len(v) >= 3
    return v[0] in COMMON_SURNAMES


_ADDRESS_MARKERS = ("省", "市", "区", "县", "镇", "乡", "村", "街", "路", "道", "巷", "弄",
                    "号", "楼", "室", "栋", "单元", "小区", "自治")
_HOUSE_NUMBER = re.compile(r"\d|号|室|栋|楼")
_EN_ADDRESS = re.compile(
    r"^\s*\d+[A-Za-z]?\s+(?:[\w.'-]+\s+){0,5}(?:street|st|road|rd|avenue|ave|lane|ln|"
    r"boulevard|blvd|drive|dr|way|court|ct|place|pl|square|sq)\b",
    re.IGNORECASE,
)


def is_address(value: str) -> bool:
    """A postal address: Chinese (two administrative markers and a house number) or English.

    >>> is_address("广东省深圳市福田区深南大道2号"), is_address("深圳福田营业厅")
    (True, False)
    """
    v = value.strip()
    if _EN_ADDRESS.match(v):
        return True
    if len(v) < 6 or not re.search(r"[\u4e00-\u9fff]", v):
        return False
    markers = sum(1 for m in _ADDRESS_MARKERS if m in v)
    return markers >= 2 and bool(_HOUSE_NUMBER.search(v))


# --------------------------------------------------------------------------------------------
# Categories of personal data and what pgveil proposes for each


class Category(enum.Enum):
    """What kind of personal data a column holds."""

    PERSON_NAME = "person_name"
    PHONE = "phone"
    ID_NUMBER = "id_number"
    PASSPORT = "passport"
    EMAIL = "email"
    ADDRESS = "address"
    BIRTHDAY = "birthday"
    BANK_CARD = "bank_card"
    FINANCIAL = "financial"
    SECRET = "secret"


@dataclass(frozen=True)
class CategoryInfo:
    """How a category is described, the level it gets and the validator for its values."""

    label: str  # "mobile numbers": used in "N of M sampled values are <label>"
    level: int  # 1 identity, 2 financial, 3 secret (config/policy.yaml's levels)
    validator: Callable[[str], bool] | None = None
    threshold: float = 0.8  # share of sampled non-null values that must match
    min_matches: int = 1


CATEGORIES: dict[Category, CategoryInfo] = {
    Category.PERSON_NAME: CategoryInfo("Chinese personal names", 1, is_chinese_name, 0.7, 3),
    Category.PHONE: CategoryInfo("mobile numbers", 1, is_cn_mobile),
    Category.ID_NUMBER: CategoryInfo("PRC ID numbers (checksum valid)", 1, is_prc_id),
    Category.PASSPORT: CategoryInfo("passport numbers", 1),
    Category.EMAIL: CategoryInfo("e-mail addresses", 1, is_email),
    Category.ADDRESS: CategoryInfo("postal addresses", 1, is_address, 0.6, 3),
    Category.BIRTHDAY: CategoryInfo("birth dates", 1),
    Category.BANK_CARD: CategoryInfo("card numbers (Luhn valid)", 3, is_bank_card),
    Category.FINANCIAL: CategoryInfo("financial amounts", 2),
    Category.SECRET: CategoryInfo("secrets", 3),
}

# Order in which value validators are tried: the most specific first (an 18-digit ID number
# could also pass Luhn; an 11-digit mobile number is never 13-19 digits).
VALUE_ORDER: tuple[Category, ...] = (
    Category.ID_NUMBER, Category.PHONE, Category.BANK_CARD, Category.EMAIL,
    Category.PERSON_NAME, Category.ADDRESS,
)

_REDACT = '{redact: "******"}'


def propose_mask(category: Category, type_sql: str) -> str:
    """The mask for a category on a column of this type, as YAML text for policy.yaml.

    Text masks (phone, id_number, bank_card, email, chinese_name) only apply to text columns
    (``rewriters.masks`` refuses them otherwise), so a phone stored as ``bigint`` gets ``null``.

    >>> propose_mask(Category.PHONE, "text"), propose_mask(Category.PHONE, "bigint")
    ('phone', 'null')
    """
    family = type_family(type_sql)
    text = family is TypeFamily.TEXT
    if category is Category.BIRTHDAY:
        if family in (TypeFamily.DATE, TypeFamily.TIMESTAMP):
            return "{truncate: year}"
        return "{keep: [4, 0]}" if text else "null"
    if category is Category.FINANCIAL or category is Category.SECRET:
        return "null"
    if not text:
        return "null"
    return {
        Category.PERSON_NAME: "chinese_name",
        Category.PHONE: "phone",
        Category.ID_NUMBER: "id_number",
        Category.PASSPORT: "{keep: [1, 2]}",
        Category.EMAIL: "email",
        Category.ADDRESS: _REDACT,
        Category.BANK_CARD: "bank_card",
    }[category]


# --------------------------------------------------------------------------------------------
# Name rules (pure)

_CAMEL = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def name_tokens(name: str) -> tuple[str, ...]:
    """Split an identifier into lower-case words: ``IDCardNo`` -> ``('id', 'card', 'no')``."""
    out: list[str] = []
    for part in re.split(r"[^A-Za-z0-9]+", name):
        out.extend(t.lower() for t in _CAMEL.findall(part))
    return tuple(out)


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


_PERSON_TABLES = frozenset({
    "customer", "client", "user", "member", "person", "people", "employee", "staff", "contact",
    "patient", "student", "teacher", "holder", "cardholder", "applicant", "borrower",
    "guarantor", "beneficiary", "passenger", "guest", "consumer", "subscriber", "account_holder",
    "depositor", "insured", "policyholder", "resident", "citizen", "khxx", "kh",
})
_PERSON_TABLES_CJK = ("客户", "用户", "会员", "员工", "人员", "联系人", "持卡人", "借款人")
_PERSON_QUALIFIERS = frozenset({
    "customer", "client", "contact", "real", "full", "first", "last", "given", "family",
    "middle", "sur", "holder", "cardholder", "person", "member", "patient", "employee", "owner",
    "legal", "student", "applicant", "borrower", "guarantor", "beneficiary", "passenger",
    "guest", "spouse", "father", "mother", "emergency", "depositor", "recipient", "receiver",
    "consignee", "payer", "payee",
})
_NAME_WORDS = frozenset({"fullname", "realname", "firstname", "lastname", "surname",
                         "givenname", "familyname", "cardholder", "xm", "khmc"})
# Words that turn a sensitive-sounding name into metadata about it (phone_count, email_status).
_META = frozenset({
    "count", "cnt", "type", "kind", "status", "state", "flag", "verified", "valid", "enabled",
    "is", "has", "length", "len", "format", "template", "label", "prefix", "suffix", "mask",
    "masked", "policy", "config", "setting", "settings", "sent", "bounce", "bounced", "opt",
    "optin", "domain", "region", "country", "area", "brand", "issuer", "bin", "expiry",
    "expire", "expires", "exp", "level", "category", "updated", "changed", "created", "model",
    "version", "os", "app", "device",
})
_ADDRESS_NOT = frozenset({"ip", "mac", "host", "server", "url", "web", "remote", "wallet",
                          "contract", "node", "email", "mail", "bitcoin", "btc", "eth"})
_NUMBER_WORDS = frozenset({"no", "num", "number", "nbr", "nr"})
_ID_WORDS = frozenset({"idcard", "idno", "idnumber", "idnum", "ssn", "sfz", "sfzh", "sfzhm",
                       "nric", "zjhm", "hkid"})
_PHONE_WORDS = frozenset({"mobile", "tel", "telephone", "cell", "cellphone", "msisdn", "sjh",
                          "sjhm", "lxdh", "dh", "mob"})
_CARD_WORDS = frozenset({"cardno", "cardnum", "cardnumber", "bankcard", "pan"})
_FINANCIAL_WORDS = frozenset({"balance", "salary", "income", "wage", "wages", "savings",
                              "networth", "bal"})
_SECRET_WORDS = frozenset({"password", "passwd", "pwd", "cvv", "cvv2", "cvc", "cvn", "pin",
                           "secret"})
_BIRTH_WORDS = frozenset({"birthday", "birthdate", "dob", "born"})
# Chinese substrings of column names, in priority order.
_CJK_RULES: tuple[tuple[str, Category], ...] = (
    ("身份证", Category.ID_NUMBER), ("证件号", Category.ID_NUMBER), ("护照", Category.PASSPORT),
    ("手机", Category.PHONE), ("电话", Category.PHONE), ("联系方式", Category.PHONE),
    ("邮箱", Category.EMAIL), ("邮件", Category.EMAIL), ("卡号", Category.BANK_CARD),
    ("银行卡", Category.BANK_CARD), ("地址", Category.ADDRESS), ("住址", Category.ADDRESS),
    ("姓名", Category.PERSON_NAME), ("名字", Category.PERSON_NAME),
    ("生日", Category.BIRTHDAY), ("出生", Category.BIRTHDAY), ("余额", Category.FINANCIAL),
    ("工资", Category.FINANCIAL), ("收入", Category.FINANCIAL), ("存款", Category.FINANCIAL),
    ("密码", Category.SECRET),
)

_VALUE_TYPES = (TypeFamily.TEXT,)
_NUMBER_HOLDERS = ("bigint", "int8", "numeric", "decimal")


def _type_fits(category: Category, type_sql: str) -> bool:
    """Whether a column of this type can hold the category at all (``phone_verified bool`` no)."""
    family = type_family(type_sql)
    base = type_sql.strip().lower().split("(")[0].strip()
    if category in (Category.PHONE, Category.ID_NUMBER, Category.BANK_CARD):
        return family is TypeFamily.TEXT or base in _NUMBER_HOLDERS
    if category is Category.BIRTHDAY:
        return family in (TypeFamily.DATE, TypeFamily.TIMESTAMP, TypeFamily.TEXT)
    if category is Category.FINANCIAL:
        return family in (TypeFamily.NUMERIC, TypeFamily.INTEGER, TypeFamily.FLOAT) or \
            base == "money"
    if category is Category.SECRET:
        return family in (TypeFamily.TEXT, TypeFamily.INTEGER) or base == "bytea"
    return family is TypeFamily.TEXT


def is_person_table(table: str) -> bool:
    """Whether rows of this table are people (``customers``, ``t_user_info``, 客户信息)."""
    if any(w in table for w in _PERSON_TABLES_CJK):
        return True
    words = [_singular(t) for t in name_tokens(table)]
    return any(w in _PERSON_TABLES for w in words) or "_".join(words) in _PERSON_TABLES


def name_category(table: str, column: str, type_sql: str) -> Category | None:
    """The category a column's *name* suggests, or None.

    ``table`` is the bare table name: a column called just ``name`` is a person's name only in a
    person-like table (``customers.name`` yes, ``branches.name`` no).

    >>> name_category("customers", "id_number", "text"), name_category("branches", "name", "text")
    (<Category.ID_NUMBER: 'id_number'>, None)
    """
    cat = _name_rule(table, column)
    if cat is None or not _type_fits(cat, type_sql):
        return None
    return cat


def _name_rule(table: str, column: str) -> Category | None:
    for needle, cat in _CJK_RULES:
        if needle in column:
            return cat
    words = name_tokens(column)
    if not words:
        return None
    joined = "".join(words)
    wordset = set(words)
    if wordset & _META:
        return None
    if wordset & _SECRET_WORDS:
        return Category.SECRET
    if "passport" in wordset:
        return Category.PASSPORT
    if wordset & _ID_WORDS or joined in _ID_WORDS or (
            ("id" in wordset or "identity" in wordset or "cert" in wordset
             or "certificate" in wordset) and wordset & (_NUMBER_WORDS | {"card"})):
        return Category.ID_NUMBER
    if any(w in ("mail", "mailbox") or w.startswith("email") for w in words):
        return Category.EMAIL
    if wordset & _PHONE_WORDS or any("phone" in w for w in words):
        return Category.PHONE
    if wordset & _CARD_WORDS or joined in _CARD_WORDS or (
            "card" in wordset and (wordset <= {"card", "bank", "debit", "credit", "payment"}
                                   or wordset & _NUMBER_WORDS)) or (
            {"bank", "account"} <= wordset and wordset & _NUMBER_WORDS) or (
            ({"account", "acct"} & wordset) and wordset & _NUMBER_WORDS and len(words) == 2):
        return Category.BANK_CARD
    if (any(w.startswith("addr") for w in words) or wordset & {"street", "residence",
                                                                "domicile"}) \
            and not wordset & _ADDRESS_NOT:
        return Category.ADDRESS
    if wordset & _BIRTH_WORDS or ("birth" in wordset and wordset & {"date", "day", "dt", "on"}):
        return Category.BIRTHDAY
    if wordset & _FINANCIAL_WORDS or {"credit", "limit"} <= wordset or {"net", "worth"} <= \
            wordset:
        return Category.FINANCIAL
    if wordset & _NAME_WORDS or joined in _NAME_WORDS:
        return Category.PERSON_NAME
    if "holder" in wordset and wordset <= {"holder", "card", "account", "cardholder"}:
        return Category.PERSON_NAME
    if "name" in wordset:
        others = wordset - {"name"}
        if not others:
            return Category.PERSON_NAME if is_person_table(table) else None
        if others & _PERSON_QUALIFIERS and others <= _PERSON_QUALIFIERS | {
                "cn", "zh", "en", "chinese", "card", "account"}:
            return Category.PERSON_NAME
        if others <= {"cn", "zh", "chinese", "en", "english", "pinyin"} and \
                is_person_table(table):
            return Category.PERSON_NAME
    return None


# --------------------------------------------------------------------------------------------
# Classification (pure)


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    type_sql: str  # pg_catalog.format_type of the column's (domain's base) type


@dataclass(frozen=True)
class TableInfo:
    """One table to scan, as the catalog describes it."""

    schema: str
    name: str
    kind: str  # pg_class.relkind: r table, p partitioned table, m materialized view
    estimated_rows: float  # pg_class.reltuples; -1 when never analysed
    columns: tuple[ColumnInfo, ...]
    references: tuple[tuple[str, str], ...] = ()  # (referenced schema.table, via columns)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class ValueMatch:
    category: Category
    matched: int
    sampled: int  # non-null, non-blank values looked at


@dataclass(frozen=True)
class Finding:
    """A column that holds (or is named like it holds) personal data, and what to do about it."""

    table: str  # schema.table
    column: str
    type_sql: str
    category: Category
    level: int
    mask: str  # YAML text of the proposed mask: phone, null, {truncate: year} …
    by_name: Category | None
    by_value: ValueMatch | None
    sampled: int  # non-null values sampled (0 when the column was not sampled or empty)

    @property
    def reason(self) -> str:
        """Why this column was flagged: ``name match; 200 of 200 sampled values are …``."""
        parts: list[str] = []
        if self.by_name is not None:
            if self.by_name is not self.category:
                parts.append(f"name suggests {CATEGORIES[self.by_name].label}")
            elif self.by_value is None:
                parts.append(f"name match ({CATEGORIES[self.category].label})")
            else:
                parts.append("name match")
        if self.by_value is not None:
            v = self.by_value
            parts.append(f"{v.matched} of {v.sampled} sampled values are "
                         f"{CATEGORIES[v.category].label}")
        elif self.by_name is not None and CATEGORIES[self.category].validator is not None:
            parts.append("no sampled values" if self.sampled == 0 else
                         f"0 of {self.sampled} sampled values matched: check the data")
        return "; ".join(parts)

    @property
    def label(self) -> str:
        return CATEGORIES[self.category].label


def sampled_type(type_sql: str) -> bool:
    """Whether values of this type are worth sampling (text, or numbers wide enough for IDs)."""
    base = type_sql.strip().lower().split("(")[0].strip()
    return type_family(type_sql) in _VALUE_TYPES or base in _NUMBER_HOLDERS


def value_match(values: Iterable[str | None]) -> ValueMatch | None:
    """The category most sampled values belong to, if enough of them do.

    Validators are tried most specific first; the first whose share of matches reaches its
    threshold (and minimum count) wins.
    """
    vals = [v for v in values if v is not None and v.strip()]
    if not vals:
        return None
    for cat in VALUE_ORDER:
        info = CATEGORIES[cat]
        assert info.validator is not None
        matched = sum(1 for v in vals if info.validator(v))
        if matched >= info.min_matches and matched >= info.threshold * len(vals):
            return ValueMatch(cat, matched, len(vals))
    return None


def classify_column(table: TableInfo, column: ColumnInfo,
                    values: Sequence[str | None] | None) -> Finding | None:
    """Name rule + value validators -> a Finding, or None when the column looks harmless.

    Sampled values win over the name when both say something different (the data is what
    pgveil will be masking); a name match alone is still reported, with its evidence.
    """
    by_name = name_category(table.name, column.name, column.type_sql)
    by_value = value_match(values) if values is not None else None
    if by_value is not None and not _type_fits(by_value.category, column.type_sql):
        by_value = None
    category = by_value.category if by_value is not None else by_name
    if category is None:
        return None
    sampled = sum(1 for v in values or () if v is not None and v.strip())
    return Finding(
        table=table.qualified, column=column.name, type_sql=column.type_sql, category=category,
        level=CATEGORIES[category].level, mask=propose_mask(category, column.type_sql),
        by_name=by_name, by_value=by_value, sampled=sampled,
    )


# --------------------------------------------------------------------------------------------
# Rendering (pure)

_POLICY_IDENT = re.compile(r"^[a-z_][a-z0-9_$]*$")


@dataclass(frozen=True)
class ScanResult:
    """Everything one scan found, in catalog order."""

    tables: tuple[TableInfo, ...]
    findings: tuple[Finding, ...]
    notes: tuple[str, ...] = ()  # tables that could not be sampled, and why
    sample: int = 0

    def by_table(self) -> dict[str, list[Finding]]:
        out: dict[str, list[Finding]] = {}
        for f in self.findings:
            out.setdefault(f.table, []).append(f)
        return out


def _yaml_key(name: str) -> str:
    """A column name as a YAML mapping key that reads back as the same string (``no``, ``on``)."""
    try:
        loaded = yaml.safe_load(f"{name}: 1")
    except yaml.YAMLError:
        loaded = None
    if isinstance(loaded, dict) and list(loaded) == [name]:
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_policy_snippet(result: ScanResult, source: str = "") -> str:
    """The ``protected:`` section for the findings, in the format of config/policy.yaml.

    Columns (and tables) whose names the policy cannot express — policy names are unquoted
    lower-case identifiers — are printed commented out with the reason. Tables that hold no
    personal columns but reference a table that does (``orders.customer_id``) are suggested as
    comments: listing them with ``{}`` makes them audited, row-filtered and export-capped.
    """
    header = [
        f"# pgveil discover{': ' + source if source else ''} — {len(result.tables)} tables "
        f"scanned, up to {result.sample} rows sampled per table",
        "# Proposed classification of personal data: review it, then merge it into policy.yaml.",
        "# levels: 1 identity, 2 financial, 3 secret",
    ]
    header += [f"# note: {n}" for n in result.notes]
    grouped = result.by_table()
    if not grouped:
        return "\n".join([*header, "protected: {}   # no personal data found"]) + "\n"

    rows: list[tuple[str, str, str, str]] = []  # (indent+key, value, comment, kind)
    flagged = set(grouped)
    for table in result.tables:
        name = table.qualified
        findings = grouped.get(name)
        if not findings:
            refs = [(t, cols) for t, cols in table.references if t in flagged]
            if refs:
                via = ", ".join(f"{t} ({cols})" for t, cols in refs)
                rows.append((f"  # {name}: {{}}", "", f"no personal columns, but references "
                             f"{via}: list it to audit, filter and cap it", "comment"))
            continue
        table_ok = all(_POLICY_IDENT.match(p) for p in (table.schema, table.name))
        prefix = "" if table_ok else "# "
        rows.append((f"  {prefix}{name}:", "", "" if table_ok else
                     "cannot be listed: policy table names are lower-case identifiers", "head"))
        rows.append((f"    {prefix}columns:", "", "", "head"))
        for f in findings:
            value = f"{{level: {f.level}, mask: {f.mask}}}"
            if table_ok and _POLICY_IDENT.match(f.column):
                rows.append((f"      {_yaml_key(f.column)}:", value, f.reason, "col"))
            else:
                why = ("its table cannot be listed" if not table_ok else
                       "cannot be listed: policy column names are lower-case identifiers "
                       "(rename the column or use a view)")
                rows.append((f"      # {_yaml_key(f.column)}:", value, f"{f.reason}; {why}",
                             "col"))
    key_w = max(len(k) for k, _, _, kind in rows if kind == "col") + 1
    val_w = max(len(v) for _, v, _, kind in rows if kind == "col") + 1
    lines = [*header, "protected:"]
    for key, value, comment, kind in rows:
        if kind == "col":
            lines.append(f"{key.ljust(key_w)}{value.ljust(val_w)}  # {comment}")
        elif kind == "head":
            lines.append(f"{key}  # {comment}" if comment else key)
        else:
            lines.append(f"{key}   # {comment}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The database side (asyncpg, read-only)

_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pgveil")

_TABLES_SQL = """
SELECT n.nspname AS schema, c.relname AS name, c.relkind::text AS kind,
       c.reltuples::float8 AS reltuples, a.attname AS column,
       pg_catalog.format_type(COALESCE(NULLIF(t.typbasetype, 0), a.atttypid),
                              CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END)
         AS type_sql
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
WHERE c.relkind IN ('r', 'p', 'm') AND NOT c.relispartition
  AND ($1::text[] IS NULL AND n.nspname <> ALL($2::text[]) AND n.nspname NOT LIKE 'pg\\_%'
       OR n.nspname = ANY($1::text[]))
ORDER BY n.nspname, c.relname, a.attnum
"""

_FKEYS_SQL = """
SELECT cn.nspname || '.' || cc.relname AS source, rn.nspname || '.' || rc.relname AS target,
       (SELECT pg_catalog.string_agg(a.attname, ', ' ORDER BY k.ord)
          FROM pg_catalog.unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum)
         AS via
FROM pg_catalog.pg_constraint con
JOIN pg_catalog.pg_class cc ON cc.oid = con.conrelid
JOIN pg_catalog.pg_namespace cn ON cn.oid = cc.relnamespace
JOIN pg_catalog.pg_class rc ON rc.oid = con.confrelid
JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace
WHERE con.contype = 'f'
ORDER BY 1, 2
"""


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def list_tables(conn: Any, schemas: Sequence[str] | None = None) -> list[TableInfo]:
    """Tables, partitioned parents and materialized views with their columns and foreign keys.

    Partitions are skipped (their parent is scanned and sampled through). ``schemas`` None means
    every schema except the system ones and pgveil's own control schema.
    """
    rows = await conn.fetch(_TABLES_SQL, list(schemas) if schemas else None,
                            list(_SYSTEM_SCHEMAS))
    refs: dict[str, list[tuple[str, str]]] = {}
    for r in await conn.fetch(_FKEYS_SQL):
        refs.setdefault(r["source"], []).append((r["target"], r["via"]))
    tables: list[TableInfo] = []
    cols: list[ColumnInfo] = []
    key: tuple[str, str] | None = None
    meta: tuple[str, float] = ("r", -1.0)
    for r in rows:
        k = (r["schema"], r["name"])
        if k != key:
            if key is not None:
                tables.append(TableInfo(key[0], key[1], meta[0], meta[1], tuple(cols),
                                        tuple(refs.get(f"{key[0]}.{key[1]}", ()))))
            key, cols, meta = k, [], (r["kind"], float(r["reltuples"]))
        cols.append(ColumnInfo(r["column"], r["type_sql"]))
    if key is not None:
        tables.append(TableInfo(key[0], key[1], meta[0], meta[1], tuple(cols),
                                tuple(refs.get(f"{key[0]}.{key[1]}", ()))))
    return tables


async def sample_table(conn: Any, table: TableInfo, columns: Sequence[ColumnInfo],
                       n: int) -> dict[str, list[str | None]]:
    """Up to ``n`` rows of the given columns, as text.

    Large tables are sampled with ``TABLESAMPLE SYSTEM`` (whole pages at random, cheap) sized to
    return about ``n`` rows; when that returns too few (a skewed estimate) or for small tables,
    ``LIMIT n`` reads the first rows instead.
    """
    if not columns or n <= 0:
        return {c.name: [] for c in columns}
    select = ", ".join(f"{quote_ident(c.name)}::text" for c in columns)
    source = f"{quote_ident(table.schema)}.{quote_ident(table.name)}"
    rows: list[Any] = []
    if table.kind == "r" and table.estimated_rows > 20 * n:
        percent = min(100.0, max(0.0001, 300.0 * n / table.estimated_rows))
        rows = await conn.fetch(
            f"SELECT {select} FROM {source} TABLESAMPLE SYSTEM ({percent:.6f}) LIMIT {int(n)}")
    if len(rows) < n // 2:
        rows = await conn.fetch(f"SELECT {select} FROM {source} LIMIT {int(n)}")
    return {c.name: [r[i] for r in rows] for i, c in enumerate(columns)}


Progress = Callable[[str], None]


async def scan_database(conn: Any, *, schemas: Sequence[str] | None = None, sample: int = 200,
                        progress: Progress | None = None,
                        statement_timeout_ms: int = 30000) -> ScanResult:
    """Scan every table: name rules on all columns, validators on a sample of the values.

    Runs in one read-only transaction. A table the login may not read (or whose sampling times
    out) is still classified by column names, and a note says so.
    """
    import asyncpg

    say = progress or (lambda _msg: None)
    findings: list[Finding] = []
    notes: list[str] = []
    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        await conn.execute(f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}")
        tables = await list_tables(conn, schemas)
        say(f"{len(tables)} tables to scan")
        for i, table in enumerate(tables, 1):
            started = time.monotonic()
            to_sample = [c for c in table.columns if sampled_type(c.type_sql)]
            values: dict[str, list[str | None]] | None = None
            try:
                async with conn.transaction():  # a savepoint: a failure spares the scan
                    values = await sample_table(conn, table, to_sample, sample)
            except (asyncpg.PostgresError, asyncio.TimeoutError) as exc:
                notes.append(f"{table.qualified}: not sampled ({exc.__class__.__name__}: "
                             f"{str(exc).strip()}); classified by column names only")
            found = [f for c in table.columns
                     if (f := classify_column(table, c, None if values is None
                                              else values.get(c.name))) is not None]
            findings.extend(found)
            rows = len(next(iter(values.values()))) if values else 0
            say(f"[{i}/{len(tables)}] {table.qualified}: {rows} rows sampled, "
                f"{len(found)} personal columns ({time.monotonic() - started:.2f}s)")
    return ScanResult(tuple(tables), tuple(findings), tuple(notes), sample)


def _describe_dsn(dsn: str) -> str:
    """host:port/database of a DSN, never its password."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.path.lstrip('/') or '(default database)'} on {host}{port}"
    except ValueError:
        return "(dsn)"


async def discover(dsn: str, *, sample: int = 200, schemas: Sequence[str] | None = None,
                   progress: Progress | None = None, password: str | None = None) -> ScanResult:
    """Connect, scan, disconnect."""
    import asyncpg

    conn = await asyncpg.connect(dsn, password=password, timeout=15)
    try:
        return await scan_database(conn, schemas=schemas, sample=sample, progress=progress)
    finally:
        await conn.close()


def cmd_discover(args: argparse.Namespace) -> int:
    """``pgveil discover --dsn DSN [--sample N] [--schema S]…``: the snippet on stdout.

    Exit codes: 0 the scan ran (whether or not it found anything), 2 bad arguments, 3 the
    database could not be reached or read.
    """
    import asyncpg

    sample = int(getattr(args, "sample", 200) or 0)
    if sample < 0:
        print("pgveil discover: --sample must be >= 0", file=sys.stderr)
        return 2
    schemas = getattr(args, "schema", None) or None

    def progress(msg: str) -> None:
        print(f"pgveil discover: {msg}", file=sys.stderr, flush=True)

    where = _describe_dsn(args.dsn)
    progress(f"scanning {where}")
    try:
        result = asyncio.run(discover(args.dsn, sample=sample, schemas=schemas,
                                      progress=progress))
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError,
            asyncpg.InterfaceError) as exc:
        print(f"pgveil discover: cannot scan {where}: {exc}", file=sys.stderr)
        return 3
    sys.stdout.write(render_policy_snippet(result, where))
    progress(f"done: {len(result.findings)} personal columns in "
             f"{len(result.by_table())} tables")
    return 0


async def unclassified_warnings(config: Any, policy: Any, database: str) -> list[str]:
    """Warnings for sensitive-looking columns the policy does not classify (``pgveil check``).

    Scans ``database`` through the control connection (``control.dsn`` pointed at it, password
    ``PGVEIL_CONTROL_PASSWORD``) with the same detector as ``pgveil discover`` and reports every
    finding whose column is not listed under ``protected`` — in a protected table (a column the
    DBA forgot) or in a table the policy does not protect at all.
    """
    import asyncpg

    from proxy.runtime import control_dsn

    dsn = control_dsn(config, database)
    if dsn is None:
        return []
    try:
        result = await discover(dsn, sample=100, password=config.control_password)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError,
            asyncpg.InterfaceError) as exc:
        return [f"database {database}: could not scan for unclassified personal data: {exc}"]
    listed: Mapping[str, Any] = policy.tables
    filename = getattr(policy, "filename", "the policy")
    warnings: list[str] = []
    for f in result.findings:
        table = listed.get(f.table)
        if table is not None and f.column.lower() in table.columns:
            continue
        where = (f"not classified under protected.{f.table}.columns" if table is not None
                 else f"table {f.table} is not protected")
        warnings.append(
            f"{f.table}.{f.column} looks like {f.label} ({f.reason}) but is {where} in "
            f"{filename}; suggested: {f.column}: {{level: {f.level}, mask: {f.mask}}}")
    warnings.extend(f"database {database}: {note}" for note in result.notes)
    return warnings


__all__ = [
    "CATEGORIES", "Category", "ColumnInfo", "Finding", "ScanResult", "TableInfo", "ValueMatch",
    "classify_column", "cmd_discover", "discover", "is_address", "is_bank_card",
    "is_chinese_name", "is_cn_mobile", "is_email", "is_person_table", "is_prc_id",
    "list_tables", "luhn_valid", "name_category", "name_tokens", "prc_id_check_digit",
    "propose_mask", "render_policy_snippet", "sample_table", "scan_database",
    "unclassified_warnings", "value_match",
]
