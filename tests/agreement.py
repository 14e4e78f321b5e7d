"""How two numerically different paths are compared (C++ and Python, int8 and float, batched and alone, a cached
prefix and a fresh prefill): their logits within a stated bound, and their greedy tokens equal only up to the first
step whose top-2 margin is below that bound. Past a near-tie, either choice is right, and which one a path takes
depends on the last bits of its arithmetic (so on the CPU): demanding more fails on some machine by luck.

A test says how much of its comparison the near-ties left (`Agreement.compared`), so a model with near-ties
everywhere cannot pass it vacuously.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# Float32 paths that differ in summation order (batch shape, chunking, a cached prefix): their logits differ by
# ~1e-5, so tokens whose logits are this close may swap.
FLOAT_MARGIN = 1e-3


def margin_of(top: Sequence[tuple[int, float]] | Sequence[Any]) -> float:
    """The gap between the two largest log-probabilities of a step (equal to the gap of its logits)."""
    values = [float(t[1]) if isinstance(t, tuple) else float(t.logprob) for t in top]
    if len(values) < 2:
        raise AssertionError("a margin needs the step's two most likely tokens: ask for logprobs >= 2")
    first, second = sorted(values, reverse=True)[:2]
    return first - second


def margins_of_logits(rows: Sequence[torch.Tensor]) -> list[float]:
    """Each step's top-2 logit gap."""
    return [float(gap[0] - gap[1]) for row in rows for gap in [row.float().topk(2).values]]


@dataclass
class Agreement:
    """Token sequences compared up to each one's first near-tie."""

    bound: float
    compared: int = 0  # tokens compared
    total: int = 0  # tokens there were
    cut: list[str] = field(default_factory=list)  # sequences cut short by a near-tie

    def check(self, got: Sequence[int], want: Sequence[int], *margins: Sequence[float], what: str = "") -> None:
        """`got` equals `want` up to the first step where any of `margins` (each path's top-2 gap per step, as
        far as it has them) is below the bound; with no near-tie, they are equal whole."""
        steps = min((len(m) for m in margins), default=0)
        near = [i for i in range(steps) if min(m[i] for m in margins) < self.bound]
        n = near[0] if near else None
        self.total += len(want)
        if n is None:
            assert list(got) == list(want), f"{what}: no step was a near-tie (< {self.bound}), yet they differ"
            self.compared += len(want)
            return
        assert list(got[:n]) == list(want[:n]), f"{what}: differ before the first near-tie (step {n})"
        self.compared += n
        self.cut.append(what)

    def assert_meaningful(self, fraction: float = 0.5) -> None:
        """Fails when near-ties left less than `fraction` of the tokens compared: the model, not the paths, decided."""
        assert self.total > 0, "nothing was compared"
        assert self.compared >= fraction * self.total, (
            f"only {self.compared} of {self.total} tokens came before a near-tie (< {self.bound}): {self.cut}"
        )


def run_margins(outputs: Sequence[Any]) -> list[float]:
    """The per-step top-2 margins of a request's engine outputs (each with `logprobs` of >= 2 top entries)."""
    return [margin_of(lp.top) for out in outputs for lp in (out.logprobs or [])]


# ---- engine runs -----------------------------------------------------------------------------------


def run_tokens(outputs: Sequence[Any]) -> list[int]:
    """The tokens of a request's engine outputs, in order."""
    return [t for out in outputs for t in out.new_token_ids]


def run_logprobs(outputs: Sequence[Any]) -> list[Any]:
    """The per-step `TokenLogprob`s of a request's engine outputs (asked for with `logprobs`)."""
    return [lp for out in outputs for lp in (out.logprobs or [])]


def logprob_gaps(a: Sequence[Any], b: Sequence[Any]) -> list[float]:
    """Per step of two runs (`TokenLogprob`s), the largest difference between their log-probabilities of the tokens
    both list (the one drawn and the top k): how far apart the paths' logits are, as far as the outputs show. The gap
    between two tokens' logits moves by at most twice this."""
    gaps = []
    for x, y in zip(a, b, strict=False):
        mine, theirs = {**dict(x.top), x.token_id: x.logprob}, {**dict(y.top), y.token_id: y.logprob}
        common = mine.keys() & theirs.keys()
        gaps.append(max((abs(mine[t] - theirs[t]) for t in common), default=float("inf")))
    return gaps


def check_runs(
    agreement: Agreement, got: Sequence[Any], want: Sequence[Any], *, close: float | None = None, what: str = ""
) -> int:
    """Greedy runs of two paths (engine outputs with logprobs >= 2): tokens equal up to either run's first near-tie,
    and log-probabilities within `close` (by default half the bound, which is what makes a margin of the bound safe)
    at every step up to and including it, where both still ran on the same tokens. Returns how many tokens were
    compared."""
    close = agreement.bound / 2 if close is None else close
    before = agreement.compared
    agreement.check(run_tokens(got), run_tokens(want), run_margins(got), run_margins(want), what=what)
    n = agreement.compared - before
    worst = max(logprob_gaps(run_logprobs(got), run_logprobs(want))[: n + 1], default=0.0)
    assert worst < close, f"{what}: log-probabilities {worst} apart (> {close}) while the tokens were the same"
    return n


def check_draws(agreement: Agreement, got: Sequence[Any], want: Sequence[Any], *, what: str = "") -> None:
    """Seeded draws (temperature > 0) of two paths, as engine outputs with logprobs: tokens equal up to the first step
    where the paths' log-probabilities are more than the bound apart. An inverse-CDF draw flips only when its uniform
    number lands within the paths' difference of an edge of the cumulative distribution, whatever the top-2 margin
    (which is why it is not looked at): below the bound that has a chance of about the bound per step. Logprobs
    cannot show how near an edge a draw was, so this is the one place a test leans on odds, not on a margin."""
    gaps = logprob_gaps(run_logprobs(got), run_logprobs(want))
    far = [i for i, gap in enumerate(gaps) if gap > agreement.bound]
    want_tokens, got_tokens = run_tokens(want), run_tokens(got)
    n = far[0] if far else len(want_tokens)
    agreement.total += len(want_tokens)
    assert got_tokens[:n] == want_tokens[:n], f"{what}: draws differ before the paths did (> {agreement.bound})"
    if not far:
        assert len(got_tokens) == len(want_tokens), f"{what}: different lengths"
    else:
        agreement.cut.append(what)
    agreement.compared += n


@dataclass
class Follower:
    """Runs one path on another's greedy tokens, for tests that drive the engine step by step: wherever its own
    choice differs, that step must be a near-tie in one of the two runs, and it takes the reference's token, so
    the two runs stay comparable to their end (no near-tie cuts a comparison short)."""

    reference: dict[str, list[int]]  # request id -> the reference run's tokens
    margins: dict[str, list[float]]  # and its top-2 margin at each of them
    bound: float
    steps: int = 0
    swaps: list[tuple[str, int]] = field(default_factory=list)

    def choose(self, request_id: str, step: int, token: int, margin: float) -> int:
        want, want_margin = self.reference[request_id][step], self.margins[request_id][step]
        self.steps += 1
        if token != want:
            assert min(margin, want_margin) < self.bound, (
                f"{request_id} step {step}: {token} against {want}, with top-2 margins {margin:.3g} and "
                f"{want_margin:.3g}, both past {self.bound}"
            )
            self.swaps.append((request_id, step))
        return want

    def assert_rare(self, fraction: float = 0.1) -> None:
        """Fails when the paths disagreed on more than `fraction` of the steps (each at a near-tie, but so many
        that the model, not the paths, decided the comparison)."""
        assert self.steps > 0, "no step was compared"
        assert len(self.swaps) <= fraction * self.steps, f"{len(self.swaps)} of {self.steps} steps: {self.swaps}"


# ---- answers through the OpenAI API ---------------------------------------------------------------------

# The default model's int8 kernels: where the CPU has AMX, a step of many rows (a fresh prefill) multiplies in
# bfloat16 and one of few rows (the rest of a cached prefix, a decode) in int8, which moves logits by int8
# rounding steps; about twice the largest move of a top-2 gap measured between a fresh and a cached prefill
INT8_MARGIN = 1.5


@dataclass
class Steps:
    """An answer's steps as its logprobs show them: each token's text, its log-probability, the top-2 margin."""

    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)

    def head(self, n: int) -> Steps:
        return Steps(self.tokens[:n], self.logprobs[:n], self.margins[:n])


def _get(item: Any, name: str) -> Any:
    """A field of a JSON object (httpx) or of the `openai` client's model of it."""
    return item[name] if isinstance(item, dict) else getattr(item, name)


def chat_steps(*logprobs: Any) -> Steps:
    """The steps of a chat answer's `logprobs` (asked with `top_logprobs` >= 2): a choice's, or a stream's chunks'
    in order (None where a chunk has none)."""
    steps = Steps()
    for part in logprobs:
        for entry in (_get(part, "content") or []) if part is not None else []:
            steps.tokens.append(_get(entry, "token"))
            steps.logprobs.append(_get(entry, "logprob"))
            steps.margins.append(margin_of([(0, _get(top, "logprob")) for top in _get(entry, "top_logprobs")]))
    return steps


def completion_steps(*logprobs: Any) -> Steps:
    """The steps of a greedy completion's `logprobs` (asked with `logprobs: 5`): a choice's, or a stream's chunks'.

    A step's top entries are keyed by token text, each holding its likeliest token's value, so two tokens of one
    text (byte pieces of a character) are one entry: a swap between them leaves the text as it was. The margin
    is to the likeliest *other* text. Where every shown entry is the chosen text (the five likeliest tokens are
    byte pieces of it), another text would have to pass five tokens to be chosen: no near-tie is counted there."""
    steps = Steps()
    for part in logprobs:
        if part is None:
            continue
        for token, chosen, top in zip(
            _get(part, "tokens"), _get(part, "token_logprobs"), _get(part, "top_logprobs"), strict=True
        ):
            steps.tokens.append(token)
            steps.logprobs.append(chosen)
            others = [v for text, v in top.items() if text != token]
            steps.margins.append(chosen - max(others) if others else math.inf)
    return steps


def check_answers(agreement: Agreement, got: Steps, want: Steps, what: str = "") -> int | None:
    """Two paths' greedy answers: tokens equal up to the first near-tie (`Agreement.check`), and up to and
    including it, each token's log-probability within the bound of the other path's (a top-2 margin is not
    compared: a wide one moves in proportion, by more than the bound when it is many times it, and harmlessly).
    Returns the step of that near-tie, or None where there was none: then everything else the answers hold
    (text, finish reason) must be equal too."""
    compared, cuts = agreement.compared, len(agreement.cut)
    agreement.check(got.tokens, want.tokens, got.margins, want.margins, what=what)
    n = agreement.compared - compared
    for i, (a, b) in enumerate(list(zip(got.logprobs, want.logprobs, strict=False))[: n + 1]):
        assert abs(a - b) < agreement.bound, f"{what}: step {i}'s log-probabilities {a:.4g} and {b:.4g} far apart"
    return n if len(agreement.cut) > cuts else None


def check_texts(agreement: Agreement, got: tuple[str, Steps], want: tuple[str, Steps], what: str = "") -> bool:
    """Two paths' greedy answers, each (text, steps): compared as `check_answers` does; their texts equal where no
    near-tie cut the comparison, else both starting with what the tokens before it spell (up to a character
    split across tokens). True if the texts were compared whole."""
    cut = check_answers(agreement, got[1], want[1], what=what)
    if cut is None:
        assert got[0] == want[0], f"{what}: the same tokens, but other texts"
        return True
    agreed = "".join(want[1].tokens[:cut]).split("\ufffd")[0]
    assert got[0].startswith(agreed) and want[0].startswith(agreed), f"{what}: texts differ before the near-tie"
    return False
