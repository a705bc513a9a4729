"""Effective operator rules: grants applied to the view, quota counting, policy following."""

from __future__ import annotations

import dataclasses

from proxy.operator import LocalQuota, OperatorState, apply_lifts
from rewriters.model import Limits, OperatorView, Unbounded

BASE = OperatorView(login="teller_sz01", role="teller", attributes={"branch": "SZ01"},
                    tables={}, limits=Limits(max_rows=50, quota_rows=100, quota_seconds=3600,
                                             unbounded=Unbounded.DENY),
                    unrestricted=False, policy_version="v1")


def test_lifts_change_limits_and_the_cache_version() -> None:
    view = apply_lifts(BASE, [("g1", {"max_rows": 500, "copy": True})], lambda role: BASE)
    assert view.limits.max_rows == 500 and view.limits.copy is True
    assert view.policy_version != BASE.policy_version  # no cached decision is reused
    assert view.limits.unbounded is Unbounded.DENY  # untouched


def test_role_lift_rebuilds_the_view() -> None:
    manager = dataclasses.replace(BASE, role="manager", policy_version="v1")
    view = apply_lifts(BASE, [("g2", {"role": "manager"})], lambda role: manager)
    assert view.role == "manager"


def test_quota_counts_only_while_a_quota_applies() -> None:
    quota = LocalQuota()
    state = OperatorState(BASE, None, quota, lambda role: BASE)
    state.add_rows(30)
    assert quota.quota_used("teller_sz01", 3600) == 30
    assert state.quota_exceeded(BASE) is None
    state.add_rows(70)
    assert "quota of 100" in (state.quota_exceeded(BASE) or "")
    free = OperatorState(dataclasses.replace(BASE, limits=Limits()), None, quota,
                         lambda role: BASE)
    free.add_rows(1000)  # a role without a quota charges nothing to be held against it later
    assert quota.quota_used("teller_sz01", 3600) == 100


def test_window_slides() -> None:
    quota = LocalQuota()
    quota.add_rows("x", 5, now=1000.0)
    quota.add_rows("x", 7, now=1500.0)
    assert quota.quota_used("x", 600, now=1550.0) == 12
    assert quota.quota_used("x", 600, now=1700.0) == 7


def test_follows_a_reloaded_policy_between_statements() -> None:
    versions = {"now": "v1"}
    newer = dataclasses.replace(BASE, policy_version="v2", limits=Limits(max_rows=10))
    state = OperatorState(BASE, None, LocalQuota(), lambda role: BASE,
                          policy_view=lambda: (versions["now"], newer),
                          policy_version=lambda: versions["now"])
    assert state.current() is BASE
    versions["now"] = "v2"
    assert state.current().limits.max_rows == 10
