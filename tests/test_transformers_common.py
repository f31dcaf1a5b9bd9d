"""The contract transformers' common tests check (ModelTesterMixin, GenerationTesterMixin, ConfigTester), on a
tiny NAtS-L model with mixed routing, written here against the public API.

transformers' own files cannot run in CI: the PyPI sdist of transformers 5.24.0 ships tests/test_modeling_common.py
but not what it imports (tests/generation/test_utils.py, tests/exporters/, tests/utils/) nor tests/causal_lm_tester.py.
transformers' own test classes run on NAtS-L outside CI with tests/transformers_suite/ (its README says how); what
fails there should fail here too.

Model: 2 layers, chunk_size 4, 1 sink chunk, routers and GDN parameters randomised (`mix_routes`) so chunks split
between the softmax and the GDN branch; 13-token prompts hold 3 complete chunks, 2 of them routable.
"""

from __future__ import annotations

import copy

import pytest
import torch

from natsl_hf import NatslConfig, NatslForCausalLM
from natsl_hf.modeling_natsl import CACHE_FIELD  # this transformers' name of the cache argument / output field
from natsl_testing import tiny_config, tiny_model

BATCH, PROMPT, NEW = 3, 13, 6


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 97, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))


def generate(model, ids, **kwargs):
    kwargs = dict(dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0), **kwargs)
    with torch.no_grad():
        return model.generate(ids, **kwargs)


def with_config(model, **fields) -> NatslForCausalLM:
    """The same weights under a config with `fields` changed."""
    config = copy.deepcopy(model.config)
    config.update(fields)
    other = NatslForCausalLM(config).eval()
    other.load_state_dict(model.state_dict())
    return other


# --------------------------------------------------------------------------- config (ConfigTester)
def test_config_round_trips_and_keeps_common_kwargs(tmp_path):
    config = tiny_config(return_dict=False, output_hidden_states=True, num_labels=5, problem_type="regression")
    config.save_pretrained(tmp_path)
    loaded, unused = NatslConfig.from_pretrained(tmp_path, return_unused_kwargs=True, not_a_field=1)
    assert loaded.to_dict() == config.to_dict() and unused == {"not_a_field": 1}
    assert NatslConfig.from_json_file(tmp_path / "config.json").to_dict() == config.to_dict()
    assert (loaded.return_dict, loaded.output_hidden_states, len(loaded.id2label)) == (False, True, 5)
    assert NatslConfig().num_hidden_layers > 0  # constructible without arguments


# --------------------------------------------------------------------------- model (ModelTesterMixin)
def test_save_load_loses_nothing(model, ids, tmp_path):
    model.save_pretrained(tmp_path)
    loaded, info = NatslForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_outputs_follow_the_config_and_the_arguments(model, ids):
    with torch.no_grad():
        reference = model(ids)
        hidden = with_config(model, output_hidden_states=True)(ids).hidden_states
        as_tuple = with_config(model, return_dict=False)(ids)
        as_tuple_arg = model(ids, return_dict=False)
    assert len(hidden) == model.config.num_hidden_layers + 1
    assert all(h.shape == (BATCH, PROMPT, model.config.hidden_size) for h in hidden)
    for output in (as_tuple, as_tuple_arg):
        assert isinstance(output, tuple) and torch.equal(output[0], reference.logits)
    for value in reference.values():
        if isinstance(value, torch.Tensor):
            assert torch.isfinite(value).all()


def test_attention_weights_are_refused_clearly(model, ids):
    with pytest.raises(ValueError, match="output_attentions=False"):
        model(ids, output_attentions=True)


def test_inputs_embeds_match_input_ids(model, ids):
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(ids).logits)


def test_batching_equivalence(model, ids):
    """Every output tensor is per row, and a row's values do not depend on the rest of the batch: the routing
    counts too, for a left-padded row that routes nothing (its 5 real tokens make one chunk, the sink)."""
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        rows = [model(ids[i : i + 1], attention_mask=mask[i : i + 1]) for i in range(BATCH)]
    assert int(batched.routable_chunks[1].sum()) == 0 and rows[1].softmax_fraction is None
    assert int(batched.routable_chunks[0].sum()) > 0 and batched.softmax_fraction is not None
    for i, row in enumerate(rows):
        assert batched.keys() == row.keys()
        for key, value in batched.items():
            if isinstance(value, torch.Tensor):
                assert value.shape[:1] == (BATCH,), f"{key} has no batch dimension"
                torch.testing.assert_close(value[i : i + 1], row[key], rtol=1e-5, atol=1e-5, msg=f"{key}, row {i}")


def test_training_with_and_without_gradient_checkpointing(ids):
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=0).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_resize_token_embeddings(model, ids):
    resized = copy.deepcopy(model)
    resized.resize_token_embeddings(model.config.vocab_size + 7)
    assert resized.config.vocab_size == model.config.vocab_size + 7
    with torch.no_grad():
        logits = resized(ids).logits
    assert logits.shape == (BATCH, PROMPT, model.config.vocab_size + 7)
    torch.testing.assert_close(logits[..., : model.config.vocab_size], model(ids).logits)


# --------------------------------------------------------------------------- generate (GenerationTesterMixin)
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_cache_equals_without(model, ids, num_beams):
    assert torch.equal(generate(model, ids, num_beams=num_beams),
                       generate(model, ids, num_beams=num_beams, use_cache=False))


def test_generate_dict_outputs(model, ids):
    out = generate(model, ids, return_dict_in_generate=True, output_scores=True, output_logits=True,
                   output_hidden_states=True)
    assert out.sequences.shape == (BATCH, PROMPT + NEW) and len(out.scores) == len(out.logits) == NEW
    assert len(out.hidden_states) == NEW and len(out.hidden_states[0]) == model.config.num_hidden_layers + 1
    assert out.hidden_states[0][0].shape[1] == PROMPT and out.hidden_states[1][0].shape[1] == 1


def test_generate_continues_from_its_cache(model, ids):
    first = generate(model, ids, max_new_tokens=3, return_dict_in_generate=True)
    cache = {CACHE_FIELD: getattr(first, CACHE_FIELD)}
    continued = generate(model, first.sequences, max_new_tokens=NEW - 3, **cache)
    assert torch.equal(continued, generate(model, ids))


def test_left_padded_rows_generate_what_they_generate_alone(model, ids):
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[0, :3], mask[0, :3] = 0, 0
    assert torch.equal(generate(model, padded, attention_mask=mask)[0, 3:], generate(model, ids[:1, 3:])[0])


def test_sampling_is_reproducible(model, ids):
    samples = []
    for _ in range(2):
        torch.manual_seed(1)
        samples.append(generate(model, ids, do_sample=True, top_k=10))
    assert torch.equal(*samples)


def test_static_cache_scores_equal_the_full_forward(model, ids):
    kwargs = dict(return_dict_in_generate=True, output_scores=True)
    static = generate(model, ids, cache_implementation="static", **kwargs)
    full = generate(model, ids, use_cache=False, **kwargs)
    for step, (a, b) in enumerate(zip(static.scores, full.scores)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")


def test_generate_returns_transformers_cache_types(model, ids):
    """generate()'s default cache is a DynamicCache, cache_implementation="static" gives a StaticCache (what
    generation code and tests check), each with NAtS-L layers; read as dense (keys, values) pairs they refuse."""
    from transformers import DynamicCache, StaticCache

    dynamic = getattr(generate(model, ids, return_dict_in_generate=True), CACHE_FIELD)
    static = getattr(generate(model, ids, cache_implementation="static", return_dict_in_generate=True), CACHE_FIELD)
    assert isinstance(dynamic, DynamicCache) and not dynamic.is_compileable
    assert isinstance(static, StaticCache) and static.is_compileable
    for cache in (dynamic, static):
        assert len(cache) == model.config.num_hidden_layers and int(cache.get_seq_length()) == PROMPT + NEW - 1
        with pytest.raises(TypeError, match=r"layers\[i\]\.state"):
            list(cache)


def test_generate_masks_keep_their_shape_and_strides(model):
    """A compiled decode step gets a mask of the same shape and strides at every step: with a NatslStaticCache (what
    generate() asks compileable caches for a mask of) the 2D mask padded to the cache's length, so that it also
    covers every token of transformers' merged multi-token decode export; without one, the new token's column (a
    view of the growing mask, which transformers 5.17 passes whole, changed its strides each step and recompiled)."""
    from natsl_hf import NatslStaticCache

    embeds = torch.empty(BATCH, 1, 0)
    growing = [torch.ones(BATCH, n, dtype=torch.long) for n in (PROMPT, PROMPT + 1, PROMPT + 2)]
    masks = [model.create_masks_for_generate(model.config, embeds, mask) for mask in growing]
    assert {mask.stride() for mask in masks} == {(1, 1)} and all(mask.shape == (BATCH, 1) for mask in masks)
    cache = NatslStaticCache(model.config, max_batch_size=BATCH, max_cache_len=PROMPT + NEW)
    for name in ("cache", "past_key_values"):  # transformers >= 5.24 / < 5.24
        masks = [model.create_masks_for_generate(model.config, embeds, mask, **{name: cache}) for mask in growing]
        assert {(mask.shape, mask.stride()) for mask in masks} == {((BATCH, PROMPT + NEW), (PROMPT + NEW, 1))}
        assert all(mask[:, :n.shape[1]].all() and not mask[:, n.shape[1]:].any() for mask, n in zip(masks, growing))
