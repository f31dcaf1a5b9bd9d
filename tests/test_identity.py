"""With every chunk routed softmax, NatslAttention is exactly the source model's attention."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

from natsl_hf import NatslConfig
from natsl_hf.modeling.layer import NatslAttention
from natsl_hf.modeling_natsl import NatslRotaryEmbedding

FAMILIES = {
    # name: (config class, attention class, extra config kwargs, natsl kwargs)
    "llama": (LlamaConfig, LlamaAttention, {"attention_bias": True}, {"attention_bias": True}),
    "qwen2": (Qwen2Config, Qwen2Attention, {}, {"attention_bias": True, "attention_out_bias": False}),
    "qwen3": (Qwen3Config, Qwen3Attention, {}, {"qk_norm": True}),
}


def build_pair(family: str, heads: int, kv_heads: int, head_dim: int, chunk_size: int):
    cfg_cls, attn_cls, extra, natsl_extra = FAMILIES[family]
    hidden = 48
    src_cfg = cfg_cls(
        hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=64, num_hidden_layers=1, vocab_size=50, rope_theta=10000.0, **extra
    )
    src_cfg._attn_implementation = "eager"
    src = attn_cls(src_cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] == head_dim else 0.0))
    cfg = NatslConfig(
        hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=64, num_hidden_layers=1, vocab_size=50, chunk_size=chunk_size,
        route_override="softmax", router_init_bias=0.0, **natsl_extra,
    )
    layer = NatslAttention(cfg, 0).eval()
    missing, unexpected = layer.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected, unexpected
    copied = {k for k in src.state_dict()}
    assert copied.isdisjoint(missing)
    with torch.no_grad():
        layer.gdn_alpha.fill_(0.7)  # the GDN output is on, but no chunk is linear
        layer.router.proj.weight.normal_(0, 1.0)  # the router would mix routes without the override
    return src_cfg, src, cfg, layer


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("T", [5, 8, 21])  # < C, == C, not a multiple of C
@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # GQA ratios 1, 2, 4
def test_all_softmax_equals_source_attention(family, T, kv_heads):
    torch.manual_seed(T * 10 + kv_heads)
    src_cfg, src, cfg, layer = build_pair(family, heads=4, kv_heads=kv_heads, head_dim=16, chunk_size=8)
    x = torch.randn(2, T, cfg.hidden_size)
    pos = torch.arange(T).expand(2, T)
    cos, sin = LlamaRotaryEmbedding(src_cfg)(x, pos)
    ours_cos, ours_sin = NatslRotaryEmbedding(cfg)(x, pos)
    torch.testing.assert_close(ours_cos, cos)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        expected, _ = src(x, (cos, sin), causal)
        got, routing = layer(x, (ours_cos, ours_sin))
    assert (got - expected).abs().max() <= 1e-5
    assert routing.routes.hard.all()


def test_head_dim_differs_from_hidden_over_heads():
    torch.manual_seed(0)
    src_cfg, src, cfg, layer = build_pair("qwen3", heads=4, kv_heads=2, head_dim=24, chunk_size=4)
    assert cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size
    x = torch.randn(1, 19, cfg.hidden_size)
    pos = torch.arange(19)[None]
    cos, sin = LlamaRotaryEmbedding(src_cfg)(x, pos)
    causal = torch.full((19, 19), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        expected, _ = src(x, (cos, sin), causal)
        got, _ = layer(x, (cos, sin))
    assert (got - expected).abs().max() <= 1e-5
