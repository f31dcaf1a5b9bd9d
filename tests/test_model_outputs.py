"""transformers' model-output contract on NAtS-L (issue 17): config defaults for outputs, tuples,
no NaN, attention weights refused, and the inputs the layers cannot take refused up front."""

from __future__ import annotations

import pytest
import torch

from natsl_hf.modeling_natsl import CACHE_FIELD
from natsl_testing import tiny_model

C = 4  # tiny_config's chunk size


def test_config_output_hidden_states_is_the_default():
    model = tiny_model(seed=1)
    ids = torch.randint(1, 97, (2, 9))
    assert model(ids).hidden_states is None
    model.config.output_hidden_states = True
    out = model(ids)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert model(ids, output_hidden_states=False).hidden_states is None


def test_return_dict_false_gives_a_tuple_by_argument_and_by_config():
    model = tiny_model(seed=2)
    ids = torch.randint(1, 97, (1, 9))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        out = model(ids, use_cache=False, return_dict=False)
        assert isinstance(out, tuple) and torch.equal(out[0], expected)
        model.config.return_dict = False
        assert isinstance(model(ids, use_cache=False), tuple)
        assert isinstance(model.model(ids, use_cache=False), tuple)
        assert not isinstance(model(ids, use_cache=False, return_dict=True), tuple)


def _tensors(out):
    for value in out.values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


def test_nothing_routable_gives_no_fraction_and_no_nan():
    model = tiny_model(seed=3)
    short = torch.randint(1, 97, (2, 2 * C - 1))  # sink chunk + an incomplete one: nothing routable
    with torch.no_grad():
        out = model(short)
        assert out.softmax_fraction is None and out.layer_softmax_fraction is None
        step = model(torch.randint(1, 97, (2, 1)), past_key_values=getattr(out, CACHE_FIELD))  # closes no chunk
        for value in (*_tensors(out), *_tensors(step)):
            assert not value.float().isnan().any()
        routed = model(torch.randint(1, 97, (2, 5 * C)))
        assert routed.softmax_fraction is not None and not routed.layer_softmax_fraction.isnan().any()


def test_output_attentions_is_refused_by_argument_and_by_config():
    model = tiny_model(seed=4)
    ids = torch.randint(1, 97, (1, 5))
    with pytest.raises(ValueError, match="output_attentions=False"):
        model(ids, output_attentions=True)
    model.config.output_attentions = True
    with pytest.raises(ValueError, match="output_attentions=False"):
        model(ids)


@pytest.mark.parametrize("ids,mask,match", [
    (torch.randint(1, 97, (7,)), None, r"input_ids\[None\]"),
    (torch.zeros(1, 0, dtype=torch.long), None, "at least one token"),
    (torch.randint(1, 97, (2, 6)), torch.ones(2, 4, dtype=torch.long), r"expected \[2, 6\]"),
    (torch.randint(1, 97, (2, 6)), torch.ones(3, 6, dtype=torch.long), r"expected \[2, 6\]"),
])
def test_inputs_the_layers_cannot_take_are_refused(ids, mask, match):
    model = tiny_model(seed=5)
    with pytest.raises(ValueError, match=match):
        model(ids, attention_mask=mask)


def _counted(routes, which):
    """[B, num_natsl_layers] chunks x KV heads per row, counted from the routes themselves."""
    return torch.stack([(which(r) & r.routable).flatten(1).sum(1) for r in routes], 1)


def test_routing_counts_are_per_row_and_add_up_over_packed_documents():
    model = tiny_model(seed=6)
    first, second = torch.randint(1, 97, (1, 5 * C + 1)), torch.randint(1, 97, (1, 3 * C))
    positions = torch.cat([torch.arange(first.shape[1]), torch.arange(second.shape[1])])[None]
    with torch.no_grad():
        alone = [model(ids, use_cache=False, output_routes=True) for ids in (first, second)]
        packed = model(torch.cat([first, second], 1), position_ids=positions, use_cache=False)
    for out in alone:
        assert out.softmax_chunks.dtype == torch.long and out.softmax_chunks.shape == (1, 2)
        assert torch.equal(out.softmax_chunks, _counted(out.routes, lambda r: r.hard))
        assert torch.equal(out.routable_chunks, _counted(out.routes, lambda r: r.routable))
        assert out.softmax_fraction == out.softmax_chunks.sum() / out.routable_chunks.sum()
    assert int(alone[0].softmax_chunks.sum()) > 0 and int((alone[0].routable_chunks - alone[0].softmax_chunks).sum()) > 0
    for key in ("softmax_chunks", "routable_chunks"):
        assert torch.equal(packed[key], alone[0][key] + alone[1][key]), key
