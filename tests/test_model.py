"""NatslConfig validation, NatslForCausalLM training signals, save/load, Auto classes, remote code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from natsl_hf import NatslConfig, NatslForCausalLM, NatslModel
from natsl_hf.modeling import NatslAttention
from natsl_testing import tiny_config, tiny_model


@pytest.mark.parametrize(
    "field,value",
    [
        ("chunk_size", 48),
        ("chunk_size", 0),
        ("num_sink_chunks", -1),
        ("softmax_budget", 1.5),
        ("router_temperature", 0.0),
        ("router_loss_weight", -1.0),
        ("gdn_conv_size", 0),
        ("route_override", "gdn"),
        ("natsl_layers", [0, 7]),
        ("num_key_value_heads", 3),
        ("hidden_act", "tanh"),
        ("chunk_size", True),
        ("head_dim", 15),
        ("rms_norm_eps", -1.0),
        ("max_position_embeddings", 0),
        ("rope_parameters", {"rope_type": "bogus", "rope_theta": 10000.0}),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 10000.0}),  # factor etc. missing
        ("rope_parameters", {"rope_type": "default", "rope_theta": -1.0}),
    ],
)
def test_config_validation_names_field_value_and_fix(field, value):
    with pytest.raises(ValueError) as err:
        tiny_config(**{field: value})
    message = str(err.value)
    assert field in message and ("expected" in message or "must" in message)
    shown = {list: "7", dict: "rope_type"}.get(type(value), str(value))
    assert shown in message


def test_config_defaults_and_layers():
    cfg = tiny_config(num_hidden_layers=4, natsl_layers=[3, 1, 1])
    assert cfg.natsl_layers == [1, 3]
    assert [cfg.is_natsl_layer(i) for i in range(4)] == [False, True, False, True]
    model = NatslForCausalLM(cfg)
    assert [isinstance(layer.self_attn, NatslAttention) for layer in model.model.layers] == [False, True, False, True]
    assert not hasattr(model.model.layers[0].self_attn, "router")
    out = model(torch.randint(1, 97, (1, 13)), use_cache=False)
    assert out.layer_softmax_fraction.shape == (2,)


def test_labels_loss_includes_router_loss_and_outputs_routes():
    model = tiny_model(softmax_budget=0.0, router_loss_weight=3.0).train()
    ids = torch.randint(1, 97, (2, 19))
    out = model(ids, labels=ids, use_cache=False, output_routes=True)
    assert out.router_loss is not None and out.router_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.router_loss)
    assert len(out.routes) == 2 and out.routes[0].hard.shape == (2, 5, 2)  # 5 chunks
    n_routable = sum(int(r.routable.sum()) for r in out.routes)
    n_soft = sum(int((r.hard & r.routable).sum()) for r in out.routes)
    assert out.softmax_fraction.item() == pytest.approx(n_soft / n_routable)
    model.eval()
    assert model(ids, labels=ids, use_cache=False).router_loss is None  # eval: LM loss only


def _grad_norms(model, names):
    return {n: p.grad.abs().sum().item() if p.grad is not None else 0.0 for n, p in model.named_parameters() if any(k in n for k in names)}


def test_gradients_at_init_and_after_alpha():
    torch.manual_seed(0)
    model = NatslForCausalLM(tiny_config(router_init_bias=0.0)).train()  # alpha = 0 at init
    from natsl_testing import mix_routes

    with torch.no_grad():  # a mixed routing, still alpha = 0
        for layer in model.model.layers:
            layer.self_attn.router.proj.weight.normal_(0, 0.5)
    ids = torch.randint(1, 97, (2, 24))
    out = model(ids, labels=ids, use_cache=False)
    assert 0 < out.softmax_fraction < 1
    out.loss.backward()
    grads = _grad_norms(model, ["router", "gdn_alpha", "a_proj", "b_proj", "A_log", "dt_bias", "gdn_conv", "gdn_gate"])
    for name, value in grads.items():
        assert torch.isfinite(torch.tensor(value)), name
        if "router" in name or "gdn_alpha" in name:
            assert value > 0, name
        else:  # alpha = 0: the GDN branch does not reach the loss yet
            assert value == 0, name

    # the LM loss alone (no budget term) reaches the router through the straight-through route weight
    # m of the softmax branch (alpha = 0 still: the GDN side is silent)
    model.zero_grad()
    out = model(ids, use_cache=False)
    torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert sum(_grad_norms(model, ["router"]).values()) > 0

    model.zero_grad()
    mix_routes(model, seed=1)  # alpha != 0
    model(ids, labels=ids, use_cache=False).loss.backward()
    for name, value in _grad_norms(model, ["a_proj", "b_proj", "A_log", "dt_bias", "gdn_conv", "gdn_gate"]).items():
        assert value > 0 and torch.isfinite(torch.tensor(value)), name

    # and through the GDN side: with every earlier chunk linear (softmax branch sees own chunks only),
    # the LM loss still moves the router, via the GDN writes beta * (1 - m)
    model.zero_grad()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.router.proj.bias.copy_(torch.tensor([-5.0, 5.0]).repeat(layer.self_attn.num_kv_heads))
    out = model(ids, use_cache=False)
    assert out.softmax_fraction == 0
    torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert sum(_grad_norms(model, ["router"]).values()) > 0


def test_router_loss_moves_fraction_toward_budget():
    torch.manual_seed(0)
    model = NatslForCausalLM(tiny_config(softmax_budget=0.1, router_loss_weight=10.0, router_init_bias=1.0)).train()
    ids = torch.randint(1, 97, (4, 40))
    start = model(ids, use_cache=False).softmax_fraction.item()
    assert start > 0.9
    router_params = [p for n, p in model.named_parameters() if "router" in n]
    opt = torch.optim.Adam(router_params, lr=0.05)
    for _ in range(15):
        opt.zero_grad()
        model(ids, labels=ids, use_cache=False).router_loss.backward()
        opt.step()
    end = model(ids, use_cache=False).softmax_fraction.item()
    assert end < 0.5, (start, end)


def test_save_load_round_trip_same_logits(tmp_path):
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 23))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "natsl"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_natsl.NatslForCausalLM"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, NatslForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, use_cache=False).logits, expected, atol=0, rtol=0)


def test_auto_classes_resolve_natsl():
    kwargs = {k: v for k, v in tiny_config().to_diff_dict().items() if k != "model_type"}
    cfg = AutoConfig.for_model("natsl", **kwargs)
    assert isinstance(cfg, NatslConfig)
    assert isinstance(AutoModelForCausalLM.from_config(cfg), NatslForCausalLM)
    assert isinstance(AutoModel.from_config(cfg), NatslModel)


def test_trust_remote_code_in_fresh_process(tmp_path):
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 17))
    with torch.no_grad():
        torch.save(model(ids, use_cache=False).logits, tmp_path / "expected.pt")
    torch.save(ids, tmp_path / "ids.pt")
    model.save_pretrained(tmp_path / "ckpt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        assert "natsl_hf" not in sys.modules
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True)
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        got = model(ids, use_cache=False).logits
        assert type(model).__name__ == "NatslForCausalLM", type(model)
        assert torch.equal(got, expected), (got - expected).abs().max()
        print("REMOTE_OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]
    # without trust_remote_code a fresh process must refuse (model_type unknown to transformers)
    refuse = subprocess.run(
        [sys.executable, "-c", f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=False)"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )
    assert refuse.returncode != 0


def test_bad_inputs_give_clear_errors():
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 9))
    with pytest.raises(ValueError, match="2D attention_mask"):
        model(ids, attention_mask=torch.ones(1, 1, 9, 9))
    with pytest.raises(TypeError, match="NatslCache"):
        from transformers import DynamicCache

        model(ids, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_gradient_checkpointing_matches():
    model = tiny_model().train()
    ids = torch.randint(1, 97, (2, 21))
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out2 = model(ids, labels=ids, use_cache=False)
    out2.loss.backward()
    torch.testing.assert_close(out2.loss, out.loss)
    for n, g in ref.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, atol=1e-6, rtol=1e-5)
    # a cache would be written twice (forward, then the recomputation): refused with the way out
    from natsl_hf import NatslCache

    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(ids, past_key_values=NatslCache(model.config))
    model.eval()
    cache = NatslCache(model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    assert cache.get_seq_length() == ids.shape[1]


def test_training_step_builds_no_cache():
    """A plain Trainer leaves config.use_cache=True: a training forward must still take the dense (compiled on
    CUDA) layer path, not build a NatslCache nobody reads; eval and no-grad forwards keep the cache."""
    from natsl_hf.modeling_natsl import CACHE_FIELD

    model = tiny_model().train()
    assert model.config.use_cache
    ids = torch.randint(1, 97, (2, 19))
    assert getattr(model(ids, labels=ids), CACHE_FIELD) is None
    with torch.no_grad():
        assert getattr(model(ids), CACHE_FIELD) is not None
    assert getattr(model.eval()(ids), CACHE_FIELD) is not None
