"""Labels of pgveil_blocked_total: a bounded category from pgveil's own wording, never from a
login, a role name or a file path inside the message."""

from __future__ import annotations

import pytest

from proxy.runtime import _reason_label


@pytest.mark.parametrize(("reason", "label"), [
    ("login 'auditor7' is no longer matched by any operator of the policy "
     "(/etc/pgveil/copy-of-policy.yaml): its statements on customer data are refused", "revoked"),
    ("the policy masks public.accounts.balance (p.yaml:9) for role auditor, but the table has "
     "no such column (renamed or dropped?)", "schema_changed"),
    ("rules changed since the cursor was opened", "rules_changed"),
    ("policy changed since PREPARE", "rules_changed"),
    ("the row would leave the row filter of public.customers", "row_filter"),
    ("row limit of 50 exceeded for role auditor", "row_limit"),
    ("COPY of protected table public.customers is not allowed for role teller", "copy"),
    ("audit unavailable", "audit"),
    ("role switching would escape the policy", "role"),
    ("DDL is not allowed for role auditor", "ddl"),
    ("quota exhausted", "quota"),
    ("mask public.customers.name: chinese_name", "policy"),
])
def test_blocked_reason_labels(reason: str, label: str) -> None:
    assert _reason_label(reason) == label
