"""conversion/recovered.py: the shipped layout of recovered NAtS-L parameters, and applying it.

Applying new parameters + LoRA factors to a fresh conversion must give the model the run trained: the
same outputs as the PEFT-wrapped model it was trained as (bf16-rounded factors aside). The SmolLM2
parameters the repo ships must cover a SmolLM2-shaped conversion exactly.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from natsl_hf.conversion.families import is_new_parameter
from natsl_hf.conversion.recovered import (INFO_FILE, SMOLLM2_RECOVERED, apply_recovered, export_recovered,
                                           read_recovered)
from natsl_testing import tiny_model

INFO = {"conversion": {"chunk_size": 4}, "lora_scale": 2.0}


def trained(model):
    """`model` wrapped in PEFT LoRA on q/k/v/o (r 4, alpha 8) with every adapter and new parameter moved off its
    init, as a recovery run leaves it."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                       "o_proj"], lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name or is_new_parameter(name.removeprefix("base_model.model.")):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return peft_model


def plain_state(peft_model) -> dict:
    return {n.removeprefix("base_model.model."): p.detach().clone() for n, p in peft_model.named_parameters()
            if ".lora_" in n or is_new_parameter(n.removeprefix("base_model.model."))}


def test_apply_gives_the_trained_model(tmp_path):
    fresh = tiny_model(num_hidden_layers=2, chunk_size=4).eval()
    peft_model = trained(copy.deepcopy(fresh)).eval()
    files = export_recovered(plain_state(peft_model), tmp_path / "r", INFO)
    assert INFO_FILE in files and any(f.endswith(".safetensors") for f in files)
    state, info = read_recovered(tmp_path / "r")
    assert info == INFO and all(".default." not in n for n in state)
    assert all(t.dtype == torch.bfloat16 for n, t in state.items() if ".lora_" in n)  # factors bf16, router fp32
    assert all(t.dtype == torch.float32 for n, t in state.items() if ".router." in n)
    apply_recovered(fresh, tmp_path / "r")
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = peft_model(input_ids=ids, use_cache=False).logits, fresh(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2)  # the factors were rounded to bf16
    assert (got - expected).abs().max() < 0.1 * (expected - tiny_model(num_hidden_layers=2, chunk_size=4).eval()(
        input_ids=ids, use_cache=False).logits).abs().max()  # far closer to the trained model than to a fresh one


def test_apply_refuses_a_mismatch_and_writes_nothing(tmp_path):
    model = tiny_model(num_hidden_layers=2, chunk_size=4)
    state = plain_state(trained(copy.deepcopy(model)))
    before = copy.deepcopy(model.state_dict())
    export_recovered(state, tmp_path / "other_chunk", {**INFO, "conversion": {"chunk_size": 8}})
    with pytest.raises(ValueError, match="chunk_size=8"):
        apply_recovered(model, tmp_path / "other_chunk")
    partial = {n: t for n, t in state.items() if "layers.1." not in n or ".lora_" in n}
    export_recovered(partial, tmp_path / "partial", INFO)
    with pytest.raises(ValueError, match="lacks .* new NAtS-L parameters"):
        apply_recovered(model, tmp_path / "partial")
    wrong = dict(state)
    name = next(n for n in wrong if n.endswith("lora_A.default.weight"))
    wrong[name] = torch.zeros(4, 3)
    export_recovered(wrong, tmp_path / "wrong", INFO)
    with pytest.raises(ValueError, match="do not fit"):
        apply_recovered(model, tmp_path / "wrong")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # checked before anything is written
    with pytest.raises(ValueError, match="neither new NAtS-L parameters nor LoRA"):
        export_recovered({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, tmp_path / "x", INFO)
    with pytest.raises(FileNotFoundError, match=INFO_FILE):
        apply_recovered(model, tmp_path / "nothing")


def test_shipped_smollm2_parameters_fit_its_conversion():
    """The parameters the README main job applies cover a SmolLM2-135M-shaped conversion, every name and shape."""
    from transformers import LlamaConfig

    from natsl_hf import NatslForCausalLM
    from natsl_hf.conversion.convert import natsl_config

    info = json.loads((SMOLLM2_RECOVERED / INFO_FILE).read_text())
    assert info["conversion"]["softmax_budget"] == 0.25 and info["tokens_seen"]["stage1"] > 10**7
    source = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=8192)
    with torch.device("meta"):  # shapes only: no 135M-parameter init on the CPU
        model = NatslForCausalLM(natsl_config(source, {**info["conversion"]}))
    state, _ = read_recovered(SMOLLM2_RECOVERED)
    params = dict(model.named_parameters())
    assert {n for n in params if is_new_parameter(n)} == {n for n in state if ".lora_" not in n}
    for name, value in state.items():
        base = name.replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
        assert base in params, name
        if ".lora_" not in name:
            assert params[name].shape == value.shape, name
