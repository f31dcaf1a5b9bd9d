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

    @classmethod
    def none(cls, batch_size: int, num_heads: int, device) -> "Routes":
        """The routes of a call that routes no chunk, [B, 0, H]: a decode step, a full-softmax layer."""
        empty = torch.zeros(batch_size, 0, num_heads, device=device)
        return cls(empty.bool(), empty, empty.clone(), empty.bool())


def decide_routes(
    scores: torch.Tensor,
    complete: torch.Tensor,
    sink: torch.Tensor,
    temperature: float,
    override: str | None,
    num_heads: int,
) -> Routes:
    """Turn chunk scores into routes.

    scores: [B, N, H, 2] fp32.
    complete, sink: [B, N] bool. Incomplete chunks get route softmax (their tokens are served
    by softmax inside the chunk until it closes; nothing later reads their route).
    """
    B, N = complete.shape
    routable = (complete & ~sink)[..., None].expand(B, N, num_heads)
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


def router_loss(routes: Routes, budget, loss_weight: float) -> torch.Tensor:
    """`loss_weight * (mean p_softmax over routable chunks - budget)_+^2` (0 if nothing routable); budget: a
    float or a 0-d tensor."""
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
# A chunk's importance is how much more attention the later query chunk that looks at it most (at least two
# chunks later) puts on it than their positions and distance alone predict. "At least two chunks later", because
# the next chunk's queries attend to their neighbour for local reasons the GDN state already serves (it holds chunk
# t-1's writes, barely decayed, when chunk t reads it). "Than position and distance predict", because both
# bias raw attention: a query that sees few keys gives each a large share, and attention decays with
# distance, so the last chunks of a block (scored only by near queries) looked heavy whatever they held. A
# router trained on such targets learns "near the end of the block" (from the pretrained model's sense of
# context length) and keeps more chunks the longer the context (bench/router_length_probe.py measured it:
# calibrated at 2048, 0.50 kept at 4096). The targets below compare each chunk with the attention expected
# of a chunk at its distance from a query at that position, so a chunk is kept for what it holds.


@torch.no_grad()
def attention_profile(q: torch.Tensor, k: torch.Tensor, chunk_size: int, scale: float, num_sink_chunks: int = 0,
                      iterations: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention each query chunk puts on each earlier chunk, and what position and distance predict of it.

    q: [B, T, Hq, D], k: [B, T, Hkv, D], RoPE'd (the source attention's q and k), whole unpadded sequences.
    Attention is full causal softmax (every earlier token visible), as in the source.
    -> (A [B, Hkv, Nq, N]: the attention the queries of chunk j (and the group's q heads) put on chunk c in total,
        expected [B, Hkv, Nq, N]: the fitted a[j] * b[j - c] (0 where j < c + 2, and where the fit has no pair of
        that query chunk or distance: pairs of a sink only),
        far [Nq, N] bool: j >= c + 2), Nq = query chunks (a tail chunk included), N = complete chunks; fp32.

    The model A[j, c] ~ a[j] * b[j - c] over the pairs j >= c + 2 (a: per row, group and query chunk, the
    queries' count and spread; b: per group and chunk distance, the distance profile, pooled over the rows; one
    value per distance, so that attention which only decays with distance fits it exactly) is fitted by alternating
    the two factors' maximum-likelihood updates (Poisson, i.e. iterative proportional fitting; `iterations` fixed,
    no host sync), on the non-sink chunks (the sinks are softmax anyway and would dominate the profile).

    A[j, c] for every query and chunk comes from one attention call whose values are the chunks' indicator
    columns (`F.scaled_dot_product_attention` with v [T, N] one-hot: a fused kernel, the [T, T] probabilities
    never stored), in the autocast dtype when autocast is on (training: bf16; the targets are a ranking, which
    bf16 probabilities keep), else in q's dtype.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G, C, N = Hq // Hkv, chunk_size, T // chunk_size
    Nq = -(-T // C)  # query chunks, a tail chunk included
    device = q.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else q.dtype
    pos = torch.arange(T, device=device)
    with torch.autocast(device.type, enabled=False):
        keys = k.to(dtype).transpose(1, 2).repeat_interleave(G, 1)  # [B,Hq,T,D] (GQA spelled out: any backend)
        indicator = (pos[:, None] // C == torch.arange(N, device=device)).to(dtype)  # [T, N]; a tail chunk: no column
        values = indicator.expand(B, Hq, T, N).contiguous()
        share = F.scaled_dot_product_attention(q.to(dtype).transpose(1, 2), keys, values, is_causal=True, scale=scale)
        share = F.pad(share.float(), (0, 0, 0, Nq * C - T))  # [B, Hq, Nq * C, N]
        A = share.unflatten(2, (Nq, C)).sum(3).unflatten(1, (Hkv, G)).sum(2)  # [B, Hkv, Nq, N]
        distance = torch.arange(Nq, device=device)[:, None] - torch.arange(N, device=device)  # [Nq, N]
        far = distance >= 2
        fit = far & (torch.arange(N, device=device) >= num_sink_chunks)
        onehot = (distance[..., None] == torch.arange(Nq, device=device)).float()  # [Nq, N, distance]
        fit_bins, far_bins = onehot * fit[..., None], onehot * far[..., None]
        b = torch.ones(Hkv, Nq, device=device)  # distance profile
        for _ in range(iterations):
            a = (A * fit).sum(3) / torch.einsum("gk,jck->gj", b, fit_bins).clamp(min=1e-30)  # [B, Hkv, Nq]
            b = torch.einsum("bgjc,jck->gk", A, fit_bins) / torch.einsum("bgj,jck->gk", a, fit_bins).clamp(min=1e-30)
        expected = a[..., None] * torch.einsum("gk,jck->gjc", b, far_bins)  # [B, Hkv, Nq, N]
    return A, expected, far


@torch.no_grad()
def chunk_attention_mass(q: torch.Tensor, k: torch.Tensor, chunk_size: int, scale: float,
                         num_sink_chunks: int = 0, iterations: int = 8) -> torch.Tensor:
    """Long-range attention each complete chunk receives from the later query chunk that looks at it most, over
    what a chunk at its distance would get from that query chunk.

    q, k as `attention_profile` -> mass [B, T // C, Hkv] fp32 (1 = what position and distance predict; NaN for a
    chunk with no query two chunks later): mass[c] = max over c's far query chunks j of A[j, c] / (a[j] b[j - c]).
    Uniform attention and attention that only decays with distance give every chunk ~1.

    [ours] The maximum, not the ratio of the sums over j (the target until 2026-12-04): what a later query looks up
    must stay softmax, and a line that one question retrieves (a needle: one query chunk of ~30 in a 2k block) was
    diluted by the ~30 query chunks that do not look at it. bench/needle_target_probe.py on the recovered SmolLM2
    (bench/results/needle_target_probe_smollm2_80m.json, 16 needles at 2k at depths 0..1): the needle's chunk is
    among a layer's targets in 0.55 of the (layer, KV head) pairs by the maximum against 0.40 by the sums (the
    budget: 0.25; the 14 needles neither in the sink chunk nor next to their question; over all 16, 0.48 against
    0.35, and 0.75 against 0.50 in layers 14-24). The distance profile has one value per chunk distance (it had
    quarter-octave bins past 8 chunks): within a wide bin the nearer pairs beat the bin's mean, which the sums
    averaged out but a maximum would pick up as a bias towards chunks with far queries.
    """
    A, expected, far = attention_profile(q, k, chunk_size, scale, num_sink_chunks, iterations)
    ratio = torch.where(expected > 0, A / expected.clamp(min=1e-30), torch.zeros_like(A))  # [B, Hkv, Nq, N]; 0 near
    mass = torch.where(far.any(0), ratio.amax(2), torch.full_like(ratio[:, :, 0], float("nan")))  # [B, Hkv, N]
    return mass.transpose(1, 2)


def routing_targets(mass: torch.Tensor, routable: torch.Tensor, budget) -> tuple[torch.Tensor, torch.Tensor]:
    """Supervised routes: per row and KV group, the `round(budget * n)` of its n labelled chunks with
    the most attention mass are softmax (budget: a float or a 0-d tensor).

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
