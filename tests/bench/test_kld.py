"""The KL-divergence statistics on cases whose answers are known in closed form."""

from __future__ import annotations

import math

import torch

from tricklm.bench.kld import KLDStats, format_summary


def test_identical_models_diverge_by_nothing() -> None:
    logits = torch.randn(50, 30, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 30, (50,), generator=torch.Generator().manual_seed(1))
    stats = KLDStats()
    stats.add(logits, logits.clone(), targets)
    s = stats.summary()
    assert s["mean_kld"] < 1e-12 and s["same_top_pct"] == 100.0 and s["ppl_ref"] == s["ppl_cand"]
    assert abs(s["rms_delta_p_pct"]) < 1e-9


def test_two_point_distributions_give_the_closed_form() -> None:
    # ref: (0.75, 0.25); cand: (0.5, 0.5): KL = 0.75 ln 1.5 + 0.25 ln 0.5
    ref = torch.log(torch.tensor([[0.75, 0.25]] * 4))
    cand = torch.log(torch.tensor([[0.5, 0.5]] * 4))
    targets = torch.tensor([0, 0, 1, 1])
    stats = KLDStats()
    stats.add(ref[:2], cand[:2], targets[:2])  # in two chunks, as the tool feeds it
    stats.add(ref[2:], cand[2:], targets[2:])
    s = stats.summary()
    assert math.isclose(s["mean_kld"], 0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel_tol=1e-6)
    # argmax of a tie is the first token, which is also the reference's top
    assert s["same_top_pct"] == 100.0
    # Δp: -0.25 for the targets 0 and +0.25 for the targets 1
    assert math.isclose(s["rms_delta_p_pct"], 25.0, rel_tol=1e-6)
    assert math.isclose(s["ppl_ref"], math.exp(-(2 * math.log(0.75) + 2 * math.log(0.25)) / 4), rel_tol=1e-6)
    assert math.isclose(s["ppl_cand"], 2.0, rel_tol=1e-6)
    assert "mean KLD" in format_summary("cand", s)


def test_a_flipped_top_token_is_counted() -> None:
    ref = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    cand = torch.tensor([[0.0, 2.0, 0.0], [0.0, 2.0, 0.0]])
    stats = KLDStats()
    stats.add(ref, cand, torch.tensor([0, 1]))
    assert stats.summary()["same_top_pct"] == 50.0
