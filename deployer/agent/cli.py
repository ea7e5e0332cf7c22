"""`agent OP ...` on a host: one operation, one typed answer.

Anything an operation streams (build output) goes to stdout as plain lines;
the last line is the answer's result line (deployer.hostapi.answers), so the
controller can show the stream and still parse the outcome unambiguously.
The argv each operation takes is built by deployer.hostapi.calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from deployer import __version__
from deployer.agent import ops
from deployer.hostapi import answers
from deployer.hostapi.calls import LIFECYCLE_ACTIONS, LOCK_ACTIONS, SECRET_ACTIONS
from deployer.hostapi.exits import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from deployer.hostapi.layout import Layout
from deployer.hostapi.trust import UntrustedPath


class _BadRequest(Exception):
    pass


class _RequestParser(argparse.ArgumentParser):
    """A session's parser: a bad request is answered, it does not end the process."""

    def error(self, message: str):  # type: ignore[override]
        raise _BadRequest(message)

    def exit(self, status: int = 0, message: str | None = None):  # type: ignore[override]
        raise _BadRequest(message or "no operation run (help?)")


class _Skipped:
    """An op's arguments when the parser is built for another op."""

    def add_argument(self, *args: object, **kwargs: object) -> None:
        pass


def _parser(session: bool = False, only: str | None = None) -> argparse.ArgumentParser:
    """The agent's argv parser; with `only`, just that op's (argparse looks up a
    translation for every help string: all ops cost ~4 ms, a call needs one)."""
    cls = _RequestParser if session else argparse.ArgumentParser
    p = cls(prog="deployer-agent", description="deployer host agent")
    sub = p.add_subparsers(dest="op", required=True)
    built: list[str] = []

    def op(name: str) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return _Skipped()  # type: ignore[return-value]
        built.append(name)
        return sub.add_parser(name)

    op("version")

    def with_root(name: str) -> argparse.ArgumentParser:
        sp = op(name)
        sp.add_argument("--root", required=True, help="the host's deploy_to")
        sp.add_argument("--role", help="the role whose master's files the op uses")
        return sp

    sp = with_root("setup")
    sp.add_argument("--install", action="store_true", help="write this zipapp into the layout")
    sp.add_argument("--master-toml", help="the master's options file, written if it changed")
    with_root("state")
    sp = with_root("lifecycle")
    sp.add_argument("action", choices=LIFECYCLE_ACTIONS)
    sp = with_root("unit")
    sp.add_argument("--app", required=True, help="the app's name (names the unit)")
    sp.add_argument("--supervisor", choices=("auto", "systemd", "none"), default="auto")
    sp = with_root("prepare")
    sp.add_argument("--revision", required=True)
    sp.add_argument("--release", required=True)
    sp.add_argument("--shared", action="append", default=[])
    sp.add_argument("--build")
    sp.add_argument(
        "--receive",
        action="store_true",
        help="first index the pack on stdin into repo/ and pin the revision",
    )
    sp = with_root("switch")
    sp.add_argument("--release", required=True)
    sp.add_argument("--for-role", action="append", default=[], help="record it as this role's")
    sp = with_root("prune")
    sp.add_argument("--keep", type=int, required=True)
    sp = op("health")
    sp.add_argument("--url", required=True)
    sp.add_argument("--expect", type=int, default=200)
    sp.add_argument("--timeout", type=float, default=30.0)
    sp.add_argument("--passes", type=int, default=3)
    sp.add_argument("--interval", type=float, default=0.5)
    sp = with_root("status")
    sp.add_argument("--timeout", type=float, default=5.0)
    sp.add_argument("--window", type=float, default=300.0, help="recent crashes: seconds")
    sp.add_argument("--socket", help="the master's control socket")
    sp.add_argument("--url", help="health URL, probed once")
    sp.add_argument("--expect", type=int, default=200)
    sp = with_root("watch")
    sp.add_argument("--seconds", type=float, required=True)
    sp.add_argument(
        "--window", type=float, default=0.0, help="crashes in the seconds before it count too"
    )
    sp.add_argument("--socket", action="append", default=[], help="a master's control socket")
    sp.add_argument("--url", action="append", default=[], help="a health URL, probed every poll")
    sp.add_argument("--expect", type=int, action="append", default=[], help="each --url's status")
    sp = with_root("workers")
    sp.add_argument("--socket", required=True, help="the master's control socket")
    sp.add_argument("--release", required=True, help="whose workers (a release name)")
    sp.add_argument("--lines", type=int, default=6, help="the last N lines they wrote")
    sp = with_root("secrets")
    sp.add_argument("action", choices=SECRET_ACTIONS)
    sp.add_argument("key", nargs="?")
    sp = with_root("record")
    sp.add_argument("--entry", required=True, help="JSON object")
    sp = with_root("lock")
    sp.add_argument("action", choices=LOCK_ACTIONS)
    sp.add_argument("--owner", default="{}", help="JSON object with at least an id")
    sp.add_argument("--force", action="store_true", help="release whoever holds it")
    sp.add_argument(
        "--take-stale", type=float, metavar="S", help="acquire: take over a lock silent for S"
    )
    sp.add_argument("--replace", metavar="ID", help="acquire: take over the lock of this holder")
    sp = with_root("logs")
    sp.add_argument("--lines", type=int, help="the last N lines (default: all)")
    sp.add_argument("--since", help="only lines stamped at or after this (2026-12-01T11:00:00Z)")
    sp.add_argument("--follow", action="store_true", help="then new lines, until stdin closes")
    sp.add_argument("--poll", type=float, default=0.25, help="follow: seconds between reads")
    sp = with_root("exec")
    sp.add_argument("--argv", required=True, help="the command: a JSON list of strings")
    if only is not None and not built:  # an unknown op: the message lists them all
        return _parser(session)
    return p


def _parse(argv: list[str], session: bool = False) -> argparse.Namespace:
    only = argv[0] if argv and not argv[0].startswith("-") else None
    key = (only, session)
    if key not in _parsers:
        _parsers[key] = _parser(session, only)
    return _parsers[key].parse_args(argv)


_parsers: dict[tuple[str | None, bool], argparse.ArgumentParser] = {}


def _bundle_id() -> str:
    """BUNDLE_ID read through this package's own loader (the zipapp's zipimporter),
    not importlib.resources (~30 ms, and every rollout asks every host); run from a
    source tree, the id those sources would have."""
    import deployer.agent as package

    try:
        path = os.path.join(os.path.dirname(package.__file__), "BUNDLE_ID")
        return package.__loader__.get_data(path).decode()
    except (AttributeError, TypeError, OSError):  # not running from a zipapp: the source tree
        from deployer.hostapi import manifest

        return manifest.bundle_id(manifest.sources())


def run_op(args: argparse.Namespace) -> tuple:
    if args.op == "version":
        return answers.Version(__version__, _bundle_id(), sys.version.split()[0])
    if args.op == "health":
        return ops.health(args.url, args.expect, args.timeout, args.passes, args.interval)
    layout = Layout.at(args.root, args.role)
    if args.op == "setup":
        from deployer.agent.ops.setup import setup

        return setup(layout, args.install, args.master_toml)
    ops.check_layout(layout)
    if args.op == "state":
        # the bundle id too: a rollout checks the agent and reads state in one call
        return ops.state(layout)._replace(bundle=_bundle_id())
    if args.op == "unit":
        return ops.unit(layout, args.app, args.supervisor)
    if args.op == "lifecycle":
        return ops.lifecycle(layout, args.action)
    if args.op == "prepare":
        return ops.receive_and_prepare(
            layout, args.receive, args.revision, args.release, args.shared, args.build
        )
    if args.op == "switch":
        return ops.switch(layout, args.release, args.for_role)
    if args.op == "prune":
        return ops.prune(layout, args.keep)
    if args.op == "status":
        return ops.status(layout, args.socket, args.url, args.expect, args.timeout, args.window)
    if args.op == "watch":
        if len(args.expect) != len(args.url):
            raise ops.AgentError("watch: give one --expect for each --url")
        urls = list(zip(args.url, args.expect))
        return ops.watch(args.seconds, args.socket, urls, args.window)
    if args.op == "workers":
        return ops.workers(layout, args.socket, args.release, args.lines)
    if args.op == "secrets":
        from deployer.agent.ops.secrets import secrets

        return secrets(layout, args.action, args.key)
    if args.op == "record":
        return ops.record(layout, json.loads(args.entry))
    if args.op == "logs":
        return ops.logs(layout, args.lines, args.since, args.follow, args.poll)
    if args.op == "exec":  # returns only if it could not run the command
        ops.exec_in_current(layout, json.loads(args.argv))
    if args.op == "lock":
        owner = answers.LockOwner.from_json(json.loads(args.owner)) or answers.LockOwner("")
        from deployer.agent.ops.lock import lock

        return lock(layout, args.action, owner, args.force, args.take_stale, args.replace)
    raise ops.AgentError(f"unknown operation {args.op!r}")


def _answer(args: argparse.Namespace) -> int:
    """Run the op; print its result line; the exit code it stands for."""
    error, code = None, EXIT_FAILED
    try:
        answer = run_op(args)
    except UntrustedPath as e:
        error, code = f"refusing: {e}", EXIT_BAD_INPUT
    except (ops.AgentError, ValueError, OSError) as e:
        error = str(e)
    except Exception as e:  # a bug: still answer in JSON, with the traceback on stderr
        import traceback  # only here: imported up front it slows every agent call

        traceback.print_exc()
        error = f"agent internal error: {type(e).__name__}: {e}"
    print(answers.result_line(None if error else answer, error, code), flush=True)
    return EXIT_OK if error is None else code


def _request(argv: list[str]) -> int:
    """One request of a session (deployer/agent/session.py): parsed and dispatched
    like a command line; what cannot run in a session is refused with an answer."""
    try:
        args = _parse(argv, session=True)
        if args.op == "exec" or getattr(args, "follow", False) or getattr(args, "install", False):
            raise _BadRequest(f"{' '.join(argv[:1])}: runs as its own command, not in a session")
    except _BadRequest as e:
        print(answers.result_line(error=f"bad request: {e}", code=EXIT_BAD_INPUT), flush=True)
        return EXIT_BAD_INPUT
    return _answer(args)


def main(argv: list[str]) -> int:
    if argv[:1] == ["session"]:
        from deployer.agent.session import serve

        return serve(_request)
    return _answer(_parse(argv))
