"""Text splicing: apply edits to a statement and keep track of the text the rewriter generated.

The rewriter never regenerates a statement from a parse tree (that renames output columns and
rewrites functions); it replaces exact character spans — a table reference, a WHERE conjunct —
and leaves every other byte as the client wrote it. Each :class:`Edit` says which parts of its
replacement are *generated* (policy text: derived tables, row filters); after splicing, those
parts' final offsets are what the independent invariant check (``rewriters.verify``) accepts as
the only places a protected relation may be read.

:class:`TokenIndex` maps the offsets sqlglot reports (``Identifier``/``Literal`` ``meta``) onto
this package's own tokens, so every span is checked against PostgreSQL's lexical rules before it
is cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rewriters.lexer import Tok, Token, identifier_value, tokenize


@dataclass(frozen=True)
class Edit:
    """Replace ``sql[start:end]`` with ``text``; ``generated`` are (start, end) offsets inside
    ``text`` of policy-generated SQL."""

    start: int
    end: int
    text: str
    generated: tuple[tuple[int, int], ...] = ()
    order: int = 0  # tie-break for several insertions at one offset


@dataclass
class Spliced:
    sql: str
    generated: list[tuple[int, int]] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)

    def map_offset(self, pos: int) -> int:
        """Final offset of an original offset that no edit replaced."""
        delta = 0
        for e in self.edits:
            if e.end <= pos and not (e.start == e.end == pos):
                delta += len(e.text) - (e.end - e.start)
        return pos + delta


class EditConflict(Exception):
    """Two edits overlap."""


def apply_edits(sql: str, edits: list[Edit]) -> Spliced:
    """Apply non-overlapping edits (several insertions at one offset are fine). Any overlap —
    containment included — raises :class:`EditConflict`: silently dropping an edit could drop a
    substitution or a guard, so the caller denies instead."""
    # At one offset: insertions first (in ``order``), then the longest replacement.
    ordered = sorted(
        edits, key=lambda e: (e.start, 0 if e.start == e.end else 1, e.order, -(e.end - e.start))
    )
    kept: list[Edit] = []
    for e in ordered:
        if kept:
            last = kept[-1]
            if e.start < last.end:
                raise EditConflict(f"overlapping edits at {e.start}")
        kept.append(e)
    out: list[str] = []
    generated: list[tuple[int, int]] = []
    pos = 0
    length = 0
    for e in kept:
        chunk = sql[pos : e.start]
        out.append(chunk)
        length += len(chunk)
        for gs, ge in e.generated:
            generated.append((length + gs, length + ge))
        out.append(e.text)
        length += len(e.text)
        pos = e.end
    out.append(sql[pos:])
    return Spliced("".join(out), generated, kept)


class TokenIndex:
    """The tokens of one statement, indexed by start offset (significant tokens only)."""

    def __init__(self, sql: str, tokens: list[Token] | None = None, scs: bool = True) -> None:
        self.sql = sql
        self.tokens = tokens if tokens is not None else tokenize(sql, scs)
        self.sig: list[Token] = [t for t in self.tokens if t.significant]
        self.by_start: dict[int, int] = {t.start: i for i, t in enumerate(self.sig)}
        self._depth: list[int] | None = None

    def at(self, start: int) -> int | None:
        """Index (in ``sig``) of the significant token starting at ``start``."""
        return self.by_start.get(start)

    def containing(self, pos: int) -> int | None:
        """Index of the significant token that contains offset ``pos``."""
        lo, hi = 0, len(self.sig) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            t = self.sig[mid]
            if t.end <= pos:
                lo = mid + 1
            elif t.start > pos:
                hi = mid - 1
            else:
                return mid
        return None

    def prev(self, i: int) -> Token | None:
        return self.sig[i - 1] if i > 0 else None

    def next(self, i: int) -> Token | None:
        return self.sig[i + 1] if i + 1 < len(self.sig) else None

    def depths(self) -> list[int]:
        """Paren depth of each significant token (the token itself excluded for ``(``)."""
        if self._depth is None:
            d = 0
            out = []
            for t in self.sig:
                if t.kind is Tok.PUNCT and t.text in ")]":
                    d -= 1
                out.append(d)
                if t.kind is Tok.PUNCT and t.text in "([":
                    d += 1
            self._depth = out
        return self._depth

    def name_tokens(self, first: int, last: int, parts: list[str]) -> bool:
        """True when ``sig[first..last]`` is exactly the dotted name ``parts``."""
        expected = 2 * len(parts) - 1
        if last - first + 1 != expected:
            return False
        for k in range(expected):
            t = self.sig[first + k]
            if k % 2 == 1:
                if not (t.kind is Tok.PUNCT and t.text == "."):
                    return False
            else:
                if identifier_value(t) != parts[k // 2]:
                    return False
        return True
