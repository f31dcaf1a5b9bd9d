"""NatslStaticCache: fixed-shape decoding (prefill + steps == one forward), compiled steps, capacity."""

from __future__ import annotations

import pytest
import torch

from natsl_hf import NatslCache, NatslStaticCache
from natsl_hf.cache import static_cache_length
from natsl_hf.modeling_natsl import CACHE_FIELD, DECODE_REGIONS
from natsl_testing import tiny_model

C = 4  # tiny_config's chunk size


def full_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask, use_cache=False).logits


def left_padded(prompts):
    T = max(len(p) for p in prompts)
    ids, mask = torch.zeros(len(prompts), T, dtype=torch.long), torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    return ids, mask


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_prefill_then_steps_equal_each_prompt_alone(kv_heads):
    """Left-padded prompts of different lengths, then decode steps across several chunk boundaries with
    mixed routes per row and per KV group: every row's logits equal the prompt + steps run alone."""
    model = tiny_model(seed=11, num_key_value_heads=kv_heads)
    lens, N = [13, 6, 3], 3 * C + 2
    prompts = [torch.randint(1, 97, (L,)) for L in lens]
    steps = torch.randint(1, 97, (3, N))
    ids, mask = left_padded(prompts)
    T = ids.shape[1]
    cache = NatslStaticCache(model.config, max_batch_size=3, max_cache_len=T + N, max_kept_fraction=1.0)
    with torch.no_grad():
        logits = [model(ids, attention_mask=mask, past_key_values=cache).logits]
        for t in range(N):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
            logits.append(model(steps[:, t : t + 1], attention_mask=mask, past_key_values=cache).logits)
    logits = torch.cat(logits, 1)
    for b, p in enumerate(prompts):
        alone = full_logits(model, torch.cat([p, steps[b]])[None])[0]
        real = torch.cat([torch.arange(T - len(p), T), torch.arange(T, T + N)])
        assert (logits[b, real] - alone).abs().max() <= 1e-4, b
    kept = torch.stack([layer.state.kept_len for layer in cache.layers])  # [layers, B, Hkv]
    assert kept.unique().numel() > 2, "test needs routes that differ across rows and groups"
    assert 0 < cache.realised_fraction() < 1
    assert int(cache.get_seq_length()) == T + N


def test_a_prompt_in_pieces_then_steps():
    """Several multi-token calls against the static cache (each loaded back into its buffers)."""
    model = tiny_model(seed=12)
    ids = torch.randint(1, 97, (2, 23))
    expected = full_logits(model, ids)
    cache = NatslStaticCache(model.config, max_batch_size=2, max_cache_len=23, max_kept_fraction=1.0)
    with torch.no_grad():
        pieces = [model(ids[:, a:b], past_key_values=cache).logits for a, b in ((0, 6), (6, 13))]
        pieces += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(13, 23)]
    assert (torch.cat(pieces, 1) - expected).abs().max() <= 1e-4


def test_greedy_generate_static_equals_dynamic():
    model = tiny_model(seed=8)
    ids, mask = left_padded([torch.randint(1, 97, (L,)) for L in (11, 5, 8)])
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         cache_implementation="static", return_dict_in_generate=True)
    cache = getattr(out, CACHE_FIELD)
    assert isinstance(cache, NatslStaticCache)
    assert torch.equal(out.sequences, dynamic)
    again = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                           cache_implementation="static", return_dict_in_generate=True)
    assert getattr(again, CACHE_FIELD) is not cache  # each call its own cache, as transformers' StaticCache
    assert torch.equal(again.sequences, dynamic)


def test_compiled_decode_step_has_no_graph_break():
    """A decode step, chunk-closing steps included, traces into one graph (fullgraph=True fails on a
    host sync such as .item() or bool(tensor)) and gives the eager logits; later steps reuse it."""
    import torch._dynamo

    model = tiny_model(seed=13)
    ids = torch.randint(1, 97, (2, 15))
    mask = torch.ones(2, 15, dtype=torch.long)
    expected = full_logits(model, ids)
    torch._dynamo.reset()
    cache = NatslStaticCache(model.config, max_batch_size=2, max_cache_len=15, max_kept_fraction=1.0)
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        logits = [model(ids[:, :5], past_key_values=cache).logits]
        for t in range(5, 15):  # closes the chunks ending at 7, 11 and 15
            logits.append(compiled(ids[:, t : t + 1], attention_mask=mask[:, t : t + 1], past_key_values=cache).logits)
    assert (torch.cat(logits, 1) - expected).abs().max() <= 1e-4


@pytest.mark.skipif(not DECODE_REGIONS, reason="torch < 2.13 compiles the decode step's layers inlined")
def test_compiled_decode_step_compiles_the_natsl_layers_as_one_region():
    """The decoder layers' decode step is a compile region (modeling_natsl.decode_step_region): in the compiled step
    every NAtS-L layer calls the same subgraph (compiled once, not once per layer), and the step gives the eager
    logits with a padded row, over chunk closes, without a recompile."""
    import torch._dynamo

    model = tiny_model(seed=5, num_hidden_layers=4, natsl_layers=[0, 2, 3])
    ids = torch.randint(1, 97, (2, 15))
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row
    expected = full_logits(model, ids, mask)
    calls = []

    def backend(gm, example_inputs):
        calls.extend(node.args[0].target for node in gm.graph.nodes if "invoke_subgraph" in str(node.target))
        return gm.forward

    torch._dynamo.reset()
    cache = NatslStaticCache(model.config, max_batch_size=2, max_cache_len=15, max_kept_fraction=1.0)
    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        logits = [model(ids[:, :5], attention_mask=mask[:, :5], past_key_values=cache).logits]
        for t in range(5, 15):
            logits.append(compiled(ids[:, t : t + 1], attention_mask=mask[:, t : t + 1], past_key_values=cache).logits)
    assert len(calls) >= 3 and len(set(calls[:3])) == 1, calls  # the three NAtS-L layers: one subgraph
    real = mask.bool()
    assert (torch.cat(logits, 1) - expected)[real].abs().max() <= 1e-4


def test_full_kept_kv_sends_softmax_chunks_to_gdn_and_counts_them():
    """Documented policy: with no room left (max_kept_fraction=0 keeps only the sink chunk), chunks routed
    softmax are written to the GDN state instead, which is what an all-linear router computes."""
    softmax = tiny_model(seed=14, route_override="softmax")
    linear = tiny_model(seed=14, route_override="linear")
    ids = torch.randint(1, 97, (2, 6 + 3 * C))
    cache = NatslStaticCache(softmax.config, max_batch_size=2, max_cache_len=ids.shape[1], max_kept_fraction=0.0)
    dyn = NatslCache(linear.config)
    with torch.no_grad():
        a = [softmax(ids[:, :6], past_key_values=cache).logits]  # no routable chunk closes in the prompt
        b = [linear(ids[:, :6], past_key_values=dyn).logits]
        for t in range(6, ids.shape[1]):
            a.append(softmax(ids[:, t : t + 1], past_key_values=cache).logits)
            b.append(linear(ids[:, t : t + 1], past_key_values=dyn).logits)
    assert (torch.cat(a, 1) - torch.cat(b, 1)).abs().max() <= 1e-4
    report = cache.overflow_report()
    assert report["total"] == 3 * 2 * 2 * 2  # 3 chunks x 2 rows x 2 KV groups x 2 layers
    assert all(int(layer.state.kept_len.max()) <= layer.state.capacity for layer in cache.layers)
    assert cache.realised_fraction() == 0.0


def test_generate_warns_when_the_kept_kv_ran_out(caplog):
    import logging

    model = tiny_model(seed=14, route_override="softmax")
    ids = torch.randint(1, 97, (1, 6))
    cache = NatslStaticCache(model.config, max_batch_size=1, max_cache_len=6 + 3 * C, max_kept_fraction=0.0)
    with caplog.at_level(logging.WARNING):
        model.generate(ids, past_key_values=cache, max_new_tokens=3 * C, do_sample=False)
    assert cache.overflow_report()["total"] > 0
    assert any("max_kept_fraction" in r.getMessage() for r in caplog.records)


def test_default_capacity_keeps_short_generations_exact():
    """With the default fraction a short cache has room for 8 routable chunks: decoding an all-softmax
    router stays exact (the same logits as without a cache)."""
    model = tiny_model(seed=14, route_override="softmax")
    ids = torch.randint(1, 97, (2, 13))
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    full = model.generate(ids, use_cache=False, **kwargs)
    assert max((a - b).abs().max() for a, b in zip(static.scores, full.scores)) <= 1e-4
    assert getattr(static, CACHE_FIELD).overflow_report()["total"] == 0


def test_a_prompt_beyond_the_capacity_names_the_setting():
    model = tiny_model(seed=15, route_override="softmax")
    cache = NatslStaticCache(model.config, max_batch_size=1, max_cache_len=64, max_kept_fraction=0.1)
    with pytest.raises(ValueError, match="max_kept_fraction"), torch.no_grad():
        model(torch.randint(1, 97, (1, 40)), past_key_values=cache)


def test_size_and_batch_are_checked():
    model = tiny_model(seed=16)
    cache = NatslStaticCache(model.config, max_batch_size=2, max_cache_len=8)
    with torch.no_grad():
        with pytest.raises(ValueError, match="max_batch_size"):
            model(torch.randint(1, 97, (3, 4)), past_key_values=cache)
        model(torch.randint(1, 97, (2, 8)), past_key_values=cache)
        with pytest.raises(ValueError, match="max_cache_len"):
            model(torch.randint(1, 97, (2, 1)), past_key_values=cache)
    with pytest.raises(ValueError, match="max_kept_fraction"):
        NatslStaticCache(model.config, max_batch_size=1, max_cache_len=8, max_kept_fraction=1.5)


def test_an_empty_cache_moves_to_the_models_dtype_and_device_and_a_used_one_refuses():
    model = tiny_model(seed=18)
    cache = NatslStaticCache(model.config, max_batch_size=1, max_cache_len=12, dtype=torch.float16)
    ids = torch.randint(1, 97, (1, 9))
    with torch.no_grad():
        model(ids, past_key_values=cache)
        assert cache.layers[0].state.kept_k.dtype == torch.float32
        with pytest.raises(ValueError, match="create the cache with device= and dtype="):
            model.half()(ids[:, :1], past_key_values=cache)


def test_memory_follows_what_is_kept():
    """NAtS-L layers allocate sinks + max_kept_fraction of the chunks, full-softmax layers the whole context."""
    model = tiny_model(seed=17, natsl_layers=[1], softmax_budget=0.125)  # default fraction: 2 x budget
    cache = NatslStaticCache(model.config, max_batch_size=1, max_cache_len=40 * C)
    full, natsl = (layer.state.capacity for layer in cache.layers)
    assert full == 40 * C and natsl == (1 + 10) * C  # 1 sink + ceil(0.25 x 39) chunks


def test_each_static_generate_builds_its_own_cache_and_the_model_keeps_none():
    """generate(cache_implementation="static") builds a NatslStaticCache for the call, sized to it (rows x beams;
    prompt + max_new_tokens - 1, rounded up by `static_cache_length`: 11 + 9 - 1 = 19 -> 20), as transformers
    builds a new StaticCache per call; the model holds no reference to it afterwards (bounded memory across calls:
    a kept cache held the last call's buffers), and its tokens are a dynamic-cache generate's."""
    import gc
    import weakref

    model = tiny_model(seed=3).eval()
    ids = torch.randint(3, 97, (1, 11), generator=torch.Generator().manual_seed(2))
    kwargs = dict(do_sample=False, cache_implementation="static", return_dict_in_generate=True)
    for new, cache_len in ((9, 20), (5, 16), (12, 24)):  # 19 -> 20, 15 -> 16, 22 -> 24
        out = model.generate(ids, max_new_tokens=new, **kwargs)
        cache = getattr(out, CACHE_FIELD)
        assert isinstance(cache, NatslStaticCache) and cache.cache_len == cache_len
        assert torch.equal(out.sequences, model.generate(ids, max_new_tokens=new, do_sample=False))
        ref = weakref.ref(cache)
        del out, cache
        gc.collect()
        assert ref() is None, "the model (or generate) still holds the call's NatslStaticCache"


def test_static_cache_length_rounds_up_to_four_steps_per_doubling():
    rounded = {n: static_cache_length(n, limit=4096) for n in (1, 8, 9, 17, 20, 21, 1024, 1025, 4000, 5000)}
    assert rounded == {1: 1, 8: 8, 9: 10, 17: 20, 20: 20, 21: 24, 1024: 1024, 1025: 1280, 4000: 4096, 5000: 5000}
    assert all(n <= static_cache_length(n, 4096) <= 1.25 * n for n in range(1, 9000))


def test_a_static_generate_that_raises_keeps_no_cache(monkeypatch):
    """A generate() that fails midway (an out-of-memory error of a server, here a stopping criterion that raises)
    leaves no reference to its NatslStaticCache on the model either."""
    import gc
    import weakref

    from transformers import StoppingCriteria, StoppingCriteriaList

    class Boom(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            raise RuntimeError("boom")

    made = []
    init = NatslStaticCache.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(NatslStaticCache, "__init__", tracked)
    model = tiny_model(seed=3).eval()
    ids = torch.randint(3, 97, (1, 11), generator=torch.Generator().manual_seed(2))
    with pytest.raises(RuntimeError, match="boom") as failure:
        model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static",
                       stopping_criteria=StoppingCriteriaList([Boom()]))
    del failure  # its traceback's frames hold generate()'s locals
    gc.collect()
    assert len(made) == 1 and made[0]() is None, "the model still holds the failed call's NatslStaticCache"


def test_generation_config_max_cache_len_sizes_the_static_cache_for_later_calls():
    """transformers 5.2x sizes its static cache by generation_config.max_cache_len when that is larger than the call
    (the worst case across calls, `_prepare_cache_for_generation`), so that every call up to it decodes with caches of
    one size. The NatslStaticCache generate() builds follows it: as a generate() argument and from
    model.generation_config; past the ceiling, a cache sized to the call, rounded."""
    model = tiny_model(seed=3).eval()
    short, longer = (torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 13))
    out = model.generate(short, max_new_tokens=3, do_sample=False, cache_implementation="static", max_cache_len=40,
                         return_dict_in_generate=True)
    assert getattr(out, CACHE_FIELD).cache_len == 40  # not the call's 5 + 3 - 1 (generate caches all but the last token)
    model.generation_config.cache_implementation, model.generation_config.max_cache_len = "static", 40
    out = model.generate(longer, max_new_tokens=28, do_sample=False, return_dict_in_generate=True)  # 13 + 28 - 1 = 40
    assert getattr(out, CACHE_FIELD).cache_len == 40
    assert torch.equal(out.sequences, model.generate(longer, max_new_tokens=28, do_sample=False,
                                                     cache_implementation="dynamic"))
    out = model.generate(longer, max_new_tokens=30, do_sample=False, return_dict_in_generate=True)  # 42 > 40
    assert getattr(out, CACHE_FIELD).cache_len == 48


@pytest.mark.parametrize("first_call", [dict(max_new_tokens=2, max_cache_len=12 + 9 - 1), dict(max_new_tokens=11)],
                         ids=["sized_by_max_cache_len", "sized_by_the_call_rounded_up"])
def test_compiled_generate_does_not_recompile_for_a_longer_call_up_to_the_cache_length_or_a_shorter_one(first_call):
    """transformers' test_static_cache_no_recompile_with_smaller_length, on the CPU: generate() compiles its decode
    step (CompileConfig._compile_all_devices: on any device, as that test forces it); later calls must run that
    compiled step without a recompile (torch._dynamo's error_on_recompile; what recompiled was the size of
    `layers[0].state.kept_k`, the kept KV, whose capacity grows with the cache length). The first call's cache is 20
    long: by max_cache_len (transformers 5.2x's worst case across calls), or by its own 7 + 11 - 1 = 17 tokens rounded
    up (`static_cache_length`). A longer second call up to 20 and then a shorter one (each with its own cache, as
    transformers builds a StaticCache per call) run the same compiled step; each gives the dynamic cache's tokens.
    The "eager" backend: the guards are dynamo's whatever compiles the graph, and it compiles in seconds."""
    import torch._dynamo
    from transformers import CompileConfig

    model = tiny_model(seed=3).eval()
    compile_config = CompileConfig(backend="eager")
    compile_config._compile_all_devices = True
    kwargs = dict(do_sample=False, cache_implementation="static", compile_config=compile_config)
    short, longer = (torch.randint(3, 97, (2, n), generator=torch.Generator().manual_seed(n)) for n in (7, 12))
    torch.compiler.reset()
    out = model.generate(short, **first_call, **kwargs, return_dict_in_generate=True)
    assert hasattr(model, "_compiled_call"), "generate() did not compile the decode step"
    assert getattr(out, CACHE_FIELD).cache_len == 20
    for ids, new in ((longer, 9), (short, 2)):  # 12 + 9 - 1 = 20; then 7 + 2 - 1 = 8
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = model.generate(ids, max_new_tokens=new, **kwargs)
        assert torch.equal(out, model.generate(ids, max_new_tokens=new, do_sample=False))


def test_compiled_generate_compiles_once_for_every_cache_length():
    """Compile once (issue 24): the compiled decode step of a first generate() serves calls whose NatslStaticCache is
    sized differently (24, 32, 48 after 20: other steps of `static_cache_length`) without a recompile. The sizes that
    follow the cache's length, the kept slots (`kept_k` / `kept_v` dim 2) and generate's padded mask (dim 1), are
    dynamic from the first compile on, and nothing in the step compares them with the cache's length as a Python int
    (before: a recompile on `layers[0].state.kept_k` size 24 vs 28, then a second, dynamic graph). Each call gives
    the dynamic cache's tokens."""
    import torch._dynamo
    from transformers import CompileConfig

    model = tiny_model(seed=3).eval()
    compile_config = CompileConfig(backend="eager")
    compile_config._compile_all_devices = True
    kwargs = dict(do_sample=False, cache_implementation="static", compile_config=compile_config)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(7))
    torch.compiler.reset()
    out = model.generate(ids, max_new_tokens=11, **kwargs, return_dict_in_generate=True)
    assert getattr(out, CACHE_FIELD).cache_len == 20 and hasattr(model, "_compiled_call")
    for new, cache_len in ((16, 24), (26, 32), (36, 48)):
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = model.generate(ids, max_new_tokens=new, **kwargs, return_dict_in_generate=True)
        assert getattr(out, CACHE_FIELD).cache_len == cache_len
        assert torch.equal(out.sequences, model.generate(ids, max_new_tokens=new, do_sample=False))


def test_the_config_of_a_saved_model_sizes_a_cache_in_the_models_dtype(tmp_path):
    """save_pretrained writes config.dtype as its name ("float32"): a cache built from that config still takes it."""
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path)
    assert isinstance(model.config.dtype, str)
    cache = NatslStaticCache(model.config, max_batch_size=1, max_cache_len=8)
    assert cache.layers[0].state.kept_k.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_caches_hold_the_same_state_after_every_call(dtype):
    """One layout and one set of transitions: a left-padded prompt in two pieces, then decode steps across chunk
    boundaries with mixed routes, into a NatslCache (grown) and a NatslStaticCache (preallocated) give the same logits
    (the same greedy tokens) and, after every call, the same state: kept KV (its valid part), open chunk, GDN state and
    run, decay, conv window, router sum, counters. In fp32 and in a bf16 model (noise: the kept KV's lengths differ)."""
    model = tiny_model(seed=21).to(dtype)
    ids, mask = left_padded([torch.randint(1, 97, (L,)) for L in (14, 9, 4)])
    steps = torch.randint(1, 97, (3, 3 * C + 1))
    T, N = ids.shape[1], steps.shape[1]
    dynamic = NatslCache(model.config)
    static = NatslStaticCache(model.config, max_batch_size=3, max_cache_len=T + N, max_kept_fraction=1.0, dtype=dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)

    def same_state():
        for a, b in zip(dynamic.layers, static.layers):
            a, b = a.state, b.state
            assert torch.equal(a.kept_len, b.kept_len) and torch.equal(a.seen, b.seen)
            for name in ("kept_k", "kept_v"):  # the kept part (the two buffers' lengths differ)
                L = int(a.kept_len.max())
                torch.testing.assert_close((getattr(a, name) * a.kept_valid[..., None])[:, :, :L],
                                           (getattr(b, name) * b.kept_valid[..., None])[:, :, :L], **tol)
            for name, t in a.tensors().items():
                if name not in ("kept_k", "kept_v"):
                    assert t.dtype == getattr(b, name).dtype, name
                    torch.testing.assert_close(t, getattr(b, name), **tol, msg=name)

    with torch.no_grad():
        calls = [(ids[:, :7], mask[:, :7]), (ids[:, 7:], mask)]
        calls += [(steps[:, t : t + 1], torch.cat([mask, torch.ones(3, t + 1, dtype=torch.long)], 1)) for t in range(N)]
        for x, m in calls:
            a = model(x, attention_mask=m, past_key_values=dynamic).logits
            b = model(x, attention_mask=m, past_key_values=static).logits
            torch.testing.assert_close(a, b, **tol)
            assert torch.equal(a[:, -1].argmax(-1), b[:, -1].argmax(-1))
            same_state()
    assert int(dynamic.layers[1].state.kept_len.max()) > C, "test needs kept chunks past the sink"
    assert dynamic.realised_fraction() == static.realised_fraction() and 0 < static.realised_fraction() < 1


def test_open_chunk_written_in_chunk_form_equals_its_token_writes():
    """gdn_run after a multi-token call (`gdn_chunk_write`, one chunk in chunk form) is what a decode step's C token
    writes give (`gdn_token_write`), empty slots (beta = g = 0) included."""
    from natsl_hf.modeling import reference

    g = torch.Generator().manual_seed(0)
    state = torch.randn(2, 3, 8, 8, generator=g)
    k = torch.nn.functional.normalize(torch.randn(2, C, 3, 8, generator=g), dim=-1)
    v, gate, beta = torch.randn(2, C, 3, 8, generator=g), -torch.rand(2, C, 3, generator=g), torch.rand(2, C, 3, generator=g)
    gate[1, -1], beta[1, -1] = 0, 0  # row 1: the last slot empty
    tokens = state
    for s in range(C):
        tokens = reference.gdn_token_write(tokens, k[:, s], v[:, s], beta[:, s], gate[:, s])
    torch.testing.assert_close(reference.gdn_chunk_write(state, k, v, gate, beta), tokens, atol=1e-5, rtol=1e-5)


def test_a_compiled_decode_step_serves_static_caches_of_every_length():
    """The compile once of issue 24 at the model's boundary, whatever generate() of this transformers passes: one
    decode step (one token, generate's padded [B, cache_len] mask, a NatslStaticCache) compiled for a cache of 20
    tokens serves caches of 24, 32 and 48 without a recompile. What recompiled under transformers 5.17 was a traced
    read of `NatslStaticCache.cache_len` (a Python int: a guard on its value) in the mask handling; each step's
    logits are the eager step's."""
    import torch._dynamo

    model = tiny_model(seed=3).eval()
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(9))
    step = torch.compile(model.forward, backend="eager")
    torch.compiler.reset()

    def run(cache_len, forward):
        cache = NatslStaticCache(model.config, max_batch_size=2, max_cache_len=cache_len)
        mask = model.create_masks_for_generate(model.config, None, torch.ones(2, 9, dtype=torch.long), cache=cache,
                                               past_key_values=cache)
        with torch.no_grad():
            model(ids[:, :8], attention_mask=mask, **{CACHE_FIELD: cache})  # the prefill, eager
            return forward(ids[:, 8:], attention_mask=mask, **{CACHE_FIELD: cache}).logits

    run(20, step)
    for cache_len in (24, 32, 48):
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = run(cache_len, step)
        torch.testing.assert_close(compiled, run(cache_len, model.forward))


def _storages(tensors) -> list[int]:
    return [t.untyped_storage().data_ptr() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_takes_each_layers_state_as_its_packed_buffers(dtype):
    """A static cache layer's step passes the column count, the kept KV and the state's flat buffers (the int64
    counters, the open chunk in the model's dtype, the fp32 GDN fields: apart in an fp32 model too, so that a kernel
    writing both never takes aliasing arguments), never the fields' views; every other field is a contiguous view of
    one of those buffers. A full-softmax layer has no GDN fields and no GDN buffer."""
    model = tiny_model(seed=3, num_hidden_layers=2, natsl_layers=[1])
    cache = NatslStaticCache(model.config, max_batch_size=2, max_cache_len=16, dtype=dtype)
    full, natsl = cache.layers
    assert len(full.step_tensors()) == 5 and full.state.buffer("gdn") is None  # columns, kept_k, kept_v, 2 buffers
    assert len(natsl.step_tensors()) == 6  # ... and the GDN buffer
    assert natsl.state.layout.buffer_names == ("counters", "open", "gdn")
    assert natsl.state.layout.dtypes == (torch.long, dtype, torch.float32)
    for layer in cache.layers:
        tensors = layer.step_tensors()
        assert all(t._base is None for t in tensors) and len(set(_storages(tensors))) == len(tensors)
        packed = _storages(layer.state.packed)
        for name, t in layer.state.tensors().items():
            if name not in ("kept_k", "kept_v"):
                assert t.untyped_storage().data_ptr() in packed and t.is_contiguous(), name
    assert full.state.gdn_state is None and full.state.conv_state is None and full.state.router_sum is None
    assert natsl.state.gdn_run.dtype == torch.float32
    assert natsl.state.conv_state.dtype == natsl.state.open_k.dtype == dtype
    for layer, attention in zip(cache.layers, (block.self_attn for block in model.model.layers)):
        assert layer.state.layout == attention.state_layout(2, dtype)  # what the decode step views the buffers by


def test_a_compiled_decode_step_lifts_each_state_buffer_once():
    """The compiled step's inputs hold each layer's state as its buffers: every packed buffer is one graph input, no
    field's view is an input of its own (dynamo lifts every tensor it reaches)."""
    import torch._dynamo

    model = tiny_model(seed=8, num_hidden_layers=2, natsl_layers=[1])
    ids = torch.randint(1, 97, (2, 7))
    inputs = []

    def backend(gm, example_inputs):
        inputs.extend(t for t in example_inputs if isinstance(t, torch.Tensor))
        return gm.forward

    torch._dynamo.reset()
    cache = NatslStaticCache(model.config, max_batch_size=2, max_cache_len=8)
    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=False)
    with torch.no_grad():
        model(ids[:, :6], past_key_values=cache)
        compiled(ids[:, 6:], past_key_values=cache)
    lifted = _storages(inputs)
    for layer in cache.layers:
        state = layer.state
        assert all(lifted.count(p) == 1 for p in _storages(layer.step_tensors()))
        views = [t for name, t in state.tensors().items() if name not in ("kept_k", "kept_v")]
        assert not any(t.data_ptr() == i.data_ptr() and t.shape == i.shape for t in views for i in inputs)


def test_writes_through_a_static_layers_fields_land_in_its_buffers_and_a_reorder_keeps_them():
    """The fields alias the packed buffers: an in-place write through one is in the buffer (read back by the layout,
    as a compiled step views it), and a beam reorder (`reorder_cache`) moves the rows inside the same buffers."""
    model = tiny_model(seed=9, num_hidden_layers=2, natsl_layers=[1])
    cache = NatslStaticCache(model.config, max_batch_size=2, max_cache_len=16)
    with torch.no_grad():
        model(torch.randint(1, 97, (2, 6)), past_key_values=cache)
    layer = cache.layers[1]
    state, buffers = layer.state, list(layer.state.packed)
    state.kept_chunks[1].add_(5)
    state.gdn_run[0].fill_(7.0)
    assert torch.equal(state.layout.view(state.packed, "kept_chunks")[1], torch.full((2,), 5))
    assert bool((state.layout.view(state.packed, "gdn_run")[0] == 7.0).all())
    before = {name: t.clone() for name, t in state.tensors().items()}
    cache.reorder_cache(torch.tensor([1, 0]))
    assert all(a is b for a, b in zip(layer.state.packed, buffers))
    for name, t in layer.state.tensors().items():
        assert torch.equal(t, before[name].flip(0)), name
    assert torch.equal(layer.state.kept_chunks[0], torch.full((2,), 5))
