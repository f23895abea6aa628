"""Streamed chat generation: pipeserve against llama.cpp's llama-server (issue #27 item 1).

    nice -n 19 bash bench/llamacpp/build.sh            # llama-server + the converter's venv (~11 min)
    .venv/bin/python bench/llamacpp/model.py           # the random Llama, HF + GGUF f16/q8_0 (~4 min)
    .venv/bin/python bench/versus_llamacpp.py          # writes bench/LLAMACPP.md (about 15 minutes)
    .venv/bin/python bench/versus_llamacpp.py --quick  # a smoke run, written to bench/out/llamacpp/

llama-server is built with cmake from the llama.cpp tree inside llama-cpp-python's sdist on PyPI
(the Python package's own server runs one request at a time, so it is not the peer). The model
(bench/llamacpp/model.py): a random Llama of GPT-2-small cost (768 wide, 12 layers, 16384-token
byte-level BPE trained at bench time), converted by that tree's convert_hf_to_gguf.py.

Servers, each alone on a free loopback port: llama-server f16 and q8_0 (32 slots, 2 threads,
continuous batching), pipeserve with its defaults (`--dtype auto`: of float32, bfloat16 and int8
weights, the fastest whose greedy answers agree with float32's at load), with --dtype bfloat16
and with --dtype int8 (8-bit activations with AVX-512 VNNI, float32 between the layers). Each
client sends streamed OpenAI /v1/chat/completions requests one after another (a fresh seeded
two-sentence user message each, the same sequence for every server), greedy, 64 new tokens,
`ignore_eos`, and records when each content delta arrives. Figures per server and concurrency:
tokens/s over the measured period, TTFT p50/p99, inter-token p99; every finished stream is
checked to have 64 content deltas and usage.completion_tokens 64.

Agreement, before the load on each server, one request at a time: the greedy 64 tokens for 8
prompts against transformers' float32 `generate` on the same weights, compared as token ids
(llama-server: /completion with the prompt as token ids and return_tokens; pipeserve: TGI's
/generate with details). Per server: the mean share of tokens equal up to the first divergence,
and how many of the 8 matched all 64.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from generation import record_arrival  # noqa: E402
from llamacpp import model as llama_model  # noqa: E402  (bench/llamacpp/model.py)
from run_all import Running, machine  # noqa: E402

PY = sys.executable
LEVELS = (1, 4, 16, 32)
NEW_TOKENS = 64
SLOTS = 32
THREADS = 2
AGREEMENT_PROMPTS = 8
OUT = llama_model.LLAMACPP


# --- the servers ---------------------------------------------------------------------------------

def slot_context() -> int:
    """The KV room per llama-server slot: the longest prompt of the pool plus 64, rounded up to 64."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_model.MODEL)
    longest = max(len(prompt_ids(tokenizer, text)) for text in prompt_pool())
    return -(-(longest + NEW_TOKENS) // 64) * 64


def servers(slot: int) -> dict[str, dict[str, Any]]:
    pipeserve = [PY, "-m", "pipeserve", "--model", str(llama_model.MODEL), "--log-level", "warning"]

    def llama(outtype: str) -> list[str]:
        return [str(llama_model.SERVER), "-m", str(llama_model.GGUF[outtype]), "--host", "127.0.0.1",
                "-c", str(SLOTS * slot), "--parallel", str(SLOTS), "-t", str(THREADS), "-tb", str(THREADS),
                "--cont-batching", "--no-webui", "--log-disable"]

    return {
        f"llama-server f16 ({SLOTS} slots)": {"command": llama("f16"), "ready": "/health", "kind": "llama"},
        f"llama-server q8_0 ({SLOTS} slots)": {"command": llama("q8_0"), "ready": "/health", "kind": "llama"},
        "pipeserve defaults": {"command": pipeserve, "ready": "/ready", "kind": "pipeserve"},
        "pipeserve --dtype bfloat16": {"command": [*pipeserve, "--dtype", "bfloat16"], "ready": "/ready",
                                       "kind": "pipeserve"},
        "pipeserve --dtype int8": {"command": [*pipeserve, "--dtype", "int8"], "ready": "/ready", "kind": "pipeserve"},
    }


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return json.load(response)


def _post(port: int, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def setting(port: int, kind: str) -> str:
    if kind == "pipeserve":
        info = _get(port, "/info")
        workers = info["workers"]
        note = (info.get("precision") or {}).get("note")
        return (f"{len(workers)} worker(s) x {workers[0]['threads']} thread(s), {info['dtype']}"
                + (f" ({note})" if note else ""))
    props = _get(port, "/props")
    settings = props.get("default_generation_settings", {})
    return f"{props.get('total_slots')} slots x {settings.get('n_ctx', '?')} positions, {THREADS} threads"


# --- prompts ---------------------------------------------------------------------------------------

_POOL: list[str] = []


def prompt_pool() -> list[str]:
    """4096 seeded two-sentence user messages; request n of client c at level L takes one by a
    seeded draw, so every server gets the same sequence."""
    if not _POOL:
        made = llama_model.sentences(7, 8192)
        _POOL.extend(f"{made[2 * i]} {made[2 * i + 1]}" for i in range(4096))
    return _POOL


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """The token ids both servers must see for one user message: the chat template, then the
    tokenizer without special tokens added (what pipeserve does for a chat request)."""
    templated = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=False)
    return list(tokenizer(templated, add_special_tokens=False)["input_ids"])


# --- agreement -------------------------------------------------------------------------------------

def reference(texts: list[str]) -> dict[str, Any]:
    """transformers float32 greedy: prompt ids and the 64 generated ids per prompt (cached)."""
    cache = OUT / "reference.json"
    weights = llama_model.MODEL / "model.safetensors"
    key = f"{weights.stat().st_size}:{weights.stat().st_mtime_ns}:{NEW_TOKENS}:margins"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key and cached.get("texts") == texts:
            return cached
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_model.MODEL)
    model = AutoModelForCausalLM.from_pretrained(llama_model.MODEL, dtype=torch.float32).eval()
    prompts, generated, margins = [], [], []
    with torch.inference_mode():
        for text in texts:
            ids = prompt_ids(tokenizer, text)
            output = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
            prompts.append(ids)
            generated.append(output[0, len(ids):].tolist())
            # How near a tie each greedy choice was: float32's top-1 minus top-2 logit per step.
            logits = model(output).logits[0, len(ids) - 1:-1]
            top = logits.topk(2, dim=-1).values
            margins.append((top[:, 0] - top[:, 1]).tolist())
    templated = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=False) for text in texts]
    result = {"key": key, "texts": texts, "templated": templated, "prompt_ids": prompts, "generated": generated,
              "margins": margins}
    cache.write_text(json.dumps(result))
    return result


def server_tokens(port: int, kind: str, ref: dict[str, Any]) -> tuple[list[list[int]], dict[str, Any]]:
    """Each prompt's greedy 64 token ids from a server, one request at a time, and checks that it
    tokenizes the chat prompt as transformers does."""
    out, checks = [], {"prompt_ids_equal": 0, "prompts": len(ref["texts"])}
    for text, templated, ids in zip(ref["texts"], ref["templated"], ref["prompt_ids"]):
        if kind == "llama":
            # The chat path's prompt: llama-server's own template, then its own tokenizer.
            applied = _post(port, "/apply-template", {"messages": [{"role": "user", "content": text}]})["prompt"]
            tokens = _post(port, "/tokenize", {"content": applied, "add_special": False,
                                               "parse_special": True})["tokens"]
            checks["prompt_ids_equal"] += int(applied == templated and tokens == ids)
            answer = _post(port, "/completion", {"prompt": ids, "n_predict": NEW_TOKENS, "temperature": 0,
                                                 "ignore_eos": True, "return_tokens": True, "cache_prompt": False})
            out.append(list(answer["tokens"]))
        else:
            # pipeserve tokenizes with the model's own tokenizer (the reference's), so its chat
            # path sees `ids`; /generate takes the templated text and answers ids with details.
            answer = _post(port, "/generate", {"inputs": templated, "parameters": {
                "max_new_tokens": NEW_TOKENS, "do_sample": False, "ignore_eos": True, "details": True}})
            out.append([token["id"] for token in answer["details"]["tokens"]])
            checks["prompt_ids_equal"] = "same tokenizer"
    return out, checks


def agreement(tokens: list[list[int]], ref: dict[str, Any]) -> dict[str, Any]:
    """Prefix share, full matches, and where each prompt diverged with float32's top-2 logit
    margin at that step (a divergence at a near tie is the arithmetic's noise, not a defect)."""
    prefixes, divergences = [], []
    for got, want, margins in zip(tokens, ref["generated"], ref["margins"]):
        same = 0
        while same < min(len(got), len(want)) and got[same] == want[same]:
            same += 1
        prefixes.append(same / len(want))
        divergences.append(None if same == len(want) else (same, margins[same]))
    return {"prefix_share": sum(prefixes) / len(prefixes), "full_matches": sum(p == 1.0 for p in prefixes),
            "prompts": len(prefixes), "divergences": divergences}


# --- load ------------------------------------------------------------------------------------------

async def client(session: aiohttp.ClientSession, url: str, extra: dict[str, Any], rng: random.Random,
                 stop_at: float, measure_from: float, record: dict[str, list[Any]]) -> None:
    pool = prompt_pool()
    # Fixed-length streams that all start together end together and come back together: a wave
    # (32 joint prefills, then 64 steps of decoding only). Spread the first requests over the
    # first half of the warm-up (seeded), so that the measured period sees a steady mix.
    await asyncio.sleep(rng.uniform(0, max(0.0, measure_from - time.monotonic()) / 2))
    while time.monotonic() < stop_at:
        body = {"model": "llama-small-random", "messages": [{"role": "user", "content": rng.choice(pool)}],
                "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}, **extra}
        started = time.monotonic()
        last, deltas, usage, finished = None, 0, None, False
        try:
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    record["errors"].append(f"HTTP {response.status}: {(await response.text())[:200]}")
                    await asyncio.sleep(0.1)
                    continue
                async for line in response.content:
                    if not line.startswith(b"data:"):
                        continue
                    if line.startswith(b"data: [DONE]"):
                        finished = True
                        break
                    chunk = json.loads(line[5:])
                    if "error" in chunk:  # a stream cut short: counted, not hidden
                        record["errors"].append(str(chunk["error"])[:200])
                        break
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    choices = chunk.get("choices") or []
                    if not choices or not (choices[0].get("delta") or {}).get("content"):
                        continue
                    now = time.monotonic()
                    deltas += 1
                    record_arrival(record, now, last, started, measure_from <= now < stop_at)
                    last = now
        except aiohttp.ClientError as exc:  # a connection failure: counted, not hidden
            record["errors"].append(repr(exc)[:200])
            continue
        if finished:
            record["streams"].append((deltas, (usage or {}).get("completion_tokens")))


async def level(port: int, extra: dict[str, Any], clients: int, warmup: float, seconds: float) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    prompt_pool()  # made before the clock starts (seconds, the first time)
    record: dict[str, list[Any]] = {"tokens": [], "ttft": [], "gaps": [], "errors": [], "streams": []}
    measure_from = time.monotonic() + warmup
    stop_at = measure_from + seconds
    # A fresh connection per request for every server: llama-server closes a connection after a
    # stream (a reused one fails on the next request), pipeserve keeps it; loopback connects are
    # well under a millisecond.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None), connector=connector) as session:
        tasks = [asyncio.create_task(client(session, url, extra, random.Random(1000 * clients + index), stop_at,
                                            measure_from, record)) for index in range(clients)]
        await asyncio.wait(tasks, timeout=stop_at - time.monotonic() + 1)
        for task in tasks:  # what is still running counts no more: stop it
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def pct(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, round(q * (len(values) - 1)))] * 1000 if values else float("nan")

    wrong = [stream for stream in record["streams"] if stream != (NEW_TOKENS, NEW_TOKENS)]
    return {"tokens_per_s": len(record["tokens"]) / seconds, "ttft_p50_ms": pct(record["ttft"], 0.5),
            "ttft_p99_ms": pct(record["ttft"], 0.99), "inter_token_p99_ms": pct(record["gaps"], 0.99),
            "streams_finished": len(record["streams"]), "streams_not_64": len(wrong), "not_64_examples": wrong[:5],
            "errors": len(record["errors"]), "error_examples": record["errors"][:3]}


# --- the report ------------------------------------------------------------------------------------

def _ratio(results: dict[str, Any], numerator: str, denominator: str, clients: int, field: str) -> str:
    try:
        a = results[numerator]["levels"][str(clients)][field]
        b = results[denominator]["levels"][str(clients)][field]
    except KeyError:
        return "n/a"
    return f"{a / b:.2f}×" if b else "n/a"


def render(results: dict[str, Any], facts: dict[str, str], command: str, warmup: float, seconds: float,
           slot: int) -> str:
    lines = ["# Streamed chat generation: pipeserve and llama.cpp's llama-server", "",
             f"Measured {facts['date']} at commit {facts['commit']} on {facts['cores']} cores ({facts['cpu']}), "
             f"torch {facts['torch']}, transformers {facts['transformers']}, llama.cpp {results['_llamacpp']}, "
             f"with `{command}`.", "",
             f"The model: a random Llama of GPT-2-small cost (768 wide, 12 layers, 12 heads, MLP 3072, "
             f"untied head, a 16384-token byte-level BPE trained at bench time; `bench/llamacpp/model.py`), "
             f"float32 for transformers and pipeserve, GGUF f16 and q8_0 by the tree's `convert_hf_to_gguf.py`. "
             f"Streamed OpenAI `/v1/chat/completions`, a fresh two-sentence user message per request "
             f"(the same seeded sequence for every server), greedy, {NEW_TOKENS} new tokens, `ignore_eos`; "
             f"{warmup:g} s warm-up, then {seconds:g} s measured per level. llama-server: `--parallel {SLOTS} "
             f"-c {SLOTS * slot} -t {THREADS} -tb {THREADS} --cont-batching` ({slot} positions per slot), its "
             f"defaults otherwise (prompt cache on, flash attention auto, f16 KV cache).", "",
             "| server | setting | streams | tokens/s | TTFT p50 ms | TTFT p99 ms | inter-token p99 ms | "
             "streams finished | not 64 tokens | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        if name.startswith("_") or "levels" not in result:
            continue
        for clients, row in result["levels"].items():
            lines.append(f"| {name} | {result['setting'].replace('|', '/')} | {clients} | {row['tokens_per_s']:.1f} | "
                         f"{row['ttft_p50_ms']:.0f} | {row['ttft_p99_ms']:.0f} | {row['inter_token_p99_ms']:.0f} | "
                         f"{row['streams_finished']} | {row['streams_not_64']} | {row['errors']} |")
    lines += ["", "## Greedy agreement with transformers float32", "",
              f"{AGREEMENT_PROMPTS} prompts, {NEW_TOKENS} greedy tokens each, one request at a time, compared as "
              "token ids (llama-server: `/completion` with the prompt as the reference's token ids and "
              "`return_tokens`; pipeserve: `/generate` with `details`). Prefix share: the mean share of the "
              f"{NEW_TOKENS} tokens equal to float32's up to the first divergence.", "",
              "| server | prefix share | all 64 equal | where the others diverged (step: float32's top-2 "
              "logit margin there) | chat prompt tokenized as transformers does |", "|---|---|---|---|---|"]
    for name, result in results.items():
        if name.startswith("_") or "agreement" not in result:
            continue
        agree = result["agreement"]
        checks = result["prompt_check"]
        tokenized = (checks["prompt_ids_equal"] if isinstance(checks["prompt_ids_equal"], str)
                     else f"{checks['prompt_ids_equal']}/{checks['prompts']}")
        where = ", ".join(f"{step}: {margin:.1e}" for step, margin in
                          (d for d in agree["divergences"] if d is not None)) or "-"
        lines.append(f"| {name} | {agree['prefix_share']:.1%} | {agree['full_matches']}/{agree['prompts']} | "
                     f"{where} | {tokenized} |")
    pairs = [("pipeserve --dtype bfloat16", f"llama-server f16 ({SLOTS} slots)", "16-bit weights (bf16 vs f16)"),
             ("pipeserve defaults", f"llama-server f16 ({SLOTS} slots)", "defaults vs f16"),
             ("pipeserve --dtype int8", f"llama-server q8_0 ({SLOTS} slots)", "8-bit weights (int8 vs q8_0)"),
             ("pipeserve --dtype bfloat16", f"llama-server q8_0 ({SLOTS} slots)", "bf16 vs q8_0"),
             ("pipeserve defaults", f"llama-server q8_0 ({SLOTS} slots)", "defaults vs q8_0")]
    lines += ["", "## Ratios (pipeserve / llama-server)", "",
              "| pipeserve | llama-server | class | streams | tokens/s | TTFT p99 | inter-token p99 |",
              "|---|---|---|---|---|---|---|"]
    for mine, theirs, label in pairs:
        for clients in LEVELS:
            if str(clients) not in results.get(mine, {}).get("levels", {}):
                continue
            lines.append(f"| {mine} | {theirs} | {label} | {clients} | "
                         f"{_ratio(results, mine, theirs, clients, 'tokens_per_s')} | "
                         f"{_ratio(results, mine, theirs, clients, 'ttft_p99_ms')} | "
                         f"{_ratio(results, mine, theirs, clients, 'inter_token_p99_ms')} |")
    lines += ["", "## Commands", "", "From the repo root; each server command gets `--port N` appended (a free port).",
              "", "```", "nice -n 19 bash bench/llamacpp/build.sh", ".venv/bin/python bench/llamacpp/model.py",
              command, *(f"# {name}:\n{line}" for name, line in results.get("_commands", {}).items()), "```"]
    return "\n".join(lines) + "\n"


def shown(command: list[str]) -> str:
    """A command as typed from the repo root."""
    root = str(BENCH.parent) + "/"
    return " ".join(".venv/bin/python" if part == PY else part.replace(root, "") for part in command)


def llamacpp_version() -> str:
    import subprocess

    try:
        return subprocess.run([str(llama_model.SERVER), "--version"], capture_output=True, text=True,
                              timeout=30).stderr.strip().splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


def measure_server(spec: dict[str, Any], ref: dict[str, Any], levels: list[int], warmup: float,
                   seconds: float) -> dict[str, Any]:
    """Agreement first (one request at a time), then each concurrency level, on one fresh server."""
    server = Running(spec["command"], spec["ready"])
    try:
        tokens, checks = server_tokens(server.port, spec["kind"], ref)
        result: dict[str, Any] = {"setting": setting(server.port, spec["kind"]),
                                  "agreement": agreement(tokens, ref), "prompt_check": checks,
                                  "levels": {}}
        print(f"   {result['setting']}; agreement {result['agreement']}; prompts {checks}", flush=True)
        for clients in levels:
            row = asyncio.run(level(server.port, {}, clients, warmup, seconds))
            result["levels"][str(clients)] = row
            print(f"   C={clients}: {row}", flush=True)
        return result
    finally:
        server.stop()


STALE_READING = "**Written for an earlier run: the tables above are new; rewrite this.**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: short levels, written under bench/out")
    parser.add_argument("--servers", default="", help="only the servers whose name contains one of these (comma-separated)")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent streams, comma-separated")
    parser.add_argument("--warmup", type=float, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--output", default=None)
    parser.add_argument("--render", action="store_true", help="only rewrite the report from the last results.json")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    wanted = [part for part in args.servers.split(",") if part]
    warmup, seconds = (2.0, 5.0) if args.quick else (10.0, 20.0)
    warmup = args.warmup if args.warmup is not None else warmup
    seconds = args.seconds if args.seconds is not None else seconds
    output = Path(args.output or (OUT / "LLAMACPP-quick.md" if args.quick else BENCH / "LLAMACPP.md"))
    if args.render:
        saved = json.loads((OUT / ("results-quick.json" if args.quick else "results.json")).read_text())
        # The hand-written reading below the tables stays: the numbers it reads are the same.
        reading = output.read_text().partition("\n## Reading")[2] if output.exists() else ""
        output.write_text(render(saved["results"], saved["machine"], saved["command"], saved["warmup_s"],
                                 saved["seconds_s"], saved["slot"]) + (f"\n## Reading{reading}" if reading else ""))
        print(f"wrote {output}")
        return
    missing = [path for path in (llama_model.SERVER, *llama_model.GGUF.values()) if not path.exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(map(str, missing))}: run bash bench/llamacpp/build.sh, then "
                         ".venv/bin/python bench/llamacpp/model.py")
    llama_model.build_model()
    slot = slot_context()
    print("-- transformers float32 reference", flush=True)
    ref = reference(llama_model.prompts(AGREEMENT_PROMPTS))
    results: dict[str, Any] = {"_llamacpp": f"`{llamacpp_version()}` from llama-cpp-python "
                                            f"{llama_model.VERSION}'s sdist"}
    for name, spec in servers(slot).items():
        if wanted and not any(part in name for part in wanted):
            continue
        print(f"-- {name}", flush=True)
        results.setdefault("_commands", {})[name] = shown(spec["command"])
        results[name] = measure_server(spec, ref, levels, warmup, seconds)
    facts = machine()
    command = " ".join([".venv/bin/python", "bench/versus_llamacpp.py", *sys.argv[1:]])
    output.parent.mkdir(parents=True, exist_ok=True)
    text = render(results, facts, command, warmup, seconds, slot)
    # The hand-written reading is kept, marked (once) as an earlier run's, for its author to rewrite.
    reading = output.read_text().partition("\n## Reading")[2] if output.exists() else ""
    if reading:
        reading = reading.lstrip("\n").removeprefix(STALE_READING).lstrip("\n")
        text += f"\n## Reading\n\n{STALE_READING}\n\n{reading}"
    output.write_text(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ("results-quick.json" if args.quick else "results.json")).write_text(
        json.dumps({"machine": facts, "command": command, "warmup_s": warmup, "seconds_s": seconds, "slot": slot,
                    "results": results}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
