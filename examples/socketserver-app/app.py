"""A worker written with nothing but Python's http.server, under `deployer master`.

It takes the shared socket from fd 3 (LISTEN_FDS), says READY=1 on
$NOTIFY_SOCKET, and drains on SIGTERM with server.shutdown(). socketserver
polls the socket and then accepts; workers sharing one socket all wake for a
connection and the losers block in accept() -- where Python retries the call
after SIGTERM, so the drain waits for the next connection or shutdown_timeout.
Run it with `[master] nonblocking = true`: accept() then returns at once.
"""

import http.server
import os
import signal
import socket
import threading

RELEASE = os.path.basename(os.getcwd())


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"release={RELEASE} pid={os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if address:
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), address)


def main() -> None:
    listener = socket.socket(fileno=3)
    server = http.server.ThreadingHTTPServer(
        listener.getsockname()[:2], Handler, bind_and_activate=False
    )
    server.socket.close()
    server.socket = listener
    server.daemon_threads = True

    def drain(*_: object) -> None:
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, drain)
    notify("READY=1")
    server.serve_forever(poll_interval=0.5)


if __name__ == "__main__":
    main()
