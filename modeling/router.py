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
    if n == 0:
        return routes.prob.sum() * 0.0
    mean_p = (routes.prob * routes.routable).sum() / n
    return loss_weight * torch.relu(mean_p - budget) ** 2
