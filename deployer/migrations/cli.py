"""`deployer migrate ...` / `python -m deployer.migrations ...`: the host-side entry point.

main(argv) returns the exit code: 0 ok; 1 a migration failed (its transaction
was rolled back, so the schema is as it was before it; committed backfill
chunks are kept and resumed by the next `up`) or the database is unreachable;
2 bad input (the message names the file or option; also lint refusals, a
changed applied file, a down without a down section: nothing was run);
3 the runner lock is held (the message names owner and since when);
130 interrupted (SIGINT/SIGTERM/SIGHUP: the open transaction rolls back).

Every command takes --dir DIR (default ./migrations) and --database URL
(sqlite:///relative/path, sqlite:////absolute/path, postgresql://...).
With --json, stdout has one JSON object per line, each with an "event" key:

  status   {"event": "migration", name, phase, state (applied|partial|pending|
           changed|missing), file, checksum, applied_checksum, batch, applied_at,
           duration_ms, progress ({"chunks", "value"} or null), release} per migration,
           then {"event": "summary", applied, partial, changed, missing,
           pending: {expand, contract}, database, dialect, dir}
  up       {"event": "start", name, phase, file[, resume_from]}, {"event": "chunk",
           name, chunk, progress}, {"event": "retry", name, attempt, error},
           {"event": "applied", name, phase, batch, duration_ms, progress},
           {"event": "missing", name, ...}, with --dry-run {"event": "plan", ...};
           last: {"event": "done", ok: true, command: "up", phase, applied: [names],
           dry_run}
  down     start (with direction "down") / reverted events; last: {"event": "done",
           ok: true, command: "down", reverted: [names]}
  lint     {"event": "violation", rule, name, file, line, statement, message}...;
           last: {"event": "done", ok, command: "lint", violations: N} (exit 1 if N)
  new      {"event": "created", path, phase}
  accept   {"event": "accepted", name, old_checksum, checksum}
  failure  last line {"event": "error", ok: false, exit: N, message[, name, phase,
           direction, file, line, statement, error, progress]}

Human messages (and errors) go to stderr; without --json stdout is text.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TextIO

from deployer.migrations.errors import BadInput, DeployerError, MigrationFailed
from deployer.migrations.files import PHASES, discover, new_migration, short
from deployer.migrations.lint import describe
from deployer.migrations.lint import lint as lint_files
from deployer.migrations.runner import Event, MigrationStatus, Runner, check_phase

PROG = "deployer migrate"
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that raises BadInput instead of exiting, so main() returns a code."""

    def error(self, message: str) -> NoReturn:
        raise BadInput(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--dir",
        default=os.environ.get("DEPLOYER_MIGRATIONS_DIR", "migrations"),
        help="migrations directory (default: $DEPLOYER_MIGRATIONS_DIR or ./migrations)",
    )
    common.add_argument(
        "--database",
        default=os.environ.get("DEPLOYER_MIGRATIONS_DATABASE"),
        metavar="URL",
        help="sqlite:///PATH (sqlite:////abs/path) or postgresql://...; '-' reads it from "
        "the first line of stdin, so a password never shows in `ps` "
        "(default: $DEPLOYER_MIGRATIONS_DATABASE)",
    )
    common.add_argument("--json", action="store_true", help="one JSON object per line")
    common.add_argument(
        "--lock-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for another runner's lock before exiting 3 (default 0)",
    )
    common.add_argument(
        "--lock-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="give up a statement's wait for a table lock after this long, then retry (default 5)",
    )
    parser = _Parser(prog=PROG, description="Live-stage schema migrations (expand / contract).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("status", parents=[common], help="applied / pending, per phase")

    up = sub.add_parser("up", parents=[common], help="apply pending migrations")
    up.add_argument("--phase", choices=PHASES)
    up.add_argument("--to", metavar="NAME", help="stop after this migration")
    up.add_argument("--dry-run", action="store_true", help="show what would run; change nothing")
    up.add_argument("--release", help="record this release name with what is applied")
    up.add_argument(
        "--if-dir-exists",
        action="store_true",
        help="a release that ships no migrations directory has nothing to apply",
    )

    down = sub.add_parser("down", parents=[common], help="run down sections, newest first")
    which = down.add_mutually_exclusive_group()
    which.add_argument("--steps", type=int, help="how many (default 1)")
    which.add_argument("--to", metavar="NAME", help="revert everything applied after NAME")
    down.add_argument("--phase", choices=PHASES, help="only migrations of this phase")
    down.add_argument("--release", help="only migrations applied with this --release")

    lint = sub.add_parser("lint", parents=[common], help="check pending migrations")
    lint.add_argument("--phase", choices=PHASES)
    lint.add_argument("--all", action="store_true", help="applied ones too")
    lint.add_argument(
        "--dialect",
        choices=("sqlite", "postgresql"),
        help="lint every file for this database without connecting (implies --all)",
    )

    new = sub.add_parser("new", parents=[common], help="write a stamped migration file")
    new.add_argument("name", metavar="NAME")
    new.add_argument("--phase", choices=PHASES, default="expand")
    new.add_argument("--py", action="store_true", help="a Python (chunked backfill) migration")

    accept = sub.add_parser(
        "accept", parents=[common], help="record the new checksum of a changed, applied file"
    )
    accept.add_argument("name", metavar="NAME")
    return parser


class Output:
    """Events as text for people or as JSON lines for the rollout."""

    def __init__(self, as_json: bool, out: TextIO | None = None, err: TextIO | None = None):
        self.as_json = as_json
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._last_chunk_print = 0.0

    def event(self, e: Event) -> None:
        if self.as_json:
            self._write(self.out, json.dumps(e, default=str))
            return
        if e["event"] == "chunk" and not self._chunk_due():
            return
        text = HUMAN.get(e["event"], lambda e: None)(e)
        if text is not None:
            self._write(self.err if e["event"] == "missing" else self.out, text)

    def _chunk_due(self) -> bool:
        # A backfill can commit thousands of chunks: people get a line a second.
        now = time.monotonic()
        if now - self._last_chunk_print < 1.0:
            return False
        self._last_chunk_print = now
        return True

    def error(self, exc: DeployerError | str, code: int) -> None:
        message = str(exc)
        self._write(self.err, f"{PROG}: {message}")
        if self.as_json:
            details = exc.details if isinstance(exc, MigrationFailed) else {}
            self.event({"event": "error", "ok": False, "exit": code, "message": message, **details})

    def line(self, text: str) -> None:
        self._write(self.out, text)

    @staticmethod
    def _write(stream: TextIO, text: str) -> None:
        stream.write(text + "\n")
        stream.flush()


def _start_text(e: Event) -> str:
    verb = "reverting" if e.get("direction") == "down" else "applying"
    resume = e.get("resume_from")
    tail = f", resuming after chunk {resume['chunks']} ({resume['value']!r})" if resume else ""
    return f"{verb} {e['name']} ({e['phase']}){tail}"


def _done_text(e: Event) -> str:
    if e["command"] == "lint":
        return f"{e['violations']} violation(s)" if e["violations"] else "lint: clean"
    if e["command"] == "down":
        count = len(e["reverted"])
        return f"{count} migration(s) reverted" if count else "nothing to revert"
    names = e["applied"]
    if e["dry_run"]:
        return f"dry run: {len(names)} migration(s) would be applied" if names else "up to date"
    return f"{len(names)} migration(s) applied" if names else "up to date: nothing to apply"


HUMAN: dict[str, Callable[[Event], str | None]] = {
    "start": _start_text,
    "chunk": lambda e: f"  chunk {e['chunk']} committed (progress {e['progress']!r})",
    "retry": lambda e: f"  retry {e['attempt']} after: {e['error']}",
    "applied": lambda e: f"  applied {e['name']} in {e['duration_ms']} ms",
    "reverted": lambda e: f"  reverted {e['name']} in {e['duration_ms']} ms",
    "missing": lambda e: f"warning: {e['message']}",
    "plan": lambda e: f"would apply {e['name']} ({e['phase']})",
    "done": _done_text,
    "violation": lambda e: describe(e["file"], e["line"], e["rule"], e["message"], e["statement"]),
    "created": lambda e: e["path"],
    "accepted": lambda e: (
        f"{e['name']}: checksum {short(e['old_checksum'])} -> {short(e['checksum'])} recorded"
    ),
}


def _runner(args: argparse.Namespace, out: Output) -> Runner:
    if args.database == "-":
        args.database = sys.stdin.readline().strip()
    if not args.database:
        raise BadInput("--database URL is required (or set $DEPLOYER_MIGRATIONS_DATABASE)")
    return Runner(
        args.dir,
        args.database,
        release=getattr(args, "release", None),
        on_event=out.event,
        lock_wait=args.lock_wait,
        lock_timeout=args.lock_timeout,
    )


def cmd_status(args: argparse.Namespace, out: Output) -> int:
    runner = _runner(args, out)
    rows = runner.status()
    if out.as_json:
        for r in rows:
            out.event(r.to_json())
    else:
        for line in status_table(rows):
            out.line(line)
    out.event(summary(rows, runner))
    return 0


def status_table(rows: list[MigrationStatus]) -> Iterator[str]:
    if not rows:
        yield "no migrations"
    for r in rows:
        detail = {
            "applied": f"batch {r.batch}, {r.applied_at}, {r.duration_ms} ms",
            "partial": f"in progress: {r.progress and r.progress['chunks']} chunk(s), "
            f"last {r.progress and r.progress['value']!r}"
            + ("" if r.file else ", its file is not in this release"),
            "pending": "",
            "changed": f"file changed: applied {short(r.applied_checksum)}, "
            f"now {short(r.checksum)}",
            "missing": f"file gone (applied in batch {r.batch})",
        }[r.state]
        release = f" [{r.release}]" if r.release else ""
        yield (
            f"{r.state:<8} {r.phase or '-':<9} {r.name}"
            f"  {short(r.checksum or r.applied_checksum)}"
            f"{'  ' + detail if detail else ''}{release}"
        )


def summary(rows: list[MigrationStatus], runner: Runner) -> Event:
    count = {
        s: sum(r.state == s for r in rows) for s in ("applied", "partial", "changed", "missing")
    }
    pending = {p: sum(r.state == "pending" and r.phase == p for r in rows) for p in PHASES}
    return {
        "event": "summary",
        "database": runner.url.display,
        "dialect": runner.url.dialect,
        "dir": str(runner.directory),
        **count,
        "pending": pending,
    }


HUMAN["summary"] = lambda e: (
    f"{e['applied']} applied, {e['partial']} in progress, "
    f"{e['pending']['expand']} pending expand, {e['pending']['contract']} pending contract"
    + (f", {e['changed']} changed" if e["changed"] else "")
    + (f", {e['missing']} missing" if e["missing"] else "")
)


def cmd_up(args: argparse.Namespace, out: Output) -> int:
    if args.if_dir_exists and not Path(args.dir).is_dir():
        out.event({"event": "done", "ok": True, "command": "up", "phase": args.phase,
                   "applied": [], "dry_run": args.dry_run})  # fmt: skip
        return 0
    _runner(args, out).up(phase=args.phase, to=args.to, dry_run=args.dry_run)
    return 0


def cmd_down(args: argparse.Namespace, out: Output) -> int:
    _runner(args, out).down(steps=args.steps, to=args.to, phase=args.phase, release=args.release)
    return 0


def cmd_lint(args: argparse.Namespace, out: Output) -> int:
    if args.dialect:
        check_phase(args.phase)
        found = [m for m in discover(Path(args.dir)) if args.phase in (None, m.phase)]
        violations = lint_files(found, args.dialect)
    else:
        violations = _runner(args, out).lint(phase=args.phase, everything=args.all)
    for v in violations:
        out.event(v.to_json())
    out.event(
        {"event": "done", "ok": not violations, "command": "lint", "violations": len(violations)}
    )
    return 1 if violations else 0


def cmd_new(args: argparse.Namespace, out: Output) -> int:
    path = new_migration(Path(args.dir), args.name, args.phase, args.py)
    out.event({"event": "created", "path": str(path), "phase": args.phase})
    return 0


def cmd_accept(args: argparse.Namespace, out: Output) -> int:
    _runner(args, out).accept(args.name)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Output], int]] = {
    "status": cmd_status,
    "up": cmd_up,
    "down": cmd_down,
    "lint": cmd_lint,
    "new": cmd_new,
    "accept": cmd_accept,
}


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP (e.g. the SSH session closing) stop the run cleanly like Ctrl-C:
    the open transaction rolls back and the lock is released."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Output(as_json="--json" in argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except BadInput as e:
        out.error(e, e.exit_code)
        return e.exit_code
    with _signals_interrupt():
        try:
            return COMMANDS[args.command](args, out)
        except DeployerError as e:
            out.error(e, e.exit_code)
            return e.exit_code
        except KeyboardInterrupt as e:
            out.error(
                f"interrupted ({e or 'SIGINT'}): the open transaction was rolled back, "
                "committed chunks are kept",
                EXIT_INTERRUPTED,
            )
            return EXIT_INTERRUPTED
