"""`setup`: the layout checked or made, the zipapp, master.toml and bin/deployer written."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from deployer.agent.ops.common import AgentError
from deployer.hostapi import answers, trust
from deployer.hostapi.layout import Layout


def setup(
    layout: Layout, install: bool = False, master_toml: str | None = None
) -> answers.SetupResult:
    """Create the layout, or check the one there is; then (the layout being ours
    alone) write the zipapp this runs from, bin/deployer and master.toml. Idempotent."""
    created = trust.secure_dirs(layout.root, layout.dirs(), create=True)
    if not (layout.repo / "HEAD").exists():
        subprocess.run(["git", "init", "-q", "--bare", str(layout.repo)], check=True)
    installed = install and trust.write_file(layout.pyz, _own_zipapp())
    if install:
        trust.write_file(layout.wrapper, wrapper_script(layout, sys.executable), 0o755)
    changes = [] if master_toml is None else _config_changes(layout, master_toml)
    changed = master_toml is not None and trust.write_file(
        layout.master_config, master_toml.encode()
    )
    return answers.SetupResult(
        str(layout.root),
        [str(d) for d in layout.dirs()],
        [str(d) for d in created],
        installed,
        changed,
        changes,
    )


def _config_changes(layout: Layout, new_text: str) -> list[answers.ConfigChange]:
    """Each master option master.toml is about to change, with its old and new value."""
    from deployer.hostapi.options import ConfigError, toml_value
    from deployer.master.config import load_layout_file, load_text

    path = str(layout.master_config)
    if not os.path.lexists(path):
        return []
    try:
        old = load_layout_file(layout.master_config)
    except ConfigError:
        old = {}  # unreadable or untrusted (a symlink): every key counts as changed
    new = load_text(new_text, path)

    def shown(value: Any) -> str:
        return "unset" if value is None else toml_value(value)

    return [
        answers.ConfigChange(key, shown(old.get(key)), shown(new.get(key)))
        for key in dict.fromkeys([*old, *new])
        if old.get(key) != new.get(key)
    ]


WRAPPER = """\
#!/bin/sh
# Written by `deployer setup`: the host agent installed in this deploy_to, run
# by the Python that set it up (not sha256-checked like the controller's calls:
# only the deploy user can write it). `bin/deployer master status|reload|scale|
# stop|upgrade [--role ROLE]` find the master's socket in master.toml, or in
# master-ROLE.toml for a role's master (--socket wins).
py={python}
pyz={pyz}
config={config}
if [ "$1" = master ]; then
  case "$2" in
    status|reload|scale|stop|upgrade)
      command=$2
      shift 2
      if [ "$1" = --role ]; then
        case "$2" in
          [a-z]*) ;;
          *) echo "bin/deployer: --role: expected a role name, got '$2'" >&2; exit 2 ;;
        esac
        case "$2" in
          *[!a-z0-9_-]*) echo "bin/deployer: --role: expected a role name, got '$2'" >&2; exit 2 ;;
        esac
        config="${{config%.toml}}-$2.toml"
        shift 2
        if [ ! -f "$config" ]; then
          echo "bin/deployer: no master for that role here ($config is missing)" >&2
          exit 2
        fi
      fi
      if [ -f "$config" ]; then
        exec "$py" "$pyz" master "$command" --config "$config" "$@"
      fi
      exec "$py" "$pyz" master "$command" "$@"
      ;;
  esac
fi
exec "$py" "$pyz" "$@"
"""


def wrapper_script(layout: Layout, python: str) -> bytes:
    """`<deploy_to>/bin/deployer`: the installed zipapp for an operator on the host."""
    import shlex

    quoted = {  # no path in a comment: a newline in it would end the comment
        "python": shlex.quote(python or "python3"),
        "pyz": shlex.quote(str(layout.pyz)),
        # master.toml: `--role R` makes it master-R.toml
        "config": shlex.quote(str(layout.for_role(None).master_config)),
    }
    return WRAPPER.format(**quoted).encode()


def _own_zipapp() -> bytes:
    """The bytes of the zipapp this code was imported from (the bootstrap's copy)."""
    import deployer

    root = os.path.dirname(os.path.dirname(os.path.abspath(deployer.__file__)))
    if not os.path.isfile(root):
        raise AgentError(f"--install: not running from a zipapp ({root})")
    with open(root, "rb") as f:
        return f.read()
