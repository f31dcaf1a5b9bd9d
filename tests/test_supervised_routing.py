"""Supervised routing (stage 1 of a converted model): heavy-hitter targets, the router learning them,
and the bias calibration that makes argmax routing keep the budget."""

from __future__ import annotations


import pytest
import torch

from natsl_hf.cache import NatslCacheLayer
from natsl_hf.conversion.trainer import NatslDistillTrainer, prepare_student
from natsl_hf.modeling import NatslAttention
from natsl_hf.modeling.router import chunk_attention_mass, routing_supervision_loss, routing_targets
from natsl_testing import tiny_config


def naive_bin(d):
    return d  # one profile value per chunk distance


def naive_mass(q, k, C, scale, sinks, iterations=8):
    """Loops: A[j, c] = the attention of chunk j's queries (and the group's heads) on chunk c; the fit
    A ~ a[row, group, j] * b[group, bin(j - c)] over pairs j >= c + 2 with c >= sinks (alternating
    updates); mass = the largest observed / expected over each chunk's far query chunks."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G, N, Nq = Hq // Hkv, T // C, -(-T // C)
    A = torch.zeros(B, Hkv, Nq, N, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(T):
                p = torch.softmax(q[b, i, h] @ k[b, : i + 1, h // G].T * scale, -1).double()
                for c in range(min(N, i // C + 1)):
                    A[b, h // G, i // C, c] += p[c * C : (c + 1) * C].sum()
    pairs = [(j, c) for j in range(Nq) for c in range(N) if j - c >= 2]
    fit = [(j, c) for j, c in pairs if c >= sinks]
    bins = naive_bin(max(Nq - 1, 2)) + 1
    prof = torch.ones(Hkv, bins, dtype=torch.float64)
    for _ in range(iterations):
        a = torch.zeros(B, Hkv, Nq, dtype=torch.float64)
        for b in range(B):
            for g in range(Hkv):
                for j in range(Nq):
                    cs = [c for jj, c in fit if jj == j]
                    den = sum(prof[g, naive_bin(j - c)] for c in cs)
                    a[b, g, j] = sum(A[b, g, j, c] for c in cs) / den if cs else 0.0
        for g in range(Hkv):
            for m in range(bins):
                sel = [(j, c) for j, c in fit if naive_bin(j - c) == m]
                den = sum(a[b, g, j] for b in range(B) for j, _ in sel)
                prof[g, m] = sum(A[b, g, j, c] for b in range(B) for j, c in sel) / den if den > 0 else 0.0
    out = torch.full((B, N, Hkv), float("nan"), dtype=torch.float64)
    for b in range(B):
        for g in range(Hkv):
            for c in range(N):
                js = [j for j, cc in pairs if cc == c]
                if js:
                    # a pair the fit predicts nothing for (a sink's only: a query chunk or a distance no pair of
                    # the fit has) is not compared
                    expected = [(j, a[b, g, j] * prof[g, naive_bin(j - c)]) for j in js]
                    out[b, c, g] = max((A[b, g, j, c] / e for j, e in expected if e > 0), default=0.0)
    return out.float()


def test_uniform_attention_gives_every_chunk_the_same_mass():
    q, k = torch.zeros(1, 40, 2, 4), torch.randn(1, 40, 1, 4)  # q = 0: uniform attention over the seen keys
    mass = chunk_attention_mass(q, k, 4, 0.5)
    torch.testing.assert_close(mass[0, :8], torch.ones(8, 1))
    assert mass[0, 8:].isnan().all()  # chunks 8 and 9: no query two chunks later


def recency_qk(T, decay, planted=None):
    """q, k whose attention score is -decay * (i - j) (+ 6 on the keys of chunk `planted`): attention that
    only decays with distance, the bias that made the last chunks of a block look heavy."""
    pos = torch.arange(T, dtype=torch.float32)
    q = torch.stack([torch.full((T,), decay), -decay * pos, torch.ones(T)], -1)[None, :, None]  # [1, T, 1, 3]
    k = torch.stack([pos, torch.ones(T), torch.zeros(T)], -1)[None, :, None]
    if planted is not None:
        k[0, planted * 4 : (planted + 1) * 4, 0, 2] = 6.0
    return q, k


def test_attention_that_only_decays_with_distance_favours_no_chunk():
    q, k = recency_qk(256, 0.05)
    mass = chunk_attention_mass(q, k, 4, 1.0, num_sink_chunks=1)[0, 1:62, 0]  # chunks with a query 2 later
    assert (mass - 1).abs().max() < 0.05, mass  # the former relative share rose 68-fold from chunk 1 to 61 here
    routable = torch.ones(1, 64, 1, dtype=torch.bool)
    q, k = recency_qk(256, 0.05, planted=20)
    mass = chunk_attention_mass(q, k, 4, 1.0, num_sink_chunks=1)
    target, _ = routing_targets(mass, routable, budget=1 / 62)  # one chunk kept per row: the planted one
    assert target[0, :, 0].nonzero().flatten().tolist() == [20]


@pytest.mark.parametrize("T,sinks", [(20, 0), (23, 1), (41, 1)])  # a tail query chunk or not, sinks in the fit or not
def test_chunk_attention_mass_matches_naive(T, sinks):
    torch.manual_seed(0)
    q, k = torch.randn(2, T, 4, 8), torch.randn(2, T, 2, 8)
    mass = chunk_attention_mass(q, k, 4, 8**-0.5, num_sink_chunks=sinks)
    expected = naive_mass(q, k, 4, 8**-0.5, sinks)
    assert mass.shape == (2, T // 4, 2)
    assert torch.equal(mass.isnan(), expected.isnan())
    assert mass[:, T // 4 - 1].isnan().all() and mass[:, T // 4 - 2].isnan().all() == (T % 4 == 0)
    torch.testing.assert_close(mass.nan_to_num(), expected.nan_to_num(), rtol=1e-4, atol=1e-5)


def test_routing_targets_keep_the_budget_heaviest_per_row_and_group():
    mass = torch.tensor([[[0.1, 0.9], [0.5, 0.2], [0.3, 0.8], [0.7, float("nan")], [0.2, 0.1]]])  # [1, 5, 2]
    routable = torch.tensor([[False, True, True, True, True]])[..., None].expand(1, 5, 2)
    target, labelled = routing_targets(mass, routable, budget=0.5)
    assert labelled[0].tolist() == [[False, False], [True, True], [True, True], [True, False], [True, True]]
    # group 0: 4 labelled chunks keep 2 (0.7, 0.5); group 1: 3 labelled keep round(1.5) = 2 (0.8, 0.2)
    assert target[0].tolist() == [[False, False], [True, True], [False, True], [True, False], [False, False]]


def heavy_hitter_layer(C=4):
    """A layer whose source attention attends to tokens carrying feature 1 (q reads the constant feature
    0, k reads feature 1), so the chunks holding them are the heavy hitters; the router sees the chunk
    mean of the same features."""
    config = tiny_config(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8, chunk_size=C,
                         softmax_budget=0.25, router_init_bias=2.0)
    torch.manual_seed(0)
    layer = NatslAttention(config, 0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
        layer.q_proj.weight.zero_()
        layer.k_proj.weight.zero_()
        layer.q_proj.weight[0::8, 0] = 3.0  # every head's q along its dim 0, from the constant feature
        layer.k_proj.weight[0, 1] = 3.0  # k along dim 0 when the token carries feature 1
        layer.router.proj.bias.copy_(torch.tensor([2.0, 0.0]))  # softmax-biased, as converted
    return layer


def heavy_hitter_batch(B, N, C, generator):
    """x [B, N*C, 16] and which chunks carry the feature: 2 of the labelled chunks 1..N-3 per row."""
    x = torch.randn(B, N * C, 16, generator=generator) * 0.1
    x[..., 0] = 1.0
    important = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        important[b, 1 + torch.randperm(N - 3, generator=generator)[:2]] = True
    x[..., 1] = important.repeat_interleave(C, 1).float()
    return x, important


def test_supervised_routing_routes_by_targets_and_router_learns_heavy_hitters():
    C, N, B = 4, 10, 8
    layer = heavy_hitter_layer(C)
    g = torch.Generator().manual_seed(1)
    ones = torch.ones(B, N * C, 8)
    rope = (ones, torch.zeros_like(ones))

    layer.train()
    layer.router_mode = "supervised"
    x, important = heavy_hitter_batch(B, N, C, g)
    _, routing = layer(x, rope)
    # chunks 1..7 are labelled (8 and 9 have no query two chunks later): round(0.25 * 7) = the 2 important ones
    assert torch.equal(routing.routes.hard[:, 1 : N - 2, 0], important[:, 1 : N - 2])
    assert routing.router_loss > 0.5  # the softmax-biased router disagrees with the targets

    opt = torch.optim.Adam(layer.router.parameters(), lr=0.1)
    for _ in range(60):
        x, important = heavy_hitter_batch(B, N, C, g)
        opt.zero_grad()
        layer(x, rope)[1].router_loss.backward()
        opt.step()
    layer.eval()
    x, important = heavy_hitter_batch(B, N, C, g)
    with torch.no_grad():
        routes = layer(x, rope)[1].routes
    # inference (argmax, no targets): the router alone keeps exactly the heavy-hitter chunks
    assert torch.equal(routes.hard[:, 1:N, 0], important[:, 1:N])


def test_supervised_routing_refuses_padding_and_cache_and_bad_modes():
    layer = heavy_hitter_layer()
    layer.train()
    layer.router_mode = "supervised"
    x = torch.randn(2, 12, 16)
    ones = torch.ones(2, 12, 8)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :3] = False
    with pytest.raises(ValueError, match="unpadded"):
        layer(x, (ones, torch.zeros_like(ones)), token_mask=mask)
    layer.router_mode = "learned"
    cache = NatslCacheLayer()
    with torch.no_grad():
        layer(x, (ones, torch.zeros_like(ones)), cache=cache)
    layer.router_mode = "supervised"
    with pytest.raises(ValueError, match="without a cache"):
        layer(x, (ones, torch.zeros_like(ones)), cache=cache)
    with pytest.raises(ValueError, match="router_mode='freeze' is invalid"):
        layer.router_mode = "freeze"


def test_supervision_loss_is_bce_on_the_margin():
    scores = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]], [[5.0, 5.0]]]])  # [1, 3, 1, 2]
    target = torch.tensor([[[True], [False], [True]]])
    labelled = torch.tensor([[[True], [True], [False]]])
    loss = routing_supervision_loss(scores, target, labelled, temperature=2.0)
    expected = (torch.nn.functional.softplus(torch.tensor(-1.0)) + torch.nn.functional.softplus(torch.tensor(-0.5))) / 2
    torch.testing.assert_close(loss, expected)


def test_stage1_calibrates_router_to_the_budget(tmp_path):
    """Trainer stage 1 with supervised routing: the logged training fraction is the targets' (about the
    budget), and `calibrate_routers` moves the argmax routing to exactly the budget."""
    from test_distill import batch, targs, tiny_natsl, tiny_source, token_dataset

    src = tiny_source()
    model = tiny_natsl(src, chunk_size=4, softmax_budget=0.34)  # 32-token blocks: 5 labelled chunks, keep 2
    ds = token_dataset()
    prepare_student(model, 1)
    trainer = NatslDistillTrainer(model=model, args=targs(tmp_path, max_steps=10, learning_rate=3e-2),
                                  train_dataset=ds, stage=1, teacher=src)
    trainer.train()
    logged = [e["softmax_fraction"] for e in trainer.state.log_history if "softmax_fraction" in e]
    # 2 of the 5 labelled chunks, plus the 2 unlabelled last ones (no query two chunks later) wherever the
    # router sends them
    assert all(2 / 7 - 1e-6 <= f <= 4 / 7 + 1e-6 for f in logged), logged
    bias_before = [layer.self_attn.router.proj.bias.clone() for layer in model.model.layers]
    result = trainer.calibrate_routers(num_blocks=16)
    # random tokens give the router nothing to tell chunks apart by: the BCE drives every margin negative
    # (the collapse calibration exists for)
    assert abs(result["softmax_fraction_before"] - 2 / 7) > 0.1
    # every (layer, head) keeps round(0.34 * 112) = 38 of its 112 routable chunks (16 blocks of 7); the
    # motif-repeating data has chunks with equal margins, which fall on one side of the threshold together
    assert abs(result["softmax_fraction_after"] - 38 / 112) < 0.03
    assert any(not torch.equal(b, layer.self_attn.router.proj.bias) for b, layer in zip(bias_before, model.model.layers))
    model.eval()
    with torch.no_grad():
        out = model(**{k: v[:16] for k, v in batch(ds, 16).items() if k != "labels"}, use_cache=False)
    assert out.softmax_fraction.item() == pytest.approx(result["softmax_fraction_after"])


def test_calibration_hits_the_budget_in_every_layer():
    """Layer by layer: shifting an early layer's routing changes what later routers read, so a single
    pass would miss the budget in later layers; the calibrated model keeps round(b * n) chunks in each."""
    from natsl_hf.conversion.router_fit import calibrate_router_bias
    from natsl_testing import tiny_model

    model = tiny_model(seed=4, num_hidden_layers=3)  # mixed routes, GDN output on: routing changes the outputs
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 97, (4, 40))} for _ in range(2)]  # 9 routable chunks a row
    result = calibrate_router_bias(model, batches, budget=0.4)
    assert result["softmax_fraction_after"] == pytest.approx(round(0.4 * 72) / 72)  # per head: 72 chunks
    with torch.no_grad():
        routes = [model(**b, use_cache=False, output_routes=True).routes for b in batches]
    per_head = torch.stack([torch.cat([r[layer].hard[..., h][r[layer].routable[..., h]] for r in routes]).float().mean()
                            for layer in range(3) for h in range(2)])  # every (layer, KV head)
    assert torch.allclose(per_head, torch.full_like(per_head, round(0.4 * 72) / 72)), per_head


def test_calibration_stopping_each_pass_early_gives_the_same_biases():
    from natsl_hf.conversion.router_fit import calibrate_router_bias
    from natsl_testing import tiny_model

    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 97, (2, 37))} for _ in range(2)]  # a partial last chunk
    biases = []
    for stop_early in (True, False):
        model = tiny_model(seed=5, num_hidden_layers=3)
        result = calibrate_router_bias(model, batches, budget=0.3, stop_early=stop_early)
        biases.append(torch.cat([layer.self_attn.router.proj.bias for layer in model.model.layers]))
        assert result["softmax_fraction_after"] == pytest.approx(round(0.3 * 32) / 32)  # a head: 2 x 2 rows x 8 routable
    torch.testing.assert_close(biases[0], biases[1], rtol=0, atol=0)


def test_fit_router_learns_heavy_hitters_outright():
    """routing_samples + fit_router (the stage-1 router fit): no SGD, the router alone then routes the
    heavy-hitter chunks, and its margin is temperature * the fitted logit."""
    from natsl_hf.conversion.router_fit import fit_router

    C, N, B = 4, 10, 16
    layer = heavy_hitter_layer(C)
    g = torch.Generator().manual_seed(3)
    ones = torch.ones(B, N * C, 8)
    rope = (ones, torch.zeros_like(ones))
    x, important = heavy_hitter_batch(B, N, C, g)
    means, target, labelled = (t.flatten(0, 1) for t in layer.routing_samples(x, rope))
    assert torch.equal(target[labelled], important.flatten()[labelled[:, 0]])  # the targets are the heavy hitters
    auc = fit_router(layer.router, means, target, labelled, temperature=2.0, l2=1e-3)
    assert auc == 1.0
    layer.eval()
    x, important = heavy_hitter_batch(B, N, C, g)
    with torch.no_grad():
        routes = layer(x, rope)[1].routes
    assert torch.equal(routes.hard[:, 1:N, 0], important[:, 1:N])


def test_a_layer_without_softmax_targets_does_not_turn_the_fit_summary_into_nan():
    """At budget 0.125 SmolLM2's layer 0 (a 0.1 share of the budget) labels no chunk softmax: its training AUC is
    undefined (NaN), and the summary of a refit on the GPU read NaN for the whole model. The summary averages the
    layers that have one and counts the others; fit_routers and the main job's step-by-step fit share it."""
    import math

    from natsl_hf.conversion.router_fit import fit_summary, roc_auc

    assert math.isnan(roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([False, False])))  # one class only
    summary = fit_summary([float("nan"), 0.8, 1.0], [10.0, 20.0, 30.0])
    assert summary == {"router_fit_train_auc": 0.9, "router_fit_layers_without_auc": 1, "router_fit_chunks_per_head": 20.0}
    assert fit_summary([float("nan")], [4.0])["router_fit_layers_without_auc"] == 1


def test_looked_up_tokens_label_their_chunks_softmax_in_every_layer_and_head():
    """A fit batch's LOOKED_UP tokens (the lines a recall block's questions retrieve, bench/recover_scale.py's fit
    set): every routable chunk holding one is a labelled softmax target in every layer and KV head; sink chunks
    and the other chunks keep their attention-mass labels; the key never reaches the model's forward (fit,
    layer budgets and calibration all take such batches)."""
    from natsl_testing import tiny_model

    from natsl_hf.conversion.router_fit import (
        LOOKED_UP,
        allocate_layer_budgets,
        calibrate_router_bias,
        collect_routing_samples,
        fit_routers,
    )

    model = tiny_model(seed=6, num_hidden_layers=2, softmax_budget=0.25)  # chunk 4, one sink chunk
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(4))  # 10 chunks a row
    looked_up = torch.zeros(2, 40, dtype=torch.bool)
    looked_up[0, 2] = True  # the sink chunk: stays as it was
    looked_up[0, 21:23] = True  # chunk 5 of row 0
    looked_up[1, 31] = looked_up[1, 32] = True  # chunks 7 and 8 of row 1 (a line across a chunk boundary)
    plain = collect_routing_samples(model, [{"input_ids": ids}])
    labelled_fit = collect_routing_samples(model, [{"input_ids": ids, LOOKED_UP: looked_up}])
    keep = torch.zeros(2, 10, dtype=torch.bool)
    keep[0, 5] = keep[1, 7] = keep[1, 8] = True
    keep = keep.flatten()
    for (m0, t0, l0), (m1, t1, l1) in zip(plain, labelled_fit):
        torch.testing.assert_close(m0, m1)
        assert t1[keep].all() and l1[keep].all()  # every head
        assert torch.equal(t1[~keep], t0[~keep]) and torch.equal(l1[~keep], l0[~keep])
        assert not l1[0].any() and not l1[10].any()  # the sink chunks of both rows: not routable, not labelled
    batches = [{"input_ids": ids, LOOKED_UP: looked_up}]
    assert fit_routers(model, batches)["router_fit_chunks_per_head"] > 0
    assert len(allocate_layer_budgets(model, batches)) == 2
    assert 0 <= calibrate_router_bias(model, batches, 0.25)["softmax_fraction_after"] <= 1
