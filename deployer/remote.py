"""The controller's view of one host: every remote step built as data, in one place.

Each step is an argument list for the host-side zipapp
(`python3 <deploy_to>/.deployer/deployer.pyz agent|master ...`), run through
the host's transport; agent steps end with one JSON result line.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deployer.agent.bundle import Bundle
from deployer.agent.cli import RESULT_MARK
from deployer.errors import DeployerError
from deployer.inventory import Host as HostConfig
from deployer.transport import Host, Result, Stdin

LineCallback = Callable[[str], None]


class StepFailed(DeployerError):
    """A step on one host failed; says which host, which step, and why."""

    def __init__(self, host: str, step: str, message: str) -> None:
        self.host, self.step, self.reason = host, step, message
        super().__init__(f"{host}: {step} failed: {message}")


@dataclass
class RemoteHost:
    """One inventory host with its transport: what the rollout talks to."""

    config: HostConfig
    transport: Host

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def root(self) -> str:
        return self.config.app.deploy_to

    @property
    def pyz(self) -> str:
        return f"{self.root}/.deployer/deployer.pyz"

    def _zipapp(self, *words: str) -> list[str]:
        return [self.config.ssh.python, self.pyz, *words]

    # --- agent steps ------------------------------------------------------------------

    def agent(
        self,
        op: str,
        *args: str,
        root: bool = True,
        stdin: Stdin = None,
        on_line: LineCallback | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        argv = self._zipapp("agent", op, *(("--root", self.root) if root else ()), *args)

        def forward(line: str) -> None:
            if on_line is not None and not line.startswith(RESULT_MARK):
                on_line(line)

        result = self.transport.run(argv, stdin=stdin, on_stdout=forward, timeout=timeout)
        return self._parse(op, result)

    def _parse(self, op: str, result: Result) -> dict[str, Any]:
        for line in reversed(result.stdout.splitlines()):
            if line.startswith(RESULT_MARK):
                answer = json.loads(line[len(RESULT_MARK) :])
                if not answer.get("ok"):
                    raise StepFailed(self.name, op, answer.get("error", "unknown error"))
                return answer
        tail = result.stderr_tail(10) or result.stdout[-2000:]
        if result.exit_code in (2, 127) and ("No such file" in tail or "can't open" in tail):
            missing = f"the host agent is not installed at {self.pyz}: run `deployer setup`"
            raise StepFailed(self.name, op, missing)
        raise StepFailed(
            self.name, op, f"`{shlex.join(result.argv)}` exited with {result.exit_code}: {tail}"
        )

    def install(self, bundle: Bundle) -> None:
        """Upload the agent zipapp (atomically) and create the layout."""
        self.transport.run(["mkdir", "-p", f"{self.root}/.deployer"], check=True)
        self.transport.put(bundle.data, self.pyz, mode=0o644)
        self.agent("setup")

    def version(self) -> dict[str, Any]:
        return self.agent("version", root=False)

    def state(self) -> dict[str, Any]:
        return self.agent("state")

    def prepare(
        self,
        revision: str,
        release: str,
        pack: bytes | None = None,
        on_line: LineCallback | None = None,
    ) -> dict:
        """Create the release; `pack` (see sync.pack_for_host), when not None, is
        indexed into repo/ first, in the same call."""
        app = self.config.app
        args = ["--revision", revision, "--release", release]
        args += [a for path in app.shared for a in ("--shared", path)]
        if app.build:
            args += ["--build", app.build]
        if pack is not None:
            args.append("--receive")
        return self.agent("prepare", *args, stdin=pack, on_line=on_line)

    def switch(self, release: str) -> dict[str, Any]:
        return self.agent("switch", "--release", release)

    def prune(self) -> dict[str, Any]:
        return self.agent("prune", "--keep", str(self.config.app.keep_releases))

    def health(self) -> dict[str, Any] | None:
        h = self.config.health
        if h is None:
            return None
        args = ["--url", h.url, "--expect", str(h.expect_status), "--timeout", str(h.timeout)]
        args += ["--passes", str(h.passes), "--interval", str(h.interval)]
        return self.agent("health", *args, root=False)

    def record(self, entry: dict[str, Any]) -> dict[str, Any]:
        return self.agent("record", "--entry", json.dumps(entry, sort_keys=True))

    def lock(self, action: str, owner: dict[str, Any]) -> dict[str, Any]:
        return self.agent("lock", action, "--owner", json.dumps(owner, sort_keys=True))

    # --- migrations -----------------------------------------------------------------------

    def migrate(
        self, *args: str, cwd: str, on_line: LineCallback | None = None, check: bool = True
    ) -> Result:
        """`deployer migrate ARGS` on this host (host-side runner from the zipapp)."""
        result = self.transport.run(self._zipapp("migrate", *args), cwd=cwd, on_stdout=on_line)
        if check and not result.ok:
            why = result.stderr_tail(15) or result.stdout[-2000:]
            raise StepFailed(self.name, f"migrations {' '.join(args[:3])}", why)
        return result

    # --- the resident master ------------------------------------------------------------

    @property
    def master_config_path(self) -> str:
        return f"{self.root}/master.toml"

    def master_toml(self) -> str:
        """The host's master.toml: [master] from the inventory, paths of the layout."""
        m = self.config.master
        assert m is not None
        # A string command runs through /bin/sh, `exec` so signals reach the program.
        command = (
            ["/bin/sh", "-c", f"exec {m.command}"]
            if isinstance(m.command, str)
            else list(m.command)
        )
        values: dict[str, Any] = {
            "command": command,
            "workers": m.workers,
            "listen": m.listen,
            "ready": m.ready,
            "stop_signal": m.stop_signal,
            "shutdown_timeout": m.shutdown_timeout,
            "ready_timeout": m.ready_timeout,
            "ready_soak": m.ready_soak,
            "reload_batch": m.reload_batch,
            "listen_fds": m.listen_fds,
            "cwd": f"{self.root}/current",
            "socket": f"{self.root}/run/master.sock",
            "pidfile": f"{self.root}/run/master.pid",
            "log": f"{self.root}/log/master.log",
        }
        lines = [
            "# written by `deployer setup` from the inventory; edits are overwritten",
            "[master]",
        ]
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        return "\n".join(lines) + "\n"

    def write_master_config(self) -> None:
        self.transport.put(self.master_toml().encode(), self.master_config_path)

    def _master(self, *words: str, on_line: LineCallback | None, timeout: float) -> Result:
        argv = self._zipapp("master", *words)
        result = self.transport.run(argv, on_stdout=on_line, timeout=timeout)
        if not result.ok:
            why = result.stderr_tail(15) or result.stdout[-2000:]
            raise StepFailed(self.name, f"master {words[0]}", f"exit {result.exit_code}: {why}")
        return result

    def _master_timeout(self) -> float:
        m = self.config.master
        assert m is not None
        workers = m.workers if isinstance(m.workers, int) else 16
        return workers * (m.ready_timeout + m.ready_soak) + m.shutdown_timeout + 30

    def start_master(self, on_line: LineCallback | None = None) -> Result:
        return self._master(
            "start",
            "--config",
            self.master_config_path,
            on_line=on_line,
            timeout=self._master_timeout(),
        )

    def reload_master(self, on_line: LineCallback | None = None) -> Result:
        timeout = self._master_timeout()
        return self._master(
            "reload",
            "--socket",
            f"{self.root}/run/master.sock",
            "--wait",
            "--timeout",
            str(timeout),
            on_line=on_line,
            timeout=timeout + 10,
        )

    def upgrade_master(self, on_line: LineCallback | None = None) -> Result:
        """Re-exec the running master on the agent just installed (same pid, socket and
        workers): by default it takes the code from where it runs from, the pyz path."""
        sock = f"{self.root}/run/master.sock"
        return self._master("upgrade", "--socket", sock, on_line=on_line, timeout=120)

    def installed_bundle(self) -> str | None:
        """The bundle id of the agent installed on the host (None: none installed)."""
        try:
            return self.version().get("bundle")
        except StepFailed:
            return None

    def stop_master(self) -> Result:
        return self._master(
            "stop", "--socket", f"{self.root}/run/master.sock", on_line=None, timeout=120
        )


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string
