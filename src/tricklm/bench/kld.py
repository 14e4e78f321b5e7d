"""KL divergence of a candidate model's next-token distributions from a reference's, teacher-forced.

What `llama-perplexity --kl-divergence` reports, computed the same way: for every scored position, the
KL divergence KL(P_ref || P_cand) of the two next-token distributions, whether both put the same token
on top, the change in the probability of the token that actually follows (Δp), and each model's
perplexity on the text. Greedy agreement says little (one near-tie flips a whole continuation); these
average over thousands of positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

PERCENTILES = (1.0, 5.0, 10.0, 50.0, 90.0, 95.0, 99.0)


@dataclass
class KLDStats:
    """Accumulates positions chunk by chunk (the full logits of a long text would not fit in memory)."""

    kld: list[torch.Tensor] = field(default_factory=list)
    delta_p: list[torch.Tensor] = field(default_factory=list)
    nll_ref: list[torch.Tensor] = field(default_factory=list)
    nll_cand: list[torch.Tensor] = field(default_factory=list)
    same_top: int = 0
    positions: int = 0

    def add(self, ref_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Logits [positions, vocab] of both models at the same positions; `targets` the tokens that follow."""
        ref = torch.log_softmax(ref_logits.double(), dim=-1)
        cand = torch.log_softmax(cand_logits.double(), dim=-1)
        self.kld.append((ref.exp() * (ref - cand)).sum(dim=-1).clamp_min(0.0))
        rows = torch.arange(len(targets))
        self.delta_p.append(cand[rows, targets].exp() - ref[rows, targets].exp())
        self.nll_ref.append(-ref[rows, targets])
        self.nll_cand.append(-cand[rows, targets])
        self.same_top += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        self.positions += len(targets)

    def summary(self) -> dict[str, float]:
        kld, dp = torch.cat(self.kld), torch.cat(self.delta_p)
        n = len(kld)
        out = {
            "positions": float(n),
            "ppl_ref": math.exp(float(torch.cat(self.nll_ref).mean())),
            "ppl_cand": math.exp(float(torch.cat(self.nll_cand).mean())),
            "mean_kld": float(kld.mean()),
            "mean_kld_stderr": float(kld.std() / math.sqrt(n)) if n > 1 else 0.0,
            "max_kld": float(kld.max()),
            "median_kld": float(kld.median()),
            "same_top_pct": 100.0 * self.same_top / n,
            "rms_delta_p_pct": 100.0 * float(dp.pow(2).mean().sqrt()),
        }
        for q in PERCENTILES:
            out[f"delta_p_p{q:g}_pct"] = 100.0 * float(torch.quantile(dp, q / 100.0))
        return out


def format_summary(name: str, s: dict[str, float]) -> str:
    percentiles = ", ".join(f"p{q:g} {s[f'delta_p_p{q:g}_pct']:+.3f}%" for q in PERCENTILES)
    return (
        f"{name}: {int(s['positions'])} positions\n"
        f"  PPL(ref) {s['ppl_ref']:.4f}  PPL(cand) {s['ppl_cand']:.4f}  ratio {s['ppl_cand'] / s['ppl_ref']:.5f}\n"
        f"  mean KLD {s['mean_kld']:.6f} ± {s['mean_kld_stderr']:.6f}  median {s['median_kld']:.6f}"
        f"  max {s['max_kld']:.4f}\n"
        f"  same top token {s['same_top_pct']:.2f}%  RMS Δp {s['rms_delta_p_pct']:.3f}%\n"
        f"  Δp percentiles: {percentiles}"
    )
