"""The baseline: a bare ASGI app under the same uvicorn settings as `atm serve`.

GET answers a small pre-serialised JSON body, POST reads the body and answers 201. What
the gateway reaches relative to this is what the framework, FHIR and storage cost.
Run: `python -m bench.bare --port N`.
"""

from __future__ import annotations

import argparse
from typing import Any

BODY = b'{"resourceType":"Task","id":"bare","status":"ready","intent":"order"}'
HEADERS = [(b"content-type", b"application/fhir+json"),
           (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = scope["method"] in ("POST", "PUT")
    while more:
        message = await receive()
        more = message.get("more_body", False)
    status = 201 if scope["method"] == "POST" else 200
    await send({"type": "http.response.start", "status": status, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # The same server settings as gateway.cli.serve.
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop", http="httptools",
                access_log=False, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
