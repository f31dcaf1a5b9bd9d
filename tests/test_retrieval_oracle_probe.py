"""bench/retrieval_oracle_probe.py's route override on a tiny model (CPU, seconds): the chunks it names take the
forced route in every NAtS-L layer and KV head it covers, every other decision stays the router's, and the override
ends with its block."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from natsl_testing import tiny_model

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_probe():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("retrieval_oracle_probe", BENCH / "retrieval_oracle_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_forced_line_routes_override_only_the_named_chunks_and_layers():
    probe = load_probe()
    model = tiny_model(seed=2, num_hidden_layers=3)
    ids = torch.randint(1, 97, (2, 30))  # chunk 4: 7 complete chunks, the first a sink
    lines = [[2, 3], [5]]

    def routes(**override):
        with torch.no_grad():
            if override:
                with probe.forced_line_routes(model, lines, **override):
                    return model(ids, use_cache=True, output_routes=True).routes
            return model(ids, use_cache=True, output_routes=True).routes

    served = routes()
    assert any(bool((~r.hard[r.routable]).any()) for r in served) and any(bool(r.hard[r.routable].any()) for r in served)
    for softmax in (True, False):
        forced = routes(softmax=softmax, layers=range(1, 3))
        for layer, (s, f) in enumerate(zip(served, forced)):
            for row, chunks in enumerate(lines):
                others = [c for c in range(f.hard.shape[1]) if c not in chunks]
                assert torch.equal(f.hard[row, others], s.hard[row, others])
                want = torch.full_like(s.hard[row, chunks], softmax) if layer >= 1 else s.hard[row, chunks]
                assert torch.equal(f.hard[row, chunks], want), (layer, softmax)
    after = routes()
    assert all(torch.equal(a.hard, s.hard) for a, s in zip(after, served))  # the override ended with its block


def test_line_ranks_count_the_chunks_the_router_prefers():
    """One layer, one row, one KV head: routable chunks 1-4 with p(softmax) 0.9, 0.2, 0.6, 0.4 and the line in chunk 3
    (p 0.6): one other chunk of three ranks above it; a head keeps it where its route is softmax."""
    from types import SimpleNamespace

    from natsl_hf.modeling.router import Routes

    probe = load_probe()
    prob = torch.tensor([[0.0, 0.9, 0.2, 0.6, 0.4]])[..., None]  # [B=1, N=5, H=1]
    routable = torch.tensor([[False, True, True, True, True]])[..., None]
    hard = prob > 0.5
    out = SimpleNamespace(routes=[Routes(hard, hard.float(), prob, routable)])
    rows = probe.line_ranks(out, [[3]], [20], chunk_size=4)
    assert rows == [(0, torch.tensor(1 / 3).item(), True, True)]
    summary = probe.rank_summary(rows + [(0, 0.0, False, False)])
    assert summary["kept_by_some_head"] == 0.5 and summary["rank_share"]["under_0.25"] == 0.5
    assert summary["per_layer"][0]["kept"] == 0.5
