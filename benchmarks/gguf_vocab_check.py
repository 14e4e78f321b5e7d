"""Tokenize llama.cpp's vocabulary test inputs with tricklm and compare with llama.cpp's expected tokens.

llama.cpp ships vocabulary-only GGUF files with inputs and the token ids its own tokenizer gives them
(`models/ggml-vocab-NAME.gguf`, `.gguf.inp`, `.gguf.out`; the llama-cpp-python sdist carries them under
`vendor/llama.cpp/models`). This builds each file's tokenizer as `tricklm serve` does and counts the
inputs whose ids match exactly.

    .venv/bin/python benchmarks/gguf_vocab_check.py --models DIR llama-bpe qwen2 phi-3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from tricklm.model.weights.gguf_config import _metadata, _save_tokenizer
from tricklm.model.weights.gguf_file import open_reader
from tricklm.tokenizer import Tokenizer

SEPARATOR = "\n__ggml_vocab_test__\n"


def check(models: Path, name: str) -> tuple[int, int, list[str]]:
    """(inputs matched, inputs, the first mismatches described)."""
    file = models / f"ggml-vocab-{name}.gguf"
    out = Path(tempfile.mkdtemp(prefix="vocab-"))
    try:
        _save_tokenizer(file, out, _metadata(open_reader(file)))
        tok = Tokenizer(out)
        inputs = file.with_suffix(".gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)
        expected = file.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
        matched, misses = 0, []
        for text, ids in zip(inputs, expected, strict=False):
            want = [int(x) for x in ids.split()]
            got = tok.encode(text, add_special_tokens=False, parse_control=False)
            matched += got == want
            if got != want and len(misses) < 3:
                misses.append(f"{text[:30]!r}: llama.cpp {want[:8]}, tricklm {got[:8]}")
        return matched, min(len(inputs), len(expected)), misses
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, required=True, help="llama.cpp's models/ folder")
    p.add_argument("names", nargs="+", help="vocabularies, e.g. llama-bpe qwen2 phi-3")
    args = p.parse_args()
    for name in args.names:
        matched, total, misses = check(args.models, name)
        print(f"{name}: {matched}/{total} inputs tokenized as llama.cpp does")
        for miss in misses:
            print(f"  {miss}")


if __name__ == "__main__":
    main()
