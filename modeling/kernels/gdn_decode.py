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

Layout: every tensor as the state allocates it (contiguous); q, k, v, a, b contiguous rows. fp32 maths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import _pow2


@triton.jit
def _conv_silu_l2(CONV, W, b, c, m, x, live, CH, WIN: tl.constexpr):
    """Channels c (mask m) of row b: the causal conv over [window, x], SiLU, L2 norm (fp32); slides the
    window by x where the token is real (`live`, a block mask)."""
    y = x.to(tl.float32) * tl.load(W + c * WIN + (WIN - 1), mask=m, other=0.0).to(tl.float32)
    for w in tl.static_range(WIN - 1):
        cached = tl.load(CONV + (b * (WIN - 1) + w) * CH + c, mask=m, other=0.0).to(tl.float32)
        y += cached * tl.load(W + c * WIN + w, mask=m, other=0.0).to(tl.float32)
    if WIN > 1:
        for w in tl.static_range(WIN - 2):
            later = tl.load(CONV + (b * (WIN - 1) + w + 1) * CH + c, mask=m, other=0.0)
            tl.store(CONV + (b * (WIN - 1) + w) * CH + c, later, mask=m & live)
        tl.store(CONV + (b * (WIN - 1) + WIN - 2) * CH + c, x.to(CONV.dtype.element_ty), mask=m & live)
    y = y * tl.sigmoid(y)
    return y * tl.rsqrt(tl.sum(y * y, 0) + 1e-6)


@triton.jit
def _gdn_decode_kernel(
    Q, K, V, A, BETA_IN, VALID, W, A_LOG, DT_BIAS, CONV, GK, GG, GB, RUN, S0, DECAY, SEEN, O,
    scale, HQ, HKV, CH, C,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, WIN: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    bh = b * HKV + h
    od = tl.arange(0, BD)
    ov = tl.arange(0, BDV)
    md, mv = od < D, ov < DV
    real = tl.load(VALID + b).to(tl.int32)
    valid = real != 0
    live = (tl.zeros([BD], dtype=tl.int32) + real) != 0  # the same as a block mask (stores want a block)

    # gates (0 for padding: the state is left as it is)
    a = tl.load(A + bh).to(tl.float32) + tl.load(DT_BIAS + h).to(tl.float32)
    softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))  # torch's threshold
    g = tl.where(valid, -tl.exp(tl.load(A_LOG + h).to(tl.float32)) * softplus, 0.0)
    beta = tl.where(valid, tl.sigmoid(tl.load(BETA_IN + bh).to(tl.float32)), 0.0)

    # key: conv, then the open chunk's slot
    kc = HQ * D + h * D + od
    k = _conv_silu_l2(CONV, W, b, kc, md, tl.load(K + b * HKV * D + h * D + od, mask=md, other=0.0), live, CH, WIN)
    slot = (b * C + tl.load(SEEN + b) % C) * HKV + h
    tl.store(GK + slot * D + od, k, mask=md)
    tl.store(GG + slot, g)
    tl.store(GB + slot, beta)

    # the token's delta-rule write into gdn_run
    sp = bh * D * DV + od[:, None] * DV + ov[None, :]
    ms = md[:, None] & mv[None, :]
    v = tl.load(V + bh * DV + ov, mask=mv, other=0.0).to(tl.float32)
    run = tl.load(RUN + sp, mask=ms, other=0.0) * tl.exp(g)
    delta = v - tl.sum(k[:, None] * run, 0)
    tl.store(RUN + sp, run + (beta * k)[:, None] * delta[None, :], mask=ms)
    decay = tl.load(DECAY + bh) + g
    tl.store(DECAY + bh, decay)

    # readout of the chunk-start state for the G query heads of this group
    start = tl.load(S0 + sp, mask=ms, other=0.0)
    factor = (tl.exp(decay) * scale).to(tl.float32)  # inductor may hand `scale` over as fp64
    for j in tl.static_range(G):
        qc = (h * G + j) * D + od
        q = _conv_silu_l2(CONV, W, b, qc, md, tl.load(Q + b * HQ * D + qc, mask=md, other=0.0), live, CH, WIN)
        o = tl.sum(q[:, None] * start, 0) * factor
        tl.store(O + (b * HQ + h * G + j) * DV + ov, o, mask=mv)


def gdn_decode_step(q, k, v, a, b, valid, conv_weight, A_log, dt_bias, state, scale: float) -> torch.Tensor:
    """`reference.gdn_decode_step` in one Triton launch (see the module docstring). Inference only."""
    B, HKV = a.shape
    D = k.shape[1] // HKV
    HQ, DV = q.shape[1] // D, v.shape[-1]
    CH, WIN = conv_weight.shape[0], conv_weight.shape[-1]
    buffers = (state.conv_state, state.gdn_k, state.gdn_g, state.gdn_beta, state.gdn_run, state.gdn_state,
               state.gdn_decay, state.seen)
    if not all(t.is_contiguous() for t in buffers):
        raise ValueError("gdn_decode_step updates the NatslLayerState buffers in place: they must be contiguous "
                         "(as NatslLayerState.allocate makes them).")
    assert CH == (HQ + HKV) * D and state.gdn_run.shape == (B, HKV, D, DV) and HQ % HKV == 0
    o = torch.empty(B, HQ, DV, device=q.device, dtype=torch.float32)
    _gdn_decode_kernel[(B, HKV)](
        q.contiguous(), k.contiguous(), v.contiguous(), a.contiguous(), b.contiguous(), valid.contiguous(),
        conv_weight.contiguous(), A_log, dt_bias, state.conv_state, state.gdn_k, state.gdn_g, state.gdn_beta,
        state.gdn_run, state.gdn_state, state.gdn_decay, state.seen, o,
        scale, HQ, HKV, CH, state.chunk_size,
        G=HQ // HKV, D=D, BD=_pow2(D), DV=DV, BDV=_pow2(DV), WIN=WIN, num_warps=4,
    )
    return o
