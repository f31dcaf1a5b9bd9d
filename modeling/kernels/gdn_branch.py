"""Routed GDN branch: gated delta rule, INTER-chunk readout only, GQA (Hq = G * Hkv).

Maths (SPEC section 3, `reference.routed_gdn_readout`):
    S_j = exp(g_j) (I - beta_j k_j k_j^T) S_{j-1} + beta_j k_j v_j^T,   S_{-1} = initial_state
    o_i = scale * exp(G_i - G_{e(ci)}) S_{e(ci)}^T q_i         (e(c) = c*C - 1)
    open_chunk_state = S_{floor(T/C)*C - 1}

What runs where
* The per-chunk start states h[t] come from fla's chunk machinery (chunk_local_cumsum,
  chunk_gated_delta_rule_fwd_intra = kkt + solve_tril + w/u, chunk_gated_delta_rule_fwd_h),
  one state per KV head. These are fla's forward kernels, used on CUDA only.
* Everything that involves q or the readout is our own Triton (runs under TRITON_INTERPRET too):
    _readout_fwd   o = scale * exp2(gc) * (q @ h[t])                  (q heads grouped, no repeat)
    _readout_bwd   dq, and d(gc) of the readout (rowsum(do * o))
    _dh_bwd        reverse recurrence over chunks: dh_end[t], du (= d v_new), dh0, with the
                   readout's state gradient sum_h (scale exp2(gc) q_h)^T do_h injected per chunk
    _chunk_bwd     per chunk: dk (state part), dw, d(gc) of the state chain
  fla's chunk_bwd_dqkwg (the kernel fla refuses on Hopper with triton < 3.7.1) is NOT used:
  it would also add intra-chunk terms we do not have. fla's prepare_wy_repr_bwd (back through
  w, u, A to k, v, beta, g) is used on CUDA.
* On CPU (tests under TRITON_INTERPRET=1) the fla pieces are replaced by a torch implementation
  of the same chunked quantities (w, u, h, v_new) and torch autograd for the w/u backward; all
  four Triton kernels above are exercised there.

Trailing incomplete chunk: its writes are never read (only later chunks read, and the open state
stops before it), so beta is zeroed there and the chain's cumulative gate too; its readout uses
the real gates. Chunk sizes: 16, 32, 64 (fla's intra kernels); others raise ValueError.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LN2 = math.log(2.0)
RCP_LN2 = 1.0 / LN2


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


# ----------------------------------------------------------------------------------- kernels

@triton.jit
def _readout_fwd(
    Q, H, GC, O, T, NT, HQ, HKV, scale,
    GROUP: tl.constexpr, HPP: tl.constexpr, C: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    t = tl.program_id(0)
    pid1 = tl.program_id(1)
    iv = tl.program_id(2)
    NHB = HQ // HPP
    b = (pid1 // NHB).to(tl.int64)
    hq0 = (pid1 % NHB) * HPP
    g = hq0 // GROUP
    BM: tl.constexpr = HPP * C
    r = tl.arange(0, BM)
    hh = r // C
    tq = t * C + (r % C)
    mq = tq < T
    ok = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    q = tl.load(Q + ((b * T + tq[:, None]) * HQ + hq0 + hh[:, None]) * K + ok[None, :],
                mask=mq[:, None] & (ok[None, :] < K), other=0.0)
    h = tl.load(H + (((b * NT + t) * HKV + g) * K + ok[:, None]) * V + ov[None, :],
                mask=(ok[:, None] < K) & (ov[None, :] < V), other=0.0)
    gc = tl.load(GC + (b * T + tq) * HKV + g, mask=mq, other=0.0)
    o = tl.dot(q.to(h.dtype), h) * (scale * tl.exp2(gc))[:, None]
    tl.store(O + ((b * T + tq[:, None]) * HQ + hq0 + hh[:, None]) * V + ov[None, :], o,
             mask=mq[:, None] & (ov[None, :] < V))


@triton.jit
def _readout_bwd(
    Q, H, GC, DO, DQ, DGR, T, NT, HQ, HKV, scale,
    GROUP: tl.constexpr, HPP: tl.constexpr, C: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    t = tl.program_id(0)
    pid1 = tl.program_id(1)
    NHB = HQ // HPP
    b = (pid1 // NHB).to(tl.int64)
    hq0 = (pid1 % NHB) * HPP
    g = hq0 // GROUP
    BM: tl.constexpr = HPP * C
    r = tl.arange(0, BM)
    hh = r // C
    tq = t * C + (r % C)
    mq = tq < T
    ok = tl.arange(0, BK)
    ov = tl.arange(0, BV)
    q = tl.load(Q + ((b * T + tq[:, None]) * HQ + hq0 + hh[:, None]) * K + ok[None, :],
                mask=mq[:, None] & (ok[None, :] < K), other=0.0)
    do = tl.load(DO + ((b * T + tq[:, None]) * HQ + hq0 + hh[:, None]) * V + ov[None, :],
                 mask=mq[:, None] & (ov[None, :] < V), other=0.0)
    h = tl.load(H + (((b * NT + t) * HKV + g) * K + ok[:, None]) * V + ov[None, :],
                mask=(ok[:, None] < K) & (ov[None, :] < V), other=0.0)
    gc = tl.load(GC + (b * T + tq) * HKV + g, mask=mq, other=0.0)
    f = scale * tl.exp2(gc)
    o = tl.dot(q.to(h.dtype), h) * f[:, None]
    dgr = tl.sum(o * do.to(tl.float32), 1)
    dq = tl.dot(do.to(h.dtype), tl.trans(h)) * f[:, None]
    tl.store(DQ + ((b * T + tq[:, None]) * HQ + hq0 + hh[:, None]) * K + ok[None, :],
             dq.to(DQ.dtype.element_ty), mask=mq[:, None] & (ok[None, :] < K))
    tl.store(DGR + (b * T + tq) * HQ + hq0 + hh, dgr, mask=mq)


@triton.jit
def _readout_dstate(
    Q, DO, GCR, DD, T, NT, HQ, HKV, scale,
    GROUP: tl.constexpr, C: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """DD[b, t, g] = sum_{h in group g} (scale exp2(gc) q_h)^T do_h over chunk t (fp32)."""
    t = tl.program_id(0)
    pid1 = tl.program_id(1)
    iv = tl.program_id(2)
    b = (pid1 // HKV).to(tl.int64)
    g = pid1 % HKV
    ok = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    oc = tl.arange(0, C)
    tk = t * C + oc
    mk = tk < T
    gcr = tl.load(GCR + (b * T + tk) * HKV + g, mask=mk, other=0.0)
    f = scale * tl.exp2(gcr)
    acc = tl.zeros([BK, BV], tl.float32)
    for hh in range(0, GROUP):
        hq = g * GROUP + hh
        q = tl.load(Q + ((b * T + tk[:, None]) * HQ + hq) * K + ok[None, :],
                    mask=mk[:, None] & (ok[None, :] < K), other=0.0)
        do = tl.load(DO + ((b * T + tk[:, None]) * HQ + hq) * V + ov[None, :],
                     mask=mk[:, None] & (ov[None, :] < V), other=0.0)
        qs = (q * f[:, None]).to(do.dtype)
        acc += tl.dot(tl.trans(qs), do)
    tl.store(DD + (((b * NT + t) * HKV + g) * K + ok[:, None]) * V + ov[None, :], acc,
             mask=(ok[:, None] < K) & (ov[None, :] < V))


@triton.jit
def _dh_bwd(
    DD, KK, W, GCH, DHT, DH, DU, DH0, T, NT, NTF, HKV,
    C: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, HAS_DH0: tl.constexpr,
):
    iv = tl.program_id(0)
    pid1 = tl.program_id(1)
    b = (pid1 // HKV).to(tl.int64)
    g = pid1 % HKV
    ok = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    oc = tl.arange(0, C)
    mkv = (ok[:, None] < K) & (ov[None, :] < V)
    dh = tl.zeros([BK, BV], tl.float32)
    for tt in range(0, NT):
        t = NT - 1 - tt
        if HAS_DHT:
            if t == NTF - 1:
                dh += tl.load(DHT + ((b * HKV + g) * K + ok[:, None]) * V + ov[None, :], mask=mkv, other=0.0)
        tl.store(DH + (((b * NT + t) * HKV + g) * K + ok[:, None]) * V + ov[None, :],
                 dh.to(DH.dtype.element_ty), mask=mkv)
        tk = t * C + oc
        mk = tk < T
        last = tl.minimum(T, t * C + C) - 1
        k = tl.load(KK + ((b * T + tk[:, None]) * HKV + g) * K + ok[None, :],
                    mask=mk[:, None] & (ok[None, :] < K), other=0.0)
        w = tl.load(W + ((b * T + tk[:, None]) * HKV + g) * K + ok[None, :],
                    mask=mk[:, None] & (ok[None, :] < K), other=0.0)
        gch = tl.load(GCH + (b * T + tk) * HKV + g, mask=mk, other=0.0)
        gl = tl.load(GCH + (b * T + last) * HKV + g)
        dv2 = tl.dot(k, dh.to(k.dtype)) * tl.where(mk, tl.exp2(gl - gch), 0.0)[:, None]
        tl.store(DU + ((b * T + tk[:, None]) * HKV + g) * V + ov[None, :], dv2.to(DU.dtype.element_ty),
                 mask=mk[:, None] & (ov[None, :] < V))
        dh = dh * tl.exp2(gl) - tl.dot(tl.trans(w), dv2.to(w.dtype))
        dh += tl.load(DD + (((b * NT + t) * HKV + g) * K + ok[:, None]) * V + ov[None, :], mask=mkv, other=0.0)
    if HAS_DHT:
        if NTF == 0:
            dh += tl.load(DHT + ((b * HKV + g) * K + ok[:, None]) * V + ov[None, :], mask=mkv, other=0.0)
    if HAS_DH0:
        tl.store(DH0 + ((b * HKV + g) * K + ok[:, None]) * V + ov[None, :], dh, mask=mkv)


@triton.jit
def _chunk_bwd(
    KK, VN, DU, H, DH, GCH, DK, DW, DG, T, NT, HKV,
    C: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    t = tl.program_id(0)
    pid1 = tl.program_id(1)
    b = (pid1 // HKV).to(tl.int64)
    g = pid1 % HKV
    ok = tl.arange(0, BK)
    ov = tl.arange(0, BV)
    oc = tl.arange(0, C)
    tk = t * C + oc
    mk = tk < T
    mkv = (ok[:, None] < K) & (ov[None, :] < V)
    last = tl.minimum(T, t * C + C) - 1
    k = tl.load(KK + ((b * T + tk[:, None]) * HKV + g) * K + ok[None, :],
                mask=mk[:, None] & (ok[None, :] < K), other=0.0)
    vn = tl.load(VN + ((b * T + tk[:, None]) * HKV + g) * V + ov[None, :],
                 mask=mk[:, None] & (ov[None, :] < V), other=0.0)
    du = tl.load(DU + ((b * T + tk[:, None]) * HKV + g) * V + ov[None, :],
                 mask=mk[:, None] & (ov[None, :] < V), other=0.0)
    h = tl.load(H + (((b * NT + t) * HKV + g) * K + ok[:, None]) * V + ov[None, :], mask=mkv, other=0.0)
    dh = tl.load(DH + (((b * NT + t) * HKV + g) * K + ok[:, None]) * V + ov[None, :], mask=mkv, other=0.0)
    gch = tl.load(GCH + (b * T + tk) * HKV + g, mask=mk, other=0.0)
    gl = tl.load(GCH + (b * T + last) * HKV + g)
    dk = tl.dot(vn.to(dh.dtype), tl.trans(dh)) * tl.where(mk, tl.exp2(gl - gch), 0.0)[:, None]
    dw = -tl.dot(du.to(h.dtype), tl.trans(h))
    kdk = tl.sum(k.to(tl.float32) * dk, 1)
    hdh = tl.sum(tl.sum(h.to(tl.float32) * dh.to(tl.float32), 1), 0) * tl.exp2(gl)
    dg = -kdk + tl.where(tk == last, hdh + tl.sum(kdk, 0), 0.0)
    tl.store(DK + ((b * T + tk[:, None]) * HKV + g) * K + ok[None, :], dk, mask=mk[:, None] & (ok[None, :] < K))
    tl.store(DW + ((b * T + tk[:, None]) * HKV + g) * K + ok[None, :], dw.to(DW.dtype.element_ty),
             mask=mk[:, None] & (ok[None, :] < K))
    tl.store(DG + (b * T + tk) * HKV + g, dg, mask=mk)


# ------------------------------------------------------------------------- chunk machinery

def _fla_available() -> bool:
    try:
        import fla.ops.gated_delta_rule.chunk  # noqa: F401
        return True
    except Exception:
        return False


def _use_fla(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and not _interp()


def _local_cumsum_log2(g: torch.Tensor, C: int, reverse: bool = False, scale: float | None = None) -> torch.Tensor:
    """chunk-local (reverse) cumsum over T of [B, T, H] fp32, optionally scaled."""
    if _use_fla(g):
        from fla.ops.utils import chunk_local_cumsum
        return chunk_local_cumsum(g.float().contiguous(), chunk_size=C, reverse=reverse, scale=scale,
                                  output_dtype=torch.float32)
    B, T, H = g.shape
    NT = triton.cdiv(T, C)
    x = g.float()
    if scale is not None:
        x = x * scale
    x = torch.nn.functional.pad(x, (0, 0, 0, NT * C - T)).view(B, NT, C, H)
    x = x.flip(2).cumsum(2).flip(2) if reverse else x.cumsum(2)
    return x.reshape(B, NT * C, H)[:, :T].contiguous()


def _torch_wu(k, v, beta, gnat, C):
    """w, u [B,T,H,*] from k [B,T,H,K], v, beta [B,T,H], gnat (natural local cumsum) — differentiable."""
    B, T, H, K = k.shape
    NT = triton.cdiv(T, C)
    P = NT * C - T

    def ch(x):  # [B,T,H,*] -> [B,H,NT,C,*]
        if x.dim() == 4:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, P))
            return x.view(B, NT, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)
        x = torch.nn.functional.pad(x, (0, 0, 0, P))
        return x.view(B, NT, C, H).permute(0, 3, 1, 2)

    kc, vc, bc, gc = ch(k.float()), ch(v.float()), ch(beta.float()), ch(gnat)
    L = bc[..., :, None] * (kc @ kc.transpose(-1, -2)) * torch.exp(gc[..., :, None] - gc[..., None, :])
    L = torch.tril(L, -1)
    eye = torch.eye(C, dtype=L.dtype, device=L.device)
    A = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False, unitriangular=True)
    w = A @ (kc * (bc * torch.exp(gc))[..., None])
    u = A @ (vc * bc[..., None])

    def unch(x):  # [B,H,NT,C,*] -> [B,T,H,*]
        return x.permute(0, 2, 3, 1, 4).reshape(B, NT * C, H, x.shape[-1])[:, :T]

    return unch(w), unch(u)


def _torch_h(k, w, u, gch, h0, C):
    """start states h [B,NT,H,K,V], v_new [B,T,H,V], final [B,H,K,V] (fp32) — torch loop."""
    B, T, H, K = k.shape
    V = u.shape[-1]
    NT = triton.cdiv(T, C)
    S = h0.float().clone() if h0 is not None else k.new_zeros(B, H, K, V, dtype=torch.float32)
    hs, vns = [], []
    gnat = gch.float() * LN2
    for t in range(NT):
        s, e = t * C, min(T, t * C + C)
        hs.append(S)
        kt = k[:, s:e].float().transpose(1, 2)  # [B,H,c,K]
        vn = u[:, s:e].float().transpose(1, 2) - w[:, s:e].float().transpose(1, 2) @ S
        vns.append(vn.transpose(1, 2))
        gt = gnat[:, s:e].transpose(1, 2)  # [B,H,c]
        gl = gt[..., -1]
        S = S * torch.exp(gl)[..., None, None] + (kt * torch.exp(gl[..., None] - gt)[..., None]).transpose(-1, -2) @ vn
    return torch.stack(hs, 1), torch.cat(vns, 1), S


def _prep(k, v, g, beta, C):
    B, T, H, K = k.shape
    TF = (T // C) * C
    gcr = _local_cumsum_log2(g, C, scale=RCP_LN2)  # log2 units, real gates (readout)
    if TF < T:
        tail = torch.ones(B, T, H, 1, device=k.device, dtype=torch.float32)
        tail[:, TF:] = 0
        tail = tail[..., 0]
        gch = (gcr * tail).contiguous()
        beta_eff = (beta * tail.to(beta.dtype)).contiguous()
    else:
        gch, beta_eff = gcr, beta.contiguous()
    return gcr, gch, beta_eff, TF


def _states_fwd(k, v, gch, beta_eff, h0, C, need_A=True):
    """-> h [B,NT,H,K,V] (k dtype on CUDA), v_new, open_state fp32, w, u, A(or None)."""
    if _use_fla(k):
        from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
        from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
        w, u, A = chunk_gated_delta_rule_fwd_intra(k=k, v=v, g=gch, beta=beta_eff, chunk_size=C)
        h, v_new, final = chunk_gated_delta_rule_fwd_h(
            k=k, w=w, u=u, g=gch, initial_state=h0, output_final_state=True, chunk_size=C)
        return h, v_new, final, w, u, A
    w, u = _torch_wu(k, v, beta_eff, gch * LN2, C)
    h, v_new, final = _torch_h(k, w, u, gch, h0, C)
    dt = k.dtype
    return h.to(dt).contiguous(), v_new.to(v.dtype).contiguous(), final, w.to(dt).contiguous(), \
        u.to(v.dtype).contiguous(), None


def _hpp(group: int, C: int) -> int:
    hpp = max(1, 128 // C)
    while group % hpp:
        hpp //= 2
    return max(1, hpp)


class RoutedGDNReadout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, C, scale):
        B, T, HQ, K = q.shape
        HKV, V = k.shape[2], v.shape[3]
        assert HQ % HKV == 0
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        g = g.float().contiguous()
        gcr, gch, beta_eff, TF = _prep(k, v, g, beta, C)
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        h, v_new, final, w, u, A = _states_fwd(k, v, gch, beta_eff, h0, C)
        NT = h.shape[1]
        group = HQ // HKV
        hpp = _hpp(group, C)
        BK, BV = _pow2(K), min(_pow2(V), 64)
        o = torch.empty(B, T, HQ, V, device=q.device, dtype=torch.float32)
        _readout_fwd[(NT, B * HQ // hpp, triton.cdiv(V, BV))](
            q, h, gcr, o, T, NT, HQ, HKV, scale,
            GROUP=group, HPP=hpp, C=C, K=K, V=V, BK=BK, BV=BV, num_warps=4, num_stages=2)
        ctx.save_for_backward(q, k, v, g, beta, beta_eff, gcr, gch, h0, A)
        ctx.meta = (C, scale, TF, initial_state is not None)
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, beta_eff, gcr, gch, h0, A = ctx.saved_tensors
        C, scale, TF, has_h0 = ctx.meta
        B, T, HQ, K = q.shape
        HKV, V = k.shape[2], v.shape[3]
        group = HQ // HKV
        hpp = _hpp(group, C)
        NTF = TF // C
        if _use_fla(k):
            from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
            from fla.ops.gated_delta_rule.wy_fast import recompute_w_u_fwd
            w, u = recompute_w_u_fwd(k=k, v=v, beta=beta_eff, A=A, g=gch)
            h, v_new, _ = chunk_gated_delta_rule_fwd_h(
                k=k, w=w, u=u, g=gch, initial_state=h0, output_final_state=False, chunk_size=C)
        else:
            h, v_new, _, w, u, _ = _states_fwd(k, v, gch, beta_eff, h0, C)
        NT = h.shape[1]
        do = do.contiguous()
        dodt = do.to(q.dtype) if q.dtype != torch.float32 else do.float()
        BK, BVf = _pow2(K), _pow2(V)
        nw = 4 if _interp() else 8
        dq = torch.empty_like(q)
        dgr = torch.empty(B, T, HQ, device=q.device, dtype=torch.float32)
        _readout_bwd[(NT, B * HQ // hpp)](
            q, h, gcr, dodt, dq, dgr, T, NT, HQ, HKV, scale,
            GROUP=group, HPP=hpp, C=C, K=K, V=V, BK=BK, BV=BVf, num_warps=nw, num_stages=2)
        dh = torch.empty(B, NT, HKV, K, V, device=q.device, dtype=h.dtype)
        du = torch.empty(B, T, HKV, V, device=q.device, dtype=k.dtype)
        dh0 = torch.empty(B, HKV, K, V, device=q.device, dtype=torch.float32) if has_h0 else None
        has_dht = dht is not None
        dht_c = dht.float().contiguous() if has_dht else dh  # dummy pointer when absent
        dd = torch.empty(B, NT, HKV, K, V, device=q.device, dtype=torch.float32)
        BVd = min(BVf, 64)
        _readout_dstate[(NT, B * HKV, triton.cdiv(V, BVd))](
            q, dodt, gcr, dd, T, NT, HQ, HKV, scale,
            GROUP=group, C=C, K=K, V=V, BK=BK, BV=BVd, num_warps=4, num_stages=2)
        BVr = min(BVf, 32 if K > 64 else 64)
        _dh_bwd[(triton.cdiv(V, BVr), B * HKV)](
            dd, k, w, gch, dht_c, dh, du, dh0 if has_h0 else dh, T, NT, NTF, HKV,
            C=C, K=K, V=V, BK=BK, BV=BVr, HAS_DHT=has_dht, HAS_DH0=has_h0,
            num_warps=4, num_stages=2)
        del dd
        dk_s = torch.empty(B, T, HKV, K, device=q.device, dtype=torch.float32)
        dw = torch.empty(B, T, HKV, K, device=q.device, dtype=k.dtype)
        dg_s = torch.empty(B, T, HKV, device=q.device, dtype=torch.float32)
        _chunk_bwd[(NT, B * HKV)](
            k, v_new, du, h, dh, gch, dk_s, dw, dg_s, T, NT, HKV,
            C=C, K=K, V=V, BK=BK, BV=BVf, num_warps=nw, num_stages=2)
        if _use_fla(k):
            from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd
            dk2, dv, db, dg2 = prepare_wy_repr_bwd(k=k, v=v, beta=beta_eff, A=A, dw=dw, du=du, g=gch)
        else:
            with torch.enable_grad():
                kk = k.detach().float().requires_grad_()
                vv = v.detach().float().requires_grad_()
                bb = beta_eff.detach().float().requires_grad_()
                gg = (gch.detach() * LN2).requires_grad_()
                w_, u_ = _torch_wu(kk, vv, bb, gg, C)
                dk2, dv, db, dg2 = torch.autograd.grad((w_, u_), (kk, vv, bb, gg), (dw.float(), du.float()))
        dgsum = dg_s + dg2.float() + dgr.view(B, T, HKV, group).sum(-1)
        dg = _local_cumsum_log2(dgsum, C, reverse=True)
        dk = (dk_s + dk2.float()).to(k.dtype)
        db = db.float()
        if TF < T:
            db[:, TF:] = 0
        return dq, dk, dv.to(v.dtype), dg.to(g.dtype), db.to(beta.dtype), dh0, None, None


def routed_gdn_readout(q, k, v, g, beta, chunk_size: int = 64, scale: float | None = None, initial_state=None):
    """q [B,T,Hq,K], k [B,T,Hkv,K] (L2-normalised), v [B,T,Hkv,V], g/beta [B,T,Hkv]
    -> (o [B,T,Hq,V] fp32, open_chunk_state [B,Hkv,K,V] fp32)."""
    C = int(chunk_size)
    if C not in (16, 32, 64):
        raise ValueError(f"routed_gdn_readout kernel path supports chunk_size 16/32/64, got {C}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if _use_fla(q) and not _fla_available():
        raise RuntimeError("routed_gdn_readout on CUDA needs flash-linear-attention (fla) >= 0.6.0")
    return RoutedGDNReadout.apply(q, k, v, g, beta, initial_state, C, float(scale))
