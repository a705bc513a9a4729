"""One connected operator's effective rules: the policy view with active grants applied, and the
quota meter.

The policy view is resolved once per connection (``Runtime.operator_view``). Grants are
approved, expiring exceptions for one login (``pgveil grant``); they arrive from the control
database by LISTEN/NOTIFY at any time, so :meth:`OperatorState.current` re-derives the view
whenever the control store's grant generation changes — a cheap integer comparison per statement
otherwise. A view with grants applied gets a distinct ``policy_version`` so that the analyser's
decision cache never serves a decision made under different limits.

Quotas count protected rows returned to this login over a sliding window. With a control
database the count is shared by every worker and replica (``proxy.control.ControlStore``, local
fast path); without one, :class:`LocalQuota` counts in this process.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from rewriters.model import Limits, OperatorView, Unbounded


class LocalQuota:
    """Sliding-window row counts per login, in this process only (no control database)."""

    def __init__(self) -> None:
        self._events: dict[str, deque[tuple[float, int]]] = {}

    def add_rows(self, login: str, rows: int, now: float | None = None) -> None:
        self._events.setdefault(login, deque()).append((time.time() if now is None else now,
                                                        rows))

    def quota_used(self, login: str, window_seconds: float, now: float | None = None) -> int:
        events = self._events.get(login)
        if not events:
            return 0
        cutoff = (time.time() if now is None else now) - window_seconds
        while events and events[0][0] < cutoff:
            events.popleft()
        return sum(n for _, n in events)


def apply_lifts(view: OperatorView, lifts: list[tuple[str, dict[str, Any]]],
                rebuild: Callable[[str], OperatorView]) -> OperatorView:
    """The view with each grant's lifts applied; ``rebuild(role)`` makes a view for another
    role (``role=manager``) keeping the operator's login and attributes."""
    for _, lift in lifts:
        if "role" in lift:
            view = rebuild(str(lift["role"]))
    limits: Limits = view.limits
    for _, lift in lifts:
        if "max_rows" in lift and limits.max_rows is not None:
            limits = dataclasses.replace(limits, max_rows=max(limits.max_rows,
                                                              int(lift["max_rows"])))
        if lift.get("copy"):
            limits = dataclasses.replace(limits, copy=True)
        if lift.get("unbounded"):
            limits = dataclasses.replace(limits, unbounded=Unbounded.ALLOW)
        if lift.get("hours"):
            limits = dataclasses.replace(limits, hours=None)
        if lift.get("quota"):
            limits = dataclasses.replace(limits, quota_rows=None, quota_seconds=None)
    ids = "+".join(gid for gid, _ in lifts)
    return dataclasses.replace(view, limits=limits,
                               policy_version=f"{view.policy_version}+grant:{ids}")


class OperatorState:
    """Per-session: the effective view (grants applied) and quota checks."""

    def __init__(self, base: OperatorView, control: Any, quota: Any,
                 rebuild: Callable[[str], OperatorView],
                 policy_view: Callable[[], tuple[str, OperatorView | None]] | None = None,
                 policy_version: Callable[[], str] | None = None,
                 epoch: list[int] | None = None,
                 reservations: dict[str, int] | None = None):
        # ``epoch[0]`` changes whenever the policy or a catalog changes (Runtime.epoch): until
        # it does, ``policy_version`` need not be asked (``current`` runs per statement)
        self.epoch_ref = epoch
        self.epoch_seen = -1
        self.base = base
        self.policy_view = policy_view
        self.policy_version = policy_version
        self._policy_version = base.policy_version
        self.control = control  # ControlStore or None
        self.quota = quota  # ControlStore or LocalQuota
        self.rebuild = rebuild
        self.generation_seen = -1
        self._view = base
        self.grant_id: str | None = None
        # quota rows held by statements of this login that are returning rows now, in any
        # session of this process (Runtime.quota_reservations): see reserve()
        self.reservations: dict[str, int] = {} if reservations is None else reservations

    def stale(self) -> bool:
        """Whether :meth:`current` could return another view than last time (inline in hot
        paths as ``epoch_ref[0] != epoch_seen or control.generation != generation_seen``)."""
        epoch = self.epoch_ref
        control = self.control
        return epoch is None or epoch[0] != self.epoch_seen or (
            control is not None and control.generation != self.generation_seen)

    def current(self) -> OperatorView:
        epoch = self.epoch_ref
        if epoch is None or epoch[0] != self.epoch_seen:
            if epoch is not None:
                self.epoch_seen = epoch[0]
            if self.policy_version is not None and \
                    self.policy_version() != self._policy_version:
                self._follow_policy()
        control = self.control
        if control is None:
            return self._view
        generation = control.generation  # bumps on grant create/revoke/expiry
        if generation == self.generation_seen:
            return self._view
        self.generation_seen = generation
        grants = control.grants_for(self.base.login)
        if not grants or self.base.revoked:  # no grant lifts a login the policy dropped
            self._view, self.grant_id = self.base, None
            return self._view
        lifts = [(g.id, dict(g.lift)) for g in grants]
        self._view = apply_lifts(self.base, lifts, self.rebuild)
        self.grant_id = ",".join(g.id for g in grants)
        return self._view

    def _follow_policy(self) -> None:
        """After a reload, the next statement runs under the new policy (exactly one version
        per statement: the view is swapped between statements, never during one)."""
        assert self.policy_view is not None
        version, view = self.policy_view()
        if version == self._policy_version:
            return
        self._policy_version = version
        if view is not None:
            self.base = view
            self._view = view
            self.generation_seen = -1  # re-apply grants on the new base

    def quota_room(self, view: OperatorView) -> int | None:
        """Quota rows this login may still be charged: the quota less the rows charged in the
        window and the rows held by its statements returning rows now; None: no quota."""
        limits = view.limits
        if limits.quota_rows is None or limits.quota_seconds is None:
            return None
        used = self.quota.quota_used(view.login, limits.quota_seconds)
        return limits.quota_rows - used - self.reservations.get(self.base.login, 0)

    def quota_exceeded(self, view: OperatorView, need: int = 1) -> str | None:
        """Why a statement that costs at least ``need`` quota rows (a lookup: the values it
        presents) may not start now; None when it may."""
        room = self.quota_room(view)
        if room is None or room >= need:
            return None
        return self.quota_message(view, need)

    def quota_message(self, view: OperatorView, need: int = 1) -> str:
        limits = view.limits
        text = (f"quota of {limits.quota_rows} protected rows per "
                f"{_period(limits.quota_seconds or 0)} exhausted for {view.login} (role "
                f"{view.role})")
        if need > 1:
            text += f": this statement presents {need} lookup values, each charged as a row"
        return text + "; it frees up as older reads leave the window"

    def reserve(self, rows: int) -> None:
        """Hold ``rows`` of quota for a statement that is returning rows: concurrent statements
        of the same login (pipelined, or in other sessions) see less room, so together they
        cannot read past the quota before any of them is charged. Released when charged."""
        if rows > 0:
            login = self.base.login
            self.reservations[login] = self.reservations.get(login, 0) + rows

    def release(self, rows: int) -> None:
        if rows > 0:
            login = self.base.login
            left = self.reservations.get(login, 0) - rows
            if left > 0:
                self.reservations[login] = left
            else:
                self.reservations.pop(login, None)

    def add_rows(self, rows: int) -> None:
        """Count rows against the quota — only while one applies (a role without a quota, or
        a grant lifting it, leaves nothing to be charged later)."""
        if rows > 0 and self._view.limits.quota_rows is not None:
            self.quota.add_rows(self.base.login, rows)


def _period(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
