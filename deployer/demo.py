"""`deployer demo`: the whole path on this machine, nothing to prepare.

In a directory: the example app as a git repository, a bare deploy repository
made by `deployer init`, an inventory of two local hosts (own deploy_to, own
loopback address, one port), SQLite migrations. Then `deployer setup`,
`git push deploy main` of v1, and of v2 (an expand and a contract migration)
while a bounded load hits both hosts; a summary table at the end. Every step
is the real command a user would type, run as a child process.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from deployer.errors import BadInput, DeployerError
from deployer.githooks import clean_env
from deployer.hostapi.layout import Layout
from deployer.loadgen import Load, LoadResult

ADDRESSES = {"web1": "127.0.0.1", "web2": "127.0.0.2"}

# The seed's split of fname/lname into name, on SQLite: v1 ships the table, v2
# adds `name` (expand), backfills it in chunks (expand, the file of
# examples/migrations), and drops the old columns (contract) once both hosts
# serve v2.
V1_MIGRATIONS = {
    "20261101000000_create_people.sql": """-- phase: expand
-- up
CREATE TABLE people (id INTEGER PRIMARY KEY, fname TEXT NOT NULL, lname TEXT NOT NULL);
INSERT INTO people (fname, lname) VALUES ('Ada', 'Lovelace'), ('Alan', 'Turing'),
    ('Grace', 'Hopper'), ('Edsger', 'Dijkstra');
-- down
DROP TABLE people;
""",
}
V2_MIGRATIONS = {
    "20261102000000_add_people_name.sql": """-- phase: expand
-- up
ALTER TABLE people ADD COLUMN name TEXT NULL;
-- down
ALTER TABLE people DROP COLUMN name;
""",
    "20261102000200_drop_people_fname_lname.sql": """-- phase: contract
-- up
UPDATE people SET name = fname || ' ' || lname WHERE name IS NULL;
ALTER TABLE people DROP COLUMN fname;
ALTER TABLE people DROP COLUMN lname;
""",
}


BACKFILL = "examples/migrations/migrations/20240602000100_backfill_people_name.py"


def example(rel: str) -> Path:
    """A file of the project's examples/: in the checkout, or installed as data."""
    for base in (Path(__file__).resolve().parent.parent, Path(sys.prefix) / "share" / "deployer"):
        if (base / rel).is_file():
            return base / rel
    raise DeployerError(f"{rel} is not installed with this package")


def free_port() -> int:
    """A port free on every demo address."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for address in ADDRESSES.values():
                with socket.socket() as s:
                    s.bind((address, port))
        except OSError:
            continue
        return port
    raise DeployerError("no free port on 127.0.0.1 and 127.0.0.2")


def inventory_text(base: Path, port: int) -> str:
    hosts = "".join(
        f'[hosts.{name}]\ntransport = "local"\naddress = "{address}"\n\n'
        for name, address in ADDRESSES.items()
    )
    return f"""# Written by `deployer demo`: two hosts on this machine.
[app]
name = "demo"
deploy_to = "{base}/hosts/{{host}}"
keep_releases = 3

[master]
command = [{sys.executable!r}, "app.py"]
listen = "{{address}}:{port}"
workers = 2
ready = "notify"
ready_soak = 0.3
shutdown_timeout = 10
ready_timeout = 10
supervisor = "none"  # demo hosts are temporary: no systemd unit

[health]
url = "http://{{address}}:{port}/health"
timeout = 10
passes = 2
interval = 0.2

[migrations]
dir = "migrations"
database = "sqlite:///demo.sqlite3"
host = "web1"

[rollout]
canary = 1
batch = 1
watch = 2

[ssh]
python = {sys.executable!r}

{hosts}"""


@dataclass
class Demo:
    base: Path
    out: TextIO
    started: float = 0.0
    port: int = 0
    keep: bool = False

    @property
    def app(self) -> Path:
        return self.base / "app"

    @property
    def inventory(self) -> Path:
        return self.base / "inventory.toml"

    def say(self, text: str) -> None:
        self.out.write(f"[{time.monotonic() - self.started:5.1f}s] {text}\n")
        self.out.flush()

    def env(self) -> dict[str, str]:
        env = clean_env()
        env.pop("DEPLOYER_STATE_DIR", None)  # state beside the demo's inventory
        for who in ("AUTHOR", "COMMITTER"):
            env[f"GIT_{who}_NAME"] = "deployer demo"
            env[f"GIT_{who}_EMAIL"] = "demo@localhost"
        return env

    def run(self, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            argv, cwd=cwd or self.base, env=self.env(), capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise DeployerError(
                f"demo step `{' '.join(argv)}` exited {proc.returncode}:\n"
                + (proc.stdout + proc.stderr).strip()
            )
        return proc

    def deployer(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "deployer", "-i", str(self.inventory), *args)

    def commit(self, files: dict[str, str], message: str) -> None:
        for name, text in files.items():
            path = self.app / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.run("git", "add", "-A", cwd=self.app)
        self.run("git", "commit", "-q", "-m", message, cwd=self.app)

    def push(self) -> None:
        """`git push deploy main`; its output (the remote: lines) indented."""
        proc = self.run("git", "push", "deploy", "main", cwd=self.app)
        text = (proc.stdout + proc.stderr).rstrip()
        self.out.write("".join(f"    {line}\n" for line in text.splitlines()))

    def layout(self, host: str) -> Layout:
        return Layout.at(self.base / "hosts" / host)

    def revision(self, host: str) -> str:
        path = self.layout(host).current / "REVISION"
        return path.read_text().strip()[:12] if path.exists() else "-"

    def stop_masters(self) -> None:
        for host in ADDRESSES:
            sock = self.layout(host).socket
            if sock.exists():
                with contextlib.suppress(DeployerError):
                    self.deployer("master", "stop", "--socket", str(sock), "--timeout", "20")


def run(directory: Path | None, keep: bool, out: TextIO) -> int:
    """Run the demo; 0 when both hosts ended on v2 with no failed request."""
    temporary = directory is None
    base = Path(tempfile.mkdtemp(prefix="deployer-demo-")) if directory is None else directory
    base = base.absolute()
    if base.exists() and any(base.iterdir()) and not temporary:
        raise BadInput(f"DIR: {base} is not empty (the demo builds everything in it)")
    demo = Demo(base, out, time.monotonic(), keep=keep)
    try:
        return demo_steps(demo)
    finally:
        if keep:
            demo.say(f"--keep: masters still running; everything is in {base}")
        else:
            demo.stop_masters()
            if temporary:
                shutil.rmtree(base, ignore_errors=True)


def demo_steps(demo: Demo) -> int:
    base, say = demo.base, demo.say
    base.mkdir(parents=True, exist_ok=True)
    port = demo.port = free_port()
    demo.inventory.write_text(inventory_text(base, port))
    say(f"demo in {base}: hosts web1 (127.0.0.1:{port}) and web2 (127.0.0.2:{port})")

    demo.app.mkdir()
    demo.run("git", "init", "-q", "-b", "main", cwd=demo.app)
    app_py = example("examples/python-app/app.py").read_text()
    demo.commit({"app.py": app_py, "VERSION": "v1\n"} | _migrations(V1_MIGRATIONS), "v1")
    bare = base / "deploy.git"
    for line in demo.deployer("init", "--repo", str(bare)).stdout.splitlines():
        say(f"deployer init: {line}")
    demo.run("git", "remote", "add", "deploy", str(bare), cwd=demo.app)
    demo.deployer("setup")
    say("deployer setup: agent installed on web1 and web2")

    say("git push deploy main   # v1")
    demo.push()
    before = {host: demo.revision(host) for host in ADDRESSES}
    if "-" in before.values():
        raise DeployerError("v1 did not reach every host: see the push output above")

    # the example's chunked, resumable backfill works on SQLite as it does on PostgreSQL
    v2 = V2_MIGRATIONS | {"20261102000100_backfill_people_name.py": example(BACKFILL).read_text()}
    demo.commit({"VERSION": "v2\n"} | _migrations(v2), "v2: name instead of fname/lname")
    say("git push deploy main   # v2, while 4 connections per host keep requesting /")
    loads = {h: Load(port, threads=4, duration=60, address=a) for h, a in ADDRESSES.items()}
    with contextlib.ExitStack() as running:  # each load stops (and joins) on the way out
        for load in loads.values():
            running.enter_context(load)
        demo.push()
    results = {h: load.result for h, load in loads.items()}
    after = {host: demo.revision(host) for host in ADDRESSES}
    out_table(demo, before, after, results)
    ok = all(after[h] != before[h] for h in ADDRESSES) and not any(
        r.failed for r in results.values()
    )
    say("demo " + ("ok" if ok else "FAILED") + f" in {time.monotonic() - demo.started:.1f}s")
    return 0 if ok else 1


def _migrations(files: dict[str, str]) -> dict[str, str]:
    return {f"migrations/{name}": text for name, text in files.items()}


def out_table(
    demo: Demo, before: dict[str, str], after: dict[str, str], results: dict[str, LoadResult]
) -> None:
    rows = [["host", "before (v1)", "after (v2)", "requests", "failed"]]
    for host in ADDRESSES:
        r = results[host]
        rows.append([host, before[host], after[host], str(r.sent), str(r.failed)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    demo.out.write("\n")
    for row in rows:
        demo.out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + "\n")
    failures = [f for r in results.values() for f in r.failures[:3]]
    for _, kind, text in failures:
        demo.out.write(f"  failure: {kind}: {text}\n")
    inv = demo.inventory
    if demo.keep:
        demo.out.write(f"\nThe hosts stay up (curl http://127.0.0.1:{demo.port}/). Try next:\n")
    else:
        demo.out.write("\nTry next, after `deployer demo DIR --keep` (this run stops its hosts):\n")
    for command in ("status", "history", "logs", "rollback"):
        demo.out.write(f"  deployer -i {inv} {command}\n")
    demo.out.write("\n")
