"""NatslSoftmaxAttention: a layer kept full softmax (outside config.natsl_layers), the source's attention.

hidden x [B, T, D] -> q, k, v with the source's projections (biases, q/k norms, GQA layout kept) -> RoPE
  -> causal softmax attention over every earlier real token -> o_proj

No router and no GDN branch: every chunk stays softmax. Its cache layer holds the same NatslLayerState as a NAtS-L
layer's, without the GDN fields (the KV fields and counters): every closed chunk joins the kept KV, none is
routable, so the counters stay at zero. Its calls report a `LayerRouting` of no routed chunk (`Routes.none`).
The three paths are NatslAttention's (`SourceAttention.forward`), with every chunk softmax:
- `_dense` (whole unpadded sequences, no cache): causal SDPA, compiled on CUDA;
- `_segment` (padding, a cache, packed documents): SDPA where whole sequences allow it, else the reference's
  softmax branch with every key softmax;
- `_decode` (one token against a cache): the decode attention and chunk close of either cache's step.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import reference
from .layer import LayerRouting, Projected, SourceAttention, apply_rope, natsl_compile, run_compiled
from .router import Routes
from .state import NatslLayerState


@functools.cache
def compiled_dense():
    """`NatslSoftmaxAttention._dense` through torch.compile, made once per process and shared by every full-softmax
    layer (as `modeling.layer.compiled_dense` is by the NAtS-L layers)."""
    return natsl_compile(NatslSoftmaxAttention._dense)


class NatslSoftmaxAttention(SourceAttention):
    """The source's attention (module docstring): the parameters of `SourceAttention` only."""

    def branch_backend(self, x: torch.Tensor, state, token_mask) -> str:
        """"sdpa" (torch's SDPA, any device) for whole unpadded sequences with no cache prefix, else "reference"
        (see `NatslAttention.branch_backend`)."""
        return "sdpa" if self._whole_sequences(state, token_mask) else "reference"

    def _causal_sdpa(self, q, k, v) -> torch.Tensor:
        """Causal attention over every key: q [B,n,Hq,D], k / v [B,n,Hkv,*] -> [B,n,Hq,Dv] (GQA without repeat)."""
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scaling, enable_gqa=True,
        ).transpose(1, 2)

    def _run_dense(self, x, cos, sin):
        return run_compiled(self, NatslSoftmaxAttention._dense, compiled_dense, x, cos, sin)

    def _dense(self, x, cos, sin):
        """Whole unpadded sequences from their start, no cache: x [B, n, D]; cos, sin [B, n, head_dim]
        -> (out [B, n, D], LayerRouting of no routed chunk)."""
        q, k, v = self._project(x)  # [B,n,Hq,Dh], [B,n,Hkv,Dh], [B,n,Hkv,Dh]
        o = self._causal_sdpa(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)  # [B,n,Hq,Dh]
        return self._output(o, x), LayerRouting.of("sdpa", Routes.none(x.shape[0], self.num_kv_heads, x.device))

    def _segment(self, p: Projected, token_mask, state: NatslLayerState | None, cache, right_padded: bool = False):
        """The general path (as `NatslAttention._segment`, every chunk softmax): the cached open chunk's tokens + the
        n new tokens attend causally over the kept KV and themselves; every chunk the call completes joins the kept
        KV. `right_padded`: padding only after each row's tokens (packed documents), which SDPA serves exactly."""
        C, H = self.chunk_size, self.num_kv_heads
        seg = self._segment_tokens(p, token_mask, state)  # keys [B, S, Hkv, *]
        backend = self.branch_backend(p.x, state, None if right_padded else token_mask)
        if backend == "sdpa":
            o = self._causal_sdpa(p.q_rot, seg.k, seg.v)
        else:  # every key softmax, weight 1
            softmax = torch.ones(*seg.k_pos.shape, H, dtype=torch.bool, device=p.x.device)  # [B,S,Hkv]
            prefix = None if state is None else state.kept()
            o = reference.softmax_branch(p.q_rot, seg.k, seg.v, seg.q_pos, seg.k_pos, softmax, softmax.float(), C,
                                         self.scaling, prefix)
        out = self._output(o, p.x, None if token_mask is None else seg.valid)  # [B, n, D]
        routes = Routes.none(p.x.shape[0], H, p.x.device)
        if cache is not None:  # every key of a chunk the call closes is kept: the chunks before the one left open
            chunk = torch.div(seg.k_pos, C, rounding_mode="floor")
            closed = (seg.k_pos >= 0) & (chunk < seg.open_chunk(C)[:, None])  # [B,S]
            self._write_segment(cache, seg, closed[..., None].expand(-1, -1, H), routes)
        return out, LayerRouting.of(backend, routes)

    def _decode(self, p: Projected, token_mask, cache):
        """One token per row against the cache layer's state, in place (as `NatslAttention._decode`, every chunk
        softmax): the token joins the open chunk and attends over the kept KV and the open chunk; a row whose
        chunk it completes appends that chunk to the kept KV (not routable: the counters stay at zero)."""
        B = p.x.shape[0]
        valid = self._real_token(p.x, token_mask)  # [B]
        cache.reserve_chunk()
        state = cache.state
        ops = self._decode_ops(p.x)[1]
        out = self._output(self._decode_softmax(ops, p, valid, cache), p.x)
        softmax = torch.ones(B, self.num_kv_heads, dtype=torch.bool, device=p.x.device)
        ops.close_chunk(state, self._closing(state, valid), softmax, torch.zeros_like(valid))
        state.seen.add_(valid.long())
        return out, self.decode_routing(p.x)
