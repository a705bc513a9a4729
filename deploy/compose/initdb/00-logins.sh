#!/bin/sh
# docker-entrypoint-initdb.d step 1 (runs once, on an empty data directory, as POSTGRES_USER
# against POSTGRES_DB=bank): the logins of the demo bank and pgveil's own control login.
#
# Demo passwords are pw_<login> (the same as the test suite's); change them for anything real.
# pgveil_admin is what pgveil's control connection uses (catalog reads, and the schema "pgveil"
# that holds grants and quotas); its password comes from PGVEIL_CONTROL_PASSWORD.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v control_password="${PGVEIL_CONTROL_PASSWORD:?set PGVEIL_CONTROL_PASSWORD}" <<'SQL'
SET password_encryption = 'scram-sha-256';
CREATE ROLE dba          LOGIN SUPERUSER PASSWORD 'pw_dba';
CREATE ROLE teller_sz01  LOGIN PASSWORD 'pw_teller_sz01';
CREATE ROLE teller_gz01  LOGIN PASSWORD 'pw_teller_gz01';
CREATE ROLE manager_sz01 LOGIN PASSWORD 'pw_manager_sz01';
CREATE ROLE auditor1     LOGIN PASSWORD 'pw_auditor1';
CREATE ROLE stranger     LOGIN PASSWORD 'pw_stranger';
CREATE ROLE pgveil_admin LOGIN PASSWORD :'control_password';
-- the control database (control.dsn: .../postgres) holds pgveil's schema for grants and quotas
GRANT CREATE ON DATABASE postgres TO pgveil_admin;
-- auth.mode scram additionally reads SCRAM verifiers from pg_authid (superuser-only): give it a
-- SECURITY DEFINER function as auth_query instead of making pgveil_admin a superuser
-- (docs/operations.md). The default here, passthrough, needs nothing more.
SQL
