"""`deployer master ...`: argument parsing, the server commands (run, start)
and the control-socket clients (reload, status, scale, stop, upgrade).

main(argv) returns the exit code: 0 ok, 1 the operation failed, 2 bad input
(the message names the option and what was expected; never a traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any, NoReturn

from deployer.hostapi import checks
from deployer.hostapi.exits import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from deployer.hostapi.options import FLAG_OPTIONS
from deployer.master import config as config_mod
from deployer.master import control, daemon, title, units
from deployer.master.config import ConfigError, MasterConfig

PROG = "deployer master"


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() owns the exit code."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message}")


def server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="FILE", help="TOML file; its [master] section gives defaults"
    )
    for option in FLAG_OPTIONS:
        p.add_argument(option.flag_name, metavar=option.metavar, help=option.help)


def client_options(p: argparse.ArgumentParser, timeout: bool = False) -> None:
    p.add_argument("--socket", metavar="PATH", help="the master's control socket")
    p.add_argument("--config", metavar="FILE", help="read socket from its [master] section")
    if timeout:
        p.add_argument("--timeout", metavar="S", help="give up waiting after S seconds")


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="The resident cluster master.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name, text in (
        ("run", "run in the foreground (for systemd): -- COMMAND [ARG...]"),
        ("start", "daemonize; return once every worker is ready"),
        ("unit", "print a systemd unit for these options"),
    ):
        server_options(sub.add_parser(name, help=text, description=text))
    sub.choices["unit"].add_argument(
        "--socket-unit", action="store_true", help="also print a .socket unit (systemd binds)"
    )
    reload = sub.add_parser("reload", help="replace every worker, one by one")
    client_options(reload, timeout=True)
    reload.add_argument("--wait", action="store_true", help="stream progress; exit 1 if it failed")
    status = sub.add_parser("status", help="workers, release, counters")
    client_options(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    scale = sub.add_parser("scale", help="set the number of workers")
    scale.add_argument("n", metavar="N")
    client_options(scale)
    client_options(sub.add_parser("stop", help="drain every worker and exit"), timeout=True)
    upgrade = sub.add_parser("upgrade", help="re-exec the master in place (new code, same pid)")
    client_options(upgrade, timeout=True)
    upgrade.add_argument(
        "--code",
        metavar="DIR",
        help="directory or zipapp holding the new `deployer` package (default: where the master's"
        " own deployer package is, as it is on disk now)",
    )
    upgrade.add_argument(
        "--reconfigure",
        action="store_true",
        help="the re-exec'd master takes the options in --config (all but listen, socket,"
        " pidfile, log and cwd, which take a restart); workers change with `scale`",
    )
    return parser


def resume(argv: list[str]) -> int:
    from deployer.master import upgrade

    p = argparse.ArgumentParser(prog=f"{PROG} _resume")
    p.add_argument("--state-fd", type=int, required=True)
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    return upgrade.resume(args.state_fd, args.check)


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def main(argv: list[str]) -> int:
    if argv[:1] == ["_resume"]:  # internal: a master re-exec'd by `upgrade` (upgrade.py)
        return resume(argv[1:])
    options, command = split_command(list(argv))
    try:
        args = build_parser().parse_args(options)
        return dispatch(args, command)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except control.ControlError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


def dispatch(args: argparse.Namespace, command: list[str]) -> int:
    if args.command in ("run", "start", "unit"):
        cfg = server_config(args, command)
        if args.command == "unit":
            print(units.render(cfg, socket_unit=args.socket_unit), end="")
            return EXIT_OK
        title.set_title(title.title_for(args.config))  # ps names it, not the bootstrap
        return daemon.serve(cfg, detach=args.command == "start")
    if command:
        raise ConfigError(f"{args.command}: unexpected arguments after --: {' '.join(command)}")
    path = client_socket(args)
    return CLIENTS[args.command](args, path)


# --- server options ---


def server_config(args: argparse.Namespace, command: list[str]) -> MasterConfig:
    file_values = config_mod.load_file(args.config) if args.config else {}
    flags: dict[str, Any] = {}
    for option in FLAG_OPTIONS:
        value = getattr(args, option.key)
        if value is not None:
            flags[option.key] = option.parse_flag(value)
    if command:
        flags["command"] = tuple(command)
    cfg = config_mod.build(file_values, flags)
    if args.command != "unit":
        check_runnable(cfg)
    return cfg


def check_runnable(cfg: MasterConfig) -> None:
    """Catch a wrong --cwd or command now, as bad input, not as a crash loop."""
    cwd = os.path.realpath(cfg.cwd) if cfg.cwd else os.getcwd()
    if not os.path.isdir(cwd):
        raise ConfigError(f"--cwd: {cfg.cwd} is not a directory")
    exe = cfg.command[0]
    if "/" in exe:
        path = os.path.join(cwd, exe)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise ConfigError(f"command: {exe} is not an executable file (in {cwd})")
    elif shutil.which(exe, path=cfg.env.get("PATH", os.environ.get("PATH"))) is None:
        raise ConfigError(f"command: {exe!r} not found in PATH")


# --- clients ---


def client_socket(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    if args.config:
        path = config_mod.load_file(args.config).get("socket")
        if path:
            return path
    raise ConfigError(f"{args.command}: --socket PATH is required (or --config with socket =)")


def client_timeout(args: argparse.Namespace) -> float | None:
    value = getattr(args, "timeout", None)
    if value is None:
        return None
    return config_mod.parse_flag_number(value, "--timeout", checks.seconds())


def exchange(path: str, message: dict[str, Any], timeout: float | None = 30.0):
    """The answers to one request; a timeout is an operation failure."""
    try:
        yield from control.request(path, message, timeout)
    except TimeoutError:
        raise control.ControlError(f"no answer within {timeout:g}s") from None


def final(answers) -> dict[str, Any]:
    last: dict[str, Any] = {}
    for last in answers:  # noqa: B007 - we want the last one
        pass
    return last


def cmd_reload(args: argparse.Namespace, path: str) -> int:
    timeout = client_timeout(args)
    for answer in exchange(path, {"cmd": "reload"}, timeout if args.wait else timeout or 10):
        if "ok" in answer:
            return report_result(answer)
        print(describe_event(answer), flush=True)
        if not args.wait and answer.get("event") in ("started", "queued"):
            return EXIT_OK
    print(f"{PROG}: the master closed the connection before the reload ended", file=sys.stderr)
    return EXIT_FAILED


def report_result(answer: dict[str, Any]) -> int:
    if answer.get("ok"):
        extra = f" in {answer['seconds']}s" if "seconds" in answer else ""
        print(f"ok{extra}" + (f": release {answer['release']}" if "release" in answer else ""))
        return EXIT_OK
    print(f"{PROG}: failed: {answer.get('error', 'unknown error')}", file=sys.stderr)
    return EXIT_FAILED


def describe_event(e: dict[str, Any]) -> str:
    kind = e.get("event")
    if kind == "started":
        return f"reload {e['reload']} started: {e['from']} -> {e['release']}"
    if kind == "queued":
        return f"reload {e['reload']} queued behind reload {e['behind']}"
    if kind == "aborting":
        return f"reload {e['reload']} aborting, reverting slots {e['reverting']}: {e['error']}"
    phase = " (revert)" if e.get("phase") == "revert" else ""
    who = f"worker {e.get('worker')} pid {e.get('pid')}"
    status = f" ({e['status']})" if "status" in e else ""
    return f"{kind}{phase}: {who} release {e.get('release')}{status}"


def cmd_status(args: argparse.Namespace, path: str) -> int:
    answer = final(exchange(path, {"cmd": "status"}))
    if not answer.get("ok"):
        return report_result(answer)
    status = answer["status"]
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    print(render_status(status))
    return EXIT_OK


def render_status(s: dict[str, Any]) -> str:
    mb = (s.get("rss") or 0) / 1e6
    where = f"on {s['listen']}" if s.get("listen") else "with no listening socket"
    lines = [
        f"master pid {s['pid']} {s['state']} {where}, rss {mb:.1f} MB",
        f"release {s['release']} (generation {s['generation']})",
        f"workers: {s['ready']} ready of {s['configured']}; reloads {s['reloads']} ok,"
        f" {s['failed_reloads']} failed; crashes {s['crashes']}",
    ]
    for w in s["workers"]:
        rss = (w.get("rss") or 0) / 1e6
        lines.append(
            f"  {w['id']:>3} pid {w['pid']:<8} {w['state']:<9} {w['role']:<11} up {w['uptime']:>7}s"
            f"  restarts {w['restarts']:<3} rss {rss:5.1f} MB  {w['release']}"
        )
    for c in s["crash_loops"]:
        lines.append(
            f"  slot {c['id']} crash loop: {c['crashes_in_a_row']} in a row,"
            f" next restart in {c['restart_in']}s"
        )
    return "\n".join(lines)


def cmd_scale(args: argparse.Namespace, path: str) -> int:
    n = config_mod.parse_flag_number(args.n, "scale N", checks.integer(1, checks.MAX_WORKERS))
    answer = final(exchange(path, {"cmd": "scale", "workers": n}))
    if answer.get("ok"):
        note = f" ({answer['note']})" if answer.get("note") else ""
        print(f"workers: {answer['was']} -> {answer['workers']}{note}")
        return EXIT_OK
    return report_result(answer)


def cmd_stop(args: argparse.Namespace, path: str) -> int:
    answer = final(exchange(path, {"cmd": "stop"}, client_timeout(args)))
    if answer.get("ok") or answer.get("event") == "stopping":
        # EOF after "stopping" also means it is gone: the socket closes at exit.
        print(f"master {answer.get('stopped', answer.get('pid'))} stopped")
        return EXIT_OK
    return report_result(answer)


def cmd_upgrade(args: argparse.Namespace, path: str) -> int:
    message: dict[str, Any] = {"cmd": "upgrade"}
    if args.code:
        message["code"] = os.path.abspath(args.code)
    if args.reconfigure:
        if not args.config:
            raise ConfigError("upgrade --reconfigure: --config FILE names the new options")
        cfg = config_mod.build(config_mod.load_file(args.config), {})
        message["config"] = cfg.to_dict()
    for answer in exchange(path, message, client_timeout(args) or 60):
        if answer.get("ok"):
            workers = " ".join(map(str, answer["workers"]))
            print(
                f"master pid {answer['pid']} upgraded in place on {answer['code']}"
                f" (exec {answer['seconds']}s; workers kept: {workers})"
            )
            return EXIT_OK
        if "ok" in answer:
            return report_result(answer)
        print(answer.get("message", json.dumps(answer)), flush=True)
    print(f"{PROG}: the master closed the connection before the upgrade ended", file=sys.stderr)
    return EXIT_FAILED


CLIENTS = {
    "reload": cmd_reload,
    "status": cmd_status,
    "scale": cmd_scale,
    "stop": cmd_stop,
    "upgrade": cmd_upgrade,
}
