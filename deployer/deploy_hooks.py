"""Deploy hooks on the controller: executables in `.deployer/hooks/` beside the inventory.

    pre-deploy      before a rollout takes any lock: a non-zero exit stops it there
                    (exit 1), before anything changes on any host
    post-deploy     after a rollout that went well
    post-rollback   after `deployer rollback` went well, and after a rollout that failed
                    and rolled its switched hosts back
    on-failure      after any rollout or rollback that failed (exit 1)

Each runs in the inventory's directory with the controller's environment plus the
DEPLOYER_* variables of `DeployHooks.env`, its stdin closed, its output shown line by
line (`hook NAME: ...`, control characters escaped), for at most
$DEPLOYER_HOOK_TIMEOUT seconds (default 300; then its process group is killed). A
post hook that fails is reported in one line and changes neither the result nor
the exit code. A rollout that pre-deploy stopped, that never started (bad input, the
lock held: exit 2 or 3) or that was interrupted (Ctrl-C, SIGTERM) runs no other hook.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deployer.errors import EXIT_FAILED, BadInput, DeployerError
from deployer.hostapi import trust
from deployer.report import printable

NAMES = ("pre-deploy", "post-deploy", "post-rollback", "on-failure")
TIMEOUT_ENV = "DEPLOYER_HOOK_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
TAIL = 5  # last output lines a message quotes
MAX_LINE = 64 * 1024  # longer lines are shown in parts
MAX_PERFORMER = 200
# what a hook is told (DeployHooks.env)
VARIABLES = (
    "DEPLOYER_APP", "DEPLOYER_DESTINATION", "DEPLOYER_ACTION", "DEPLOYER_REVISION",
    "DEPLOYER_RELEASE", "DEPLOYER_HOSTS", "DEPLOYER_ROLES", "DEPLOYER_PERFORMER",
    "DEPLOYER_RESULT", "DEPLOYER_DURATION", "DEPLOYER_LOG",
)  # fmt: skip

Say = Callable[[str], None]


def hooks_dir(inventory_path: str | os.PathLike[str]) -> Path:
    return Path(inventory_path).resolve().parent / ".deployer" / "hooks"


class HookRefused(DeployerError):
    """pre-deploy said no: the rollout did not start."""

    exit_code = EXIT_FAILED


@dataclass
class HookRun:
    """How one hook ran: its exit code (None: killed at its time limit) and last lines."""

    name: str
    path: Path
    code: int | None
    seconds: float
    timeout: float
    tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.code == 0

    def outcome(self) -> str:
        if self.code is None:
            return f"was killed after {self.timeout:g}s (its time limit, ${TIMEOUT_ENV})"
        if self.code < 0:
            return f"was killed by signal {-self.code}"
        return f"exited {self.code}"

    def last_lines(self, sep: str) -> str:
        return sep.join(self.tail) if self.tail else "(no output)"


def hook_timeout(env: Mapping[str, str] | None = None) -> float:
    raw = (os.environ if env is None else env).get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (0 < value < float("inf")):
        raise BadInput(f"${TIMEOUT_ENV}: expected a number of seconds > 0, got {raw!r}")
    return value


def run_hook(
    name: str, path: Path, env: Mapping[str, str], cwd: Path, say: Say, timeout: float
) -> HookRun:
    """Run one hook to its end or its time limit, showing its output as it comes."""
    tail: deque[str] = deque(maxlen=TAIL)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            [str(path)],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a time limit kills it all
        )
    except OSError as e:  # no #! line, a bad interpreter, ...
        run = HookRun(name, path, 127, 0.0, timeout, [printable(f"cannot run it: {e}")])
        say(f"hook {name}: {run.tail[0]}")
        return run

    def read() -> None:
        assert proc.stdout is not None
        for raw in iter(lambda: proc.stdout.readline(MAX_LINE), b""):  # type: ignore[union-attr]
            line = printable(raw.decode("utf-8", "replace").rstrip("\r\n"))
            tail.append(line)
            say(f"hook {name}: {line}")

    reader = threading.Thread(target=read, daemon=True, name=f"hook-{name}")
    reader.start()
    code: int | None
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        code = None
    except BaseException:  # Ctrl-C: the hook goes with us
        _kill(proc)
        raise
    # what it wrote before it ended; a child it left running may hold the pipe open
    reader.join(2.0)
    return HookRun(name, path, code, time.monotonic() - started, timeout, list(tail))


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# --- who asked for the deploy ---------------------------------------------------------


def performer(env: Mapping[str, str] | None = None) -> str:
    """Who asked for this deploy: $DEPLOYER_PERFORMER; else, on a push over SSH, the
    comment of the authenticated key in ~/.ssh/authorized_keys (or its SHA256
    fingerprint) when sshd exposes it (`ExposeAuthInfo yes` sets $SSH_USER_AUTH), else
    the account and the client's address ($SSH_CONNECTION); else user@host."""
    env = os.environ if env is None else env
    who = env.get("DEPLOYER_PERFORMER", "").strip()
    if not who and env.get("SSH_USER_AUTH"):
        who = _ssh_key_name(Path(env["SSH_USER_AUTH"])) or ""
    if not who and env.get("SSH_CONNECTION"):
        user = env.get("USER") or env.get("LOGNAME") or getpass.getuser()
        who = f"{user}@{env['SSH_CONNECTION'].split()[0]}"
    if not who:
        who = f"{getpass.getuser()}@{socket.gethostname()}"
    return printable(" ".join(who.split()))[:MAX_PERFORMER]


def _ssh_key_name(auth_info: Path) -> str | None:
    """The key that authenticated this SSH session (sshd's ExposeAuthInfo file: lines
    like `publickey ssh-ed25519 AAAA...`): its comment in authorized_keys, else its
    fingerprint."""
    try:
        lines = auth_info.read_text(errors="replace").splitlines()
    except OSError:
        return None
    keys = [ln.split()[2] for ln in lines if ln.startswith("publickey ") and len(ln.split()) > 2]
    if not keys:
        return None
    blob = keys[-1]
    comment = _authorized_comment(Path.home() / ".ssh" / "authorized_keys", blob)
    return comment or fingerprint(blob)


def _authorized_comment(path: Path, blob: str) -> str | None:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        words = line.split()
        if blob in words:
            return " ".join(words[words.index(blob) + 1 :]) or None
    return None


def fingerprint(blob: str) -> str:
    """`SHA256:...` as `ssh-keygen -l` shows it."""
    try:
        raw = base64.b64decode(blob, validate=True)
    except ValueError:
        return "an unreadable ssh key"
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


# --- the hooks of one rollout or rollback ---------------------------------------------


@dataclass
class DeployHooks:
    """The hooks around one rollout or rollback, and what they are told about it."""

    inventory_path: str
    say: Say
    action: str  # "rollout" | "rollback"
    app: str
    destination: str | None
    hosts: Sequence[str]
    revision: str | None = None
    release: str | None = None
    roles: Sequence[str] = ()  # the roles acted on (none: an inventory without [roles])
    log: str | None = None
    performer: str = field(default_factory=lambda: performer())

    @property
    def directory(self) -> Path:
        return hooks_dir(self.inventory_path)

    def env(self, result: str | None = None, duration: float | None = None) -> dict[str, str]:
        ours = {
            "DEPLOYER_APP": self.app,
            "DEPLOYER_DESTINATION": self.destination or "",
            "DEPLOYER_ACTION": self.action,
            "DEPLOYER_REVISION": self.revision or "",
            "DEPLOYER_RELEASE": self.release or "",
            "DEPLOYER_HOSTS": ",".join(self.hosts),
            "DEPLOYER_ROLES": ",".join(self.roles),
            "DEPLOYER_PERFORMER": self.performer,
            "DEPLOYER_RESULT": result or "",
            "DEPLOYER_DURATION": "" if duration is None else f"{duration:.2f}",
            "DEPLOYER_LOG": self.log or "",
        }
        return {**os.environ, **ours}

    def _find(self, name: str) -> Path | None:
        """The hook's file, None if there is none; one that cannot run is refused
        (pre-deploy: a check that silently did not run is worse than none) or
        reported and skipped."""
        path = self.directory / name
        if not path.exists() and not path.is_symlink():
            return None
        if not (path.is_file() and os.access(path, os.X_OK)):
            why = f"{path} is not an executable file (chmod +x it, or remove it)"
        else:
            try:
                trust.check_program(path, f"hook {name}")
                return path
            except (trust.UntrustedPath, OSError) as e:
                why = str(e)
        if name == "pre-deploy":
            raise BadInput(f"hook pre-deploy not run: {why}; nothing was deployed")
        self.say(f"warning: hook {name} not run: {why}")
        return None

    def run(
        self, name: str, result: str | None = None, duration: float | None = None
    ) -> HookRun | None:
        path = self._find(name)
        if path is None:
            return None
        timeout = hook_timeout()
        self.say(f"hook {name}: running {path}")
        cwd = Path(self.inventory_path).resolve().parent
        return run_hook(name, path, self.env(result, duration), cwd, self.say, timeout)

    def pre_deploy(self) -> None:
        run = self.run("pre-deploy")
        if run is not None and not run.ok:
            raise HookRefused(
                f"pre-deploy hook {run.path} {run.outcome()}: {self.action} not started, "
                f"nothing changed on any host; its last lines:\n  " + run.last_lines("\n  ")
            )

    def finished(self, ok: bool, rolled_back: bool, duration: float) -> None:
        """The post hooks for how it ended; a failing one is reported, nothing else."""
        names = []
        if ok:
            names.append("post-deploy" if self.action == "rollout" else "post-rollback")
        else:
            names += ["post-rollback"] if rolled_back else []
            names.append("on-failure")
        result = "ok" if ok else "failed"
        for name in names:
            try:
                run = self.run(name, result, duration)
            except BadInput as e:  # $DEPLOYER_HOOK_TIMEOUT
                self.say(f"warning: hook {name} not run: {e}")
                continue
            if run is not None and not run.ok:
                self.say(
                    f"warning: hook {name} {run.outcome()} (the {self.action}'s result "
                    f"stands: {result}); last lines: {run.last_lines(' | ')}"
                )

    @contextlib.contextmanager
    def on_error(self, started: float) -> Iterator[None]:
        """on-failure for a flow that failed by an exception (exit 1): not for bad
        input or a held lock (it never started), nor for Ctrl-C or SIGTERM."""
        try:
            yield
        except DeployerError as e:
            if e.exit_code == EXIT_FAILED:
                self.finished(False, False, time.monotonic() - started)
            raise
