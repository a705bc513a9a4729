"""Micro-benchmark: CPU per audit record on the proxy's event-loop path, no sockets.

What one protected statement costs the (single-threaded) proxy for its audit record:
``Runtime.submit_audit`` (metrics + literal redaction) → ``AuditTrail.record`` → its share of
the writer task (chain, hash, canonical JSON, one file write per group) → the future resolved.
The trail writes to a temporary file with ``durability: strict`` (results wait for the write,
as in the pgbench runs; ``fsync: false``, the default).

Groups of ``--group`` records are submitted back to back (``--group`` clients each with one
statement in flight), then awaited together, ``--groups`` times. The same loop with a no-op
submit is measured too, so the harness's own cost (building the fields dict, awaiting) can be
subtracted::

    .venv/bin/python bench/audit_micro.py                # µs/record, net of the harness
    .venv/bin/python bench/audit_micro.py --group 1 --groups 20000
    .venv/bin/python bench/audit_micro.py --profile      # cProfile of the audited loop
    .venv/bin/python bench/audit_micro.py --form         # the hot path's per-shape form

``--form`` measures what a repeated protected lookup on the hot path pays instead: the record
filled into its statement shape's :class:`proxy.audit.RecordForm` (``AuditTrail.record_form``),
without metrics or redaction.

CPU time is ``time.process_time()`` (all threads of the process), best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.audit import AuditSettings, AuditTrail  # noqa: E402
from proxy.metrics import Metrics  # noqa: E402
from proxy.runtime import Runtime, _AuditMetrics  # noqa: E402

IDENTITY = {"session": "5f2a9c01", "operator": "teller_sz01", "role": "teller",
            "client": "127.0.0.1:51234", "application": "pgbench", "database": "bank"}


def statement_fields(n: int) -> dict[str, Any]:
    """What ``Session._audit`` hands the shell for the masked prepared lookup."""
    fields = dict(IDENTITY)
    fields.update(
        role="teller", kind="select", statement="SELECT * FROM customers WHERE id = $1",
        tables=["public.customers"], columns=["customers.id_number", "customers.phone"],
        decision="rewritten", reasons=["mask customers.id_number", "row filter branch"],
        grant=None, rows=1, lookups=[], duration_ms=round(0.3 + (n % 97) / 1000, 3),
        error=None)
    return fields


class _Stub:
    """Just enough of a Runtime for ``Runtime.submit_audit``."""

    def __init__(self, trail: AuditTrail | None, metrics: Metrics) -> None:
        self.metrics = metrics
        self.audit = trail
        self.config = SimpleNamespace(audit=SimpleNamespace(redact_literals=True))


async def _loop(submit: Any, groups: int, group: int) -> float:
    t0 = time.process_time()
    n = 0
    for _ in range(groups):
        futs = []
        for _ in range(group):
            futs.append(submit(statement_fields(n)))
            n += 1
        for fut in futs:
            if fut is not None and not fut.done():
                await fut
    return time.process_time() - t0


async def _done_future() -> Any:
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(None)
    return fut


async def measure(groups: int, group: int, profile: bool,
                  form: bool = False) -> tuple[float, float]:
    """(µs per record for the audited loop, µs per record for the harness alone)."""
    done = await _done_future()

    def noop(fields: dict[str, Any]) -> Any:
        return done

    harness = await _loop(noop, groups, group)
    with tempfile.TemporaryDirectory() as tmp:
        settings = AuditSettings(file=Path(tmp) / "audit.jsonl", durability="strict",
                                 checkpoint_every=1000, checkpoint_seconds=10.0)
        metrics = Metrics()
        trail = AuditTrail(settings, chain_id="bench-host:1234:0",
                           metrics=_AuditMetrics(metrics))
        await trail.start()
        stub = _Stub(trail, metrics)

        def submit(fields: dict[str, Any]) -> Any:
            return Runtime.submit_audit(stub, fields)  # type: ignore[arg-type]

        if form:
            fixed = statement_fields(0)
            del fixed["rows"], fixed["duration_ms"]
            shape = trail.prepare(fixed)
            assert shape is not None

            def submit(fields: dict[str, Any]) -> Any:  # noqa: F811 - the form path instead
                return trail.record_form(shape, fields["rows"], fields["duration_ms"])

        await _loop(submit, max(1, groups // 10), group)  # warm caches and the file
        prof = cProfile.Profile() if profile else None
        if prof is not None:
            prof.enable()
        audited = await _loop(submit, groups, group)
        if prof is not None:
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        await trail.close()
        lines = (Path(tmp) / "audit.jsonl").read_bytes().count(b"\n")
        expected = groups + max(1, groups // 10)
        if lines < expected:
            raise SystemExit(f"only {lines} lines written, expected at least {expected}")
    records = groups * group
    return audited / records * 1e6, harness / records * 1e6


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=5000)
    ap.add_argument("--group", type=int, default=8, help="records per group (clients)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--form", action="store_true", help="the hot path's RecordForm records")
    args = ap.parse_args(argv)
    if not args.no_uvloop:
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:  # pragma: no cover
            pass
    results = [asyncio.run(measure(args.groups, args.group, args.profile and i == 0, args.form))
               for i in range(args.repeat)]
    best = min(results, key=lambda r: r[0] - r[1])
    total, harness = best
    kind = "form" if args.form else "audit"
    print(f"{kind} record: {total - harness:.1f} us/record net "
          f"({total:.1f} total - {harness:.1f} harness), groups of {args.group}, "
          f"{args.groups * args.group} records, best of {args.repeat}")


if __name__ == "__main__":
    main()
