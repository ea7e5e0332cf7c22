"""Import rules (pyproject.toml's [tool.importlinter] contracts), checked by import-linter:
the host side imports nothing of the controller's and no third-party package, the
host contract depends on nothing but the standard library, the controller reaches
the host side only through the contract (but for the entry points), and there are
no cycles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 kept, 0 broken" in r.stdout
