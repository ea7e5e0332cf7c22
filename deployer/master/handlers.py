"""The control socket as the arbiter serves it: clients, and their commands.

Each client is a non-blocking Connection in the arbiter's selector. A request
is one JSON line; its command's handler answers, possibly with progress
events first (see control.py for the protocol):

    status   the master, its workers, reloads and crash loops
    reload   replace every worker (reload.py); progress until ok or error
    scale N  set the worker count
    stop     graceful stop; answered once every worker is gone
    handover give the listening socket to a new master, which then says stop
    upgrade  re-exec the master in place on new code (upgrade.py); the new
             master answers

`ControlHandlers` is a mixin of the Arbiter.
"""

from __future__ import annotations

import os
import selectors
import signal
import time
from typing import Any

from deployer.hostapi.options import taken_by
from deployer.master import handover, reexec
from deployer.master.config import MasterConfig
from deployer.master.control import Connection
from deployer.master.worker import Worker, rss_bytes


class ControlHandlers:
    """Arbiter mixin: control clients (conns) and the commands they send."""

    conns: dict[int, Connection]  # every client, by fd
    stop_waiters: list[Connection]  # told when the master has stopped
    upgrade_requester: Connection | None  # on a resumed master: who asked for the upgrade

    # --- clients ---

    def accept_control(self, mask: int) -> None:
        assert self.control is not None
        while True:
            conn = self.control.accept()
            if conn is None:
                return
            if isinstance(conn, str):
                self.log.master(conn)
                continue
            self.conns[conn.fileno()] = conn
            self.watch_connection(conn)

    def watch_connection(self, conn: Connection) -> None:
        self.selector.register(conn, selectors.EVENT_READ, lambda mask: self.serve(conn, mask))

    def serve(self, conn: Connection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            conn.flush()
        if not mask & selectors.EVENT_READ:
            return
        requests = conn.read_requests()
        if requests is None:
            conn.closed = True
            return
        for message in requests:
            self.handle_request(conn, message)

    def update_connections(self) -> None:
        """Watch for writability only while a client has output waiting; drop the gone."""
        for fd, conn in list(self.conns.items()):
            if conn.closed:
                self.drop_connection(fd, conn)
                continue
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.wants_write else 0)
            if self.selector.get_key(conn).events != events:
                self.selector.modify(conn, events, self.selector.get_key(conn).data)

    def drop_connection(self, fd: int, conn: Connection) -> None:
        self.selector.unregister(conn)
        conn.sock.close()
        del self.conns[fd]
        self.unsubscribe(conn)
        if conn in self.stop_waiters:
            self.stop_waiters.remove(conn)

    def adopt_connections(self, conns: list[dict[str, Any]]) -> None:
        """On a resumed master: the clients the previous one had (upgrade state)."""
        for d in conns:
            conn = Connection.from_state(d)
            self.conns[d["fd"]] = conn
            if d["requester"]:
                self.upgrade_requester = conn

    def flush_connections(self, timeout: float) -> None:
        """Last words to every client (before the master exits or re-execs)."""
        for conn in self.conns.values():
            conn.flush_blocking(timeout)

    # --- commands ---

    def handle_request(self, conn: Connection, message: dict[str, Any]) -> None:
        handlers = {
            "status": self.control_status,
            "reload": self.control_reload,
            "scale": self.control_scale,
            "stop": self.control_stop,
            "upgrade": self.request_upgrade,
            "handover": self.control_handover,
        }
        cmd = message.get("cmd")
        handler = handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            expected = ", ".join(handlers)
            conn.send({"ok": False, "error": f"unknown command {cmd!r} (expected {expected})"})
            return
        handler(conn, message)

    def control_status(self, conn: Connection, message: dict[str, Any]) -> None:
        conn.send({"ok": True, "status": self.status()})

    def control_reload(self, conn: Connection, message: dict[str, Any]) -> None:
        self.request_reload(conn)

    def control_scale(self, conn: Connection, message: dict[str, Any]) -> None:
        n = message.get("workers")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            conn.send({"ok": False, "error": f"scale: expected a positive integer, got {n!r}"})
            return
        if self.stopping:
            conn.send({"ok": False, "error": "the master is stopping"})
            return
        was = self.target
        self.set_target(n)
        answer = {"ok": True, "workers": n, "was": was}
        if self.job is not None:
            answer["note"] = "applied when the running reload ends"
        conn.send(answer)

    def control_stop(self, conn: Connection, message: dict[str, Any]) -> None:
        conn.send({"event": "stopping", "pid": os.getpid()})
        self.stop_waiters.append(conn)
        self.begin_stop("stop requested")

    def control_handover(self, conn: Connection, message: dict[str, Any]) -> None:
        """A new master (`master run`, a systemd unit) takes over: handover.py."""
        handover.give(self, conn)

    # --- upgrade: the old master's side (the new one's is upgrade.py) ---

    def request_upgrade(self, conn: Connection, message: dict[str, Any]) -> None:
        """Check the new code, then re-exec in place; the new master answers `conn`."""
        code = message.get("code") or reexec.code_root()
        refusal = self.upgrade_refusal(code)
        config = self.cfg.to_dict()
        if refusal is None and message.get("config") is not None:
            config, refusal = self.reconfigured(message["config"])
        if refusal is not None:
            conn.send({"ok": False, "error": f"upgrade refused: {refusal}"})
            return
        conn.send(
            {
                "event": "checking",
                "code": code,
                "message": f"checking that the code in {code} can adopt this master",
            }
        )
        error = reexec.preflight(self.upgrade_state(conn, code, config), code)
        if error is not None:
            error = f"the new code in {code} failed its check, nothing changed: {error}"
            self.log.master(f"upgrade: {error}")
            conn.send({"ok": False, "error": error})
            return
        conn.send(
            {
                "event": "exec",
                "pid": os.getpid(),
                "message": f"check passed; master {os.getpid()} re-execs on {code}",
            }
        )
        self.log.master(f"upgrade: re-exec in place on {code}")
        self.flush_connections(1.0)  # nothing left in our buffers: the new master has none
        # A fresh state, not the checked one: workers and clients may have moved
        # while the check ran in its subprocess.
        failure = reexec.reexec(self.upgrade_state(conn, code, config), code)
        signal.set_wakeup_fd(self.wake_w)  # only reached if exec failed
        self.log.master(f"upgrade: exec failed, still on the old code: {failure}")
        conn.send({"ok": False, "error": f"exec failed, nothing changed: {failure}"})

    def upgrade_refusal(self, code: Any) -> str | None:
        if self.stopping:
            return "the master is stopping"
        if self.job is not None or self.queued is not None:
            return "a reload is running; upgrade once it has ended"
        if not self.announced:
            return "the workers are not all ready yet"
        if not isinstance(code, str) or not os.path.exists(code):
            # a directory holding the package, or the zipapp deployer setup installs
            return f"code {code!r} does not exist"
        return None

    def upgrade_state(
        self, requester: Connection, code: str, config: dict[str, Any]
    ) -> dict[str, Any]:
        return reexec.new_state({**self.to_state(requester), "config": config}, code)

    def reconfigured(self, config: Any) -> tuple[dict[str, Any], str | None]:
        """The options the re-exec'd master takes instead of its own (master.toml as
        setup rewrote it), or why it cannot: what is bound or named at start stays."""
        try:
            new = MasterConfig.from_dict(config)
        except (TypeError, ValueError, KeyError) as e:
            return {}, f"not a master configuration: {e}"
        moved = [k for k in taken_by("restart") if getattr(new, k) != getattr(self.cfg, k)]
        if moved:
            what = ", ".join(
                f"{k} {shown(getattr(self.cfg, k))} -> {shown(getattr(new, k))}" for k in moved
            )
            return {}, f"{what}: takes a restart of the master, not an upgrade"
        return new.to_dict(), None

    def answer_upgrade(self, state: dict[str, Any]) -> None:
        """On the re-exec'd master: tell the client that asked how the upgrade went."""
        pause = round(time.monotonic() - state["saved_at"], 3)
        requester, self.upgrade_requester = self.upgrade_requester, None
        if state["adopt_error"] is None:
            self.upgrades += 1
            text = f"upgraded in place: pid {os.getpid()}, code {reexec.code_root()}"
            self.log.master(f"{text}, {len(self.workers)} workers adopted, exec took {pause}s")
            answer = {
                "ok": True,
                "pid": os.getpid(),
                "code": reexec.code_root(),
                "workers": sorted(self.workers),
                "upgrades": self.upgrades,
                "seconds": pause,
            }
        else:
            error = (
                f"the new code in {state['code']['next']} could not adopt the master"
                f" ({state['adopt_error']}); back on the previous code {reexec.code_root()},"
                " nothing changed"
            )
            self.log.master(f"upgrade failed: {error}")
            answer = {"ok": False, "error": error, "pid": os.getpid()}
        if requester is not None:
            requester.send(answer)
        self.systemd.send(
            READY=1, STATUS=f"upgrade {'ok' if answer['ok'] else 'failed'}", MAINPID=os.getpid()
        )

    # --- status ---

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        workers = sorted(self.workers.values(), key=lambda w: (w.id, w.started_mono))
        ready = sum(1 for w in workers if w.state == "ready")
        return {
            "pid": os.getpid(),
            "state": self.state_name(ready),
            # None (and no socket copies) for a master without a listening socket
            "listen": self.listen_address(),
            "listen_fds": 0 if self.listener is None else self.cfg.listen_fds,
            "release": self.pinned.release,
            "generation": self.pinned.generation,
            "configured": self.target,
            "ready": ready,
            "ready_mode": str(self.cfg.ready),
            "config": self.cfg.describe(),
            "started_at": iso(self.started),
            "rss": rss_bytes(os.getpid()),
            "reloads": self.counts["reloads"],
            "failed_reloads": self.counts["failed_reloads"],
            "crashes": self.counts["crashes"],
            # each with "at" (epoch seconds): a rollout's watch counts those after it began
            "recent_crashes": [{**c, "when": iso(c["at"])} for c in self.crash_log],
            "upgrades": self.upgrades,
            "reload": None
            if self.job is None
            else {"id": self.job.id, "reverting": self.job.reverting},
            "reload_queued": self.queued is not None,
            "last_reload": self.last_reload,
            "workers": [self.describe_worker(w, now) for w in workers],
            "crash_loops": [
                {
                    "id": s.id,
                    "crashes_in_a_row": s.crash_streak,
                    "restart_in": round(max(0.0, s.respawn_at - now), 1) if s.worker is None else 0,
                }
                for s in self.slots.values()
                if s.crash_streak >= 2
            ],
        }

    def state_name(self, ready: int) -> str:
        if self.stopping:
            return "stopping"
        if ready < self.target:
            return "degraded" if self.announced else "starting"
        return "reloading" if self.job else "running"

    def describe_worker(self, w: Worker, now: float) -> dict[str, Any]:
        slot = self.slots.get(w.id)
        role = "replacement" if slot is not None and slot.replacement is w else "worker"
        return {
            "id": w.id,
            "pid": w.pid,
            "state": w.state,
            "role": role,
            "release": w.spec.release,
            "generation": w.spec.generation,
            "started_at": iso(w.started_at),
            "uptime": round(now - w.started_mono, 1),
            "restarts": slot.restarts if slot is not None else 0,
            "rss": w.rss_bytes(),
            "status": w.status_text or None,
        }


def shown(value: Any) -> str:
    """An option's value in a message: an unset one (no listen, say) as `unset`."""
    return "unset" if value is None else str(value)


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
