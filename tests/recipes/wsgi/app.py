"""The smallest WSGI app, for the gunicorn recipes (tests/test_recipes.py).

Run from the release directory exactly as the README's recipe table says,
e.g. `gunicorn -w 1 app:app`; gunicorn itself adopts the master's socket
(LISTEN_FDS) and says READY=1 to $NOTIFY_SOCKET.
"""

import os

RELEASE = os.path.basename(os.environ.get("DEPLOYER_RELEASE") or os.getcwd())


def app(environ, start_response):
    body = f"ok pid={os.getpid()} release={RELEASE}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
