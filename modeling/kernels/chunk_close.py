"""The chunk close of a decode step (`reference.close_chunk`, the same signature), in one launch: the state's one close
transition (`NatslLayerState.close_chunks_`) for one chunk per row, with the decode close's room check (`fits`) fused in.

Per row b and KV head h, one program: when the token closed b's open chunk and h routed it softmax,
the chunk's C keys and values are appended to the kept KV if they fit (`kept_len`, the realised-fraction
and overflow counters follow); a NAtS-L layer's GDN state then becomes `gdn_run` (the chunk as linear: its
writes) or the decayed chunk-start state (softmax: no write), `gdn_run` restarts from it, the decay and
(program h = 0) the router's running sum restart at 0. Rows that close nothing are left as they are.
Torch ran this as ~15 kernels per layer and token, scatters and full-state selects included, at every
step; here a row that does not close reads four scalars.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import _pow2


@triton.jit
def _chunk_close_kernel(
    CLOSING, SOFTMAX, ROUTABLE, KEPT_K, KEPT_V, COUNTERS, OPEN, GDN,
    off_kept_len, off_kept_chunks, off_closed_chunks, off_overflow, off_open_k, off_open_v,
    off_s0, off_run, off_decay, off_router_sum,
    HKV, L, CAP, HIDDEN,
    C: tl.constexpr, BC: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    NATSL: tl.constexpr, BH: tl.constexpr,
):
    """The state's fields where the layout puts them in its "counters", "open" and "gdn" buffers
    (NatslLayerState.buffer, layout.offset; GDN and its offsets unused when not NATSL)."""
    KEPT_LEN, KEPT_CHUNKS = COUNTERS + off_kept_len, COUNTERS + off_kept_chunks
    CLOSED_CHUNKS, OVERFLOW = COUNTERS + off_closed_chunks, COUNTERS + off_overflow
    OPEN_K, OPEN_V = OPEN + off_open_k, OPEN + off_open_v
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    bh = b * HKV + h
    closing = tl.load(CLOSING + b).to(tl.int32) != 0
    soft = tl.load(SOFTMAX + bh).to(tl.int32) != 0
    counted = closing & (tl.load(ROUTABLE + b).to(tl.int32) != 0)
    kept = tl.load(KEPT_LEN + bh)
    fits = kept + C <= CAP
    append = closing & soft & fits
    if append:  # the open chunk's keys / values behind the kept ones
        oc, od, ov = tl.arange(0, BC), tl.arange(0, BD), tl.arange(0, BDV)
        mk = (oc[:, None] < C) & (od[None, :] < D)
        mv = (oc[:, None] < C) & (ov[None, :] < DV)
        k = tl.load(OPEN_K + ((b * C + oc[:, None]) * HKV + h) * D + od[None, :], mask=mk, other=0.0)
        tl.store(KEPT_K + (bh * L + kept + oc[:, None]) * D + od[None, :], k, mask=mk)
        v = tl.load(OPEN_V + ((b * C + oc[:, None]) * HKV + h) * DV + ov[None, :], mask=mv, other=0.0)
        tl.store(KEPT_V + (bh * L + kept + oc[:, None]) * DV + ov[None, :], v, mask=mv)
        tl.store(KEPT_LEN + bh, kept + C)
    tl.store(KEPT_CHUNKS + bh, tl.load(KEPT_CHUNKS + bh) + (counted & append).to(tl.int64))
    tl.store(OVERFLOW + bh, tl.load(OVERFLOW + bh) + (closing & soft & (kept + C > CAP)).to(tl.int64))
    if h == 0:
        tl.store(CLOSED_CHUNKS + b, tl.load(CLOSED_CHUNKS + b) + counted.to(tl.int64))
    if NATSL:
        S0, RUN, DECAY, ROUTER_SUM = GDN + off_s0, GDN + off_run, GDN + off_decay, GDN + off_router_sum
        if closing:
            ok, ov = tl.arange(0, BD), tl.arange(0, BDV)
            sp = bh * D * DV + ok[:, None] * DV + ov[None, :]
            ms = (ok[:, None] < D) & (ov[None, :] < DV)
            if append:  # softmax: the chunk wrote nothing, the state only decays
                start = tl.load(S0 + sp, mask=ms, other=0.0) * tl.exp(tl.load(DECAY + bh))
            else:  # linear (or a softmax chunk that did not fit): its writes become the state
                start = tl.load(RUN + sp, mask=ms, other=0.0)
            tl.store(S0 + sp, start, mask=ms)
            tl.store(RUN + sp, start, mask=ms)
            tl.store(DECAY + bh, 0.0)
            if h == 0:
                for i in range(0, HIDDEN, BH):
                    oh = i + tl.arange(0, BH)
                    tl.store(ROUTER_SUM + b * HIDDEN + oh, tl.zeros([BH], dtype=tl.float32), mask=oh < HIDDEN)


def close_chunk(state, closing: torch.Tensor, softmax: torch.Tensor, routable: torch.Tensor) -> None:
    """`reference.close_chunk` in one Triton launch (see the module docstring). Inference only."""
    B, HKV, L, D = state.kept_k.shape
    C, DV = state.chunk_size, state.kept_v.shape[-1]
    natsl = state.gdn_state is not None
    if not (state.kept_k.is_contiguous() and state.kept_v.is_contiguous()):
        raise ValueError("close_chunk appends to the kept KV in place: kept_k / kept_v must be contiguous "
                         "(as NatslLayerState.allocate makes them).")
    offset = state.layout.offset
    gdn_fields = ("gdn_state", "gdn_run", "gdn_decay", "router_sum")
    _chunk_close_kernel[(B, HKV)](
        closing.contiguous(), softmax.contiguous(), routable.contiguous(), state.kept_k, state.kept_v,
        state.buffer("counters"), state.buffer("open"), state.buffer("gdn"),  # no "gdn" buffer in a full-softmax layer
        *(offset(name) for name in ("kept_len", "kept_chunks", "closed_chunks", "overflow_chunks", "open_k", "open_v")),
        *(offset(name) if natsl else 0 for name in gdn_fields),
        HKV, L, state.capacity, state.router_sum.shape[-1] if natsl else 0,
        C=C, BC=_pow2(C), D=D, BD=_pow2(D), DV=DV, BDV=_pow2(DV), NATSL=natsl, BH=1024, num_warps=4,
    )
