"""`deployer master unit`: a systemd unit (and optionally a .socket unit)
for the given options.

The service is Type=notify: the master sends READY=1 once every worker is
ready, and RELOADING=1 / READY=1 around each reload. ExecReload runs
`reload --wait`, so `systemctl reload` waits for the outcome and fails when
the reload failed (Type=notify-reload cannot report a failure). KillMode=mixed
sends SIGTERM to the master only (it drains its workers); whatever is left at
TimeoutStopSec gets SIGKILL.
"""

from __future__ import annotations

import os
import shlex
import sys

from deployer.master.config import MasterConfig


def server_argv(cfg: MasterConfig, with_listen: bool) -> list[str]:
    argv = [sys.executable, "-m", "deployer.master", "run"]
    for option, value in cfg.items():
        if option.flag and (with_listen or option.key != "listen"):
            argv += [option.flag_name, option.flag_text(value)]
    return argv + ["--", *cfg.argv]


def unit_name(cfg: MasterConfig) -> str:
    base = os.path.basename(os.path.dirname(cfg.cwd)) if cfg.cwd else "app"
    return f"deployer-{base or 'app'}"


def render(cfg: MasterConfig, socket_unit: bool = False) -> str:
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
            sys.executable,
            "-m",
            "deployer.master",
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
