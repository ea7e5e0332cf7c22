"""Anchor for bench/reload_under_load.py: the same trivial handler as a WSGI
app for unmodified gunicorn (`gunicorn -w 2 wsgi_app:app`, reload: kill -HUP)."""

import os


def app(environ, start_response):
    body = f"ok pid={os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
