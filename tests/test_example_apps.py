"""The example apps' own accept and drain logic, with real sockets and processes
(the master tests run the same apps as workers)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import resource
import signal
import socket
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
from master_helpers import PYTHON, PYTHON_APP, free_port, serves, wait_for


def load_python_app() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_python_app", PYTHON_APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_until_eof(client: socket.socket) -> bytes:
    client.settimeout(2)
    data = b""
    try:
        while chunk := client.recv(4096):
            data += chunk
    except TimeoutError:
        data += b"(no EOF within 2 s)"
    return data


@pytest.mark.timeout(30)
def test_python_app_serves_connections_accepted_just_before_it_drains() -> None:
    """asyncio's Server.close() loses the connections it accepted in the same
    tick (their transports fail to attach, the clients hang until the worker
    exits); the app's accept loop must serve them, and not exit before."""
    example = load_python_app()

    async def scenario() -> list[bytes]:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(10)]
        for c in clients:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        app = example.App()
        app.listen(listener)
        app.accept()  # takes all 10 from the queue; their transports come later...
        app.drain()  # ...after the drain has started
        await asyncio.wait_for(app.done, 10)
        return [read_until_eof(c) for c in clients]

    answers = asyncio.run(scenario())
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
        assert b"\r\nConnection: close\r\n" in answer, answer


@pytest.mark.timeout(30)
def test_python_app_out_of_fds_pauses_accepting_and_recovers(tmp_path: Path) -> None:
    port = free_port()
    app = subprocess.Popen(
        [PYTHON, str(PYTHON_APP)],
        cwd=tmp_path,
        env={**os.environ, "PORT": str(port)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24)),
    )
    try:
        wait_for(lambda: serves(port), 10, "the app serving")
        # More open connections than the app has fds: it runs out (EMFILE) while
        # accepting, and the kernel's queue keeps the rest.
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
        fds = Path(f"/proc/{app.pid}/fd")
        wait_for(lambda: len(list(fds.iterdir())) >= 24, 10, "the app at its fd limit")
        for c in clients:
            c.close()
        wait_for(lambda: serves(port), 15, "serving again once the clients are gone")
    finally:
        app.send_signal(signal.SIGTERM)
        out, _ = app.communicate(timeout=15)
    assert "accept failed ([Errno 24] Too many open files), pausing for 1 s" in out, out
    assert "Traceback" not in out, out
