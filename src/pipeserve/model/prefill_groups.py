"""Which prompts a prefill computes together: groups of similar length, in the model process.

A pass computes every row to its longest prompt (rows are left-padded), so prompts of mixed
length in one pass compute padding; each pass also has a fixed cost (a whole forward's small
operations, and narrower products that use the cores less well). The grouping that minimises
PASS_TOKENS per pass plus each group's rows x its longest is found exactly: with the prompts
sorted by length, an optimal grouping is a split of that order into runs (a dynamic program over
the split points, n^2 for at most --max-running-sequences prompts).

Measured 2026-12-06 on the 2-core bench box (bench/LLAMACPP.md's model in bfloat16, chat prompts
of 29-103 tokens from its pool), the median of three waves' prefill in ms:

| PASS_TOKENS | 8 prompts (three waves) | 16 prompts (two waves) |
|---|---|---|
| one pass (no grouping) | 446, 442, 429 | 927, 1,012 |
| 128 | 432, 399, 439 | 768, 728 |
| 64 | 392, 374, 407 | 782, 742 |
| 32 | 378, 365, 382 | 710, 680 |
"""

from __future__ import annotations

from collections.abc import Sequence

# What one more pass costs, in padded prompt tokens (see the table above).
PASS_TOKENS = 32


def by_length(lengths: Sequence[int], pass_tokens: int = PASS_TOKENS) -> list[list[int]]:
    """Indices into `lengths`, grouped: the groups in order of length, each shortest first."""
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    sorted_lengths = [lengths[index] for index in order]
    # cost[j]: the least cost of the first j prompts (in sorted order); start[j]: where the last
    # group of that best split begins.
    cost = [0] + [0] * len(order)
    start = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        cost[end], start[end] = min((cost[begin] + pass_tokens + (end - begin) * sorted_lengths[end - 1], begin)
                                    for begin in range(end))
    groups: list[list[int]] = []
    end = len(order)
    while end > 0:
        groups.append(order[start[end]:end])
        end = start[end]
    return groups[::-1]
