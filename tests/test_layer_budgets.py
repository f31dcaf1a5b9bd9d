"""Per-layer softmax budgets (config.layer_budget_scale): the config field, the allocation from the source
attention (router_fit.allocate_layer_budgets), and the stage-1 targets, budget loss and calibration that use
each layer's share; natsl-distill --layer_budgets and the recovered layout carry it."""

from __future__ import annotations

import pytest
import torch

from natsl_hf import NatslConfig, NatslForCausalLM
from natsl_hf.configuration_natsl import NatslConfigError
from natsl_hf.conversion.calibrate import calibrate_routers
from natsl_hf.conversion.router_fit import allocate_layer_budgets, calibrate_router_bias, collect_routing_samples
from natsl_hf.conversion.trainer import route_budget_loss
from natsl_hf.modeling.router import Routes
from natsl_testing import tiny_config, tiny_model


def test_config_field_is_checked_and_round_trips(tmp_path):
    config = tiny_config(num_hidden_layers=3, softmax_budget=0.4, layer_budget_scale=[0.5, 1.0, 3.0])
    assert [config.layer_softmax_budget(i) for i in range(3)] == [0.2, 0.4, 1.0]  # at most 1
    assert config.layer_softmax_budget(0, budget=0.1) == pytest.approx(0.05)
    assert tiny_config().layer_softmax_budget(1) == tiny_config().softmax_budget  # None: the same everywhere
    with pytest.raises(NatslConfigError, match="layer_budget_scale"):
        tiny_config(num_hidden_layers=3, layer_budget_scale=[1.0, 1.0])
    with pytest.raises(NatslConfigError, match="layer_budget_scale"):
        tiny_config(num_hidden_layers=2, layer_budget_scale=[1.0, -0.5])
    with pytest.raises(NatslConfigError, match="layer_budget_scale"):
        config.layer_budget_scale = [1.0]  # an assignment is checked against the whole config, and refused
    assert config.layer_budget_scale == [0.5, 1.0, 3.0]
    config.save_pretrained(tmp_path)
    assert NatslConfig.from_pretrained(tmp_path).layer_budget_scale == [0.5, 1.0, 3.0]


def test_allocation_gives_the_budget_to_the_layer_whose_attention_looks_back():
    """One layer whose chunk scores are all 1 (attention explained by distance: the GDN state's decay serves
    it), one with a few chunks far above: one threshold over both keeps the budget where the lookups are."""
    model = tiny_model(seed=1, mixed=False, softmax_budget=0.25)
    g = torch.Generator().manual_seed(0)

    def flat(hidden_states, position_embeddings):
        B, T = hidden_states.shape[:2]
        return torch.ones(B, T // 4, 2) + 0.01 * torch.rand(B, T // 4, 2, generator=g)

    def peaked(hidden_states, position_embeddings):
        B, T = hidden_states.shape[:2]
        mass = torch.ones(B, T // 4, 2) + 0.01 * torch.rand(B, T // 4, 2, generator=g)
        mass[:, 1::2] += 4.0  # half of this layer's chunks are looked up far more than their distance predicts
        return mass

    model.model.layers[0].self_attn.chunk_mass, model.model.layers[1].self_attn.chunk_mass = flat, peaked
    budgets = allocate_layer_budgets(model, [{"input_ids": torch.randint(1, 97, (2, 64), generator=g)}])
    assert budgets[1] > 0.45 and budgets[0] < 0.05 and sum(budgets) / 2 == pytest.approx(0.25, abs=0.02)
    scale = model.config.layer_budget_scale
    assert sum(scale) / 2 == pytest.approx(1.0) and scale[1] > scale[0]


def test_allocation_on_a_real_forward_keeps_the_budget_overall():
    model = tiny_model(seed=3, mixed=False, softmax_budget=0.3)
    blocks = [{"input_ids": torch.randint(1, 97, (2, 48), generator=torch.Generator().manual_seed(1))}]
    budgets = allocate_layer_budgets(model, blocks)
    assert len(budgets) == 2 and all(0 <= b <= 1 for b in budgets)
    assert sum(budgets) / 2 == pytest.approx(0.3, abs=0.05)  # ties at the threshold aside
    assert model.config.route_override is None  # the pass as the source leaves the config as it was
    with pytest.raises(ValueError, match="longer blocks"):
        allocate_layer_budgets(model, [{"input_ids": torch.randint(1, 97, (1, 8))}])


def test_targets_budget_loss_and_calibration_use_each_layers_share():
    torch.manual_seed(0)
    model = tiny_model(seed=4, softmax_budget=0.4, layer_budget_scale=[0.25, 1.75])  # layer budgets 0.1 / 0.7
    blocks = torch.randint(1, 97, (4, 81), generator=torch.Generator().manual_seed(2))
    (_, t0, l0), (_, t1, l1) = collect_routing_samples(model, [{"input_ids": blocks}])
    assert t0.sum() / l0.sum() == pytest.approx(0.1, abs=0.04) and t1.sum() / l1.sum() == pytest.approx(0.7, abs=0.04)

    routes = [Routes(*(torch.ones(1, 4, 2, dtype=dt) for dt in (torch.bool, torch.float32, torch.float32, torch.bool)))
              for _ in range(2)]  # every chunk softmax in both layers
    loss = route_budget_loss(routes, model.config)  # (1 - 0.1)^2 + (1 - 0.7)^2, times router_loss_weight 1
    assert float(loss) == pytest.approx(0.9 ** 2 + 0.3 ** 2)

    def layer_fractions(m):
        out = m(input_ids=blocks, use_cache=False, output_routes=True)
        return [float((r.hard & r.routable).sum() / r.routable.sum()) for r in out.routes]

    calibrate_routers(model, blocks, 0.4)
    f0, f1 = layer_fractions(model)
    assert f0 == pytest.approx(0.1, abs=0.05) and f1 == pytest.approx(0.7, abs=0.05)
    other = tiny_model(seed=4, softmax_budget=0.4, layer_budget_scale=[0.25, 1.75])
    calibrate_router_bias(other, [{"input_ids": blocks}], 0.2)  # another model-wide budget: the shares scale
    g0, g1 = layer_fractions(other)
    assert g0 == pytest.approx(0.05, abs=0.05) and g1 == pytest.approx(0.35, abs=0.05)


def test_natsl_distill_refuses_layer_budgets_outside_a_supervised_stage_1():
    from natsl_hf.conversion.distill import DistillArguments

    base = dict(model="m", source="s", data="d")
    with pytest.raises(ValueError, match="--layer_budgets"):
        DistillArguments(stage=2, layer_budgets=True, **base)
    with pytest.raises(ValueError, match="--layer_budgets"):
        DistillArguments(stage=1, layer_budgets=True, router_fit_blocks=0, **base)
    assert DistillArguments(stage=1, layer_budgets=True, **base).layer_budgets


def test_recovered_layout_carries_the_shares(tmp_path):
    from natsl_hf.conversion.recovered import apply_recovered, export_recovered

    model = tiny_model(seed=6)
    from natsl_hf.conversion.families import is_new_parameter

    state = {n: p.detach().clone() for n, p in model.named_parameters() if is_new_parameter(n)}
    export_recovered(state, tmp_path, {"conversion": {}, "lora_scale": 0.0, "layer_budget_scale": [0.5, 1.5]})
    fresh = tiny_model(seed=7)
    apply_recovered(fresh, tmp_path)
    assert fresh.config.layer_budget_scale == [0.5, 1.5]


def test_model_card_names_each_layers_budget():
    from natsl_hf.model_card import render_model_card

    card = render_model_card(tiny_config(softmax_budget=0.25, layer_budget_scale=[0.5, 1.5]))
    assert "| 0.25 overall; per layer (from the source attention): 0: 0.125, 1: 0.375 |" in card
    assert "per layer" not in render_model_card(tiny_config())
