"""The NAtS-L maths in plain PyTorch: the definition every other path is tested against.

SPEC.md section 3. Everything here works on a *segment*: the tokens a layer sees in one call,
i.e. the cached tokens of the still-open chunk followed by the new tokens (training and a first
prefill: just the new tokens). Rows may differ in length and padding, so every token carries
its real position `pos` in its own sequence (-1 for padding); its chunk is `pos // chunk_size`.
A segment always starts at a chunk boundary of every row, so all chunks that close inside it
are complete in it. Nothing here loops over chunks or tokens: both branches are written in
their parallel (quadratic) form.

Softmax branch (query i, KV group g): causal softmax over the tokens of i's own chunk plus every
token of earlier chunks routed softmax for g (plus the kept KV of earlier calls). An earlier
chunk's keys are weighted by the route weight m (value 1; it carries the router gradient):
    o_i = sum_j m_j e^{s_ij} v_j / sum_j m_j e^{s_ij}.

GDN branch: the gated delta rule with writes `beta * (1 - m)` (so only linear-routed complete
chunks write), read out inter-chunk only:
    o_i = scale * exp(G_i - G_{e}) S_e^T q_i,   e = last token before i's chunk,
equivalently  exp(G_i) q_i S_0 + sum_{j in earlier chunks} exp(G_i - G_j) (q_i . k_j) v_new_j,
with v_new = (I + L)^{-1} (beta v) - (I + L)^{-1} (beta k e^{G}) S_0 the delta-rule corrected
values (L_ij = beta_i (k_i . k_j) e^{G_i - G_j}, j < i): the WY / UT form of fla's chunk
algorithm applied to the whole segment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_positions(valid: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Real positions of a segment's tokens.

    valid: [B, S] bool, start: [B] long (tokens of the row seen before the segment)
    -> pos [B, S] long, -1 where not valid.
    """
    pos = start[:, None] + valid.long().cumsum(1) - 1
    return torch.where(valid, pos, torch.full_like(pos, -1))


def _masked_min(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def softmax_branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    key_hard: torch.Tensor,
    key_weight: torch.Tensor,
    chunk_size: int,
    scale: float,
    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Routed causal softmax attention.

    q: [B, Tq, Hq, D] (RoPE applied), k: [B, S, Hkv, D], v: [B, S, Hkv, Dv]
    q_pos: [B, Tq], k_pos: [B, S] real positions (-1 = padding)
    key_hard: [B, S, Hkv] bool, route of each key's chunk (True = softmax)
    key_weight: [B, S, Hkv] float, route weight m of each key's chunk (value == key_hard)
    prefix: kept KV of earlier calls, (k [B, Hkv, L, D], v [B, Hkv, L, Dv], valid [B, Hkv, L]),
        visible to every query with weight 1.
    -> o: [B, Tq, Hq, Dv]
    """
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    q_chunk = torch.div(q_pos, chunk_size, rounding_mode="floor")[:, None, :, None]  # [B,1,Tq,1]
    k_chunk = torch.div(k_pos, chunk_size, rounding_mode="floor")[:, None, None, :]  # [B,1,1,S]
    hard = key_hard.transpose(1, 2)[:, :, None, :]  # [B,Hkv,1,S]
    earlier = k_chunk < q_chunk
    visible = (k_pos[:, None, None, :] >= 0) & (k_pos[:, None, None, :] <= q_pos[:, None, :, None])
    visible = visible & ((k_chunk == q_chunk) | (earlier & hard))  # [B,Hkv,Tq,S]
    log_w = torch.log(torch.where(key_hard, key_weight, torch.ones_like(key_weight)))
    bias = torch.where(earlier & hard, log_w.transpose(1, 2)[:, :, None, :].float(), 0.0)

    keys, values = k.transpose(1, 2), v.transpose(1, 2)  # [B,Hkv,S,*]
    if prefix is not None:
        pk, pv, pvalid = prefix
        keys, values = torch.cat([pk, keys], 2), torch.cat([pv, values], 2)
        visible = torch.cat([pvalid[:, :, None, :].expand(-1, -1, Tq, -1), visible], -1)
        bias = torch.cat([bias.new_zeros(B, Hkv, Tq, pk.shape[2]), bias.expand(-1, -1, Tq, -1)], -1)

    qg = q.transpose(1, 2).reshape(B, Hkv, G, Tq, D)
    scores = torch.matmul(qg, keys[:, :, None].transpose(-1, -2)).float() * scale  # [B,Hkv,G,Tq,L+S]
    scores = (scores + bias[:, :, None]).masked_fill(~visible[:, :, None], _masked_min(torch.float32))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(probs, values[:, :, None])  # [B,Hkv,G,Tq,Dv]
    return out.reshape(B, Hq, Tq, -1).transpose(1, 2)


def gdn_branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    chunk_size: int,
    scale: float,
    initial_state: torch.Tensor | None = None,
    state_until: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GDN branch: gated delta rule over the segment, inter-chunk readout.

    q: [B, Tq, Hq, K] L2-normalised; the queries are the LAST Tq tokens of the segment.
    k: [B, S, Hkv, K] L2-normalised, v: [B, S, Hkv, V]
    g: [B, S, Hkv] log decay (<= 0, 0 on padding), beta: [B, S, Hkv] effective write strength
        (already `beta * (1 - m)`, 0 on padding and on tokens of chunks not closed as linear)
    q_pos: [B, Tq], k_pos: [B, S] real positions (-1 = padding)
    initial_state: [B, Hkv, K, V] state at the segment start (a chunk boundary), or None (zeros).
    state_until: [B] long chunk index; if given, also return the state at the start of that chunk
        (after all segment tokens of earlier chunks), [B, Hkv, K, V] fp32.
    -> o [B, Tq, Hq, V] (fp32), state or None
    """
    B, S, Hkv, K = k.shape
    Tq, Hq = q.shape[1], q.shape[2]
    Gq = Hq // Hkv
    kf, vf = k.float().transpose(1, 2), v.float().transpose(1, 2)  # [B,H,S,*]
    bf = beta.float().transpose(1, 2)  # [B,H,S]
    Gc = g.float().cumsum(1).transpose(1, 2)  # [B,H,S] cumulative log decay, inclusive

    idx = torch.arange(S, device=k.device)
    strict = idx[:, None] > idx[None, :]
    diff = (Gc[..., :, None] - Gc[..., None, :]).masked_fill(~strict, float("-inf"))
    L = bf[..., :, None] * (kf @ kf.transpose(-1, -2)) * diff.exp()  # [B,H,S,S], strictly lower
    eye = torch.eye(S, device=k.device, dtype=L.dtype)
    rhs = torch.cat([bf[..., None] * vf, bf[..., None] * kf * Gc.exp()[..., None]], -1)
    sol = torch.linalg.solve_triangular(eye + L, rhs, upper=False, unitriangular=True)
    v_new, k_cum = sol[..., : vf.shape[-1]], sol[..., vf.shape[-1]:]
    if initial_state is not None:
        v_new = v_new - k_cum @ initial_state.float()

    # readout: query i (segment index S - Tq + t) reads keys of strictly earlier chunks
    G_q = Gc[..., S - Tq:]  # [B,H,Tq]
    q_chunk = torch.div(q_pos, chunk_size, rounding_mode="floor")
    k_chunk = torch.div(k_pos, chunk_size, rounding_mode="floor")
    readable = (k_chunk[:, None, :] < q_chunk[:, :, None]) & (k_pos[:, None, :] >= 0)  # [B,Tq,S]
    decay = (G_q[..., :, None] - Gc[..., None, :]).masked_fill(~readable[:, None], float("-inf")).exp()
    qg = q.float().transpose(1, 2).reshape(B, Hkv, Gq, Tq, K)
    scores = (qg @ kf[:, :, None].transpose(-1, -2)) * decay[:, :, None]  # [B,H,G,Tq,S]
    out = scores @ v_new[:, :, None]  # [B,H,G,Tq,V]
    if initial_state is not None:
        out = out + (qg @ initial_state.float()[:, :, None]) * G_q.exp()[:, :, None, :, None]
    out = (out * scale).reshape(B, Hq, Tq, -1).transpose(1, 2)

    state = None
    if state_until is not None:
        closed = (k_chunk < state_until[:, None]) & (k_pos >= 0)  # [B,S], a prefix of the valid tokens
        G_end = (g.float() * closed[..., None]).sum(1)  # [B,H]
        w = (G_end[..., None] - Gc).masked_fill(~closed[:, None, :], float("-inf")).exp()  # [B,H,S]
        state = (kf * w[..., None]).transpose(-1, -2) @ v_new  # [B,H,K,V]
        if initial_state is not None:
            state = state + initial_state.float() * G_end.exp()[..., None, None]
    return out, state


# --- kernel-shaped entry points (uniform chunks, no padding): what modeling/kernels/ accelerate ---

def routed_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, route_weight: torch.Tensor, chunk_size: int, scale: float
) -> torch.Tensor:
    """q [B,T,Hq,D], k/v [B,T,Hkv,*], route_weight [B,ceil(T/C),Hkv] (1 = softmax) -> o [B,T,Hq,Dv]."""
    B, T = q.shape[:2]
    pos = torch.arange(T, device=q.device).expand(B, T)
    chunk = pos[0] // chunk_size
    key_weight = route_weight[:, chunk]  # [B,T,Hkv]
    return softmax_branch(q, k, v, pos, pos, key_weight > 0.5, key_weight, chunk_size, scale)


def routed_gdn_readout(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int,
    scale: float,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inter-chunk GDN readout over a full sequence; also the state at the open chunk's start.

    q [B,T,Hq,K], k [B,T,Hkv,K] (L2-normalised), v [B,T,Hkv,V], g/beta [B,T,Hkv]
    -> o [B,T,Hq,V] fp32, state after the last complete chunk [B,Hkv,K,V] fp32.
    """
    B, T = q.shape[:2]
    pos = torch.arange(T, device=q.device).expand(B, T)
    until = torch.full((B,), T // chunk_size, device=q.device, dtype=torch.long)
    return gdn_branch(q, k, v, g, beta, pos, pos, chunk_size, scale, initial_state, until)


def routed_decode_attention(
    q: torch.Tensor,
    kept_k: torch.Tensor,
    kept_v: torch.Tensor,
    kept_len: torch.Tensor,
    open_k: torch.Tensor,
    open_v: torch.Tensor,
    seen: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One new token per row against a decode state: the first kept_len kept keys of its group plus
    the open chunk's slots up to the new token's own (written at slot seen % C). q [B,Hq,D],
    kept_k/v [B,Hkv,L,*], kept_len [B,Hkv], open_k/v [B,C,Hkv,*], seen [B] (the new token's
    position) -> o [B,Hq,Dv]."""
    B, C, H = open_k.shape[:3]
    slot = seen % C
    slots = torch.arange(C, device=q.device)
    k_pos = torch.where(slots[None] <= slot[:, None], seen[:, None] - slot[:, None] + slots[None], -1)
    ones = torch.ones(B, C, H, device=q.device)
    kept_valid = torch.arange(kept_k.shape[2], device=q.device) < kept_len[..., None]
    o = softmax_branch(q[:, None], open_k, open_v, seen[:, None], k_pos, ones.bool(), ones, C, scale,
                       (kept_k, kept_v, kept_valid))
    return o[:, 0]


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim, in fp32 (fla's convention)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def causal_depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv over each row's real inputs.

    x: [B, T, C], weight: [C, 1, W], state: [B, W-1, C] the row's last W-1 real inputs before x
    (None = zeros), valid: [B, T] bool, False = padding anywhere in the row (None = all real)
    -> y [B, T, C] (meaningless at padding), new_state [B, W-1, C] the last W-1 real inputs.

    Padding never enters the window of a real input: with `valid`, each row's real inputs are
    moved (in order) behind its padding, convolved, and put back. Taking the last W-1 columns
    as the next state would keep padding for a right-padded row.
    """
    B, T, C = x.shape
    W = weight.shape[-1]
    if state is None:
        state = x.new_zeros(B, W - 1, C)
    seq = torch.cat([state.to(x.dtype), x], 1)  # [B, W-1+T, C]
    if valid is not None and not bool(valid.all()):
        real = torch.cat([valid.new_ones(B, W - 1), valid.bool()], 1)
        order = torch.argsort(real.to(torch.int8), dim=1, stable=True)  # padding first, then real in order
        index = order[..., None].expand(-1, -1, C)
        packed = seq.gather(1, index) * real.gather(1, order)[..., None].to(x.dtype)
        y = F.conv1d(F.pad(packed.transpose(1, 2), (W - 1, 0)), weight.to(x.dtype), groups=C).transpose(1, 2)
        y = torch.empty_like(y).scatter_(1, index, y)[:, W - 1:]
        return y, packed[:, packed.shape[1] - (W - 1):]
    y = F.conv1d(seq.transpose(1, 2), weight.to(x.dtype), groups=C).transpose(1, 2)
    return y, seq[:, seq.shape[1] - (W - 1):]
