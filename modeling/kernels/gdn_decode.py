"""One decode step of the GDN branch against a NatslLayerState, in one launch.

Semantics: `reference.gdn_decode_step` (the same signature). Per row b and KV head h, one program:
  1. the short causal conv of the token's channels in this group (the G query heads of h and key
     head h) over the cached window, then SiLU and the L2 norm (fp32): q~ [G, K], k~ [K];
     the window slides by the token unless it is padding;
  2. the gates from the a_proj / b_proj outputs: beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias)
     (both 0 for padding), written with k~ at the open chunk's slot seen % C;
  3. the delta-rule write of the token into gdn_run [K, V]: S = e^g S, S += beta k~ (v - S^T k~)^T;
     gdn_decay += g;
  4. the readout of the chunk-start state: o_j = scale e^{gdn_decay} q~_j^T gdn_state, for the G heads.
Torch ran these as ~30 kernels per layer and token (profile in bench/results/model_bench_h200_decode.json:
872 kernels per token at 8k against the source's 351); the a_proj / b_proj matmuls stay outside, where
a LoRA adapter on them still applies.

Layout: the state's fields are contiguous runs of its packed buffers, which the kernel takes with the fields' offsets
(a compiled decode step then hands the kernel its graph inputs to write, not views of them: modeling/state.py
`BUFFER_OF`); q, k, v, a, b contiguous rows. fp32 maths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import _pow2


@triton.jit
def _gdn_decode_kernel(
    Q, K, V, A, BETA_IN, VALID, W, A_LOG, DT_BIAS, OPEN, GDN, COUNTERS, O,
    off_conv, off_gk, off_gg, off_gb, off_run, off_s0, off_decay, off_seen,
    scale, HQ, HKV, CH, C,
    G: tl.constexpr, BR: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    WIN: tl.constexpr, BW: tl.constexpr,
):
    """Every load first, then the maths, then every store: a load placed after a store waits for the values that
    store computes (the compiler cannot move it above a store to memory it may alias), so the per-channel
    "conv, then slide the window" steps of the earlier kernel were ~10 dependent trips to memory, ~16 us a call at
    batch 1 on an H100 (the second-largest NAtS-L kernel of the 8k decode step: bench/MODEL_BENCH_NOTES.md). The conv
    runs on one [BR, BD] tile of channels: rows 0..G-1 the group's q heads, row G its k head. The state's fields are
    where the layout puts them in its "open", "gdn" and "counters" buffers (NatslLayerState.buffer, layout.offset)."""
    CONV = OPEN + off_conv
    GK, GG, GB = GDN + off_gk, GDN + off_gg, GDN + off_gb
    RUN, S0, DECAY = GDN + off_run, GDN + off_s0, GDN + off_decay
    SEEN = COUNTERS + off_seen
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    bh = b * HKV + h
    od = tl.arange(0, BD)
    ov = tl.arange(0, BDV)
    r = tl.arange(0, BR)
    md, mv = od < D, ov < DV
    is_q = r < G
    ch = tl.where(is_q, (h * G + r) * D, HQ * D + h * D)[:, None] + od[None, :]  # [BR, BD] conv channels
    mc = (r <= G)[:, None] & md[None, :]

    # loads
    valid = tl.load(VALID + b).to(tl.int32) != 0
    a = tl.load(A + bh).to(tl.float32) + tl.load(DT_BIAS + h).to(tl.float32)
    a_log = tl.load(A_LOG + h).to(tl.float32)
    beta_in = tl.load(BETA_IN + bh).to(tl.float32)
    seen = tl.load(SEEN + b)
    decay = tl.load(DECAY + bh)
    xq = tl.load(Q + b * HQ * D + (h * G + r)[:, None] * D + od[None, :], mask=is_q[:, None] & md[None, :], other=0.0)
    xk = tl.load(K + b * HKV * D + h * D + od, mask=md, other=0.0)
    x = tl.where(is_q[:, None], xq, xk[None, :])  # [BR, BD] the token's channels
    w_last = tl.load(W + ch * WIN + (WIN - 1), mask=mc, other=0.0).to(tl.float32)
    sp = bh * D * DV + od[:, None] * DV + ov[None, :]
    ms = md[:, None] & mv[None, :]
    v = tl.load(V + bh * DV + ov, mask=mv, other=0.0).to(tl.float32)
    run = tl.load(RUN + sp, mask=ms, other=0.0)
    start = tl.load(S0 + sp, mask=ms, other=0.0)
    y = x.to(tl.float32) * w_last
    if WIN > 1:  # the cached window [BW, BR, BD]: slot w holds the token w - (WIN - 1) back
        wi = tl.arange(0, BW)
        m3 = (wi < WIN - 1)[:, None, None] & mc[None, :, :]
        window_at = CONV + (b * (WIN - 1) + wi)[:, None, None] * CH + ch[None, :, :]
        window = tl.load(window_at, mask=m3, other=0.0)
        taps = tl.load(W + ch[None, :, :] * WIN + wi[:, None, None], mask=m3, other=0.0).to(tl.float32)
        y += tl.sum(window.to(tl.float32) * taps, 0)

    # maths (fp32): conv -> SiLU -> L2 norm per channel row; gates (0 for padding); delta rule; readout factor
    y = y * tl.sigmoid(y)
    y = y * tl.rsqrt(tl.sum(y * y, 1) + 1e-6)[:, None]
    k = tl.sum(tl.where((r == G)[:, None], y, 0.0), 0)  # [BD] k~
    softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))  # torch's threshold
    g = tl.where(valid, -tl.exp(a_log) * softplus, 0.0)
    beta = tl.where(valid, tl.sigmoid(beta_in), 0.0)
    run = run * tl.exp(g)
    delta = v - tl.sum(k[:, None] * run, 0)
    run = run + (beta * k)[:, None] * delta[None, :]
    decay = decay + g
    factor = (tl.exp(decay) * scale).to(tl.float32)  # inductor may hand `scale` over as fp64

    # stores
    if WIN > 1:  # the window slides by the token where it is real (a block mask: stores take no scalar one)
        live = mc & ((tl.zeros([BR, BD], dtype=tl.int32) + valid.to(tl.int32)) != 0)
        tl.store(window_at - CH, window, mask=m3 & (wi >= 1)[:, None, None] & live[None, :, :])
        tl.store(CONV + (b * (WIN - 1) + WIN - 2) * CH + ch, x.to(CONV.dtype.element_ty), mask=live)
    slot = (b * C + seen % C) * HKV + h
    tl.store(GK + slot * D + od, k, mask=md)
    tl.store(GG + slot, g)
    tl.store(GB + slot, beta)
    tl.store(RUN + sp, run, mask=ms)
    tl.store(DECAY + bh, decay)
    for j in tl.static_range(G):  # the chunk-start state read out by the group's q heads
        q = tl.sum(tl.where((r == j)[:, None], y, 0.0), 0)
        tl.store(O + (b * HQ + h * G + j) * DV + ov, tl.sum(q[:, None] * start, 0) * factor, mask=mv)


def gdn_decode_step(q, k, v, a, b, valid, conv_weight, A_log, dt_bias, state, scale: float) -> torch.Tensor:
    """`reference.gdn_decode_step` in one Triton launch (see the module docstring). Inference only."""
    B, HKV = a.shape
    D = k.shape[1] // HKV
    HQ, DV = q.shape[1] // D, v.shape[-1]
    CH, WIN = conv_weight.shape[0], conv_weight.shape[-1]
    assert CH == (HQ + HKV) * D and state.gdn_run.shape == (B, HKV, D, DV) and HQ % HKV == 0
    o = torch.empty(B, HQ, DV, device=q.device, dtype=torch.float32)
    offset = state.layout.offset
    _gdn_decode_kernel[(B, HKV)](
        q.contiguous(), k.contiguous(), v.contiguous(), a.contiguous(), b.contiguous(), valid.contiguous(),
        conv_weight.contiguous(), A_log, dt_bias, state.buffer("open"), state.buffer("gdn"), state.buffer("counters"),
        o, *(offset(name) for name in ("conv_state", "gdn_k", "gdn_g", "gdn_beta", "gdn_run", "gdn_state",
                                       "gdn_decay", "seen")),
        scale, HQ, HKV, CH, state.chunk_size,
        G=HQ // HKV, BR=triton.next_power_of_2(HQ // HKV + 1), D=D, BD=_pow2(D), DV=DV, BDV=_pow2(DV), WIN=WIN,
        BW=triton.next_power_of_2(max(WIN - 1, 1)),
        num_warps=4 if _pow2(D) * _pow2(DV) <= 64 * 64 else 8,  # the [D, Dv] states and the window live at once
    )
    return o
