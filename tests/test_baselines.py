"""conversion/baselines.py: the layer-interleaved hybrid at NAtS-L's KV budget."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import natsl_hf
from natsl_hf.conversion import baselines


def test_softmax_layers_are_evenly_spaced():
    assert baselines.softmax_layers(30, 0.25) == [1, 5, 9, 13, 16, 20, 24, 28]
    assert baselines.softmax_layers(4, 0.25) == [2] and baselines.softmax_layers(2, 0.01) == [1]
    assert baselines.softmax_layers(8, 0.5) == [1, 3, 5, 7]
    with pytest.raises(ValueError, match="--softmax-budget"):
        baselines.softmax_layers(8, 0.0)
    with pytest.raises(ValueError, match="do not exist"):
        baselines.layer_hybrid_options(4, 0.25, [4])
    with pytest.raises(ValueError, match="fewer --softmax-layers"):
        baselines.layer_hybrid_options(2, 0.25, [0, 1])


def test_layer_hybrid_keeps_the_budget_of_kv(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    src = tmp_path / "src"
    LlamaForCausalLM(config).save_pretrained(src)
    assert baselines.main([str(src), str(tmp_path / "hybrid"), "--chunk-size", "16"]) == 0
    model = natsl_hf.NatslForCausalLM.from_pretrained(tmp_path / "hybrid").eval()
    assert model.config.natsl_layers == [0, 1, 3, 4, 5, 7] and model.config.route_override == "linear"  # 2 softmax

    softmax = [1, 3, 5, 7]  # budget 0.5
    hybrid = baselines.convert_layer_hybrid(src, tmp_path / "half", softmax_budget=0.5, chunk_size=16, progress=False)
    assert [i for i in range(8) if i not in hybrid.config.natsl_layers] == softmax
    T, C = 200, 16  # 12 complete chunks (1 sink) + an open chunk of 8 tokens
    with torch.no_grad():
        out = hybrid(input_ids=torch.randint(0, 64, (1, T)), use_cache=True)
    assert out.softmax_fraction.item() == 0.0  # the GDN layers route every routable chunk linear
    report = getattr(out, natsl_hf.modeling_natsl.CACHE_FIELD).memory_report()
    kept_tokens = len(softmax) * T + (8 - len(softmax)) * (C + T % C)  # full layers; sink + open chunk
    assert report["kv_fraction"] == pytest.approx(kept_tokens / (8 * T))
