"""Real OpenSSH test hosts: N `sshd` processes on 127.0.0.2, 127.0.0.3, ...

Each "host" is one `sshd -D` on its own loopback address and port, with its own
ed25519 host key and deploy root. One client key logs in to all of them; one
known_hosts file lists them all as `[127.0.0.x]:PORT <key>`.

Login user:
- as root: a dedicated account `deployer-test` (shell /bin/sh, empty home
  /var/lib/deployer-test-home), created once and reused. Logging in as root
  would run root's ~/.bashrc (`pyenv init`) on every command: 8x slower and it
  writes into ~/.pyenv. /bin/sh reads no rc file for non-interactive commands,
  and sshd hands the session only its own minimal environment (AcceptEnv none).
- as any other user: sshd runs as that user and can only log that same user in.
  Caveat: if that user's login shell is bash, its ~/.bashrc runs on every SSH
  command (bash sources it when started by sshd), so the environment is only
  as clean as that file.

Every process started here is tracked by pid and stopped by pid; nothing is
found or killed by name.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
TEST_USER = "deployer-test"
TEST_HOME = Path("/var/lib/deployer-test-home")
PRIVSEP_DIR = Path("/run/sshd")
# Below the kernel's ephemeral range (32768+), so outgoing connections never
# hold a port we want to listen on.
PORT_RANGE = (2200, 32000)
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class SSHDError(RuntimeError):
    pass


@dataclass(frozen=True)
class SSHTestHost:
    name: str
    address: str
    port: int
    user: str
    identity: Path  # client private key (ed25519, no passphrase)
    known_hosts: Path  # lists every host of the set as [address]:port
    root: Path  # deploy root, owned by `user`
    host_key_fingerprint: str  # "SHA256:...", as `ssh-keygen -lf` prints it
    host_public_key: str = ""  # "ssh-ed25519 AAAA..."

    @property
    def known_hosts_line(self) -> str:
        return f"[{self.address}]:{self.port} {self.host_public_key}"

    def ssh_argv(self, *remote: str, known_hosts: Path | None = None) -> list[str]:
        """The real `ssh` client command line for this host, strict host-key checking."""
        return [
            "ssh",
            "-F", "none",  # nothing from ~/.ssh/config or /etc/ssh/ssh_config
            "-i", str(self.identity),
            "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=5",
            "-p", str(self.port),
            f"{self.user}@{self.address}",
            *remote,
        ]  # fmt: skip


@dataclass
class _Server:
    """One sshd: its files and, while running, its process."""

    name: str
    address: str
    port: int
    dir: Path
    proc: subprocess.Popen | None = None
    # connection processes left running by stop(drop_connections=False): (pid, start time)
    orphans: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def host_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"

    @property
    def pid(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        return self.proc.pid


def loopback_address(index: int) -> str:
    """0 -> 127.0.0.2, 252 -> 127.0.0.254, 253 -> 127.0.1.1: never .0, .1 or .255."""
    if index < 253:
        return f"127.0.0.{index + 2}"
    index -= 253
    return f"127.0.{1 + index // 254}.{index % 254 + 1}"


def port_accepts(address: str, port: int, timeout: float = 0.2) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout):
        return True
    return False


def _port_binds(address: str, port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # As sshd binds: connections it closed linger in TIME_WAIT on this port for a
    # minute after a stop, and only SO_REUSEADDR binds past them (a listener still refuses).
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((address, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _banner(address: str, port: int) -> bool:
    """True once sshd answers with its SSH-2.0 banner (listening and keys loaded)."""
    try:
        with socket.create_connection((address, port), timeout=0.5) as s:
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _children(pid: int) -> dict[int, list[int]]:
    """ppid -> [pid] for every process on the machine (Linux /proc)."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # comm may contain spaces and parens: fields resume after the last ')'
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _sshd_descendants(pid: int) -> list[int]:
    """The per-connection sshd processes under a listening sshd (not user commands)."""
    tree, found, todo = _children(pid), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            try:
                comm = Path(f"/proc/{child}/comm").read_text().strip()
            except OSError:
                continue
            if comm == "sshd":
                found.append(child)
                todo.append(child)
    return found


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat: tells a reused pid from the process we saw."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2 :].split()[19]


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    end = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < end:
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)]
        if alive:
            time.sleep(0.01)
    return alive


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def ensure_test_user() -> pwd.struct_passwd:
    """Create (once, under a lock) or repair the dedicated login user; needs root."""
    lock_path = (
        Path("/run/lock" if Path("/run/lock").is_dir() else "/tmp") / "deployer-test-user.lock"
    )
    with open(lock_path, "w") as lock:
        # Several pytest sessions (other engineers, xdist) may get here at once.
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            pw = pwd.getpwnam(TEST_USER)
        except KeyError:
            # -p '*': no password, but not "locked" ('!'), which sshd refuses
            # when UsePAM is off. No -m: an empty home, no /etc/skel rc files.
            subprocess.run(
                ["useradd", "--user-group", "--no-create-home", "--home-dir", str(TEST_HOME),
                 "--shell", "/bin/sh", "--password", "*", TEST_USER],
                check=True, capture_output=True,
            )  # fmt: skip
            pw = pwd.getpwnam(TEST_USER)
        if pw.pw_shell != "/bin/sh":
            subprocess.run(["usermod", "--shell", "/bin/sh", TEST_USER], check=True)
        if _shadow_locked(TEST_USER):
            subprocess.run(["usermod", "--password", "*", TEST_USER], check=True)
        pw = pwd.getpwnam(TEST_USER)
        home = Path(pw.pw_dir)
        # sshd prints "Could not chdir to home directory" on every command without it
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        home.chmod(0o755)
        return pw


def _shadow_locked(user: str) -> bool:
    try:
        for line in Path("/etc/shadow").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == user:
                return rest.startswith("!")
    except OSError:
        pass
    return False


class SSHDFleet:
    """Starts, stops and restarts sshd test hosts; tears down only what it started."""

    def __init__(self, base: Path | None = None) -> None:
        # Not pytest's tmp_path: /tmp/pytest-of-root is 0700, and the login user
        # must traverse this tree to read authorized_keys and write deploy roots.
        self.base = Path(base or tempfile.mkdtemp(prefix="deployer-sshd-"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        self.as_root = os.geteuid() == 0
        self._servers: dict[tuple[str, int], _Server] = {}
        self._count = 0
        self._copies = 0
        self._pw: pwd.struct_passwd | None = None
        self._client: Path | None = None
        self.known_hosts = self.base / "known_hosts"
        # Safety net if the fixture's teardown never runs; stops only our pids.
        atexit.register(self.kill_all)

    # --- setup -------------------------------------------------------------------------

    @property
    def pw(self) -> pwd.struct_passwd:
        if self._pw is None:
            if self.as_root:
                self._pw = ensure_test_user()
                # sshd running as root refuses to start without its privsep chroot
                PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
            else:
                self._pw = pwd.getpwuid(os.geteuid())
        return self._pw

    @property
    def user(self) -> str:
        return self.pw.pw_name

    @property
    def identity(self) -> Path:
        if self._client is None:
            self._keygen([self.base / "client" / "id_ed25519"])
            key = self.base / "client" / "id_ed25519"
            authorized = self.base / "authorized_keys"
            authorized.write_text(key.with_suffix(".pub").read_text())
            # sshd reads it as the login user
            authorized.chmod(0o644)
            self._client = key
        return self._client

    def _keygen(self, keys: Sequence[Path]) -> None:
        """Generate ed25519 keys without passphrase, in parallel (ssh-keygen is ~10 ms)."""
        procs = []
        for key in keys:
            key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            key.unlink(missing_ok=True)
            key.with_suffix(".pub").unlink(missing_ok=True)
            procs.append(subprocess.Popen(
                [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", key.parent.name,
                 "-f", str(key)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            ))  # fmt: skip
        for key, proc in zip(keys, procs, strict=True):
            out, _ = proc.communicate()
            if proc.returncode:
                raise SSHDError(f"ssh-keygen for {key} failed: {out.decode(errors='replace')}")

    def _config_text(self, server: _Server) -> str:
        lines = [
            f"ListenAddress {server.address}:{server.port}",
            f"HostKey {server.host_key}",
            f"PidFile {server.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.base / 'authorized_keys'}",
            # temp dirs have owners/modes StrictModes would reject now and then
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            f"AllowUsers {self.user}",
            "Subsystem sftp internal-sftp",  # fabric's put() is SFTP
            # No AcceptEnv line (it takes no empty value): the built-in default accepts
            # nothing, so the client's LANG/LC_* (Debian's SendEnv) stay on the client.
            "PermitUserEnvironment no",
            "MaxStartups 100:30:200",  # parallel deploys open many connections at once
            "MaxSessions 50",
            "LogLevel ERROR",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
        ]
        if self.as_root:
            lines.append("PermitRootLogin no")
        return "\n".join(lines) + "\n"

    def _make_root(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            os.chown(path, self.pw.pw_uid, self.pw.pw_gid)
            # the parent too, so a test can also create siblings as the login user
            os.chown(path.parent, self.pw.pw_uid, self.pw.pw_gid)
        return path

    # --- processes ---------------------------------------------------------------------

    def start(self, n: int) -> list[SSHTestHost]:
        """Start n new hosts in parallel; returns when every one answers with a banner."""
        self.identity  # noqa: B018 -- client key and authorized_keys first
        self.pw  # noqa: B018 -- user and /run/sshd
        servers = []
        for _ in range(n):
            name = f"host{self._count + 1}"
            servers.append(
                _Server(name, loopback_address(self._count), 0, self.base / "sshd" / name)
            )
            self._count += 1
        self._keygen([s.host_key for s in servers])
        pending = servers
        try:
            for _attempt in range(5):
                for s in pending:
                    s.port = self._free_port(s.address)
                    s.config.write_text(self._config_text(s))
                    self._spawn(s)
                # Lost a race for the port with another session: retry those on new ports.
                pending = [s for s in pending if not self._wait_ready(s, retry_on_bind=True)]
                if not pending:
                    break
            else:
                raise SSHDError(f"could not bind sshd for {[s.name for s in pending]}")
        except BaseException:
            # not yet in self._servers, so kill_all() would not find the ones that did start
            for s in servers:
                self._kill(s)
            raise
        for s in servers:
            self._servers[(s.address, s.port)] = s
        self._write_known_hosts(self.known_hosts, [self._host(s) for s in servers], append=True)
        return [self._host(s, known_hosts=self.known_hosts) for s in servers]

    def _free_port(self, address: str) -> int:
        # A random start keeps concurrent test sessions on the same addresses apart.
        lo, hi = PORT_RANGE
        start = random.randrange(lo, hi)
        for i in range(hi - lo):
            port = lo + (start - lo + i) % (hi - lo)
            if (address, port) not in self._servers and _port_binds(address, port):
                return port
        raise SSHDError(f"no free port on {address}")

    def _spawn(self, s: _Server) -> None:
        with open(s.log, "ab") as log:
            s.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(s.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                # sshd passes none of its own environment on; keep it minimal anyway
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                start_new_session=True,  # a Ctrl-C in pytest must not hit it first
            )  # fmt: skip

    def _wait_ready(self, s: _Server, retry_on_bind: bool = False) -> bool:
        assert s.proc is not None
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            if s.proc.poll() is not None:
                log = _tail(s.log)
                s.proc = None
                if retry_on_bind and ("Address already in use" in log or "Cannot bind" in log):
                    return False
                raise SSHDError(f"sshd {s.name} ({s.address}:{s.port}) exited:\n{log}")
            if _banner(s.address, s.port):
                return True
            time.sleep(0.005)
        self._kill(s)
        raise SSHDError(f"sshd {s.name} ({s.address}:{s.port}) not ready:\n{_tail(s.log)}")

    def _server(self, host: SSHTestHost) -> _Server:
        try:
            return self._servers[(host.address, host.port)]
        except KeyError:
            raise SSHDError(
                f"{host.name} ({host.address}:{host.port}) is not in this fleet"
            ) from None

    def pid(self, host: SSHTestHost) -> int | None:
        """The listening sshd's pid, None while the host is stopped."""
        return self._server(host).pid

    def running(self, host: SSHTestHost) -> bool:
        return self.pid(host) is not None

    def stop(self, host: SSHTestHost, drop_connections: bool = True) -> None:
        """SIGTERM the host's sshd by pid; return once its port refuses connections.

        drop_connections (default): also end the sshd processes serving open
        connections, as if the host went away; commands they started keep running.
        False: only the listener stops (like `systemctl stop ssh`), sessions live on.
        """
        s = self._server(host)
        self._kill(s, drop_connections)
        end = time.monotonic() + STOP_TIMEOUT
        while port_accepts(s.address, s.port):
            if time.monotonic() > end:
                raise SSHDError(f"{s.address}:{s.port} still accepts after stopping {s.name}")
            time.sleep(0.01)

    def _kill(self, s: _Server, drop_connections: bool = True) -> None:
        if s.proc is None:
            if drop_connections and s.orphans:
                left = [pid for pid, started in s.orphans if _start_time(pid) == started]
                _signal(left, signal.SIGTERM)
                _signal(_wait_gone(left, 2.0), signal.SIGKILL)
                s.orphans = []
            return
        # Children first collected: once the listener is gone they are orphans.
        sessions = _sshd_descendants(s.proc.pid)
        if drop_connections:
            sessions += [pid for pid, started in s.orphans if _start_time(pid) == started]
            s.orphans = []
        else:
            s.orphans += [(pid, _start_time(pid)) for pid in sessions]
            sessions = []
        _signal([s.proc.pid, *sessions], signal.SIGTERM)
        try:
            s.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()
        left = _wait_gone(sessions, 2.0)
        _signal(left, signal.SIGKILL)
        s.proc = None

    def restart(self, host: SSHTestHost, new_host_key: bool = False) -> SSHTestHost:
        """Start the host again on the same address and port, with the same host key
        (or a new one: then known_hosts files written before still hold the old key)."""
        s = self._server(host)
        if s.pid is not None:
            self._kill(s)
        if new_host_key:
            self._keygen([s.host_key])
        if not _port_binds(s.address, s.port):
            raise SSHDError(f"{s.address}:{s.port} is taken, cannot restart {s.name}")
        self._spawn(s)
        self._wait_ready(s)
        if new_host_key:
            # the fleet-wide file follows the fleet; per-test copies keep the old key
            self._write_known_hosts(self.known_hosts, self.hosts())
        return dataclasses.replace(
            host,
            host_key_fingerprint=self._fingerprint(s),
            host_public_key=self._public_key(s),
        )

    def ensure_running(self, hosts: Iterable[SSHTestHost]) -> None:
        """Restart any of these hosts that a previous test left stopped."""
        stopped = [h for h in hosts if not self.running(h)]
        for h in stopped:
            s = self._server(h)
            self._spawn(s)
        for h in stopped:
            self._wait_ready(self._server(h))

    def kill_all(self) -> None:
        """Stop every sshd this fleet started (by pid) and its connections."""
        for s in self._servers.values():
            self._kill(s)

    def cleanup(self) -> None:
        self.kill_all()
        shutil.rmtree(self.base, ignore_errors=True)

    # --- host records ------------------------------------------------------------------

    def _public_key(self, s: _Server) -> str:
        fields = s.host_key.with_suffix(".pub").read_text().split()
        return f"{fields[0]} {fields[1]}"

    def _fingerprint(self, s: _Server) -> str:
        # what `ssh-keygen -lf` prints, without a subprocess per host per test
        blob = base64.b64decode(self._public_key(s).split()[1])
        return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")

    def _host(
        self, s: _Server, known_hosts: Path | None = None, root: Path | None = None
    ) -> SSHTestHost:
        return SSHTestHost(
            name=s.name,
            address=s.address,
            port=s.port,
            user=self.user,
            identity=self.identity,
            known_hosts=known_hosts or self.known_hosts,
            root=root or self._make_root(self.base / "roots" / "initial" / s.name),
            host_key_fingerprint=self._fingerprint(s),
            host_public_key=self._public_key(s),
        )

    def _write_known_hosts(
        self, path: Path, hosts: Iterable[SSHTestHost], append: bool = False
    ) -> None:
        with open(path, "a" if append else "w") as f:
            for h in hosts:
                f.write(h.known_hosts_line + "\n")

    def fresh_copies(self, hosts: Sequence[SSHTestHost], label: str = "") -> list[SSHTestHost]:
        """The same sshd hosts with new, empty deploy roots and their own known_hosts
        file (current host keys), so one test's files never leak into the next."""
        self._copies += 1
        tag = f"{self._copies:04d}-{label}"[:80].rstrip("-")
        d = self.base / "roots" / tag
        d.mkdir(parents=True)
        known = d / "known_hosts"
        copies = [self._host(self._server(h), known_hosts=known, root=self._make_root(d / h.name))
                  for h in hosts]  # fmt: skip
        self._write_known_hosts(known, copies)
        return copies

    def hosts(self) -> list[SSHTestHost]:
        return [self._host(s) for s in self._servers.values()]

    def inventory_toml(self, extra: str = "", hosts: Sequence[SSHTestHost] | None = None) -> str:
        return inventory_toml(self.hosts() if hosts is None else hosts, extra)


def _toml_str(value: object) -> str:
    s = str(value)
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def inventory_toml(hosts: Sequence[SSHTestHost], extra: str = "") -> str:
    """`[ssh]` and `[hosts.NAME]` tables for these hosts, after `extra` (e.g. [app]).

    Deploy roots are <dir>/<host name>, so `deploy_to = deploy_to_template(hosts)`
    in [app] gives each host its own root."""
    if not hosts:
        raise ValueError("no hosts")
    first = hosts[0]
    out = [extra.rstrip("\n"), ""] if extra.strip() else []
    out += [
        "[ssh]",
        f"user = {_toml_str(first.user)}",
        f"identity = {_toml_str(first.identity)}",
        f"known_hosts = {_toml_str(first.known_hosts)}",
        "",
    ]
    for h in hosts:
        out += [f"[hosts.{h.name}]", f"address = {_toml_str(h.address)}", f"port = {h.port}"]
        if h.known_hosts != first.known_hosts:
            out.append(f"known_hosts = {_toml_str(h.known_hosts)}")
        out.append("")
    return "\n".join(out)


def deploy_to_template(hosts: Sequence[SSHTestHost]) -> str:
    """`[app] deploy_to` that expands to each host's root ("{host}" is the host name)."""
    parents = {h.root.parent for h in hosts}
    if len(parents) != 1 or any(h.root.name != h.name for h in hosts):
        raise ValueError("hosts do not share one roots directory")
    return str(parents.pop() / "{host}")
