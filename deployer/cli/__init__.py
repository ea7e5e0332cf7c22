"""The `deployer` command: parse, call, print, exit code. Nothing else lives here;
one module per subject (as Kamal's cli/app.rb, cli/lock.rb), each adding its
commands to the group in base.py.

Imports of anything heavy (fabric, paramiko, git, rich) happen inside the
commands that need them, so `deployer --help` starts fast.
"""

from __future__ import annotations

import contextlib
import os
import sys

import click

from deployer.cli import app, day2, deploy, hostside, secrets  # noqa: F401 (their commands)
from deployer.cli.base import cli
from deployer.cli.hostside import verbatim_master_args
from deployer.errors import EXIT_BAD_INPUT, DeployerError


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM takes the same path as Ctrl-C, so locks are released on the way out.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected errors become a message and an exit code.

    As the program (no `argv` given), it ends without the interpreter's teardown of
    fabric, paramiko and GitPython (~60 ms, a tenth of a rollback): every file and
    connection is closed by then, the output flushed. Not the master's commands:
    `master run` is a long-lived process with its own shutdown."""
    rest = verbatim_master_args(sys.argv[1:] if argv is None else argv)
    if rest is not None:
        from deployer.master.cli import main as master_main

        sys.exit(master_main(rest))
    try:
        _main(argv)
        code: object = 0
    except SystemExit as e:
        code = e.code
    if argv is None and (code is None or isinstance(code, int)):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to say
                stream.flush()
        os._exit(code or 0)
    sys.exit(code)


def _main(argv: list[str] | None) -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=argv, prog_name="deployer", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(EXIT_BAD_INPUT)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except DeployerError as e:
        from deployer.report import printable

        # the message may carry a host's or a build's output (a stderr tail)
        click.echo(printable(f"deployer: {e}"), err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        # now: not once the threads still waiting on a remote step reach its deadline
        os._exit(130)
