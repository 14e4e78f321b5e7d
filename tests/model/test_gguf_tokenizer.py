"""SentencePiece vocabularies in GGUF files (`tokenizer.ggml.model` = "llama": tokens, scores and token types,
as Llama 2, TinyLlama, Gemma and Phi-3 files carry them) become working tokenizers: text round-trips, bytes
outside the vocabulary fall back to byte tokens, and BOS is added as `tokenizer.ggml.add_bos_token` says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter, TokenType

from tricklm.model.config import ModelLoadError
from tricklm.model.weights.gguf_config import convert_gguf
from tricklm.tokenizer import Tokenizer

SPACE = "\u2581"  # SentencePiece's visible space
WORDS = ["the", "capital", "of", "france", "is", "paris", "hello", "world"]
SPECIALS = [("<unk>", TokenType.UNKNOWN), ("<s>", TokenType.CONTROL), ("</s>", TokenType.CONTROL)]
BOS_ID, EOS_ID = 1, 2
# Uppercase letters, an accent and an emoji are not in the vocabulary: they go through the byte tokens.
# (Texts that start with a space: `test_llama_files_keep_a_leading_space`.)
TEXTS = ["hello world", "The capital of France is Paris.", "Hé, 😀 world!\nthe end", "two  spaces"]


def spm_vocab() -> tuple[list[str], list[float], list[TokenType]]:
    """A small SentencePiece BPE vocabulary laid out as llama.cpp writes one: specials, 256 byte tokens,
    then pieces (single characters, then every prefix of each word after a space) with falling scores."""
    pieces = [SPACE, *sorted(set("".join(WORDS) + ".,!"))]
    for word in WORDS:
        pieces += [p for n in range(2, len(word) + 2) if (p := (SPACE + word)[:n]) not in pieces]
    tokens = [t for t, _ in SPECIALS] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    types = [k for _, k in SPECIALS] + [TokenType.BYTE] * 256 + [TokenType.NORMAL] * len(pieces)
    return tokens, scores, types


def write_gguf(path: Path, arch: str, add_bos: bool, tokenizer_model: str = "llama") -> Path:
    """A GGUF file with a tiny model's metadata, its token table, and the vocabulary above."""
    tokens, scores, types = spm_vocab()
    writer = GGUFWriter(str(path), arch)
    for key, value in {
        "block_count": 1, "context_length": 64, "embedding_length": 32, "feed_forward_length": 64,
        "attention.head_count": 2, "attention.head_count_kv": 1, "attention.key_length": 16,
        "attention.value_length": 16, "attention.sliding_window": 8, "vocab_size": len(tokens),
    }.items():  # fmt: skip
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    return finished(writer, len(tokens), path)


def finished(writer: GGUFWriter, vocab_size: int, path: Path) -> Path:
    """The file written: a zero token table of the vocabulary's size (what a loader sizes it by), then out."""
    writer.add_tensor("token_embd.weight", np.zeros((vocab_size, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tokenizer_of(tmp_path: Path, arch: str, add_bos: bool) -> Tokenizer:
    file = write_gguf(tmp_path / f"{arch}.gguf", arch, add_bos)
    convert_gguf(file, tmp_path / arch, progress=False)
    return Tokenizer(tmp_path / arch)


# transformers builds each family's SentencePiece tokenizer its own way (Gemma: no space prefix, merges in
# file order; Phi-3: the prefix from a normalizer), so each is checked
@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
@pytest.mark.parametrize("add_bos", [True, False])
def test_a_sentencepiece_vocabulary_round_trips(tmp_path: Path, arch: str, add_bos: bool) -> None:
    tok = tokenizer_of(tmp_path, arch, add_bos)
    for text in TEXTS:
        ids = tok.encode(text)
        assert (ids[0] == BOS_ID) == add_bos and BOS_ID not in ids[1:] and EOS_ID not in ids, ids
        assert tok.decode(ids) == text
    assert tok.bos_token == "<s>" and EOS_ID in tok.eos_token_ids


@pytest.mark.parametrize(
    ("arch", "pieces"), [("llama", ["▁hello", "▁world"]), ("gemma3", ["h", "e", "l", "l", "o", "▁world"])]
)
def test_words_become_the_vocabulary_pieces(tmp_path: Path, arch: str, pieces: list[str]) -> None:
    """Llama's files prefix the text with a space, Gemma's do not: the words come out as those pieces."""
    tok = tokenizer_of(tmp_path, arch, add_bos=False)
    assert [tok.id_to_token(i) for i in tok.encode("hello world")] == pieces


def test_llama_files_keep_a_leading_space(tmp_path: Path) -> None:
    """SentencePiece's dummy prefix goes before every text, one that starts with a space too, as llama.cpp
    and Llama 2's own tokenizer do (transformers' GGUF converter added none there, and " two" decoded as
    "two")."""
    tok = tokenizer_of(tmp_path, "llama", add_bos=False)
    assert [tok.id_to_token(i) for i in tok.encode(" hello")] == [SPACE, SPACE + "hello"]
    assert [tok.id_to_token(i) for i in tok.encode("hello")] == [SPACE + "hello"]
    for text in (" hello", "  two spaces", " ", "hello world "):
        assert tok.decode(tok.encode(text)) == text


def test_bytes_outside_the_vocabulary_use_byte_tokens(tmp_path: Path) -> None:
    tok = tokenizer_of(tmp_path, "llama", add_bos=False)
    ids = tok.encode("é")
    assert [tok.id_to_token(i) for i in ids] == [SPACE, "<0xC3>", "<0xA9>"]


def test_an_unknown_tokenizer_model_fails_with_one_line(tmp_path: Path) -> None:
    file = write_gguf(tmp_path / "rwkv.gguf", "llama", add_bos=True, tokenizer_model="rwkv")
    with pytest.raises(ModelLoadError, match=r"rwkv\.gguf: .*tokenizer.*'rwkv'") as e:
        convert_gguf(file, tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)


def write_bpe_gguf(path: Path, pre: str) -> Path:
    """A byte-level BPE vocabulary (`gpt2`, as Llama 3 and Qwen files carry one) where "hello" is a token that
    its merges alone never reach (h+e, l+l, then no merge joins he, ll and o)."""
    letters = sorted(set("helowrd"))
    tokens = ["<|begin_of_text|>", "<|end_of_text|>", *letters, "he", "ll", "hello"]
    writer = GGUFWriter(str(path), "llama")
    for key, value in {
        "block_count": 1, "context_length": 64, "embedding_length": 32, "feed_forward_length": 64,
        "attention.head_count": 2, "attention.head_count_kv": 1,
    }.items():  # fmt: skip
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL] * 2 + [TokenType.NORMAL] * (len(tokens) - 2))
    writer.add_token_merges(["h e", "l l"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    return finished(writer, len(tokens), path)


@pytest.mark.parametrize(("pre", "pieces"), [("llama-bpe", ["hello"]), ("qwen2", ["he", "ll", "o"])])
def test_llama3_files_take_whole_words_from_the_vocabulary(tmp_path: Path, pre: str, pieces: list[str]) -> None:
    """Llama 3's tokenizer takes a word that is in its vocabulary whole, merges or not (`ignore_merges`), as
    llama.cpp does for `llama-bpe` files; other byte-level vocabularies merge as usual."""
    convert_gguf(write_bpe_gguf(tmp_path / f"{pre}.gguf", pre), tmp_path / pre, progress=False)
    tok = Tokenizer(tmp_path / pre)
    assert [tok.id_to_token(i) for i in tok.encode("hello", add_special_tokens=False)] == pieces
