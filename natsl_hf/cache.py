"""NatslCache / NatslStaticCache: the hybrid decode caches of NAtS-L models (transformers 5 Cache API).

Per layer it holds a `NatslLayerState` (natsl_hf.modeling.state): the KV of complete softmax
chunks only (compacted per KV group), the open chunk's KV and GDN inputs, the GDN state at the
open chunk's start, the conv state and the router's running sum (SPEC.md section 4). Layers
that stayed full softmax keep every chunk.

Lengths: `get_seq_length()` counts the *columns* processed (padding included), which is what
`generate` slices `input_ids` by; positions and chunk boundaries come from the per-row count of
real tokens kept inside each layer state (`state.seen`), never from the number of kept keys.

In transformers' terms NatslCache is a DynamicCache (it grows; generate's default) and NatslStaticCache a
StaticCache (fixed shapes, compileable), each built from NAtS-L layers instead of dense key/value ones. Both hold
the same state, updated by the same transitions: NatslCache's layers grow its kept KV as the rows keep tokens
(allocated by the layer's first call), NatslStaticCache allocates it once, sized by `max_cache_len` and
`max_kept_fraction`, so that a decode step has fixed shapes and no host sync:
`generate(..., cache_implementation="static")` builds one and lets transformers compile the step
(torch.compile, CUDA graphs), as it does for a Llama's StaticCache.
"""

from __future__ import annotations

import math
import numbers

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, StaticCache

from .modeling.state import NatslLayerState, PackedLayout

# What a cache's layers are shaped by: a cache built from one config cannot serve a model of another
# (`check_model`, run before the first layer reads the cache).
LAYOUT_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
                 "chunk_size", "gdn_conv_size", "natsl_layers")


def _is_count(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _natsl_config(config, cache: str):
    """The config a cache is built from: a NatslConfig (by its fields, so a trust_remote_code copy of the class
    serves too); anything else raises, naming the fix."""
    if config is None or not all(hasattr(config, f) for f in (*LAYOUT_FIELDS, "is_natsl_layer")):
        raise ValueError(f"{cache} needs the NAtS-L model's config, got {type(config).__name__}: pass "
                         f"{cache}(model.config, ...).")
    return config


def _layout(config) -> dict:
    return {f: tuple(getattr(config, f)) if f == "natsl_layers" else getattr(config, f) for f in LAYOUT_FIELDS}


def _check_layout(cache, layout: dict, config, fix: str) -> None:
    """Raise when `config` (the model's) differs from the config the cache was built for (`layout`)."""
    theirs = _layout(_natsl_config(config, "The model"))
    wrong = [f for f, mine in layout.items() if theirs[f] != mine]
    if wrong:
        said = ", ".join(f"{f}={layout[f]!r} (the model has {theirs[f]!r})" for f in wrong)
        raise ValueError(f"This {type(cache).__name__} was built for another model: {said}; create it from this "
                         f"model's config: {fix}.")


class NatslCacheLayer(CacheLayerMixin):
    """One layer's NAtS-L state, grown as its rows keep softmax KV. As transformers' DynamicLayer owns `update()`, it
    owns the state's writes (`write_segment`, `write_token`: the state's transitions, NatslAttention computing what
    goes in) and when the kept KV grows (`reserve`, `reserve_chunk`); NatslStaticCacheLayer is the same over buffers
    allocated once. Not croppable (a GDN state cannot be rolled back)."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    # the kept KV grows to this many chunks past the longest (row, group): a row closes at most one chunk in C decode
    # steps, so the (ROOM_CHUNKS - 1) x C steps after a growth fit without reading the kept lengths (a host sync)
    ROOM_CHUNKS = 4

    def __init__(self, **kwargs):
        super().__init__()
        self.state: NatslLayerState | None = None
        self.processed = 0  # columns seen, padding included
        self.steps_with_room = 0  # decode steps known to fit without reading kept_len (`reserve_chunk`)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "NatslCache layers hold routed chunks and a GDN state, not dense key/value states: NatslAttention writes "
            "them (`write_segment`, `write_token`); use this cache only with NAtS-L models."
        )

    def take_state(self, state: NatslLayerState) -> None:
        """The state of the layer's first call, empty, allocated by NatslAttention (which knows its shapes)."""
        self.state = state
        self.is_initialized = True

    def reserve(self, kept_len: torch.Tensor) -> None:
        """Before the kept KV reaches kept_len [B, Hkv] tokens per (row, group): grow it to fit, with room for
        ROOM_CHUNKS chunks more (eager: a host sync, and a new buffer only when that room is not there)."""
        self.state.grow_(kept_len + self.ROOM_CHUNKS * self.state.chunk_size)
        self.steps_with_room = (self.ROOM_CHUNKS - 1) * self.state.chunk_size

    def reserve_chunk(self) -> None:
        """Before a decode step: room for the chunk its token may close, in every (row, group). Eager, the kept lengths
        are read once in (ROOM_CHUNKS - 1) x C steps: the room `reserve` leaves lasts that long."""
        if self.steps_with_room > 0 and not torch.compiler.is_compiling():
            self.steps_with_room -= 1
            return
        self.reserve(self.state.kept_len)

    def write_segment(self, columns: int, *, keep: torch.Tensor, **result) -> None:
        """The result of a multi-token call over `columns` new columns (padding included) into the state, room
        first (`NatslLayerState.write_segment_` takes `keep` and `result`)."""
        self.reserve(self.state.kept_len + keep.sum(1))
        self.state.write_segment_(keep=keep, **result)
        self._count(columns)

    def write_token(self, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor, valid: torch.Tensor) -> None:
        """A decode token's softmax KV and router input into the state (`NatslLayerState.write_token_`): one column."""
        self.state.write_token_(k, v, hidden, valid)
        self._count(1)

    def _count(self, columns: int) -> None:
        self.processed += columns

    def get_seq_length(self) -> int:
        return self.processed

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.processed + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.processed, self.is_initialized, self.steps_with_room = None, 0, False, 0

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = self.state.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "NatslCache cannot be cropped: the GDN state cannot be rolled back. Generation strategies that crop "
            "the cache (assisted / speculative decoding, DoLa, contrastive search) are not supported; use greedy, "
            "sampling or beam search."
        )

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.seen.shape[0]

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        pass


def _no_dense_kv(cache) -> None:
    raise TypeError(
        f"{type(cache).__name__} does not hold one dense key/value tensor per layer (only the softmax chunks' KV, "
        "compacted, plus the GDN state): read `cache.layers[i].state` (a NatslLayerState) instead."
    )


class NatslCache(DynamicCache):
    """The cache `NatslForCausalLM` creates for `generate` / `use_cache=True`.

    A DynamicCache in transformers' sense (it grows with the calls and is what generate() uses by default;
    generation code and tests check for that class), whose layers are NAtS-L states instead of dense KV:
    so it is built from its own layers, and iterating it as (keys, values) pairs raises."""

    def __init__(self, config=None, num_layers: int | None = None):
        if config is None and num_layers is None:
            raise ValueError("NatslCache needs the model's config: NatslCache(model.config) (or num_layers=).")
        if num_layers is not None and (not _is_count(num_layers) or num_layers < 1):
            raise ValueError(f"NatslCache(num_layers={num_layers!r}) is invalid: expected a positive integer, the "
                             "model's config.num_hidden_layers (or pass NatslCache(model.config)).")
        if config is not None:
            config = _natsl_config(config, "NatslCache")
        n = num_layers if num_layers is not None else config.num_hidden_layers
        Cache.__init__(self, layers=[NatslCacheLayer() for _ in range(n)])  # not DynamicCache's dense layers
        self.chunk_size = None if config is None else config.chunk_size
        self._layout = {"num_hidden_layers": n} if config is None else {**_layout(config), "num_hidden_layers": n}

    def check_model(self, config) -> None:
        """Before a forward reads the cache (eager, no host sync): it was built for a model of this config."""
        _check_layout(self, self._layout, config, "NatslCache(model.config)")

    __iter__ = _no_dense_kv

    def layer_state(self, layer_idx: int) -> NatslLayerState | None:
        return self.layers[layer_idx].state

    def memory_report(self) -> dict:
        """Kept softmax KV per layer and bytes, against what a full KV cache of the same tokens holds.

        Per layer: `kept_tokens` (mean over rows and KV groups of kept softmax tokens, the open chunk
        excluded), `open_tokens`, `kv_bytes` (kept + open KV held as valid entries: what the routing
        keeps), `kv_allocated_bytes` (the KV tensors as allocated: the kept KV as long as its capacity plus
        C scratch slots (NatslCache: grown to the longest (row, KV group) and ROOM_CHUNKS chunks more), the open chunk
        a full chunk-sized buffer), `state_bytes` (GDN state twice, the open chunk's GDN inputs, conv state,
        router sum), `full_kv_bytes` (a dense cache of every real token, what a softmax model holds). Totals at
        the end; `kv_fraction` = kv_bytes / full_kv_bytes.
        """
        layers = []
        totals = {"kv_bytes": 0, "kv_allocated_bytes": 0, "state_bytes": 0, "full_kv_bytes": 0}
        kv_names = ("kept_k", "kept_v", "open_k", "open_v")
        for idx, layer in enumerate(self.layers):
            s = layer.state
            if s is None:
                continue
            B, Hkv = s.kept_len.shape
            per_token = (s.kept_k.shape[-1] + s.kept_v.shape[-1]) * s.kept_k.element_size()  # one group
            kept = s.kept_len.sum().item()  # over rows and groups
            open_tokens = (s.seen % s.chunk_size).sum().item() * Hkv
            kv_bytes = int((kept + open_tokens) * per_token)
            allocated = sum(t.numel() * t.element_size() for t in (getattr(s, name) for name in kv_names))
            state_bytes = sum(t.numel() * t.element_size() for name, t in s.tensors().items()
                              if name.startswith("gdn_") or name in ("conv_state", "router_sum"))
            full = int(s.seen.sum().item() * Hkv * per_token)
            layers.append(
                {
                    "layer": idx,
                    "kept_tokens": kept / (B * Hkv),
                    "open_tokens": open_tokens / (B * Hkv),
                    "kv_bytes": kv_bytes,
                    "kv_allocated_bytes": int(allocated),
                    "state_bytes": int(state_bytes),
                    "full_kv_bytes": full,
                }
            )
            totals["kv_bytes"] += kv_bytes
            totals["kv_allocated_bytes"] += int(allocated)
            totals["state_bytes"] += int(state_bytes)
            totals["full_kv_bytes"] += full
        totals["kv_fraction"] = totals["kv_bytes"] / max(totals["full_kv_bytes"], 1)
        return {"layers": layers, **totals}

    def realised_fraction(self) -> float | None:
        """Share of the routable chunks closed so far that NAtS-L layers kept as softmax (None if none closed)."""
        kept = closed = 0
        for layer in self.layers:
            s = layer.state
            if s is None or s.gdn_state is None:
                continue
            kept += s.kept_chunks.sum().item()
            closed += s.closed_chunks.sum().item() * s.kept_chunks.shape[1]
        return kept / closed if closed else None

    def overflow_report(self) -> dict:
        """Softmax-routed chunks that went to the GDN state because a row's kept KV was full, per layer (a
        NatslStaticCache's; a NatslCache grows instead: none)."""
        counts = {i: int(layer.state.overflow_chunks.sum()) for i, layer in enumerate(self.layers)
                  if layer.state is not None}
        return {"total": sum(counts.values()), "per_layer": {i: c for i, c in counts.items() if c}}


def _config_dtype(config) -> torch.dtype:
    """The model's dtype from its config: a torch.dtype, or its name once the config was saved (save_pretrained
    writes config.dtype as "float32"); float32 when unset."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def static_cache_length(length: int, limit: int) -> int:
    """The length generate() sizes a NatslStaticCache to for a call of `length` tokens (prompt + new tokens - 1) when
    no max_cache_len is given: `length` rounded up to one of four steps per doubling (..., 16, 20, 24, 28, 32, 40,
    ...: at most 25 % more), but not past `limit` (config.max_position_embeddings) unless `length` is. The compiled
    decode step serves every length (its length-dependent sizes are dynamic), but CUDA graphs are recorded per
    distinct shape: the steps bound how many a process records."""
    step = 2 ** max(0, (length - 1).bit_length() - 3)
    return min(-(-length // step) * step, max(length, limit))


def check_kept_fraction(value, where: str = "NatslStaticCache(max_kept_fraction=...)") -> None:
    """max_kept_fraction: None (the default) or a number in [0, 1]; raises naming `where` it was given."""
    ok = value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"max_kept_fraction={value!r} in {where} is invalid: expected a fraction in [0, 1] (the share "
                         "of routable chunks a layer can keep as softmax KV), or None for the default.")


class NatslStaticCacheLayer(NatslCacheLayer):
    """One layer's NAtS-L state in buffers allocated once (the addresses a compiled step captures): the writes are
    NatslCacheLayer's, the kept KV never grows."""

    is_compileable = True

    def __init__(self, state: NatslLayerState, columns: torch.Tensor | None = None):
        super().__init__()
        self.state = state
        # columns processed, a device tensor (as transformers' StaticLayer): a Python int changed inside a
        # compiled step would be burnt into the graph and recompile it at every step
        self.columns = torch.zeros((), dtype=torch.long, device=state.seen.device) if columns is None else columns
        self.is_initialized = True

    def buffers(self) -> list[torch.Tensor]:
        return [*self.state.buffers(), self.columns]

    def step_tensors(self) -> tuple[torch.Tensor, ...]:
        """What a decode step reads and writes, as tensors (a compile region's inputs:
        modeling_natsl.decode_step_region): the column count, then the state's buffers (`NatslLayerState.buffers`: the
        kept KV and one packed buffer per dtype, never the fields' views, so that each is one input of the compiled
        step). `over` is the layer again over these same buffers."""
        return (self.columns, *self.state.buffers())

    @classmethod
    def over(cls, tensors: tuple[torch.Tensor, ...], layout: PackedLayout) -> "NatslStaticCacheLayer":
        """The cache layer whose buffers are `step_tensors()`, its packed fields where `layout` says (the state's
        `layout`, or its attention module's `state_layout`; nothing allocated or copied: the step writes them)."""
        columns, kept_k, kept_v, *packed = tensors
        return cls(NatslLayerState(kept_k, kept_v, layout, packed), columns)

    def reserve(self, kept_len: torch.Tensor) -> None:
        """A multi-token call that keeps more than the capacity raises, naming `max_kept_fraction`."""
        self.state.check_fits(kept_len)

    def reserve_chunk(self) -> None:
        """Nothing: a decode step whose chunk finds the kept KV full writes it to the GDN state (`close_chunk`)."""

    def _count(self, columns: int) -> None:
        self.columns.add_(columns)

    def get_seq_length(self) -> torch.Tensor:
        return self.columns

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return int(self.columns) + query_length, 0

    def get_max_length(self) -> int:
        return self.cache_len

    def reset(self) -> None:
        for t in self.buffers():
            t.zero_()

    def _map(self, fn) -> None:
        for t in self.state.tensors().values():  # the fields (views of the packed buffers): fn's batch dim is theirs
            t.copy_(fn(t))

    def _fixed_batch(self, *args) -> None:
        raise NotImplementedError(
            "NatslStaticCache is allocated for one batch size: create it with max_batch_size = rows x num_beams "
            "(or num_return_sequences), or use the default NatslCache."
        )

    batch_repeat_interleave = batch_select_indices = _fixed_batch


class NatslStaticCache(StaticCache):
    """A NAtS-L cache of fixed size, for compiled decoding (`generate(..., cache_implementation="static")`):
    a StaticCache in transformers' sense (fixed shapes, compileable), built from its own layers.

    Per layer it allocates, once: the kept softmax KV (`capacity` tokens per row and KV group, see
    below), the open chunk's KV and GDN inputs, the GDN state twice (at the open chunk's start and with
    the open chunk written), the conv state and the router sum. Memory is proportional to what is kept,
    not to the context: a NAtS-L layer's kept KV holds
        capacity = sinks + max(max_kept_fraction x routable, min(routable, 8))   chunks
    (routable = the chunks of max_cache_len after the sinks; with the default fraction a short cache
    has room for 8 of them, where the share of a few chunks is noisy), a full-softmax layer's holds
    max_cache_len.

    Args:
        config: the model's NatslConfig.
        max_batch_size: rows (batch x beams).
        max_cache_len: most tokens per row (prompt + new tokens); generate() sets it.
        max_kept_fraction: the largest share of a row's routable chunks a NAtS-L layer can keep as
            softmax KV (default: min(1, 2 x config.softmax_budget)). When a row's kept KV is full, a
            chunk the router sends to softmax is written into the GDN state instead (decoding goes on
            with fixed memory and no host sync) and counted in `overflow_report()`; generate() warns
            when that happened. A prompt that keeps more than the capacity raises a ValueError that
            names this argument.
        device, dtype: of the KV buffers (default: the model's).

    Decode steps (one token per row) update the buffers in place, with no host sync and fixed shapes,
    so transformers compiles them (`cache.is_compileable`). A call of several tokens (the prompt) runs
    eagerly and is copied in. Both export with torch.export (tests/test_export.py): the step as transformers'
    ExecuTorch recipe exports a StaticCache's, the cache's buffers made the module's; the prompt as transformers'
    `decompose_for_generation` captures it, the capacity check then a runtime check of the program.
    """

    MIN_KEPT_CHUNKS = 8  # the default capacity's floor: short contexts keep room for 8 routable chunks

    def __init__(self, config, max_batch_size: int, max_cache_len: int, max_kept_fraction: float | None = None,
                 device=None, dtype=None):
        config = _natsl_config(config, "NatslStaticCache")
        check_kept_fraction(max_kept_fraction)
        for name, value in (("max_batch_size", max_batch_size), ("max_cache_len", max_cache_len)):
            if not _is_count(value) or value < 1:
                raise ValueError(f"NatslStaticCache({name}={value!r}) is invalid: expected an integer >= 1 "
                                 f"({'rows x num_beams' if name == 'max_batch_size' else 'prompt + new tokens'}).")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"NatslStaticCache(dtype={dtype!r}) is invalid: expected a floating torch.dtype such as "
                             "torch.bfloat16 (the model's: model.dtype), or None.")
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError, ValueError):
                raise ValueError(f"NatslStaticCache(device={device!r}) is invalid: expected a torch.device or a name "
                                 "such as 'cuda:0' (the model's: model.device), or None.") from None
        floor = self.MIN_KEPT_CHUNKS if max_kept_fraction is None else 0  # an explicit fraction is taken as given
        if max_kept_fraction is None:
            max_kept_fraction = min(1.0, 2 * config.softmax_budget)
        C, sinks = config.chunk_size, config.num_sink_chunks
        chunks = math.ceil(max_cache_len / C)
        routable = max(chunks - sinks, 0)
        kept = max(math.ceil(max_kept_fraction * routable), min(routable, floor))
        natsl_capacity = C * (sinks + kept)
        self._config = config
        self._layout = _layout(config)
        self._capacities = [natsl_capacity if config.is_natsl_layer(i) else chunks * C
                            for i in range(config.num_hidden_layers)]
        dtype = dtype or _config_dtype(config)
        Cache.__init__(self, layers=[self._layer(i, max_batch_size, device, dtype)
                                     for i in range(config.num_hidden_layers)])  # not StaticCache's dense layers
        self.chunk_size = C
        # not `max_cache_len` / `max_batch_size`: transformers 5.17's Cache has read-only properties of those names
        self.cache_len, self.rows, self.max_kept_fraction = max_cache_len, max_batch_size, max_kept_fraction
        for layer in self.layers:
            layer.cache_len = max_cache_len

    def _layer(self, i: int, rows: int, device, dtype) -> NatslStaticCacheLayer:
        config = self._config
        qd, kd = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        state = NatslLayerState.allocate(
            batch_size=rows, capacity=self._capacities[i], chunk_size=config.chunk_size,
            num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim, dtype=dtype, device=device,
            natsl=config.is_natsl_layer(i), hidden_size=config.hidden_size, conv_size=config.gdn_conv_size,
            conv_channels=qd + kd,
        )
        layer = NatslStaticCacheLayer(state)
        if not torch.compiler.is_compiling():
            for t in layer.buffers():  # fixed addresses: in-place updates keep CUDA graphs valid
                torch._dynamo.mark_static_address(t)
            for t in (state.kept_k, state.kept_v):  # the kept slots, which follow max_cache_len: a dynamic size from
                torch._dynamo.maybe_mark_dynamic(t, 2)  # the first compile on, so another cache length reuses the graph
        return layer

    def place_(self, device, dtype) -> None:
        """Before the first call (eager): buffers on the model's device and in its dtype. A cache created
        without `device=` is allocated on the CPU; this moves it (empty) where the model runs."""
        state = self.layers[0].state
        if state.kept_k.device == torch.device(device) and state.kept_k.dtype == dtype:
            return
        if int(self.layers[0].columns):
            raise ValueError(f"This NatslStaticCache holds tokens on {state.kept_k.device} ({state.kept_k.dtype}); "
                             f"the model runs on {device} ({dtype}): create the cache with device= and dtype= of the model.")
        for i in range(len(self.layers)):
            self.layers[i] = self._layer(i, self.rows, device, dtype)
            self.layers[i].cache_len = self.cache_len

    def layer_state(self, layer_idx: int) -> NatslLayerState:
        return self.layers[layer_idx].state

    def check_model(self, config) -> None:
        """Before a forward reads the cache (eager, no host sync): its buffers are shaped for this model."""
        _check_layout(self, self._layout, config, "NatslStaticCache(model.config, max_batch_size, max_cache_len)")

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.cache_len

    def check_room(self, batch_size: int, columns: int) -> None:
        """Before an eager call: the batch matches and `columns` more tokens fit (raises, naming the fix)."""
        if batch_size != self.rows:
            raise ValueError(f"This NatslStaticCache holds {self.rows} rows, the call has {batch_size}; "
                             "create the cache with max_batch_size = the call's batch size.")
        cached = int(self.layers[0].columns)
        if cached + columns > self.cache_len:
            raise ValueError(f"NatslStaticCache(max_cache_len={self.cache_len}) is full: {cached} tokens cached, "
                             f"{columns} more given; create it with a larger max_cache_len (generate() sizes it to "
                             "the prompt + max_new_tokens).")

    realised_fraction = NatslCache.realised_fraction
    overflow_report = NatslCache.overflow_report
    memory_report = NatslCache.memory_report
    __iter__ = _no_dense_kv


__all__ = ["NatslCache", "NatslCacheLayer", "NatslStaticCache", "NatslStaticCacheLayer", "check_kept_fraction",
           "static_cache_length"]
