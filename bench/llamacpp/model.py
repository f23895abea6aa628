"""The model of bench/versus_llamacpp.py: a random Llama of GPT-2-small cost, in transformers'
format and in GGUF f16 and q8_0 (llama.cpp's). From the repo root, after bench/llamacpp/build.sh:

    .venv/bin/python bench/llamacpp/model.py        # builds what is missing, prints the paths

- The tokenizer: a byte-level BPE (GPT-2's pre-tokenizer and decoder) trained with `tokenizers`
  on seeded generated text (pseudo-words drawn Zipf-like from a made-up lexicon, with capitals,
  digits and punctuation), 16384 tokens, three special ones (<|endoftext|>, <|im_start|>,
  <|im_end|>), no BOS added, a ChatML chat template.
- The model: LlamaForCausalLM, hidden 768, 12 layers, 12 heads (no grouped KV), intermediate
  3072, 2048 positions, untied head, transformers' own random initialisation (seed 0), float32.
  The head rows of the three special tokens, and of the 128 byte tokens that are not UTF-8 on
  their own (0x80-0xFF; the training text is ASCII, so no other token is), are zero: their logit
  is always 0 while the largest of the others is well above it, so greedy decoding never picks
  one. That keeps the two servers' `ignore_eos` the same thing (llama-server's biases every
  end-of-generation token to -inf, pipeserve's only does not stop at one), and makes every
  generated token a whole piece of text, which both servers stream as one content delta (a
  server holds back a token that ends inside a UTF-8 character), so deltas count tokens.
- generation_config.json has no EOS (and no BOS): random weights never meet EOS reliably, so
  every request asks for `ignore_eos` and a fixed number of tokens.
- GGUF: the llama.cpp tree's convert_hf_to_gguf.py (through bench/llamacpp/convert.py, which
  declares the BPE pre-tokenizer as "gpt-2"), --outtype f16 and --outtype q8_0, under build.sh's
  venv.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
OUT = BENCH / "out"
MODEL = OUT / "llama-small-random"
LLAMACPP = OUT / "llamacpp"
VERSION = "0.3.36"  # llama-cpp-python's, as bench/llamacpp/build.sh pins it
TREE = LLAMACPP / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
SERVER = LLAMACPP / "build" / "bin" / "llama-server"
CONVERT_PY = LLAMACPP / "venv" / "bin" / "python"
GGUF = {outtype: LLAMACPP / f"llama-small-random-{outtype}.gguf" for outtype in ("f16", "q8_0")}
VOCAB = 16384
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _lexicon(rng: random.Random, size: int) -> list[str]:
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "ch",
              "cl", "dr", "fl", "gr", "pl", "pr", "qu", "sh", "sk", "sl", "sp", "st", "str", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "y", "ai", "ea", "ee", "ie", "oa", "oo", "ou"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rk", "st", "ck", "sh", "x"]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                          for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4)))))
    return sorted(words)


def sentences(seed: int, count: int) -> list[str]:
    """Seeded made-up sentences: Zipf-like word choice, capitals, numbers, punctuation."""
    rng = random.Random(seed)
    lexicon = _lexicon(random.Random(1234), 40000)  # the same lexicon for training and prompts
    weights = [1 / (rank + 10) for rank in range(len(lexicon))]
    out = []
    for _ in range(count):
        words = rng.choices(lexicon, weights, k=rng.randrange(5, 25))
        words[0] = words[0].capitalize()
        for index in range(1, len(words)):
            roll = rng.random()
            if roll < 0.04:
                words[index] = str(rng.randrange(10 ** rng.randrange(1, 6)))
            elif roll < 0.08:
                words[index] += ","
            elif roll < 0.10:
                words[index] = words[index].capitalize()
        out.append(" ".join(words) + rng.choice([".", ".", ".", "?", "!", ";"]))
    return out


def prompts(count: int = 8) -> list[str]:
    """The benchmark's short user messages (a different seed from the training text)."""
    return [" ".join(sentences(100 + index, 2)) for index in range(count)]


def never_generated(core: object) -> list[int]:
    """The special tokens and those whose bytes are not UTF-8 on their own."""
    from tokenizers import pre_tokenizers

    byte_of = {char: byte for byte, char in enumerate(_byte_alphabet(pre_tokenizers))}
    ids = []
    for token, index in core.get_vocab().items():  # type: ignore[attr-defined]
        if token in SPECIAL:
            ids.append(index)
            continue
        try:
            bytes(byte_of[char] for char in token).decode("utf-8")
        except UnicodeDecodeError:
            ids.append(index)
    return sorted(ids)


def _byte_alphabet(pre_tokenizers: object) -> list[str]:
    """GPT-2's byte-to-character table, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())  # type: ignore[attr-defined]
    return [table[byte] for byte in range(256)]


def build_model() -> Path:
    if (MODEL / "config.json").exists():
        return MODEL
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(sentences(0, 200_000), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        unk_token=None, bos_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    MODEL.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(MODEL)
    # tokenizer_config.json as transformers 4 reads it too (the converter's venv pins 4.57.6)
    config_file = MODEL / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False)
    config_file.write_text(json.dumps(tokenizer_config, indent=2) + "\n")

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=core.get_vocab_size(), hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                         max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=core.token_to_id("<|endoftext|>"))
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[never_generated(core)] = 0
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=None,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(MODEL)
    return MODEL


def write_report(name: str, title: str, script: str, doc: str | None, table: list[str]) -> None:
    """Write bench/NAME for an in-process bench on this model: the title, when, at which commit
    and with which torch, the script's docstring after its command block, then the table."""
    import time

    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH,
                            check=False).stdout.strip()
    (BENCH / name).write_text("\n".join([
        f"# {title}",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit {commit}, torch "
        f"{torch.__version__}, 2 threads, with `.venv/bin/python bench/{script}`.",
        "",
        (doc or "").split("\n\n", 2)[2].strip(),
        "",
        *table,
        "",
    ]))


def convert() -> dict[str, Path]:
    """The GGUF files, converted by the llama.cpp tree's convert_hf_to_gguf.py where missing."""
    if not (TREE / "convert_hf_to_gguf.py").exists() or not CONVERT_PY.exists():
        raise SystemExit(f"{TREE} or {CONVERT_PY} missing: run bash bench/llamacpp/build.sh first")
    build_model()
    for outtype, path in GGUF.items():
        if not path.exists():
            subprocess.run([str(CONVERT_PY), str(Path(__file__).with_name("convert.py")), str(TREE), str(MODEL),
                            "--outtype", outtype, "--outfile", str(path)], check=True)
    return GGUF


if __name__ == "__main__":
    if sys.argv[1:] == ["--hf-only"]:
        print(build_model())
    else:
        print(build_model())
        for path in convert().values():
            print(path)
