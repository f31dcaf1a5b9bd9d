"""bench/calibration_set_probe.py's pieces: per-block realised fractions (as the model reports them, block by block)
and their summary."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import calibration_set_probe as probe  # noqa: E402
from natsl_testing import tiny_model  # noqa: E402


def test_block_fractions_are_each_blocks_own():
    model = tiny_model(seed=3)
    blocks = torch.randint(1, 97, (3, 32), generator=torch.Generator().manual_seed(0))
    fractions = probe.block_fractions(model, blocks)
    with torch.no_grad():
        batched = model(input_ids=blocks, use_cache=False, return_dict=True)
    # the rows of one batch together realise the mean of the rows' own fractions (same routable chunks per row)
    assert len(fractions) == 3 and 0 < min(fractions) and max(fractions) < 1 and len(set(fractions)) > 1
    assert sum(fractions) / 3 == pytest.approx(float(batched.softmax_fraction), abs=1e-6)


def test_summary_of_block_fractions():
    s = probe.summary([0.1, 0.3, 0.2, 0.4])
    assert s["mean"] == pytest.approx(0.25) and s["min"] == 0.1 and s["max"] == 0.4 and s["blocks"] == 4
    assert s["sd"] == pytest.approx(0.1290994) and s["se_of_mean"] == pytest.approx(0.1290994 / 2)
    assert probe.summary([0.2])["sd"] == 0.0
