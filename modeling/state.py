"""Per-layer decode state of a NAtS-L layer (SPEC.md section 4), plain tensors, no transformers.

What a layer keeps between calls, per batch row:
- the KV of complete softmax chunks, compacted per KV group (`kept_*`);
- the still-open chunk's tokens: RoPE'd k, v (softmax branch) and GDN key, gate g, raw beta
  (written into the GDN state only if the chunk closes as linear);
- the GDN state at the open chunk's start, the GDN short-conv state and the router's running
  sum of the open chunk's hidden states;
- `seen`: real (non-padding) tokens seen, which fixes positions and chunk boundaries per row.
Full-softmax layers keep only the KV fields (every chunk is softmax there).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


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
    def kept_tokens(self) -> torch.Tensor:
        """[B, Hkv] number of kept softmax KV tokens per row and group (open chunk excluded)."""
        return self.kept_valid.sum(-1)

    def open_len(self, chunk_size: int) -> torch.Tensor:
        return self.seen % chunk_size


def append_kept(state: NatslLayerState | None, k, v, keep, batch_shape):
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
        old_len, old_k, old_v = state.kept_tokens, state.kept_k, state.kept_v
    add = keep.sum(-1)
    if int(add.max()) == 0 and state is not None:
        return state.kept_k, state.kept_v, state.kept_valid
    new_len = old_len + add
    cap = max(int(new_len.max()), old_k.shape[2])
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
