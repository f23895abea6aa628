"""LitServe 0.2.19 serving the same model and work: max_batch_size=32, batch_timeout=2 ms,
one worker (the settings of the issue's measurement)."""

from __future__ import annotations

import argparse
import os
import sys

import litserve as ls

sys.path.insert(0, os.path.dirname(__file__))
from common import load_embedder, text_of, threads_from_env


class EmbeddingAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.embed = load_embedder(threads_from_env(os.cpu_count() or 1))

    def decode_request(self, request: dict) -> str:
        return text_of(request)

    def predict(self, texts: list[str]) -> list:
        return self.embed(list(texts), {})

    def encode_response(self, vector) -> list:
        return vector.tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args()
    api = EmbeddingAPI(max_batch_size=args.max_batch_size, batch_timeout=0.002, api_path="/")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
