"""Time of one engine step with no server around it: what the model and scheduler cost per token.

Loads the default model (or `--model`) with the engine's own settings, stops the engine thread and
drives `EngineCore.step()` by hand: for each batch size, that many greedy requests with 100-token
prompts are prefilled (timed: the time to first token of the last of them, with no HTTP), then decode
steps are timed in windows of 15; it prints the best and the median window. Compare with the server's
inter-token latency (`tricklm bench`) to see what HTTP, SSE and the GIL add; compare `--quantization`
and `--prefill-weights` values to see what the weight formats buy.

    .venv/bin/python benchmarks/engine_steps.py                       # default settings, 1 and 16 sequences
    .venv/bin/python benchmarks/engine_steps.py --quantization none --batch-sizes 1,4,16
    .venv/bin/python benchmarks/engine_steps.py --no-native-decode   # decode steps in Python
    .venv/bin/python benchmarks/engine_steps.py --prefill-weights bf16 --batch-sizes 16   # prefill copy format
    .venv/bin/python benchmarks/engine_steps.py --model big.gguf --quantization q4_1 --kv-cache-memory-mib 1024
    .venv/bin/python benchmarks/engine_steps.py --prompt-len 2000 --batch-sizes 1 --prefill-in-python  # A/B
    .venv/bin/python benchmarks/engine_steps.py --draft 4    # every decode step verifies a 4-token draft
                                                             # that is rejected: what a failed draft costs
"""

from __future__ import annotations

import argparse
import statistics
import time

from tricklm.config import EngineConfig
from tricklm.engine import model_runner, scheduler, speculative
from tricklm.engine.engine import Engine
from tricklm.engine.sampling_params import SamplingParams
from tricklm.memory import limit_fragmentation
from tricklm.model.weights.modes import PREFILL_FORMATS

PROMPT = "The history of the city of Paris begins with a small settlement on an island in the river. " * 8
PROMPT_LEN = 100  # tokens, unless --prompt-len
WINDOW = 15
WINDOWS = 6


def step_ms(engine: Engine, batch_size: int, prompt_len: int = PROMPT_LEN) -> tuple[float, list[float]]:
    """(ms to prefill every prompt, ms per decode step in each window)."""
    core = engine.core
    text = PROMPT * (1 + prompt_len // PROMPT_LEN)
    base = engine.tokenizer.encode(text)[:prompt_len]
    params = SamplingParams(max_tokens=WINDOW * (WINDOWS + 2), temperature=0.0, ignore_eos=True)
    for i in range(batch_size):
        ids = [base[0] + i, *base[1:]]  # distinct prompts: no two requests alike
        core.add_request(engine.make_request(engine.new_request_id("step"), ids, params))
    start = time.perf_counter()
    while any(len(r.output_token_ids) == 0 for r in core.scheduler.running) or core.scheduler.waiting:
        core.step()  # prefill everything first
    prefill = 1000 * (time.perf_counter() - start)
    for _ in range(WINDOW):
        core.step()  # warm-up
    windows = []
    for _ in range(WINDOWS):
        start = time.perf_counter()
        for _ in range(WINDOW):
            core.step()
        windows.append(1000 * (time.perf_counter() - start) / WINDOW)
    while core.has_work:
        core.step()
    return prefill, windows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--quantization", default=EngineConfig.quantization)
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--native-decode", action=argparse.BooleanOptionalAction, default=EngineConfig.native_decode)
    p.add_argument("--prefill-weights", default=EngineConfig.prefill_weights, choices=PREFILL_FORMATS)
    p.add_argument("--kv-cache-memory-mib", type=int, default=None, help="KV budget (a large model needs more)")
    p.add_argument("--prompt-len", type=int, default=PROMPT_LEN, help="tokens per prompt")
    p.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens)
    p.add_argument(
        "--prefill-in-python", action="store_true", help="prefill chunks in torch even where the native step runs them"
    )
    p.add_argument(
        "--draft", type=int, default=0, help="every decode step verifies a draft of N tokens the model rejects"
    )
    args = p.parse_args()
    if args.prefill_in_python:
        model_runner.NATIVE_MAX_MEAN_CONTEXT = 0
    if args.draft:
        # Drafts of a token the model (almost) never picks, on every step: no back-off, no length change
        scheduler.propose = lambda tokens, k, *_: [tokens[-1] ^ 1] * args.draft  # type: ignore[assignment]
        speculative.SpecState.after = lambda self, *_: None  # type: ignore[method-assign]
    limit_fragmentation()  # the server's malloc settings, so the step costs match
    config = EngineConfig(
        model=args.model,
        quantization=args.quantization,
        native_decode=args.native_decode,
        prefill_weights=args.prefill_weights,
        kv_cache_memory=args.kv_cache_memory_mib and args.kv_cache_memory_mib * 2**20,
        max_num_batched_tokens=args.max_num_batched_tokens,
        speculative="ngram" if args.draft else "none",
        num_speculative_tokens=max(args.draft, 1),
    )
    engine = Engine(config, progress=False)
    engine.loop.shutdown()  # this script is the only one stepping the core
    try:
        native = engine.core.runner.native is not None
        print(
            f"# engine step, quantization={args.quantization}, native decode {'on' if native else 'off'}, "
            f"prefill weights {args.prefill_weights}, prefill in {'torch' if args.prefill_in_python else 'auto'}, "
            f"{args.prompt_len}-token prompts, {args.max_num_batched_tokens} tokens a step; "
            f"decode only, after prefilling all; a rejected {args.draft}-token draft a step"
        )
        for b in (int(x) for x in args.batch_sizes.split(",")):
            prefill, ms = step_ms(engine, b, args.prompt_len)
            best, median = min(ms), statistics.median(ms)
            print(
                f"{b:>3} sequences: prefill {prefill:.0f} ms; step best {best:.1f} ms, median {median:.1f} ms "
                f"-> {1000 * b / median:.0f} tok/s"
            )
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
