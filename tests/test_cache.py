"""NatslCache: prefill + decode == one full forward; generate(); memory accounting."""

from __future__ import annotations

import copy
import unittest.mock

import pytest
import torch

from natsl_hf import NatslCache
from natsl_hf.modeling_natsl import CACHE_FIELD
from natsl_testing import tiny_model

C = 4  # tiny_config's chunk size


def full_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask, use_cache=False).logits


@pytest.mark.parametrize("P", [C - 1, C, 2 * C + 3, 3 * C])  # P < C, P = C, P = kC + r, P = kC
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_prefill_then_decode_equals_full_forward(P, kv_heads):
    model = tiny_model(seed=P, num_key_value_heads=kv_heads)
    ids = torch.randint(1, 97, (3, P + 2 * C + 1))  # decode crosses several chunk boundaries
    expected = full_logits(model, ids)
    with torch.no_grad():
        routes = model(ids, use_cache=False, output_routes=True).routes
        hard = torch.stack([r.hard[:, 1:-1] for r in routes])  # routable chunks of both layers
        assert hard.any() and not hard.all(), "test needs mixed routes"
        assert not all(torch.equal(hard[:, 0], hard[:, b]) for b in range(1, 3)), "routes should differ across rows"
        cache = NatslCache(model.config)
        out = model(ids[:, :P], past_key_values=cache, use_cache=True)
        logits = [out.logits]
        for t in range(P, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    assert getattr(out, CACHE_FIELD) is cache and cache.get_seq_length() == ids.shape[1]
    assert (torch.cat(logits, 1) - expected).abs().max() <= 1e-4


def test_prefill_in_several_pieces():
    model = tiny_model(seed=3)
    ids = torch.randint(1, 97, (2, 29))
    expected = full_logits(model, ids)
    cache = NatslCache(model.config)
    pieces, start = [], 0
    with torch.no_grad():
        for end in (6, 7, 15, 22, 29):  # pieces that start and end mid-chunk and on boundaries
            pieces.append(model(ids[:, start:end], past_key_values=cache).logits)
            start = end
    assert (torch.cat(pieces, 1) - expected).abs().max() <= 1e-4


def test_left_padding_equals_each_prompt_alone():
    model = tiny_model(seed=5)
    lens = [22, 13, 6]
    T = max(lens)
    ids = torch.randint(1, 97, (3, T))
    padded = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for b, L in enumerate(lens):
        padded[b, T - L :], mask[b, T - L :] = ids[b, :L], 1
    batch = full_logits(model, padded, mask)
    for b, L in enumerate(lens):
        alone = full_logits(model, ids[b : b + 1, :L])
        assert (batch[b, T - L :] - alone[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_padded_prefill_then_decode_equals_each_prompt_alone(side):
    """Padding anywhere in the prefill (left, right, or around the prompt), then decode steps that
    cross chunk boundaries: every row's logits equal the prompt run alone through the cache. The
    short conv and its state must see only real tokens (right padding once leaked into the state)."""
    model = tiny_model(seed=6)
    lens, T, N = [23, 14, 2], 26, 2 * C + 1
    starts = {"left": [T - L for L in lens], "right": [0] * 3, "both": [(T - L) // 2 for L in lens]}[side]
    prompts = [torch.randint(1, 97, (L,)) for L in lens]
    steps = torch.randint(1, 97, (3, N))
    ids, mask = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long)
    for b, (p, s) in enumerate(zip(prompts, starts)):
        ids[b, s : s + len(p)], mask[b, s : s + len(p)] = p, 1
    with torch.no_grad():
        cache = NatslCache(model.config)
        batch = [model(ids, attention_mask=mask, past_key_values=cache).logits]
        for t in range(N):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
            batch.append(model(steps[:, t : t + 1], attention_mask=mask, past_key_values=cache).logits)
        batch = torch.cat(batch, 1)
        for b, (p, s) in enumerate(zip(prompts, starts)):
            alone = full_logits(model, torch.cat([p, steps[b]])[None])[0]
            real = torch.cat([torch.arange(s, s + len(p)), torch.arange(T, T + N)])
            assert (batch[b, real] - alone).abs().max() <= 1e-4, b


def test_greedy_generate_matches_stepwise_argmax():
    model = tiny_model(seed=7)
    ids = torch.randint(1, 97, (2, 7))
    generated = model.generate(ids, max_new_tokens=14, do_sample=False)  # crosses 3+ chunk boundaries
    seq = ids
    for _ in range(14):
        nxt = full_logits(model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(generated, seq)


def test_batched_generate_with_left_padding_equals_alone():
    model = tiny_model(seed=8)
    prompts = [torch.randint(1, 97, (L,)) for L in (11, 5, 8)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :], mask[b, T - len(p) :] = p, 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=10, do_sample=False)
        assert torch.equal(batch[b, T:], alone[0, len(p):])


def test_sampling_and_beam_search_run_and_crop_refuses():
    model = tiny_model(seed=9)
    ids = torch.randint(1, 97, (2, 6))
    torch.manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=9, do_sample=True, top_k=10)
    assert sampled.shape == (2, 15)
    # beam search reorders the cache rows (reorder_cache) every step: with the cache it must pick the
    # same beams as without one (every step a full forward over the beams' sequences)
    beams = model.generate(ids, max_new_tokens=9, num_beams=3, do_sample=False)
    assert beams.shape == (2, 15)
    assert torch.equal(beams, model.generate(ids, max_new_tokens=9, num_beams=3, do_sample=False, use_cache=False))
    cache = NatslCache(model.config)
    model(ids, past_key_values=cache)
    with pytest.raises(NotImplementedError, match="rolled back"):
        cache.crop(2)


def test_batch_ops_keep_each_rows_state():
    """batch_repeat_interleave, reorder_cache and batch_select_indices after a prefill (kept KV grown differently per
    row), then decode steps across a chunk boundary: the same logits as a prefill of the rows so arranged."""
    model = tiny_model(seed=4)
    ids = torch.randint(1, 97, (2, 10))
    steps = torch.randint(1, 97, (2, 2 * C))
    with torch.no_grad():
        cache = NatslCache(model.config)
        model(ids, past_key_values=cache)
        cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
        cache.reorder_cache(torch.tensor([2, 0, 3, 1]))  # rows 1, 0, 1, 0
        cache.batch_select_indices(torch.tensor([0, 1]))  # rows 1, 0
        ref = NatslCache(model.config)
        model(ids[[1, 0]], past_key_values=ref)
        for t in range(steps.shape[1]):
            a = model(steps[:, t : t + 1], past_key_values=cache).logits
            b = model(steps[:, t : t + 1], past_key_values=ref).logits
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert cache.realised_fraction() == ref.realised_fraction() and cache.overflow_report()["total"] == 0


def test_memory_report_kept_kv_within_budget():
    model = tiny_model(seed=11)
    B, T = 2, 42
    ids = torch.randint(1, 97, (B, T))
    cache = NatslCache(model.config)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
    report = cache.memory_report()
    cfg = model.config
    token_bytes = 2 * cfg.head_dim * 4 * cfg.num_key_value_heads  # k + v in fp32, all KV groups
    routable_tokens = (T // C - cfg.num_sink_chunks) * C
    always_kept = cfg.num_sink_chunks * C + T % C  # sink chunk + the open chunk
    for layer in report["layers"]:
        frac = out.layer_softmax_fraction[layer["layer"]].item()
        assert 0 < frac < 1
        assert layer["full_kv_bytes"] == B * T * token_bytes
        assert layer["kv_bytes"] == pytest.approx(B * token_bytes * (always_kept + frac * routable_tokens))
        # allocation: kept KV grown to ROOM_CHUNKS chunks past the longest (row, group), plus C scratch slots; the
        # open chunk a C-slot buffer
        state = cache.layer_state(layer["layer"])
        longest, room = int(state.kept_len.max()), cache.layers[layer["layer"]].ROOM_CHUNKS * C
        assert state.capacity == longest + room
        assert layer["kv_allocated_bytes"] == B * token_bytes * (longest + room + 2 * C)
        assert layer["kv_allocated_bytes"] >= layer["kv_bytes"]
    # whole cache: kept KV <= (realised fraction + the sink and open chunks) of a full cache
    fraction = out.softmax_fraction.item()
    assert report["kv_fraction"] <= fraction + (always_kept / T) + 1e-9
    assert report["kv_fraction"] < 1 and report["state_bytes"] > 0


def test_generate_on_converted_checkpoint(tmp_path):
    """A converted Llama checkpoint, reloaded from disk, generates with NatslCache: at init (every
    chunk softmax) exactly the source's greedy tokens, with left padding; with mixed routes the
    batched generation still equals each prompt alone."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from natsl_hf.conversion import convert_checkpoint

    torch.manual_seed(0)
    src = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                       bos_token_id=None, eos_token_id=None)).eval()
    src.save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "natsl", chunk_size=4, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "natsl").eval()
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    cache = NatslCache(model.config)
    ours = model.generate(ids, **{CACHE_FIELD: cache}, **kwargs)
    assert torch.equal(ours, src.generate(ids, **kwargs))
    assert cache.memory_report()["kv_fraction"] == 1.0  # all softmax at init: nothing dropped yet

    from natsl_testing import mix_routes

    mix_routes(model, seed=2)
    batch = model.generate(ids, **kwargs)
    alone = model.generate(ids[1:, 3:], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(batch[1, 9:], alone[0, 6:])


def test_every_single_token_step_takes_the_decode_path(monkeypatch):
    """Every one-token step against a NatslCache is `_decode`, the static cache's step, the steps that close a chunk
    included (checked against the full forward above; here we make sure it ran), and the kept KV grows to what the
    rows keep: room for one chunk past the longest (row, group) at least, ROOM_CHUNKS at most, the kept lengths read
    from the device once in (ROOM_CHUNKS - 1) x C steps (the prefill leaves that room: no read in the 10 steps)."""
    from natsl_hf.modeling.layer import NatslAttention

    calls = {"decode": 0}
    original = NatslAttention._decode

    def counted(self, *args, **kwargs):
        calls["decode"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NatslAttention, "_decode", counted)
    model = tiny_model(seed=12)
    ids = torch.randint(1, 97, (2, 15))
    expected = full_logits(model, ids)
    cache = NatslCache(model.config)
    with torch.no_grad():
        logits = [model(ids[:, :5], past_key_values=cache).logits]
        logits += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(5, 15)]
    assert calls["decode"] == 10 * 2  # 10 decode steps x 2 layers; positions 7 and 11 close a chunk
    assert (torch.cat(logits, 1) - expected).abs().max() <= 1e-4
    for layer in cache.layers:
        longest = int(layer.state.kept_len.max())
        assert longest + C <= layer.state.capacity <= longest + layer.ROOM_CHUNKS * C
        assert layer.steps_with_room == (layer.ROOM_CHUNKS - 1) * C - 10


def test_cache_argument_under_either_name():
    """transformers 5.24 renamed `past_key_values` to `cache` (generate passes `cache=` there): the model
    takes either name, returns the cache in this transformers' output field, and refuses both at once."""
    model = tiny_model(seed=3)
    ids = torch.randint(1, 97, (2, 11))
    with torch.no_grad():
        new, old = NatslCache(model.config), NatslCache(model.config)
        a = model(ids[:, :7], cache=new, use_cache=True)
        b = model(ids[:, :7], past_key_values=old, use_cache=True)
        assert getattr(a, CACHE_FIELD) is new and getattr(b, CACHE_FIELD) is old
        a = model(ids[:, 7:], cache=new).logits
        b = model(ids[:, 7:], past_key_values=old).logits
        assert torch.equal(a, b) and new.get_seq_length() == 11
        with pytest.raises(ValueError, match="once"):
            model(ids, cache=NatslCache(model.config), past_key_values=NatslCache(model.config))


def test_a_natsl_cache_decode_step_reads_no_value_on_the_host():
    """generate()'s decode step against a NatslCache passes a mask and position ids: the model checks neither on the
    host (a one-token step has no dense path to choose and cannot restart a document), so the step runs without a
    host sync (its kept KV has room: `reserve_chunk`), and with its mask of ones as it does without one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
             torch.ops.aten.nonzero.default)

    class NoValueRead(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func not in reads, f"host read: {func}"
            return func(*args, **(kwargs or {}))

    model = tiny_model(seed=4)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        cache = getattr(model(ids, attention_mask=mask[:, :9]), CACHE_FIELD)
        bare = copy.deepcopy(cache)
        position = cache.layer_state(0).seen[:, None].clone()
        with NoValueRead(), unittest.mock.patch.object(torch.Tensor, "tolist", side_effect=AssertionError("tolist")):
            step = model(ids[:, :1], attention_mask=mask, position_ids=position, cache=cache).logits
        torch.testing.assert_close(step, model(ids[:, :1], cache=bare).logits, rtol=0, atol=0)


def test_state_fields_are_views_of_its_buffers_and_map_repacks_them():
    """A NatslCache layer's fields (all but the kept KV) are views of its packed buffers: a write through one is in
    the buffer; `map` (batch ops, device moves) gives a state of new buffers, its fields the rows asked for, whose
    writes leave the old state as it was."""
    model = tiny_model(seed=4)
    cache = NatslCache(model.config)
    with torch.no_grad():
        model(torch.randint(1, 97, (3, 2 * C + 1)), past_key_values=cache)
    state = next(layer.state for layer in cache.layers if layer.state.gdn_state is not None)
    state.overflow_chunks[2].add_(3)
    state.router_sum[1].fill_(-2.0)
    assert torch.equal(state.layout.view(state.packed, "overflow_chunks")[2], torch.full((state.kept_len.shape[1],), 3))
    assert bool((state.layout.view(state.packed, "router_sum")[1] == -2.0).all())
    rows = torch.tensor([2, 0])
    mapped = state.map(lambda t: t.index_select(0, rows))
    assert len(mapped.packed) == len(state.packed) and mapped.layout.dtypes == state.layout.dtypes
    for name, t in mapped.tensors().items():
        assert torch.equal(t, getattr(state, name)[rows]), name
    old = [b.clone() for b in state.packed]
    mapped.seen.add_(1)
    mapped.gdn_state.zero_()
    assert torch.equal(mapped.layout.view(mapped.packed, "seen"), state.seen[rows] + 1)
    assert all(torch.equal(a, b) for a, b in zip(old, state.packed))
