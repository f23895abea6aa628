"""Multi-turn chat: time to first token with prefix reuse and without (issue #27 items 3 and 6).

    .venv/bin/python bench/llamacpp/model.py     # the random Llama (once; see bench/LLAMACPP.md)
    .venv/bin/python bench/prefix_reuse.py       # writes bench/PREFIX.md (about 10 minutes)

Several conversations at once, each a 1,000-token system prompt (the same for all, as one
application's is) and 8 turns: a seeded two-sentence user message, a greedy streamed reply of 32
tokens (`ignore_eos`), which goes back into the history as the assistant's message. Each
conversation sends its next turn when the previous reply has ended. Per turn: the time to the
first content delta, and the prompt tokens the server says it reused.

Servers, each alone on a free loopback port, in alternating rounds: pipeserve's defaults
(prefix reuse on) and pipeserve with `--prefix-cache-bytes 0`; llama-server f16 (its prompt
cache on, as by default, one slot per conversation) once, for reference, where it is built. The
replies of the two pipeserve runs must be identical, conversation by conversation, turn by turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from llamacpp import model as llama_model  # noqa: E402  (bench/llamacpp/model.py)
from run_all import Running, machine  # noqa: E402

PY = sys.executable
SYSTEM_TOKENS = 1000
TURNS = 8
REPLY_TOKENS = 32
CONVERSATIONS = 4
OUT = BENCH / "out" / "prefix"


def servers() -> dict[str, dict[str, Any]]:
    pipeserve = [PY, "-m", "pipeserve", "--model", str(llama_model.MODEL), "--log-level", "warning"]
    found = {
        "pipeserve (reuse on)": {"command": pipeserve, "ready": "/ready"},
        "pipeserve --prefix-cache-bytes 0": {"command": [*pipeserve, "--prefix-cache-bytes", "0"], "ready": "/ready"},
    }
    if llama_model.SERVER.exists() and llama_model.GGUF["f16"].exists():
        found["llama-server f16"] = {"command": [
            str(llama_model.SERVER), "-m", str(llama_model.GGUF["f16"]), "--host", "127.0.0.1",
            "-c", str(CONVERSATIONS * 2048), "--parallel", str(CONVERSATIONS), "-t", "2", "-tb", "2",
            "--cont-batching", "--no-webui", "--log-disable"], "ready": "/health"}
    return found


def system_prompt(tokenizer: Any) -> str:
    """Seeded sentences up to SYSTEM_TOKENS tokens."""
    text = ""
    for sentence in llama_model.sentences(11, 4000):
        longer = f"{text} {sentence}".strip()
        if len(tokenizer(longer, add_special_tokens=False)["input_ids"]) > SYSTEM_TOKENS:
            return text
        text = longer
    return text


def user_messages(conversation: int) -> list[str]:
    made = llama_model.sentences(100 + conversation, 2 * TURNS)
    return [f"{made[2 * turn]} {made[2 * turn + 1]}" for turn in range(TURNS)]


async def conversation(session: aiohttp.ClientSession, url: str, system: str, index: int) -> list[dict[str, Any]]:
    history = [{"role": "system", "content": system}]
    turns = []
    for message in user_messages(index):
        history.append({"role": "user", "content": message})
        body = {"model": "llama-small-random", "messages": history, "max_tokens": REPLY_TOKENS, "temperature": 0,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        started, first, reply, usage = time.monotonic(), None, "", {}
        async with session.post(url, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
            async for line in response.content:
                if not line.startswith(b"data:") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"])[:300])
                usage = chunk.get("usage") or usage
                choices = chunk.get("choices") or []
                content = (choices[0].get("delta") or {}).get("content") if choices else None
                if content:
                    first = first if first is not None else time.monotonic()
                    reply += content
        details = usage.get("prompt_tokens_details") or {}
        turns.append({"ttft_s": (first or time.monotonic()) - started, "total_s": time.monotonic() - started,
                      "prompt_tokens": usage.get("prompt_tokens"), "cached_tokens": details.get("cached_tokens"),
                      "completion_tokens": usage.get("completion_tokens"), "reply": reply})
        history.append({"role": "assistant", "content": reply})
    return turns


async def run(port: int, system: str) -> list[list[dict[str, Any]]]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    connector = aiohttp.TCPConnector(force_close=True, limit=0)  # llama-server closes after a stream
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900), connector=connector) as session:
        return list(await asyncio.gather(*(conversation(session, url, system, index)
                                           for index in range(CONVERSATIONS))))


def summary(conversations: list[list[dict[str, Any]]]) -> dict[str, Any]:
    def ms(values: list[float]) -> float:
        return round(statistics.median(values) * 1000, 1)

    by_turn = [[c[turn]["ttft_s"] for c in conversations] for turn in range(TURNS)]
    later = [value for turn in by_turn[1:] for value in turn]
    cached = [c[turn]["cached_tokens"] or 0 for c in conversations for turn in range(1, TURNS)]
    prompts = [c[turn]["prompt_tokens"] or 0 for c in conversations for turn in range(1, TURNS)]
    return {"ttft_median_ms_by_turn": [ms(turn) for turn in by_turn], "ttft_median_ms_turns_2_8": ms(later),
            "ttft_max_ms_turns_2_8": round(max(later) * 1000, 1),
            "cached_share_turns_2_8": round(sum(cached) / max(1, sum(prompts)), 3),
            "last_prompt_tokens": [c[-1]["prompt_tokens"] for c in conversations],
            "completion_tokens_all_32": all(t["completion_tokens"] == REPLY_TOKENS for c in conversations for t in c),
            "conversation_seconds": round(max(sum(t["total_s"] for t in c) for c in conversations), 1)}


def render(results: dict[str, Any], facts: dict[str, str], command: str, identical: str) -> str:
    lines = [
        "# Multi-turn chat: prefix reuse",
        "",
        f"Measured {facts.get('date', '')} at commit {facts.get('commit', '')} on {facts.get('cpu', '')}, "
        f"with `{command}`.",
        "",
        f"{CONVERSATIONS} conversations at once, each a {SYSTEM_TOKENS}-token system prompt (the same for all) and "
        f"{TURNS} turns of a seeded two-sentence user message and a greedy streamed reply of {REPLY_TOKENS} tokens "
        "(`ignore_eos`), which goes back into the history. The model: bench/llamacpp/model.py's random Llama of "
        "GPT-2-small cost (bench/LLAMACPP.md); pipeserve with its defaults (float32 for this model, one worker "
        "with both cores).",
        "",
        "| server | round | TTFT median, turn 1 | turns 2–8 median | turns 2–8 max | prompt share reused, turns 2–8 "
        "| last prompt tokens | longest conversation s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rounds in results.items():
        for number, row in enumerate(rounds, 1):
            s = row["summary"]
            lines.append(f"| {name} | {number} | {s['ttft_median_ms_by_turn'][0]:.0f} ms | "
                         f"{s['ttft_median_ms_turns_2_8']:.0f} ms | {s['ttft_max_ms_turns_2_8']:.0f} ms | "
                         f"{s['cached_share_turns_2_8']:.1%} | {min(s['last_prompt_tokens'])}–"
                         f"{max(s['last_prompt_tokens'])} | {s['conversation_seconds']} |")
    lines += ["", "TTFT median by turn (ms):", "", "| server | round | " + " | ".join(
        str(turn + 1) for turn in range(TURNS)) + " |", "|---|---|" + "---|" * TURNS]
    for name, rounds in results.items():
        for number, row in enumerate(rounds, 1):
            lines.append(f"| {name} | {number} | " + " | ".join(
                f"{value:.0f}" for value in row["summary"]["ttft_median_ms_by_turn"]) + " |")
    on, off = results.get("pipeserve (reuse on)", []), results.get("pipeserve --prefix-cache-bytes 0", [])
    ratios = [b["summary"]["ttft_median_ms_turns_2_8"] / a["summary"]["ttft_median_ms_turns_2_8"]
              for a, b in zip(on, off, strict=False)]
    lines += ["", f"Turns 2–8, TTFT median without reuse / with reuse, per round: "
                  f"{', '.join(f'{ratio:.1f}x' for ratio in ratios)}.",
              f"Replies with and without reuse: {identical}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two pipeserve runs")
    parser.add_argument("--output", default=str(BENCH / "PREFIX.md"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    llama_model.build_model()
    system = system_prompt(AutoTokenizer.from_pretrained(llama_model.MODEL))
    found = servers()
    order = [name for name in found if name.startswith("pipeserve")] * args.rounds
    order += [name for name in found if not name.startswith("pipeserve")]
    results: dict[str, list[dict[str, Any]]] = {}
    for name in order:
        print(f"-- {name}", flush=True)
        server = Running(found[name]["command"], found[name]["ready"])
        try:
            conversations = asyncio.run(run(server.port, system))
        finally:
            server.stop()
        row = {"summary": summary(conversations), "conversations": conversations}
        print(f"   {row['summary']}", flush=True)
        results.setdefault(name, []).append(row)
    replies = {name: [[t["reply"] for t in c] for c in row["conversations"]]
               for name, rounds in results.items() for row in rounds[:1]}
    on_off = [[[t["reply"] for t in c] for c in row["conversations"]]
              for name in ("pipeserve (reuse on)", "pipeserve --prefix-cache-bytes 0") for row in results[name]]
    same = all(run == on_off[0] for run in on_off)
    identical = (f"identical in all {len(on_off)} runs ({CONVERSATIONS * TURNS} replies each)" if same
                 else "DIFFERENT")
    facts = machine()
    command = " ".join([".venv/bin/python", "bench/prefix_reuse.py", *sys.argv[1:]])
    text = render(results, facts, command, identical)
    Path(args.output).write_text(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({"machine": facts, "command": command, "results": results,
                                                  "replies": replies, "identical": same}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
