"""Issue 23: every public entry point of the model refuses a bad value with one line naming the fix, before any
work starts, and takes what Llama takes (padded packed documents, all-padding rows).

Decisions tested here (documented in the code):
- packed position_ids (restarting at 0) with a padding attention_mask are supported exactly: padding belongs to no
  document and its positions are not read (modeling/varlen.py); packed documents with a cache, and generate() from
  packed position_ids, are refused.
- position_ids: 2D [B, n] or [1, n] integers, >= 0 and increasing along each document over the real tokens; past
  max_position_embeddings they warn (the documented behaviour), explicit ones too.
- from_pretrained(ckpt, field=value) that changes a field the trained parameters depend on (TRAINED_FIELDS:
  chunk_size, natsl_layers, the head layout...) is refused; other fields may be overridden, and a config assigned by
  hand and passed as config= is taken as given.
- generate(cache_implementation="static", cache_config=...) honours max_kept_fraction (and max_cache_len) and refuses
  other keys / values; a cache built for another model is refused at the first forward.
- a row or batch of padding only runs (outputs meaningless, as Llama's), through every path and cache.
"""

from __future__ import annotations

import logging
import re
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from natsl_hf import NatslCache, NatslConfig, NatslForCausalLM, NatslStaticCache
from natsl_hf.modeling.varlen import Documents
from natsl_hf.modeling_natsl import CACHE_FIELD
from natsl_testing import tiny_config, tiny_model


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=23)


# --------------------------------------------------------------------------- 1. packed documents + padding
def padded_packed(docs_per_row, pad_left):
    """Rows of packed documents (positions restarting at 0), each row padded to one length (left or right by row);
    positions on padding are 0, as transformers' generate() writes them."""
    gen = torch.Generator().manual_seed(1)
    docs = [[torch.randint(1, 97, (n,), generator=gen) for n in row] for row in docs_per_row]
    T = max(sum(row) for row in docs_per_row) + 2
    ids = torch.zeros(len(docs), T, dtype=torch.long)
    mask, pos = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, row in enumerate(docs):
        length = sum(len(d) for d in row)
        start = T - length if pad_left[b] else 0
        ids[b, start:start + length] = torch.cat(row)
        mask[b, start:start + length] = 1
        pos[b, start:start + length] = torch.cat([torch.arange(len(d)) for d in row])
    return docs, ids, mask, pos


def test_padded_packed_documents_equal_each_document_alone(model):
    """Left- and right-padded packed rows: every document's logits equal the document run alone (without the fix
    the documents were not separated: 0.42 apart), and the routing counts of a row add up its documents'."""
    docs, ids, mask, pos = padded_packed([[9, 6, 3], [13, 4], [7]], pad_left=[True, False, True])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos)
    assert getattr(out, CACHE_FIELD) is None  # packed documents build no cache
    for b, row in enumerate(docs):
        real = mask[b].bool()
        alone = [model(d[None], use_cache=False) for d in row]
        expected = torch.cat([a.logits[0] for a in alone])
        assert (out.logits[b, real] - expected).abs().max() < 1e-5, b
        assert int(out.routable_chunks[b].sum()) == sum(int(a.routable_chunks.sum()) for a in alone)


def test_padded_packed_documents_train_as_each_document_alone():
    model = tiny_model(seed=5).train()
    docs, ids, mask, pos = padded_packed([[6, 9], [5, 8]], pad_left=[True, False])
    logits_packed = model(ids, attention_mask=mask, position_ids=pos).logits
    weights = torch.randn(logits_packed.shape, generator=torch.Generator().manual_seed(2)) * mask[..., None]
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((logits_packed * weights).sum(), params, allow_unused=True)
    alone = torch.zeros_like(logits_packed)
    for b, row in enumerate(docs):
        alone[b, mask[b].bool()] = torch.cat([model(d[None], use_cache=False).logits[0] for d in row])
    grads_alone = torch.autograd.grad((alone * weights).sum(), params, allow_unused=True)
    assert (logits_packed - alone)[mask.bool()].abs().max() < 1e-5
    for a, b in zip(grads, grads_alone):
        if b is not None:
            assert (a - b).norm() <= 5e-3 * b.norm().clamp(min=1e-12)


def test_documents_skip_padding():
    pos = torch.tensor([[0, 0, 0, 1, 0, 1, 2], [0, 1, 2, 0, 1, 0, 0]])
    valid = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]).bool()
    documents = Documents.from_position_ids(pos, valid)
    assert documents.mask.sum(1).tolist() == [2, 3, 3, 2]
    x = torch.arange(14.0).view(2, 7, 1) + 1
    assert documents.unpack(x)[..., 0].tolist() == [[3, 4, 0], [5, 6, 7], [8, 9, 10], [11, 12, 0]]
    assert torch.equal(documents.repack(documents.unpack(x)), x * valid[..., None])
    assert documents.per_row(torch.tensor([1, 2, 3, 4])).tolist() == [3, 7]
    # one document per row (generate()'s left-padding positions: 0 on padding): nothing to unpack
    assert Documents.from_position_ids(torch.tensor([[0, 0, 0, 1, 2]]), torch.tensor([[0, 0, 1, 1, 1]]).bool()) is None


def test_left_padded_generate_positions_are_not_documents(model):
    """transformers' generate() writes position 0 on padding: that is no packed document (a cache is built)."""
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos)
    assert isinstance(getattr(out, CACHE_FIELD), NatslCache)
    assert torch.equal(out.logits, logits(model, ids, attention_mask=mask))


def test_packed_documents_refuse_a_cache_and_generate(model):
    ids = torch.randint(1, 97, (1, 12))
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    for cache in (NatslCache(model.config), NatslStaticCache(model.config, max_batch_size=1, max_cache_len=12)):
        with pytest.raises(ValueError, match="packed documents.*without a cache") as err, torch.no_grad():
            model(ids, position_ids=pos, past_key_values=cache)
        one_line(err)
    with pytest.raises(ValueError, match="generate\\(\\) continues one sequence per row") as err:
        model.generate(ids, position_ids=pos, max_new_tokens=2, do_sample=False)
    one_line(err)


# --------------------------------------------------------------------------- 2. position_ids values and shapes
@pytest.mark.parametrize("bad,message", [
    (lambda n: torch.arange(n)[None] - 1, r"position_ids must be >= 0, got -1"),
    (lambda n: torch.arange(n, 0, -1)[None], r"position_ids must not decrease along a sequence, got \d+ then \d+"),
    (lambda n: torch.tensor([[0, 1, 2, 3, 1] + list(range(2, n - 3))]), r"must not decrease .* got 3 then 1"),
    (lambda n: torch.arange(n), r"must be 2D \[batch, length\], got shape \(12,\); for one sequence pass position_ids\[None\]"),
    (lambda n: torch.arange(n - 1)[None], r"position_ids has shape \(1, 11\); expected \[1, 12\]: one position per new token"),
    (lambda n: torch.arange(n)[None, None].expand(3, 1, n), r"must be 2D"),
    (lambda n: torch.arange(n, dtype=torch.float32)[None], r"must be integers \(torch.long\), got dtype torch.float32"),
    (lambda n: [list(range(n))], r"position_ids must be a tensor"),
])
def test_bad_position_ids_raise_one_line(model, bad, message):
    with pytest.raises(ValueError, match=message) as err, torch.no_grad():
        model(torch.randint(1, 97, (1, 12)), position_ids=bad(12))
    one_line(err)


def test_position_ids_of_one_row_serve_the_batch(model):
    ids = torch.randint(1, 97, (2, 10))
    pos = torch.arange(3, 13)[None]
    assert torch.equal(logits(model, ids, position_ids=pos), logits(model, ids, position_ids=pos.expand(2, 10)))
    with pytest.raises(ValueError, match=r"expected \[2, 10\] \(or \[1, 10\] for every row\)"), torch.no_grad():
        model(ids, position_ids=torch.arange(10).expand(3, 10))


def test_explicit_positions_past_the_context_warn(caplog):
    from transformers.utils.logging import warning_once

    warning_once.cache_clear()  # said once per process: an earlier test may have said it
    model = tiny_model(seed=2, max_position_embeddings=16)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        model(torch.randint(1, 97, (1, 8)), position_ids=torch.arange(20, 28)[None])  # 8 tokens, positions past 16
    said = [str(w.message) for w in caught] + [record.getMessage() for record in caplog.records]
    assert any("max_position_embeddings=16" in text for text in said), said


# --------------------------------------------------------------------------- 3. from_pretrained kwargs
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    tiny_model(seed=7).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("field,value", [("chunk_size", 8), ("natsl_layers", [1]), ("num_key_value_heads", 1),
                                         ("num_sink_chunks", 2), ("head_dim", 8)])
@pytest.mark.parametrize("loader", [NatslForCausalLM, AutoModelForCausalLM])
def test_from_pretrained_refuses_changing_a_trained_field(checkpoint, loader, field, value):
    saved = getattr(NatslConfig.from_pretrained(checkpoint), field)
    with pytest.raises(ValueError, match=rf"from_pretrained\(\.\.\., {field}=.*trained with "
                                         rf"\({re.escape(f'{field}={saved!r}')}\).*Drop the argument") as err:
        loader.from_pretrained(checkpoint, **{field: value})
    one_line(err)


def test_from_pretrained_keeps_safe_overrides_and_explicit_configs(checkpoint):
    model = NatslForCausalLM.from_pretrained(checkpoint, chunk_size=4, route_override="linear", softmax_budget=0.5,
                                             use_kernels=False, router_temperature=2.0)
    assert (model.config.chunk_size, model.config.route_override, model.config.softmax_budget) == (4, "linear", 0.5)
    config = NatslConfig.from_pretrained(checkpoint)
    config.chunk_size = 8  # assigned by hand: taken as given
    assert NatslForCausalLM.from_pretrained(checkpoint, config=config).config.chunk_size == 8
    noted = NatslConfig.from_pretrained(checkpoint, chunk_size=8)  # a kwarg: refused when it reaches the weights
    with pytest.raises(ValueError, match="chunk_size=8"):
        NatslForCausalLM.from_pretrained(checkpoint, config=noted)
    assert "natsl_changed" not in noted.to_json_string()
    assert NatslForCausalLM(noted).config.chunk_size == 8  # a fresh model has nothing trained to contradict


def test_from_pretrained_refuses_attention_weights(checkpoint):
    with pytest.raises(ValueError, match="output_attentions=False"):
        NatslForCausalLM.from_pretrained(checkpoint, output_attentions=True)


# --------------------------------------------------------------------------- 4. generate's cache_config, cache configs
def static_cache_of(model, ids, **kwargs):
    out = model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static",
                         return_dict_in_generate=True, **kwargs)
    return getattr(out, CACHE_FIELD)


def test_generate_honours_cache_config(model):
    ids = torch.randint(1, 97, (2, 9))
    assert static_cache_of(model, ids, cache_config={"max_kept_fraction": 0.5}).max_kept_fraction == 0.5
    assert static_cache_of(model, ids, cache_config={"max_kept_fraction": 1.0}).max_kept_fraction == 1.0
    assert static_cache_of(model, ids, cache_config={"max_cache_len": 40}).cache_len == 40
    default = static_cache_of(model, ids)
    assert default.max_kept_fraction == min(1.0, 2 * model.config.softmax_budget)


@pytest.mark.parametrize("kwargs,message", [
    (dict(cache_implementation="static", cache_config={"max_kept_fraction": 1.5}),
     r"max_kept_fraction=1.5 in generate\(cache_config=...\) is invalid: expected a fraction in \[0, 1\]"),
    (dict(cache_implementation="static", cache_config={"max_kept_fraction": "half"}), r"max_kept_fraction='half'"),
    (dict(cache_implementation="static", cache_config={"max_cache_length": 64}),
     r"cache_config key\(s\) 'max_cache_length' are unknown: NatslStaticCache takes max_kept_fraction and max_cache_len"),
    (dict(cache_config={"max_kept_fraction": 0.5}), r"applies only with cache_implementation='static'"),
    (dict(cache_implementation="offloaded"), r"cache_implementation='offloaded' is not supported"),
    (dict(cache_implementation="quantized"), r"cache_implementation='quantized' is not supported"),
])
def test_generate_refuses_bad_cache_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        model.generate(torch.randint(1, 97, (1, 6)), max_new_tokens=2, do_sample=False, **kwargs)
    one_line(err)


def test_static_generate_without_cache_use(model):
    ids = torch.randint(1, 97, (2, 7))
    kwargs = dict(max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(ids, use_cache=False, cache_implementation="static", **kwargs),
                       model.generate(ids, **kwargs))


@pytest.mark.parametrize("other,field", [(dict(num_key_value_heads=1), "num_key_value_heads=1"),
                                         (dict(chunk_size=8), "chunk_size=8"),
                                         (dict(head_dim=8), "head_dim=8"),
                                         (dict(num_hidden_layers=3), "num_hidden_layers=3"),
                                         (dict(natsl_layers=[1]), r"natsl_layers=\(1,\)")])
def test_a_cache_of_another_model_is_refused(model, other, field):
    config = tiny_config(**other)
    for cache, fix in ((NatslStaticCache(config, max_batch_size=1, max_cache_len=16), r"NatslStaticCache\(model.config"),
                       (NatslCache(config), r"NatslCache\(model.config\)")):
        with pytest.raises(ValueError, match=rf"built for another model: .*{field} \(the model has .*{fix}") as err:
            with torch.no_grad():
                model(torch.randint(1, 97, (1, 5)), past_key_values=cache)
        one_line(err)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_batch_size=0, max_cache_len=8), r"max_batch_size=0\) is invalid: expected an integer >= 1"),
    (dict(max_batch_size=True, max_cache_len=8), r"max_batch_size=True\) is invalid"),
    (dict(max_batch_size=1, max_cache_len=8.5), r"max_cache_len=8.5\) is invalid"),
    (dict(max_batch_size=1, max_cache_len=8, max_kept_fraction=-0.1), r"max_kept_fraction=-0.1"),
    (dict(max_batch_size=1, max_cache_len=8, dtype="bfloat16"), r"dtype='bfloat16'\) is invalid: expected a floating torch.dtype"),
    (dict(max_batch_size=1, max_cache_len=8, dtype=torch.long), r"dtype=torch.int64\) is invalid"),
    (dict(max_batch_size=1, max_cache_len=8, device="gpu:0"), r"device='gpu:0'\) is invalid"),
])
def test_static_cache_arguments_are_checked(model, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        NatslStaticCache(model.config, **kwargs)
    one_line(err)


def test_caches_need_the_models_config():
    from transformers import LlamaConfig

    for make in (lambda c: NatslCache(c), lambda c: NatslStaticCache(c, max_batch_size=1, max_cache_len=8)):
        with pytest.raises(ValueError, match=r"needs the NAtS-L model's config, got LlamaConfig"):
            make(LlamaConfig())
    with pytest.raises(ValueError, match=r"NatslCache\(model.config\)"):
        NatslCache()
    with pytest.raises(ValueError, match=r"num_layers=0\) is invalid"):
        NatslCache(num_layers=0)


# --------------------------------------------------------------------------- 5. all-padding rows
def test_all_padding_rows_run(model):
    ids = torch.randint(1, 97, (2, 12))
    for use_cache in (True, False):
        out = logits(model, ids[:1], attention_mask=torch.zeros(1, 12, dtype=torch.long), use_cache=use_cache)
        assert out.shape == (1, 12, 97) and torch.isfinite(out).all()
        out = logits(model, ids, attention_mask=torch.zeros(2, 12, dtype=torch.long), use_cache=use_cache)
        assert out.shape == (2, 12, 97)
    mask = torch.tensor([[0] * 12, [1] * 12])
    assert (logits(model, ids, attention_mask=mask)[1] - logits(model, ids[1:])[0]).abs().max() < 1e-5


@pytest.mark.parametrize("padded_rows", [[0], [0, 1]])
@pytest.mark.parametrize("static", [False, True])
def test_an_all_padding_prompt_then_decoding(model, static, padded_rows):
    """The prompt of row 0 (or of every row) is all padding: decode steps equal them run alone, and a row with a
    prompt equals its prompt + steps alone."""
    ids, steps = torch.randint(1, 97, (2, 9)), torch.randint(1, 97, (2, 6))
    mask = torch.ones_like(ids)
    mask[padded_rows] = 0
    cache = NatslStaticCache(model.config, max_batch_size=2, max_cache_len=15) if static else NatslCache(model.config)
    with torch.no_grad():
        out = [model(ids, attention_mask=mask, past_key_values=cache).logits]
        for t in range(steps.shape[1]):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            out.append(model(steps[:, t:t + 1], attention_mask=mask, past_key_values=cache).logits)
    out = torch.cat(out, 1)
    for b in range(2):
        if b in padded_rows:
            assert (out[b, 9:] - logits(model, steps[b:b + 1])[0]).abs().max() < 1e-5
        else:
            assert (out[b] - logits(model, torch.cat([ids[b], steps[b]])[None])[0]).abs().max() < 1e-5


def test_generate_with_an_all_padding_row(model):
    ids = torch.randint(1, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[0] = 0
    kwargs = dict(max_new_tokens=4, do_sample=False)
    alone = model.generate(ids[1:], **kwargs)[0]
    for extra in ({}, {"cache_implementation": "static"}):
        assert torch.equal(model.generate(ids, attention_mask=mask, **kwargs, **extra)[1], alone)


# --------------------------------------------------------------------------- 6. masks
def test_wrong_mask_shape_names_the_shape_once(model):
    with pytest.raises(ValueError) as err, torch.no_grad():
        model(torch.randint(1, 97, (1, 12)), attention_mask=torch.ones(1, 11))
    assert one_line(err) == "attention_mask has shape (1, 11); expected [1, 12]."
    cache = NatslCache(model.config)
    with torch.no_grad():
        model(torch.randint(1, 97, (1, 5)), past_key_values=cache)
        with pytest.raises(ValueError, match=r"expected \[1, 2\] \(the new tokens\) or \[1, 7\] \(cached \+ new"):
            model(torch.randint(1, 97, (1, 2)), attention_mask=torch.ones(1, 3), past_key_values=cache)


@pytest.mark.parametrize("values,shown", [((1.0, 0.5), "0.5"), ((1, 2), "2"), ((0.0, float("-inf")), "-inf")])
def test_masks_other_than_zero_one_are_refused(model, values, shown):
    mask = torch.tensor([values[0]] * 6 + [values[1]] * 6)[None]
    with pytest.raises(ValueError, match=rf"must hold 1 for tokens and 0 for padding, got {shown}") as err:
        with torch.no_grad():
            model(torch.randint(1, 97, (1, 12)), attention_mask=mask)
    one_line(err)


def test_bool_float_and_int_masks_agree(model):
    ids = torch.randint(1, 97, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    expected = logits(model, ids, attention_mask=mask)
    for dtype in (torch.bool, torch.float32, torch.int32, torch.bfloat16):
        assert torch.equal(logits(model, ids, attention_mask=mask.to(dtype)), expected), dtype


def test_compiled_static_step_with_position_ids_has_no_graph_break():
    """The checks skip the compiled decode step: explicit position_ids and a mask trace into one graph."""
    import torch._dynamo

    model = tiny_model(seed=13)
    ids = torch.randint(1, 97, (2, 9))
    expected = logits(model, ids, use_cache=False)
    torch._dynamo.reset()
    cache = NatslStaticCache(model.config, max_batch_size=2, max_cache_len=9, max_kept_fraction=1.0)
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        out = [model(ids[:, :5], past_key_values=cache, position_ids=torch.arange(5)[None]).logits]
        for t in range(5, 9):
            out.append(compiled(ids[:, t:t + 1], attention_mask=torch.ones(2, 1, dtype=torch.long),
                                position_ids=torch.full((2, 1), t), past_key_values=cache).logits)
    assert (torch.cat(out, 1) - expected).abs().max() <= 1e-4


def test_bad_inputs_name_the_fix(model):
    with pytest.raises(ValueError, match=r"input_ids must be integer token ids \(torch.long\), got dtype torch.float32"):
        model(torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"inputs_embeds has hidden size 8, the model's is 64"):
        model(inputs_embeds=torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor"):
        model(torch.randint(1, 97, (1, 4)), attention_mask=[[1, 1, 1, 1]])


def test_generate_without_cache_from_right_padding(model):
    """transformers' generate without a cache on a right-padded prompt gives the first new token the padding's
    position + 1, which can repeat the last real token's: accepted (its own generation tests do this), as Llama
    does; a position that goes back is still refused."""
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 3:8] = 0  # 3 real tokens, right padding, then a new token at the padding's position + 1
    pos = torch.tensor([list(range(9)), [0, 1, 2, 0, 0, 0, 0, 0, 2]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    assert torch.isfinite(out.logits).all()
    back = pos.clone()
    back[1, 8] = 1
    with pytest.raises(ValueError, match="must not decrease .* got 2 then 1"):
        model(input_ids=ids, attention_mask=mask, position_ids=back, use_cache=False)
