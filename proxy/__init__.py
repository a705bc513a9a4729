"""pgveil's wire proxy: everything that touches sockets, files and the database.

Theory of operation, following one client connection:

* ``workers``/``runtime`` — ``pgveil serve`` runs one or more worker processes; each owns a
  ``Runtime``: config, the policy in force (atomically swapped on reload), per-database catalogs
  (read by ``catalog`` over asyncpg and watched for schema changes), the decision analyser, the
  audit trail, the control store (grants, quotas) and the metrics.
* ``server`` — the asyncio shell (Protocols on uvloop). It negotiates TLS, answers
  GSSENC/Cancel requests, resolves the operator, opens the upstream leg and hands
  authentication to ``auth`` (passthrough / scram with ``scram`` / userlist).
* ``session`` — pure: bytes in, bytes out. It splits frames (``protocol`` is the full codec),
  sends SQL to ``rewriters`` for a decision, replaces denied statements by a server-side raise
  (so transaction state stays in step), counts protected rows on the wire, caps them, holds
  results for strict audit durability, and emits audit events.
* ``operator`` — the effective rules of one connection: the policy view with active grants
  applied, re-derived when the policy, a grant or the catalog changes; quota metering.
* ``audit``/``audit_sinks``/``audit_verify``/``keys`` — the hash-chained, signed audit trail and
  the auditor's tools; ``control``/``grants`` — the shared control database and ``pgveil grant``.
* ``metrics`` — Prometheus metrics and health endpoints; ``config`` — pgveil.yaml;
  ``cli``, ``checks``, ``demo``, ``discover``, ``localpg`` — the command line.
"""

from proxy._native import guard_stale_native

guard_stale_native()
