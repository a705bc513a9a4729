"""``pgveil audit verify`` finds each kind of tampering at the right record; search; keygen.

Logs are written by the real :class:`proxy.audit.AuditTrail`, then edited the way an attacker
with write access to the file would: edit a field, re-hash a record, delete, swap, copy or
forge lines, cut the tail, strip or corrupt signatures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from proxy.audit import GENESIS, AuditSettings, AuditTrail, seal
from proxy.audit_sinks import format_ts, parse_ts, rotated_siblings
from proxy.audit_verify import (
    SearchFilter,
    add_audit_arguments,
    parse_when,
    resolve_paths,
    search_files,
    verify_paths,
)
from proxy.keys import generate_keypair, key_fingerprint, load_private_key, load_public_key

OPERATORS = ["teller_sz01", "teller_gz01", "manager_sz01", "auditor1"]
TABLES = [["public.customers"], ["public.accounts"], ["public.customers", "public.accounts"]]
DECISIONS = ["allowed", "rewritten", "blocked", "failed"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


def fields(i: int) -> dict[str, Any]:
    return {"session": f"s{i % 3}", "operator": OPERATORS[i % 4], "role": "teller",
            "client": "10.1.2.3:51234", "application": "crm", "database": "bank",
            "kind": "select", "statement": f"SELECT name, phone FROM customers WHERE id = ?  -- {i}",
            "tables": TABLES[i % 3], "columns": ["public.customers.phone"],
            "decision": DECISIONS[i % 4], "reasons": ["mask public.customers.phone: phone"],
            "grant": None, "rows": i, "duration_ms": 0.5, "error": None}


def write_log(path: Path, key: Path | None, n: int = 45, *, every: int = 10,
              chain: str = "host-1", close: bool = True, start: int = 0,
              rotate_bytes: int = 100 * 1024 * 1024) -> Path:
    """Write ``n`` records with the real trail (checkpoint every ``every``)."""

    async def run() -> None:
        trail = AuditTrail(AuditSettings(file=path, signing_key=key, checkpoint_every=every,
                                         rotate_bytes=rotate_bytes), chain_id=chain)
        await trail.start()
        for i in range(start, start + n):
            await trail.record(fields(i))
        if close:
            await trail.close()
        else:  # leave it as a crash would: no final checkpoint
            assert trail._task is not None
            trail._task.cancel()
            assert trail._executor is not None
            trail._executor.shutdown()
            assert trail._file is not None
            trail._file.close()

    asyncio.run(run())
    return path


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def put(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def rec(line: bytes) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(line)
    return out


def line_of(record: dict[str, Any]) -> bytes:
    return seal(dict(record))


def find(lines: list[bytes], *, kind: str | None = None, not_kind: str | None = None) -> list[int]:
    """0-based indexes of lines whose record kind is (or is not) ``kind``."""
    out = []
    for i, ln in enumerate(lines):
        k = rec(ln).get("kind")
        if (kind is None or k == kind) and (not_kind is None or k != not_kind):
            out.append(i)
    return out


def rechain(records: list[dict[str, Any]], seq: int, prev: str) -> list[bytes]:
    """What a forger does: renumber and re-hash records (cannot re-sign checkpoints)."""
    out = []
    for r in records:
        r = dict(r)
        r["seq"], r["prev"] = seq, prev
        if r.get("kind") == "checkpoint":
            r["head"] = prev
        line = seal(r)
        out.append(line)
        seq, prev = seq + 1, r["hash"]
    return out


def check(path: Path | list[Path], pub: Path | None, what: str, line: int,
          seq: int | None = None, **kw: Any) -> None:
    paths = path if isinstance(path, list) else [path]
    result = verify_paths(paths, pub, **kw)
    assert not result.ok, result.message
    err = result.first_error
    assert err is not None
    assert (err.what, err.line) == (what, line), str(err)
    if seq is not None:
        assert err.seq == seq, str(err)


# ---------------------------------------------------------------------------------------------


def test_intact_log_verifies(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)
    result = verify_paths([log], pub)
    assert result.ok, result.message
    assert result.records == 45 and result.chains == 1 and result.signed
    assert result.key == key_fingerprint(load_public_key(pub))
    summary = result.chain_summaries[0]
    assert summary.closed and not summary.partial and summary.unverified_tail == 0
    # start + one per 10 records (before the 11th, 21st, ...) + close
    assert result.checkpoints == 1 + 4 + 1
    first, last = rec(lines_of(log)[0]), rec(lines_of(log)[-1])
    assert (first["kind"], first["reason"], first["prev"], first["seq"]) == (
        "checkpoint", "start", GENESIS, 0)
    assert last["final"] is True and last["head"] == last["prev"]
    assert "OK" in result.message and "verified" in result.message


def test_edited_field_is_found_at_its_line(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)
    lines = lines_of(log)
    k = find(lines, not_kind="checkpoint")[17]
    lines[k] = lines[k].replace(b'"rows":', b'"rows":1', 1)
    put(log, lines)
    check(log, pub, "edited", k + 1, rec(lines[k])["seq"])


def test_edited_and_rehashed_record_is_found_through_its_successor(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)
    lines = lines_of(log)
    k = find(lines, not_kind="checkpoint")[20]
    r = rec(lines[k])
    r["operator"] = "somebody_else"
    lines[k] = line_of(r)
    put(log, lines)
    check(log, pub, "edited", k + 1, r["seq"])


def test_deleted_line_is_reported_as_removed(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)
    lines = lines_of(log)
    k = find(lines, not_kind="checkpoint")[5]
    missing = rec(lines[k])["seq"]
    del lines[k]
    put(log, lines)
    # the line now at k+1 is the successor: the gap is reported there, naming the missing seq
    check(log, pub, "removed", k + 1, missing)


def test_swapped_lines_are_reported_as_reordered(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)
    lines = lines_of(log)
    k = find(lines, not_kind="checkpoint")[12]
    lines[k], lines[k + 1] = lines[k + 1], lines[k]
    put(log, lines)
    check(log, pub, "reordered", k + 1, rec(lines[k])["seq"])


def test_copied_line_is_reported_as_inserted(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)
    lines = lines_of(log)
    src, at = find(lines, not_kind="checkpoint")[3], find(lines, not_kind="checkpoint")[30]
    lines.insert(at, lines[src])
    put(log, lines)
    check(log, pub, "inserted", at + 1, rec(lines[src])["seq"])


def test_forged_record_with_recomputed_hash_is_found(tmp_path: Path,
                                                     keys: tuple[Path, Path]) -> None:
    """A forger inserts a correctly chained record; the genuine successor exposes it."""
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)
    lines = lines_of(log)
    at = find(lines, not_kind="checkpoint")[25]
    genuine = rec(lines[at])
    forged = dict(genuine, operator="dba", statement="SELECT 1", hash="")
    lines.insert(at, line_of(forged))
    put(log, lines)
    check(log, pub, "inserted", at + 1, genuine["seq"])


def test_rehashing_the_rest_of_the_chain_breaks_the_next_signature(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)
    lines = lines_of(log)
    k = find(lines, not_kind="checkpoint")[14]
    records = [rec(ln) for ln in lines[k:]]
    records[0]["statement"] = "SELECT 'innocent'"
    lines[k:] = rechain(records, records[0]["seq"], records[0]["prev"])
    put(log, lines)
    next_cp = next(i for i in find(lines, kind="checkpoint") if i > k)
    check(log, pub, "bad-signature", next_cp + 1)
    # without the key the forgery passes: that is what the signature is for
    assert verify_paths([log], None).ok


def test_wrong_key_and_stripped_signatures(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)
    _, other_pub = generate_keypair(tmp_path / "other")
    check(log, other_pub, "bad-signature", 1, 0)
    # a forger strips the signatures and re-hashes the whole log
    lines = lines_of(log)
    records = [rec(ln) for ln in lines]
    for r in records:
        if r.get("kind") == "checkpoint":
            r["sig"] = r["key"] = None
    put(log, rechain(records, 0, GENESIS))
    check(log, pub, "bad-signature", 1, 0)


def test_unsigned_log_checks_the_chain_and_says_so(tmp_path: Path) -> None:
    log = write_log(tmp_path / "a.jsonl", None)
    result = verify_paths([log], None)
    assert result.ok and not result.signed
    assert "NOT checked" in result.message
    lines = lines_of(log)
    del lines[7]
    put(log, lines)
    check(log, None, "removed", 8)


def test_torn_last_line_is_a_truncated_tail(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)
    data = log.read_bytes()
    log.write_bytes(data[:-40])
    check(log, pub, "truncated-tail", len(lines_of(log)))


def test_complete_last_line_without_newline_is_a_truncated_tail(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)
    log.write_bytes(log.read_bytes()[:-1])
    check(log, pub, "truncated-tail", len(lines_of(log)))


def test_damaged_middle_line_is_edited(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)
    lines = lines_of(log)
    lines[9] = lines[9][:50] + b"\n"
    put(log, lines)
    check(log, pub, "edited", 10)


def test_cut_tail_of_a_closed_log_needs_closed_flag(tmp_path: Path,
                                                    keys: tuple[Path, Path]) -> None:
    """Whole lines cut from the end: indistinguishable from a crash unless the log is closed."""
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)
    lines = lines_of(log)
    put(log, lines[:-3])
    result = verify_paths([log], pub)
    assert result.ok
    assert result.chain_summaries[0].unverified_tail == 3  # records 43..45 of 45
    assert any("protected by the hash chain only" in n for n in result.notes)
    check(log, pub, "truncated-tail", len(lines) - 3, closed=True)


def test_cut_checkpoint_and_rehashed_long_tail_breaks_the_count_cadence(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)  # checkpoint before every 11th record
    lines = lines_of(log)
    cps = find(lines, kind="checkpoint")
    cut = cps[-3]  # drop the last two cadence checkpoints and the final one
    records = [rec(ln) for ln in lines[cut:] if rec(ln).get("kind") != "checkpoint"]
    lines[cut:] = rechain(records, rec(lines[cut])["seq"], rec(lines[cut])["prev"])
    put(log, lines)
    # 10 records follow the surviving checkpoint cps[-4]; the 11th (the first re-hashed one,
    # at 0-based index cut) must have had a checkpoint before it
    check(log, pub, "truncated-tail", cut + 1)


def test_rehashed_tail_stamped_after_the_cadence_is_caught(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)
    lines = lines_of(log)[:-1]  # drop the final checkpoint
    last_cp = rec(lines[find(lines, kind="checkpoint")[-1]])
    r = rec(lines[-1])
    r["ts"] = format_ts(parse_ts(last_cp["ts"]) + timedelta(seconds=60))
    lines[-1:] = rechain([r], r["seq"], r["prev"])
    put(log, lines)
    check(log, pub, "truncated-tail", len(lines))


def test_record_after_final_checkpoint_and_forged_chain(tmp_path: Path,
                                                        keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)
    lines = lines_of(log)
    last = rec(lines[-1])
    extra = dict(rec(lines[-2]), seq=last["seq"] + 1, prev=last["hash"])
    put(log, [*lines, line_of(extra)])
    check(log, pub, "inserted", len(lines) + 1, last["seq"] + 1)
    # a whole fabricated chain: it cannot begin with a signed start checkpoint
    fake = [dict(rec(ln), chain="forged") for ln in lines[:5]]
    fake[0]["sig"] = "AAAA"
    put(log, [*lines, *rechain(fake, 0, GENESIS)])
    check(log, pub, "bad-signature", len(lines) + 1, 0)


def test_interleaved_chains_are_checked_separately(tmp_path: Path,
                                                   keys: tuple[Path, Path]) -> None:
    key, pub = keys
    a = write_log(tmp_path / "a.jsonl", key, chain="host-1")
    b = write_log(tmp_path / "b.jsonl", key, chain="host-2")
    la, lb = lines_of(a), lines_of(b)
    mixed = [ln for pair in zip(la, lb, strict=True) for ln in pair]
    both = tmp_path / "both.jsonl"
    put(both, mixed)
    result = verify_paths([both], pub)
    assert result.ok and result.chains == 2 and result.records == 90
    victim = next(i for i, ln in enumerate(mixed)
                  if rec(ln)["chain"] == "host-2" and rec(ln)["seq"] == 20)
    del mixed[victim]
    put(both, mixed)
    err = verify_paths([both], pub).first_error
    assert err is not None and (err.chain, err.what, err.seq) == ("host-2", "removed", 20)
    assert err.line == victim + 2  # the next host-2 record, one line further


def test_restart_resumes_the_chain_and_acknowledges_a_torn_line(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key, n=20, close=False)
    with open(log, "ab") as fh:  # power loss in the middle of the next write
        fh.write(b'{"application":"crm","chain":"host-1","client":"10.1.')
    torn_line = len(lines_of(log))
    check(log, pub, "truncated-tail", torn_line)
    write_log(log, key, n=5, start=20)
    result = verify_paths([log], pub)
    assert result.ok, result.message
    assert result.chains == 1 and result.records == 25
    assert result.chain_summaries[0].segments == 1
    assert any("torn line" in n and "acknowledged" in n for n in result.notes)
    resume = rec(lines_of(log)[torn_line])
    assert resume["reason"] == "resume,torn" and resume["torn"][0]["bytes"] == 53
    # an unacknowledged copy of a torn line elsewhere is still damage
    lines = lines_of(log)
    lines.insert(3, lines[torn_line - 1])
    put(log, lines)
    check(log, pub, "edited", 4)


def test_moving_a_later_run_first_cannot_hide_the_runs_between(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """The first file may start mid-chain (older files pruned), and a chain may restart at
    seq 0: a log cut into [last run][first run] would pass as a partial segment and a restart,
    without the runs between. A restart stamped before the end of what precedes it is caught."""
    key, pub = keys
    log = tmp_path / "a.jsonl"
    for start in (0, 100, 200):  # three runs: start..close, resume..close, resume..close
        write_log(log, key, n=12, every=5, start=start)
    lines = lines_of(log)
    starts = [i for i, ln in enumerate(lines)
              if str(rec(ln).get("reason", "")).split(",")[0] in ("start", "resume")]
    assert len(starts) == 3
    first, last = lines[:starts[1]], lines[starts[2]:]
    assert verify_paths([log], pub, closed=True).ok
    put(log, last + first)
    check(log, pub, "reordered", len(last) + 1, closed=True)


def test_records_no_signature_covers_before_a_restart_fail(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """Records after the last checkpoint of a segment the chain restarts after: nothing can
    vouch for them (a forger appends re-hashed records there)."""
    key, pub = keys
    crashed = write_log(tmp_path / "old.jsonl", key, n=20, every=10, close=False)
    fresh = write_log(tmp_path / "new.jsonl", key, n=5, every=10)
    old = lines_of(crashed)
    cut = max(find(old, kind="checkpoint")) + 1  # keep the crashed run up to a checkpoint
    joined = tmp_path / "joined.jsonl"
    put(joined, old[:cut] + lines_of(fresh))
    # a run that ends at a checkpoint that is not its final one, then a restart at seq 0
    check(joined, pub, "truncated-tail", cut)
    tail = rec(old[cut - 1])
    forged = rechain([fields(900) | {"chain": "host-1", "kind": "select",
                                     "ts": tail["ts"]}], tail["seq"] + 1, tail["hash"])
    put(joined, old[:cut] + forged + lines_of(fresh))
    check(joined, pub, "inserted", cut + 1)


def archived_restart(tmp_path: Path, key: Path) -> tuple[Path, Path]:
    """A run closed cleanly and archived while pgveil was stopped, then a new run: the same
    chain id starts again at seq 0 in a new file (two segments)."""
    live = tmp_path / "live" / "audit.jsonl"  # where pgveil writes
    write_log(live, key, n=35, every=10)
    archived = tmp_path / "audit.20261125T000000.000000Z.jsonl"  # the reviewer's copy
    live.rename(archived)
    write_log(live, key, n=5, every=10)
    current = tmp_path / "audit.jsonl"
    live.rename(current)
    return archived, current


def test_archived_restart_verifies(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    archived, current = archived_restart(tmp_path, key)
    assert rec(lines_of(current)[0])["reason"] == "start"
    for kw in ({}, {"closed": True, "require_genesis": True}):
        result = verify_paths([current], pub, **kw)
        assert result.ok, result.message
        assert result.records == 40 and result.chain_summaries[0].segments == 2


def test_tail_cut_from_a_segment_before_a_restart_is_found(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """Cutting a segment back to one of its checkpoints (its last records and its final
    checkpoint) leaves a chain that links and is signed up to there; only the missing final
    checkpoint before the restart shows it -- with or without --closed, as the segment is no
    longer being written."""
    key, pub = keys
    archived, current = archived_restart(tmp_path, key)
    lines = lines_of(archived)
    keep = find(lines, kind="checkpoint")[2] + 1  # up to its 3rd checkpoint
    put(archived, lines[:keep])
    last_seq = rec(lines[keep - 1])["seq"]
    for kw in ({}, {"closed": True, "require_genesis": True}):
        check(current, pub, "truncated-tail", keep, last_seq, **kw)
    err = verify_paths([current], pub).first_error
    assert err is not None and err.file == str(archived)
    assert "without its closing checkpoint" in err.message and "killed" in err.message
    # the same without a key: the hash chain alone still shows the missing final checkpoint
    check(current, None, "truncated-tail", keep, last_seq)
    # only the final checkpoint cut: the records after the last kept checkpoint are unsigned
    put(archived, lines[:-1])
    check(current, pub, "inserted", len(lines) - 1)


def test_rotated_series_continuity(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "audit" / "pgveil-audit.jsonl", key, n=120, every=10,
                    rotate_bytes=6000)
    rotated = rotated_siblings(log)
    assert len(rotated) >= 4
    series = [*rotated, log]
    assert resolve_paths([log]) == series
    assert resolve_paths([log.parent]) == series
    assert resolve_paths([str(log.parent / "pgveil-audit*.jsonl")]) == series
    result = verify_paths([log], pub)
    assert result.ok and result.records == 120, result.message
    # every new file starts with a signed "rotate" checkpoint continuing the chain
    for f in series[1:]:
        first = rec(lines_of(f)[0])
        assert first["kind"] == "checkpoint" and "rotate" in first["reason"]
    # verifying only the current file: the chain is partial, still verified
    alone = verify_paths([rotated[-1]], pub)
    assert alone.ok and alone.chain_summaries[0].partial
    check(rotated[-1], pub, "removed", 1, require_genesis=True)
    # cut the last record of a rotated file: found at the first record of the next file
    victim = rotated[1]
    lines = lines_of(victim)
    missing = rec(lines[-1])["seq"]
    put(victim, lines[:-1])
    check(log, pub, "removed", 1, missing)
    assert verify_paths([log], pub).first_error.file == str(rotated[2])  # type: ignore[union-attr]
    put(victim, lines)
    # a whole rotated file removed
    rotated[2].unlink()
    check(log, pub, "removed", 1)


def test_keep_files_prunes_old_rotations(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = tmp_path / "a.jsonl"

    async def run() -> None:
        trail = AuditTrail(AuditSettings(file=log, signing_key=key, rotate_bytes=3000,
                                         keep_files=2, checkpoint_every=10), chain_id="h")
        await trail.start()
        for i in range(80):
            await trail.record(fields(i))
        await trail.close()

    asyncio.run(run())
    assert len(rotated_siblings(log)) == 2
    result = verify_paths([log], pub)
    assert result.ok and result.chain_summaries[0].partial


# ---------------------------------------------------------------------------------------------
# CLI, search, keys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgveil")
    add_audit_arguments(p.add_subparsers(dest="command"))
    return p


def run_cli(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


def test_cli_verify_exit_codes_and_output(tmp_path: Path, keys: tuple[Path, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key)
    assert run_cli(["audit", "verify", str(log), "--key", str(pub.parent)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK 1 file(s), 1 chain(s), 45 records") and "closed" in out
    lines = lines_of(log)
    del lines[10]
    put(log, lines)
    assert run_cli(["audit", "verify", str(log), "--key", str(pub)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"FAIL {log}:11 (chain host-1, seq ") and "removed" in out
    assert run_cli(["audit", "verify", str(log), "--key", str(pub), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["first_error"]["line"] == 11
    assert data["first_error"]["what"] == "removed"
    assert run_cli(["audit", "verify", str(tmp_path / "nope.jsonl")]) == 2
    assert run_cli(["audit", "verify", str(log), "--key", str(tmp_path / "nokey.pub")]) == 2


def test_cli_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["keygen", "--help"], ["audit", "verify", "--help"],
                 ["audit", "search", "--help"]):
        with pytest.raises(SystemExit) as exc:
            parser().parse_args(argv)
        assert exc.value.code == 0
        assert "example" in capsys.readouterr().out


def test_keygen_cli_and_key_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k"
    assert run_cli(["keygen", "--out", str(out)]) == 0
    key, pub = out / "audit.key", out / "audit.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert key_fingerprint(load_private_key(key)) == key_fingerprint(load_public_key(out))
    assert "fingerprint" in capsys.readouterr().out
    before = key.read_bytes()
    assert run_cli(["keygen", "--out", str(out)]) == 1
    assert key.read_bytes() == before
    assert run_cli(["keygen", "--out", str(out), "--force"]) == 0
    assert key.read_bytes() != before
    os.chmod(key, 0o644)
    load_private_key(key)  # loads, with a warning about the mode


def test_search_filters(tmp_path: Path, keys: tuple[Path, Path],
                        capsys: pytest.CaptureFixture[str]) -> None:
    key, _ = keys
    log = write_log(tmp_path / "a.jsonl", key, n=40)
    got = list(search_files([log], SearchFilter(login="teller_gz01")))
    assert len(got) == 10 and {r["operator"] for r in got} == {"teller_gz01"}
    got = list(search_files([log], SearchFilter(table="accounts")))
    assert all("public.accounts" in r["tables"] for r in got) and len(got) == 26
    got = list(search_files([log], SearchFilter(table="public.customers",
                                                decisions=("blocked",))))
    assert {r["decision"] for r in got} == {"blocked"} and len(got) == 7
    assert list(search_files([log], SearchFilter(since=parse_when("1h")))) != []
    assert list(search_files([log], SearchFilter(until=parse_when("1h")))) == []
    assert len(list(search_files([log], SearchFilter(checkpoints=True)))) == 40 + 5
    assert run_cli(["audit", "search", str(log), "--login", "auditor1", "--table", "customers",
                    "--since", "10m", "--json"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert out and all(r["operator"] == "auditor1" for r in out)
    assert run_cli(["audit", "search", str(log), "--role", "teller", "--limit", "3"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 4 and "(3 records)" in captured.err
    assert run_cli(["audit", "search", str(log), "--since", "yesterday-ish"]) == 2


def test_parse_when() -> None:
    now = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
    assert parse_when("90m", now) == now - timedelta(minutes=90)
    assert parse_when("2d", now) == now - timedelta(days=2)
    assert parse_when("2026-11-23T09:00+08:00") == datetime(2026, 11, 23, 1, 0,
                                                            tzinfo=timezone.utc)
    assert parse_when("2026-11-23").tzinfo is not None
    with pytest.raises(ValueError):
        parse_when("soon")


def test_log_spanning_a_key_change_needs_both_keys(tmp_path: Path,
                                                   keys: tuple[Path, Path]) -> None:
    old_key, old_pub = keys
    new_key, new_pub = generate_keypair(tmp_path / "new")
    log = write_log(tmp_path / "a.jsonl", old_key, n=15)
    resume_line = len(lines_of(log)) + 1
    write_log(log, new_key, n=15, start=15)
    assert verify_paths([log], [old_pub, new_pub]).ok
    check(log, old_pub, "bad-signature", resume_line)
    assert run_cli(["audit", "verify", str(log), "-k", str(old_pub), "-k", str(new_pub)]) == 0


def test_hostile_lines_are_reported_not_crashed_on(tmp_path: Path,
                                                   keys: tuple[Path, Path]) -> None:
    key, pub = keys
    log = write_log(tmp_path / "a.jsonl", key, n=5)
    good = lines_of(log)
    start = rec(good[0])
    weird = [
        dict(start, reason=5, chain="w1"),
        dict(start, torn=5, seconds="x", chain="w2"),
        dict(start, ts="2026-13-45T99:99:99.000000Z", chain="w3"),
        dict(start, every=None, count="many", chain="w4"),
    ]
    garbage = [b"\x00\xff\xfe\n", b"[1,2,3]\n", b'{"a": NaN}\n', b"{}\n", b"[" * 100000 + b"\n"]
    for extra in [*[line_of(w) for w in weird], *garbage]:
        put(log, [*good, extra])
        result = verify_paths([log], pub)
        assert not result.ok and result.first_error is not None
        assert result.first_error.line == len(good) + 1


def test_search_table_output_shows_control_characters_escaped() -> None:
    """A client chooses statement text and aliases: raw escape sequences in the table output
    would erase or forge rows on the auditor's terminal."""
    from proxy.audit_verify import _row

    row = _row(fields(1) | {"ts": "2026-11-25T00:00:00Z",
                            "statement": 'select id as "\x1b[2K\x1b[1A\x9b2K" from customers'})
    assert "\x1b" not in row and "\x9b" not in row
    assert "\\x1b[2K" in row


def test_audited_errors_keep_their_sqlstate_and_lose_values() -> None:
    from proxy.runtime import _redact_error

    assert _redact_error("22012: division by zero") == "22012: division by zero"
    assert _redact_error('22P02: invalid input syntax for type integer: "13812345678"') == \
        '22P02: invalid input syntax for type integer: "?"'
    assert "13812345678" not in _redact_error("XX000: value 13812345678 out of range")
