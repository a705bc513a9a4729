"""Statement redaction for the audit log: literals out, structure kept — fast and never raising.

The audit log must hold no customer data (``audit.redact_literals: true``), so every string,
number, dollar-quoted and bit/hex literal becomes ``?`` while keywords, identifiers, ``$n``
parameters stay and comments are emptied (they can carry values too), e.g. ``SELECT * FROM customers WHERE phone = '138…'`` →
``SELECT * FROM customers WHERE phone = ?``.

It runs once per audited statement on the hot path, so it is a single compiled regex pass
(a few µs), not a full tokenizer. It errs towards redacting: an unterminated quote or dollar
quote redacts everything after it, and with ``standard_conforming_strings = off`` backslashes
escape inside every string, as PostgreSQL then reads them.

>>> redact("select * from t where a = 'x''y' and b = 42 and c = $1")
'select * from t where a = ? and b = ? and c = $1'
"""

from __future__ import annotations

import re

from rewriters.lexer import block_comment_end

_COMMON = r"""
  (?P<keep>(?:                          # a run of text to keep, consumed in one match:
      "(?:[^"]|"")*"                    #   quoted identifiers
    | \$\d+                             #   parameters
    | (?![EeBbXxNnUu]&?')[A-Za-z_\x80-\uffff][\w$\x80-\uffff]*   # keywords, identifiers
    | [^'"$0-9.\-/A-Za-z_\x80-\uffff]   #   punctuation, spaces
    | -(?!-) | /(?!\*) | \.(?!\d)
  )+)
| (?P<line>--[^\n]*)                  # comments can carry values too: emptied
| (?P<block>/\*(?:[^*]|\*(?!/))*\*/)
| (?P<dollar>\$(?P<tag>[A-Za-z_\x80-\uffff][\w\x80-\uffff]*|)\$.*?\$(?P=tag)\$)
| (?P<estr>[Ee]'(?:[^'\\]|''|\\.)*')
| (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
| (?P<open>['$"/-])                     # unterminated quote or comment: redact the rest
"""
_STANDARD = re.compile(
    r"(?P<str>(?:[BbXxNn]|[Uu]&)?'(?:[^']|'')*')|" + _COMMON, re.S | re.X)
_BACKSLASH = re.compile(
    r"(?P<str>(?:[BbXxNn]|[Uu]&)?'(?:[^'\\]|''|\\.)*')|" + _COMMON, re.S | re.X)
_KEEP = frozenset(("keep",))


def redact(sql: str, standard_conforming_strings: bool = True) -> str:
    """``sql`` with every literal replaced by ``?`` (see module docstring)."""
    pattern = _STANDARD if standard_conforming_strings else _BACKSLASH
    out: list[str] = []
    pos = scan = 0
    while True:
        m = pattern.search(sql, scan)
        if m is None:
            break
        kind = m.lastgroup
        scan = m.end()
        if kind == "tag":  # the tag group closes inside "dollar"
            kind = "dollar"
        if kind in _KEEP:
            continue
        out.append(sql[pos:m.start()])
        if kind == "line":
            out.append("--")
            pos = scan
            continue
        if kind == "block":
            # PostgreSQL nests block comments: /* /* */ ... */ is one comment; the regex
            # match ends at the first */, so find the real end (none: redact the rest)
            end = block_comment_end(sql, m.start()) if "/*" in m.group()[2:] else scan
            if end < 0:
                out.append("/* */?")
                return "".join(out)
            out.append("/* */")
            pos = scan = end
            continue
        if kind == "open":
            out.append("?")
            return "".join(out)
        out.append("?")
        pos = scan
    out.append(sql[pos:])
    return "".join(out)
