"""SQL as text: tokens, statements, the normalized form lint reads, placeholders.

No SQL parser ships with the standard library, so this is a small lexer that
knows exactly what can hide a `;` or a keyword: quoted strings, quoted
identifiers, comments and PostgreSQL dollar quotes. SQLite trigger bodies
(`BEGIN ... ; ... END`) are kept whole with `sqlite3.complete_statement`.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

CODE, STRING, IDENT, COMMENT, SEMICOLON = "code", "string", "ident", "comment", "semicolon"

_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")
_SPECIAL = re.compile(r"""--|/\*|'|"|`|\$|;""")


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    start: int


@dataclass(frozen=True)
class Statement:
    text: str  # as written, without the closing semicolon
    line: int  # line of its first character in the file
    code: str  # normalized: no comments, literals as '', upper case, single spaces


def tokens(sql: str, dialect: str) -> Iterator[Token]:
    """Split `sql` into code, literals, comments and semicolons."""
    i, n = 0, len(sql)
    while i < n:
        m = _SPECIAL.search(sql, i)
        if m is None:
            yield Token(CODE, sql[i:], i)
            return
        if m.start() > i:
            yield Token(CODE, sql[i : m.start()], i)
        i = m.start()
        end, kind = _scan_special(sql, i, dialect)
        yield Token(kind, sql[i:end], i)
        i = end


def _scan_special(sql: str, i: int, dialect: str) -> tuple[int, str]:
    """End and kind of the token that starts with a special character at `i`."""
    c = sql[i]
    if sql.startswith("--", i):
        nl = sql.find("\n", i)
        return (len(sql) if nl < 0 else nl), COMMENT
    if sql.startswith("/*", i):
        return _block_comment_end(sql, i, nested=dialect == "postgresql"), COMMENT
    if c == ";":
        return i + 1, SEMICOLON
    if c == "'":
        backslashes = dialect == "postgresql" and i > 0 and sql[i - 1] in "eE"
        return _quoted_end(sql, i, "'", backslashes), STRING
    if c in '"`':
        return _quoted_end(sql, i, c, False), IDENT
    m = _DOLLAR_TAG.match(sql, i)
    if c == "$" and dialect == "postgresql" and m and not _ident_char_before(sql, i):
        close = sql.find(m.group(), m.end())
        return (len(sql) if close < 0 else close + len(m.group())), STRING
    return i + 1, CODE


def _ident_char_before(sql: str, i: int) -> bool:
    return i > 0 and (sql[i - 1].isalnum() or sql[i - 1] in "_$")


def _quoted_end(sql: str, i: int, quote: str, backslashes: bool) -> int:
    j = i + 1
    while j < len(sql):
        if backslashes and sql[j] == "\\":
            j += 2
            continue
        if sql[j] == quote:
            if sql.startswith(quote * 2, j):  # doubled quote is an escaped quote
                j += 2
                continue
            return j + 1
        j += 1
    return len(sql)


def _block_comment_end(sql: str, i: int, nested: bool) -> int:
    depth, j = 0, i
    while j < len(sql):
        if sql.startswith("/*", j):
            depth = depth + 1 if nested or depth == 0 else depth
            j += 2
        elif sql.startswith("*/", j):
            depth -= 1
            j += 2
            if depth == 0:
                return j
        else:
            j += 1
    return len(sql)


def split_statements(sql: str, dialect: str, first_line: int = 1) -> list[Statement]:
    """The statements of a script, each with the file line where it starts."""
    statements: list[Statement] = []
    current: list[Token] = []
    for tok in tokens(sql, dialect):
        if tok.kind == SEMICOLON and _complete(current, dialect):
            _flush(statements, current, sql, first_line)
            current = []
        else:
            current.append(tok)
    _flush(statements, current, sql, first_line)
    return statements


def _complete(current: list[Token], dialect: str) -> bool:
    # A `;` inside a SQLite trigger body does not end the CREATE TRIGGER.
    if dialect != "sqlite":
        return True
    return sqlite3.complete_statement("".join(t.text for t in current) + ";")


def _flush(out: list[Statement], toks: list[Token], sql: str, first_line: int) -> None:
    meaningful = [t for t in toks if t.kind != COMMENT and t.text.strip()]
    if not meaningful:
        return
    start = meaningful[0].start + len(meaningful[0].text) - len(meaningful[0].text.lstrip())
    end = meaningful[-1].start + len(meaningful[-1].text.rstrip())
    line = first_line + sql.count("\n", 0, start)
    out.append(Statement(sql[start:end], line, normalize(toks)))


def normalize(toks: list[Token]) -> str:
    """What lint matches against: literals emptied so their words never trip a rule."""
    parts = []
    for t in toks:
        if t.kind == CODE:
            parts.append(t.text.upper())
        elif t.kind == STRING:
            parts.append("''")
        elif t.kind == IDENT:
            parts.append(t.text)
        else:
            parts.append(" ")
    return re.sub(r"\s+", " ", "".join(parts)).strip()


def pyformat_placeholders(sql: str) -> str:
    """`?` placeholders to psycopg's `%s` (and `%` to `%%`), outside literals only."""
    out = []
    for t in tokens(sql, "postgresql"):
        text = t.text.replace("%", "%%")
        out.append(text.replace("?", "%s") if t.kind == CODE else text)
    return "".join(out)


def top_level(code: str) -> str:
    """Normalized code with everything inside parentheses removed (subqueries, types)."""
    out, depth = [], 0
    for ch in code:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def split_top_level_commas(code: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in code:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    parts.append("".join(current).strip())
    return parts
