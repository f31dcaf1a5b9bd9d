"""One decode step of the softmax branch against the compacted cache (split-K, "flash-decoding").

Semantics (SPEC section 4, `reference.softmax_branch` with a cache prefix and one query): the new
token's query attends to the kept KV of its KV group (the complete softmax chunks: the first
`kept_len[b, g]` entries of `kept_k[b, g]`) and to its own open chunk up to and including itself
(slots 0..seen[b] % C of `open_k[b]`, the new token already written at that slot; `seen[b]` is the
new token's position). Every visible key has weight 1, so this is plain softmax attention over
those keys.

Work layout
* Pass 1, grid (B * Hkv, NSPLIT + 1): program (bg, s < NSPLIT) reads the kept keys
  [s * SPLIT, (s + 1) * SPLIT) of one (row, KV group) in blocks of BN, for all q heads of the group
  at once (rows = q heads, padded to 16 for the tensor-core dot: GQA without repeating K/V), and
  writes its running max, sum and unnormalised output; program (bg, NSPLIT) does the open chunk.
  NSPLIT is fixed on the host from the allocated length L, so there is no host sync; each program
  stops at its (row, group)'s kept_len, so a preallocated buffer (NatslStaticCache) costs only
  what it holds, and a split past kept_len returns an empty partial (max -inf, sum 0).
* Pass 2, grid (B * Hkv, GROUP): one program per q head merges its NSPLIT + 1 partials (log-sum-exp
  rescaling against the max of all splits, taken first; then up to MERGE_TILE values of the
  partials per step, one step for a short split list). The open split always holds the new token,
  so every merge has a finite max.
Cost: reads the kept KV once (kept tokens x Hkv x (D + Dv) x 2 bytes) plus the open chunk.
Host side: the cache tensors go in as they are (no length, slot or dtype conversions) and the
partials share one scratch buffer, so a step is two Triton launches and two allocations: at batch 1
that launch overhead, not the GPU, sets the step time (bench/KERNELS_NOTES.md).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .utils import LOG2E, _pow2, cdiv

BN = 64  # kept keys per block
TARGET_PROGRAMS = 512  # about 4 programs per SM on an H100 / H200; splits never go below one block


@triton.jit
def _decode_partial_kernel(
    Q, KK, KV, KLEN, OK, OV, SEEN, MID,
    sqb, sqh, skb, skh, skt, svb, svh, svt, sokb, sokt, sokh, sovb, sovt, sovh,
    HKV, L, NSPLIT, SPLIT, qk_scale,
    GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    bg = tl.program_id(0)
    s = tl.program_id(1)
    b = (bg // HKV).to(tl.int64)  # b * (row stride) passes 2**31 for long caches at large batch
    g = bg % HKV
    r = tl.arange(0, BM)  # q head of the group
    mr = r < GROUP
    od = tl.arange(0, BD)
    odv = tl.arange(0, BDV)
    q = tl.load(Q + b * sqb + (g * GROUP + r)[:, None] * sqh + od[None, :],
                mask=mr[:, None] & (od[None, :] < D), other=0.0)  # [BM, BD]
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    if s < NSPLIT:  # kept entries [s * SPLIT, (s + 1) * SPLIT) below kept_len
        kbase = KK + b * skb + g * skh
        vbase = KV + b * svb + g * svh
        on = tl.arange(0, BN)
        n_kept = tl.minimum(tl.load(KLEN + bg).to(tl.int32), L)
        for start in range(s * SPLIT, tl.minimum((s + 1) * SPLIT, n_kept), BN):
            t = start + on
            mk = t < n_kept
            k = tl.load(kbase + t[:, None] * skt + od[None, :], mask=mk[:, None] & (od[None, :] < D), other=0.0)
            v = tl.load(vbase + t[:, None] * svt + odv[None, :], mask=mk[:, None] & (odv[None, :] < DV), other=0.0)
            sc = (tl.dot(q, tl.trans(k)) * qk_scale).to(tl.float32)  # fp32 also when a compiler passes the scale as fp64
            sc = tl.where(mk[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no valid entry so far
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(sc - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    else:  # the open chunk: slots 0..seen % C (the new token included)
        oc = tl.arange(0, BC)
        mk = oc <= tl.load(SEEN + b) % C
        k = tl.load(OK + b * sokb + oc[:, None] * sokt + g * sokh + od[None, :],
                    mask=mk[:, None] & (od[None, :] < D), other=0.0)
        v = tl.load(OV + b * sovb + oc[:, None] * sovt + g * sovh + odv[None, :],
                    mask=mk[:, None] & (odv[None, :] < DV), other=0.0)
        sc = (tl.dot(q, tl.trans(k)) * qk_scale).to(tl.float32)  # fp32 also when a compiler passes the scale as fp64
        sc = tl.where(mk[None, :], sc, float("-inf"))
        m_i = tl.max(sc, 1)
        p = tl.exp2(sc - m_i[:, None])
        l_i = tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v)
    # partial of (bg, s): BM rows of [m, l, acc[0:BDV]]
    row = MID + ((bg * (NSPLIT + 1) + s) * BM + r) * (BDV + 2)
    tl.store(row, m_i)
    tl.store(row + 1, l_i)
    tl.store(row[:, None] + 2 + odv[None, :], acc)


@triton.jit
def _decode_merge_kernel(
    MID, O, sob, soh, HKV, NSPLIT,
    GROUP: tl.constexpr, BM: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, NS: tl.constexpr,
    SB: tl.constexpr,
):
    """Merge the NSPLIT + 1 partials of q head j of one (row, KV group): the global max from all split maxes at
    once, then the sums and outputs SB splits at a time (one step when the splits fit in a tile).

    One program per q head, not per group: the partials' padding rows (BM >= 16 for the partial's tensor-core dot,
    GROUP real) are never read, and the group's heads merge side by side. The per-group merge read all BM rows in
    steps of 8 splits, ~9 dependent steps at batch 1: 20 us a call, the largest NAtS-L kernel of the 8k decode step
    (H100 profile of 2026-12-07, bench/results/model_bench_h100_decode_profile_8k.json)."""
    bg = tl.program_id(0)
    j = tl.program_id(1)
    b = (bg // HKV).to(tl.int64)
    g = bg % HKV
    odv = tl.arange(0, BDV)
    step = BM * (BDV + 2)  # partial (bg, s, j) is [m, l, acc[0:BDV]] at base + s * step
    base = MID + (bg.to(tl.int64) * (NSPLIT + 1) * BM + j) * (BDV + 2)
    s = tl.arange(0, NS)
    m = tl.max(tl.load(base + s * step, mask=s <= NSPLIT, other=float("-inf")), 0)  # finite: the open split
    l_sum = tl.zeros([SB], dtype=tl.float32)  # per slot of the step, summed at the end (a vector loop-carry)
    acc = tl.zeros([BDV], dtype=tl.float32)
    for s0 in range(0, NSPLIT + 1, SB):
        ss = s0 + tl.arange(0, SB)
        live = ss <= NSPLIT
        row = base + ss * step  # [SB]
        w = tl.exp2(tl.load(row, mask=live, other=float("-inf")) - m)  # 0 for an empty split
        l_sum += w * tl.load(row + 1, mask=live, other=0.0)
        part = tl.load(row[:, None] + 2 + odv[None, :], mask=live[:, None], other=0.0)  # [SB, BDV]
        acc += tl.sum(part * w[:, None], 0)
    out = acc / tl.sum(l_sum, 0)
    tl.store(O + b * sob + (g * GROUP + j) * soh + odv, out.to(O.dtype.element_ty), mask=odv < DV)


MERGE_TILE = 8192  # partial values a merge program holds per step (SB splits x BDV)


def _merge_splits(nsplit: int, bdv: int) -> int:
    """SB: the splits one merge step takes, a power of 2 with SB * bdv <= MERGE_TILE (at least 8)."""
    return max(8, min(triton.next_power_of_2(nsplit + 1), MERGE_TILE // bdv))


def _num_splits(rows: int, length: int) -> tuple[int, int]:
    """(NSPLIT, SPLIT): about TARGET_PROGRAMS programs in all, kept keys per split a multiple of BN. NSPLIT depends on
    the rows alone, not on `length` (the kept slots, which follow the cache's length): the merge's NS is a constexpr
    of it, and a compiled decode step whose launch shape followed the length would be specialised to it, so every new
    cache length would recompile the step. Splits past a row's kept entries hold none and exit at once (short caches
    launch a few such empty programs)."""
    nsplit = max(1, TARGET_PROGRAMS // rows)
    return nsplit, max(BN, cdiv(cdiv(length, nsplit), BN) * BN)


def routed_decode_attention(q, kept_k, kept_v, kept_len, open_k, open_v, seen, scale: float | None = None):
    """One new token per row against the compacted cache (a layer state's tensors as they are).

    q: [B, Hq, D] the new token's RoPE'd query (the cache's dtype)
    kept_k: [B, Hkv, L, D], kept_v: [B, Hkv, L, Dv] kept KV; kept_len: [B, Hkv] integer, the valid prefix
    open_k: [B, C, Hkv, D], open_v: [B, C, Hkv, Dv] the open chunk, the new token written at slot seen % C
    seen: [B] integer, the new token's position (keys in open slots 0..seen % C are visible)
    -> o: [B, Hq, Dv] in q's dtype. Inference only (no autograd).
    """
    B, HQ, D = q.shape
    HKV, L, DV = kept_k.shape[1], kept_k.shape[2], kept_v.shape[-1]
    C = open_k.shape[1]
    assert HQ % HKV == 0 and kept_k.shape[:2] == (B, HKV) and kept_len.shape == (B, HKV)
    assert open_k.shape[2] == HKV and seen.shape == (B,)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    group = HQ // HKV
    BM, BD, BDV, BC = _pow2(group), _pow2(D), _pow2(DV), _pow2(C)
    tensors = [q, kept_k, kept_v, open_k, open_v]
    q, kept_k, kept_v, open_k, open_v = (t if t.stride(-1) == 1 else t.contiguous() for t in tensors)
    kept_len = kept_len.contiguous()
    nsplit, split = _num_splits(B * HKV, L)
    mid = torch.empty(B * HKV, nsplit + 1, BM, BDV + 2, device=q.device, dtype=torch.float32)
    o = torch.empty(B, HQ, DV, device=q.device, dtype=q.dtype)
    _decode_partial_kernel[(B * HKV, nsplit + 1)](
        q, kept_k, kept_v, kept_len, open_k, open_v, seen, mid,
        q.stride(0), q.stride(1), kept_k.stride(0), kept_k.stride(1), kept_k.stride(2),
        kept_v.stride(0), kept_v.stride(1), kept_v.stride(2),
        open_k.stride(0), open_k.stride(1), open_k.stride(2), open_v.stride(0), open_v.stride(1), open_v.stride(2),
        HKV, L, nsplit, split, scale * LOG2E,
        GROUP=group, BM=BM, BN=BN, C=C, BC=BC, D=D, DV=DV, BD=BD, BDV=BDV, num_warps=4, num_stages=2,
    )
    _decode_merge_kernel[(B * HKV, group)](
        mid, o, o.stride(0), o.stride(1), HKV, nsplit, GROUP=group, BM=BM, DV=DV, BDV=BDV,
        NS=triton.next_power_of_2(nsplit + 1), SB=_merge_splits(nsplit, BDV), num_warps=4,
    )
    return o
