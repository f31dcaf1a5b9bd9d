"""Routed GDN branch: gated delta rule, INTER-chunk readout only, GQA (Hq = G * Hkv).

Maths (SPEC section 3, `reference.routed_gdn_readout`):
    S_j = exp(g_j) (I - beta_j k_j k_j^T) S_{j-1} + beta_j k_j v_j^T,   S_{-1} = initial_state
    o_i = scale * exp(G_i - G_{e(ci)}) S_{e(ci)}^T q_i         (e(c) = c*C - 1)
    open_chunk_state = S_{floor(T/C)*C - 1}

Shape (as fla's ops): two custom ops and a thin autograd Function that only calls them, so that
torch.compile(fullgraph=True) traces the Function whole (the fake impls give shapes and dtypes):
    natsl::gdn_branch_fwd(q, k, v, g, beta, initial_state?, chunk_size, scale)
        -> (o [B,T,Hq,V] fp32, open_state [B,Hkv,K,V] fp32, gcr [B,T,Hkv] fp32, A)
        gates, chunk states, readout. gcr = the readout's chunk-local cumulative gate (log2 units);
        A = fla's (I + L)^-1 [B,T,Hkv,C] (k dtype) on CUDA, an empty tensor on the CPU path.
    natsl::gdn_branch_bwd(q, k, v, g, beta, initial_state?, gcr, A, do, d open_state?, chunk_size, scale)
        -> (dq, dk, dv, dg, dbeta, d initial_state): states again, readout backward, state-gradient
        recurrence, per-chunk backward, w/u backward, reverse cumsum of the gate gradient.
        d initial_state is an empty tensor when there is no initial state (the Function says None).

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
  of the same chunked quantities (w, u, h, v_new: `_torch_wu`, `_torch_h`) and the analytic w/u
  backward `_torch_wu_bwd` (no autograd: a custom op runs below the autograd key); all four
  Triton kernels above are exercised there.

Trailing incomplete chunk: its writes are never read (only later chunks read, and the open state
stops before it), so beta is zeroed there and the chain's cumulative gate too (`_chain_gates`,
again in the backward instead of saving them); its readout uses the real gates. Chunk sizes:
16, 32, 64 (fla's intra kernels); others raise ValueError.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import LN2, LOG2E, _hpp, _interp, _pow2, _query_rows, cdiv, register_op

__all__ = ["routed_gdn_readout", "gdn_branch_fwd", "gdn_branch_bwd", "RoutedGDNReadout"]

CHUNK_SIZES = (16, 32, 64)


# ----------------------------------------------------------------------------------- kernels

@triton.jit
def _tok_tile(X, b, T, H, h, tk, mk, o, N: tl.constexpr):
    """Tile X[b, tk, h, o] of X [B, T, H, N] (contiguous): tk [M] tokens (mask mk), h a head or
    [M, 1] heads, o columns (< N); 0 outside."""
    return tl.load(X + ((b * T + tk[:, None]) * H + h) * N + o[None, :], mask=mk[:, None] & (o[None, :] < N),
                   other=0.0)


@triton.jit
def _tok_store(X, x, b, T, H, h, tk, mk, o, N: tl.constexpr):
    """x into X[b, tk, h, o] (as `_tok_tile` reads it), cast to X's dtype."""
    tl.store(X + ((b * T + tk[:, None]) * H + h) * N + o[None, :], x.to(X.dtype.element_ty),
             mask=mk[:, None] & (o[None, :] < N))


@triton.jit
def _state_off(n, HKV, g, ok, ov, K: tl.constexpr, V: tl.constexpr):
    """Offsets of block (ok, ov) of the state X[n, g] of X [N, Hkv, K, V] (contiguous)."""
    return ((n * HKV + g) * K + ok[:, None]) * V + ov[None, :]


@triton.jit
def _kv_program(pid, iv, HKV, BK: tl.constexpr, BV: tl.constexpr):
    """Program `pid` of a (row, KV head) axis, V columns of block iv: -> b (int64), g, ok [BK], ov [BV]."""
    return (pid // HKV).to(tl.int64), pid % HKV, tl.arange(0, BK), iv * BV + tl.arange(0, BV)


@triton.jit
def _chunk_decay(GCH, b, t, T, HKV, g, tk, mk, C: tl.constexpr):
    """Chunk t of the state chain: its last token, the chain's cumulative gate there (gl, log2) and
    exp2(gl - gch) per token tk (0 past T)."""
    last = tl.minimum(T, t * C + C) - 1
    gch = tl.load(GCH + (b * T + tk) * HKV + g, mask=mk, other=0.0)
    gl = tl.load(GCH + (b * T + last) * HKV + g)
    return last, gl, tl.where(mk, tl.exp2(gl - gch), 0.0)


@triton.jit
def _readout_rows(
    Q, H, GC, t, pid, iv, T, NT, HQ, HKV, scale,
    GROUP: tl.constexpr, HPP: tl.constexpr, C: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """The readout of chunk t for program `pid` (HPP q heads of one group), V columns of block iv:
    -> b (int64), heads [BM] (q head of each row), tq, mq, ok, ov, h [BK, BV], f [BM] = scale exp2(gc),
    o [BM, BV] = f q^T h (fp32)."""
    b, hq0, g, hh, tq, mq = _query_rows(pid, t, T, HQ, GROUP, HPP, C)
    b = b.to(tl.int64)
    heads = hq0 + hh
    ok = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    q = _tok_tile(Q, b, T, HQ, heads[:, None], tq, mq, ok, K)
    h = tl.load(H + _state_off(b * NT + t, HKV, g, ok, ov, K, V), mask=(ok[:, None] < K) & (ov[None, :] < V),
                other=0.0)
    f = scale * tl.exp2(tl.load(GC + (b * T + tq) * HKV + g, mask=mq, other=0.0))
    return b, heads, tq, mq, ok, ov, h, f, tl.dot(q.to(h.dtype), h) * f[:, None]


@triton.jit
def _readout_fwd(
    Q, H, GC, O, T, NT, HQ, HKV, scale,
    GROUP: tl.constexpr, HPP: tl.constexpr, C: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    b, heads, tq, mq, ok, ov, h, f, o = _readout_rows(
        Q, H, GC, tl.program_id(0), tl.program_id(1), tl.program_id(2), T, NT, HQ, HKV, scale,
        GROUP, HPP, C, K, V, BK, BV)
    _tok_store(O, o, b, T, HQ, heads[:, None], tq, mq, ov, V)


@triton.jit
def _readout_bwd(
    Q, H, GC, DO, DQ, DGR, T, NT, HQ, HKV, scale,
    GROUP: tl.constexpr, HPP: tl.constexpr, C: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    b, heads, tq, mq, ok, ov, h, f, o = _readout_rows(
        Q, H, GC, tl.program_id(0), tl.program_id(1), 0, T, NT, HQ, HKV, scale, GROUP, HPP, C, K, V, BK, BV)
    do = _tok_tile(DO, b, T, HQ, heads[:, None], tq, mq, ov, V)
    dgr = tl.sum(o * do.to(tl.float32), 1)
    dq = tl.dot(do.to(h.dtype), tl.trans(h)) * f[:, None]
    _tok_store(DQ, dq, b, T, HQ, heads[:, None], tq, mq, ok, K)
    tl.store(DGR + (b * T + tq) * HQ + heads, dgr, mask=mq)


@triton.jit
def _readout_dstate(
    Q, DO, GCR, DD, T, NT, HQ, HKV, scale,
    GROUP: tl.constexpr, C: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """DD[b, t, g] = sum_{h in group g} (scale exp2(gc) q_h)^T do_h over chunk t (fp32)."""
    t = tl.program_id(0)
    b, g, ok, ov = _kv_program(tl.program_id(1), tl.program_id(2), HKV, BK, BV)
    tk = t * C + tl.arange(0, C)
    mk = tk < T
    gcr = tl.load(GCR + (b * T + tk) * HKV + g, mask=mk, other=0.0)
    f = scale * tl.exp2(gcr)
    acc = tl.zeros([BK, BV], tl.float32)
    for hh in range(0, GROUP):
        hq = g * GROUP + hh
        q = _tok_tile(Q, b, T, HQ, hq, tk, mk, ok, K)
        do = _tok_tile(DO, b, T, HQ, hq, tk, mk, ov, V)
        qs = (q * f[:, None]).to(do.dtype)
        acc += tl.dot(tl.trans(qs), do)
    tl.store(DD + _state_off(b * NT + t, HKV, g, ok, ov, K, V), acc, mask=(ok[:, None] < K) & (ov[None, :] < V))


@triton.jit
def _dh_bwd(
    DD, KK, W, GCH, DHT, DH, DU, DH0, T, NT, NTF, HKV,
    C: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, HAS_DH0: tl.constexpr,
):
    b, g, ok, ov = _kv_program(tl.program_id(1), tl.program_id(0), HKV, BK, BV)
    oc = tl.arange(0, C)
    mkv = (ok[:, None] < K) & (ov[None, :] < V)
    dh = tl.zeros([BK, BV], tl.float32)
    for tt in range(0, NT):
        t = NT - 1 - tt
        if HAS_DHT:
            if t == NTF - 1:
                dh += tl.load(DHT + _state_off(b, HKV, g, ok, ov, K, V), mask=mkv, other=0.0)
        tl.store(DH + _state_off(b * NT + t, HKV, g, ok, ov, K, V), dh.to(DH.dtype.element_ty), mask=mkv)
        tk = t * C + oc
        mk = tk < T
        k = _tok_tile(KK, b, T, HKV, g, tk, mk, ok, K)
        w = _tok_tile(W, b, T, HKV, g, tk, mk, ok, K)
        last, gl, decay = _chunk_decay(GCH, b, t, T, HKV, g, tk, mk, C)
        dv2 = tl.dot(k, dh.to(k.dtype)) * decay[:, None]
        _tok_store(DU, dv2, b, T, HKV, g, tk, mk, ov, V)
        dh = dh * tl.exp2(gl) - tl.dot(tl.trans(w), dv2.to(w.dtype))
        dh += tl.load(DD + _state_off(b * NT + t, HKV, g, ok, ov, K, V), mask=mkv, other=0.0)
    if HAS_DHT:
        if NTF == 0:
            dh += tl.load(DHT + _state_off(b, HKV, g, ok, ov, K, V), mask=mkv, other=0.0)
    if HAS_DH0:
        tl.store(DH0 + _state_off(b, HKV, g, ok, ov, K, V), dh, mask=mkv)


@triton.jit
def _chunk_bwd(
    KK, VN, DU, H, DH, GCH, DK, DW, DG, T, NT, HKV,
    C: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    t = tl.program_id(0)
    b, g, ok, ov = _kv_program(tl.program_id(1), 0, HKV, BK, BV)
    tk = t * C + tl.arange(0, C)
    mk = tk < T
    mkv = (ok[:, None] < K) & (ov[None, :] < V)
    k = _tok_tile(KK, b, T, HKV, g, tk, mk, ok, K)
    vn = _tok_tile(VN, b, T, HKV, g, tk, mk, ov, V)
    du = _tok_tile(DU, b, T, HKV, g, tk, mk, ov, V)
    h = tl.load(H + _state_off(b * NT + t, HKV, g, ok, ov, K, V), mask=mkv, other=0.0)
    dh = tl.load(DH + _state_off(b * NT + t, HKV, g, ok, ov, K, V), mask=mkv, other=0.0)
    last, gl, decay = _chunk_decay(GCH, b, t, T, HKV, g, tk, mk, C)
    dk = tl.dot(vn.to(dh.dtype), tl.trans(dh)) * decay[:, None]
    dw = -tl.dot(du.to(h.dtype), tl.trans(h))
    kdk = tl.sum(k.to(tl.float32) * dk, 1)
    hdh = tl.sum(tl.sum(h.to(tl.float32) * dh.to(tl.float32), 1), 0) * tl.exp2(gl)
    dg = -kdk + tl.where(tk == last, hdh + tl.sum(kdk, 0), 0.0)
    _tok_store(DK, dk, b, T, HKV, g, tk, mk, ok, K)
    _tok_store(DW, dw, b, T, HKV, g, tk, mk, ok, K)
    tl.store(DG + (b * T + tk) * HKV + g, dg, mask=mk)


# ------------------------------------------------------------------------- chunk machinery

@functools.cache
def _fla_available() -> bool:
    """Whether fla's chunk machinery imports (checked once per process, not in every op call)."""
    try:
        import fla.ops.gated_delta_rule.chunk  # noqa: F401
        return True
    except Exception:
        return False


def _use_fla(x: Tensor) -> bool:
    """fla's chunk kernels for tensors on CUDA (also fake ones: the fake impls ask the same)."""
    return x.device.type == "cuda" and not _interp()


def _local_cumsum_log2(g: Tensor, C: int, reverse: bool = False, scale: float | None = None) -> Tensor:
    """chunk-local (reverse) cumsum over T of [B, T, H] fp32, optionally scaled."""
    if _use_fla(g):
        from fla.ops.utils import chunk_local_cumsum
        return chunk_local_cumsum(g.float().contiguous(), chunk_size=C, reverse=reverse, scale=scale,
                                  output_dtype=torch.float32)
    B, T, H = g.shape
    NT = cdiv(T, C)
    x = g.float()
    if scale is not None:
        x = x * scale
    x = torch.nn.functional.pad(x, (0, 0, 0, NT * C - T)).view(B, NT, C, H)
    x = x.flip(2).cumsum(2).flip(2) if reverse else x.cumsum(2)
    return x.reshape(B, NT * C, H)[:, :T].contiguous()


def _to_chunks(x: Tensor, C: int) -> Tensor:
    """[B,T,H,N] -> [B,H,NT,C,N] ([B,T,H] -> [B,H,NT,C]), zero-padded to NT * C tokens."""
    B, T, H = x.shape[:3]
    NT = cdiv(T, C)
    pad = (0, 0) * (x.dim() - 2) + (0, NT * C - T)
    x = torch.nn.functional.pad(x, pad).view(B, NT, C, H, *x.shape[3:])
    return x.permute(0, 3, 1, 2, 4) if x.dim() == 5 else x.permute(0, 3, 1, 2)


def _from_chunks(x: Tensor, T: int) -> Tensor:
    """[B,H,NT,C,N] -> [B,T,H,N] (contiguous); [B,H,NT,C] -> [B,T,H]."""
    B, H, NT, C = x.shape[:4]
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1).reshape(B, NT * C, H)[:, :T].contiguous()
    return x.permute(0, 2, 3, 1, 4).reshape(B, NT * C, H, x.shape[-1])[:, :T].contiguous()


def _wu_operands(k: Tensor, v: Tensor, beta: Tensor, gnat: Tensor, C: int):
    """Per chunk (fp32, [B,H,NT,C,*]): kc, vc, bc, e^g, S = k_i . k_j, E = e^{g_i - g_j} for i > j
    (0 elsewhere: no overflow above the diagonal), L = beta_i E S and A = (I + L)^-1."""
    kc, vc, bc, gc = (_to_chunks(x.float(), C) for x in (k, v, beta, gnat))
    lower = torch.ones(C, C, dtype=torch.bool, device=k.device).tril(-1)
    E = torch.exp(torch.where(lower, gc[..., :, None] - gc[..., None, :], float("-inf")))
    S = kc @ kc.transpose(-1, -2)
    L = bc[..., :, None] * S * E
    eye = torch.eye(C, dtype=L.dtype, device=L.device)
    A = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False, unitriangular=True)
    return kc, vc, bc, torch.exp(gc), S, E, L, A


def _torch_wu(k, v, beta, gnat, C):
    """w = A (k * beta * e^g), u = A (v * beta) [B,T,H,*] fp32 from k [B,T,H,K], v, beta [B,T,H] and
    gnat (the chunk-local cumulative gate, natural log units) — differentiable."""
    kc, vc, bc, eg, _, _, _, A = _wu_operands(k, v, beta, gnat, C)
    T = k.shape[1]
    return _from_chunks(A @ (kc * (bc * eg)[..., None]), T), _from_chunks(A @ (vc * bc[..., None]), T)


def _torch_wu_bwd(k, v, beta, gnat, C, dw, du):
    """The backward of `_torch_wu`, written out (inside a custom op autograd does not record):
    dw, du [B,T,H,*] -> dk [B,T,H,K], dv [B,T,H,V], dbeta [B,T,H], dg [B,T,H] (w.r.t. gnat), fp32.
    Per chunk, with kb = k beta e^g, vb = v beta, w = A kb, u = A vb, A = (I + L)^-1:
        dA = dw kb^T + du vb^T,  dkb = A^T dw,  dvb = A^T du,
        dL = strictly lower part of -A^T dA A^T   (d M^-1 = -M^-1 dM M^-1),
    and L_ij = beta_i e^{g_i - g_j} k_i . k_j (i > j) gives dk += (X + X^T) k with X = dL beta_i E,
    dbeta_i += sum_j dL_ij E_ij S_ij, dg_i += sum_j (dL L)_ij - sum_j (dL L)_ji."""
    T = k.shape[1]
    kc, vc, bc, eg, S, E, L, A = _wu_operands(k, v, beta, gnat, C)
    dwc, duc = _to_chunks(dw.float(), C), _to_chunks(du.float(), C)
    be = bc * eg  # beta e^g
    kb, vb = kc * be[..., None], vc * bc[..., None]
    At = A.transpose(-1, -2)
    dA = dwc @ kb.transpose(-1, -2) + duc @ vb.transpose(-1, -2)
    dkb, dvb = At @ dwc, At @ duc
    dL = torch.tril(-(At @ dA @ At), -1)
    X = dL * bc[..., :, None] * E  # dS
    dLL = dL * L
    dbe = (dkb * kc).sum(-1)  # d(beta e^g)
    dk = (X + X.transpose(-1, -2)) @ kc + dkb * be[..., None]
    dbeta = (dL * E * S).sum(-1) + dbe * eg + (dvb * vc).sum(-1)
    dg = dLL.sum(-1) - dLL.sum(-2) + dbe * be
    return _from_chunks(dk, T), _from_chunks(dvb * bc[..., None], T), _from_chunks(dbeta, T), _from_chunks(dg, T)


def _torch_h(k, w, u, gch, h0, C):
    """start states h [B,NT,H,K,V], v_new [B,T,H,V], final [B,H,K,V] (fp32) — torch loop."""
    B, T, H, K = k.shape
    V = u.shape[-1]
    NT = cdiv(T, C)
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


def _chain_gates(gcr: Tensor, beta: Tensor, C: int) -> tuple[Tensor, Tensor, int]:
    """The state chain's cumulative gate and beta: the readout's gcr [B,T,H] and beta with the
    trailing incomplete chunk (tokens TF = floor(T / C) C on) zeroed: it never writes.
    -> gch, beta_eff (contiguous; gcr and beta themselves when T is a multiple of C), TF."""
    T = gcr.shape[1]
    TF = (T // C) * C
    if TF == T:
        return gcr, beta.contiguous(), TF
    gch = gcr.clone()
    gch[:, TF:] = 0
    beta_eff = beta.clone(memory_format=torch.contiguous_format)
    beta_eff[:, TF:] = 0
    return gch, beta_eff, TF


def _states_fwd(k, v, gch, beta_eff, h0, C):
    """-> h [B,NT,H,K,V] (k dtype), v_new, open_state fp32, w, u, A (fla's; None on the CPU path)."""
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


def _states_again(k, v, gch, beta_eff, h0, A, C):
    """The backward's chunk states: -> h, v_new, w (fla: w/u again from the saved A, then fwd_h)."""
    if _use_fla(k):
        from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
        from fla.ops.gated_delta_rule.wy_fast import recompute_w_u_fwd
        w, u = recompute_w_u_fwd(k=k, v=v, beta=beta_eff, A=A, g=gch)
        h, v_new, _ = chunk_gated_delta_rule_fwd_h(
            k=k, w=w, u=u, g=gch, initial_state=h0, output_final_state=False, chunk_size=C)
        return h, v_new, w
    h, v_new, _, w, _, _ = _states_fwd(k, v, gch, beta_eff, h0, C)
    return h, v_new, w


def _wu_bwd(k, v, beta_eff, gch, A, dw, du, C):
    """Back through w, u (and A) to k, v, beta and the chain's gate (natural units): fla's
    prepare_wy_repr_bwd on CUDA, `_torch_wu_bwd` on the CPU path."""
    if _use_fla(k):
        from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd
        return prepare_wy_repr_bwd(k=k, v=v, beta=beta_eff, A=A, dw=dw, du=du, g=gch)
    return _torch_wu_bwd(k, v, beta_eff, gch * LN2, C, dw, du)


# ------------------------------------------------------------------------------- launchers

def _num_warps() -> int:
    return 4 if _interp() else 8


def _launch_readout_fwd(q: Tensor, h: Tensor, gcr: Tensor, HKV: int, C: int, scale: float) -> Tensor:
    """q [B,T,Hq,K], h [B,NT,Hkv,K,V], gcr [B,T,Hkv] -> o [B,T,Hq,V] fp32."""
    B, T, HQ, K = q.shape
    NT, V = h.shape[1], h.shape[-1]
    group = HQ // HKV
    hpp = _hpp(group, C)
    BK, BV = _pow2(K), min(_pow2(V), 64)
    o = torch.empty(B, T, HQ, V, device=q.device, dtype=torch.float32)
    _readout_fwd[(NT, B * HQ // hpp, triton.cdiv(V, BV))](
        q, h, gcr, o, T, NT, HQ, HKV, scale,
        GROUP=group, HPP=hpp, C=C, K=K, V=V, BK=BK, BV=BV, num_warps=4, num_stages=2)
    return o


def _launch_readout_bwd(q: Tensor, h: Tensor, gcr: Tensor, do: Tensor, HKV: int, C: int,
                        scale: float) -> tuple[Tensor, Tensor]:
    """-> dq [B,T,Hq,K] (q dtype), d gcr of the readout [B,T,Hq] fp32 (natural units)."""
    B, T, HQ, K = q.shape
    NT, V = h.shape[1], h.shape[-1]
    group = HQ // HKV
    hpp = _hpp(group, C)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dgr = torch.empty(B, T, HQ, device=q.device, dtype=torch.float32)
    _readout_bwd[(NT, B * HQ // hpp)](
        q, h, gcr, do, dq, dgr, T, NT, HQ, HKV, scale,
        GROUP=group, HPP=hpp, C=C, K=K, V=V, BK=_pow2(K), BV=_pow2(V), num_warps=_num_warps(), num_stages=2)
    return dq, dgr


def _launch_dh_bwd(q: Tensor, do: Tensor, gcr: Tensor, k: Tensor, w: Tensor, gch: Tensor, dht: Optional[Tensor],
                   has_h0: bool, NT: int, TF: int, C: int, scale: float, h_dtype: torch.dtype):
    """The readout's per-chunk state gradient, then the reverse recurrence over chunks:
    -> dh [B,NT,Hkv,K,V] (h dtype), du = d v_new [B,T,Hkv,V] (k dtype), d initial_state fp32 (or None)."""
    B, T, HQ, K = q.shape
    HKV, V = k.shape[2], do.shape[-1]
    BK, BVf = _pow2(K), _pow2(V)
    dh = torch.empty(B, NT, HKV, K, V, device=q.device, dtype=h_dtype)
    du = torch.empty(B, T, HKV, V, device=q.device, dtype=k.dtype)
    dh0 = torch.empty(B, HKV, K, V, device=q.device, dtype=torch.float32) if has_h0 else None
    dht_c = dht.float().contiguous() if dht is not None else dh  # dummy pointer when absent
    dd = torch.empty(B, NT, HKV, K, V, device=q.device, dtype=torch.float32)
    BVd = min(BVf, 64)
    _readout_dstate[(NT, B * HKV, triton.cdiv(V, BVd))](
        q, do, gcr, dd, T, NT, HQ, HKV, scale,
        GROUP=HQ // HKV, C=C, K=K, V=V, BK=BK, BV=BVd, num_warps=4, num_stages=2)
    BVr = min(BVf, 32 if K > 64 else 64)
    _dh_bwd[(triton.cdiv(V, BVr), B * HKV)](
        dd, k, w, gch, dht_c, dh, du, dh0 if has_h0 else dh, T, NT, TF // C, HKV,
        C=C, K=K, V=V, BK=BK, BV=BVr, HAS_DHT=dht is not None, HAS_DH0=has_h0,
        num_warps=4, num_stages=2)
    return dh, du, dh0


def _launch_chunk_bwd(k: Tensor, v_new: Tensor, du: Tensor, h: Tensor, dh: Tensor, gch: Tensor,
                      C: int) -> tuple[Tensor, Tensor, Tensor]:
    """-> dk of the state chain [B,T,Hkv,K] fp32, dw [B,T,Hkv,K] (k dtype), d gch [B,T,Hkv] fp32."""
    B, T, HKV, K = k.shape
    NT, V = h.shape[1], h.shape[-1]
    dk_s = torch.empty(B, T, HKV, K, device=k.device, dtype=torch.float32)
    dw = torch.empty(B, T, HKV, K, device=k.device, dtype=k.dtype)
    dg_s = torch.empty(B, T, HKV, device=k.device, dtype=torch.float32)
    _chunk_bwd[(NT, B * HKV)](
        k, v_new, du, h, dh, gch, dk_s, dw, dg_s, T, NT, HKV,
        C=C, K=K, V=V, BK=_pow2(K), BV=_pow2(V), num_warps=_num_warps(), num_stages=2)
    return dk_s, dw, dg_s


# ------------------------------------------------------------------------------------- ops

def _check(q: Tensor, k: Tensor, C: int) -> None:
    if C not in CHUNK_SIZES:
        raise ValueError(f"routed_gdn_readout kernel path supports chunk_size 16/32/64, got {C}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"routed_gdn_readout: Hq ({q.shape[2]}) must be a multiple of Hkv ({k.shape[2]})")
    if _use_fla(q) and not _fla_available():
        raise RuntimeError("routed_gdn_readout on CUDA needs flash-linear-attention (fla) >= 0.6.0")


def gdn_branch_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Optional[Tensor],
                   chunk_size: int, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """natsl::gdn_branch_fwd. q [B,T,Hq,K], k [B,T,Hkv,K], v [B,T,Hkv,V], g / beta [B,T,Hkv],
    initial_state [B,Hkv,K,V] or None -> o [B,T,Hq,V] fp32, open_state [B,Hkv,K,V] fp32,
    gcr [B,T,Hkv] fp32 (for the backward), A [B,T,Hkv,C] (k dtype; fla) or empty (CPU path)."""
    C = chunk_size
    _check(q, k, C)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    gcr = _local_cumsum_log2(g.float().contiguous(), C, scale=LOG2E)  # log2 units, real gates (readout)
    gch, beta_eff, _ = _chain_gates(gcr, beta, C)
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    h, _, final, _, _, A = _states_fwd(k, v, gch, beta_eff, h0, C)
    o = _launch_readout_fwd(q, h, gcr, k.shape[2], C, scale)
    return o, final, gcr, A if A is not None else k.new_empty(0)


def _gdn_branch_fwd_fake(q, k, v, g, beta, initial_state, chunk_size, scale):
    B, T, HQ, K = q.shape
    HKV, V = k.shape[2], v.shape[3]
    A = k.new_empty(B, T, HKV, chunk_size) if _use_fla(k) else k.new_empty(0)
    return (q.new_empty(B, T, HQ, V, dtype=torch.float32), q.new_empty(B, HKV, K, V, dtype=torch.float32),
            q.new_empty(B, T, HKV, dtype=torch.float32), A)


def gdn_branch_bwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Optional[Tensor],
                   gcr: Tensor, A: Tensor, do: Tensor, dht: Optional[Tensor], chunk_size: int,
                   scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """natsl::gdn_branch_bwd: the forward's inputs, its gcr and A, d o [B,T,Hq,V] and d open_state
    [B,Hkv,K,V] (or None) -> dq, dk, dv, dg, dbeta (the inputs' shapes and dtypes), d initial_state
    [B,Hkv,K,V] fp32 (empty without an initial state)."""
    C = chunk_size
    B, T, HQ, K = q.shape
    HKV = k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    gch, beta_eff, TF = _chain_gates(gcr, beta, C)
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    h, v_new, w = _states_again(k, v, gch, beta_eff, h0, A, C)
    do = do.contiguous()
    dodt = do.to(q.dtype) if q.dtype != torch.float32 else do.float()
    dq, dgr = _launch_readout_bwd(q, h, gcr, dodt, HKV, C, scale)
    dh, du, dh0 = _launch_dh_bwd(q, dodt, gcr, k, w, gch, dht, h0 is not None, h.shape[1], TF, C, scale, h.dtype)
    dk_s, dw, dg_s = _launch_chunk_bwd(k, v_new, du, h, dh, gch, C)
    dk2, dv, db, dg2 = _wu_bwd(k, v, beta_eff, gch, A, dw, du, C)
    dgsum = dg_s + dg2 + dgr.view(B, T, HKV, HQ // HKV).sum(-1)  # fp32 (dg_s): dg2 promoted in the add
    dg = _local_cumsum_log2(dgsum, C, reverse=True)
    dk = (dk_s + dk2).to(k.dtype)
    db = db.to(beta.dtype)  # fresh from _wu_bwd (or a copy): zeroed in place
    if TF < T:
        db[:, TF:] = 0
    dh0 = dh0 if dh0 is not None else q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv.to(v.dtype).contiguous(), dg.to(g.dtype), db, dh0


def _gdn_branch_bwd_fake(q, k, v, g, beta, initial_state, gcr, A, do, dht, chunk_size, scale):
    B, HKV, K, V = q.shape[0], k.shape[2], k.shape[3], v.shape[3]
    dh0 = q.new_empty(B, HKV, K, V, dtype=torch.float32) if initial_state is not None else \
        q.new_empty(0, dtype=torch.float32)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), g.new_empty(g.shape),
            beta.new_empty(beta.shape), dh0)


register_op("gdn_branch_fwd", gdn_branch_fwd, _gdn_branch_fwd_fake, forward=True)
register_op("gdn_branch_bwd", gdn_branch_bwd, _gdn_branch_bwd_fake, forward=False)


class RoutedGDNReadout(torch.autograd.Function):
    """Thin: forward and backward are one op each (dynamo traces the Function whole)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, C, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # saved as the kernels read them
        o, final, gcr, A = torch.ops.natsl.gdn_branch_fwd(q, k, v, g, beta, initial_state, C, scale)
        ctx.save_for_backward(q, k, v, g, beta, initial_state, gcr, A)
        ctx.meta = (C, scale, initial_state is not None)
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state, gcr, A = ctx.saved_tensors
        C, scale, has_h0 = ctx.meta
        dq, dk, dv, dg, db, dh0 = torch.ops.natsl.gdn_branch_bwd(q, k, v, g, beta, initial_state, gcr, A, do, dht,
                                                                C, scale)
        return dq, dk, dv, dg, db, dh0 if has_h0 else None, None, None


def routed_gdn_readout(q, k, v, g, beta, chunk_size: int = 64, scale: float | None = None, initial_state=None):
    """q [B,T,Hq,K], k [B,T,Hkv,K] (L2-normalised), v [B,T,Hkv,V], g/beta [B,T,Hkv]
    -> (o [B,T,Hq,V] fp32, open_chunk_state [B,Hkv,K,V] fp32)."""
    C = int(chunk_size)
    if C not in CHUNK_SIZES:
        raise ValueError(f"routed_gdn_readout kernel path supports chunk_size 16/32/64, got {C}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return RoutedGDNReadout.apply(q, k, v, g, beta, initial_state, C, float(scale))
