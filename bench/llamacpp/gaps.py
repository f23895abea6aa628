"""One streamed chat request at a time against a running server: the median gap between content
deltas (one token each with bench/llamacpp/model.py's model) and the median time to the first.
A light client (plain http.client, no event loop) on the same cores as the server, so what it
measures is the server's own per-token pace. bench/LLAMACPP.md's lone-stream reading quotes it:

    .venv/bin/python bench/llamacpp/gaps.py PORT [REQUESTS]

against `python -m pipeserve --model bench/out/llama-small-random --dtype int8 --port PORT` or
llama-server with the same model's q8_0 GGUF (bench/LLAMACPP.md's Commands), one at a time.
"""

from __future__ import annotations

import http.client
import itertools
import json
import statistics
import sys
import time


def one_request(port: int, index: int) -> tuple[float, list[float]]:
    """(time to the first content delta, the gaps between deltas), in ms."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"Tell me about the sea, {index}."}],
                       "max_tokens": 64, "stream": True, "temperature": 0, "ignore_eos": True})
    started = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    arrivals = [time.perf_counter() for line in connection.getresponse() if _has_content(line)]
    connection.close()
    return (arrivals[0] - started) * 1e3, [(later - earlier) * 1e3 for earlier, later in itertools.pairwise(arrivals)]


def _has_content(line: bytes) -> bool:
    """A server-sent event whose delta carries text (not the role-only first chunk, nor the last)."""
    if not line.startswith(b"data: {"):
        return False
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


def main() -> None:
    port, requests = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 12
    firsts, gaps = [], []
    for index in range(requests):
        first, between = one_request(port, index)
        firsts.append(first)
        gaps += between
    print(f"{requests} requests, {len(gaps)} gaps: median gap {statistics.median(gaps):.2f} ms, "
          f"median time to first token {statistics.median(firsts):.1f} ms")


if __name__ == "__main__":
    main()
