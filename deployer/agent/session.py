"""`agent session`: many agent calls over one process, so a host costs one
interpreter start (and one BOOTSTRAP hash check) per controller command, not
one per step.

The framing is the host contract's (deployer.hostapi.answers): a request is a
JSON line {"id", "argv", "stdin"} followed by `stdin` raw bytes; its answer is
what the op streams, its result line, then the end frame `@@deployer-end ID`.
Requests run one at a time, in the order they came.

The op sees the request's bytes as its stdin; the process's own fd 0 (the
request stream) is moved away and /dev/null put in its place, so that no child
process (git, a build) can read the next requests.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable

from deployer.hostapi import answers
from deployer.hostapi.exits import EXIT_BAD_INPUT, EXIT_OK

# runs one request's argv (what follows `agent`): prints its stream and result line
Handler = Callable[[list[str]], object]


def _requests() -> io.BufferedReader:
    """The request stream, on a private fd; fd 0 becomes /dev/null."""
    private = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return os.fdopen(private, "rb")


def serve(handle: Handler, requests: io.BufferedIOBase | None = None) -> int:
    """Answer requests until the controller closes the stream (EOF): exit 0. A
    garbled request ends the session (the framing is lost): exit 2, said on stderr."""
    stream = requests if requests is not None else _requests()
    try:
        while True:
            line = stream.readline(answers.MAX_REQUEST_LINE)
            if not line:
                return EXIT_OK
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("request line too long or cut")
                rid, argv, size = answers.parse_request(line)
            except ValueError as e:
                sys.stderr.write(f"deployer: bad session request: {e}\n")
                return EXIT_BAD_INPUT
            payload = _read_exactly(stream, size)
            if payload is None:  # the controller went away in the middle of a request
                return EXIT_OK
            sys.stdin = io.TextIOWrapper(io.BytesIO(payload), encoding="utf-8")
            try:
                handle(argv)
            finally:
                sys.stdin = io.TextIOWrapper(io.BytesIO(b""), encoding="utf-8")
            sys.stdout.write(answers.end_frame(rid) + "\n")
            sys.stdout.flush()
    except BrokenPipeError:  # the controller is gone: nobody to answer
        _quiet_stdout()
        return EXIT_OK


def _read_exactly(stream: io.BufferedIOBase, size: int) -> bytes | None:
    parts, left = [], size
    while left > 0:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _quiet_stdout() -> None:
    """No second BrokenPipeError when the interpreter flushes stdout at exit."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):
        pass
