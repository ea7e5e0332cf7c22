"""The agent session (issue 17): one agent process per host per command, requests
and answers framed by the host contract (deployer.hostapi.answers).

Framing without any process; the host's session loop as a subprocess on real
pipes; the controller's AgentSession over a LocalHost; and a rollout whose one
host's SSH session is cut (its sshd session process killed, by pid) in the
middle of a call.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from master_helpers import wait_for

from deployer import agent_session
from deployer.agent.session import serve
from deployer.agent_session import CommandTimeout, SessionEnded
from deployer.errors import StepFailed
from deployer.hostapi import answers, calls
from deployer.hostapi.layout import Layout
from deployer.remote import RemoteHost
from deployer.transport import LocalHost

REPO = Path(__file__).resolve().parent.parent
# the zipapp's entry point, run from the source tree (what BOOTSTRAP imports on a host)
AGENT = [
    sys.executable,
    "-c",
    f"import sys; sys.path.insert(0, {str(REPO)!r}); "
    "from deployer.hostmain import main; sys.exit(main())",
    "agent",
]

# --- framing --------------------------------------------------------------------------


def test_a_request_frame_is_a_json_line_then_its_raw_stdin() -> None:
    frame = answers.request_frame(7, ["prepare", "--root", "/srv"], b"PACK\n\x00bytes")
    head, rest = frame.split(b"\n", 1)
    assert json.loads(head) == {"id": 7, "argv": ["prepare", "--root", "/srv"], "stdin": 11}
    assert rest == b"PACK\n\x00bytes"
    assert answers.parse_request(head + b"\n") == (7, ["prepare", "--root", "/srv"], 11)


@pytest.mark.parametrize(
    "line",
    [b"[1, 2]\n", b'{"id": "x", "argv": []}\n', b'{"id": 1, "argv": [1]}\n',
     b'{"id": 1, "argv": [], "stdin": -1}\n', b"not json\n"],
)  # fmt: skip
def test_a_garbled_request_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        answers.parse_request(line)


def test_the_end_frame_names_its_request_and_nothing_else_is_one() -> None:
    assert answers.end_id(answers.end_frame(12)) == 12
    for other in ("build: @@deployer-end 3", "@@deployer-end", "@@deployer-end x", "", "|x"):
        assert answers.end_id(other) is None


def test_every_call_but_the_streaming_ones_goes_through_a_session() -> None:
    layout = Layout.at("/srv/shop")
    owner = answers.LockOwner("id1")
    for call in (calls.state(), calls.version(), calls.lock("acquire", owner), calls.prune(3),
                 calls.prepare("a" * 40, "r", receive=True), calls.secrets("set", "K"),
                 calls.record({"a": 1}), calls.logs(10)):  # fmt: skip
        assert call.in_session, call.op
        assert call.argv("python3", layout, "0" * 64)[5:] == ["agent", *call.words(layout)]
    for call in (calls.setup(install=True), calls.exec_command(["ls"]), calls.logs(10, None, True)):
        assert not call.in_session, call.op
    assert calls.session("python3", layout, "0" * 64)[3:] == [
        str(layout.pyz),
        "0" * 64,
        "agent",
        "session",
    ]


# --- the host's session loop ------------------------------------------------------------


def answers_of(out: str) -> list[tuple[int, str, list[str]]]:
    """(request id, result line, streamed lines) per end frame, in order."""
    got, lines = [], []
    for line in out.splitlines():
        rid = answers.end_id(line)
        if rid is None:
            lines.append(line)
            continue
        results = [x for x in lines if x.startswith(answers.RESULT_MARK)]
        got.append((rid, results[-1], [x for x in lines if x not in results]))
        lines = []
    assert lines == [], f"output after the last end frame: {lines}"
    return got


def session_proc(**kw) -> subprocess.Popen:
    return subprocess.Popen(
        [*AGENT, "session"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def test_the_session_answers_pipelined_requests_in_order_and_exits_0_at_eof(
    tmp_path: Path,
) -> None:
    root = tmp_path / "app"
    layout = Layout.at(str(root))
    proc = session_proc()
    frames = [
        answers.request_frame(1, ["version"]),
        answers.request_frame(2, calls.setup().words(layout)),
        answers.request_frame(3, calls.secrets("set", "API_KEY").words(layout), b"s3cret\n"),
        answers.request_frame(4, calls.secrets("list").words(layout)),
        answers.request_frame(5, ["nonsense", "--x"]),
        answers.request_frame(6, calls.exec_command(["true"]).words(layout)),
        answers.request_frame(7, calls.state().words(layout)),
    ]
    out, err = proc.communicate(b"".join(frames), timeout=60)
    assert proc.returncode == 0, err
    got = answers_of(out.decode())
    assert [rid for rid, _, _ in got] == [1, 2, 3, 4, 5, 6, 7]
    assert answers.parse_result(got[0][1], answers.Version).bundle
    assert answers.parse_result(got[2][1], answers.Secrets).changed
    # the secret came as the request's stdin, and the next request saw none
    assert answers.parse_result(got[3][1], answers.Secrets).keys == ["API_KEY"]
    assert json.loads(layout.secrets.read_text()) == {"API_KEY": "s3cret"}
    for rid in (5, 6):  # a bad request, and exec: refused with an answer, the session goes on
        with pytest.raises(answers.AgentFailed) as e:
            answers.parse_result(got[rid - 1][1], answers.Version)
        assert e.value.code == 2 and "bad request" in str(e.value)
    state = answers.parse_result(got[6][1], answers.HostState)
    assert state.exists and state.bundle


def test_the_ops_children_cannot_read_the_next_requests(tmp_path: Path) -> None:
    """fd 0 of the session is /dev/null for what the ops start (a build, git)."""
    stream = io.BytesIO(
        answers.request_frame(1, ["probe-stdin"]) + answers.request_frame(2, ["probe-stdin"])
    )
    seen = []

    def handle(argv: list[str]) -> None:
        child = subprocess.run(["cat"], capture_output=True, timeout=10)  # inherits fd 0
        seen.append((argv, child.stdout, sys.stdin.read()))
        print(answers.result_line(answers.Recorded()), flush=True)

    saved = os.dup(0)
    try:
        with open(os.devnull, "rb") as null:
            os.dup2(null.fileno(), 0)
        assert serve(handle, stream) == 0
    finally:
        os.dup2(saved, 0)
        os.close(saved)
    assert seen == [(["probe-stdin"], b"", ""), (["probe-stdin"], b"", "")]


def test_a_garbled_request_ends_the_session_with_exit_2_and_says_why() -> None:
    proc = session_proc()
    out, err = proc.communicate(answers.request_frame(1, ["version"]) + b"{oops\n", timeout=60)
    assert proc.returncode == 2
    assert [rid for rid, _, _ in answers_of(out.decode())] == [1]
    assert b"deployer: bad session request" in err


def test_a_request_cut_in_its_stdin_ends_the_session_quietly() -> None:
    proc = session_proc()
    head = answers.request_frame(1, ["secrets", "list", "--root", "/nonexistent"], b"12345")
    out, err = proc.communicate(head[:-2], timeout=60)
    assert (proc.returncode, out, err) == (0, b"", b"")


# --- the controller's end, over a local process -------------------------------------------


def test_local_agent_session_calls_streams_and_reuses_one_process(tmp_path: Path) -> None:
    host = LocalHost("l1")
    layout = Layout.at(str(tmp_path / "app"))
    try:
        with host.agent_session(AGENT + ["session"]) as s:
            out = s.call(calls.setup().words(layout), timeout=30)
            assert answers.parse_result(out, answers.SetupResult).root == str(layout.root)
            first = s.stream
            # pipelined: two requests out, then both answers
            a = s.send(calls.state().words(layout))
            b = s.send(["version"])
            assert answers.parse_result(s.receive(a, None, 30), answers.HostState).exists
            assert answers.parse_result(s.receive(b, None, 30), answers.Version).bundle
        with host.agent_session(AGENT + ["session"]) as s:
            assert s.stream is first  # the idle session, not a new process
            streamed: list[str] = []
            s.call(calls.secrets("list").words(layout), None, streamed.append, 30)
            assert all(not line.startswith("@@") or line.startswith(answers.RESULT_MARK)
                       for line in streamed)  # fmt: skip
    finally:
        host.close()
    assert first.proc.wait(5) == 0  # closing the host closed its session: EOF, exit 0


def test_a_request_sent_ahead_is_read_by_the_next_call_with_its_words(tmp_path: Path) -> None:
    """Lock and state in one round trip: the state request goes right behind the lock
    one, and the state call that follows reads that answer instead of asking again;
    unless another call ran on the session in between (then it asks anew)."""
    host = LocalHost("l1")
    layout = Layout.at(str(tmp_path / "app"))
    state = calls.state().words(layout)
    try:
        with host.agent_session(AGENT + ["session"]) as s:
            s.call(calls.setup().words(layout), timeout=30)
            rid = s.send(["version"])
            s.send_ahead(state)
            assert answers.parse_result(s.receive(rid, None, 30), answers.Version).bundle
        with host.agent_session(AGENT + ["session"]) as s:
            sent = s.next_id
            assert answers.parse_result(s.call(state, timeout=30), answers.HostState).exists
            assert s.next_id == sent  # no new request: the one sent ahead answered
            s.send_ahead(state)
            s.call(["version"], timeout=30)  # something else ran: the answer is stale
            s.call(state, timeout=30)
            assert s.next_id == sent + 3 and s.ahead == {}
    finally:
        host.close()


def test_a_session_whose_agent_cannot_start_reports_its_exit_and_stderr() -> None:
    host = LocalHost("l1")
    argv = [sys.executable, "-c", "import sys; sys.stderr.write('deployer: no agent\\n'); "
            "sys.exit(127)"]  # fmt: skip
    with pytest.raises(SessionEnded) as e, host.agent_session(argv) as s:
        s.call(["version"], timeout=30)
    assert (e.value.exit_code, e.value.lost, e.value.stderr) == (127, "", "deployer: no agent\n")


def test_a_killed_session_fails_its_pending_call_and_a_frozen_one_its_deadline() -> None:
    host = LocalHost("l1")
    sleeper = [sys.executable, "-c", "import sys, time; sys.stdin.readline(); time.sleep(60)"]
    with pytest.raises(CommandTimeout), host.agent_session(sleeper) as s:
        s.call(["version"], timeout=0.5)
    with pytest.raises(SessionEnded) as e, host.agent_session(sleeper) as s:
        rid = s.send(["version"])
        os.kill(s.stream.proc.pid, signal.SIGKILL)  # with the call pending
        s.receive(rid, None, 30)
    assert e.value.lost and "signal 9" in e.value.lost
    host.close()


# --- a session cut mid-rollout, on real sshd hosts -------------------------------------------


def sshd_sessions(sshd_fleet, host) -> list[int]:
    """The per-connection sshd processes of a host (its listener's descendants)."""
    from sshd import _sshd_descendants

    listener = sshd_fleet.pid(host)
    assert listener is not None
    return _sshd_descendants(listener)


@pytest.mark.parametrize("persist", [0, 30])
def test_a_session_cut_in_the_middle_of_a_switch_fails_that_host_and_rolls_back(
    tmp_path: Path, ssh_hosts, sshd_fleet, persist: int
) -> None:
    """host3's health probe (batch 3) is in flight when its SSH connection is cut (its
    sshd session processes killed by pid, the listener left up): its step fails with a
    clear error, the switched hosts go back (host3 too, over a new connection), every
    lock is released, the exit code is 1, no traceback. The same through the keeper
    ([ssh] persist), whose connection is the one cut."""
    from rollout_helpers import commit, make_project
    from test_keeper import persisting
    from test_rollout import HealthServer, failure_of, with_health

    project = make_project(tmp_path, ssh_hosts, {"app.txt": "version 1\n"})
    if persist:
        persisting(project, persist)
    project.deployer("setup", check=True)
    project.deployer("rollout", check=True)
    before = {h.name: project.current(h) for h in project.hosts}
    commit(project.repo, {"app.txt": "version 2\n"}, "v2")
    cut: list[int] = []
    victim = project.hosts[2]

    def cut_host3(hit: int) -> None:
        # batches of one: the first probe once host3 switched is its own, in flight now
        if not cut and project.current(victim) != before[victim.name]:
            cut.extend(sshd_sessions(sshd_fleet, victim))
            for pid in cut:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)  # the probe answers only once the connection is gone

    health = HealthServer(on_request=cut_host3)
    try:
        with_health(project, health.url)
        proc = project.deployer("rollout")
    finally:
        health.close()
    assert cut, proc.stdout
    assert proc.returncode == 1, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    why = failure_of(proc.stdout, victim.name)
    assert why.startswith("health failed: connection lost while running it"), why
    assert "FAILED at switch" in proc.stdout and "rolling back" in proc.stdout
    assert {h.name: project.current(h) for h in project.hosts} == before
    assert not (project.state / "demo.lock").exists()
    locked = [h.name for h in project.hosts if (h.root / "run" / "deploy.lock").exists()]
    assert locked == [], proc.stdout + proc.stderr
    history = json.loads(project.deployer("history", "--json", check=True).stdout)
    assert history[0]["result"] == "failed"
    if persist:
        assert project.deployer("disconnect", check=True).stdout.startswith("keeper (pid ")


def test_a_host_gone_in_the_middle_of_prepare_fails_fast_afterwards(
    tmp_path: Path, ssh_hosts, sshd_fleet
) -> None:
    """host3's sshd goes away entirely (listener and sessions) while its build runs:
    its prepare fails naming the lost connection, its later steps (unlock) fail at
    once after one attempt to reconnect, the others' locks are released."""
    from rollout_helpers import commit, make_project

    project = make_project(
        tmp_path,
        ssh_hosts,
        {"app.txt": "version 1\n"},
        app_extra='build = "touch ../../building; sleep 2"',
    )
    project.deployer("setup", check=True)
    project.deployer("rollout", check=True)
    for h in project.hosts:
        (h.root / "building").unlink()
    commit(project.repo, {"app.txt": "version 2\n"}, "v2")
    victim = project.hosts[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployer", "-i", str(project.inventory), "rollout"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=project.repo,
        env={**os.environ, "DEPLOYER_STATE_DIR": str(project.state)},
    )
    try:
        wait_for((victim.root / "building").exists, 60, "host3's build to start", interval=0.02)
        started = time.monotonic()
        sshd_fleet.stop(victim)  # listener and sessions: the host is gone
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
        sshd_fleet.ensure_running([victim])
    assert proc.returncode == 1, out
    assert "Traceback" not in out + err
    assert "FAILED at prepare" in out
    assert "prepare failed: connection lost while running it" in out
    assert took < 30, out  # no retry_deadline-long reconnect loops for a lost host
    assert not (project.state / "demo.lock").exists()
    held = [h.name for h in project.hosts if (h.root / "run" / "deploy.lock").exists()]
    assert held == [victim.name], out


def test_a_rollout_starts_one_agent_per_host(tmp_path: Path, ssh_hosts) -> None:
    """Every agent call of a rollout (lock, state, prepare, switch, prune, record,
    unlock) goes through one agent process per host: python3 is started once."""
    from rollout_helpers import commit, make_project

    project = make_project(tmp_path, ssh_hosts, {"app.txt": "version 1\n"})
    project.deployer("setup", check=True)
    project.deployer("rollout", check=True)
    commit(project.repo, {"app.txt": "version 2\n"}, "v2")
    wrapper = ssh_hosts[0].root.parent / f"python3-{tmp_path.name}"
    log = wrapper.with_suffix(".log")
    # $5 $6: `agent OP` after `-c BOOTSTRAP PYZ SHA256`; the host's own name from its root
    wrapper.write_text(f'#!/bin/sh\necho "$(basename "$(dirname "$(dirname "$3")")") $5 $6" '
                       f'>> {log}\nexec python3 "$@"\n')  # fmt: skip
    wrapper.chmod(0o755)
    text = project.inventory.read_text().replace("[ssh]\n", f'[ssh]\npython = "{wrapper}"\n', 1)
    project.inventory.write_text(text)
    proc = project.deployer("rollout", check=True)
    assert "rollout ok" in proc.stdout
    starts = log.read_text().splitlines()
    assert sorted(starts) == sorted(f"{h.root.name} agent session" for h in ssh_hosts), starts


def test_a_call_waiting_for_a_session_opened_ahead_gets_its_failure_not_a_second_try() -> None:
    """A host that cannot be reached costs one round of connection retries, not two:
    the call that waited for the session being opened ahead reports its failure."""
    import threading

    from deployer.errors import TransportError

    attempts = []
    opening = threading.Event()

    class Down(LocalHost):
        def open_stream(self, argv):
            attempts.append(argv)
            opening.set()
            time.sleep(0.3)  # a slow connection that then fails: what is tested
            raise TransportError("d1: cannot connect to 10.0.0.9:22 (3 attempts over 0.3s)")

    host = Down("d1")
    ahead = threading.Thread(target=host.open_ahead, args=(["agent"],))
    ahead.start()
    assert opening.wait(10)  # the session is being opened ahead: the call waits for it
    with pytest.raises(TransportError, match="cannot connect"), host.agent_session(["agent"]):
        pass
    ahead.join()
    assert len(attempts) == 1
    with pytest.raises(TransportError), host.agent_session(["agent"]):
        pass  # the next call tries again
    assert len(attempts) == 2


class _Pieces(agent_session.Stream):
    """A stream whose stdout is these pieces (as the reader hands them on)."""

    def __init__(self, pieces: list[bytes]) -> None:
        super().__init__()
        self.pieces = [*pieces, None]

    def readline(self, timeout: float | None) -> bytes | None:
        return self.pieces.pop(0)

    def write(self, data: bytes) -> None:
        pass

    def exit_code(self, wait: float) -> tuple[int, str]:
        return 0, ""

    def close(self) -> None:
        pass


def test_an_end_frame_counts_only_as_a_whole_line() -> None:
    """A long line comes in pieces of CHUNK: an end frame's text at the start of a
    piece that continues a line is the op's output, not the end of its answer."""
    fake = answers.end_frame(1) + "\n"
    result = answers.result_line(answers.Recorded(True)) + "\n"
    pieces = [b"x" * 10, fake.encode(), result.encode(), fake.encode()]
    session = agent_session.AgentSession("h", _Pieces(pieces))
    seen: list[str] = []
    out = session.receive(1, seen.append, 5.0)
    assert seen == ["x" * 10 + fake.rstrip("\n"), result.rstrip("\n")]  # look-alike inside
    assert out.endswith(result)


def test_a_stream_reads_at_most_a_few_pieces_ahead_of_its_reader() -> None:
    """A build printing 200 MB waits in its pipe for the controller, not in memory."""
    import contextlib
    import threading

    class Pumped(_Pieces):
        def close(self) -> None:
            self.closed = True

    stream = Pumped([])
    r, w = os.pipe()
    reader = os.fdopen(r, "rb")
    pump = threading.Thread(target=stream._pump_lines, args=(reader.readline,), daemon=True)
    pump.start()
    data = b"y\n" * 1000 + b"z" * (3 * agent_session.CHUNK) + b"\n" + b"y\n" * 1000

    def write() -> None:  # blocks once the pipe is full: the reader stopped reading
        with os.fdopen(w, "wb") as out, contextlib.suppress(BrokenPipeError):
            out.write(data)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    full = agent_session.READ_AHEAD  # the rest waits in the pipe
    wait_for(lambda: stream.lines.qsize() == full, 10, f"{full} pieces read ahead")
    assert not writer.join(0.2) and writer.is_alive()  # the writer blocks: nothing more read
    got = [stream.lines.get(timeout=2) for _ in range(1000)]
    assert got == [b"y\n"] * 1000
    long = [stream.lines.get(timeout=2) for _ in range(4)]
    assert [len(p) for p in long] == [agent_session.CHUNK] * 3 + [1]  # a long line in pieces
    stream.close()  # nobody reads any more: the reader stops waiting to hand on
    reader.close()
    pump.join(timeout=3)
    assert not pump.is_alive()


# --- a keeper that went away (issue 27) ------------------------------------------------


class LocalAgent(LocalHost):
    """This machine as host web1, its agent sessions run from the source tree."""

    def __init__(self) -> None:
        super().__init__("web1")
        self.opened = 0

    def open_stream(self, argv: list[str] | tuple[str, ...]) -> agent_session.Stream:
        self.opened += 1
        return super().open_stream(AGENT + ["session"])


class KeeperGoneOnce(LocalAgent):
    """A host whose first agent session dies in its first call the way one relayed
    by a SIGKILLed keeper does (no exit status: the relay went away); the sessions
    after it are real agent sessions."""

    def open_stream(self, argv: list[str] | tuple[str, ...]) -> agent_session.Stream:
        if self.opened:
            return super().open_stream(argv)
        self.opened += 1
        reads_then_dies = "import os, sys; sys.stdin.readline(); os.kill(os.getpid(), 9)"
        stream = LocalHost.open_stream(self, [sys.executable, "-c", reads_then_dies])
        stream.relay_gone = True
        return stream


def one_host(tmp_path: Path, host: LocalHost) -> tuple[RemoteHost, list[str]]:
    from deployer import inventory

    path = tmp_path / "inventory.toml"
    path.write_text(
        f'[app]\nname = "shop"\ndeploy_to = "{tmp_path / "app"}"\n'
        '[hosts.web1]\naddress = "127.0.0.1"\n'
    )
    said: list[str] = []
    remote = RemoteHost(inventory.load(path).hosts["web1"], host)
    remote.notice = said.append
    return remote, said


def test_a_repeatable_call_is_asked_again_when_its_keeper_went_away(tmp_path: Path) -> None:
    host = KeeperGoneOnce()
    remote, said = one_host(tmp_path, host)
    try:
        state = remote.state()
    finally:
        host.close()
    assert state.root == str(tmp_path / "app") and host.opened == 2
    assert said == ["deployer's keeper went away during state: asked again"]


def test_a_call_that_may_have_half_run_is_not_asked_again(tmp_path: Path) -> None:
    """prepare (a pack on stdin, a build) is not repeatable: its failure says it may
    or may not have completed, as when the host's own connection drops."""
    host = KeeperGoneOnce()
    remote, said = one_host(tmp_path, host)
    try:
        with pytest.raises(StepFailed) as e:
            remote.call(calls.prepare("a" * 40, "20260101000000-aaaaaaa", (), None))
    finally:
        host.close()
    assert "connection lost while running it (it may or may not have completed)" in str(e.value)
    assert said == [] and host.opened == 1


def test_a_retried_record_and_lock_change_nothing_more(tmp_path: Path) -> None:
    """What makes record and lock repeatable: the host keeps an entry once, and takes
    its lock again for the owner that holds it."""
    from deployer.agent import ops
    from deployer.agent.ops.lock import lock

    layout = Layout.at(str(tmp_path / "app"))
    entry = {"id": "r1", "result": "ok", "note": "é"}
    for _ in range(2):
        ops.record(layout, entry)
    ops.record(layout, {**entry, "id": "r2"})
    ops.record(layout, entry)  # an entry like an older one, but after another: written
    ids = [json.loads(line)["id"] for line in layout.history.read_text().splitlines()]
    assert ids == ["r1", "r2", "r1"]
    owner = answers.LockOwner("o1", app="shop")
    assert lock(layout, "acquire", owner).done
    assert lock(layout, "acquire", owner) == answers.LockAnswer(True, None)
    other = lock(layout, "acquire", answers.LockOwner("o2", app="shop"))
    assert not other.done and other.holder is not None and other.holder.id == "o1"


def test_lock_then_state_and_record_then_unlock_cost_one_round_trip_each(tmp_path: Path) -> None:
    """What the rollout sends ahead, the call that follows reads: no second request."""
    host = LocalAgent()
    remote, _ = one_host(tmp_path, host)
    owner = answers.LockOwner("o1", app="shop")
    try:
        assert remote._call_then(calls.lock("acquire", owner), calls.state()).done
        session = host._idle[-1]
        sent = session.next_id
        assert remote.state().root == str(tmp_path / "app")
        assert session.next_id == sent  # the state sent behind the lock answered
        remote._call_then(calls.record({"id": "r1"}), calls.lock("release", owner))
        sent = session.next_id
        assert remote.lock("release", owner).done
        assert session.next_id == sent and host.opened == 1
    finally:
        host.close()
    assert not (tmp_path / "app" / "run" / "deploy.lock").exists()
