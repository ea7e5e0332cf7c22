"""Build the host-side zipapp from the controller's own installed package (the
files hostapi.manifest lists).

Controller and hosts therefore never run different code: the bundle id is a
hash of exactly the files shipped, and a rollout refuses an agent whose id
differs (run `deployer setup`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import marshal
import os
import sys
import threading
import zipfile
import zlib
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import NamedTuple

from deployer.hostapi.manifest import (
    HOST_DATA,
    HOST_MODULES,
    HOST_PACKAGES,
    ID_FILE,
    IncompleteInstall,
    bundle_id,
)
from deployer.hostapi.manifest import sources as _sources

__all__ = ["HOST_DATA", "HOST_MODULES", "HOST_PACKAGES", "ID_FILE", "IncompleteInstall"]

MAIN = "import sys\nfrom deployer.hostmain import main\n\nsys.exit(main())\n"
FIXED_TIME = (2020, 1, 1, 0, 0, 0)  # deterministic zip bytes for identical sources


@dataclass(frozen=True)
class Bundle:
    id: str
    data: bytes

    @property
    def filename(self) -> str:
        return "deployer.pyz"

    @cached_property
    def sha256(self) -> str:
        """What the hosts check before they run it (hostapi.calls.BOOTSTRAP)."""
        return hashlib.sha256(self.data).hexdigest()


_building = threading.Lock()


def build() -> Bundle:
    """The zipapp, built once per process: the first parallel agent calls of a
    command all ask for it at once, and one build is ~0.1 s of CPU."""
    with _building:
        return _build()


class Facts(NamedTuple):
    id: str
    sha256: str


@cache
def facts() -> Facts:
    """The bundle's id and sha256 (all an agent call needs), without building it
    when this controller built the same sources before: they are cached under
    ~/.cache/deployer, keyed by the sources, this Python and zlib."""
    if _build.cache_info().currsize:  # built in this process already (setup)
        bundle = build()
        return Facts(bundle.id, bundle.sha256)
    sources = _sources()
    key = hashlib.sha256(f"{sys.version}\0{zlib.ZLIB_RUNTIME_VERSION}\0".encode())
    for name, data in sources:
        key.update(name.encode() + b"\0" + data + b"\0")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "deployer" / f"bundle-{key.hexdigest()[:32]}.json"
    try:
        cached = json.loads(path.read_text())
        return Facts(str(cached["id"]), str(cached["sha256"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    bundle = build()
    out = Facts(bundle.id, bundle.sha256)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(out._asdict()))
        os.replace(tmp, path)
    except OSError:
        pass  # no cache: the next command builds again
    return out


@cache
def _build() -> Bundle:
    sources = _sources()
    the_id = bundle_id(sources)
    compiled = [(f"{name}c", _pyc(name, data)) for name, data in sources if name.endswith(".py")]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in [
            ("__main__.py", MAIN.encode()),
            *sources,
            *compiled,
            (ID_FILE, the_id.encode()),
        ]:
            zf.writestr(zipfile.ZipInfo(name, FIXED_TIME), data, zipfile.ZIP_DEFLATED)
    return Bundle(the_id, buf.getvalue())


def _pyc(name: str, source: bytes) -> bytes:
    """Bytecode beside each source: zipimport cannot cache what it compiles, so
    without it every agent call recompiles the agent (~13 ms of its ~60 ms here).
    Unchecked hash-based (PEP 552): valid without an mtime; a host Python of
    another version sees another magic number and falls back to the source."""
    code = compile(source, name, "exec", dont_inherit=True)
    flags = (1).to_bytes(4, "little")  # hash-based, source not checked
    # marshal format 2: no back-references. From format 3 on, marshal marks an object
    # for reuse only if its refcount is above 1, so the bytes (and the sha256 the hosts
    # check) depended on what else this process held: `deployer exec` computed another
    # digest than the `deployer setup` that installed the zipapp.
    return (
        importlib.util.MAGIC_NUMBER
        + flags
        + importlib.util.source_hash(source)
        + marshal.dumps(code, 2)
    )
