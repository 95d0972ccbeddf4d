"""The baselines: bare endpoints under the same uvicorn settings as `atm serve`.

`asgi` is a raw ASGI callable: GET answers a small pre-serialised JSON body, POST reads
the body and answers 201. `fastapi` is the same in the framework the gateway is built on
(the measurements in PERFORMANCE.md and the issue's targets refer to it): GET returns
pre-serialised bytes, POST parses the JSON body with orjson and answers 201. What the
gateway reaches relative to these is what FHIR and storage cost.
Run: `python -m bench.bare --port N [--framework asgi|fastapi]`.
"""

from __future__ import annotations

import argparse
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response

BODY = b'{"resourceType":"Task","id":"bare","status":"ready","intent":"order"}'
MEDIA_TYPE = "application/fhir+json"
HEADERS = [(b"content-type", MEDIA_TYPE.encode()),
           (b"content-length", str(len(BODY)).encode())]


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
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


def fastapi_app() -> FastAPI:
    # Configured as the gateway's app is (no OpenTelemetry hooks), to be no slower.
    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False})

    @api.get("/bare")
    async def read() -> Response:
        return Response(BODY, media_type=MEDIA_TYPE)

    @api.post("/bare")
    async def create(request: Request) -> Response:
        orjson.loads(await request.body())
        return Response(BODY, status_code=201, media_type=MEDIA_TYPE)

    return api


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--framework", choices=["asgi", "fastapi"], default="asgi")
    args = parser.parse_args()
    app = asgi_app if args.framework == "asgi" else fastapi_app()
    # The same server settings as gateway.cli.serve.
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop", http="httptools",
                access_log=False, log_level="warning", lifespan="on", proxy_headers=False)


if __name__ == "__main__":
    main()
