"""systemd units: the one `deployer setup` installs for an app on a host
(`installed`), and the one `deployer master unit` prints for the given options
(`render`, optionally with a .socket unit).

The service is Type=notify: the master sends READY=1 once every worker is
ready, and RELOADING=1 / READY=1 around each reload. ExecReload runs
`reload --wait`, so `systemctl reload` waits for the outcome and fails when
the reload failed (Type=notify-reload cannot report a failure). KillMode=mixed
sends SIGTERM to the master only (it drains its workers); whatever is left at
TimeoutStopSec gets SIGKILL.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys

from deployer.hostapi.layout import Layout
from deployer.master.config import ConfigError, MasterConfig


def master_argv(python: str | None = None) -> list[str]:
    """How to run `deployer master` with the code we run from: the zipapp by its
    path when we run from one (the hosts), else the package (a checkout)."""
    import deployer

    python = python or sys.executable
    root = os.path.dirname(os.path.dirname(os.path.abspath(deployer.__file__)))
    if root.startswith("/proc/"):  # the bootstrap's memfd copy: argv[0] names the file
        root = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else root
    if os.path.isfile(root) and not root.startswith("/proc/"):
        return [python, root, "master"]
    return [python, "-m", "deployer.master"]


def server_argv(cfg: MasterConfig, with_listen: bool) -> list[str]:
    argv = [*master_argv(), "run"]
    for option, value in cfg.items():
        if option.flag and (with_listen or option.key != "listen"):
            argv += [option.flag_name, option.flag_text(value)]
    return argv + ["--", *cfg.argv]


def unit_name(cfg: MasterConfig) -> str:
    base = os.path.basename(os.path.dirname(cfg.cwd)) if cfg.cwd else "app"
    return f"deployer-{base or 'app'}"


def render(cfg: MasterConfig, socket_unit: bool = False) -> str:
    """The service unit; without `listen` (queue consumers) it binds nothing, and
    there is no socket for a .socket unit to own."""
    if socket_unit and not cfg.listen:
        raise ConfigError("--socket-unit: needs --listen (without it the master binds nothing)")
    name = unit_name(cfg)
    run = " ".join(shlex.quote(a) for a in server_argv(cfg, with_listen=not socket_unit))
    lines = [
        "[Unit]",
        f"Description=deployer master: {shlex.join(cfg.argv)}",
        "After=network.target",
    ]
    if socket_unit:
        lines.append(f"Requires={name}.socket")
    lines += [
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={run}",
    ]
    if cfg.socket:
        reload = [
            *master_argv(),
            "reload",
            "--wait",
            "--socket",
            cfg.socket,
        ]
        lines.append(f"ExecReload={' '.join(shlex.quote(a) for a in reload)}")
    else:
        lines.append("ExecReload=/bin/kill -HUP $MAINPID")
    lines += [
        "KillMode=mixed",
        f"TimeoutStartSec={int(cfg.ready_timeout) + 30}",
        f"TimeoutStopSec={int(cfg.shutdown_timeout) + 10}",
        "Restart=on-failure",
        "RestartSec=1",
        "LimitNOFILE=65536",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    out = f"# {name}.service\n" + "\n".join(lines)
    if socket_unit and cfg.listen:
        out += "\n".join(
            [
                f"# {name}.socket",
                "[Socket]",
                f"ListenStream={cfg.listen.removeprefix('unix:')}",
                "ReusePort=no",
                "Backlog=65535",
                "",
                "[Install]",
                "WantedBy=sockets.target",
                "",
            ]
        )
    return out


# --- the unit `deployer setup` installs: one per app and deploy_to ---------------------

HEADER = "# Written by `deployer setup`; edits are overwritten (drop-ins in {name}.d/ stay)."
MARK = "# Written by `deployer setup`;"  # how setup knows a unit file is its own


class UnitError(ValueError):
    """A value that cannot be written into a unit file (a control character)."""


def app_unit_name(app: str, deploy_to: str, role: str | None = None) -> str:
    """`deployer-<app>[-<role>]-<8 hex of sha256(deploy_to)>.service`: unique per app,
    role and deploy_to, so several apps on one host, several roles of one app, and
    several deploy roots of one app on one machine, each get their own unit."""
    digest = hashlib.sha256(os.fsencode(deploy_to)).hexdigest()[:8]
    who = app if role is None else f"{app}-{role}"
    return f"deployer-{who}-{digest}.service"


def unit_name_of(layout: Layout, app: str) -> str:
    """The unit of `layout.role`'s master (the app's one master without roles)."""
    return app_unit_name(app, str(layout.root), layout.role)


def boot_argv(layout: Layout, python: str) -> list[str]:
    """What the unit runs at boot: the host's zipapp, `master run` with the
    master.toml of the layout's role (its socket, pid file and log are in it)."""
    return [python, str(layout.pyz), "master", "run", "--config", str(layout.master_config)]


def boot_conditions(layout: Layout) -> list[str]:
    """The files the unit needs to start (ConditionPathExists=): without them (or with
    the stop mark of `deployer app stop`) it is skipped at boot, not failed."""
    return [str(layout.current), str(layout.master_config), f"!{layout.stopped}"]


def _plain(value: str, what: str) -> str:
    """A value with systemd's specifiers escaped (`%` -> `%%`)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UnitError(f"{what} {value!r} has a control character: it cannot go into a unit")
    return value.replace("%", "%%")


def _word(value: str, what: str, dollar: bool = True) -> str:
    """One word of a command line (ExecStart=) or of Environment=, quoted the way
    systemd unquotes it; `$` doubled where systemd would expand variables."""
    text = _plain(value, what)
    if dollar:
        text = text.replace("$", "$$")
    if text and not any(c in text for c in " \t\"'\\;"):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def command_line(argv: list[str], what: str = "command") -> str:
    return " ".join(_word(a, what) for a in argv)


def installed(
    layout: Layout,
    app: str,
    python: str,
    cfg: MasterConfig,
    scope: str,
    user: str | None = None,
    path_env: str | None = None,
) -> str:
    """The unit `deployer setup` installs for the master of `layout.role` (the app's
    one master without roles): the host's zipapp runs it in the foreground with that
    role's master.toml; `scope` is "system" (with User=) or "user" (the deploy
    user's own systemd, lingering). Every path comes from the layout."""
    root = str(layout.root)
    toml = str(layout.master_config)
    start = boot_argv(layout, python)
    reload = [*start[:3], "reload", "--wait", "--config", toml]
    # ExecReload waits for the whole reload and systemd bounds it by TimeoutStartSec
    reload_bound = cfg.reload_bound()
    name = unit_name_of(layout, app)
    who = _plain(app, "app") + ("" if layout.role is None else f" (role {layout.role})")
    lines = [
        HEADER.format(name=name),
        "[Unit]",
        f"Description=deployer master of {who} in {_plain(root, 'deploy_to')}",
    ]
    if scope == "system":
        lines += ["Wants=network-online.target", "After=network-online.target"]
    # nothing to run before the first release: skipped at boot, not failed
    lines += [f"ConditionPathExists={_plain(p, 'deploy_to')}" for p in boot_conditions(layout)]
    lines += [
        "StartLimitIntervalSec=120",
        "StartLimitBurst=10",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
    ]
    if scope == "system" and user:
        lines.append(f"User={_plain(user, 'user')}")
    lines.append(f"WorkingDirectory={_plain(root, 'deploy_to')}")
    if path_env:
        lines.append(f"Environment={_word('PATH=' + path_env, 'PATH', dollar=False)}")
    lines += [
        f"ExecStart={command_line(start, 'deploy_to')}",
        f"ExecReload={command_line(reload, 'deploy_to')}",
        # SIGTERM to the master alone: it drains its workers (stop_signal, SIGKILL at
        # shutdown_timeout); whatever is left after TimeoutStopSec gets SIGKILL
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStartSec={int(reload_bound) + 1}",
        f"TimeoutStopSec={int(cfg.shutdown_timeout) + 10}",
        "Restart=on-failure",
        "RestartSec=2",
    ]
    if scope == "system":  # a user manager may not raise it past its own hard limit
        lines.append("LimitNOFILE=65536")
    ident = f"deployer-{app}" + ("" if layout.role is None else f"-{layout.role}")
    lines += [
        f"SyslogIdentifier={_plain(ident, 'app')}",
        "",
        "[Install]",
        f"WantedBy={'multi-user.target' if scope == 'system' else 'default.target'}",
        "",
    ]
    return "\n".join(lines)


def conditions(text: str) -> list[str]:
    """The ConditionPathExists= paths of a unit file, as systemd reads them."""
    prefix = "ConditionPathExists="
    return [
        line[len(prefix) :].replace("%%", "%")
        for line in text.splitlines()
        if line.startswith(prefix)
    ]


def exec_start(text: str) -> list[str]:
    """The ExecStart= of a unit file as an argv (what systemd runs; for tests and
    for `status`), for the quoting `installed` writes."""
    import shlex

    for line in text.splitlines():
        if line.startswith("ExecStart="):
            words = shlex.split(line[len("ExecStart=") :])
            return [w.replace("$$", "$").replace("%%", "%") for w in words]
    raise UnitError("no ExecStart= line")
