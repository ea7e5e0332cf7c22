"""What the host zipapp is made of, and its id: the files shipped (standard library
only, and deployer/_vendor: pure-Python stand-ins for stdlib modules an older host
Python lacks) and a hash of exactly those. The controller builds the zipapp from
them (deployer/bundle.py); an agent run from a source tree names itself by them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import deployer
from deployer.hostapi.errors import DeployerError

HOST_PACKAGES = ("hostapi", "agent", "master", "migrations", "_vendor")
HOST_DATA = ("_vendor/tomli/LICENSE",)  # shipped with the vendored code it covers
HOST_MODULES = ("__init__.py", "hostmain.py")
ID_FILE = "deployer/agent/BUNDLE_ID"


class IncompleteInstall(DeployerError):
    """This controller's install lacks a file the host agent is built from."""


def sources() -> list[tuple[str, bytes]]:
    """Each shipped file: its name in the zipapp and its bytes."""
    root = Path(deployer.__file__).parent
    files = [root / m for m in HOST_MODULES]
    for pkg in HOST_PACKAGES:
        files += sorted(p for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    files += [root / d for d in HOST_DATA]
    try:
        return [(f"deployer/{f.relative_to(root).as_posix()}", f.read_bytes()) for f in files]
    except OSError as e:
        raise IncompleteInstall(
            f"this install of deployer ({root}) cannot build the host agent: {e.filename}:"
            f" {e.strerror}. The package was installed without its data files; reinstall"
            " it from a release or a checkout (pip install --force-reinstall PATH)"
        ) from None


def bundle_id(shipped: list[tuple[str, bytes]]) -> str:
    """The version and a hash of exactly the files shipped."""
    digest = hashlib.sha256()
    for name, data in shipped:
        digest.update(name.encode() + b"\0" + data + b"\0")
    return f"{deployer.__version__}+{digest.hexdigest()[:12]}"
