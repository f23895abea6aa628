"""The benchmark's fixed, seeded mix of input lengths.

50 % of texts have 5–20 words, 35 % 21–60, 15 % 61–120 (about 41 tokens on average for
all-MiniLM-L6-v2, at most about 135): short queries, sentences and paragraphs, as real
embedding traffic has. The same seed gives the same texts in the same order everywhere.
"""

from __future__ import annotations

import random

SEED = 20261125
_WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his", "her", "an", "were", "are", "which", "this", "be", "or", "has", "had", "not", "but", "what", "all", "when", "there", "can", "more", "about", "if", "out", "up", "so", "some", "would", "into", "them", "other", "than", "then", "now", "only", "its", "over", "also", "new", "time", "could", "these", "two", "may", "first", "any", "like", "people", "water", "been", "call", "who", "oil", "find", "long", "down", "day", "did", "get", "come", "made", "part", "server", "model", "request", "batch", "queue", "latency", "throughput", "memory", "process", "worker", "signal", "restart", "deadline", "token", "vector", "embedding", "sentence", "paragraph", "language", "search", "index", "document", "answer", "question", "retrieval", "production", "service", "machine", "learning", "inference", "transformer", "attention", "layer", "weight", "training"]
_BANDS = ((0.50, 5, 20), (0.35, 21, 60), (0.15, 61, 120))


def make_texts(count: int, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        pick = rng.random()
        for share, low, high in _BANDS:
            if pick < share:
                break
            pick -= share
        words = rng.randint(low, high)
        texts.append(" ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + ".")
    return texts
