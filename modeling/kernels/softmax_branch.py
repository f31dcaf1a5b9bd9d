"""Routed (chunk-sparse) causal softmax attention: Triton forward + backward.

Semantics (SPEC section 3, `reference.routed_softmax_attention`): query i of chunk ci sees the
keys j <= i of its own chunk and every key of an earlier chunk cj whose route weight
`route_weight[b, cj, g]` is 1 (g = the query head's KV group). Route weights are exactly 0/1;
the earlier-chunk keys are weighted by w (=1), so the forward never multiplies by it, and
d w[b, c, g] = sum of dS = P * (dP - rowsum(dO * O)) over the (query, key) pairs of queries in
later chunks (all q heads of the group) and keys of chunk c. Chunks routed linear are never
visited (d w = 0 there).

Work layout
* Key blocks are whole chunks (BLOCK_N = C). For each (b, g) a compacted, ascending list of the
  softmax chunk indices is built on the device (no host sync); a query chunk ci visits the first
  `cnt[ci]` entries (the softmax chunks < ci) and then its own (diagonal, causal-masked) chunk.
* Forward / dQ: one program per (query chunk, HPP q heads of one group); rows are
  (head, token) pairs, so K/V tiles are loaded once for HPP heads (GQA without repeat). The
  forward takes the K/V chunk tiles through TMA tensor descriptors (`_chunk_descriptors`), one
  chunk per step, no masks on the earlier chunks (all complete): 8.0 ms instead of 11.2 at 64k,
  p = 0.125 on the H200. dQ gathers two chunks per step through pointers: with one TMA chunk
  per step it took 15.8 ms instead of 13.1 (bench/KERNELS_NOTES.md).
* dK / dV / d route: one program per (key chunk, kv head); it loops over the q heads of the group
  and over the diagonal query chunk plus, if the chunk is routed softmax, every later query
  chunk. No atomics. Programs are ordered longest first.
Accumulation is fp32; P and dS are cast to the input dtype for the tensor-core dots (as in
FlashAttention).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


@triton.jit
def _fwd_kernel(
    Q, KD, VD, O, LSE, LIST, CNT,
    sqb, sqt, sqh, sob, sot, soh,
    T, NC, HQ, HKV, qk_scale,
    GROUP: tl.constexpr, HPP: tl.constexpr, C: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    ci = NC - 1 - tl.program_id(1)
    pid1 = tl.program_id(0)
    NHB = HQ // HPP
    b = pid1 // NHB  # int32: TMA row coordinates (b * T + t)
    b64 = b.to(tl.int64)  # pointer offsets: b * (row stride) passes 2**31 once B * T * Hq * D does
    hq0 = (pid1 % NHB) * HPP
    g = hq0 // GROUP
    BM: tl.constexpr = HPP * C

    r = tl.arange(0, BM)
    hh = r // C
    tq = ci * C + (r % C)
    mq = tq < T
    od = tl.arange(0, BD)
    odv = tl.arange(0, BDV)
    q = tl.load(Q + b64 * sqb + tq[:, None] * sqt + (hq0 + hh)[:, None] * sqh + od[None, :],
                mask=mq[:, None] & (od[None, :] < D), other=0.0)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    oc = tl.arange(0, C)
    lbase = LIST + (b * HKV + g) * NC
    cnt = tl.load(CNT + (b * HKV + g) * NC + ci)
    for n in range(0, cnt):  # earlier softmax chunks: complete, so no masks
        row = b * T + tl.load(lbase + n) * C
        k = KD.load([row, g * D])  # [C, BD]
        vv = VD.load([row, g * DV])  # [C, BDV]
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
        m_i = m_new
    # diagonal chunk (rows past T, if any, are masked)
    tk = ci * C + oc
    mk = tk < T
    k = KD.load([b * T + ci * C, g * D])
    vv = VD.load([b * T + ci * C, g * DV])
    s = tl.dot(q, tl.trans(k)) * qk_scale
    vis = (tk[None, :] <= tq[:, None]) & mk[None, :]
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
    m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(O + b64 * sob + tq[:, None] * sot + (hq0 + hh)[:, None] * soh + odv[None, :],
             acc.to(O.dtype.element_ty), mask=mq[:, None] & (odv[None, :] < DV))
    tl.store(LSE + (b64 * HQ + hq0 + hh) * T + tq, m_i + tl.log2(l_i), mask=mq)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, LIST, CNT, O,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sob, sot, soh,
    T, NC, HQ, HKV, qk_scale, sm_scale,
    GROUP: tl.constexpr, HPP: tl.constexpr, C: tl.constexpr, KPB: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    BN: tl.constexpr = KPB * C
    ci = NC - 1 - tl.program_id(1)
    pid1 = tl.program_id(0)
    NHB = HQ // HPP
    b = (pid1 // NHB).to(tl.int64)  # b * (row stride) can pass 2**31
    hq0 = (pid1 % NHB) * HPP
    g = hq0 // GROUP
    BM: tl.constexpr = HPP * C

    r = tl.arange(0, BM)
    hh = r // C
    tq = ci * C + (r % C)
    mq = tq < T
    od = tl.arange(0, BD)
    odv = tl.arange(0, BDV)
    q = tl.load(Q + b * sqb + tq[:, None] * sqt + (hq0 + hh)[:, None] * sqh + od[None, :],
                mask=mq[:, None] & (od[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdob + tq[:, None] * sdot + (hq0 + hh)[:, None] * sdoh + odv[None, :],
                 mask=mq[:, None] & (odv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + (b * HQ + hq0 + hh) * T + tq, mask=mq, other=0.0)
    o = tl.load(O + b * sob + tq[:, None] * sot + (hq0 + hh)[:, None] * soh + odv[None, :],
                mask=mq[:, None] & (odv[None, :] < DV), other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + (b * HQ + hq0 + hh) * T + tq, delta, mask=mq)

    dq = tl.zeros([BM, BD], tl.float32)
    oc = tl.arange(0, C)
    kbase = K + b * skb + g * skh
    vbase = V + b * svb + g * svh
    lbase = LIST + (b * HKV + g) * NC
    cnt = tl.load(CNT + (b * HKV + g) * NC + ci)
    ob = tl.arange(0, BN)
    for n in range(0, cnt, KPB):
        slot = n + ob // C
        ms = slot < cnt
        cj = tl.load(lbase + slot, mask=ms, other=0)
        tk = cj * C + (ob % C)
        k = tl.load(kbase + tk[:, None] * skt + od[None, :], mask=ms[:, None] & (od[None, :] < D), other=0.0)
        vv = tl.load(vbase + tk[:, None] * svt + odv[None, :], mask=ms[:, None] & (odv[None, :] < DV), other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(ms[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vv))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tk = ci * C + oc
    mk = tk < T
    k = tl.load(kbase + tk[:, None] * skt + od[None, :], mask=mk[:, None] & (od[None, :] < D), other=0.0)
    vv = tl.load(vbase + tk[:, None] * svt + odv[None, :], mask=mk[:, None] & (odv[None, :] < DV), other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    vis = (tk[None, :] <= tq[:, None]) & mk[None, :]
    p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(vv))
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * sm_scale
    tl.store(DQ + b * sqb + tq[:, None] * sqt + (hq0 + hh)[:, None] * sqh + od[None, :],
             dq.to(DQ.dtype.element_ty), mask=mq[:, None] & (od[None, :] < D))


@triton.jit
def _bwd_dkv_kernel(
    Q, K, V, DO, DK, DV_, DW, RW, LSE, DELTA,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
    srb, src, srh, ORDER,
    T, NC, HQ, HKV, qk_scale, sm_scale,
    GROUP: tl.constexpr, HPP: tl.constexpr, C: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    SKIP_ROUTED: tl.constexpr,
):
    item = tl.load(ORDER + tl.program_id(0))  # = (b * HKV + g) * NC + cj, longest work first
    cj = item % NC
    b = (item // (HKV * NC)).to(tl.int64)  # b * (row stride) can pass 2**31
    g = (item // NC) % HKV
    oc = tl.arange(0, C)
    od = tl.arange(0, BD)
    odv = tl.arange(0, BDV)
    routed = tl.load(RW + b * srb + cj * src + g * srh) > 0.5
    if routed.to(tl.int32) * SKIP_ROUTED == 0:
        tk = cj * C + oc
        mk = tk < T
        k = tl.load(K + b * skb + g * skh + tk[:, None] * skt + od[None, :],
                    mask=mk[:, None] & (od[None, :] < D), other=0.0)
        vv = tl.load(V + b * svb + g * svh + tk[:, None] * svt + odv[None, :],
                     mask=mk[:, None] & (odv[None, :] < DV), other=0.0)
        dk = tl.zeros([C, BD], tl.float32)
        dv = tl.zeros([C, BDV], tl.float32)
        dw = tl.zeros([C], tl.float32)
        c_end = cj + 1
        if routed:
            c_end = NC
        BM: tl.constexpr = HPP * C
        r = tl.arange(0, BM)
        rh = r // C
        for h0 in range(0, GROUP, HPP):
            hq = g * GROUP + h0 + rh
            for ci in range(cj, c_end):
                tq = ci * C + (r % C)
                mq = tq < T
                q = tl.load(Q + b * sqb + tq[:, None] * sqt + hq[:, None] * sqh + od[None, :],
                            mask=mq[:, None] & (od[None, :] < D), other=0.0)
                do = tl.load(DO + b * sdob + tq[:, None] * sdot + hq[:, None] * sdoh + odv[None, :],
                             mask=mq[:, None] & (odv[None, :] < DV), other=0.0)
                lse = tl.load(LSE + (b * HQ + hq) * T + tq, mask=mq, other=0.0)
                delta = tl.load(DELTA + (b * HQ + hq) * T + tq, mask=mq, other=0.0)
                sT = tl.dot(k, tl.trans(q)) * qk_scale  # [C keys, BM query rows]
                vis = mq[None, :] & mk[:, None]
                if ci == cj:
                    vis = vis & (tq[None, :] >= tk[:, None])
                pT = tl.where(vis, tl.exp2(sT - lse[None, :]), 0.0)
                dv += tl.dot(pT.to(do.dtype), do)
                dpT = tl.dot(vv, tl.trans(do))
                dsT = pT * (dpT - delta[None, :])
                dk += tl.dot(dsT.to(q.dtype), q)
                if ci != cj:
                    dw += tl.sum(dsT, 1)
        dk = dk * sm_scale
        tl.store(DK + b * skb + g * skh + tk[:, None] * skt + od[None, :], dk.to(DK.dtype.element_ty),
                 mask=mk[:, None] & (od[None, :] < D))
        tl.store(DV_ + b * svb + g * svh + tk[:, None] * svt + odv[None, :], dv.to(DV_.dtype.element_ty),
                 mask=mk[:, None] & (odv[None, :] < DV))
        tl.store(DW + (b * NC + cj) * HKV + g, tl.sum(dw, 0))


@triton.jit
def _bwd_dkv_pair_kernel(
    Q, K, V, DO, DK, DV_, DW, LSE, DELTA, LIST, TOT,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
    T, NC, HQ, HKV, BHKV, qk_scale, sm_scale,
    GROUP: tl.constexpr, C: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """dK/dV/d route of softmax-routed chunks, two consecutive entries of the compacted list per
    program (128-key tile for C=64): their diagonal blocks and every later query chunk."""
    pid = tl.program_id(0)
    n = pid // BHKV  # pair index: small n = early chunks = most work, scheduled first
    bg = pid % BHKV
    b = (bg // HKV).to(tl.int64)  # b * (row stride) can pass 2**31
    g = bg % HKV
    tot = tl.load(TOT + bg)
    if 2 * n < tot:
        BN: tl.constexpr = 2 * C
        ob = tl.arange(0, BN)
        slot = 2 * n + ob // C
        ms = slot < tot
        cj = tl.load(LIST + bg * NC + slot, mask=ms, other=0)
        tk = cj * C + (ob % C)
        mk = ms & (tk < T)
        c0 = tl.load(LIST + bg * NC + 2 * n)
        od = tl.arange(0, BD)
        odv = tl.arange(0, BDV)
        oc = tl.arange(0, C)
        k = tl.load(K + b * skb + g * skh + tk[:, None] * skt + od[None, :],
                    mask=mk[:, None] & (od[None, :] < D), other=0.0)
        vv = tl.load(V + b * svb + g * svh + tk[:, None] * svt + odv[None, :],
                     mask=mk[:, None] & (odv[None, :] < DV), other=0.0)
        dk = tl.zeros([BN, BD], tl.float32)
        dv = tl.zeros([BN, BDV], tl.float32)
        dw = tl.zeros([BN], tl.float32)
        for h in range(0, GROUP):
            hq = g * GROUP + h
            for ci in range(c0, NC):
                tq = ci * C + oc
                mq = tq < T
                q = tl.load(Q + b * sqb + tq[:, None] * sqt + hq * sqh + od[None, :],
                            mask=mq[:, None] & (od[None, :] < D), other=0.0)
                do = tl.load(DO + b * sdob + tq[:, None] * sdot + hq * sdoh + odv[None, :],
                             mask=mq[:, None] & (odv[None, :] < DV), other=0.0)
                lse = tl.load(LSE + (b * HQ + hq) * T + tq, mask=mq, other=0.0)
                delta = tl.load(DELTA + (b * HQ + hq) * T + tq, mask=mq, other=0.0)
                sT = tl.dot(k, tl.trans(q)) * qk_scale  # [BN keys, C queries]
                later = ci > cj
                vis = mk[:, None] & mq[None, :] & (later[:, None] | ((ci == cj)[:, None] & (tq[None, :] >= tk[:, None])))
                pT = tl.where(vis, tl.exp2(sT - lse[None, :]), 0.0)
                dv += tl.dot(pT.to(do.dtype), do)
                dpT = tl.dot(vv, tl.trans(do))
                dsT = pT * (dpT - delta[None, :])
                dk += tl.dot(dsT.to(q.dtype), q)
                dw += tl.sum(tl.where(later[:, None], dsT, 0.0), 1)
        dk = dk * sm_scale
        tl.store(DK + b * skb + g * skh + tk[:, None] * skt + od[None, :], dk.to(DK.dtype.element_ty),
                 mask=mk[:, None] & (od[None, :] < D))
        tl.store(DV_ + b * svb + g * svh + tk[:, None] * svt + odv[None, :], dv.to(DV_.dtype.element_ty),
                 mask=mk[:, None] & (odv[None, :] < DV))
        dw0 = tl.sum(tl.where(ob < C, dw, 0.0), 0)
        dw1 = tl.sum(tl.where(ob >= C, dw, 0.0), 0)
        tl.store(DW + (b * NC + c0) * HKV + g, dw0)
        if 2 * n + 1 < tot:
            c1 = tl.load(LIST + bg * NC + 2 * n + 1)
            tl.store(DW + (b * NC + c1) * HKV + g, dw1)


def _route_lists(route_weight: torch.Tensor):
    """route_weight [B, NC, Hkv] -> LIST [B, Hkv, NC] int32 (softmax chunk ids ascending first),
    CNT [B, Hkv, NC] int32 (number of softmax chunks strictly before each chunk)."""
    B, NC, H = route_weight.shape
    hard = (route_weight.detach() > 0.5).transpose(1, 2)  # [B,H,NC]
    idx = torch.arange(NC, device=route_weight.device, dtype=torch.int32)
    key = torch.where(hard, idx, idx + NC)
    lst = torch.sort(key, dim=-1).values
    lst = torch.where(lst >= NC, lst - NC, lst).to(torch.int32).contiguous()
    cnt = (torch.cumsum(hard.to(torch.int32), -1) - hard.to(torch.int32)).to(torch.int32).contiguous()
    return lst, cnt


def _hpp(group: int, chunk: int) -> int:
    # rows per forward program = HPP * C; aim for 128 rows
    hpp = max(1, 128 // chunk)
    while group % hpp:
        hpp //= 2
    return max(1, hpp)


def _chunk_descriptors(k: torch.Tensor, v: torch.Tensor, chunk: int):
    """TMA descriptors of one chunk of one KV head: k [B, T, Hkv, D] (contiguous) viewed as rows
    [B * T, Hkv * D], block [C, pow2(D)] (v alike). Columns past D (a head dim that is not a power of
    2) read the next head or zeros: they meet zero q columns / unstored output columns. Rows past a
    sequence's end are masked in the kernels. Before Hopper, triton lowers them to plain loads."""
    B, T, HKV, D = k.shape
    DV = v.shape[-1]
    if (HKV * D * k.element_size()) % 16 or (HKV * DV * v.element_size()) % 16:
        raise ValueError(
            f"The softmax-branch kernels need rows of Hkv * head_dim * {k.element_size()} bytes to be a multiple "
            f"of 16 (Hkv={HKV}, head_dim={D}, v head_dim={DV}); run this model with config.use_kernels=False."
        )
    kd = TensorDescriptor.from_tensor(k.view(B * T, HKV * D), [chunk, _pow2(D)])
    vd = TensorDescriptor.from_tensor(v.view(B * T, HKV * DV), [chunk, _pow2(DV)])
    return kd, vd


# (num_warps, num_stages) per kernel on CUDA; the interpreter ignores them.
# From the sweep in bench/results/kernels_bench_h200_v3.json (T=32k, p=0.125).
CFG = {"fwd": (8, 2), "dq": (8, 2), "dkv": (4, 1)}
KPB = 2  # chunks per key block in the dQ loop (BLOCK_N = 2 C): pointer gathers; one TMA chunk per step was slower there
DKV_HPP = 1  # q heads per query tile in the dK/dV kernel (None: as the forward)
DKV_MODE = "chunk"  # "chunk": one program per key chunk; "pair": 2 softmax chunks per program
CFG_PAIR = (8, 1)


def _interp() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class RoutedSoftmaxAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, route_weight, chunk_size, scale):
        B, T, HQ, D = q.shape
        HKV, DV = k.shape[2], v.shape[3]
        C = int(chunk_size)
        assert HQ % HKV == 0 and C >= 16 and (C & (C - 1)) == 0, "chunk_size must be a power of 2 >= 16"
        NC = triton.cdiv(T, C)
        assert route_weight.shape == (B, NC, HKV)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        group = HQ // HKV
        hpp = _hpp(group, C)
        lst, cnt = _route_lists(route_weight)
        o = torch.empty(B, T, HQ, DV, device=q.device, dtype=q.dtype)
        lse = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
        BD, BDV = _pow2(D), _pow2(DV)
        kd, vd = _chunk_descriptors(k, v, C)
        _fwd_kernel[(B * HQ // hpp, NC)](
            q, kd, vd, o, lse, lst, cnt,
            q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2),
            T, NC, HQ, HKV, scale * LOG2E,
            GROUP=group, HPP=hpp, C=C, D=D, DV=DV, BD=BD, BDV=BDV, num_warps=CFG["fwd"][0], num_stages=CFG["fwd"][1],
        )
        ctx.save_for_backward(q, k, v, o, lse, route_weight, lst, cnt)
        ctx.meta = (C, scale, hpp)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, route_weight, lst, cnt = ctx.saved_tensors
        C, scale, hpp = ctx.meta
        B, T, HQ, D = q.shape
        HKV, DV = k.shape[2], v.shape[3]
        NC = triton.cdiv(T, C)
        group = HQ // HKV
        do = do.contiguous()
        delta = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)  # rowsum(dO*O), by the dQ kernel
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        dw = torch.empty(B, NC, HKV, device=q.device, dtype=torch.float32)
        rw = route_weight.detach()
        BD, BDV = _pow2(D), _pow2(DV)
        _bwd_dq_kernel[(B * HQ // hpp, NC)](
            q, k, v, do, dq, lse, delta, lst, cnt, o,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            T, NC, HQ, HKV, scale * LOG2E, scale,
            GROUP=group, HPP=hpp, C=C, KPB=KPB, D=D, DV=DV, BD=BD, BDV=BDV, num_warps=CFG["dq"][0], num_stages=CFG["dq"][1],
        )
        hard = (rw > 0.5).transpose(1, 2)  # [B,HKV,NC]
        cidx = torch.arange(NC, device=q.device)
        pair = DKV_MODE == "pair"
        if pair:
            order = torch.arange(B * HKV * NC, device=q.device, dtype=torch.int32)
        else:
            work = torch.where(hard, NC - cidx, 0) + 1
            order = torch.argsort(work.reshape(-1), descending=True, stable=True).to(torch.int32)
        _bwd_dkv_kernel[(B * HKV * NC,)](
            q, k, v, do, dk, dv, dw, rw, lse, delta,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            rw.stride(0), rw.stride(1), rw.stride(2), order,
            T, NC, HQ, HKV, scale * LOG2E, scale,
            GROUP=group, HPP=DKV_HPP or hpp, C=C, D=D, DV=DV, BD=BD, BDV=BDV, SKIP_ROUTED=int(pair),
            num_warps=CFG["dkv"][0], num_stages=CFG["dkv"][1],
        )
        if pair:
            tot = hard.sum(-1).to(torch.int32).reshape(-1).contiguous()
            _bwd_dkv_pair_kernel[(triton.cdiv(NC, 2) * B * HKV,)](
                q, k, v, do, dk, dv, dw, lse, delta, lst, tot,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
                T, NC, HQ, HKV, B * HKV, scale * LOG2E, scale,
                GROUP=group, C=C, D=D, DV=DV, BD=BD, BDV=BDV,
                num_warps=CFG_PAIR[0], num_stages=CFG_PAIR[1],
            )
        dw = dw * (rw > 0.5)
        return dq, dk, dv, dw.to(route_weight.dtype), None, None


def routed_softmax_attention(q, k, v, route_weight, chunk_size: int = 64, scale: float | None = None):
    """q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv], route_weight [B,ceil(T/C),Hkv] (0/1)
    -> o [B,T,Hq,Dv] (dtype of q)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return RoutedSoftmaxAttention.apply(q, k, v, route_weight, int(chunk_size), float(scale))
