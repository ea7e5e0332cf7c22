"""The smallest ASGI app, for the uvicorn recipe (tests/test_recipes.py):
`uvicorn --fd 3 app:app` from the release directory."""

import os

RELEASE = os.path.basename(os.environ.get("DEPLOYER_RELEASE") or os.getcwd())


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()  # lifespan.startup
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = f"ok pid={os.getpid()} release={RELEASE}\n".encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
