"""The NAtS-L maths in plain PyTorch: the definition every other path is tested against.

SPEC.md section 3. Everything here works on a *segment*: the tokens a layer sees in one call,
i.e. the cached tokens of the still-open chunk followed by the new tokens (training and a first
prefill: just the new tokens). Rows may differ in length and padding, so every token carries
its real position `pos` in its own sequence (-1 for padding); its chunk is `pos // chunk_size`.
A segment always starts at a chunk boundary of every row, so all chunks that close inside it
are complete in it. Along a row the real positions increase (as `segment_positions` numbers
them) and every query is also a token of the segment.

Softmax branch (query i, KV group g): causal softmax over the tokens of i's own chunk plus every
token of earlier chunks routed softmax for g (plus the kept KV of earlier calls). An earlier
chunk's keys are weighted by the route weight m (value 1; it carries the router gradient):
    o_i = sum_j m_j e^{s_ij} v_j / sum_j m_j e^{s_ij}.

GDN branch: the gated delta rule with writes `beta * (1 - m)` (so only linear-routed complete
chunks write), read out inter-chunk only:
    o_i = scale * exp(G_i - G_e) S_e^T q_i,   e = last token before i's chunk,
with G the cumulative log decay and S_e the state after every token before i's chunk.

How it is computed (memory linear in T): each row's tokens are first laid out by position in a
chunk-aligned buffer `[B, N*C]` (slot = pos - first chunk * C; empty slots are zeros and write
nothing), so chunk n of every row is slots [nC, (n+1)C), whatever the padding.
- Softmax branch: queries in blocks of whole chunks (QUERY_BLOCK tokens), each block against only
  the keys it can see: the kept prefix, the earlier chunks routed softmax in some row and group,
  and the block's own chunks; the route weights enter as an additive bias log m.
- GDN branch: fla's chunk form. Inside each chunk the UT transform (I + A)^{-1}, A_ij = beta_i
  (k_i . k_j) e^{G_i - G_j} (j < i, G cumulated within the chunk), gives w = (I + A)^{-1} beta k e^G
  and u = (I + A)^{-1} beta v; then one step per chunk: v_new = u - w S, o = scale e^G q S (the
  readout from the chunk-start state), S <- e^{G_last} S + (k e^{G_last - G})^T v_new.
Padding queries (pos -1) read 0 from both branches. (The first version of this file wrote both
branches in their parallel form over the whole segment, [T, T] scores and a T x T triangular
solve; tests/test_reference_scaling.py keeps that form as the oracle.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .state import gdn_token_write, put_slot, tracing

QUERY_BLOCK = 256  # softmax-branch queries per block (whole chunks, at least one)


def segment_positions(valid: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Real positions of a segment's tokens.

    valid: [B, S] bool, start: [B] long (tokens of the row seen before the segment)
    -> pos [B, S] long, -1 where not valid.
    """
    pos = start[:, None] + valid.long().cumsum(1) - 1
    return torch.where(valid, pos, torch.full_like(pos, -1))


class ChunkLayout:
    """Where a segment's tokens go in the chunk-aligned buffer [B, N*C]: slot = pos - base * C, base =
    each row's first chunk (0 for a row without tokens). Padding goes to a dummy slot N*C, dropped.

    k_pos: [B, S] real positions of the segment's tokens (-1 = padding). One host sync (N) in eager calls; traced
    (`tracing()`), N is the static bound ceil(S / C) instead: a row's real slots are contiguous from 0 (its
    positions rise by one from its first chunk's start, the cached open chunk's included), so they end by slot
    S - 1, and the chunks past a row's last token are empty: zeros that write nothing and that no query reads.
    Every output is the same; only work on those empty chunks is added."""

    def __init__(self, k_pos: torch.Tensor, chunk_size: int):
        C = chunk_size
        valid = k_pos >= 0
        first = torch.where(valid, k_pos, torch.iinfo(k_pos.dtype).max).amin(1)  # [B]
        self.base = torch.where(valid.any(1), torch.div(first, C, rounding_mode="floor"), 0)  # [B]
        self.chunk_size = C
        slots = (k_pos - self.base[:, None] * C).masked_fill(~valid, -1)  # [B, S], -1 for padding
        if tracing():
            self.num_chunks = -(-k_pos.shape[1] // C)
        else:
            self.num_chunks = int(slots.max()) // C + 1 if slots.numel() else 0
        self.length = self.num_chunks * C
        self.key_slot = self.slot(k_pos)  # [B, S]

    def slot(self, pos: torch.Tensor) -> torch.Tensor:
        """pos [B, T] -> slot [B, T] long in [0, N*C], N*C for padding."""
        return torch.where(pos >= 0, pos - self.base[:, None] * self.chunk_size, self.length)

    def scatter(self, x: torch.Tensor, slot: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, ...] -> [B, N*C, ...]: token t of row b at slot[b, t] (default: the keys' slots), zeros
        elsewhere."""
        slot = self.key_slot if slot is None else slot
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(slot)
        buf = x.new_zeros(x.shape[0], self.length + 1, *x.shape[2:])
        return buf.index_put((rows, slot), x)[:, : self.length]

    def gather(self, buf: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """buf [B, N*C, ...] -> [B, T, ...] read at slot [B, T]; 0 at padding (slot N*C)."""
        buf = torch.cat([buf, buf.new_zeros(buf.shape[0], 1, *buf.shape[2:])], 1)
        return buf[torch.arange(buf.shape[0], device=buf.device)[:, None], slot]


def _bias(q_slot, key_slot, key_real, key_hard, key_log_w, chunk_size, dtype):
    """Softmax-branch additive bias of queries at slots q_slot [Qb] for keys at slots key_slot [n]: log m
    through an earlier chunk routed softmax, 0 inside the query's own chunk (causal), the dtype's min
    where the key is not visible.

    key_real: [B, n] bool, key_hard: [B, Hkv, n] bool, key_log_w: [B, Hkv, n] -> bias [B, Hkv, Qb, n]
    """
    q_chunk = torch.div(q_slot, chunk_size, rounding_mode="floor")[:, None]  # [Qb, 1]
    k_chunk = torch.div(key_slot, chunk_size, rounding_mode="floor")  # [n]
    own = (k_chunk == q_chunk) & (key_slot <= q_slot[:, None])
    earlier = k_chunk < q_chunk
    visible = key_real[:, None, None] & (own | (earlier & key_hard[:, :, None]))
    bias = torch.where(earlier, key_log_w[:, :, None], 0.0).to(dtype)
    return bias.masked_fill(~visible, torch.finfo(dtype).min)


def _attend(q, keys, values, biases, scale):
    """Attention with an additive bias. q: [B, Hkv, G, Qb, D], keys / values: [B, Hkv, n, *], biases:
    [B, Hkv, Qb or 1, n_i] (sum n_i = n) -> o [B, Hkv, G, Qb, Dv].

    Each KV group is a batch entry whose G query heads share one KV head and one bias ([Qb, n] per
    group). The bias enters torch's SDPA as a constant, so the fused kernel runs with and without
    autograd alike; its gradient (the route weights') is added back as a term of value 0:
    d o_i / d bias_ij = P_ij (v_j - o_i)."""
    B, Hkv, G, Qb, D = q.shape
    bias = q.new_empty(B, Hkv, Qb, keys.shape[2])
    start = 0
    for part in biases:  # (slice assignment broadcasts; faster than a cat of expanded parts)
        bias[..., start: start + part.shape[-1]] = part
        start += part.shape[-1]
    q, bias = q.flatten(0, 1), bias.flatten(0, 1)[:, None]  # [B*Hkv,G,Qb,D], [B*Hkv,1,Qb,n]
    keys, values = keys.flatten(0, 1)[:, None], values.flatten(0, 1)[:, None]  # [B*Hkv,1,n,*]
    fixed = bias.detach()
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=fixed, scale=scale, enable_gqa=True)
    if bias.requires_grad:
        with torch.no_grad():
            p = torch.softmax((q @ keys.transpose(-1, -2)) * scale + fixed, -1)  # [B*Hkv,G,Qb,n]
        grad_only = p * (bias - fixed)  # value 0, derivative P
        o = o + grad_only @ values.detach() - o.detach() * grad_only.sum(-1, keepdim=True)
    return o.unflatten(0, (B, Hkv))


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
    -> o: [B, Tq, Hq, Dv] in v's dtype (0 at padding queries)

    Tiled (module docstring): a block of query chunks at a time, against the prefix, the earlier
    chunks routed softmax in some row and group, and its own chunks. Under autograd each block is
    checkpointed, so training keeps no per-block scores either.
    """
    B, Tq, Hq, D = q.shape
    Hkv, C, dtype = k.shape[2], chunk_size, v.dtype
    G = Hq // Hkv
    layout = ChunkLayout(k_pos, C)
    q_slot = layout.slot(q_pos)
    qs = layout.scatter(q.to(dtype), q_slot).transpose(1, 2).unflatten(1, (Hkv, G))  # [B,Hkv,G,N*C,D]
    ks = layout.scatter(k.to(dtype)).transpose(1, 2)  # [B,Hkv,N*C,D]
    vs = layout.scatter(v).transpose(1, 2)  # [B,Hkv,N*C,Dv]
    real = layout.scatter(k_pos >= 0)  # [B,N*C]
    hard = layout.scatter(key_hard).transpose(1, 2) & real[:, None]  # [B,Hkv,N*C]
    log_w = layout.scatter(torch.log(torch.where(key_hard, key_weight, 1.0).float())).transpose(1, 2)
    keys, values, biases = [], [], []  # the prefix: visible to every query, weight 1
    if prefix is not None:
        keys, values = [prefix[0].to(dtype)], [prefix[1].to(dtype)]
        biases = [torch.where(prefix[2].bool(), 0.0, torch.finfo(dtype).min).to(dtype)[:, :, None]]  # [B,Hkv,1,L]

    # the chunks some row and group routed softmax: the only earlier chunks a block visits (a host sync: the count
    # is data-dependent). Traced (`tracing()`), a block visits every earlier chunk instead: the bias (`_bias`) hides
    # the keys of the chunks a (row, group) did not route softmax, so the output is the same.
    visit_all = tracing()
    if not visit_all:
        softmax_chunks = hard.unflatten(2, (layout.num_chunks, C)).any(3).any(1).any(0).nonzero().flatten()
    per_block = max(1, QUERY_BLOCK // C)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, key_weight, *keys, *values))

    def block(qs, ks, vs, log_w, *prefix_kv, c0, c1):
        own = torch.arange(c0 * C, c1 * C, device=qs.device)  # the block's query slots and own key slots
        if visit_all:
            early = torch.arange(c0 * C, device=qs.device)
        else:
            early = (softmax_chunks[softmax_chunks < c0, None] * C + torch.arange(C, device=qs.device)).flatten()
        slots = torch.cat([early, own])  # [n] the segment keys the block visits
        block_keys, block_values = ks[:, :, slots], vs[:, :, slots]
        if prefix_kv:
            block_keys = torch.cat([prefix_kv[0], block_keys], 2)
            block_values = torch.cat([prefix_kv[1], block_values], 2)
        parts = (real[:, slots], hard[..., slots], log_w[..., slots])
        # every query of the block sits after the early chunks: one bias row serves them all
        block_biases = [*biases, _bias(own[:1], early, *(p[..., : len(early)] for p in parts), C, dtype),
                        _bias(own, own, *(p[..., len(early):] for p in parts), C, dtype)]
        return _attend(qs[..., c0 * C: c1 * C, :], block_keys, block_values, block_biases, scale)

    out = []
    for c0 in range(0, layout.num_chunks, per_block):
        bounds = {"c0": c0, "c1": min(c0 + per_block, layout.num_chunks)}
        inputs = (qs, ks, vs, log_w, *keys, *values)
        out.append(checkpoint(block, *inputs, use_reentrant=False, **bounds) if grad else block(*inputs, **bounds))
    o = torch.cat(out, 3) if out else qs.new_zeros(B, Hkv, G, 0, vs.shape[-1])  # [B,Hkv,G,N*C,Dv]
    return layout.gather(o.flatten(1, 2).transpose(1, 2), q_slot)  # [B,Tq,Hq,Dv]


def _chunk_ut(k, v, g, beta):
    """Within-chunk WY / UT form of the delta rule (fla's chunk algorithm), every chunk at once.

    k: [B, H, N, C, K], v: [B, H, N, C, V], g / beta: [B, H, N, C] (fp32)
    -> w [B, H, N, C, K], u [B, H, N, C, V], G [B, H, N, C] decay cumulated within the chunk (inclusive)
    """
    C = k.shape[-2]
    G = g.cumsum(-1)
    strict = torch.ones(C, C, dtype=torch.bool, device=k.device).tril(-1)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~strict, float("-inf")).exp()
    A = beta[..., None] * (k @ k.transpose(-1, -2)) * decay  # [B,H,N,C,C] strictly lower
    eye = torch.eye(C, device=k.device, dtype=A.dtype)
    rhs = torch.cat([beta[..., None] * v, beta[..., None] * k * G.exp()[..., None]], -1)
    sol = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    return sol[..., v.shape[-1]:], sol[..., : v.shape[-1]], G


def _chunk_step(state, w, u, k_out, decay):
    """One chunk's writes into the GDN state (fla's inter-chunk step): state [B,H,K,V] fp32 at the chunk's start,
    w [B,H,C,K], u [B,H,C,V] (`_chunk_ut`), k_out [B,H,C,K] keys decayed to the chunk's end, decay [B,H] the chunk's
    total log decay -> the state at the chunk's end."""
    v_new = u - w @ state  # [B,H,C,V]
    return state * decay.exp()[..., None, None] + k_out.transpose(-1, -2) @ v_new


def gdn_chunk_write(state, k, v, g, beta):
    """The writes of one chunk's tokens into a GDN state in chunk form: what C `gdn_token_write`s give. A multi-token
    call writes its open chunk so (`gdn_run`, which a decode step goes on writing token by token).
    state [B,Hkv,K,V] fp32, k [B,C,Hkv,K] L2-normalised, v [B,C,Hkv,V], g / beta [B,C,Hkv] (0 on empty slots)
    -> state [B,Hkv,K,V] fp32."""
    kc, vc, gc, bc = (t.float().movedim(1, 2)[:, :, None] for t in (k, v, g, beta))  # [B,H,1,C,*]
    w, u, G = _chunk_ut(kc, vc, gc, bc)
    k_out = kc * (G[..., -1:] - G).exp()[..., None]
    return _chunk_step(state.float(), w[:, :, 0], u[:, :, 0], k_out[:, :, 0], G[:, :, 0, -1])


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
    -> o [B, Tq, Hq, V] (fp32, 0 at padding queries), state or None

    Chunkwise (module docstring): the UT transform inside each chunk, then one step per chunk.
    Padding tokens are left out of the recurrence (their g and beta, 0 by contract, get no gradient).
    """
    B, S, Hkv, K = k.shape
    Hq, V, C = q.shape[2], v.shape[-1], chunk_size
    layout = ChunkLayout(k_pos, C)
    N = layout.num_chunks

    def chunked(x):  # [B, S, Hkv, *] -> [B, Hkv, N, C, *]
        return layout.scatter(x.float()).unflatten(1, (N, C)).movedim(3, 1)

    kc, vc = chunked(k), chunked(v)
    gc, bc = chunked(g[..., None])[..., 0], chunked(beta[..., None])[..., 0]  # [B,H,N,C]
    w, u, Gc = _chunk_ut(kc, vc, gc, bc)
    k_out = kc * (Gc[..., -1:] - Gc).exp()[..., None]  # [B,H,N,C,K] keys decayed to the chunk's end

    state = initial_state.float() if initial_state is not None else kc.new_zeros(B, Hkv, K, V)
    states = [state]  # state at the start of chunk n, n = 0 .. N
    for n in range(N):
        state = _chunk_step(state, w[:, :, n], u[:, :, n], k_out[:, :, n], Gc[:, :, n, -1])
        states.append(state)
    # [B,H,N,K,V]; N = 0 when no row has a real token (an all-padding batch): nothing to read out
    starts = torch.stack(states[:-1], 2) if N else state.new_zeros(B, Hkv, 0, K, V)

    q_slot = layout.slot(q_pos)
    qc = layout.scatter(q.float(), q_slot).unflatten(1, (N, C)).movedim(3, 1)  # [B,Hq,N,C,K]
    qc = qc.unflatten(1, (Hkv, Hq // Hkv))  # [B,H,G,N,C,K]
    o = (qc @ starts[:, :, None]) * (Gc.exp()[:, :, None, ..., None] * scale)  # [B,H,G,N,C,V]
    o = layout.gather(o.flatten(1, 2).flatten(2, 3).transpose(1, 2), q_slot)  # [B,Tq,Hq,V]

    if state_until is None:
        return o, None
    until = (state_until - layout.base).clamp(0, N)  # [B] chunk of the segment
    return o, torch.stack(states, 1)[torch.arange(B, device=k.device), until]


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
    the open chunk's slots up to the new token's own (written at slot seen % C), all with weight 1.
    q [B,Hq,D], kept_k/v [B,Hkv,L,*], kept_len [B,Hkv], open_k/v [B,C,Hkv,*], seen [B] (the new
    token's position) -> o [B,Hq,Dv]. Fixed shapes and no host sync (a compiled decode step runs it)."""
    B, Hq, D = q.shape
    C, H = open_k.shape[1], open_k.shape[2]
    keys = torch.cat([kept_k, open_k.transpose(1, 2)], 2)  # [B,Hkv,L+C,D]
    values = torch.cat([kept_v, open_v.transpose(1, 2)], 2)
    kept_visible = torch.arange(kept_k.shape[2], device=q.device) < kept_len[..., None]  # [B,Hkv,L]
    open_visible = (torch.arange(C, device=q.device) <= (seen % C)[:, None])[:, None].expand(B, H, C)
    visible = torch.cat([kept_visible, open_visible], -1)  # [B,Hkv,L+C]
    qg = q.reshape(B, H, Hq // H, 1, D)
    scores = (qg @ keys[:, :, None].transpose(-1, -2)).float()[..., 0, :] * scale  # [B,Hkv,G,L+C]
    probs = scores.masked_fill(~visible[:, :, None], torch.finfo(torch.float32).min).softmax(-1)
    return (probs.to(values.dtype) @ values).reshape(B, Hq, -1)  # [B,Hq,Dv]


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
    B, _, C = x.shape
    W = weight.shape[-1]
    if state is None:
        state = x.new_zeros(B, W - 1, C)
    seq = torch.cat([state.to(x.dtype), x], 1)  # [B, W-1+T, C]
    # an all-real `valid` takes the plain conv (eager: one sync to know); traced (`tracing()`), the general path
    # below, which computes the same for it (the sort keeps an all-real row in order)
    if valid is not None and (tracing() or not bool(valid.all())):
        real = torch.cat([valid.new_ones(B, W - 1), valid.bool()], 1)
        order = torch.argsort(real.to(torch.int8), dim=1, stable=True)  # padding first, then real in order
        index = order[..., None].expand(-1, -1, C)
        packed = seq.gather(1, index) * real.gather(1, order)[..., None].to(x.dtype)
        y = _window_sum(F.pad(packed, (0, 0, W - 1, 0)), weight)
        y = torch.empty_like(y).scatter_(1, index, y)[:, W - 1:]
        return y, packed[:, packed.shape[1] - (W - 1):]
    return _window_sum(seq, weight), seq[:, seq.shape[1] - (W - 1):]


def _window_sum(seq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The depthwise conv of seq [B, W-1+T, C] with weight [C, 1, W], no padding -> [B, T, C] in seq's dtype:
    y[t] = sum_w seq[t + w] weight[w], accumulated in fp32 and rounded once, as a conv kernel does.

    Written as W shifted products rather than F.conv1d: compiled, they fuse with the SiLU and L2 norms that
    follow into one pointwise kernel (forward and backward), where inductor hands F.conv1d to aten's
    depthwise conv, a separate kernel over a transposed copy (TRAINING_NOTES 2026-12-08). W (gdn_conv_size)
    is small, 4 by default."""
    W, T = weight.shape[-1], seq.shape[1] - weight.shape[-1] + 1
    taps = weight[:, 0].float()  # [C, W]
    y = seq[:, :T].float() * taps[:, 0]
    for w in range(1, W):
        y = y + seq[:, w:w + T].float() * taps[:, w]
    return y.to(seq.dtype)


def conv_step(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, valid: torch.Tensor | None):
    """The causal depthwise conv for one token: x [B,1,ch], weight [ch,1,W], state [B,W-1,ch] (the
    last W-1 real inputs), valid [B,1] bool or None -> y [B,1,ch], next state (unchanged where the
    token is padding). `causal_depthwise_conv` for T = 1, without its padding sort."""
    window = torch.cat([state.to(x.dtype), x], 1)  # [B,W,ch]
    y = _window_sum(window, weight)
    nxt = window[:, 1:]
    if valid is not None:
        nxt = torch.where(valid[..., None], nxt, state.to(x.dtype))
    return y, nxt


def gdn_inputs(q, k, a, b, conv_weight, A_log, dt_bias, conv_state, valid):
    """The GDN branch's inputs of n new tokens: the short causal conv over q / k, SiLU, L2 norms, and the
    gates. q [B,n,Hq,D], k [B,n,Hkv,D] (projections before RoPE), a, b [B,n,Hkv] (the a_proj / b_proj
    outputs), conv_weight [(Hq+Hkv)*D, 1, W], A_log, dt_bias [Hkv], conv_state [B,W-1,(Hq+Hkv)*D] or None,
    valid [B,n] bool or None (all real) -> q~ [B,n,Hq,D], k~ [B,n,Hkv,D] (L2-normalised, fp32),
    beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias) [B,n,Hkv] (fp32, g = 0 on padding), and the
    next conv state. One token against a conv state slides the window (`conv_step`: no sync)."""
    qd = q.shape[2] * q.shape[3]
    conv_in = torch.cat([q.flatten(2), k.flatten(2)], -1)
    if conv_in.shape[1] == 1 and conv_state is not None:
        qk, conv_state = conv_step(conv_in, conv_weight, conv_state, valid)
    else:
        qk, conv_state = causal_depthwise_conv(conv_in, conv_weight, conv_state, valid)
    qk = F.silu(qk)
    q_g, k_g = l2norm(qk[..., :qd].unflatten(-1, q.shape[2:])), l2norm(qk[..., qd:].unflatten(-1, k.shape[2:]))
    beta = torch.sigmoid(b.float())
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    if valid is not None:
        g = g * valid[..., None]
    return q_g, k_g, beta, g, conv_state


def gdn_readout(q_g: torch.Tensor, gdn_state: torch.Tensor, decay: torch.Tensor, scale: float) -> torch.Tensor:
    """Inter-chunk GDN readout of one token: q_g [B,Hq,K] fp32, gdn_state [B,Hkv,K,V] (the open chunk's
    start), decay [B,Hkv] (log decay since then, the token's own g included) -> [B,Hq,V] fp32."""
    qg = q_g.unflatten(1, (gdn_state.shape[1], -1))  # [B,Hkv,G,K]
    return ((qg @ gdn_state) * decay.exp()[..., None, None] * scale).flatten(1, 2)


def gdn_decode_step(q, k, v, a, b, valid, conv_weight, A_log, dt_bias, state, scale: float) -> torch.Tensor:
    """The GDN branch of one decode token against a NatslLayerState, updated in place.

    q [B, Hq*D], k [B, Hkv*D]: the token's q / k projections before RoPE (the short conv's inputs);
    v [B, Hkv, V]; a, b [B, Hkv]: the a_proj / b_proj outputs; valid [B] bool (False: a padding token,
    which leaves the state as it is); conv_weight [Hq*D + Hkv*D, 1, W]; A_log, dt_bias [Hkv].
    In `state`: the conv window slides; the token's L2-normalised GDN key, log decay g and write strength
    beta go to the open chunk's slot seen % C; `gdn_run` takes the token's delta-rule write (the open
    chunk as if it closes linear) and `gdn_decay` its g.
    -> o_gdn [B, Hq, V] fp32: the token's readout of `gdn_state` (the open chunk's start), decayed by
    `gdn_decay`. `modeling.kernels.gdn_decode_step` is this in one Triton launch.
    """
    B, Hkv = a.shape
    D = k.shape[1] // Hkv
    q_g, k_g, beta, g, conv_state = gdn_inputs(
        q.reshape(B, 1, -1, D), k.reshape(B, 1, Hkv, D), a[:, None], b[:, None], conv_weight, A_log, dt_bias,
        state.conv_state, valid[:, None],
    )
    state.conv_state.copy_(conv_state)
    q_g, k_g, beta, g = q_g[:, 0], k_g[:, 0], beta[:, 0] * valid[:, None], g[:, 0]  # a padding token writes nothing
    slot = state.seen % state.chunk_size
    state.gdn_k.copy_(put_slot(state.gdn_k, slot, k_g))
    state.gdn_g.copy_(put_slot(state.gdn_g, slot, g))
    state.gdn_beta.copy_(put_slot(state.gdn_beta, slot, beta))
    state.gdn_run.copy_(gdn_token_write(state.gdn_run, k_g, v, beta, g))
    state.gdn_decay.add_(g)
    return gdn_readout(q_g, state.gdn_state, state.gdn_decay, scale)


def close_chunk(state, closing: torch.Tensor, softmax: torch.Tensor, routable: torch.Tensor) -> None:
    """A decode step's chunk close, in place (`NatslLayerState.close_chunks_` for one chunk per row): the open chunk
    of the rows in `closing` [B] bool, routed `softmax` [B, Hkv] bool (`routable` [B] bool: counted in the realised
    fraction). A softmax chunk joins the kept KV if it fits; one that does not fit is written to the GDN state instead
    and counted in `overflow_chunks` (NAtS-L layers; a full-softmax layer's capacity holds the whole context). The
    state the next chunk starts from: `gdn_run` (the chunk's writes, followed token by token) for a linear chunk, the
    chunk-start state decayed for a softmax one. Fixed shapes, no host sync: every row runs the same ops (a row that
    closes nothing writes the kept KV's scratch slots). `modeling.kernels.close_chunk` is this in one Triton launch."""
    C = state.chunk_size
    fits = state.kept_len + C <= state.capacity
    append = closing[:, None] & softmax & fits  # [B,Hkv]
    gdn_end = None
    if state.gdn_state is not None:
        decayed = state.gdn_state * state.gdn_decay.exp()[..., None, None]  # no write: the state only decays
        gdn_end = torch.where(append[..., None, None], decayed, state.gdn_run)
    state.close_chunks_(state.open_k, state.open_v, append[:, None].expand(-1, C, -1), (closing & routable)[:, None],
                        append[:, None], (closing[:, None] & softmax & ~fits)[:, None], closing, gdn_end)
