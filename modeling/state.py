"""Per-layer decode state of a NAtS-L layer (SPEC.md section 4), plain tensors, no transformers.

What a layer keeps between calls, per batch row:
- the KV of complete softmax chunks, compacted per KV group (`kept_*`);
- the still-open chunk's tokens: RoPE'd k, v (softmax branch) and GDN key, gate g, raw beta
  (written into the GDN state only if the chunk closes as linear);
- the GDN state at the open chunk's start, the GDN short-conv state and the router's running
  sum of the open chunk's hidden states;
- `seen`: real (non-padding) tokens seen, which fixes positions and chunk boundaries per row.
Full-softmax layers keep only the KV fields (every chunk is softmax there).

Two containers hold it:
- `NatslLayerState` (NatslCache): tensors sized to what is kept, replaced after every call. Any
  call shape (multi-token segments against the cache, padding anywhere) goes through it.
- `NatslStaticLayerState` (NatslStaticCache): the same fields in buffers preallocated once, so a
  one-token decode step has fixed shapes, no host sync and can be captured (torch.compile / CUDA
  graphs). It also keeps `gdn_run`, the GDN state with the open chunk's tokens already written as
  if it closes linear (one recurrent delta-rule step per token), so that closing a chunk is a
  masked select instead of a chunked solve. Multi-token calls against it convert to and from a
  `NatslLayerState` (`to_dynamic` / `load_`), outside the captured step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

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


@dataclass
class CacheUpdate:
    """What a multi-token or decode call hands its cache layer: the layer's next state (a NatslLayerState, or
    the NatslStaticLayerState it updated in place) and, from a segment, the counts a static cache adds to its
    realised-fraction counters: closed_chunks [B] (the call's routable chunks) and kept_chunks [B, Hkv] (those
    kept softmax)."""

    state: "NatslLayerState | NatslStaticLayerState"
    closed_chunks: torch.Tensor | None = None
    kept_chunks: torch.Tensor | None = None


@dataclass
class NatslLayerState:
    seen: torch.Tensor  # [B] long
    kept_k: torch.Tensor  # [B, Hkv, L, D]   RoPE'd keys of complete softmax chunks
    kept_v: torch.Tensor  # [B, Hkv, L, Dv]
    kept_valid: torch.Tensor  # [B, Hkv, L] bool, compacted to the front per (row, group)
    open_k: torch.Tensor  # [B, C, Hkv, D]  open chunk, slot s = position open_start + s
    open_v: torch.Tensor  # [B, C, Hkv, Dv]
    gdn_k: torch.Tensor | None = None  # [B, C, Hkv, K]  L2-normalised GDN keys of the open chunk
    gdn_g: torch.Tensor | None = None  # [B, C, Hkv] fp32 log decay
    gdn_beta: torch.Tensor | None = None  # [B, C, Hkv] raw write strength
    gdn_state: torch.Tensor | None = None  # [B, Hkv, K, V] fp32, state at the open chunk's start
    conv_state: torch.Tensor | None = None  # [B, W-1, channels] short-conv inputs
    router_sum: torch.Tensor | None = None  # [B, hidden] fp32 sum of the open chunk's hidden states

    def tensors(self):
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def map(self, fn) -> "NatslLayerState":
        """A new state with `fn` applied to every tensor (batch reorder, device moves...)."""
        return NatslLayerState(**{name: fn(t) for name, t in self.tensors().items()})

    @property
    def kept_len(self) -> torch.Tensor:
        """[B, Hkv] number of kept softmax KV tokens per row and group (open chunk excluded)."""
        return self.kept_valid.sum(-1)

    @classmethod
    def after_segment(cls, state: "NatslLayerState | None", seen, k_pos, seg_k, seg_v, keep, open_chunk,
                      chunk_size: int, gdn: dict | None) -> "NatslLayerState":
        """The state after a segment (cached open chunk + new tokens) was processed.

        seen: [B] real tokens seen after the call; k_pos: [B, S] segment positions (-1 padding);
        seg_k, seg_v: [B, S, Hkv, *] the segment's RoPE'd keys and values; keep: [B, S, Hkv] bool,
        keys of chunks that closed softmax in this call; open_chunk: [B] the chunk left open;
        gdn: the GDN fields of the next state (NAtS-L layers) or None.
        """
        kept_k, kept_v, kept_valid = append_kept(state, seg_k.detach(), seg_v.detach(), keep)
        return cls(
            seen=seen, kept_k=kept_k, kept_v=kept_v, kept_valid=kept_valid,
            open_k=gather_open(seg_k.detach(), k_pos, open_chunk, chunk_size),
            open_v=gather_open(seg_v.detach(), k_pos, open_chunk, chunk_size),
            **(gdn or {}),
        )

    def after_token(self, open_k, open_v, gdn: dict | None) -> "NatslLayerState":
        """The state after one real token per row that closed no chunk: the open chunk's buffers
        (the token written at its slot) and, for NAtS-L layers, the GDN fields (`gdn`)."""
        return NatslLayerState(
            seen=self.seen + 1, kept_k=self.kept_k, kept_v=self.kept_v, kept_valid=self.kept_valid,
            open_k=open_k, open_v=open_v, gdn_state=self.gdn_state, **(gdn or {}),
        )


def put_slot(buf: torch.Tensor, slot: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """buf [B, C, ...] with value [B, ...] written at each row's slot [B] (out of place)."""
    B = buf.shape[0]
    index = slot.view(B, 1, *([1] * (buf.dim() - 2))).expand(B, 1, *buf.shape[2:])
    return buf.scatter(1, index, value[:, None].to(buf.dtype))


def append_kept(state: NatslLayerState | None, k, v, keep):
    """Append the keys marked in `keep` to the compacted kept KV.

    k: [B, S, Hkv, D], v: [B, S, Hkv, Dv], keep: [B, S, Hkv] bool
    -> (kept_k [B,Hkv,L',D], kept_v, kept_valid [B,Hkv,L'])
    """
    B, S, Hkv, D = k.shape
    keep = keep.transpose(1, 2)  # [B,Hkv,S]
    if state is None:
        old_len = torch.zeros(B, Hkv, dtype=torch.long, device=k.device)
        old_k = k.new_zeros(B, Hkv, 0, D)
        old_v = v.new_zeros(B, Hkv, 0, v.shape[-1])
    else:
        old_len, old_k, old_v = state.kept_len, state.kept_k, state.kept_v
    add = keep.sum(-1)
    if state is not None and not tracing() and int(add.max()) == 0:  # nothing kept: the same tensors (eager only)
        return state.kept_k, state.kept_v, state.kept_valid
    new_len = old_len + add
    # as long as the longest (row, group) after the call: data-dependent. Eager, one host sync; under torch.export an
    # unbacked size (the exported cache is shaped as the eager one); under torch.compile a graph break
    cap = torch.sym_max(new_len.max().item(), old_k.shape[2])
    kept_k = old_k.new_zeros(B, Hkv, cap, D)
    kept_v = old_v.new_zeros(B, Hkv, cap, v.shape[-1])
    kept_k[:, :, : old_k.shape[2]] = old_k
    kept_v[:, :, : old_v.shape[2]] = old_v
    dest = old_len[..., None] + keep.long().cumsum(-1) - 1  # [B,Hkv,S]
    dest = torch.where(keep, dest, torch.full_like(dest, cap))  # dropped via an extra slot
    pad_k = torch.cat([kept_k, kept_k.new_zeros(B, Hkv, 1, D)], 2)
    pad_v = torch.cat([kept_v, kept_v.new_zeros(B, Hkv, 1, v.shape[-1])], 2)
    pad_k.scatter_(2, dest[..., None].expand(-1, -1, -1, D), k.transpose(1, 2).to(pad_k.dtype))
    pad_v.scatter_(2, dest[..., None].expand(-1, -1, -1, v.shape[-1]), v.transpose(1, 2).to(pad_v.dtype))
    valid = torch.arange(cap, device=k.device)[None, None, :] < new_len[..., None]
    return pad_k[:, :, :cap], pad_v[:, :, :cap], valid


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


# ------------------------------------------------------------------------------- static state

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


@dataclass
class NatslStaticLayerState:
    """A layer's decode state in buffers allocated once (NatslStaticCache); updated in place.

    `capacity` kept softmax tokens per (row, KV group). `kept_k` / `kept_v` hold capacity + C slots:
    the last C are scratch that a closing chunk which is not appended writes into (so every step of
    `reference.close_chunk` runs the same scatter); they are never counted in `kept_len`.
    """

    capacity: int  # kept tokens per (row, KV group), a multiple of C
    seen: torch.Tensor  # [B] long
    kept_k: torch.Tensor  # [B, Hkv, capacity + C, D]
    kept_v: torch.Tensor  # [B, Hkv, capacity + C, Dv]
    kept_len: torch.Tensor  # [B, Hkv] long, the valid prefix of kept_k / kept_v
    open_k: torch.Tensor  # [B, C, Hkv, D]
    open_v: torch.Tensor  # [B, C, Hkv, Dv]
    kept_chunks: torch.Tensor  # [B, Hkv] long, routable chunks closed softmax (the realised fraction)
    closed_chunks: torch.Tensor  # [B] long, routable chunks closed
    overflow_chunks: torch.Tensor  # [B, Hkv] long, softmax chunks sent to GDN because the kept KV was full
    gdn_k: torch.Tensor | None = None  # [B, C, Hkv, K]   as in NatslLayerState
    gdn_g: torch.Tensor | None = None  # [B, C, Hkv]
    gdn_beta: torch.Tensor | None = None  # [B, C, Hkv]
    gdn_state: torch.Tensor | None = None  # [B, Hkv, K, V] fp32 at the open chunk's start
    gdn_run: torch.Tensor | None = None  # [B, Hkv, K, V] fp32 with the open chunk written as linear
    gdn_decay: torch.Tensor | None = None  # [B, Hkv] fp32, sum of g since the open chunk's start
    conv_state: torch.Tensor | None = None  # [B, W-1, channels]
    router_sum: torch.Tensor | None = None  # [B, hidden] fp32

    @classmethod
    def allocate(cls, *, batch_size: int, capacity: int, chunk_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, natsl: bool, hidden_size: int = 0, conv_size: int = 0,
                 conv_channels: int = 0) -> "NatslStaticLayerState":
        B, C, H, D = batch_size, chunk_size, num_kv_heads, head_dim
        capacity = math.ceil(capacity / C) * C
        zeros = lambda *shape, dtype=dtype: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        long = torch.long
        state = cls(
            capacity=capacity, seen=zeros(B, dtype=long),
            kept_k=zeros(B, H, capacity + C, D), kept_v=zeros(B, H, capacity + C, D), kept_len=zeros(B, H, dtype=long),
            open_k=zeros(B, C, H, D), open_v=zeros(B, C, H, D),
            kept_chunks=zeros(B, H, dtype=long), closed_chunks=zeros(B, dtype=long),
            overflow_chunks=zeros(B, H, dtype=long),
        )
        if natsl:
            f32 = torch.float32
            state.gdn_k, state.gdn_g, state.gdn_beta = zeros(B, C, H, D, dtype=f32), zeros(B, C, H, dtype=f32), zeros(B, C, H, dtype=f32)
            state.gdn_state, state.gdn_run = zeros(B, H, D, D, dtype=f32), zeros(B, H, D, D, dtype=f32)
            state.gdn_decay = zeros(B, H, dtype=f32)
            state.conv_state = zeros(B, conv_size - 1, conv_channels)
            state.router_sum = zeros(B, hidden_size, dtype=f32)
        return state

    def buffers(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    @property
    def chunk_size(self) -> int:
        return self.open_k.shape[1]

    @property
    def kept_valid(self) -> torch.Tensor:
        """[B, Hkv, capacity + C] bool, as NatslLayerState.kept_valid."""
        slots = torch.arange(self.kept_k.shape[2], device=self.kept_k.device)
        return slots < self.kept_len[..., None]

    # --- one decode token (in place, no host sync) ---------------------------------------------
    def write_token_(self, k, v) -> None:
        """Write the new token's softmax KV (k, v [B, Hkv, *]) at its open-chunk slot. Its GDN inputs go in
        with `gdn_decode_step` (modeling.reference / modeling.kernels)."""
        slot = self.seen % self.chunk_size
        self.open_k.copy_(put_slot(self.open_k, slot, k))
        self.open_v.copy_(put_slot(self.open_v, slot, v))

    # --- multi-token calls: through a NatslLayerState (eager: may sync; traced: none) ----------
    def to_dynamic(self) -> NatslLayerState:
        """The same state as a `NatslLayerState` (kept KV trimmed to the longest (row, group); traced, where that
        length cannot be read, every slot, `kept_valid` marking the kept ones)."""
        L = self.kept_k.shape[2] if tracing() else int(self.kept_len.max())
        gdn = {}
        if self.gdn_state is not None:
            gdn = dict(gdn_k=self.gdn_k.clone(), gdn_g=self.gdn_g.clone(), gdn_beta=self.gdn_beta.clone(),
                       gdn_state=self.gdn_state.clone(), conv_state=self.conv_state.clone(),
                       router_sum=self.router_sum.clone())
        return NatslLayerState(
            seen=self.seen.clone(), kept_k=self.kept_k[:, :, :L].clone(), kept_v=self.kept_v[:, :, :L].clone(),
            kept_valid=self.kept_valid[:, :, :L], open_k=self.open_k.clone(), open_v=self.open_v.clone(), **gdn,
        )

    def load_(self, state: NatslLayerState, *, closed: torch.Tensor, kept_chunks: torch.Tensor,
              setting: str) -> None:
        """Copy a `NatslLayerState` into the buffers (after a multi-token call). `closed` [B] and
        `kept_chunks` [B, Hkv] add the call's routable and kept-softmax chunk counts. Raises when a
        row's kept KV is beyond the capacity, naming `setting`, the knob that sizes it."""
        kept_len = state.kept_len
        if tracing():  # no host branch: a runtime check of the exported program (torch.export), the same bound
            torch._check(kept_len.max().item() <= self.capacity)
        else:
            longest = int(kept_len.max()) if kept_len.numel() else 0
            if longest > self.capacity:
                raise ValueError(
                    f"The prompt keeps {longest} softmax tokens in one (row, KV group), more than this "
                    f"NatslStaticCache holds ({self.capacity}); raise `{setting}` when you create the cache."
                )
        L = state.kept_k.shape[2]
        keep = torch.sym_min(L, self.capacity)
        self.kept_k[:, :, :keep].copy_(state.kept_k[:, :, :keep])
        self.kept_v[:, :, :keep].copy_(state.kept_v[:, :, :keep])
        self.kept_len.copy_(kept_len)
        for name in ("seen", "open_k", "open_v"):
            getattr(self, name).copy_(getattr(state, name))
        self.kept_chunks.add_(kept_chunks)
        self.closed_chunks.add_(closed)
        if self.gdn_state is None:
            return
        for name in ("gdn_k", "gdn_g", "gdn_beta", "gdn_state", "conv_state", "router_sum"):
            getattr(self, name).copy_(getattr(state, name))
        # gdn_run / gdn_decay: the open chunk's tokens written one by one (padding slots: beta = g = 0)
        open_len = state.seen % self.chunk_size
        run, decay = state.gdn_state.float(), torch.zeros_like(self.gdn_decay)
        for s in range(self.chunk_size if tracing() else int(open_len.max())):  # traced: every slot (`live` masks)
            live = (s < open_len)[:, None].float()  # [B,1]
            g, beta = state.gdn_g[:, s] * live, state.gdn_beta[:, s] * live
            run = gdn_token_write(run, state.gdn_k[:, s], state.open_v[:, s], beta, g)
            decay = decay + g
        self.gdn_run.copy_(run)
        self.gdn_decay.copy_(decay)
