"""``pgveil explain``: a human-readable account of what pgveil would do with a statement.

A DBA asks "what does teller_sz01 get for this query?"; ``proxy.checks.run_explain`` resolves the
operator's :class:`~rewriters.model.OperatorView`, runs the analyzer, and prints
:func:`explain_report`:

* who: login, role, attributes, policy version and the role's limits;
* what the operator sees of each protected table: the row filter, masked columns (with the
  mask's name), exact-lookup columns;
* per statement: the decision (``allow`` — forwarded unchanged, ``rewrite``, ``block``), the
  kind, the protected tables and columns it touches, the reasons, exact lookups, the row cap the
  proxy will enforce on the wire, and the SQL that would reach PostgreSQL, laid out one clause
  per line.

The layout only changes whitespace between tokens (:func:`pretty_sql` works on
:mod:`rewriters.lexer` tokens); it never regenerates SQL, so what is shown is what is sent.
Pure function of its inputs; no I/O.
"""

from __future__ import annotations

from rewriters.lexer import Tok, Token, tokenize
from rewriters.model import Action, Analysis, OperatorView, StatementDecision

VERDICTS = {Action.FORWARD: "allow", Action.REWRITE: "rewrite", Action.DENY: "block"}

# Keywords that start a clause: a new line at their depth.
_CLAUSES = frozenset({"select", "from", "where", "group", "order", "having", "limit", "offset",
                      "union", "intersect", "except", "returning", "values", "window", "fetch",
                      "join", "set", "using", "on"})
# Words that may precede JOIN and belong on its line.
_JOIN_PREFIX = frozenset({"left", "right", "full", "inner", "cross", "natural", "outer"})
_INDENT = "  "
_LIST_BREAK = 60  # select lists longer than this get one item per line


def _limits(view: OperatorView) -> str:
    lim = view.limits
    parts = [
        f"max_rows={lim.max_rows if lim.max_rows is not None else 'unlimited'}",
        f"unbounded={lim.unbounded.value}",
        f"copy={'allow' if lim.copy else 'deny'}",
        f"ddl={'allow' if lim.ddl else 'deny'}",
    ]
    if lim.quota_rows is not None:
        parts.append(f"quota={lim.quota_rows} rows/{lim.quota_seconds:g}s")
    if lim.hours is not None:
        parts.append(f"hours={lim.hours[0]}-{lim.hours[1]} {lim.timezone}")
    return ", ".join(parts)


def _table_lines(view: OperatorView) -> list[str]:
    out: list[str] = []
    for name in sorted(view.tables):
        tv = view.tables[name]
        masked = [f"{c.name} ({c.mask_name or 'masked'})" for c in tv.columns if c.expr is not None]
        lookups = [c.name for c in tv.columns if c.lookup]
        out.append(f"  {name}")
        if tv.refused is not None:  # every statement naming it is denied
            out.append(f"    REFUSED: {tv.refused}")
            continue
        out.append(f"    rows:    {tv.row_filter if tv.row_filter is not None else 'all'}")
        out.append(f"    masked:  {', '.join(masked) if masked else 'nothing'}")
        if lookups:
            out.append(f"    lookup:  {', '.join(lookups)} (exact match on raw values, audited)")
    return out


def _statement_lines(n: int, d: StatementDecision) -> list[str]:
    verdict = VERDICTS[d.action]
    out = [f"statement {n}: {verdict} ({d.kind})"]

    def field(label: str, values: tuple[str, ...] | list[str]) -> None:
        if values:
            out.append(f"  {label:<10} {', '.join(values)}")

    field("tables:", d.tables)
    field("columns:", d.columns)
    field("lookups:", d.lookups)
    if d.protected:
        out.append(f"  {'row limit:':<10} "
                   f"{d.row_limit if d.row_limit is not None else 'unlimited'}")
    if d.prepared:
        out.append(f"  {'prepared:':<10} {d.prepared}")
    if d.cursor:
        out.append(f"  {'cursor:':<10} {d.cursor}")
    if d.copy_out or d.copy_in:
        out.append(f"  {'copy:':<10} {'out' if d.copy_out else 'in'}")
    if d.reasons:
        out.append("  reasons:")
        out.extend(f"    - {r}" for r in d.reasons)
    if d.action is Action.DENY:
        out.append(f"  error:     ERROR {d.sqlstate}: {d.message}")
        out.append("  statement (not sent):")
    elif d.action is Action.REWRITE:
        out.append("  sent to PostgreSQL:")
    else:
        out.append("  sent to PostgreSQL unchanged:")
    out.extend("    " + line for line in pretty_sql(d.sql).splitlines())
    return out


def explain_report(analysis: Analysis, view: OperatorView) -> str:
    """The report ``pgveil explain`` prints for one analysed SQL text."""
    attrs = ", ".join(f"{k}={v}" for k, v in sorted(view.attributes.items())) or "(none)"
    role = view.role + (" (unrestricted: forwarded unchanged, audited)"
                        if view.unrestricted else "")
    lines = [
        f"login:       {view.login}",
        f"role:        {role}",
        f"attributes:  {attrs}",
        f"policy:      {view.policy_version}",
        f"limits:      {_limits(view)}",
    ]
    if view.tables:
        lines.append("protected tables as this operator sees them:")
        lines.extend(_table_lines(view))
    denied = analysis.denied
    summary = "blocked" if denied is not None else (
        "rewritten" if analysis.changed else "forwarded unchanged")
    how = "shape cache" if analysis.cached else "full analysis"
    lines.append(f"analysis:    {len(analysis.statements)} statement(s), {summary} "
                 f"({how}, {analysis.rewrite_seconds * 1e3:.2f} ms)")
    if not analysis.statements:
        lines.append("  (no statement: empty query)")
    for n, d in enumerate(analysis.statements, 1):
        lines.append("")
        lines.extend(_statement_lines(n, d))
    return "\n".join(lines)


# --- layout ----------------------------------------------------------------------------------


def _list_ends(sig: list[Token]) -> dict[int, int]:
    """For each SELECT (index in ``sig``), the character length of its select list."""
    out: dict[int, int] = {}
    for i, t in enumerate(sig):
        if t.keyword != "select":
            continue
        depth = 0
        end = sig[-1].end
        for t2 in sig[i + 1 :]:
            if t2.kind is Tok.PUNCT and t2.text == "(":
                depth += 1
            elif t2.kind is Tok.PUNCT and t2.text == ")":
                if depth == 0:
                    end = t2.start
                    break
                depth -= 1
            elif depth == 0 and t2.keyword in ("from", "into", "where", "union", "intersect",
                                               "except", "order", "limit", "group"):
                end = t2.start
                break
        out[i] = end - t.end
    return out


def pretty_sql(sql: str) -> str:
    """``sql`` laid out one clause per line, indented by parenthesis depth.

    Only whitespace between tokens changes (comments and literals are kept verbatim); long
    select lists get one item per line.

    >>> print(pretty_sql("SELECT a FROM t WHERE x = 1"))
    SELECT a
    FROM t
    WHERE x = 1
    """
    tokens = tokenize(sql)
    if any(t.kind is Tok.ERROR for t in tokens):
        return sql.strip()
    sig = [t for t in tokens if t.significant]
    list_len = _list_ends(sig)
    index = {t.start: i for i, t in enumerate(sig)}
    out: list[str] = []
    depth = 0
    # Per open parenthesis: is its content a long select list being broken at commas?
    list_stack: list[bool] = [False]
    pending_space = False
    prev: Token | None = None
    for t in tokens:
        if t.kind is Tok.WS:
            pending_space = True
            continue
        i = index.get(t.start)
        kw = t.keyword
        newline = False
        if prev is not None and i is not None:
            if kw in _CLAUSES and not (prev.kind is Tok.PUNCT and prev.text == "("):
                newline = not (
                    (kw == "join" and prev.keyword in _JOIN_PREFIX)
                    or (kw == "from" and prev.keyword in ("delete", "distinct", "is"))
                )
            elif kw in _JOIN_PREFIX and i + 1 < len(sig) and sig[i + 1].keyword in (
                    "join", "outer", "left", "right", "inner", "full"):
                newline = prev.keyword not in _JOIN_PREFIX
        if t.kind is Tok.PUNCT and t.text == ")":
            depth = max(0, depth - 1)
            if len(list_stack) > 1:
                list_stack.pop()
        if kw in ("from", "where", "group", "order", "having", "limit", "offset", "union",
                  "intersect", "except", "returning") and list_stack[-1]:
            list_stack[-1] = False
        if newline:
            out.append("\n" + _INDENT * depth)
        elif pending_space and prev is not None:
            out.append(" ")
        out.append(t.text)
        pending_space = False
        if t.kind is Tok.COMMENT and t.text.startswith("--"):
            out.append("\n" + _INDENT * depth)
        if t.kind is Tok.PUNCT and t.text == "(":
            depth += 1
            list_stack.append(False)
        if kw == "select" and i is not None and list_len.get(i, 0) > _LIST_BREAK:
            list_stack[-1] = True
        if t.kind is Tok.PUNCT and t.text == "," and list_stack[-1]:
            out.append("\n" + _INDENT * depth + "    ")
            pending_space = False
            prev = t
            continue
        prev = t
    return "".join(out).strip()
