"""Migration files: discovery, parsing, checksums, names, and `new` templates.

`<YYYYMMDDHHMMSS>_<name>.sql` has a header (`-- phase: expand|contract`,
optionally `-- transaction: none`) and sections `-- up` / `-- down`.
`<YYYYMMDDHHMMSS>_<name>.py` has `phase = "..."`, `def up(db)` and optionally
`def down(db)` and `transaction = False`. Python files are read with `ast` here
and imported only when they run, so `status` and `lint` execute no user code.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType

from deployer.hostapi.errors import BadInput
from deployer.migrations.sqltext import Statement, split_statements

PHASES = ("expand", "contract")
STAMP = "%Y%m%d%H%M%S"
FILE_RE = re.compile(r"^(?P<stamp>\d{14})_(?P<label>\w+)\.(?P<ext>sql|py)$")
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_MARKER_RE = re.compile(r"^\s*--\s*(up|down)\s*$", re.IGNORECASE)
_HEADER_RE = re.compile(r"^\s*--\s*(phase|transaction)\s*:\s*(\S+)\s*$", re.IGNORECASE)
_ALLOW_RE = re.compile(r"^\s*(?:--|#)\s*deployer:\s*allow\s+([\w-]+)", re.IGNORECASE)
_SQL_START = re.compile(
    r"^\s*(ALTER|CREATE|DROP|UPDATE|DELETE|INSERT|TRUNCATE|BEGIN|COMMIT|ROLLBACK|WITH|"
    r"START|END|SAVEPOINT|RELEASE|REINDEX|VACUUM|LOCK|COMMENT|GRANT|REVOKE)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Section:
    """One direction of a SQL migration: its text and the file line it starts on."""

    sql: str
    line: int

    def statements(self, dialect: str) -> list[Statement]:
        return split_statements(self.sql, dialect, self.line)


@dataclass(frozen=True)
class Migration:
    name: str  # file name without extension: the key in deployer_migrations
    path: Path
    kind: str  # "sql" | "py"
    phase: str
    checksum: str
    transactional: bool = True
    has_down: bool = False
    allows: dict[str, int] = field(default_factory=dict)  # rule -> line of the comment
    up: Section | None = None  # .sql only
    down: Section | None = None  # .sql only
    literals: tuple[Section, ...] = ()  # .py only: SQL-looking strings, for lint

    def lint_sections(self) -> tuple[Section, ...]:
        """What lint reads: the up section, or the SQL strings of a Python file."""
        return self.literals if self.kind == "py" else ((self.up,) if self.up else ())

    def load_module(self) -> ModuleType:
        """Import a .py migration (runs its top-level code)."""
        spec = importlib.util.spec_from_file_location(f"deployer_migration_{self.name}", self.path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        finally:
            sys.modules.pop(spec.name, None)
        return module


def checksum(data: bytes) -> str:
    # Line endings normalized: a checkout on another OS is not a changed migration.
    return "sha256:" + hashlib.sha256(data.replace(b"\r\n", b"\n")).hexdigest()


def short(checksum_value: str | None) -> str:
    return (checksum_value or "-").removeprefix("sha256:")[:12]


def discover(directory: Path) -> list[Migration]:
    """Every migration in `directory`, in name (timestamp) order."""
    if not directory.is_dir():
        raise BadInput(f"--dir {directory}: no such migrations directory")
    paths = [p for p in sorted(directory.iterdir()) if p.is_file() and is_candidate(p.name)]
    return parse_all((p, p.read_bytes()) for p in paths)


def is_candidate(name: str) -> bool:
    """A file name that is meant as a migration (`_helpers.py` is not)."""
    return name.endswith((".sql", ".py")) and not name.startswith(("_", "."))


def parse_all(files: Iterable[tuple[Path, bytes]]) -> list[Migration]:
    """Migrations from (path, content) pairs, in name order. Messages name `path`: a
    pre-receive hook gives the file's path in the repository, not a copy's."""
    found: dict[str, Migration] = {}
    for path, data in files:
        if not FILE_RE.match(path.name):
            raise BadInput(
                f"{path}: not a migration file name: expected <YYYYMMDDHHMMSS>_<name>"
                f"{path.suffix} (UTC timestamp, letters, digits, _)"
            )
        migration = parse_file(path, data)
        if migration.name in found:
            raise BadInput(f"{path}: {found[migration.name].path.name} has the same name")
        found[migration.name] = migration
    return [found[name] for name in sorted(found)]


def parse_file(path: Path, data: bytes | None = None) -> Migration:
    """`path`'s migration; `data` is its content when it is not read from `path`."""
    data = path.read_bytes() if data is None else data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    parse = parse_sql if path.suffix == ".sql" else parse_python
    return parse(path, text, checksum(data))


def parse_sql(path: Path, text: str, digest: str) -> Migration:
    headers: dict[str, tuple[str, int]] = {}
    sections: dict[str, list[str]] = {}
    starts: dict[str, int] = {}
    current: str | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        marker = _MARKER_RE.match(line)
        if marker:
            current = marker.group(1).lower()
            if current in sections:
                raise BadInput(f"{path}:{lineno}: a second `-- {current}` section")
            sections[current], starts[current] = [], lineno + 1
            continue
        header = _HEADER_RE.match(line)
        if header and current is None:
            headers[header.group(1).lower()] = (header.group(2).lower(), lineno)
        elif current is not None:
            sections[current].append(line)
        elif line.strip() and not line.lstrip().startswith("--"):
            raise BadInput(f"{path}:{lineno}: SQL before the `-- up` marker")
    if "up" not in sections:
        raise BadInput(f"{path}: no `-- up` section (a line `-- up` before the SQL)")
    up = Section("\n".join(sections["up"]), starts["up"])
    down_text = "\n".join(sections.get("down", []))
    down = Section(down_text, starts["down"]) if down_text.strip() else None
    phase, phase_line = headers.get("phase", ("", 0))
    return Migration(
        name=path.stem,
        path=path,
        kind="sql",
        phase=_check_phase(path, phase, phase_line, "-- phase: expand"),
        checksum=digest,
        transactional=_check_transaction(path, headers.get("transaction")),
        has_down=down is not None,
        allows=_allows(text),
        up=up,
        down=down,
    )


def _check_phase(path: Path, phase: str, line: int, example: str) -> str:
    if phase in PHASES:
        return phase
    where = f"{path}:{line}" if line else str(path)
    if not phase:
        raise BadInput(f"{where}: no phase: add `{example}` (or contract)")
    raise BadInput(f"{where}: phase {phase!r} is not one of {', '.join(PHASES)}")


def _check_transaction(path: Path, header: tuple[str, int] | None) -> bool:
    if header is None:
        return True
    value, line = header
    if value not in ("none", "off", "on"):
        raise BadInput(f"{path}:{line}: `-- transaction: {value}`: expected none or on")
    return value == "on"


def _allows(text: str) -> dict[str, int]:
    allows = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        m = _ALLOW_RE.match(line)
        if m:
            allows[m.group(1).lower()] = lineno
    return allows


def parse_python(path: Path, text: str, digest: str) -> Migration:
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as e:
        raise BadInput(f"{path}:{e.lineno}: Python syntax error: {e.msg}") from None
    assigned = _top_level_constants(tree)
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    if "up" not in functions:
        raise BadInput(f"{path}: no `def up(db)` function")
    phase, phase_line = assigned.get("phase", ("", 0))
    transaction, _ = assigned.get("transaction", (True, 0))
    return Migration(
        name=path.stem,
        path=path,
        kind="py",
        phase=_check_phase(path, str(phase), phase_line, 'phase = "expand"'),
        checksum=digest,
        transactional=bool(transaction),
        has_down="down" in functions,
        allows=_allows(text),
        literals=_sql_literals(tree),
    )


def _top_level_constants(tree: ast.Module) -> dict[str, tuple[object, int]]:
    out: dict[str, tuple[object, int]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = (node.value.value, node.lineno)
    return out


def _sql_literals(tree: ast.Module) -> tuple[Section, ...]:
    """String constants that look like SQL statements (what `db.execute` is given)."""
    found = []
    for node in ast.walk(tree):
        is_str = isinstance(node, ast.Constant) and isinstance(node.value, str)
        if is_str and _SQL_START.match(node.value):
            found.append(Section(node.value, node.lineno))
    return tuple(sorted(found, key=lambda s: s.line))


def resolve(name: str, migrations: list[Migration], option: str) -> Migration:
    """A migration from what an operator types: full name, file name, timestamp or label."""
    candidates = [
        m
        for m in migrations
        if name in (m.name, m.path.name, m.name.split("_", 1)[0], m.name.split("_", 1)[1])
    ]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise BadInput(f"{option} {name}: no such migration")
    names = ", ".join(m.name for m in candidates)
    raise BadInput(f"{option} {name}: ambiguous, matches {names}")


SQL_TEMPLATE = """\
-- phase: {phase}
-- {hint}
-- up

-- down
"""

PY_TEMPLATE = '''\
"""{label}: a chunked backfill. Each `yield` commits the chunk and records progress;
a run that is killed resumes after the last committed chunk."""

phase = "{phase}"


def up(db):
    # db.batches walks the key in chunks, starting after the last committed one.
    for lo, hi in db.batches("my_table", key="id", size=1000):
        db.execute(
            "UPDATE my_table SET new_col = old_col WHERE id BETWEEN ? AND ? AND new_col IS NULL",
            (lo, hi),
        )
        yield hi


def down(db):
    pass  # a backfill usually needs no undo: the expand that added the column has one
'''

HINTS = {
    "expand": "expand: runs before the switch; old code must keep working (add, never drop)",
    "contract": "contract: runs after every host serves the new code (drop what it no longer uses)",
}


def new_migration(
    directory: Path, label: str, phase: str, python: bool, now: datetime | None = None
) -> Path:
    """Write a stamped migration file from a template; never overwrite one."""
    if not LABEL_RE.match(label):
        raise BadInput(f"NAME {label!r}: use letters, digits, - and _ (e.g. add_people_name)")
    if phase not in PHASES:
        raise BadInput(f"--phase {phase}: expected one of {', '.join(PHASES)}")
    label = label.lower().replace("-", "_")
    directory.mkdir(parents=True, exist_ok=True)
    when = now or datetime.now(timezone.utc)
    taken = {p.name.split("_", 1)[0] for p in directory.iterdir()}
    while when.strftime(STAMP) in taken:  # two files made in one second keep their order
        when += timedelta(seconds=1)
    path = directory / f"{when.strftime(STAMP)}_{label}.{'py' if python else 'sql'}"
    template = PY_TEMPLATE if python else SQL_TEMPLATE
    path.write_text(template.format(phase=phase, label=label, hint=HINTS[phase]))
    return path
