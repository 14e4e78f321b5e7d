"""Our model code and engine against Hugging Face transformers on tiny random checkpoints.

Every architecture we serve is checked for: full-prompt logits, greedy generation through the paged KV
cache (one prefill, chunked prefill, recomputation without a cache), logits of every decode step, and
batching (requests running together produce what each produces alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from agreement import Agreement, margin_of, margins_of_logits
from tiny_models import EOS_TOKEN, make_tiny_model, special_token_id
from tricklm.config import EngineConfig
from tricklm.engine.core import EngineCore
from tricklm.engine.request import FinishReason, Request
from tricklm.engine.sampling_params import SamplingParams
from tricklm.engine.scheduler import ScheduledBatch
from tricklm.model.base import CausalLM
from tricklm.model.weights.loader import load_model

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
# Logits within ATOL of each other can order two tokens differently only where they are within 2 ATOL
MARGIN = 2 * ATOL
NUM_NEW_TOKENS = 20
PROMPT_LEN = 24
WINDOW = 8  # Mistral's sliding window: prompts are three times longer

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # wavelengths of a 16-dim head span 6..20000, so all three llama3 bands (kept, smoothed, scaled) occur
    "original_max_position_embeddings": 64,
}

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {"tie_word_embeddings": False}),
    "llama-tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama-rope-linear": ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-rope-llama3": ("LlamaForCausalLM", {"rope_scaling": LLAMA3_ROPE}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {"sliding_window": WINDOW}),
    "gpt2": ("GPT2LMHeadModel", {}),
    # tiny_models switches every feature of these families on (soft-capping, local RoPE, longrope, ...)
    "gemma2": ("Gemma2ForCausalLM", {}),
    "gemma3": ("Gemma3ForCausalLM", {}),
    "phi3": ("Phi3ForCausalLM", {}),
}


@dataclass
class Case:
    name: str
    path: Path
    ours: CausalLM
    hf: Any
    vocab_size: int


def load_hf(path: Path) -> Any:
    auto = transformers.AutoModelForCausalLM
    hf = auto.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    # ignore_eos on our side; HF must not stop early either
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    arch, overrides = CASES[request.param]
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), arch, **overrides)
    ours = load_model(path, dtype=torch.float32)
    hf = load_hf(path)
    assert hf.dtype == torch.float32 and not hf.training
    return Case(request.param, path, ours, hf, ours.config.vocab_size)


def random_prompt(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n,), generator=gen).tolist()  # no special tokens


def engine(model: CausalLM, max_num_batched_tokens: int = 512, **kwargs: Any) -> EngineCore:
    return EngineCore(model, EngineConfig(max_num_batched_tokens=max_num_batched_tokens, **kwargs))


def greedy_request(request_id: str, prompt: list[int], max_tokens: int = NUM_NEW_TOKENS) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=2)
    eos = frozenset({special_token_id(EOS_TOKEN)})
    return Request(request_id, list(prompt), params, max_tokens, eos_token_ids=eos)


@dataclass
class Greedy:
    """A greedy continuation and each step's top-2 logit gap."""

    tokens: list[int]
    margins: list[float]


def run_engine(core: EngineCore, prompts: dict[str, list[int]], max_tokens: int = NUM_NEW_TOKENS) -> dict[str, Greedy]:
    """Greedy-generate `max_tokens` for every prompt through `EngineCore.step()`; tokens per request."""
    tokens: dict[str, Greedy] = {rid: Greedy([], []) for rid in prompts}
    for rid, prompt in prompts.items():
        core.add_request(greedy_request(rid, prompt, max_tokens))
    finished: set[str] = set()
    for _ in range(10_000):
        if len(finished) == len(prompts):
            break
        for out in core.step():
            assert out.request_id not in finished
            tokens[out.request_id].tokens.extend(out.new_token_ids)
            tokens[out.request_id].margins.extend(margin_of(lp.top) for lp in out.logprobs or [])
            if out.finish_reason is not None:
                assert out.finish_reason == FinishReason.LENGTH
                finished.add(out.request_id)
    assert finished == set(prompts)
    assert not core.has_work
    assert core.kv_cache.num_free_blocks == core.kv_cache.num_usable_blocks  # every block given back
    return tokens


def decodes_first(batch: ScheduledBatch) -> ScheduledBatch:
    """The same step with its 1-token entries first.

    Works around `ModelRunner.forward_logits` mislaying a 1-token entry scheduled after a longer one
    (pinned by `test_forward_logits_keeps_batch_order`); `run()` orders its batches this way itself.
    """
    pairs = sorted(zip(batch.requests, batch.num_tokens, strict=True), key=lambda p: p[1] > 1)
    return ScheduledBatch([r for r, _ in pairs], [n for _, n in pairs])


def drive_logits(
    core: EngineCore, prompts: dict[str, list[int]], num_new_tokens: int
) -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
    """Schedule by hand and keep the logits of every computed position (greedy, `runner.forward_logits`).

    Returns, per request, its sequence (prompt + generated tokens) and the logits rows of positions
    0..len(sequence)-2 (the last token is sampled, never computed). Every request keeps decoding until
    all have `num_new_tokens`, so the batch composition changes as prefills finish.
    """
    reqs = [greedy_request(rid, prompt, max_tokens=10_000) for rid, prompt in prompts.items()]
    for req in reqs:
        core.add_request(req)
    rows: dict[str, dict[int, torch.Tensor]] = {req.request_id: {} for req in reqs}
    for _ in range(10_000):
        if all(len(r.output_token_ids) >= num_new_tokens for r in reqs):
            break
        batch = decodes_first(core.scheduler.schedule())
        assert batch
        logits = core.runner.forward_logits(batch)
        assert logits.shape == (sum(batch.num_tokens), core.runner.model.config.vocab_size)
        offset = 0
        for i, (req, n) in enumerate(zip(batch.requests, batch.num_tokens, strict=True)):
            samples = batch.samples(i)
            for j in range(n):
                rows[req.request_id][req.num_computed_tokens + j] = logits[offset + j]
            offset += n
            req.num_computed_tokens += n
            if samples:
                req.output_token_ids.append(int(logits[offset - 1].argmax()))
    sequences, stacked = {}, {}
    for req in reqs:
        seq = req.prompt_token_ids + req.output_token_ids
        assert sorted(rows[req.request_id]) == list(range(len(seq) - 1))
        sequences[req.request_id] = seq
        stacked[req.request_id] = torch.stack([rows[req.request_id][p] for p in range(len(seq) - 1)])
    return sequences, stacked


@torch.inference_mode()
def hf_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()


@torch.inference_mode()
def hf_generate(hf: Any, prompt: list[int], n: int = NUM_NEW_TOKENS, use_cache: bool = True) -> Greedy:
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    out = hf.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=n,
        use_cache=use_cache,
        return_dict_in_generate=True,
        output_logits=True,
    )
    new: list[int] = out.sequences[0, len(prompt) :].tolist()
    assert len(new) == n
    return Greedy(new, margins_of_logits([step[0] for step in out.logits]))


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"max |ours - hf| = {diff:.3g} > {ATOL}"


def test_tiny_model_is_what_we_meant(case: Case) -> None:
    cfg = case.ours.config
    assert case.vocab_size == case.hf.config.vocab_size == 320
    assert cfg.num_layers == 2 and cfg.hidden_size == 64 and cfg.num_heads == 4
    if cfg.architecture != "GPT2LMHeadModel":
        assert cfg.num_kv_heads == 2  # GQA
    if case.name == "mistral":
        assert cfg.sliding_window == WINDOW
    elif case.name.startswith("gemma"):  # a sliding layer, then a global one
        assert cfg.layer_windows == (WINDOW, None)
    else:
        assert cfg.sliding_window is None
    if case.name == "gemma3":
        assert cfg.local_rope_theta == 100.0 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    if case.name == "phi3":
        assert cfg.rotary_dim == cfg.head_dim // 2 and cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "longrope"
    if case.name == "qwen2":
        assert cfg.attention_bias
        assert all(case.hf.model.layers[0].self_attn.q_proj.bias.abs() > 0)
    if case.name.startswith("llama-rope"):
        assert cfg.rope_scaling is not None
    # not degenerate: logits are spread out (so near-ties, which cut token comparisons short, are rare)
    logits = hf_logits(case.hf, random_prompt(PROMPT_LEN, case.vocab_size))
    assert logits.std(dim=-1).min() > 0.5


def test_prefill_logits_match(case: Case) -> None:
    prompt = random_prompt(PROMPT_LEN, case.vocab_size)
    core = engine(case.ours)
    core.add_request(greedy_request("a", prompt))
    batch = core.scheduler.schedule()
    assert batch.num_tokens == [PROMPT_LEN]  # one prefill chunk
    assert_close(core.runner.forward_logits(batch), hf_logits(case.hf, prompt))


@pytest.mark.parametrize("budget", [512, 4], ids=["one-prefill", "chunked-prefill"])
def test_greedy_generation_matches_hf(case: Case, budget: int) -> None:
    prompt = random_prompt(PROMPT_LEN, case.vocab_size)
    core = engine(case.ours, max_num_batched_tokens=budget)
    steps = 0
    core.add_request(greedy_request("a", prompt))
    ours = Greedy([], [])
    while core.has_work:
        outputs = core.step()
        steps += 1
        ours.tokens += [t for out in outputs for t in out.new_token_ids]
        ours.margins += [margin_of(lp.top) for out in outputs for lp in out.logprobs or []]
    # prefill in ceil(len / budget) steps (the last one samples), then one token per step
    assert steps == -(-PROMPT_LEN // budget) + NUM_NEW_TOKENS - 1
    agreement = Agreement(MARGIN)
    for use_cache in (True, False):
        hf = hf_generate(case.hf, prompt, use_cache=use_cache)
        agreement.check(ours.tokens, hf.tokens, ours.margins, hf.margins, what=f"use_cache={use_cache}")
    agreement.assert_meaningful()


def test_recompute_without_cache_matches_cached(case: Case) -> None:
    """Each token from a fresh engine that prefills the whole sequence so far equals the cached greedy one."""
    prompt = random_prompt(PROMPT_LEN, case.vocab_size)
    cached = run_engine(engine(case.ours), {"a": prompt})["a"]
    seq, rows = list(prompt), []
    for _ in range(NUM_NEW_TOKENS):
        core = engine(case.ours)
        core.add_request(greedy_request("a", seq))
        batch = core.scheduler.schedule()
        assert batch.num_tokens == [len(seq)]
        rows.append(core.runner.forward_logits(batch)[-1])
        seq.append(int(rows[-1].argmax()))
    agreement = Agreement(MARGIN)
    agreement.check(seq[len(prompt) :], cached.tokens, margins_of_logits(rows), cached.margins)
    agreement.assert_meaningful()


@pytest.mark.parametrize("budget", [512, 4], ids=["one-prefill", "chunked-prefill"])
def test_logits_of_every_step_match_hf(case: Case, budget: int) -> None:
    """Prefill (possibly in chunks, start_pos > 0) and decode steps, all rows against one HF forward."""
    prompt = random_prompt(PROMPT_LEN, case.vocab_size)
    core = engine(case.ours, max_num_batched_tokens=budget)
    sequences, logits = drive_logits(core, {"a": prompt}, NUM_NEW_TOKENS)
    seq = sequences["a"]
    assert len(seq) == PROMPT_LEN + NUM_NEW_TOKENS
    assert_close(logits["a"], hf_logits(case.hf, seq[:-1]))
    hf = hf_generate(case.hf, prompt)
    agreement = Agreement(MARGIN)
    agreement.check(seq[PROMPT_LEN:], hf.tokens, margins_of_logits(logits["a"][PROMPT_LEN - 1 :]), hf.margins)
    agreement.assert_meaningful()


# With a budget of 7 tokens, steps mix decodes with prefill chunks, and some chunks are 1 token long.
BATCH_PROMPT_LENS = {"a": 5, "b": 24, "c": 13, "d": 1}


def batch_prompts(vocab_size: int) -> dict[str, list[int]]:
    return {rid: random_prompt(n, vocab_size, seed=i) for i, (rid, n) in enumerate(BATCH_PROMPT_LENS.items())}


@pytest.mark.parametrize("budget", [512, 7], ids=["one-prefill", "chunked-prefill"])
def test_batched_generation_matches_single(case: Case, budget: int) -> None:
    prompts = batch_prompts(case.vocab_size)
    together = run_engine(engine(case.ours, max_num_batched_tokens=budget), prompts)
    agreement = Agreement(MARGIN)
    for rid, prompt in prompts.items():
        alone, hf = run_engine(engine(case.ours), {rid: prompt})[rid], hf_generate(case.hf, prompt)
        agreement.check(together[rid].tokens, alone.tokens, together[rid].margins, alone.margins, what=rid)
        agreement.check(alone.tokens, hf.tokens, alone.margins, hf.margins, what=f"{rid} against HF")
    agreement.assert_meaningful()


@pytest.mark.parametrize("budget", [512, 7], ids=["one-prefill", "chunked-prefill"])
def test_batched_logits_match_hf(case: Case, budget: int) -> None:
    """Mixed steps (decodes next to prefill chunks of other requests): every row against HF."""
    prompts = batch_prompts(case.vocab_size)
    core = engine(case.ours, max_num_batched_tokens=budget)
    sequences, logits = drive_logits(core, prompts, NUM_NEW_TOKENS)
    for rid, seq in sequences.items():
        assert_close(logits[rid], hf_logits(case.hf, seq[:-1]))


def test_forward_logits_keeps_batch_order(case: Case) -> None:
    """A 1-token prompt admitted after a longer one: rows come back in batch order, each correct."""
    prompts = {"a": random_prompt(5, case.vocab_size), "d": random_prompt(1, case.vocab_size, seed=3)}
    core = engine(case.ours)
    for rid, prompt in prompts.items():
        core.add_request(greedy_request(rid, prompt))
    batch = core.scheduler.schedule()
    assert [r.request_id for r in batch.requests] == ["a", "d"] and batch.num_tokens == [5, 1]
    expected = torch.cat([hf_logits(case.hf, prompts["a"]), hf_logits(case.hf, prompts["d"])])
    assert_close(core.runner.forward_logits(batch), expected)


def test_sliding_window_matters(tmp_path: Path) -> None:
    """The Mistral case would not notice a missing window unless prompts outgrow it: check they do."""
    windowed = load_hf(make_tiny_model(tmp_path / "w", "MistralForCausalLM", sliding_window=WINDOW))
    full = load_hf(make_tiny_model(tmp_path / "f", "MistralForCausalLM", sliding_window=None))
    prompt = random_prompt(PROMPT_LEN, windowed.config.vocab_size)
    a, b = hf_logits(windowed, prompt), hf_logits(full, prompt)
    assert torch.allclose(a[:WINDOW], b[:WINDOW], atol=1e-5)
    assert (a[WINDOW:] - b[WINDOW:]).abs().amax(dim=-1).min() > 1e-2


def test_rope_scaling_matters(tmp_path: Path) -> None:
    """Same weights, different RoPE: the rope-scaling cases would catch a scaling that is ignored."""
    arch, overrides = CASES["llama"]
    reference_model = load_hf(make_tiny_model(tmp_path / "plain", arch, **overrides))
    prompt = random_prompt(PROMPT_LEN, reference_model.config.vocab_size)
    reference = hf_logits(reference_model, prompt)
    for name in ("llama-rope-linear", "llama-rope-llama3"):
        arch, overrides = CASES[name]
        scaled = hf_logits(load_hf(make_tiny_model(tmp_path / name, arch, **overrides)), prompt)
        assert torch.allclose(scaled[0], reference[0], atol=1e-5)  # position 0 is not rotated
        assert (scaled[1:] - reference[1:]).abs().amax(dim=-1).min() > 1e-3, name


def test_qwen2_sliding_window_on_some_layers(tmp_path: Path) -> None:
    """Per-layer windows from `max_window_layers`: chunked prefill and decode steps against HF."""
    window = {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}
    path = make_tiny_model(tmp_path / "q", "Qwen2ForCausalLM", **window)
    hf = load_hf(path)
    assert hf.config.layer_types == ["full_attention", "sliding_attention"]
    ours = load_model(path)
    assert ours.config.layer_windows == (None, WINDOW)
    sequences, logits = drive_logits(engine(ours, max_num_batched_tokens=7), batch_prompts(ours.config.vocab_size), 8)
    for rid, seq in sequences.items():
        assert_close(logits[rid], hf_logits(hf, seq[:-1]))


def test_a_multimodal_gemma3_checkpoint_is_refused_with_what_to_use_instead() -> None:
    from tricklm.model.config import ModelConfig, ModelLoadError

    with pytest.raises(ModelLoadError, match=r"multimodal.*GGUF file"):
        ModelConfig.from_dict({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": {}})
