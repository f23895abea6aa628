"""The textbook server: one aiohttp process, the pipeline called on the event loop, one
request at a time (the compute blocks the loop, so requests queue in the socket)."""

from __future__ import annotations

import argparse
import json
import os

from aiohttp import web
from common import load_embedder, text_of, threads_from_env


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    embed = load_embedder(threads_from_env(os.cpu_count() or 1))

    async def predict(request: web.Request) -> web.Response:
        document = await request.json()
        vector = embed([text_of(document)], {})[0]
        return web.Response(text=json.dumps(vector.tolist()), content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/", predict)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
