"""Run llama.cpp's convert_hf_to_gguf.py on the bench's random Llama, its BPE pre-tokenizer
declared as GPT-2's. Runs under bench/out/llamacpp/venv (made by build.sh), not pipeserve's venv:

    bench/out/llamacpp/venv/bin/python bench/llamacpp/convert.py TREE MODEL_DIR --outtype f16 --outfile F

TREE is the llama.cpp tree (vendor/llama.cpp of llama-cpp-python's sdist); every other argument
goes to its convert_hf_to_gguf.py unchanged.

Why a wrapper: the converter names a BPE tokenizer's pre-tokenizer by hashing the tokens it
gives for a fixed test string, and refuses a hash it has no entry for (NotImplementedError:
"BPE pre-tokenizer was not recognized"). The hash depends on the vocabulary too, so a tokenizer
trained at bench time has a hash of its own, whatever its pre-tokenizer. Ours is a byte-level
BPE, whose pre-tokenizer is GPT-2's (the ByteLevel regex, no prefix space), which llama.cpp
implements as "gpt-2". This script leaves the tree untouched: it wraps TextModel.
get_vocab_base_pre (conversion/base.py) so that where the original refuses, it answers "gpt-2",
and only for a tokenizer.json whose pre-tokenizer and decoder are ByteLevel; then it runs the
converter's own main().
"""

from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path


def main() -> None:
    tree = Path(sys.argv[1]).resolve()
    model = Path(sys.argv[2]).resolve()
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    if (tokenizer["pre_tokenizer"] or {}).get("type") != "ByteLevel" or (tokenizer["decoder"] or {}).get(
            "type") != "ByteLevel":
        raise SystemExit(f"{model}/tokenizer.json is not a byte-level BPE: not declaring it GPT-2's")
    sys.path.insert(0, str(tree))
    sys.path.insert(0, str(tree / "gguf-py"))
    from conversion import base  # the tree's own package, as convert_hf_to_gguf.py imports it

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: object, tokenizer: object) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            logging.getLogger("convert").warning("bench: unknown pre-tokenizer hash; declared 'gpt-2' "
                                                 "(a byte-level BPE, see bench/llamacpp/convert.py)")
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(tree / "convert_hf_to_gguf.py"), str(model), *sys.argv[3:]]
    runpy.run_path(str(tree / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main()
