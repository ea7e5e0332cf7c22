"""The host zipapp: sources plus bytecode, and a Python of another version still runs it."""

from __future__ import annotations

import io
import json
import subprocess
import zipfile
from pathlib import Path

from deployer.bundle import ID_FILE, build


def _run_version(pyz: Path) -> dict:
    out = subprocess.run(
        ["/usr/bin/python3", str(pyz), "agent", "version"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.split("@@deployer-result", 1)[1])


def test_every_module_ships_with_its_bytecode(tmp_path: Path) -> None:
    bundle = build()
    names = zipfile.ZipFile(io.BytesIO(bundle.data)).namelist()
    sources = [n for n in names if n.endswith(".py") and n != "__main__.py"]
    assert sources and all(f"{n}c" in names for n in sources)
    assert ID_FILE in names
    pyz = tmp_path / "deployer.pyz"
    pyz.write_bytes(bundle.data)
    assert _run_version(pyz)["bundle"] == bundle.id


def test_bytecode_of_another_python_falls_back_to_the_sources(tmp_path: Path) -> None:
    """A host whose Python has another magic number ignores the .pyc files."""
    src = zipfile.ZipFile(io.BytesIO(build().data))
    pyz = tmp_path / "deployer.pyz"
    with zipfile.ZipFile(pyz, "w") as out:
        for info in src.infolist():
            body = src.read(info)
            out.writestr(info, b"\0\0\r\n" + body[4:] if info.filename.endswith(".pyc") else body)
    assert _run_version(pyz)["bundle"] == build().id
