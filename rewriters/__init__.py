"""The rewriter: decide, per SQL statement and per operator, to forward, rewrite or deny.

Theory of operation
===================

pgveil masks *at the source*. Every reference to a protected table that a statement reads is
replaced, in the statement's own text, by a derived table that projects every catalog column in
catalog order — masked columns wrapped in their mask, the role's row filter applied — under the
same alias::

    SELECT c.phone FROM customers c WHERE c.id = 5
    SELECT c.phone FROM (SELECT "id", <mask(name)> AS "name", <mask(phone)> AS "phone", ...
                         FROM customers WHERE (branch_id = 'SZ01')
                         AND "id" OPERATOR(pg_catalog.=) 5 OFFSET 0) c WHERE TRUE

so ``*``, ``c.*``, ``row_to_json(c)``, column alias lists, joins, predicates, ORDER BY and
correlated subqueries only ever see masked values of visible rows. Only the changed spans are
spliced; every other byte stays as the client wrote it (output column names, ``$n`` parameters
and formatting survive). Unrestricted roles (the DBA) are never rewritten: their statements are
classified and audited, and forwarded byte for byte.

The contract with the rest of pgveil is :mod:`rewriters.model` (OperatorView in, Analysis out).
The entry point is ``rewriters.analyze.Analyzer().analyze(sql, view, lex, prepared=...,
cursors=...)``; one Analyzer per proxy process holds the compiled views and the shape cache.

The passes, in order (each a small pure module)
-----------------------------------------------

1. **Compile the view** (:mod:`rewriters.compiled`), once per OperatorView object: the derived
   table text of each protected table, the row filter's facts (which columns it reads, whether
   it is a conjunction of ``col = literal``), the leakproof and lookup columns, and the word
   lists of the fast path.
2. **Fast path** (:func:`rewriters.analyze.fast_path`): a text that names no protected table, no
   catalog dependent (view / function reading one) and no risky token (``xml``, ``dblink``,
   ``regclass``, ``pg_stat``, ``set_config``, ``role``, ``u&`` ...), and whose statements all
   start with a harmless keyword, is forwarded without parsing — a few microseconds. The test is
   textual on the lower-cased text, so it holds however strings and comments lex.
3. **Shape cache** (:mod:`rewriters.shape`): see below.
4. **Split and lex** (:mod:`rewriters.lexer`): a PostgreSQL-faithful lexer (nested comments,
   ``E''``, dollar quotes, ``U&``, ``standard_conforming_strings``) splits a simple Query into
   statements; every later span is checked against its tokens.
5. **Lexical guards** (restricted roles, text that names customer data): backslashes with
   ``standard_conforming_strings = off``, non-ASCII text in a client encoding whose multibyte
   characters can contain quote or backslash bytes (GBK, SJIS, BIG5 ...), and ``U&`` escapes are
   denied — PostgreSQL might read such text differently from us.
6. **Classify** (:mod:`rewriters.classify`): PostgreSQL's own grammar (pglast / libpg_query)
   gives the statement type and the names that matter (prepared statement, cursor, GUC, COPY
   target); sqlglot is never asked what a utility statement is (it misreads several silently).
7. **Dispatch on the kind** (:mod:`rewriters.analyze`): EXPLAIN / PREPARE / DECLARE /
   ``COPY (query)`` are peeled and their inner statement analysed; EXECUTE and FETCH inherit the
   decision made for their PREPARE / DECLARE; DDL, DO, GRANT, COPY and SET are held to the
   role's limits; queries and DML go on to:
8. **Substitute** (:mod:`rewriters.substitute`): sqlglot parses the statement; every table node
   gets a role (source, DML target, lock target, CTE reference, ``INTO`` target) with
   PostgreSQL's CTE visibility; each masked protected *source* becomes its derived table. Exact
   lookups (``phone = $1`` on a ``lookup`` column) and leakproof comparisons of unmasked columns
   (``id = 5``) are moved from the WHERE into the derived table, so indexes still apply while
   the ``OFFSET 0`` fence keeps every other user predicate above the row filter (security-barrier
   semantics: ``1/(id-13)`` never runs on an out-of-scope row).
9. **DML rules** (:mod:`rewriters.dml`) for the statement's own target: UPDATE / DELETE get
   ``<moved> AND (<filter>) AND CASE WHEN (<filter>) THEN (<user WHERE>) ELSE false END``;
   SET / WHERE may not read masked columns, RETURNING may not return them, UPDATE may not move a
   row out of the filter, INSERT must provably satisfy it, ``ON CONFLICT`` on filtered tables,
   upserts and MERGE on masked tables and data-modifying CTEs on them are denied, and so is
   copying protected rows into unprotected tables (INSERT ... SELECT, UPDATE ... FROM). Keys
   (``ColumnView.unique`` / ``references``, from the catalog) close the existence oracles: an
   explicit value for a unique column of a filtered table is denied, and a foreign-key value
   into a filtered table is wrapped so that a parent the operator cannot see fails exactly like
   one that does not exist. ``TRUNCATE ... CASCADE`` is denied (it reaches unnamed tables).
10. **Unbounded reads**: with ``unbounded: deny``, a top-level read of a protected table with
    neither a WHERE predicate nor ``LIMIT <= max_rows`` (and not a single-row aggregate) is
    denied with a hint.
11. **Splice** (:mod:`rewriters.textspan`): the edits are applied by character offset; the spans
    of generated (policy) text are recorded.
12. **Verify** (:mod:`rewriters.verify`): the *final* text is parsed again by PostgreSQL's
    grammar and walked. Any remaining reference to a masked protected relation outside the
    generated spans, the approved DML target, a CTE reference or a lock target is a violation
    (this one check catches DML targets, ``DELETE ... USING``, TRUNCATE, ``COPY customers``,
    ``U&"..."`` names and gaps nobody thought of); so are SQL-in-strings functions
    (``query_to_xml``, ``dblink``, ``ts_stat`` ...), ``pg_stats``, role switching,
    catalog dependents the policy does not list, SQL text handed to functions, row packing on
    customer data for roles with ``max_rows`` (``json_agg`` / ``string_agg`` / ``array_agg`` ...,
    ``ARRAY(subquery)``, ``WITH RECURSIVE``: one row must not carry a branch), and — for a view
    with a ``hash`` mask, whose SQL holds key material — ``current_query()``,
    ``pg_stat_activity``, ``pg_prepared_statements``, ``pg_cursors`` and EXPLAIN. The walk also
    collects the protected tables and columns for the audit record.
13. **Assemble** the :class:`~rewriters.model.StatementDecision`: action, rewritten SQL, kind,
    tables, columns, reasons, lookups, ``row_limit`` (the role's ``max_rows`` for any statement
    on protected data), prepared / cursor names, COPY direction.

The shape cache
---------------

A teller's ``SELECT * FROM customers WHERE id = 123`` arrives thousands of times with different
literals. :mod:`rewriters.shape` strips the literals in value positions (the *shape*; the kind of
each literal — string, integer, other number — stays in it) and keys the cache on (operator view
identity: policy version, role, attributes, tables, limits; ``standard_conforming_strings``;
client encoding; shape). On a miss the statement is analysed in full, and its shape analysed
once more with every literal replaced by a fresh ``$k`` parameter; the result becomes a template
only if re-filling it with the original literals reproduces the fresh analysis exactly and no
``$k`` is duplicated or lost. A statement whose decision depends on a literal's value (an INSERT
proving a row lies in the filter, ``set_config('role', ...)``) is therefore stored as
uncacheable: the placeholder version is denied. The normalizer refuses — full analysis, no
caching — anything it does not fully understand: dollar quotes, ``E''`` / ``B''`` / ``X''`` /
``N''`` / ``U&``, nested or unterminated comments, backslashes, NUL, string continuations,
numbers glued to identifiers, non-UTF8 encodings with non-ASCII text, and strings that mention a
protected name or risky word. A hit costs tens of microseconds; ``tests/rewriters/test_shape.py``
checks over the whole fixture corpus that a warm cache decides exactly like a cold analyzer.

Fail closed
-----------

For a restricted role, whenever a statement names customer data (a protected table, a catalog
dependent or a risky token) and cannot be read the way PostgreSQL will read it, the answer is a
denial (SQLSTATE 42501) with a message saying what and why — never a pass-through:

* unterminated literals or comments, lexer differentials (above), ``U&`` escapes, statements
  over 128 KiB (refused before lexing: analysis runs on the proxy's event loop);
* PostgreSQL's grammar rejecting the text, sqlglot failing to parse it (``Command`` nodes,
  ``RecursionError`` on deep nesting, oversized statements), two edits that partially overlap, a
  span that does not line up with the lexer's tokens;
* paths the rewriter does not follow: DO blocks, function bodies, dynamic SQL, views and
  functions that read protected tables unless listed, ``SELECT INTO`` / CTAS / CREATE VIEW,
  EXPLAIN ANALYZE, ``WHERE CURRENT OF``, MERGE, COPY to files or programs;
* a verification violation in the final text;
* an unexpected exception inside the analyzer (a bug): denied for restricted roles, forwarded
  unchanged for unrestricted ones (as their statements always are).

EXPLAIN ANALYZE of protected data is denied — also through ``EXPLAIN ANALYZE EXECUTE p``, which
inherits what ``PREPARE p`` read.

Module map: ``analyze`` (entry point, dispatch), ``compiled`` (per-view precomputation),
``shape`` (cache, literal redaction for the audit log), ``lexer``, ``classify``, ``substitute``,
``dml``, ``textspan``, ``verify``, ``explain`` (``pgveil explain`` report); ``policy`` and
``masks`` build the OperatorView from policy.yaml; ``model`` is the shared data contract.
"""
