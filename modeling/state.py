"""The decode state of a NAtS-L layer (SPEC.md section 4) and its transitions, plain tensors, no transformers.

What a layer keeps between calls, per batch row:
- the KV of complete softmax chunks, compacted to the front per KV group (`kept_*`, `kept_len` of them valid);
- the still-open chunk's tokens: RoPE'd k, v (softmax branch) and GDN key, gate g, raw beta
  (written into the GDN state only if the chunk closes as linear);
- the GDN state at the open chunk's start (`gdn_state`), the same state with the open chunk's tokens already
  written as if it closes linear (`gdn_run`) and the log decay since the chunk's start (`gdn_decay`), the GDN
  short-conv state and the router's running sum of the open chunk's hidden states;
- `seen`: real (non-padding) tokens seen, which fixes positions and chunk boundaries per row;
- counters of the routable chunks closed, kept softmax, and sent to GDN for want of room (realised fraction).
Full-softmax layers keep only the KV fields and counters (every chunk is softmax there).

Storage: the kept KV is two tensors of its own (it grows, and its length is a dynamic size of the compiled step);
every other field is a view of one of three flat buffers (`PackedLayout`, `BUFFER_OF`: the counters, the open chunk,
the GDN side), so that a compiled decode step takes a layer's state as a handful of inputs (two kept KV tensors and
two or three buffers) instead of one per field.

One layout, two allocations: NatslStaticCache allocates it once (`capacity` kept tokens per (row, KV group), fixed
shapes, so a decode step has no host sync and can be captured); NatslCache grows the same buffers as the kept KV
does (`grow_`; its cache layers decide when, natsl_hf/cache.py). The transitions are the same for both and update
the buffers in place:
- write a token: `write_token_` (its softmax KV at the open-chunk slot, its hidden state into the router's sum) and
  `gdn_decode_step` (its GDN inputs and its write into `gdn_run`, modeling.reference / modeling.kernels);
- close a chunk: `close_chunks_`, the one close transition: the closed chunks' keys kept softmax join the kept KV, the
  counters count the routable ones, and in a NAtS-L layer the GDN state restarts from the state at the end of the last
  closed chunk. Its two callers differ only in how they get that state and the routes (see `close_chunks_`): a decode
  step's `close_chunk` (modeling.reference; modeling.kernels fuses it) and a multi-token call's `write_segment_`;
- read out: `routed_decode_attention` (kept + open KV) and `gdn_readout` of `gdn_state` (modeling.reference / kernels).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch


def tracing() -> bool:
    """Whether this call is being traced by torch.compile or torch.export (both strict and non-strict), where a
    tensor's values cannot be read on the host. The paths here then take no data-dependent host branch and no
    data-dependent shape: each value read eagerly (a segment's chunk count, which chunks any row routed softmax,
    whether a mask holds padding, how long the kept KV gets) is replaced by what serves every value, with the same
    outputs. Eager calls keep the read: one cheap sync that saves the work the static form spends on empty chunks,
    linear chunks or a plain conv. That is transformers' own pattern for data-dependent fast paths (masking_utils
    skips its all-real-mask shortcuts under `is_tracing` / `is_torchdynamo_exporting`)."""
    return torch.compiler.is_compiling()


# The flat buffer that holds each packed field: the counters ("counters", int64), the open chunk's softmax KV and the
# conv window ("open", the model's dtype), the GDN fields and the router's sum ("gdn", fp32). The fused decode
# kernels take these buffers and the fields' offsets (`NatslLayerState.buffer`, `PackedLayout.offset`), not the
# fields: inductor lets a user Triton kernel write a compiled step's input in place only when the argument is the
# input itself; an argument that is a view of one is cloned before the kernel and copied back after it
# (torch/_inductor/fx_passes/reinplace.py, `can_inplace`), two small copies per field, layer and token. By name, not
# by dtype: an fp32 model keeps "open" and "gdn" apart too, so that a kernel writing fields of both never takes two
# arguments that alias one tensor.
BUFFER_OF = {
    **dict.fromkeys(("seen", "kept_len", "kept_chunks", "closed_chunks", "overflow_chunks"), "counters"),
    **dict.fromkeys(("open_k", "open_v", "conv_state"), "open"),
    **dict.fromkeys(("gdn_k", "gdn_g", "gdn_beta", "gdn_state", "gdn_run", "gdn_decay", "router_sum"), "gdn"),
}


@dataclass
class PackedLayout:
    """Where a state's packed fields lie: flat buffers (`BUFFER_OF`, in the order they first appear among the fields),
    each field a contiguous run of its buffer (so a field is a contiguous view, as the kernels take it) starting on a
    16-byte boundary. Plain Python values, a function of the layer's shapes (`of`, `layout_for`): a compiled step that
    takes the buffers as inputs makes the views inside (`view`)."""

    names: tuple[str, ...]
    slots: tuple[tuple[int, int, tuple[int, ...]], ...]  # per field: (buffer, first element, shape)
    buffer_names: tuple[str, ...]  # "counters", "open", "gdn" (those the fields use)
    dtypes: tuple[torch.dtype, ...]  # of the buffers
    sizes: tuple[int, ...]  # elements of each buffer

    ALIGN = 16  # bytes, where each field starts

    @classmethod
    def of(cls, fields: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]) -> "PackedLayout":
        """The layout of `fields`, ((name, dtype, shape), ...), in that order."""
        buffer_names = tuple(dict.fromkeys(BUFFER_OF[name] for name, _, _ in fields))
        dtypes = {}
        sizes, slots = [0] * len(buffer_names), []
        for name, dtype, shape in fields:
            i, step = buffer_names.index(BUFFER_OF[name]), max(1, cls.ALIGN // dtype.itemsize)
            if dtypes.setdefault(i, dtype) != dtype:
                raise ValueError(f"{name} is {dtype}, the other fields of the {buffer_names[i]!r} buffer {dtypes[i]}")
            start = -(-sizes[i] // step) * step
            slots.append((i, start, tuple(shape)))
            sizes[i] = start + math.prod(shape)
        return cls(tuple(name for name, _, _ in fields), tuple(slots), buffer_names,
                   tuple(dtypes[i] for i in range(len(buffer_names))), tuple(sizes))

    def allocate(self, device) -> tuple[torch.Tensor, ...]:
        """Zero buffers of this layout."""
        return tuple(torch.zeros(n, dtype=dtype, device=device) for n, dtype in zip(self.sizes, self.dtypes))

    def view(self, buffers: tuple[torch.Tensor, ...], name: str) -> torch.Tensor | None:
        """The field `name` of `buffers` (None where the layout has no such field)."""
        if name not in self.names:
            return None
        i, start, shape = self.slots[self.names.index(name)]
        return buffers[i].narrow(0, start, math.prod(shape)).view(shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.slots[self.names.index(name)][2]

    def offset(self, name: str) -> int:
        """The first element of field `name` in its buffer."""
        return self.slots[self.names.index(name)][1]


# Eager reads' views, per state: (its packed buffers, their views by name). Made once, not at each read (a view
# costs microseconds, an eager decode step reads ~45 fields a layer), and kept off the state, whose attributes stay
# only what holds its data (what transformers' output walkers map or copy: a copied view would not alias its buffer).
_EAGER_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packed(name: str) -> property:
    """A packed field of NatslLayerState: a view of its buffer. Traced, made at each read from the buffer the step
    takes as an input (a view kept on the state would be an input of its own, aliasing the buffer); eager, made
    once (`_EAGER_VIEWS`)."""
    def read(state: "NatslLayerState") -> torch.Tensor | None:
        if tracing():
            return state.layout.view(state.packed, name)
        packed, views = _EAGER_VIEWS.get(state, (None, None))
        if packed is not state.packed:
            views = {field: state.layout.view(state.packed, field) for field in state.layout.names}
            _EAGER_VIEWS[state] = (state.packed, views)
        return views.get(name)
    return property(read)


class NatslLayerState:
    """A layer's decode state (module docstring). `kept_k` / `kept_v` hold capacity + C slots: the last C are scratch
    that a closing chunk which is not appended writes into (so every row of `close_chunk` runs the same scatter);
    they are never counted in `kept_len`. NatslCache's layers grow the kept KV to what the rows keep (`grow_`),
    NatslStaticCache's keep it as allocated (`check_fits`).

    Layout: `kept_k`, `kept_v` are tensors of their own; the other fields are views of `packed`, flat buffers
    (`layout`, a PackedLayout; `BUFFER_OF`, in the order below): "counters", int64 (the counters and `seen`); "open",
    the model's dtype (the open chunk's KV and the conv window); "gdn", fp32 (the GDN inputs and states, the router
    sum). The views alias the buffers: the transitions' in-place writes (`copy_`, `add_`) land in them; the fused
    kernels write through the buffers themselves (`buffer`, `layout.offset`). A full-softmax layer's layout has no
    GDN fields (they read None) and no "gdn" buffer.
    """

    seen = _packed("seen")  # [B] long
    kept_len = _packed("kept_len")  # [B, Hkv] long, the valid prefix of kept_k / kept_v
    kept_chunks = _packed("kept_chunks")  # [B, Hkv] long, routable chunks closed softmax (the realised fraction)
    closed_chunks = _packed("closed_chunks")  # [B] long, routable chunks closed
    overflow_chunks = _packed("overflow_chunks")  # [B, Hkv] long, softmax chunks sent to GDN: the kept KV was full
    open_k = _packed("open_k")  # [B, C, Hkv, D]  open chunk, slot s = position open_start + s
    open_v = _packed("open_v")  # [B, C, Hkv, Dv]
    conv_state = _packed("conv_state")  # [B, W-1, channels] short-conv inputs
    gdn_k = _packed("gdn_k")  # [B, C, Hkv, K] fp32, L2-normalised GDN keys of the open chunk
    gdn_g = _packed("gdn_g")  # [B, C, Hkv] fp32 log decay
    gdn_beta = _packed("gdn_beta")  # [B, C, Hkv] fp32 raw write strength
    gdn_state = _packed("gdn_state")  # [B, Hkv, K, V] fp32, state at the open chunk's start
    gdn_run = _packed("gdn_run")  # [B, Hkv, K, V] fp32, with the open chunk written as linear
    gdn_decay = _packed("gdn_decay")  # [B, Hkv] fp32, sum of g since the open chunk's start
    router_sum = _packed("router_sum")  # [B, hidden] fp32 sum of the open chunk's hidden states

    def __init__(self, kept_k: torch.Tensor, kept_v: torch.Tensor, layout: PackedLayout,
                 packed: tuple[torch.Tensor, ...]):
        self.kept_k = kept_k  # [B, Hkv, capacity + C, D]   RoPE'd keys of complete softmax chunks
        self.kept_v = kept_v  # [B, Hkv, capacity + C, Dv]
        self.layout, self.packed = layout, tuple(packed)

    @staticmethod
    def layout_for(*, batch_size: int, chunk_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   natsl: bool, hidden_size: int = 0, conv_size: int = 0, conv_channels: int = 0) -> PackedLayout:
        """The packed fields' layout of a state of these sizes, its KV in `dtype` (`allocate`'s, and a layer's
        attention module's: modeling.layer `state_layout`, by which a compiled decode step views the buffers)."""
        B, C, H, D = batch_size, chunk_size, num_kv_heads, head_dim
        long, f32 = torch.long, torch.float32
        fields = [("seen", long, (B,)), ("kept_len", long, (B, H)), ("kept_chunks", long, (B, H)),
                  ("closed_chunks", long, (B,)), ("overflow_chunks", long, (B, H)),
                  ("open_k", dtype, (B, C, H, D)), ("open_v", dtype, (B, C, H, D))]
        if natsl:
            fields += [("conv_state", dtype, (B, conv_size - 1, conv_channels)), ("gdn_k", f32, (B, C, H, D)),
                       ("gdn_g", f32, (B, C, H)), ("gdn_beta", f32, (B, C, H)), ("gdn_state", f32, (B, H, D, D)),
                       ("gdn_run", f32, (B, H, D, D)), ("gdn_decay", f32, (B, H)),
                       ("router_sum", f32, (B, hidden_size))]
        return PackedLayout.of(tuple(fields))

    @classmethod
    def allocate(cls, *, batch_size: int, capacity: int, chunk_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, natsl: bool, hidden_size: int = 0, conv_size: int = 0,
                 conv_channels: int = 0) -> "NatslLayerState":
        """An empty state with room for `capacity` kept tokens per (row, KV group), rounded up to whole chunks."""
        B, C, H, D = batch_size, chunk_size, num_kv_heads, head_dim
        capacity = math.ceil(capacity / C) * C
        layout = cls.layout_for(batch_size=B, chunk_size=C, num_kv_heads=H, head_dim=D, dtype=dtype, natsl=natsl,
                                hidden_size=hidden_size, conv_size=conv_size, conv_channels=conv_channels)
        kept = [torch.zeros(B, H, capacity + C, D, dtype=dtype, device=device) for _ in range(2)]
        return cls(*kept, layout, layout.allocate(device))

    @classmethod
    def of(cls, kept_k: torch.Tensor, kept_v: torch.Tensor, **fields: torch.Tensor) -> "NatslLayerState":
        """A state holding copies of `fields` (the packed fields by name, in allocation order) packed, and the kept KV
        as given."""
        layout = PackedLayout.of(tuple((name, t.dtype, tuple(t.shape)) for name, t in fields.items()))
        state = cls(kept_k, kept_v, layout, layout.allocate(kept_k.device))
        for name, t in fields.items():
            getattr(state, name).copy_(t)
        return state

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every field by name: the kept KV, then the packed fields (views) in allocation order."""
        packed = {name: getattr(self, name) for name in self.layout.names}
        return {"kept_k": self.kept_k, "kept_v": self.kept_v, **packed}

    def buffers(self) -> list[torch.Tensor]:
        """The tensors that hold the state: the kept KV and the packed buffers."""
        return [self.kept_k, self.kept_v, *self.packed]

    def buffer(self, name: str) -> torch.Tensor | None:
        """The packed buffer `name` ("counters", "open", "gdn"; None where the layout has none: a full-softmax layer's
        "gdn"), as a fused kernel that writes its fields takes it, with their `layout.offset`s."""
        names = self.layout.buffer_names
        return self.packed[names.index(name)] if name in names else None

    def map(self, fn) -> "NatslLayerState":
        """A new state with `fn` applied to every field (batch reorder / select / repeat, device moves), repacked."""
        return NatslLayerState.of(**{name: fn(t) for name, t in self.tensors().items()})

    @property
    def chunk_size(self) -> int:
        return self.layout.shape("open_k")[1]

    @property
    def capacity(self) -> int:
        """Kept tokens each (row, KV group) has room for (the scratch slots excluded)."""
        return self.kept_k.shape[2] - self.chunk_size

    @property
    def kept_valid(self) -> torch.Tensor:
        """[B, Hkv, capacity + C] bool, the kept slots that hold a key."""
        slots = torch.arange(self.kept_k.shape[2], device=self.kept_k.device)
        return slots < self.kept_len[..., None]

    def kept(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kept KV as a multi-token call reads it: (kept_k, kept_v, kept_valid) [B, Hkv, L, *] trimmed to the
        longest (row, group) (eager: one host sync); traced, where that length cannot be read, every slot."""
        L = self.kept_k.shape[2] if tracing() else int(self.kept_len.max())
        return self.kept_k[:, :, :L], self.kept_v[:, :, :L], self.kept_valid[:, :, :L]

    def grow_(self, kept_len: torch.Tensor) -> None:
        """Reallocate the kept KV so that every (row, group) has room for `kept_len` [B, Hkv] tokens (NatslCache: the
        layout grown as needed). Eager: one host sync, and a new buffer only when they do not fit; traced: an unbacked
        size, the same as eager's."""
        capacity = torch.sym_max(kept_len.max().item(), self.capacity) if kept_len.numel() else self.capacity
        if not tracing() and capacity == self.capacity:
            return
        for name in ("kept_k", "kept_v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], capacity + self.chunk_size, old.shape[-1])
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def check_fits(self, kept_len: torch.Tensor) -> None:
        """Raise when a (row, group) would keep more than the capacity (NatslStaticCache: fixed buffers), naming the
        setting that sizes it; traced, a runtime check of the program."""
        if tracing():
            torch._check(kept_len.max().item() <= self.capacity)
            return
        longest = int(kept_len.max()) if kept_len.numel() else 0
        if longest > self.capacity:
            raise ValueError(
                f"The prompt keeps {longest} softmax tokens in one (row, KV group), more than this "
                f"NatslStaticCache holds ({self.capacity}); raise `max_kept_fraction` when you create the cache."
            )

    # --- transitions --------------------------------------------------------------------------------
    def write_token_(self, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor, valid: torch.Tensor) -> None:
        """Write the new token's softmax KV (k, v [B, Hkv, *]) at its open-chunk slot and, in a NAtS-L layer, its
        hidden state (hidden [B, D], the layer's normed input) into the router's sum, where it is real (valid [B]
        bool). Its GDN inputs go in with `gdn_decode_step` (modeling.reference / modeling.kernels)."""
        slot = self.seen % self.chunk_size
        self.open_k.copy_(put_slot(self.open_k, slot, k))
        self.open_v.copy_(put_slot(self.open_v, slot, v))
        if self.router_sum is not None:
            self.router_sum.add_(hidden.float() * valid[:, None])

    def close_chunks_(self, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, routable: torch.Tensor,
                      kept: torch.Tensor, overflow: torch.Tensor | None, closing: torch.Tensor,
                      gdn_end: torch.Tensor | None) -> None:
        """Close chunks, in place: the one chunk-close transition of a decode step (`reference.close_chunk`, one chunk
        per row) and of a multi-token call (`write_segment_`, every chunk it completes).

        k: [B, S, Hkv, D], v: [B, S, Hkv, Dv] the closed chunks' keys (and maybe others), keep: [B, S, Hkv] bool those
        that join the kept KV (`append_kept_`: chunks closed softmax, with room); per closed chunk j of a row:
        routable [B, N] bool (counted in the realised fraction), kept [B, N, Hkv] bool (kept softmax), overflow
        [B, N, Hkv] bool or None (routed softmax, found no room: written to GDN instead); closing: [B] bool the rows
        that closed a chunk; gdn_end: [B, Hkv, K, V] fp32 (NAtS-L layers) the GDN state at the end of a closing row's
        last closed chunk, from which the next chunk starts: `gdn_run` restarts from it, the decay and the router's
        sum from zero.

        The callers differ only in how they get gdn_end and the routes, for a reason each: a decode step closes one
        chunk whose writes it has followed token by token (`gdn_run`, the delta rule's recurrent form), so gdn_end is
        `gdn_run` (linear) or the chunk-start state decayed (softmax), routed by the router there and then, and a
        softmax chunk may find the kept KV full (overflow, a NatslStaticCache's); a multi-token call closes any
        number of chunks at once, so gdn_end is the GDN branch's chunk-form state at the open chunk's start (its write
        strengths beta (1 - m) already zero for softmax chunks), its routes are `_route`'s, and the cache layer made
        room first (`reserve`: none overflows)."""
        append_kept_(self, k, v, keep)
        self.closed_chunks.add_(routable.sum(1))
        self.kept_chunks.add_((routable[..., None] & kept).sum(1))
        if overflow is not None:
            self.overflow_chunks.add_(overflow.sum(1))
        if self.gdn_state is None:
            return
        closing4 = closing[:, None, None, None]
        self.gdn_state.copy_(torch.where(closing4, gdn_end, self.gdn_state))
        self.gdn_run.copy_(torch.where(closing4, gdn_end, self.gdn_run))
        self.gdn_decay.masked_fill_(closing[:, None], 0.0)
        self.router_sum.masked_fill_(closing[:, None], 0.0)

    def write_segment_(self, *, k_pos, k, v, keep, routable, kept, closing, gdn_end, seen, open_chunk,
                       gdn_open: dict | None) -> None:
        """The state after a multi-token call (modeling.layer `_segment`: the cached open chunk + the new tokens), in
        place: every chunk it completes closes (`close_chunks_`), the chunk it leaves open replaces the open chunk.
        k_pos: [B, S] segment positions (-1 padding); k, v: [B, S, Hkv, *] the segment's RoPE'd keys and values; keep,
        routable, kept, closing, gdn_end: as `close_chunks_` takes them (gdn_end: the GDN state at the open chunk's
        start); seen: [B] real tokens seen after the call; open_chunk: [B] the chunk left open; gdn_open: NAtS-L
        layers, the open chunk's GDN fields after the call (its keys, gates, `gdn_run`, decay, conv window, router
        sum). The kept KV must have room (the cache layer's `reserve`)."""
        k, v = k.detach(), v.detach()
        self.close_chunks_(k, v, keep, routable, kept, None, closing, None if gdn_end is None else gdn_end.detach())
        self.open_k.copy_(gather_open(k, k_pos, open_chunk, self.chunk_size))
        self.open_v.copy_(gather_open(v, k_pos, open_chunk, self.chunk_size))
        self.seen.copy_(seen)
        for name, value in (gdn_open or {}).items():
            getattr(self, name).copy_(value.detach())


def append_kept_(state: NatslLayerState, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> None:
    """Append the keys marked in `keep` behind each (row, group)'s kept KV, in order, in place (`close_chunks_`).
    k: [B, S, Hkv, D], v: [B, S, Hkv, Dv], keep: [B, S, Hkv] bool; the caller made room (kept_len + keep.sum(1) <=
    capacity). Keys not kept go to the first scratch slot."""
    keep = keep.transpose(1, 2)  # [B,Hkv,S]
    dest = state.kept_len[..., None] + keep.long().cumsum(-1) - 1
    dest = torch.where(keep, dest, torch.full_like(dest, state.capacity))
    for buf, x in ((state.kept_k, k), (state.kept_v, v)):
        buf.scatter_(2, dest[..., None].expand(-1, -1, -1, x.shape[-1]), x.transpose(1, 2).to(buf.dtype))
    state.kept_len.add_(keep.sum(-1))


def put_slot(buf: torch.Tensor, slot: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """buf [B, C, ...] with value [B, ...] written at each row's slot [B] (out of place)."""
    B = buf.shape[0]
    index = slot.view(B, 1, *([1] * (buf.dim() - 2))).expand(B, 1, *buf.shape[2:])
    return buf.scatter(1, index, value[:, None].to(buf.dtype))


def gather_open(values: torch.Tensor, pos: torch.Tensor, open_chunk: torch.Tensor, chunk_size: int):
    """Slots of the tokens that belong to each row's open chunk.

    values: [B, S, ...], pos: [B, S] real positions (-1 padding), open_chunk: [B]
    -> [B, C, ...], slot s = position open_chunk*C + s (zeros where absent)
    """
    B, S = pos.shape
    inside = (pos >= 0) & (torch.div(pos, chunk_size, rounding_mode="floor") == open_chunk[:, None])
    slot = torch.where(inside, pos - open_chunk[:, None] * chunk_size, torch.full_like(pos, chunk_size))
    out = values.new_zeros(B, chunk_size + 1, *values.shape[2:])
    index = slot.view(B, S, *([1] * (values.dim() - 2))).expand_as(values)
    out.scatter_(1, index, values)
    return out[:, :chunk_size]


def gdn_token_write(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                    g: torch.Tensor) -> torch.Tensor:
    """One gated delta-rule write (SPEC.md section 3, token form): S' = e^g S, S' += beta k (v - S'^T k)^T.

    state [B, Hkv, K, V] fp32, k [B, Hkv, K] (L2-normalised), v [B, Hkv, V], beta, g [B, Hkv] fp32
    -> [B, Hkv, K, V] fp32. beta = g = 0 leaves the state as it is (padding).
    """
    state = state * g.exp()[..., None, None]
    k, v = k.float(), v.float()
    delta = v - (k[..., None, :] @ state)[..., 0, :]  # [B,Hkv,V]
    return state + (beta[..., None] * k)[..., :, None] * delta[..., None, :]
