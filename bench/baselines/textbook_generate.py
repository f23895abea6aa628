"""The textbook generation server: one request at a time, model.generate in a thread, tokens
streamed with TextIteratorStreamer, OpenAI's /v1/completions shape.

    python bench/baselines/textbook_generate.py MODEL_FOLDER --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading

import torch
from aiohttp import web
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    lock = asyncio.Lock()

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        ids = tokenizer(body["prompt"], return_tensors="pt")["input_ids"]
        new = int(body.get("max_tokens") or 16)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async with lock:  # one request at a time: the textbook way
            if request.transport is None or request.transport.is_closing():
                return response  # its client left while it queued
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
            gone = threading.Event()

            def run() -> None:
                with torch.inference_mode():
                    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                   streamer=streamer, pad_token_id=tokenizer.pad_token_id,
                                   stopping_criteria=[lambda *_args, **_kw: gone.is_set()])

            thread = threading.Thread(target=run)
            thread.start()
            iterator = iter(streamer)
            try:
                while (piece := await asyncio.to_thread(next, iterator, None)) is not None:
                    if piece:
                        chunk = {"object": "text_completion", "choices": [{"index": 0, "text": piece}]}
                        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            finally:
                gone.set()  # a client that went away stops its generation at the next token
                await asyncio.to_thread(thread.join)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
