"""Routed (chunk-sparse) causal softmax attention: Triton forward + backward.

Semantics (SPEC section 3, `reference.routed_softmax_attention`): query i of chunk ci sees the
keys j <= i of its own chunk and every key of an earlier chunk cj whose route weight
`route_weight[b, cj, g]` is 1 (g = the query head's KV group). Route weights are exactly 0/1;
the earlier-chunk keys are weighted by w (=1), so the forward never multiplies by it, and
d w[b, c, g] = sum of dS = P * (dP - rowsum(dO * O)) over the (query, key) pairs of queries in
later chunks (all q heads of the group) and keys of chunk c. Chunks routed linear are never
visited (d w = 0 there).

Shape (as fla's ops): two custom ops built from the launchers below, and a thin autograd Function
that only calls them, so that torch.compile(fullgraph=True) traces the Function whole (its
forward and backward each become one op node; the fake impls give shapes and dtypes):
    natsl::softmax_branch_fwd(q, k, v, route_weight, chunk_size, scale) -> (o, lse, lst, cnt)
        route lists (`_route_lists`) + the forward kernel (`_launch_fwd`)
    natsl::softmax_branch_bwd(q, k, v, o, lse, route_weight, lst, cnt, do, chunk_size, scale)
        -> (dq, dk, dv, d route_weight): the dQ kernel (`_launch_dq`, also delta), then the dK/dV
        kernel (`_launch_dkv`)
The launchers take their (num_warps, num_stages) as arguments (default: the CFG table), so a sweep
(bench/check_and_time.py --sweep) calls them with other configs; nothing rewrites this module.

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
  chunk. No atomics. Programs are ordered longest first. (Two softmax chunks per program, the
  "pair" schedule, was measured slower and removed: bench/KERNELS_NOTES.md.)
Accumulation is fp32; P and dS are cast to the input dtype for the tensor-core dots (as in
FlashAttention).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from .utils import LOG2E, _hpp, _pow2, _query_rows, cdiv, register_op

__all__ = ["routed_softmax_attention", "softmax_branch_fwd", "softmax_branch_bwd", "RoutedSoftmaxAttention"]


@triton.jit
def _head_tile(X, b, sb, st, sh, tq, heads, m, o, N: tl.constexpr):
    """Tile X[b, tq, heads, o] of X [B, T, H, N] (strides sb, st, sh; unit last): rows = (token,
    head) pairs tq / heads [M] (mask m), columns o (< N); 0 outside."""
    return tl.load(X + b * sb + tq[:, None] * st + heads[:, None] * sh + o[None, :],
                   mask=m[:, None] & (o[None, :] < N), other=0.0)


@triton.jit
def _softmax_step(s, vv, m_i, l_i, acc):
    """One key block of the online softmax, log2 units: s [BM, BN] scores (-inf where not visible),
    vv [BN, BDV]. -> the new running max, sum and unnormalised output."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(
    Q, KD, VD, O, LSE, LIST, CNT,
    sqb, sqt, sqh, sob, sot, soh,
    T, NC, HQ, HKV, qk_scale,
    GROUP: tl.constexpr, HPP: tl.constexpr, C: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    ci = NC - 1 - tl.program_id(1)
    # b int32: TMA row coordinates (b * T + t)
    b, hq0, g, hh, tq, mq = _query_rows(tl.program_id(0), ci, T, HQ, GROUP, HPP, C)
    b64 = b.to(tl.int64)  # pointer offsets: b * (row stride) passes 2**31 once B * T * Hq * D does
    BM: tl.constexpr = HPP * C

    od = tl.arange(0, BD)
    odv = tl.arange(0, BDV)
    q = _head_tile(Q, b64, sqb, sqt, sqh, tq, hq0 + hh, mq, od, D)

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
        m_i, l_i, acc = _softmax_step(tl.dot(q, tl.trans(k)) * qk_scale, vv, m_i, l_i, acc)
    # diagonal chunk (rows past T, if any, are masked)
    tk = ci * C + oc
    mk = tk < T
    k = KD.load([b * T + ci * C, g * D])
    vv = VD.load([b * T + ci * C, g * DV])
    s = tl.dot(q, tl.trans(k)) * qk_scale
    vis = (tk[None, :] <= tq[:, None]) & mk[None, :]
    m_i, l_i, acc = _softmax_step(tl.where(vis, s, float("-inf")), vv, m_i, l_i, acc)

    acc = acc / l_i[:, None]
    tl.store(O + b64 * sob + tq[:, None] * sot + (hq0 + hh)[:, None] * soh + odv[None, :],
             acc.to(O.dtype.element_ty), mask=mq[:, None] & (odv[None, :] < DV))
    tl.store(LSE + (b64 * HQ + hq0 + hh) * T + tq, m_i + tl.log2(l_i), mask=mq)


@triton.jit
def _dq_block(q, k, vv, do, lse, delta, vis, qk_scale):
    """dS @ K of one key block ([BM, BD], before sm_scale): vis [BM, BN] (or broadcastable) masks P."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(vv))
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k)


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
    b, hq0, g, hh, tq, mq = _query_rows(tl.program_id(0), ci, T, HQ, GROUP, HPP, C)
    b = b.to(tl.int64)  # b * (row stride) can pass 2**31
    BM: tl.constexpr = HPP * C

    od = tl.arange(0, BD)
    odv = tl.arange(0, BDV)
    q = _head_tile(Q, b, sqb, sqt, sqh, tq, hq0 + hh, mq, od, D)
    do = _head_tile(DO, b, sdob, sdot, sdoh, tq, hq0 + hh, mq, odv, DV)
    lse = tl.load(LSE + (b * HQ + hq0 + hh) * T + tq, mask=mq, other=0.0)
    o = _head_tile(O, b, sob, sot, soh, tq, hq0 + hh, mq, odv, DV)
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
        dq += _dq_block(q, k, vv, do, lse, delta, ms[None, :], qk_scale)
    tk = ci * C + oc
    mk = tk < T
    k = tl.load(kbase + tk[:, None] * skt + od[None, :], mask=mk[:, None] & (od[None, :] < D), other=0.0)
    vv = tl.load(vbase + tk[:, None] * svt + odv[None, :], mask=mk[:, None] & (odv[None, :] < DV), other=0.0)
    dq += _dq_block(q, k, vv, do, lse, delta, (tk[None, :] <= tq[:, None]) & mk[None, :], qk_scale)
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
):
    item = tl.load(ORDER + tl.program_id(0))  # = (b * HKV + g) * NC + cj, longest work first
    cj = item % NC
    b = (item // (HKV * NC)).to(tl.int64)  # b * (row stride) can pass 2**31
    g = (item // NC) % HKV
    oc = tl.arange(0, C)
    od = tl.arange(0, BD)
    odv = tl.arange(0, BDV)
    routed = tl.load(RW + b * srb + cj * src + g * srh) > 0.5
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
            q = _head_tile(Q, b, sqb, sqt, sqh, tq, hq, mq, od, D)
            do = _head_tile(DO, b, sdob, sdot, sdoh, tq, hq, mq, odv, DV)
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


# ------------------------------------------------------------------------------- launchers

# (num_warps, num_stages) per kernel on CUDA; the interpreter ignores them. Constants: a sweep
# passes other configs to the launchers. From the sweep in bench/results/kernels_bench_h200_v3.json
# (T=32k, p=0.125).
CFG = {"fwd": (8, 2), "dq": (8, 2), "dkv": (4, 1)}
KPB = 2  # chunks per key block in the dQ loop (BLOCK_N = 2 C): pointer gathers; one TMA chunk per step was slower there


def _route_lists(route_weight: Tensor) -> tuple[Tensor, Tensor]:
    """route_weight [B, NC, Hkv] -> LIST [B, Hkv, NC] int32 (softmax chunk ids ascending first),
    CNT [B, Hkv, NC] int32 (number of softmax chunks strictly before each chunk)."""
    hard = (route_weight.detach() > 0.5).transpose(1, 2).to(torch.int32, memory_format=torch.contiguous_format)
    # a stable sort keeps the chunk order among equals: softmax chunks (1) ascending, then linear ones ascending
    lst = torch.argsort(hard, dim=-1, descending=True, stable=True).to(torch.int32)
    cnt = torch.cumsum(hard, -1, dtype=torch.int32) - hard
    return lst, cnt


def _chunk_descriptors(k: Tensor, v: Tensor, chunk: int):
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


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, route_weight: Tensor, C: int) -> None:
    B, T, HQ, _ = q.shape
    HKV = k.shape[2]
    if HQ % HKV or C < 16 or C & (C - 1):
        raise ValueError(f"routed_softmax_attention: Hq ({HQ}) must be a multiple of Hkv ({HKV}) and "
                         f"chunk_size ({C}) a power of 2 >= 16")
    if tuple(route_weight.shape) != (B, cdiv(T, C), HKV):
        raise ValueError(f"route_weight must be [B, ceil(T / C), Hkv] = {(B, cdiv(T, C), HKV)}, "
                         f"got {tuple(route_weight.shape)}")


def _launch_fwd(q: Tensor, k: Tensor, v: Tensor, lst: Tensor, cnt: Tensor, C: int, scale: float,
                cfg: tuple[int, int] = CFG["fwd"]) -> tuple[Tensor, Tensor]:
    """q [B,T,Hq,D], k/v [B,T,Hkv,*] contiguous, route lists -> o [B,T,Hq,Dv] (q dtype), lse [B,Hq,T]
    fp32 (log2 units)."""
    B, T, HQ, D = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    NC = cdiv(T, C)
    group = HQ // HKV
    hpp = _hpp(group, C)
    o = torch.empty(B, T, HQ, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    kd, vd = _chunk_descriptors(k, v, C)
    _fwd_kernel[(B * HQ // hpp, NC)](
        q, kd, vd, o, lse, lst, cnt,
        q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2),
        T, NC, HQ, HKV, scale * LOG2E,
        GROUP=group, HPP=hpp, C=C, D=D, DV=DV, BD=_pow2(D), BDV=_pow2(DV), num_warps=cfg[0], num_stages=cfg[1],
    )
    return o, lse


def _launch_dq(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, lst: Tensor, cnt: Tensor,
               C: int, scale: float, cfg: tuple[int, int] = CFG["dq"]) -> tuple[Tensor, Tensor]:
    """-> dq [B,T,Hq,D] (q dtype), delta = rowsum(dO * O) [B,Hq,T] fp32 (for the dK/dV kernel)."""
    B, T, HQ, D = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    NC = cdiv(T, C)
    group = HQ // HKV
    hpp = _hpp(group, C)
    delta = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    _bwd_dq_kernel[(B * HQ // hpp, NC)](
        q, k, v, do, dq, lse, delta, lst, cnt, o,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        T, NC, HQ, HKV, scale * LOG2E, scale,
        GROUP=group, HPP=hpp, C=C, KPB=KPB, D=D, DV=DV, BD=_pow2(D), BDV=_pow2(DV),
        num_warps=cfg[0], num_stages=cfg[1],
    )
    return dq, delta


def _launch_dkv(q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, route_weight: Tensor,
                C: int, scale: float, cfg: tuple[int, int] = CFG["dkv"],
                hpp: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """-> dk [B,T,Hkv,D], dv [B,T,Hkv,Dv] (input dtypes), d route [B,NC,Hkv] fp32 (0 on linear chunks).
    `hpp`: q heads per query tile, a divisor of the group (1: v4's sweep found it faster than 2)."""
    B, T, HQ, D = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    NC = cdiv(T, C)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    dw = torch.empty(B, NC, HKV, device=q.device, dtype=torch.float32)
    rw = route_weight.detach()
    hard = (rw > 0.5).transpose(1, 2)  # [B,HKV,NC]
    work = torch.where(hard, NC + 1 - torch.arange(NC, device=q.device), 1)  # key chunks' query chunks to visit
    order = torch.argsort(work.reshape(-1), descending=True, stable=True).to(torch.int32)
    _bwd_dkv_kernel[(B * HKV * NC,)](
        q, k, v, do, dk, dv, dw, rw, lse, delta,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        rw.stride(0), rw.stride(1), rw.stride(2), order,
        T, NC, HQ, HKV, scale * LOG2E, scale,
        GROUP=HQ // HKV, HPP=hpp, C=C, D=D, DV=DV, BD=_pow2(D), BDV=_pow2(DV),
        num_warps=cfg[0], num_stages=cfg[1],
    )
    return dk, dv, dw  # 0 on linear chunks: their programs visit only their own (diagonal) query chunk


# ------------------------------------------------------------------------------------- ops

def softmax_branch_fwd(q: Tensor, k: Tensor, v: Tensor, route_weight: Tensor, chunk_size: int,
                       scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """natsl::softmax_branch_fwd. q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv], route_weight
    [B,NC,Hkv] (0/1), NC = ceil(T / C) -> o [B,T,Hq,Dv] (q dtype), lse [B,Hq,T] fp32,
    lst / cnt [B,Hkv,NC] int32 (the route lists, for the backward)."""
    _check_shapes(q, k, v, route_weight, chunk_size)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    lst, cnt = _route_lists(route_weight)
    o, lse = _launch_fwd(q, k, v, lst, cnt, chunk_size, scale)
    return o, lse, lst, cnt


def _softmax_branch_fwd_fake(q, k, v, route_weight, chunk_size, scale):
    B, T, HQ, _ = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    NC = cdiv(T, chunk_size)
    return (q.new_empty(B, T, HQ, DV), q.new_empty(B, HQ, T, dtype=torch.float32),
            q.new_empty(B, HKV, NC, dtype=torch.int32), q.new_empty(B, HKV, NC, dtype=torch.int32))


def softmax_branch_bwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, route_weight: Tensor, lst: Tensor,
                       cnt: Tensor, do: Tensor, chunk_size: int, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """natsl::softmax_branch_bwd: the forward's inputs and outputs and dO [B,T,Hq,Dv]
    -> dq, dk, dv (input dtypes and shapes), d route_weight [B,NC,Hkv] (route_weight's dtype)."""
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    dq, delta = _launch_dq(q, k, v, o, lse, do, lst, cnt, chunk_size, scale)
    dk, dv, dw = _launch_dkv(q, k, v, do, lse, delta, route_weight, chunk_size, scale)
    return dq, dk, dv, dw.to(route_weight.dtype)


def _softmax_branch_bwd_fake(q, k, v, o, lse, route_weight, lst, cnt, do, chunk_size, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), route_weight.new_empty(route_weight.shape)


register_op("softmax_branch_fwd", softmax_branch_fwd, _softmax_branch_fwd_fake, forward=True)
register_op("softmax_branch_bwd", softmax_branch_bwd, _softmax_branch_bwd_fake, forward=False)


class RoutedSoftmaxAttention(torch.autograd.Function):
    """Thin: forward and backward are one op each (dynamo traces the Function whole)."""

    @staticmethod
    def forward(ctx, q, k, v, route_weight, chunk_size, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # saved as the kernels read them
        o, lse, lst, cnt = torch.ops.natsl.softmax_branch_fwd(q, k, v, route_weight, chunk_size, scale)
        ctx.save_for_backward(q, k, v, o, lse, route_weight, lst, cnt)
        ctx.meta = (chunk_size, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, route_weight, lst, cnt = ctx.saved_tensors
        chunk_size, scale = ctx.meta
        dq, dk, dv, dw = torch.ops.natsl.softmax_branch_bwd(q, k, v, o, lse, route_weight, lst, cnt, do,
                                                            chunk_size, scale)
        return dq, dk, dv, dw, None, None


def routed_softmax_attention(q, k, v, route_weight, chunk_size: int = 64, scale: float | None = None):
    """q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv], route_weight [B,ceil(T/C),Hkv] (0/1)
    -> o [B,T,Hq,Dv] (dtype of q)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return RoutedSoftmaxAttention.apply(q, k, v, route_weight, int(chunk_size), float(scale))
