"""The audit trail's fast record encoder is byte-identical to the reference encoding.

``AuditTrail.record`` encodes statement records without json.dumps (cached value encodings
spliced into a per-key-set template, see ``proxy.audit._encode_values``). Every line it writes
must be exactly what the reference path produces: ``seal()`` (json.dumps, sorted keys) of the
record as ``_body()`` (``normalize``) builds it, with the same seq, ts, chain and prev. These
tests feed the trail many random records -- unicode, control characters, quotes and
backslashes, lone surrogates, floats of every shape (and NaN/inf), huge ints, bools next to
equal ints, nested lists, dicts, tuples, sets, enums, bytes, unusual keys -- and compare each
written line with the reference bytes.
"""

from __future__ import annotations

import enum
import json
import math
import random
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from proxy import audit
from proxy.audit import (
    RECORD_FIELDS,
    AuditSettings,
    AuditTrail,
    AuditUnavailable,
    canonical,
    seal,
)
from proxy.audit_verify import verify_paths

encode_values = audit._encode_values


class Color(enum.Enum):
    RED = "red"
    ONE = 1


class Level(enum.IntEnum):
    HIGH = 3


class Tag(str):
    pass


_ALPHABET = (
    "abcXYZ019 _-.:$%*/{}[],\"\\'\n\r\t\b\f\x00\x01\x1f\x7f\x80\xa0é€ß中文😀\u2028\u2029\ufeff\uffff"
)


def rand_str(rng: random.Random) -> str:
    n = rng.choice([0, 1, 2, 5, 12, 40])
    s = "".join(rng.choice(_ALPHABET) for _ in range(n))
    if rng.random() < 0.03:
        s += "\ud800"  # a lone surrogate (normalize() rewrites it)
    return s


def rand_float(rng: random.Random) -> float:
    return rng.choice([
        0.0, -0.0, 1.0, 0.1, 0.84, 1e16, 1e-7, 123456789.123, -2.5e-300, 1.7976931348623157e308,
        5e-324, math.pi, float("nan"), float("inf"), float("-inf"), rng.uniform(-1e6, 1e6),
        round(rng.random() * 1000, 3)])


def rand_int(rng: random.Random) -> int:
    return rng.choice([0, 1, -1, 7, 2**31, -(2**63), 2**64 + 1, 10**50, rng.randint(-10**6, 10**6)])


def rand_scalar(rng: random.Random) -> Any:
    return rng.choice([
        lambda: rand_str(rng), lambda: rand_float(rng), lambda: rand_int(rng), lambda: None,
        lambda: True, lambda: False])()


def rand_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if roll < 0.45 or depth > 2:
        return rand_scalar(rng)
    if roll < 0.65:  # lists of strings: what statement records carry
        return [rand_str(rng) for _ in range(rng.randint(0, 4))]
    if roll < 0.75:
        return [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if roll < 0.8:
        return tuple(rand_str(rng) for _ in range(rng.randint(0, 3)))
    if roll < 0.84:
        return {rand_str(rng): rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice([
        lambda: {rand_str(rng) for _ in range(3)}, lambda: Color.RED, lambda: Color.ONE,
        lambda: Level.HIGH, lambda: Tag("tag"), lambda: b"\x00\xff",
        lambda: datetime(2026, 1, 2, 3, 4, 5, 6789, tzinfo=timezone.utc),
        lambda: frozenset({1, 2}), lambda: [1, True, 1.0], lambda: [True], lambda: [1.0],
        lambda: [[]], lambda: Path("/x")])()


EXTRA_KEYS = ["lookups", "zzz", "aaa", "%s", "%", "100%", "é", "中", "a\"b", "A", "seq_", "tsx",
              "", " ", "\n", "kind2"]


def plain_value(rng: random.Random) -> Any:
    """A value of the types the fast encoder handles (strings still of every kind)."""
    if rng.random() < 0.3:
        return [rand_str(rng) for _ in range(rng.randint(0, 4))]
    value = rand_scalar(rng)
    if isinstance(value, float) and not math.isfinite(value):
        return 0.5
    if isinstance(value, str):
        return value.replace("\ud800", "?")
    return value


def rand_fields(rng: random.Random) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    value = plain_value if rng.random() < 0.6 else rand_value
    for key in RECORD_FIELDS:
        if rng.random() < 0.85:
            fields[key] = value(rng)
    for key in rng.sample(EXTRA_KEYS, rng.randint(0, 3)):
        fields[key] = value(rng)
    if rng.random() < 0.05:
        fields[7] = "a non-str key"  # type: ignore[index]
    if fields.get("kind") == "checkpoint":
        fields["kind"] = "select"
    items = list(fields.items())
    if rng.random() < 0.5:
        rng.shuffle(items)
    return dict(items)


def statement_like(rng: random.Random, session: str) -> dict[str, Any]:
    """The shape Session._audit produces, with values from a small pool (cache hits)."""
    return {"session": session, "operator": rng.choice(["teller_sz01", "analyst"]),
            "role": rng.choice(["teller", "analyst"]), "client": "127.0.0.1:5000",
            "application": rng.choice(["pgbench", "", "psql é"]), "database": "bank",
            "kind": rng.choice(["select", "update"]),
            "statement": rng.choice(["SELECT * FROM customers WHERE id = $1",
                                     "UPDATE t SET a = ? WHERE b = 'x\"y'"]),
            "tables": rng.choice([["public.customers"], [], ["a", "b"]]),
            "columns": rng.choice([["customers.phone"], []]),
            "decision": rng.choice(["rewritten", "allowed", "blocked"]),
            "reasons": rng.choice([[], ["mask customers.phone"], ["row limit 100 exceeded"]]),
            "grant": rng.choice([None, "g-1", 5]), "rows": rng.choice([None, 0, 1, 250]),
            "lookups": rng.choice([[], ["customers.id_number"]]),
            "duration_ms": round(rng.random() * 10, 3), "error": rng.choice([None, "boom"])}


async def _write(tmp_path: Path, chain_id: str, batches: list[list[dict[str, Any]]]
                 ) -> tuple[Path, AuditTrail, list[dict[str, Any]]]:
    log = tmp_path / "a.jsonl"
    trail = AuditTrail(AuditSettings(file=log, checkpoint_every=50), chain_id=chain_id)
    await trail.start()
    expected: list[dict[str, Any]] = []
    for batch in batches:
        futs = []
        for fields in batch:
            # the reference body is built before record() could touch the dict
            expected.append(trail._body(fields))
            futs.append(trail.record(fields))
        for fut in futs:
            await fut
    await trail.close()
    return log, trail, expected


def _check(log: Path, chain_id: str, expected: list[dict[str, Any]]) -> int:
    lines = log.read_bytes().splitlines(keepends=True)
    statements = [ln for ln in lines if json.loads(ln).get("kind") != "checkpoint"]
    assert len(statements) == len(expected)
    for line, body in zip(statements, expected, strict=True):
        got = json.loads(line)
        rec = {**body, "seq": got["seq"], "ts": got["ts"], "chain": chain_id,
               "prev": got["prev"]}
        want = seal(rec)
        assert line == want, (line, want)
        assert canonical({k: v for k, v in got.items() if k != "hash"}) == line[:line.rindex(
            b',"hash":')] + b"}"
    return len(statements)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_records_are_byte_identical_to_the_reference(
        tmp_path: Path, seed: int) -> None:
    def path_of(fields: dict[str, Any]) -> str:
        """The encoder the trail takes for these fields (AuditTrail.record: the template
        path when _encode_values accepts the values). Classified here rather than by patching
        the module, whose compiled form (setup.py) calls its own function directly."""
        try:
            encode_values(fields.values())
        except Exception:  # noqa: BLE001 - _Slow, TypeError, ValueError: the json.dumps path
            return "slow"
        return "fast"

    rng = random.Random(seed)
    batches = [[rand_fields(rng) for _ in range(rng.randint(1, 12))] for _ in range(120)]
    paths = {"fast": 0, "slow": 0}
    for batch in batches:
        for fields in batch:
            paths[path_of(fields)] += 1
    chain_id = "host-é:1234:0"
    log, _, expected = await _write(tmp_path, chain_id, batches)
    assert _check(log, chain_id, expected) == sum(map(len, batches))
    assert verify_paths([log], None, closed=True).ok
    assert paths["fast"] > 50 and paths["slow"] > 50  # both encoders were compared


async def test_statement_records_take_the_fast_path_and_match(tmp_path: Path) -> None:
    rng = random.Random(7)
    batches = [[statement_like(rng, f"s{c}") for c in range(8)] for _ in range(300)]
    chain_id = 'we"ird%s\\chain 中'
    log, trail, expected = await _write(tmp_path, chain_id, batches)
    assert _check(log, chain_id, expected) == 2400
    assert trail._plans and all(p is not None for p in trail._plans.values())
    assert verify_paths([log], None, closed=True).ok


async def test_equal_values_of_other_types_are_not_confused(tmp_path: Path) -> None:
    """The value caches are keyed by value: 1 == True == 1.0 must still encode apart."""
    rows = [{"tables": ["1"], "rows": 1, "columns": [1]}, {"tables": ["1"], "rows": True,
                                                           "columns": [True]},
            {"tables": ["1"], "rows": 1.0, "columns": [1.0]}, {"tables": [1], "rows": 0},
            {"tables": ["1"], "rows": False, "columns": [0.0]}, {"rows": -0.0, "columns": []},
            {"rows": 0.0, "columns": [[]]}, {"rows": 10**20, "tables": []},
            {"rows": 10**5000, "tables": []} if sys.version_info < (3, 11) else {"rows": 5}]
    base = {"kind": "select", "statement": "x"}
    batches = [[{**base, **r}] for r in rows * 3]
    log, _, expected = await _write(tmp_path, "c", batches)
    assert _check(log, "c", expected) == len(batches)


# A Python version guard, not a missing dependency: before 3.10.7 (pyproject allows 3.10)
# json.dumps has no digit limit, so no record is refused; CI's 3.11 runs this test.
@pytest.mark.skipif(not hasattr(sys, "set_int_max_str_digits"),
                    reason="Python < 3.10.7: json.dumps has no int digit limit to refuse a record")
async def test_a_record_json_refuses_is_dropped_and_declared_lost(tmp_path: Path) -> None:
    """json.dumps refuses a 5000-digit int: that record's future fails (it is declared lost in
    the next checkpoint) instead of the writer retrying it forever with its future pending."""
    log = tmp_path / "a.jsonl"
    trail = AuditTrail(AuditSettings(file=log), chain_id="c")
    await trail.start()
    bad = trail.record({"kind": "select", "rows": 10**5000})
    good = trail.record({"kind": "select", "rows": 1})
    with pytest.raises(AuditUnavailable):
        await bad
    await good
    await trail.close()
    recs = [json.loads(ln) for ln in log.read_bytes().splitlines()]
    assert [r["rows"] for r in recs if r["kind"] == "select"] == [1]
    assert any(r.get("lost") == 1 for r in recs if r["kind"] == "checkpoint")
    assert verify_paths([log], None, closed=True).ok


async def test_record_forms_write_the_reference_bytes(tmp_path: Path) -> None:
    """A RecordForm (fields encoded once per shape) plus rows and duration gives exactly the
    line record() gives for the same fields, in the same chain, interleaved with dict records
    and checkpoints; random field values that need the slow encoder get no form."""
    rng = random.Random(11)
    log = tmp_path / "a.jsonl"
    chain_id = "host:1:0"
    trail = AuditTrail(AuditSettings(file=log, checkpoint_every=50), chain_id=chain_id)
    await trail.start()
    expected: list[dict[str, Any]] = []
    futs = []
    formless = 0
    for i in range(600):
        fields = statement_like(rng, f"s{i % 5}") if i % 3 else rand_fields(rng)
        rows, duration = fields.pop("rows", None), fields.pop("duration_ms", None)
        fields.pop("error", None)
        if not isinstance(rows, int) or isinstance(rows, bool):
            rows = rng.choice([0, 1, 37])
        if not isinstance(duration, float) or not math.isfinite(duration):
            duration = round(rng.random() * 5, 3)
        reserved = audit.RESERVED.intersection(fields) or fields.get("kind") == "checkpoint"
        form = None if reserved else trail.prepare(fields)
        full = {**fields, "rows": rows, "duration_ms": duration}
        if reserved:
            continue
        expected.append(trail._body(full))
        if form is None:
            formless += 1
            futs.append(trail.record(full))
        else:
            futs.append(trail.record_form(form, rows, duration))
    for fut in futs:
        await fut
    await trail.close()
    assert _check(log, chain_id, expected) == len(expected)
    assert formless and formless < len(expected) // 2
    assert verify_paths([log], None, closed=True).ok
