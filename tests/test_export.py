"""torch.export of NAtS-L models: the forward takes no data-dependent host branch on the paths export traces.

- Without a cache (`use_cache=False`), with no mask, an all-ones mask and left padding: `torch.export.export`
  succeeds, the graph holds no host sync (no `.item()`), and the exported program's logits are the eager
  ones, also for other token ids and (for a padded export) another padding pattern: no value is baked in.
- transformers' own exporter (`DynamoExporter`, what its `test_torch_export` runs) with the default
  `use_cache=True`: the NatslCache the forward returns is exported too, every leaf shaped and valued as eager's;
  and a decode step that takes such a cache.
- The static cache: `decompose_for_generation` (transformers' prefill / decode capture of a `generate` with
  `cache_implementation="static"`) exports both components, also with the decode captured as two steps merged into
  one two-token call (`multi_token_decode`, its dynamic-shape tests' capture), and the one-token decode step exports as
  transformers' ExecuTorch recipe (`TorchExportableModuleWithStaticCache`) does it, the cache's buffers registered
  on a wrapper (strict export), then decodes a left-padded batch token by token as eager does. The recipe's class
  itself cannot take a NAtS-L model: it builds a dense `StaticCache` and rewinds it from `cache_position` at every
  call, which a GDN state cannot do.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from natsl_testing import tiny_model

from natsl_hf import NatslStaticCache
from natsl_hf.modeling_natsl import CACHE_FIELD

ROWS, LENGTH = 2, 11  # chunk_size 4: two complete chunks and an open one; 1 sink, so one routable chunk


def token_ids(seed: int, rows: int = ROWS, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(3, 97, (rows, length), generator=torch.Generator().manual_seed(seed))


def left_padded(pads: list[int], length: int = LENGTH) -> torch.Tensor:
    mask = torch.ones(len(pads), length, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask


MASKS = {
    "no_mask": (None, None),
    "all_ones": (left_padded([0, 0]), left_padded([0, 0])),
    "left_padding": (left_padded([0, 3]), left_padded([5, 1])),  # exported with one pattern, run with another
}


@pytest.mark.parametrize("masks", MASKS.values(), ids=MASKS.keys())
def test_export_without_cache_matches_eager(masks):
    model = tiny_model(seed=1)
    traced_mask, other_mask = masks
    kwargs = lambda mask: {"use_cache": False, **({} if mask is None else {"attention_mask": mask})}  # noqa: E731
    with torch.no_grad():
        program = torch.export.export(model, args=(token_ids(0),), kwargs=kwargs(traced_mask))
    host_reads = (torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default)
    syncs = [node for node in program.graph.nodes if node.op == "call_function" and node.target in host_reads]
    assert not syncs, f"host syncs in the exported graph: {syncs}"
    exported = program.module()
    with torch.no_grad():
        for ids, mask in ((token_ids(0), traced_mask), (token_ids(7), other_mask)):
            eager = model(ids, **kwargs(mask)).logits
            torch.testing.assert_close(exported(ids, **kwargs(mask)).logits, eager, atol=1e-5, rtol=1e-5)


def _leaves(outputs) -> dict[str, torch.Tensor]:
    from transformers.exporters.utils import get_leaf_tensors

    if isinstance(outputs, dict) and all(isinstance(v, torch.Tensor) for v in outputs.values()):
        return outputs
    return get_leaf_tensors(outputs)


def _export_and_compare(model, inputs: dict) -> None:
    """transformers' test_torch_export check: DynamoExporter's program gives every leaf of the eager outputs."""
    pytest.importorskip("transformers.exporters.exporter_dynamo")  # transformers >= 5.2x
    from transformers.exporters.configs import DynamoConfig
    from transformers.exporters.exporter_dynamo import DynamoExporter

    with torch.no_grad():
        eager = _leaves(model(**copy.deepcopy(inputs)))
        exported = DynamoExporter().export(model, copy.deepcopy(inputs), DynamoConfig(dynamic=False))
        if isinstance(exported, torch.export.ExportedProgram):  # transformers 5.17: the program itself, traced
            program = exported.module()  # without the output flags (use_cache, return_dict: bools) it set on the config
            exported = lambda **kw: program(**{k: v for k, v in kw.items() if not isinstance(v, bool)})  # noqa: E731
        got = _leaves(exported(**copy.deepcopy(inputs)))
    assert eager.keys() <= got.keys()
    for name, value in eager.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_transformers_exporter_with_the_default_cache():
    """use_cache=True (the config's default, as transformers' test runs it): the returned NatslCache is exported
    as eager builds it, its kept softmax KV as long as the longest (row, group) keeps (an unbacked size)."""
    model = tiny_model(seed=1)
    _export_and_compare(model, {"input_ids": token_ids(0), "attention_mask": left_padded([0, 3])})
    # then a decode step against that (growing) cache, without a mask: the NatslCache is a graph input
    with torch.no_grad():
        cache = getattr(model(token_ids(0)), CACHE_FIELD)
    _export_and_compare(model, {"input_ids": token_ids(4, length=1), CACHE_FIELD: cache})


@pytest.mark.parametrize("multi_token_decode", [False, True], ids=["one_token_step", "multi_token_decode"])
def test_transformers_generation_components_with_the_static_cache(multi_token_decode):
    """transformers' decomposition of a static-cache generate (its test_torch_export_generate_*_static_cache): the
    prompt (a multi-token call into the NatslStaticCache, whose capacity check becomes a runtime check of the
    program) and a decode step; or, as its dynamic-shape variant captures it, two decode steps merged into one
    two-token call, which keeps the last step's 2D mask: generate's mask is as long as the cache
    (`create_masks_for_generate`), so that mask still covers both tokens."""
    pytest.importorskip("transformers.exporters.exporter_dynamo")
    from transformers import GenerationConfig
    from transformers.exporters.utils import decompose_for_generation

    if multi_token_decode and "multi_token_decode" not in inspect.signature(decompose_for_generation).parameters:
        pytest.skip("this transformers' decompose_for_generation captures one-token decode steps only")
    model = tiny_model(seed=1)
    config = GenerationConfig(do_sample=False, cache_implementation="static", max_cache_len=24)
    inputs = {"input_ids": token_ids(0), "attention_mask": left_padded([0, 3])}
    extra = {"multi_token_decode": True} if multi_token_decode else {}
    components = decompose_for_generation(model, inputs, generation_config=config, **extra)
    assert components.keys() == {"prefill", "decode"}
    module, step = components["decode"]
    assert step["input_ids"].shape[1] == (2 if multi_token_decode else 1)
    assert step["attention_mask"].shape == (ROWS, 24)
    if multi_token_decode:  # the merged call computes the two steps it merges
        with torch.no_grad():
            merged = module(**copy.deepcopy(step)).logits
            one = copy.deepcopy(step)
            steps = [module(**{**one, "input_ids": one["input_ids"][:, t:t + 1],
                               "position_ids": one["position_ids"][:, t:t + 1]}).logits for t in range(2)]
        torch.testing.assert_close(torch.cat(steps, 1), merged, atol=1e-5, rtol=1e-5)
    # the merged decode exported with static shapes (Dim.AUTO adds a minute here and nothing this checks)
    for name, (module, component_inputs) in components.items():
        assert isinstance(component_inputs[CACHE_FIELD], NatslStaticCache)
        if name == "decode" or not multi_token_decode:
            _export_and_compare(module, component_inputs)


class StaticCacheDecoder(torch.nn.Module):
    """transformers' TorchExportableModuleWithStaticCache recipe for a NAtS-L model: the NatslStaticCache's buffers
    are the wrapper's, so the exported one-token step updates them in place; no cache_position (a GDN state
    cannot be rewound: the state is where the sequence is)."""

    def __init__(self, model, cache: NatslStaticCache):
        super().__init__()
        self.model, self.cache = model, cache
        for i, layer in enumerate(cache.layers):
            for j, buffer in enumerate(layer.buffers()):
                self.register_buffer(f"cache_{i}_{j}", buffer, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, cache=self.cache, use_cache=True).logits


def test_static_cache_decode_step_exports_and_decodes_token_by_token():
    model = tiny_model(seed=2)
    ids, mask = token_ids(3, length=15), left_padded([0, 3], length=15)

    def decoder():
        cache = NatslStaticCache(model.config, max_batch_size=ROWS, max_cache_len=16, max_kept_fraction=1.0)
        return StaticCacheDecoder(model, cache).eval()

    with torch.no_grad():
        program = torch.export.export(decoder(), args=(ids[:, :1], mask[:, :1]), strict=True)
        # the step's writes are writes of the module's buffers (what ExecuTorch lowers as mutable state)
        assert len(program.run_decompositions().graph_signature.buffers_to_mutate) > 0
        exported, eager = program.module(), decoder()
        steps = [(exported(ids[:, t:t + 1], mask[:, t:t + 1]), eager(ids[:, t:t + 1], mask[:, t:t + 1]))
                 for t in range(ids.shape[1])]
        full = model(ids, attention_mask=mask, use_cache=False).logits
    got, expected = (torch.cat(side, 1) for side in zip(*steps))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    real = mask.bool()
    torch.testing.assert_close(got[real], full[real], atol=1e-5, rtol=1e-5)  # = the whole prompt at once
