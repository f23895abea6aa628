"""Which prompts a prefill computes together: groups of similar length, in the model process.

A pass computes every row to its longest prompt (rows are left-padded), so prompts of mixed
length in one pass compute padding; each pass also has a fixed cost (a whole forward's small
operations, and narrower products that use the cores less well). The grouping that minimises
PASS_TOKENS per pass plus each group's rows x its longest is found exactly: with the prompts
sorted by length, an optimal grouping is a split of that order into runs (a dynamic program over
the split points, n^2 for at most --max-running-sequences prompts).

The engine groups whole new prompts only, and only once its caches are known to stack (a static
batch is one pass); prompts reusing a kept prefix go in one pass of their own, whose cost is
mostly the prefixes' (copying them, attending over them), which this count leaves out.

Measured 2026-12-06 on the 2-core bench box (bench/LLAMACPP.md's model in bfloat16, chat prompts
of 29-103 tokens from its pool), one `Engine.step()` that prefills a wave of waiting prompts, the
median of three rounds in ms:

| | 8 prompts (three waves) | 16 prompts (two waves) |
|---|---|---|
| one pass | 421, 435, 452 | 939, 974 |
| grouped, PASS_TOKENS 32, longest group first | 402, 379, 392 | 714, 699 |

Calling the passes directly (shortest first, no step), PASS_TOKENS 128 / 64 / 32 gave 16-prompt
waves of 768-728 / 782-742 / 710-680 ms: 32 was the best of those tried.
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
