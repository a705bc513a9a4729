-- A teller looks up one customer by id (bank.sql, scale 2000). Through pgveil the statement is
-- rewritten: identity columns masked, rows filtered to the teller's branch (SZ01), audited.
\set id random(1, 2000)
SELECT * FROM customers WHERE id = :id;
