"""KL divergence of weight formats from a reference, teacher-forced over real prose (issue 14's yardstick).

Runs the same text through a reference and each candidate setting, in chunks of `--ctx` tokens, and
scores the second half of every chunk as `llama-perplexity --kl-divergence` does: positions ctx/2 to
ctx-2, each predicting the next token, so that every scored position has at least ctx/2 tokens of
context (255 positions a chunk of 512; no BOS is added, SmolLM2's tokenizer adds none). Prints mean
KLD, same-top-token %, Δp percentiles and both perplexities per candidate. Settings are `--quantization`
modes, or a mode with `-float`:

    none        float32 weights and activations (the default reference)
    gguf        the file's own types in one copy of blocks, int8 activations in the native kernels
    q4_0, q4_1, q4_k, q8_0   every projection rounded to that format (a GGUF type that fits is read as it is:
                give --float-weights to round from float weights instead)
    MODE-float  a block mode's weights with float32 activations: the reference its int8 path is judged by
    MODE@PATH   a setting on another model of the same tokenizer (a folder or a .gguf file), e.g. one
                GGUF file per llama.cpp type (benchmarks/gguf_formats.py)
    int4, fp16-only   the other formats (a teacher-forced chunk is one large step: int4 reads its prefill
                copy here)

The text: docstrings of a fixed list of Python standard-library modules (real English prose, PSF
license), about 67,000 tokens for SmolLM2's tokenizer, of which `--tokens` are used; or `--text FILE`.

    .venv/bin/python benchmarks/kld.py                                    # gguf and gguf-float vs none
    .venv/bin/python benchmarks/kld.py --reference gguf-float --candidates gguf
    .venv/bin/python benchmarks/kld.py --float-weights --candidates q8_0,q4_k,q4_1,q4_0
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import time
from pathlib import Path

import torch

from tricklm.bench.hf_export import hf_weights_folder
from tricklm.bench.kld import KLDStats, format_summary
from tricklm.config import EngineConfig
from tricklm.engine.core import EngineCore
from tricklm.engine.request import Request, Sampled
from tricklm.engine.sampling_params import SamplingParams
from tricklm.model.resolve import resolve_model
from tricklm.model.weights.loader import load_model
from tricklm.model.weights.qlinear import QLinear
from tricklm.tokenizer import Tokenizer

MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect",
    "ipaddress", "itertools", "json", "logging", "math", "multiprocessing", "os", "pathlib", "pickle",
    "random", "re", "sched", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "typing", "unittest", "urllib.parse",
    "uuid", "warnings", "weakref", "xml.etree.ElementTree", "zipfile",
)  # fmt: skip


def stdlib_prose() -> str:
    """Module and member docstrings of MODULES, in a fixed order."""
    parts: list[str] = []
    for name in MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for _, member in sorted(inspect.getmembers(module), key=lambda kv: kv[0]):
            if (inspect.isclass(member) or inspect.isfunction(member)) and member.__module__ == name:
                doc = inspect.getdoc(member)
                if doc and len(doc) > 200:  # prose, not one-line signatures
                    parts.append(doc)
    return "\n\n".join(p for p in parts if p)


def load_setting(setting: str, model_dir: Path, ctx: int) -> EngineCore:
    """`setting` is a mode, optionally with -float, optionally @ a model of its own (folder or .gguf)."""
    setting, _, path = setting.partition("@")
    if path:
        model_dir = resolve_model(path, progress=False)
    quantization = setting.removesuffix("-float")
    model = load_model(model_dir, torch.float32, quantization)
    if setting.endswith("-float"):
        for module in model.modules():
            if isinstance(module, QLinear):
                module.isa = "torch"
    config = EngineConfig(quantization=quantization, max_num_batched_tokens=ctx, max_num_seqs=1, native_decode=False)
    return EngineCore(model, config)  # type: ignore[arg-type]


def chunk_logits(core: EngineCore, tokens: list[int]) -> torch.Tensor:
    """Logits at every position of `tokens`, prefilled as one request in one step."""
    req = Request("kld", tokens, SamplingParams(max_tokens=1, temperature=0.0), max_tokens=1)
    core.add_request(req)
    batch = core.scheduler.schedule()
    assert batch.requests == [req] and batch.num_tokens == [len(tokens)], "the chunk must fit one step"
    logits = core.runner.forward_logits(batch)
    core.scheduler.update(batch, {req.request_id: Sampled(int(logits[-1].argmax()))})
    return logits.float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--reference", default="none")
    p.add_argument("--candidates", default="gguf,gguf-float")
    p.add_argument(
        "--float-weights",
        action="store_true",
        help="run every setting from a float32 export of the model (a GGUF's dequantized weights), so that "
        "block modes round them rather than read the file's blocks",
    )
    p.add_argument("--tokens", type=int, default=20480, help="tokens of text to run (a multiple of --ctx)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--text", type=Path, default=None)
    args = p.parse_args()
    model_dir = resolve_model(args.model)
    if args.float_weights:
        model_dir = hf_weights_folder(model_dir)
    text = args.text.read_text(encoding="utf-8") if args.text else stdlib_prose()
    tokens = Tokenizer(model_dir).encode(text, add_special_tokens=False)
    chunks = len(tokens) // args.ctx if args.tokens <= 0 else min(args.tokens, len(tokens)) // args.ctx
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    print(f"# text: {len(tokens)} tokens (sha1 {digest}); {chunks} chunks of {args.ctx}, second halves scored")
    print(f"# weights: {model_dir}")
    print(f"# reference: {args.reference}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    settings = [args.reference, *args.candidates.split(",")]
    cores = {s: load_setting(s, model_dir, args.ctx) for s in settings}
    stats = {s: KLDStats() for s in settings[1:]}
    seconds = dict.fromkeys(settings, 0.0)
    half = args.ctx // 2
    for c in range(chunks):
        ids = tokens[c * args.ctx : (c + 1) * args.ctx]
        # as llama-perplexity: positions ctx/2 .. ctx-2 are scored, each predicting the token after it
        targets = torch.tensor(ids[half + 1 :])
        logits = {}
        for s, core in cores.items():
            start = time.perf_counter()
            logits[s] = chunk_logits(core, ids)[half:-1]
            seconds[s] += time.perf_counter() - start
        for s in stats:
            stats[s].add(logits[args.reference], logits[s], targets)
    for s, st in stats.items():
        print(format_summary(f"{s} vs {args.reference}", st.summary()))
    print("# seconds of forward passes: " + ", ".join(f"{s} {t:.1f}" for s, t in seconds.items()))


if __name__ == "__main__":
    main()
