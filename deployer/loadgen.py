"""A bounded keep-alive HTTP load generator (standard library only).

Used by `deployer demo` and the tests to check a zero-downtime claim: every
thread holds one keep-alive connection, reconnects only when the server said
`Connection: close` or after an error (counted as a failure), and the whole
load stops by itself after `duration` seconds.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    ok: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    bodies: Counter[str] = field(default_factory=Counter)  # release=... of each 200
    failures: list[tuple[float, str, str]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures) + sum(n for s, n in self.statuses.items() if s != 200)

    @property
    def sent(self) -> int:
        return self.ok + self.failed

    def summary(self) -> str:
        kinds = Counter(kind for _, kind, _ in self.failures)
        first = self.failures[:5]
        return f"ok={self.ok} statuses={dict(self.statuses)} failures={dict(kinds)} {first}"


class Load:
    """Keep-alive HTTP load from `threads` threads, for at most `duration` seconds."""

    def __init__(
        self,
        port: int,
        threads: int = 8,
        duration: float = 60,
        path: str = "/",
        address: str = "127.0.0.1",
    ) -> None:
        self.port = port
        self.address = address
        self.path = path
        self.deadline = time.monotonic() + duration
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.result = LoadResult()
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        self.stopped.set()
        for t in self.threads:
            t.join(timeout=30)
        return self.result

    def wait_requests(self, n: int, timeout: float = 10) -> None:
        """Block until `n` requests succeeded (the load really runs), or raise."""
        end = time.monotonic() + timeout
        while self.result.ok < n:
            if time.monotonic() > end:
                raise TimeoutError(
                    f"{n} successful requests not seen in {timeout}s: " + self.result.summary()
                )
            time.sleep(0.02)

    def running(self) -> bool:
        return not self.stopped.is_set() and time.monotonic() < self.deadline

    def loop(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while self.running():
            if conn is None:
                conn = http.client.HTTPConnection(self.address, self.port, timeout=10)
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                body = resp.read().decode()
                self.record(resp.status, body)
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                with self.lock:
                    self.result.failures.append((time.time(), type(e).__name__, str(e)))
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def record(self, status: int, body: str) -> None:
        with self.lock:
            self.result.statuses[status] += 1
            if status == 200:
                self.result.ok += 1
                release = body.split("release=")[-1].strip() if "release=" in body else "?"
                self.result.bodies[release] += 1
