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

    def receive(self, pack: bytes, revisions: list[str]) -> dict[str, Any]:
        args = [a for rev in revisions for a in ("--revision", rev)]
        return self.agent("receive", *args, stdin=pack)

    def prepare(self, revision: str, release: str, on_line: LineCallback | None = None) -> dict:
        app = self.config.app
        args = ["--revision", revision, "--release", release]
        args += [a for path in app.shared for a in ("--shared", path)]
        if app.build:
            args += ["--build", app.build]
        return self.agent("prepare", *args, on_line=on_line)

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
