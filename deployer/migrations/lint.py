"""Phase-aware safety rules, written as data.

Each rule names the phases and databases it applies to, a check on the
normalized statement (a regex, or a function when it needs context), and the
message that says what to do instead. `-- deployer: allow <rule>` in a file
turns off that one rule for that file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

from deployer.hostapi.errors import BadInput
from deployer.migrations.files import Migration
from deployer.migrations.sqltext import Statement, split_top_level_commas, top_level

EXPAND, CONTRACT = "expand", "contract"
BOTH = frozenset({EXPAND, CONTRACT})
ANY_DB = frozenset({"sqlite", "postgresql"})
PG = frozenset({"postgresql"})

_ID = r'(?:[\w$]+|"(?:[^"]|"")*")'
IDENT = rf"{_ID}(?:\.{_ID})*"
ALTER_TABLE = rf"^ALTER TABLE (?:IF EXISTS )?(?:ONLY )?(?P<table>{IDENT}) "


@dataclass(frozen=True)
class LintContext:
    migration: Migration
    dialect: str
    created_tables: frozenset[str]  # tables this migration creates: no live traffic on them yet
    statement_index: int


Check = Union[re.Pattern[str], Callable[[str, LintContext], bool]]  # evaluated: hosts run 3.9


@dataclass(frozen=True)
class Rule:
    name: str
    phases: frozenset[str]
    dialects: frozenset[str]
    check: Check
    message: str

    def applies(self, phase: str, dialect: str) -> bool:
        return phase in self.phases and dialect in self.dialects

    def trips(self, code: str, ctx: LintContext) -> bool:
        if isinstance(self.check, re.Pattern):
            return self.check.search(code) is not None
        return self.check(code, ctx)


@dataclass(frozen=True)
class Violation:
    rule: str
    migration: str
    path: str
    line: int
    statement: str
    message: str

    def __str__(self) -> str:
        return describe(self.path, self.line, self.rule, self.message, self.statement)

    def to_json(self) -> dict[str, object]:
        return {
            "event": "violation",
            "rule": self.rule,
            "name": self.migration,
            "file": self.path,
            "line": self.line,
            "statement": self.statement,
            "message": self.message,
        }


def describe(path: str, line: int, rule: str, message: str, statement: str) -> str:
    stmt = " ".join(statement.split())
    stmt = stmt if len(stmt) <= 100 else stmt[:97] + "..."
    return f"{path}:{line}: {rule}: {message}\n    {stmt}"


def _alter_actions(code: str) -> list[str]:
    """The comma-separated actions of an ALTER TABLE statement ([] for anything else)."""
    m = re.match(ALTER_TABLE, code)
    return split_top_level_commas(code[m.end() :]) if m else []


_ADD_COLUMN = re.compile(
    r"^ADD (?:COLUMN )?(?:IF NOT EXISTS )?"
    r"(?!CONSTRAINT\b|PRIMARY\b|UNIQUE\b|FOREIGN\b|CHECK\b|EXCLUDE\b)"
)
_ADD_CONSTRAINT = re.compile(rf"^ADD (?:CONSTRAINT {IDENT} )?(?:FOREIGN KEY|CHECK)\b")


def adds_not_null_column_without_default(code: str, ctx: LintContext) -> bool:
    return any(
        _ADD_COLUMN.match(a) and "NOT NULL" in a and not re.search(r"\b(DEFAULT|GENERATED)\b", a)
        for a in _alter_actions(code)
    )


def adds_validated_constraint(code: str, ctx: LintContext) -> bool:
    return any(
        _ADD_CONSTRAINT.match(a) and not a.endswith("NOT VALID") for a in _alter_actions(code)
    )


_CREATE_INDEX = re.compile(
    rf"^CREATE (?:UNIQUE )?INDEX (?!CONCURRENTLY\b).*?\bON (?:ONLY )?(?P<table>{IDENT})"
)


def creates_index_blocking_writes(code: str, ctx: LintContext) -> bool:
    m = _CREATE_INDEX.match(code)
    return bool(m) and table_key(m.group("table")) not in ctx.created_tables


def concurrently_in_transaction(code: str, ctx: LintContext) -> bool:
    return ctx.migration.transactional and re.search(r"\bCONCURRENTLY\b", code) is not None


def second_statement_without_transaction(code: str, ctx: LintContext) -> bool:
    return not ctx.migration.transactional and ctx.statement_index > 0


def lacks_where(verb: str) -> Callable[[str, LintContext], bool]:
    pattern = re.compile(rf"^(?:WITH\b.*? )?{verb}\b")  # read on top_level(): no CTE bodies

    def check(code: str, ctx: LintContext) -> bool:
        return bool(pattern.match(top_level(code))) and " WHERE " not in f" {top_level(code)} "

    return check


RULES: tuple[Rule, ...] = (
    Rule(
        "drop-table",
        frozenset({EXPAND}),
        ANY_DB,
        re.compile(r"^DROP TABLE\b"),
        "old code still reads this table during the rollout: drop it in a contract migration",
    ),
    Rule(
        "drop-column",
        frozenset({EXPAND}),
        ANY_DB,
        re.compile(
            r"^ALTER TABLE\b.*\bDROP (?!CONSTRAINT\b|DEFAULT\b|NOT NULL\b|IDENTITY\b|EXPRESSION\b)"
        ),
        "old code still reads this column during the rollout: drop it in a contract migration",
    ),
    Rule(
        "rename-table",
        frozenset({EXPAND}),
        ANY_DB,
        re.compile(ALTER_TABLE + r"RENAME TO\b"),
        "old code still uses the old name: create the new table, write both, backfill, "
        "and drop the old one in a contract migration",
    ),
    Rule(
        "rename-column",
        frozenset({EXPAND}),
        ANY_DB,
        re.compile(r"^ALTER TABLE\b.*\bRENAME (?!TO\b|CONSTRAINT\b)"),
        "old code still uses the old name: add the new column, write both, backfill, "
        "and drop the old one in a contract migration",
    ),
    Rule(
        "change-column-type",
        frozenset({EXPAND}),
        ANY_DB,
        re.compile(rf"^ALTER TABLE\b.*\bALTER (?:COLUMN )?{IDENT} (?:SET DATA )?TYPE\b"),
        "a type change can break old code and rewrites the table under a lock: add a column "
        "of the new type, write both, backfill, switch reads, drop the old one in contract",
    ),
    Rule(
        "add-not-null-column-without-default",
        BOTH,
        ANY_DB,
        adds_not_null_column_without_default,
        "code that does not know the column makes INSERTs fail: add it nullable (or with a "
        "DEFAULT), backfill, and set NOT NULL in a contract migration",
    ),
    Rule(
        "set-not-null",
        frozenset({EXPAND}),
        ANY_DB,
        re.compile(rf"^ALTER TABLE\b.*\bALTER (?:COLUMN )?{IDENT} SET NOT NULL\b"),
        "old code may still write NULLs here: set NOT NULL in a contract migration",
    ),
    Rule(
        "constraint-without-not-valid",
        BOTH,
        PG,
        adds_validated_constraint,
        "validating every row holds a lock that blocks writes: add it with NOT VALID, then "
        "VALIDATE CONSTRAINT in a later migration",
    ),
    Rule(
        "index-without-concurrently",
        BOTH,
        PG,
        creates_index_blocking_writes,
        "CREATE INDEX blocks writes to the table until it is built: use CREATE INDEX "
        "CONCURRENTLY IF NOT EXISTS in a `-- transaction: none` migration",
    ),
    Rule(
        "concurrently-in-transaction",
        BOTH,
        PG,
        concurrently_in_transaction,
        "CONCURRENTLY cannot run inside a transaction: add the header `-- transaction: none` "
        "(`transaction = False` in a .py migration)",
    ),
    Rule(
        "several-statements-without-transaction",
        BOTH,
        ANY_DB,
        second_statement_without_transaction,
        "without a transaction a failure half-way leaves the schema half-changed: keep one "
        "statement per `-- transaction: none` migration",
    ),
    Rule(
        "update-without-where",
        BOTH,
        ANY_DB,
        lacks_where("UPDATE"),
        "one UPDATE of every row locks them all for its whole run: backfill in chunks from a "
        ".py migration whose up() yields after each chunk",
    ),
    Rule(
        "delete-without-where",
        BOTH,
        ANY_DB,
        lacks_where("DELETE"),
        "one DELETE of every row locks them all for its whole run: delete in chunks from a "
        ".py migration whose up() yields after each chunk",
    ),
    Rule(
        "truncate",
        BOTH,
        ANY_DB,
        re.compile(r"^TRUNCATE\b"),
        "TRUNCATE takes an exclusive lock and removes data running code relies on",
    ),
    Rule(
        "transaction-control",
        BOTH,
        ANY_DB,
        re.compile(r"^(?:BEGIN|COMMIT|ROLLBACK|START TRANSACTION|END|SAVEPOINT|RELEASE)\b"),
        "the runner owns transactions (one per migration); for statements that cannot run "
        "in one, use `-- transaction: none`",
    ),
)
RULES_BY_NAME = {r.name: r for r in RULES}


def table_key(name: str) -> str:
    """A table name as lint compares it: unquoted, lower case, without schema."""
    return name.rsplit(".", 1)[-1].strip('"').lower()


_CREATE_TABLE = re.compile(
    rf"^CREATE (?:UNLOGGED |TEMP |TEMPORARY )?TABLE (?:IF NOT EXISTS )?({IDENT})"
)


def created_tables(statements: list[Statement]) -> frozenset[str]:
    return frozenset(
        table_key(m.group(1)) for s in statements if (m := _CREATE_TABLE.match(s.code))
    )


def check_allows(migration: Migration) -> None:
    """An allow comment naming no rule is a typo that would silently allow nothing."""
    for rule, line in migration.allows.items():
        if rule not in RULES_BY_NAME:
            known = ", ".join(RULES_BY_NAME)
            raise BadInput(
                f"{migration.path}:{line}: `deployer: allow {rule}`: no such rule; rules: {known}"
            )


def lint_migration(migration: Migration, dialect: str) -> list[Violation]:
    check_allows(migration)
    statements = [s for sec in migration.lint_sections() for s in sec.statements(dialect)]
    created = created_tables(statements)
    rules = [
        r for r in RULES if r.applies(migration.phase, dialect) and r.name not in migration.allows
    ]
    violations = []
    for index, stmt in enumerate(statements):
        ctx = LintContext(migration, dialect, created, index)
        violations += [
            Violation(r.name, migration.name, str(migration.path), stmt.line, stmt.text, r.message)
            for r in rules
            if r.trips(stmt.code, ctx)
        ]
    return violations


def lint(migrations: list[Migration], dialect: str) -> list[Violation]:
    return [v for m in migrations for v in lint_migration(m, dialect)]
