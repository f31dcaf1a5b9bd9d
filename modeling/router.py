"""The NAtS-L router: chunk scores and the hard / straight-through routing decision.

SPEC.md section 2. For chunk t of a sequence and routing head g (one per KV head, i.e. one
decision per GQA group):

    score[t, g] = W_r mean(x_[t]) + b_r          # [..., 0] softmax, [..., 1] linear (GDN)
    h[t, g]     = argmax(score) == 0              # hard route, 1 = softmax (ties -> softmax)
    p[t, g]     = softmax(score / temperature)[0] # router probability of softmax
    m[t, g]     = h + (p - stopgrad(p))           # value h, derivative 1 w.r.t. p

Only complete chunks are routed. Sink chunks (the first `num_sink_chunks` of a sequence) are
always softmax and carry no router gradient; `route_override` forces every routable chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class NatslRouter(nn.Module):
    """Linear map from a chunk's mean hidden state to 2 scores per routing (KV) head.

    Initialised (NatslPreTrainedModel._init_weights) with weight N(0, initializer_range) and a
    bias margin `router_init_bias` (default 2) in favour of softmax: a freshly converted layer
    routes (nearly) every chunk to softmax and so starts (nearly) equal to its source attention,
    while the weight already tells chunks apart.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.proj = nn.Linear(hidden_size, num_heads * 2, bias=True)

    def forward(self, chunk_mean: torch.Tensor) -> torch.Tensor:
        # chunk_mean: [B, N, D] (fp32) -> scores [B, N, H, 2] (fp32)
        scores = nn.functional.linear(chunk_mean, self.proj.weight.float(), self.proj.bias.float())
        return scores.unflatten(-1, (self.num_heads, 2))


@dataclass
class Routes:
    """Routing decisions of the chunks routed in one call, all [B, N, H] (N = chunks in the call).

    hard:      bool, True = softmax.
    weight:    float, value == hard, carries the straight-through gradient (m in SPEC.md).
    prob:      float, p(softmax) (fp32; zeros where not routable).
    routable:  bool, complete non-sink chunks whose route the router decided.
    """

    hard: torch.Tensor
    weight: torch.Tensor
    prob: torch.Tensor
    routable: torch.Tensor


def decide_routes(
    scores: torch.Tensor | None,
    complete: torch.Tensor,
    sink: torch.Tensor,
    temperature: float,
    override: str | None,
    num_heads: int,
) -> Routes:
    """Turn chunk scores into routes.

    scores: [B, N, H, 2] fp32, or None for a layer without router (full softmax layer).
    complete, sink: [B, N] bool. Incomplete chunks get route softmax (their tokens are served
    by softmax inside the chunk until it closes; nothing later reads their route).
    """
    B, N = complete.shape
    device = complete.device
    routable = (complete & ~sink)[..., None].expand(B, N, num_heads)
    if scores is None:
        ones = torch.ones(B, N, num_heads, device=device)
        return Routes(ones.bool(), ones, torch.zeros_like(ones), torch.zeros_like(routable))
    prob = torch.softmax(scores / temperature, dim=-1)[..., 0]
    hard = scores[..., 0] >= scores[..., 1]
    if override is not None:
        hard = torch.full_like(hard, override == "softmax")
    hard = torch.where(routable, hard, torch.ones_like(hard))
    weight = hard.to(prob.dtype)
    if override is None and torch.is_grad_enabled() and prob.requires_grad:
        weight = weight + torch.where(routable, prob - prob.detach(), torch.zeros_like(prob))
    prob = torch.where(routable, prob, torch.zeros_like(prob))
    return Routes(hard, weight, prob, routable)


def router_loss(routes: Routes, budget: float, loss_weight: float) -> torch.Tensor:
    """`loss_weight * (mean p_softmax over routable chunks - budget)_+^2` (0 if nothing routable)."""
    n = routes.routable.sum()
    # no branch on n (a host sync per layer and step): with nothing routable mean_p = 0 and the hinge is 0
    mean_p = (routes.prob * routes.routable).sum() / n.clamp(min=1)
    return loss_weight * torch.relu(mean_p - budget) ** 2


# --- supervised routing (stage-1 distillation of a converted model) ------------------------------
# [ours] A converted model's router starts without any notion of which chunks matter. Trained only by
# the straight-through gradient and the budget hinge, it drifts uniformly (one shared bias) until the
# realised fraction collapses (SmolLM2-135M, budget 0.25: no softmax chunk left after 25 stage-1 steps;
# `bench/smollm2_recover.py --routing unsupervised`). Stage 1 therefore teaches the router the chunks
# the source attention itself relies on for *long-range* retrieval (heavy hitters, as in H2O /
# SnapKV), `softmax_budget` of them per row and KV group, with a binary cross-entropy on the score
# margin. During supervised training the layer routes by these targets, so the GDN branch learns
# exactly the chunks it will be given.
#
# A chunk's importance is the attention that queries at least one chunk later put on it, relative to
# the uniform share each query gives a chunk (C / the number of keys it sees), averaged over those
# queries and the group's q heads. Relative, because raw probabilities favour early chunks (their
# queries see few keys); "one chunk later", because the next chunk's queries attend to their
# neighbour for local reasons the GDN state already serves (it holds chunk t-1's writes, barely
# decayed, when chunk t reads it). A chunk without such queries in the block is not labelled.


@torch.no_grad()
def chunk_attention_mass(q: torch.Tensor, k: torch.Tensor, chunk_size: int, scale: float) -> torch.Tensor:
    """Long-range attention each complete chunk receives, relative to a uniform share.

    q: [B, T, Hq, D], k: [B, T, Hkv, D], RoPE'd (the source attention's q and k), whole unpadded
    sequences. Attention is full causal softmax (every earlier token visible), as in the source.
    -> mass [B, T // C, Hkv] fp32: for chunk c and KV group g, the mean over the group's q heads and
    over the queries i of chunks >= c + 2 of P_i(chunk c) * (i + 1) / C (1 = what uniform attention
    gives); NaN for a chunk with no such query.

    P_i(chunk c) for every query and chunk is one attention call whose values are the chunks' indicator
    columns (`F.scaled_dot_product_attention` with v [T, N] one-hot: a fused kernel, the [T, T] probabilities
    never stored), in the autocast dtype when autocast is on (training: bf16; the targets are a ranking, which
    bf16 probabilities keep), else in q's dtype.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G, C, N = Hq // Hkv, chunk_size, T // chunk_size
    device = q.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else q.dtype
    pos = torch.arange(T, device=device)
    with torch.autocast(device.type, enabled=False):
        keys = k.to(dtype).transpose(1, 2).repeat_interleave(G, 1)  # [B,Hq,T,D] (GQA spelled out: any backend)
        indicator = (pos[:, None] // C == torch.arange(N, device=device)).to(dtype)  # [T, N]; a tail chunk: no column
        values = indicator.expand(B, Hq, T, N).contiguous()
        share = F.scaled_dot_product_attention(q.to(dtype).transpose(1, 2), keys, values, is_causal=True, scale=scale)
        far = torch.arange(N, device=device) <= pos[:, None] // C - 2  # [T, N] chunk two chunks back or more
        weight = far * (pos[:, None] + 1) / C  # P * (keys seen) / C
        total = (share.float() * weight).unflatten(1, (Hkv, G)).sum((2, 3))  # [B, Hkv, N]
        queries = (T - (torch.arange(N, device=device) + 2) * C).clamp(min=0) * G  # (query, head) pairs
        mass = total / queries.clamp(min=1)
        mass = torch.where(queries > 0, mass, torch.full_like(mass, float("nan")))
    return mass.transpose(1, 2)


def routing_targets(mass: torch.Tensor, routable: torch.Tensor, budget: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Supervised routes: per row and KV group, the `round(budget * n)` of its n labelled chunks with
    the most attention mass are softmax.

    mass: [B, N, H] (NaN = unknown), routable: [B, N, H] bool
    -> target [B, N, H] bool (True = softmax), labelled [B, N, H] bool (routable with a known mass).
    """
    labelled = routable & ~mass.isnan()
    keep = (budget * labelled.sum(1, keepdim=True)).round().long()  # [B,1,H]
    rank = mass.masked_fill(~labelled, float("-inf")).argsort(1, descending=True).argsort(1)
    return labelled & (rank < keep), labelled


def routing_supervision_loss(scores: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor,
                             temperature: float) -> torch.Tensor:
    """Binary cross-entropy of p(softmax) = sigmoid((s_0 - s_1) / temperature) against the targets,
    averaged over labelled chunks. scores: [B, N, H, 2]; target, labelled: [B, N, H]."""
    margin = (scores[..., 0] - scores[..., 1]) / temperature
    loss = F.binary_cross_entropy_with_logits(margin, target.to(margin.dtype), reduction="none")
    return (loss * labelled).sum() / labelled.sum().clamp(min=1)  # 0 with nothing labelled, no host branch
