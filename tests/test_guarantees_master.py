"""What the resident master promises during a reload and a crash loop, checked
black-box: real masters, real workers, their control socket and signals.

Every test acts on the master's own events (read from its control socket as
they come: `Stream`) or on its state (`status`, which release answers a
request), never on a sleep. Each is the one that fails when one promise breaks;
bench/break_it.py breaks them one at a time and checks that it does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
from guarantee_helpers import InFlight, Stream
from master_helpers import (
    PYTHON,
    REPO,
    Master,
    Masters,
    Releases,
    free_port,
    pid_alive,
    releases_of,
    wait_for,
)

# --- an old worker drains only after its replacement is ready --------------------------


@pytest.mark.timeout(60)
def test_old_worker_serves_until_its_replacement_is_ready(
    masters: Masters, releases: Releases
) -> None:
    m = masters.start(cwd=releases.current, workers=1)
    (old,) = m.worker_pids()
    releases.make("r2", BOOT_DELAY="4")  # the replacement takes 4 s to listen and be ready
    releases.switch("r2")
    reload = Stream(m.socket, {"cmd": "reload"})
    reload.until(lambda a: a.get("event") == "spawned")
    # The replacement is booting: the one old worker must still be serving, at once.
    request = InFlight(m.port, "/")
    status, body = request.response()
    assert status == 200 and "release=r1" in body, body
    (worker,) = [w for w in m.status()["workers"] if w["pid"] == old]
    assert worker["state"] == "ready"
    assert reload.finish()["ok"], reload.answers
    assert reload.at("ready", 1) <= reload.at("draining", 1)
    assert releases_of(m) == {"r2"} and not pid_alive(old)


# --- ready_soak ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_old_worker_drains_only_after_the_replacement_stayed_up_ready_soak(
    masters: Masters, releases: Releases
) -> None:
    soak = 2.0
    m = masters.start(cwd=releases.current, workers=1, options=("--ready-soak", str(soak)))
    releases.make("r2")
    releases.switch("r2")
    reload = Stream(m.socket, {"cmd": "reload"})
    assert reload.finish()["ok"], reload.answers
    waited = reload.at("draining", 1) - reload.at("ready", 1)
    # Arrival times: the "ready" line may reach us a little late, never early.
    assert waited >= soak - 0.5, (waited, reload.answers)


DIES_IN_SOAK = textwrap.dedent(
    """\
    # A release whose workers say READY=1, then die 0.5 s later: inside ready_soak.
    import os, socket, time
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", address)
    time.sleep(0.5)
    os._exit(7)
    """
)


@pytest.mark.timeout(60)
def test_replacement_dying_during_its_soak_aborts_the_reload(
    masters: Masters, releases: Releases
) -> None:
    m = masters.start(cwd=releases.current, workers=2, options=("--ready-soak", "3"))
    old = m.worker_pids()
    r2 = releases.root / "releases" / "r2"
    r2.mkdir(parents=True)
    (r2 / "app.py").write_text(DIES_IN_SOAK)  # Releases.make keeps an existing app.py
    releases.make("r2")
    releases.switch("r2")
    reload = Stream(m.socket, {"cmd": "reload"})
    answer = reload.finish()
    ready = [a for a in reload.answers if a.get("event") == "ready" and "phase" not in a]
    assert ready, reload.answers  # it was ready, so it died during its soak
    assert answer["ok"] is False, reload.answers
    assert not any(pid_alive(a["pid"]) for a in ready)
    # The old workers never stopped serving, and still are the ones serving.
    assert m.worker_pids() == old and releases_of(m) == {"r1"}
    assert m.status()["release"].endswith("releases/r1")
    status, body = m.get("/")
    assert status == 200 and "release=r1" in body


# --- reload_batch ----------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("batch", "at_once"),
    [("2", 2), ("50%", 2), (None, 4)],  # None: the default, every worker at once
)
def test_reload_batch_boots_that_many_replacements_at_a_time(
    masters: Masters, releases: Releases, batch: str | None, at_once: int
) -> None:
    options = () if batch is None else ("--reload-batch", batch)
    m = masters.start(cwd=releases.current, workers=4, options=options)
    old = m.worker_pids()
    releases.make("r2", BOOT_DELAY="1")
    releases.switch("r2")
    reload = Stream(m.socket, {"cmd": "reload"})
    assert reload.finish()["ok"], reload.answers
    booting: set[int] = set()
    candidates: set[int] = set()
    most_booting = most_candidates = 0
    for a in reload.answers:
        event, worker = a.get("event"), a.get("worker")
        if event == "spawned":
            booting.add(worker)
            candidates.add(worker)
        elif event == "ready":
            booting.discard(worker)
        elif event == "draining":
            candidates.discard(worker)  # promoted: it serves in its slot now
        most_booting = max(most_booting, len(booting))
        most_candidates = max(most_candidates, len(candidates))
    assert most_booting == at_once, reload.answers
    assert most_candidates <= 4, reload.answers
    assert releases_of(m) == {"r2"} and not old & m.worker_pids()
    assert len(m.ready_workers()) == 4


# --- scaling by signal -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigttin_adds_a_worker_and_sigttou_removes_one(masters: Masters) -> None:
    m = masters.start(workers=2)
    m.proc.send_signal(signal.SIGTTIN)
    assert len(m.wait_ready(3)) == 3
    assert m.status()["configured"] == 3
    # One signal at a time: the kernel merges a signal sent while the same one is pending.
    m.proc.send_signal(signal.SIGTTOU)
    assert len(m.wait_ready(2)) == 2
    m.proc.send_signal(signal.SIGTTOU)
    assert len(m.wait_ready(1)) == 1
    m.proc.send_signal(signal.SIGTTOU)  # never below one worker
    wait_for(lambda: "scale: 1 -> 1" in m.log_text(), 10, "the master to take the signal")
    assert m.status()["configured"] == 1 and len(m.wait_ready(1)) == 1


# --- crash backoff ---------------------------------------------------------------------

# The master, with its clock running SPEED times faster: its time.monotonic()
# and the timeouts it waits for in its selector. A crash loop whose backoff
# reaches the 30 s cap then takes a few real seconds. (Workers run on real time.)
FAST_CLOCK = """
import runpy, selectors, sys, time
speed = float(sys.argv.pop(1))
real, t0 = time.monotonic, time.monotonic()
time.monotonic = lambda: t0 + (real() - t0) * speed
select = selectors.DefaultSelector.select
selectors.DefaultSelector.select = lambda self, timeout=None: select(
    self, None if timeout is None else timeout / speed
)
sys.argv[0] = "deployer.master"
runpy.run_module("deployer.master", run_name="__main__", alter_sys=True)
"""
SPEED = 20
BACKOFF_CAP_S = 30.0  # README: exponential backoff; the master caps it at 30 s


@pytest.mark.timeout(90)
def test_crash_loop_backoff_grows_and_stops_at_its_cap(masters: Masters, tmp_path: Path) -> None:
    sock, log = tmp_path / "fast.sock", tmp_path / "fast.log"
    argv = [PYTHON, "-c", FAST_CLOCK, str(SPEED), "run", "--workers", "1",
            "--listen", f"127.0.0.1:{free_port()}", "--socket", str(sock), "--log", str(log),
            "--", PYTHON, str(REPO / "examples" / "python-app" / "app.py")]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "CRASH_AT_BOOT": "1"})
    m = Master(proc, sock, 0, log)
    masters.started.append(m)  # killed by pid at the end of the test
    wait_for(sock.exists, 10, "the control socket")

    def waits() -> list[float]:
        """The master's own word for each crash-loop restart, in order: the k-th is
        the wait after crash k + 1 in a row (a first crash restarts at once). Read
        from its log, not by polling status: the early waits last milliseconds here."""
        found = re.findall(r"crashed \(.*?\), crash loop: restart in ([0-9.]+)s", m.log_text())
        return [float(x) for x in found]

    # Uncapped, the wait after the 9th crash in a row would be 51-77 s.
    wait_for(lambda: len(waits()) >= 8, 60, f"9 crashes in a row; log:\n{m.log_text()}")
    got = waits()
    assert max(got) <= BACKOFF_CAP_S, got
    assert max(got) >= BACKOFF_CAP_S * 0.75, got  # it did grow all the way to the cap
    assert got[0] <= 0.6, got  # after the 2nd crash in a row: 0.5 s +- 20%
