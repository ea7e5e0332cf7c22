"""A fleet session: the selected hosts of an inventory, their connections and
the reporter, for one command (setup, status, rollout, rollback, unlock...).

    with FleetSession(inventory, hosts, state_dir) as fleet:
        results, failures = fleet.each(fleet.names, lambda host: host.state())
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from deployer.errors import EXIT_FAILED, DeployerError
from deployer.history import History
from deployer.hostpool import HostPool
from deployer.inventory import HostConfig, Inventory
from deployer.remote import RemoteHost
from deployer.report import Reporter, reporter_for

OPEN_AT_ONCE = 32  # connections (and agent sessions) opened in parallel at the start


@dataclass
class RunState:
    """What one command did so far, beside the fleet it works on (FleetSession)."""

    exit_codes: dict[str, int] = field(default_factory=dict)  # host -> its last failure's
    errors: dict[str, DeployerError] = field(default_factory=dict)  # host -> it, as raised
    # host -> the release its `current` was last switched to by this command
    switched_to: dict[str, str] = field(default_factory=dict)
    # host -> when (time.monotonic) that switch, or a reload without one, began
    switched_at: dict[str, float] = field(default_factory=dict)
    # the deploy locks held: a deployer.lock.FleetLocks (not imported: lock imports this)
    locks: Any = None


class GroupResult(NamedTuple):
    """A step run on many hosts (FleetSession.each): what each host that succeeded
    returned, and why each one that failed did. Unpacks as (succeeded, failed)."""

    succeeded: dict[str, Any]
    failed: dict[str, str]


class FleetSession:
    def __init__(
        self,
        inventory: Inventory,
        hosts: Sequence[HostConfig],
        state_dir: Path,
        reporter: Reporter | None = None,
        lock_wait: float = 0.0,
    ) -> None:
        self.inventory = inventory
        self.reporter = reporter or reporter_for()
        self.state_dir = state_dir
        self.lock_wait = lock_wait
        self.verbose = False  # say each worker's reload progress, not one line a reload
        from deployer import keeper

        self.pool = HostPool(relay=keeper.open_session)  # for hosts with [ssh] persist
        self.remotes = {h.name: RemoteHost(h, self.pool.get(h)) for h in hosts}
        for remote in self.remotes.values():
            remote.notice = partial(self._notice, remote.name)
        self.history = History(state_dir)
        self.run = RunState()  # what this command did so far

    def _notice(self, host: str, text: str) -> None:
        self.reporter.say(text, host)  # the reporter of now: the CLI may replace it

    def __enter__(self) -> FleetSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def names(self) -> list[str]:
        return list(self.remotes)

    @property
    def role_names(self) -> list[str]:
        """The roles of the selected hosts (--roles narrows them), in inventory order."""
        found = {r: None for remote in self.remotes.values() for r in remote.config.role_names}
        return list(found)

    def open_all(self, names: Sequence[str] | None = None) -> None:
        """Connect to every host and start its agent session now, OPEN_AT_ONCE at a time,
        in the background: every phase then finds them open. Daemon threads: a host
        that hangs in its handshake never keeps the command from ending."""
        from deployer.bundle import facts

        facts()  # once, before the threads all want it
        todo = list(self.remotes.values() if names is None else map(self.remotes.get, names))
        gate = threading.Semaphore(OPEN_AT_ONCE)

        def run(remote: RemoteHost) -> None:
            opener = getattr(remote, "_open_session", None)  # tests give fakes
            with gate:
                if opener is not None:
                    opener()

        for remote in todo:
            if remote is not None:
                threading.Thread(target=run, args=(remote,), daemon=True).start()

    def each(
        self, names: Sequence[str], fn: Callable[[RemoteHost], Any], limit: int | None = None
    ) -> GroupResult:
        """fn on each host in parallel: what each returned, and why each failed."""
        results: dict[str, Any] = {}
        failures: dict[str, str] = {}
        if not names:
            return GroupResult(results, failures)
        workers = min(len(names), limit or self.inventory.rollout.parallel)
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            futures = {n: pool.submit(fn, self.remotes[n]) for n in names}
            for name, fut in futures.items():
                try:
                    results[name] = fut.result()
                except DeployerError as e:
                    failures[name] = self.failed(name, e)
                    self.reporter.say(f"FAILED: {failures[name]}", name)
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: the caller puts things back now, not once every
            # host's step (a hanging health probe) has run to its deadline.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return GroupResult(results, failures)

    def each_within(
        self,
        names: Sequence[str],
        fn: Callable[[RemoteHost], Any],
        seconds: float,
        grace: float = 0.0,
    ) -> GroupResult:
        """fn on every host at once, waiting `seconds` at most: a host that has not
        answered by then (a frozen sshd: even connecting hangs) is a failure, and its
        thread is left behind (a daemon: it never keeps the command from ending).
        `grace`: waited on top for the answer's way back; the message names `seconds`,
        the time the user gave (`status --timeout`)."""
        results: dict[str, Any] = {}
        failures: dict[str, str] = {}
        done = threading.Condition()

        def run(remote: RemoteHost) -> None:
            try:
                value, error = fn(remote), None
            except DeployerError as e:
                value, error = None, self.failed(remote.name, e)
            except Exception as e:  # a bug here, not the host's silence: say which
                traceback.print_exc()
                error = f"internal error on this machine: {type(e).__name__}: {e}"
                value, self.run.exit_codes[remote.name] = None, EXIT_FAILED
            with done:
                if error is None:
                    results[remote.name] = value
                else:
                    failures[remote.name] = error
                done.notify_all()

        for n in names:
            threading.Thread(target=run, args=(self.remotes[n],), daemon=True).start()
        end = time.monotonic() + seconds + grace
        with done:
            while len(results) + len(failures) < len(names) and time.monotonic() < end:
                done.wait(end - time.monotonic())
            for n in names:
                if n not in results and n not in failures:
                    failures[n] = f"no answer within {seconds:g}s (host unreachable?)"
            return GroupResult(dict(results), dict(failures))

    def failed(self, name: str, error: DeployerError) -> str:
        """Record a host's failure (its exit code counts for the command's); why, for a
        line that names the host once itself."""
        self.run.exit_codes[name] = error.exit_code
        self.run.errors[name] = error
        return str(error).removeprefix(f"{name}: ")

    def first_error(self, failures: dict[str, str]) -> DeployerError:
        """The first failed host's error as it was raised, for a step that stops there:
        its message already names the host and the step, its exit code is the host's
        (wrapping the text again would say the step twice and lose the code)."""
        name, why = next(iter(failures.items()))
        return self.run.errors.get(name) or DeployerError(f"{name}: {why}")

    @property
    def exit_code(self) -> int:
        """For a command that failed on some hosts: 2 if any host refused (bad input)."""
        return max(self.run.exit_codes.values(), default=EXIT_FAILED)

    def remote(self, name: str) -> RemoteHost:
        """An inventory host outside the selection (e.g. the migrations host)."""
        config = self.inventory.hosts[name]
        return RemoteHost(config, self.pool.get(config))

    def close(self) -> None:
        self.reporter.close()
        self.pool.close()
