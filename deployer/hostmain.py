"""Entry point of the host-side zipapp: `python3 deployer.pyz agent|master|migrate ...`.

Standard library only, like everything it dispatches to.
"""

from __future__ import annotations

import sys

USAGE = "usage: deployer.pyz {agent|master|migrate} ..."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("agent", "master", "migrate"):
        print(USAGE, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "agent":
        from deployer.agent.cli import main as run
    elif command == "master":
        from deployer.master.cli import main as run
    else:
        from deployer.migrations.cli import main as run
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
