"""The controller's view of one host: each remote step is a call built by the
host contract (deployer.hostapi.calls), run through the host's transport, its
answer read back as the call's typed record.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from deployer.agent_session import CommandTimeout, SessionEnded, Stdin
from deployer.bundle import Bundle, facts
from deployer.errors import EXIT_BAD_INPUT, EXIT_FAILED, StepFailed, TransportError
from deployer.hostapi import answers, calls
from deployer.hostapi.calls import AgentCall
from deployer.hostapi.layout import Layout
from deployer.hostapi.options import MasterConfig, to_toml
from deployer.inventory import HostConfig, RoleConfig
from deployer.transport import Result, Transport

LineCallback = Callable[[str], None]


@dataclass
class RemoteHost:
    """One inventory host with its transport: what the rollout talks to."""

    config: HostConfig
    transport: Transport
    cpus: int | None = None  # the host's CPU count ("auto" workers), learnt from state()
    # Why the host stopped answering, once it missed a deadline: its further steps
    # (a rollback, cleanup) fail at once instead of each waiting out its own.
    unreachable: str | None = None
    # where a step says what happened to it beside its answer (a retry): the fleet's
    # reporter, with the host's name
    notice: LineCallback | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def layout(self) -> Layout:
        return self.config.layout

    @property
    def master(self) -> MasterConfig | None:
        """The implicit role's master.toml as this controller writes it (no [roles])."""
        return self.config.master_config()

    def master_for(self, role: str | None) -> MasterConfig | None:
        """`role`'s master-<role>.toml (None: master.toml) as this controller writes it."""
        return self.config.master_config(role)

    def role(self, role: str | None) -> RoleConfig:
        return self.config.role(role)

    # --- agent steps ------------------------------------------------------------------

    def call(
        self,
        call: AgentCall,
        stdin: Stdin = None,
        on_line: LineCallback | None = None,
    ) -> Any:
        """Run one agent call within its deadline; its typed answer, or StepFailed
        saying why not."""
        return self._run(call, stdin, on_line)

    def _run(
        self,
        call: AgentCall,
        stdin: Stdin = None,
        on_line: LineCallback | None = None,
        then: AgentCall | None = None,
    ) -> Any:
        """call(); `then`: a call sent right behind it (see _call_then)."""
        if self.unreachable is not None:
            raise StepFailed(self.name, call.op, f"skipped: {self.unreachable}")

        def forward(line: str) -> None:
            if on_line is not None and not line.startswith(answers.RESULT_MARK):
                on_line(line)

        try:
            if call.in_session:
                result = self._in_session(call, stdin, forward, then)
            else:
                argv = call.argv(self.config.ssh.python, self.layout, facts().sha256)
                result = self.transport.run(
                    argv, stdin=stdin, on_stdout=forward, timeout=call.deadline
                )
        except CommandTimeout:
            self.unreachable = f"the host stopped answering ({call.op}: none in {call.deadline:g}s)"
            raise StepFailed(self.name, call.op, self.unreachable) from None
        try:
            answer = answers.parse_result(result.stdout, call.answer)
        except answers.AgentFailed as e:
            raise StepFailed(self.name, call.op, str(e), e.code) from None
        except ValueError as e:
            raise StepFailed(self.name, call.op, f"garbled answer: {e}") from None
        if answer is None:
            why, code = self._no_answer(call, result)
            raise StepFailed(self.name, call.op, why, code)
        return answer

    def _call_then(self, call: AgentCall, then: AgentCall) -> Any:
        """`call`, with `then` sent right behind it in the same round trip: the next
        call of this host with `then`'s words reads its answer (issue 17: lock and
        state, record and unlock). A one-shot `then` is not sent: just `call`."""
        return self._run(call, then=then if then.in_session else None)

    def _in_session(
        self, call: AgentCall, stdin: Stdin, forward: LineCallback, then: AgentCall | None = None
    ) -> Result:
        """The call as a request of the host's agent session (deployer/agent/session.py):
        the agent's stream and result line, as a one-shot call's Result would hold them."""
        session_argv = calls.session(self.config.ssh.python, self.layout, facts().sha256)
        try:
            try:
                out = self._request(session_argv, call, stdin, forward, then)
            except SessionEnded as e:
                if not (e.relay_gone and call.repeatable):
                    raise
                # deployer's keeper died with the call in flight, not the host: the same
                # call again on a fresh session (through a new keeper, or directly)
                if self.notice is not None:
                    self.notice(f"deployer's keeper went away during {call.op}: asked again")
                out = self._request(session_argv, call, stdin, forward)
        except SessionEnded as e:
            if e.lost:  # the connection dropped, or the agent was killed
                raise StepFailed(
                    self.name,
                    call.op,
                    f"connection lost while running it (it may or may not have completed): "
                    f"{e.lost}",
                ) from None
            # the session's process exited before it answered: BOOTSTRAP's refusals
            # (no agent, another agent, an old python), as a one-shot call meets them
            words = tuple(call.words(self.layout))
            return Result(self.name, words, e.exit_code, e.stdout, e.stderr)
        except TransportError as e:
            if self.transport.lost is not None:  # it dropped before: the one retry failed too
                self.unreachable = f"the connection dropped and could not be reopened: {e}"
                raise StepFailed(self.name, call.op, self.unreachable) from None
            raise
        return Result(self.name, tuple(call.words(self.layout)), 0, out, "")

    def _request(
        self,
        session_argv: list[str],
        call: AgentCall,
        stdin: Stdin,
        forward: LineCallback,
        then: AgentCall | None = None,
    ) -> str:
        """One request on an agent session (`then` sent right behind it): its output.
        A request this call's words were sent ahead as is not asked again: its answer
        is read (lock then state, record then unlock: one round trip each)."""
        words = call.words(self.layout)
        with self.transport.agent_session(session_argv) as session:
            if then is None:
                return session.call(words, stdin, forward, call.deadline)
            rid = session.send(words, stdin)
            session.send_ahead(then.words(self.layout))
            return session.receive(rid, forward, call.deadline)

    def _open_session(self) -> None:
        """Connect and start the host's agent session ahead of its first call (the
        fleet opens every host's at once); what goes wrong, that call reports."""
        if self.unreachable is None:
            self.transport.open_ahead(
                calls.session(self.config.ssh.python, self.layout, facts().sha256)
            )

    def _zipapp(self, *words: str) -> list[str]:
        pyz = str(self.layout.pyz)
        return calls.zipapp(self.config.ssh.python, pyz, facts().sha256, *words)

    def _no_answer(self, call: AgentCall, result: Result) -> tuple[str, int]:
        """Why the agent gave no result line, and the exit code that stands for: a host
        not set up (no agent, another one) is bad configuration, not a failed step."""
        tail = result.stderr_tail(10) or result.stdout[-2000:]
        refused = calls.bootstrap_refusal(result.exit_code, tail, str(self.layout.pyz))
        if refused is not None:
            return refused, EXIT_BAD_INPUT
        what = shlex.join([str(self.layout.pyz), "agent", call.op, *call.args])
        code = EXIT_BAD_INPUT if result.exit_code == EXIT_BAD_INPUT else EXIT_FAILED
        return f"`{what}` exited with {result.exit_code}: {tail}", code

    def install(self, bundle: Bundle) -> answers.SetupResult:
        """Check or create the layout, then install the agent zipapp and master.toml:
        one call, the zipapp on its stdin (no SFTP, nothing written before the
        host has checked that deploy_to is the deploy user's alone). With roles,
        each role's master-<role>.toml is written by `configure` after it."""
        master = self.master
        toml = None if master is None else to_toml(master)
        return self.call(calls.setup(install=True, master_toml=toml), stdin=bundle.data)

    def configure(self, role: str) -> answers.SetupResult:
        """Write a role's master-<role>.toml (if it changed)."""
        master = self.master_for(role)
        toml = None if master is None else to_toml(master)
        return self.call(calls.setup(master_toml=toml, role=role))

    def version(self) -> answers.Version:
        return self.call(calls.version())

    def state(self) -> answers.HostState:
        """The host's releases and its masters (`master_of(role)`)."""
        state: answers.HostState = self.call(calls.state())
        self.cpus = state.cpus
        return state

    def prepare(
        self,
        revision: str,
        release: str,
        pack: bytes | None = None,
        on_line: LineCallback | None = None,
    ) -> answers.PrepareResult:
        """Create the release; `pack` (see sync.pack_for_host), when not None, is
        indexed into repo/ first, in the same call."""
        app = self.config.app
        call = calls.prepare(revision, release, app.shared, app.build, receive=pack is not None)
        return self.call(call, stdin=pack, on_line=on_line)

    def switch(self, release: str, roles: Sequence[str | None] = ()) -> answers.SwitchResult:
        """`current` -> `release`, recorded as the release of `roles` (those switched)."""
        return self.call(calls.switch(release, roles))

    def prune(self) -> answers.PruneResult:
        return self.call(calls.prune(self.config.app.keep_releases))

    def health(self, role: str | None = None) -> answers.HealthResult | None:
        h = self.role(role).health
        if h is None:
            return None
        return self.call(calls.health(h.url, h.expect_status, h.timeout, h.passes, h.interval))

    def status(self, timeout: float, window: float, role: str | None = None) -> answers.HostStatus:
        master, health = self.master_for(role), self.role(role).health
        socket = None if master is None else master.socket
        url, expect = (None, 200) if health is None else (health.url, health.expect_status)
        return self.call(calls.status(socket, url, expect, timeout, window, role))

    def watch(self, seconds: float, window: float = 0.0) -> answers.WatchResult | None:
        """Watch every role's master (crashes, workers not ready) and health check on
        the host for `seconds`, in one call, counting the crashes of the `window`
        seconds before; None if it has none of them."""
        sockets = [str(m.socket) for r in self.config.roles if (m := self.master_for(r.name))]
        urls = [(r.health.url, r.health.expect_status) for r in self.config.roles if r.health]
        if not sockets and not urls:
            return None
        return self.call(calls.watch(seconds, sockets, urls, window))

    def secrets(self, action: str, key: str | None = None, value: str | None = None):
        """`value` (for set) goes on the agent's stdin, never its command line."""
        stdin = None if value is None else value.encode()
        return self.call(calls.secrets(action, key), stdin=stdin)

    def record(self, entry: dict[str, Any]) -> answers.Recorded:
        return self.call(calls.record(entry))

    def lock(
        self,
        action: str,
        owner: answers.LockOwner,
        force: bool = False,
        take_stale: float | None = None,
        replace: str | None = None,
    ) -> answers.LockAnswer:
        return self.call(calls.lock(action, owner, force, take_stale, replace))

    # --- migrations -----------------------------------------------------------------------

    def migrate(
        self,
        words: tuple[str, ...],
        database: str,
        cwd: str,
        on_line: LineCallback | None = None,
        check: bool = True,
    ) -> Result:
        """`deployer migrate ...` (`words`: hostapi.calls.migrate*) on this host, the
        runner of its zipapp; the database URL goes on stdin, so its password is never
        on a command line."""
        argv = self._zipapp(*words)
        stdin = (database + "\n").encode()
        try:
            result = self.transport.run(
                argv, stdin=stdin, cwd=cwd, on_stdout=on_line, timeout=calls.MIGRATE_DEADLINE
            )
        except CommandTimeout:
            self.unreachable = f"migrations ran past {calls.MIGRATE_DEADLINE:g}s"
            raise StepFailed(self.name, "migrations", self.unreachable) from None
        if check and not result.ok:
            why = result.stderr_tail(15) or result.stdout[-2000:]
            raise StepFailed(self.name, f"migrations {' '.join(words[1:4])}", why)
        return result

    # --- the resident master ------------------------------------------------------------

    def _master_config(self, role: str | None) -> MasterConfig:
        cfg = self.master_for(role)
        if cfg is None:
            where = "[master] section" if role is None else f"[master] for role {role}"
            raise StepFailed(self.name, "master", f"the inventory has no {where}")
        return cfg

    def _master(
        self, words: tuple[str, ...], on_line: LineCallback | None, timeout: float
    ) -> Result:
        argv = self._zipapp(*words)
        result = self.transport.run(argv, on_stdout=on_line, timeout=timeout)
        if not result.ok:
            why = result.stderr_tail(15) or result.stdout[-2000:]
            raise StepFailed(self.name, f"master {words[1]}", f"exit {result.exit_code}: {why}")
        return result

    def _master_timeout(self, role: str | None) -> float:
        """How long starting or reloading every worker may take, at the worst."""
        return self._master_config(role).reload_bound(self.cpus or 16)  # 16: no state() yet

    def start_master(self, on_line: LineCallback | None = None, role: str | None = None) -> Result:
        words = calls.master_start(self.layout.for_role(role))
        return self._master(words, on_line, self._master_timeout(role))

    def reload_master(self, on_line: LineCallback | None = None, role: str | None = None) -> Result:
        timeout = self._master_timeout(role)
        words = calls.master_reload(str(self._master_config(role).socket), timeout)
        return self._master(words, on_line, timeout + 10)

    def upgrade_master(
        self,
        on_line: LineCallback | None = None,
        reconfigure: bool = False,
        role: str | None = None,
    ) -> Result:
        """Re-exec the running master on the agent just installed (same pid, socket and
        workers), on the zipapp in the layout; `reconfigure`: with master.toml's options."""
        socket = str(self._master_config(role).socket)
        words = calls.master_upgrade(socket, self.layout.for_role(role), reconfigure)
        return self._master(words, on_line, 120)

    def scale_master(self, workers: int, role: str | None = None) -> Result:
        socket = str(self._master_config(role).socket)
        return self._master(calls.master_scale(socket, workers), None, self._master_timeout(role))

    def lifecycle(self, action: str, role: str | None = None) -> answers.Lifecycle:
        return self.call(calls.lifecycle(action, role))

    def stop_master(self, role: str | None = None) -> Result:
        return self._master(calls.master_stop(str(self._master_config(role).socket)), None, 120)
