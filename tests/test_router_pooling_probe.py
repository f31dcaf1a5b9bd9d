"""bench/router_pooling_probe.py's pieces: pooling, the balanced logistic probe, and the line's rank share."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import router_pooling_probe as probe  # noqa: E402


def test_poolings_have_their_widths():
    x = torch.randn(5, 4, 3)  # [N, C, D]
    assert probe.pooled(x, "mean").shape == (5, 3) and probe.pooled(x, "mean+max").shape == (5, 6)
    torch.testing.assert_close(probe.pooled(x, "max"), x.amax(1))


def test_probe_ranks_a_line_like_chunk_first_and_rank_share_counts_what_beats_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = torch.zeros(400, dtype=torch.bool)
    y[::20] = True  # 5 % positives, shifted along one direction
    x[y, 2] += 3.0
    f = probe.fit_logistic(x, y, l2=1e-3)
    assert probe.summary_of([(f(x), y)])["auc"] > 0.95
    label = torch.tensor([False, True, False, False])
    assert probe.rank_shares([(torch.tensor([0.1, 0.9, 0.2, 0.3]), label)]) == [0.0]
    assert probe.rank_shares([(torch.tensor([0.5, 0.4, 0.9, 0.1]), label)]) == [pytest.approx(2 / 3)]
