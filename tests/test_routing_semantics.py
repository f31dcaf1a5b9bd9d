"""The NAtS-L layer against a slow, obviously-correct per-token implementation (SPEC.md 2-3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from natsl_hf import NatslForCausalLM
from natsl_hf.modeling.layer import NatslAttention, apply_rope
from natsl_hf.modeling_natsl import NatslRotaryEmbedding
from natsl_testing import mix_routes, tiny_config


def slow_layer(layer: NatslAttention, x: torch.Tensor, cos, sin, hard: torch.Tensor) -> torch.Tensor:
    """Per-token loops over queries, keys and GDN state updates. hard: [B, Nc, Hkv] (True = softmax)
    for the complete chunks; the trailing incomplete chunk is never written."""
    B, T, _ = x.shape
    C, Hq, Hkv, D = layer.chunk_size, layer.num_heads, layer.num_kv_heads, layer.head_dim
    G = Hq // Hkv
    q = layer.q_proj(x).view(B, T, Hq, D)
    k = layer.k_proj(x).view(B, T, Hkv, D)
    v = layer.v_proj(x).view(B, T, Hkv, D)
    if layer.config.qk_norm:
        q, k = layer.q_norm(q), layer.k_norm(k)
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # GDN inputs: causal depthwise conv written as an explicit sum over taps
    W = layer.gdn_conv.weight.shape[-1]
    raw = torch.cat([q.flatten(2), k.flatten(2)], -1)
    conv = torch.zeros_like(raw)
    for t in range(T):
        for tap in range(W):
            src = t - (W - 1 - tap)
            if src >= 0:
                conv[:, t] += raw[:, src] * layer.gdn_conv.weight[:, 0, tap]
    conv = F.silu(conv)
    qg = conv[..., : Hq * D].view(B, T, Hq, D)
    kg = conv[..., Hq * D:].view(B, T, Hkv, D)
    qg = qg / torch.sqrt((qg * qg).sum(-1, keepdim=True) + 1e-6)
    kg = kg / torch.sqrt((kg * kg).sum(-1, keepdim=True) + 1e-6)
    beta = torch.sigmoid(layer.b_proj(x))
    g = -layer.A_log.exp() * F.softplus(layer.a_proj(x) + layer.dt_bias)

    n_complete = T // C
    out = torch.zeros(B, T, Hq, D)
    for b in range(B):
        for h in range(Hq):
            grp = h // G
            S = torch.zeros(D, D)  # state after every token so far (writes only from linear chunks)
            S_start, decay_in_chunk = S.clone(), 0.0
            for i in range(T):
                ci = i // C
                if i % C == 0:
                    S_start, decay_in_chunk = S.clone(), 0.0
                # --- softmax branch: explicit loop over keys
                logits, values = [], []
                for j in range(i + 1):
                    cj = j // C
                    if cj == ci or bool(hard[b, cj, grp]):
                        logits.append(float(qr[b, i, h] @ kr[b, j, grp]) / math.sqrt(D))
                        values.append(v[b, j, grp])
                p = torch.softmax(torch.tensor(logits), 0)
                o_soft = sum(pj * vj for pj, vj in zip(p, values))
                # --- GDN branch: decay every token, write only tokens of complete linear chunks
                decay_in_chunk += float(g[b, i, grp])
                o_gdn = math.exp(decay_in_chunk) * (S_start.T @ qg[b, i, h]) / math.sqrt(D)
                alpha = math.exp(float(g[b, i, grp]))
                writes = ci < n_complete and not bool(hard[b, ci, grp])
                if writes:
                    kk, bb = kg[b, i, grp], float(beta[b, i, grp])
                    S = alpha * (S - bb * torch.outer(kk, kk @ S)) + bb * torch.outer(kk, v[b, i, grp])
                else:
                    S = alpha * S
                z = layer.gdn_gate_proj(x[b, i]).view(Hq, D)[h]
                normed = o_gdn / torch.sqrt((o_gdn * o_gdn).mean() + layer.gdn_norm.eps) * layer.gdn_norm.weight
                out[b, i, h] = o_soft + layer.gdn_alpha[h] * normed * F.silu(z)
    return layer.o_proj(out.flatten(2))


@pytest.mark.parametrize("T,kv_heads", [(11, 2), (16, 1), (3, 4), (13, 4)])
def test_layer_matches_slow_loop(T, kv_heads):
    torch.manual_seed(T)
    config = tiny_config(num_key_value_heads=kv_heads, router_init_bias=0.0, num_sink_chunks=1)
    layer = NatslAttention(config, 0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        layer.A_log.copy_(torch.rand(kv_heads).log())
        layer.gdn_norm.weight.copy_(1 + 0.1 * torch.randn(16))
    x = torch.randn(2, T, config.hidden_size)
    pos = torch.arange(T).expand(2, T)
    cos, sin = NatslRotaryEmbedding(config)(x, pos)
    with torch.no_grad():
        out, routing = layer(x, (cos, sin))
        hard = routing.routes.hard  # [B, N, Hkv]
        expected = slow_layer(layer, x, cos, sin, hard)
    n_complete = T // config.chunk_size
    if n_complete > 1:  # the test must see both routes among routable chunks
        routable = hard[:, 1:n_complete]
        assert routable.any() and not routable.all(), "random router should mix routes"
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_sink_chunks_always_softmax():
    config = tiny_config(router_init_bias=-20.0, num_sink_chunks=2)  # router strongly prefers GDN
    torch.manual_seed(0)
    layer = NatslForCausalLM(config).model.layers[0].self_attn  # initialised by _init_weights
    x = torch.randn(3, 21, config.hidden_size)
    cos, sin = NatslRotaryEmbedding(config)(x, torch.arange(21).expand(3, 21))
    with torch.no_grad():
        _, routing = layer(x, (cos, sin))
    routes = routing.routes
    assert routes.hard[:, :2].all() and not routes.routable[:, :2].any()
    # complete non-sink chunks 2, 3, 4 go to GDN; incomplete chunk 5 counts as softmax, not routable
    assert not routes.hard[:, 2:5].any() and routes.routable[:, 2:5].all()
    assert not routes.routable[:, 5].any()
    assert routing.n_softmax.tolist() == [0] * 3 and routing.n_routable.tolist() == [3 * config.num_key_value_heads] * 3


def test_route_override_is_honoured():
    for override, expect in (("softmax", True), ("linear", False)):
        config = tiny_config(route_override=override, router_init_bias=0.0)
        layer = NatslAttention(config, 0)
        with torch.no_grad():
            layer.router.proj.weight.normal_(0, 1.0)
        x = torch.randn(2, 17, config.hidden_size)
        cos, sin = NatslRotaryEmbedding(config)(x, torch.arange(17).expand(2, 17))
        _, routing = layer(x, (cos, sin))
        routable = routing.routes.routable
        assert (routing.routes.hard[routable] == expect).all()


def test_each_past_token_reaches_later_queries_by_exactly_one_path():
    """d out[i] / d v[j] for j in an earlier chunk: through softmax iff chunk(j) is softmax,
    through GDN iff it is linear; a query's own chunk is read by softmax only."""
    torch.manual_seed(9)  # a seed whose routes for chunks 0-2 are linear, softmax, linear
    config = tiny_config(router_init_bias=0.0, num_key_value_heads=1, num_sink_chunks=0)
    layer = NatslAttention(config, 0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        layer.router.proj.weight.normal_(0, 2.0)
        layer.A_log.fill_(math.log(0.05))  # slow decay: the GDN path stays measurable over 3 chunks
    x = torch.randn(1, 16, config.hidden_size)
    cos, sin = NatslRotaryEmbedding(config)(x, torch.arange(16).expand(1, 16))

    def grad_wrt_v(alpha: float):
        with torch.no_grad():
            layer.gdn_alpha.fill_(alpha)
        holder = {}

        def hook(module, inputs, output):
            output.retain_grad()
            holder["v"] = output
            return output

        handle = layer.v_proj.register_forward_hook(hook)
        out, routing = layer(x, (cos, sin))
        handle.remove()
        out[0, 13].sum().backward()  # a query in chunk 3
        return holder["v"].grad[0], routing.routes.hard[0, :, 0]  # [T, D]

    grad_soft, hard = grad_wrt_v(0.0)
    grad_both, _ = grad_wrt_v(1.0)
    g_soft, g_gdn = grad_soft.abs().sum(-1), (grad_both - grad_soft).abs().sum(-1)
    assert hard[:3].any() and not hard[:3].all(), "need both routes among chunks 0-2"
    for j in range(12):  # earlier chunks 0, 1, 2
        softmax_chunk = bool(hard[j // 4])
        assert (g_soft[j] > 0) == softmax_chunk, j
        assert (g_gdn[j] > 1e-5) == (not softmax_chunk), (j, g_gdn[j])
    for j in range(12, 14):  # own chunk: softmax only; later tokens: nothing
        assert g_soft[j] > 0 and g_gdn[j] < 1e-7, (j, g_gdn[j])
    assert g_soft[14:].sum() == 0 and g_gdn[14:].sum() == 0


def test_mixed_routes_mix_rows_and_groups():
    model_config = tiny_config(router_init_bias=0.0)
    layer = NatslAttention(model_config, 0)
    mix_routes(torch.nn.ModuleList([layer]), seed=3, router_std=1.0)
    x = torch.randn(4, 40, model_config.hidden_size)
    cos, sin = NatslRotaryEmbedding(model_config)(x, torch.arange(40).expand(4, 40))
    _, routing = layer(x, (cos, sin))
    hard = routing.routes.hard[:, 1:10]  # routable chunks
    assert (hard.flatten(1).float().mean(1) > 0).any() and not hard.all()
    assert not torch.equal(hard[0], hard[1]) or not torch.equal(hard[..., 0], hard[..., 1])
