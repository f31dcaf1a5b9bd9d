"""Fit the NAtS-L routers to the source attention, and calibrate their biases to the softmax budget.

Two steps of the recovery recipe (conversion/trainer.py runs them; conversion/smollm2.py and
bench/router_probe.py call them directly), both on unpadded packed blocks:

- `fit_routers`: on a freshly converted model (every chunk softmax, so it computes its source exactly),
  collect each layer's supervised-routing samples (`collect_routing_samples`: chunk mean hidden states,
  and as targets the `softmax_budget` share of chunks the source attention's later queries attend to
  most, modeling/router.py) and fit each router to them outright by logistic regression (`fit_router`):
  the convex problem stage 1's cross-entropy poses, which a few hundred SGD steps barely start on.
- `calibrate_router_bias`: layer by layer, shift each router's bias so that plain argmax routing keeps
  `budget` of the routable chunks as softmax per KV head; inference then keeps the budget with no
  budget logic of its own.

`apply_in(decoder_layer)` (both functions): the context a layer's router is written in (FSDP: that
unit's `summon_full_params`); None writes directly.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .layers import natsl_decoder_layers, unwrap


def fit_router(router: nn.Module, means: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor,
               temperature: float, l2: float) -> float:
    """Fit a router to supervised-routing targets: per KV head an L2-regularised logistic regression of
    the target on the chunk's mean hidden state (full batch, LBFGS: the convex problem the stage-1
    cross-entropy poses, solved outright instead of by a few SGD steps), written into the router so
    that its margin s_softmax - s_linear = temperature * logit.

    means: [n, D] fp32, target / labelled: [n, H] bool. Features are standardised for the fit and the
    scaling folded back into the weights. Returns the mean training ROC AUC over heads.
    """
    H, D = target.shape[1], means.shape[1]
    mu, sd = means.mean(0), means.std(0).clamp_min(1e-6)
    z = (means - mu) / sd
    w = torch.zeros(D, H, requires_grad=True)
    c = torch.zeros(H, requires_grad=True)
    y, m = target.float(), labelled.float()
    opt = torch.optim.LBFGS([w, c], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        bce = F.binary_cross_entropy_with_logits(z @ w + c, y, reduction="none")
        loss = (bce * m).sum(0).div(m.sum(0).clamp_min(1)).sum() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, c = w.detach(), c.detach()
    w_eff = w / sd[:, None] * temperature  # margin weights on raw means, [D, H]
    b_eff = (c - (mu / sd) @ w) * temperature  # [H]
    with torch.no_grad():
        proj = router.proj
        proj.weight[0::2] = (w_eff.T / 2).to(proj.weight)  # row 2h: softmax score, row 2h+1: linear score
        proj.weight[1::2] = (-w_eff.T / 2).to(proj.weight)
        proj.bias[0::2] = (b_eff / 2).to(proj.bias)
        proj.bias[1::2] = (-b_eff / 2).to(proj.bias)
    logits = z @ w + c
    aucs = [roc_auc(logits[labelled[:, h], h], target[labelled[:, h], h]) for h in range(H)]
    aucs = [a for a in aucs if a == a]
    return sum(aucs) / len(aucs) if aucs else float("nan")


def roc_auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC AUC by ranks; NaN without both classes."""
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = torch.empty_like(score)
    ranks[score.argsort()] = torch.arange(1, len(score) + 1, dtype=score.dtype)
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


LOOKED_UP = "looked_up"  # a fit batch's [B, T] bool: tokens that a later query of the same block retrieves


def model_inputs(batch: dict) -> dict:
    """A fit / calibration batch without its `LOOKED_UP` labels: what the model's forward takes."""
    return {k: v for k, v in batch.items() if k != LOOKED_UP}


# The fit and the calibration read and stop forwards at router hooks, and the samples switch the config's
# route_override: they run the layers eagerly (on CUDA the layer's dense path is torch.compile'd, which would
# trace the hooks and compile a graph for the override, all for one pass).
@torch.compiler.set_stance("force_eager")
@torch.no_grad()
def _on_source(model: nn.Module, batches, per_layer) -> None:
    """Run `batches` (unpadded blocks) through `model` with every chunk routed softmax, i.e. as the source
    model, and call `per_layer(i, attn, hidden_states, position_embeddings)` for each NAtS-L layer i (in
    order) with that layer's inputs of each batch."""
    base = unwrap(model)
    attns = [d.self_attn for d in natsl_decoder_layers(base)]
    inputs: dict[int, tuple] = {}
    hooks = [a.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[:2]))
             for i, a in enumerate(attns)]
    override, base.config.route_override = base.config.route_override, "softmax"  # = the source model
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            if mask is not None and not bool(mask.all()):
                raise ValueError("Routing samples are taken from unpadded blocks (packed training blocks).")
            model(**model_inputs(batch), use_cache=False, logits_to_keep=1)
            for i, attn in enumerate(attns):
                per_layer(i, attn, *inputs[i])
    finally:
        for h in hooks:
            h.remove()
        base.config.route_override = override
        model.train(was_training)


def looked_up_chunks(looked_up: torch.Tensor, chunk_size: int, num_chunks: int, num_sink_chunks: int) -> torch.Tensor:
    """[B, T] bool tokens -> [B, num_chunks] bool: the routable (non-sink) complete chunks holding one."""
    keep = looked_up[:, : num_chunks * chunk_size].unflatten(1, (num_chunks, chunk_size)).any(2)
    keep[:, :num_sink_chunks] = False
    return keep


def collect_routing_samples(model: nn.Module, batches) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per NAtS-L layer (in order), the supervised-routing samples of `batches` (unpadded blocks) with every
    chunk routed softmax, i.e. on the source model's activations: (chunk means [n, D], targets [n, H],
    labelled [n, H]) on the CPU (`NatslAttention.routing_samples`).

    A batch may carry `LOOKED_UP` ([B, T] bool: what a later query of its block retrieves, e.g. the lines of a
    recall block, `bench/recover_scale.py`'s fit set). [ours] Every chunk holding such a token is then labelled
    softmax in every layer and KV head, whatever its attention mass (also where no query lies two chunks later, which
    the mass leaves unlabelled: the block's question retrieves it): the routing target anticipates the query.
    Why: on the recovered SmolLM2, keeping the looked-up line's chunk in every layer and head gives the needle
    1.00 and the passkey 0.96 (the source: 0.96 / 0.88) at +0.02 softmax fraction, and a linear probe of the chunk
    means that is fitted on two line wordings ranks the third wording's line above every other chunk of its row
    in most rows (median rank share 0.00-0.01), where the routers fitted to attention mass alone rank it at
    0.09-0.38 (bench/retrieval_oracle_probe.py, bench/router_pooling_probe.py; bench/RECOVERY_NOTES.md): the
    signal is in the router's input, and the attention-mass labels, positive for the line only in the layers and
    heads whose source attention looks it up, do not teach it."""
    samples: dict[int, list] = {}
    for batch in batches:
        batch = dict(batch)
        looked_up = batch.pop(LOOKED_UP, None)

        def collect(i, attn, hidden_states, position_embeddings, looked_up=looked_up):
            means, target, labelled = attn.routing_samples(hidden_states, position_embeddings)  # [B, N, *]
            if looked_up is not None:
                keep = looked_up_chunks(looked_up.to(target.device), attn.chunk_size, target.shape[1],
                                        attn.config.num_sink_chunks)
                target, labelled = target | keep[..., None], labelled | keep[..., None]
            samples.setdefault(i, []).append(tuple(t.flatten(0, 1).cpu() for t in (means, target, labelled)))

        _on_source(model, [batch], collect)
    return [tuple(torch.cat(parts) for parts in zip(*samples[i])) for i in sorted(samples)]


def source_chunk_scores(model: nn.Module, batches) -> list[torch.Tensor]:
    """Per NAtS-L layer (in order), the stage-1 score of every routable chunk of `batches` on the source's
    activations (`NatslAttention.chunk_mass`: attention from far queries over what the chunk's distance predicts;
    NaN where no query lies two chunks later): [B_total, N - num_sink_chunks, Hkv] fp32 on the CPU."""
    sinks = unwrap(model).config.num_sink_chunks
    scores: dict[int, list] = {}

    def score(i, attn, hidden_states, position_embeddings):
        scores.setdefault(i, []).append(attn.chunk_mass(hidden_states, position_embeddings)[:, sinks:].float().cpu())

    _on_source(model, batches, score)
    return [torch.cat(scores[i]) for i in sorted(scores)]


def budget_shares(scores: list[torch.Tensor], budget: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One threshold over every layer's scores (`source_chunk_scores`, NaN = unknown) that keeps `budget` of
    them, and each layer's share of its own scores above it -> (threshold, shares [layers]). Scores exactly at
    the threshold (ties: those that distance alone explains are all exactly 1 when a block has one distance bin)
    share what the budget leaves, so that the layers keep `budget` in all."""
    known = [s[~s.isnan()] for s in scores]
    if any(k.numel() == 0 for k in known):
        raise ValueError("allocate_layer_budgets needs blocks of at least num_sink_chunks + 3 chunks (a routable "
                         "chunk with a query two chunks later); give longer blocks.")
    threshold = torch.quantile(torch.cat(known), 1 - budget)
    above = torch.tensor([float((k > threshold).sum()) for k in known])  # [layers]
    at = torch.tensor([float((k == threshold).sum()) for k in known])
    counts = torch.tensor([float(k.numel()) for k in known])
    ties = ((budget * counts.sum() - above.sum()) / at.sum()).clamp(0, 1) if at.sum() > 0 else 0.0
    return threshold, (above + ties * at) / counts


def allocate_layer_budgets(model: nn.Module, batches, budget: float | None = None) -> list[float]:
    """Share the softmax budget among the NAtS-L layers by what their source attention needs, and write it to
    `config.layer_budget_scale` (returned: the budget of every decoder layer).

    On the freshly converted model (every chunk softmax: the source's activations), each NAtS-L layer scores
    its routable chunks of `batches` by `chunk_attention_mass` (`source_chunk_scores`: what stage 1 labels by).
    One threshold over all layers and KV heads keeps `budget` (default config.softmax_budget) of the chunks; a
    layer's share of it is the share of its own chunks above that threshold (`budget_shares`). A layer whose
    attention only decays with distance (scores near 1: the GDN state's decay serves it) gets little, one whose
    queries look far back at particular chunks gets more. The multipliers are normalised to mean 1 over the
    NAtS-L layers, so the model keeps `budget` overall (each layer at most 1). bench/budget_allocation_probe.py
    shows the allocation on the real SmolLM2."""
    config = unwrap(model).config
    budget = config.softmax_budget if budget is None else budget
    _, share = budget_shares(source_chunk_scores(model, batches), budget)
    scale = share / share.mean().clamp(min=1e-12)
    layer_scale = [1.0] * config.num_hidden_layers
    for layer_idx, value in zip(config.natsl_layers, scale.tolist()):
        layer_scale[layer_idx] = value
    config.layer_budget_scale = layer_scale
    return [config.layer_softmax_budget(i, budget) for i in range(config.num_hidden_layers)]


def fit_routers(model: nn.Module, batches, l2: float = 1e-2, apply_in=None) -> dict[str, float]:
    """Fit every NAtS-L router to its supervised-routing targets on the source's activations.

    Run on the freshly converted model (stage-1 start): with every chunk routed softmax it computes
    its source exactly, so one eval pass over `batches` gives each layer the source's inputs, which is
    also what stage-1 training feeds it (`collect_routing_samples`). Per layer, `fit_router`.
    `apply_in(decoder_layer)`: context to write the router in (FSDP). Returns the mean labelled
    chunks per head, the mean training AUC over the layers that have one, and how many have none (a layer whose
    budget labels no chunk softmax, e.g. layer 0 of SmolLM2 at budget 0.125, or every chunk: one class only).
    """
    base = unwrap(model)
    decoders = natsl_decoder_layers(base)
    aucs, counts = [], []
    for d, (means, target, labelled) in zip(decoders, collect_routing_samples(model, batches)):
        with apply_in(d) if apply_in else contextlib.nullcontext():
            aucs.append(fit_router(d.self_attn.router, means, target, labelled, base.config.router_temperature, l2))
        counts.append(float(labelled.sum(0).float().mean()))
    return fit_summary(aucs, counts)


def fit_summary(aucs: list[float], counts: list[float]) -> dict[str, float]:
    """The summary of a fit from its layers' training AUCs (NaN: a layer with one class of target only) and labelled
    chunks per head: the mean AUC over the layers that have one, how many have none, the mean labelled chunks."""
    scored = [a for a in aucs if a == a]
    return {"router_fit_train_auc": sum(scored) / len(scored) if scored else float("nan"),
            "router_fit_layers_without_auc": len(aucs) - len(scored),
            "router_fit_chunks_per_head": sum(counts) / len(counts)}


class _StopForward(Exception):
    """Raised by a router hook once the layer being calibrated has its scores: the rest of the forward
    (later layers, the LM head) is not needed."""


@torch.compiler.set_stance("force_eager")  # see _on_source
@torch.no_grad()
def _router_margins(model: nn.Module, layers: list[nn.Module], batches, only: int | None = None
                    ) -> tuple[list[torch.Tensor], float]:
    """Eval-mode forwards over `batches`: per NAtS-L layer the score margins s_softmax - s_linear of
    every chunk, [chunks, H] with NaN where not routable, and the realised softmax fraction.
    only: collect layer `only`'s margins alone and stop each forward right after its router (the
    others stay empty, the fraction is NaN); unpadded blocks only (packed calibration blocks are)."""
    margins: list[list[torch.Tensor]] = [[] for _ in layers]
    scores: dict[int, torch.Tensor] = {}

    def hook(i):
        def save(module, args, out):
            scores[i] = out.float()
            if i == only:
                raise _StopForward
        return save

    hooks = [attn.router.register_forward_hook(hook(i)) for i, attn in enumerate(layers)]
    was_training = model.training
    model.eval()
    n_softmax = n_routable = 0
    try:
        for batch in batches:
            if only is not None:
                mask = batch.get("attention_mask")
                if mask is not None and not bool(mask.all()):
                    raise ValueError("Calibration with `only` takes unpadded blocks.")
                try:
                    model(**model_inputs(batch), use_cache=False, logits_to_keep=1)
                except _StopForward:
                    pass
                s, attn = scores[only], layers[only]  # [B, N, H, 2]
                T, N = batch["input_ids"].shape[1], s.shape[1]
                chunk = torch.arange(N, device=s.device)
                routable = ((chunk + 1) * attn.chunk_size <= T) & (chunk >= attn.config.num_sink_chunks)  # [N]
                margin = (s[..., 0] - s[..., 1]).masked_fill(~routable[None, :, None], float("nan"))
                margins[only].append(margin.flatten(0, 1))
                continue
            out = model(**model_inputs(batch), use_cache=False, output_routes=True, logits_to_keep=1)
            for i, routes in enumerate(out.routes):
                s = scores[i]  # [B, N, H, 2]
                routable = routes.routable[:, : s.shape[1]]  # [B, N, H]
                margins[i].append((s[..., 0] - s[..., 1]).masked_fill(~routable, float("nan")).flatten(0, 1))
                n_softmax += int((routes.hard & routes.routable).sum())
                n_routable += int(routes.routable.sum())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    fraction = n_softmax / n_routable if n_routable else float("nan")
    return [torch.cat(m) if m else torch.empty(0) for m in margins], fraction


def budget_thresholds(margins: torch.Tensor, budget: float) -> torch.Tensor:
    """Per head: the margin threshold above which `round(budget * n)` of the n routable chunks lie,
    midway between the k-th and (k+1)-th largest margin. margins: [chunks, H] (NaN = not routable)."""
    thresholds = []
    for col in margins.unbind(1):
        col = col[~col.isnan()].sort(descending=True).values
        n, k = col.numel(), int(round(budget * col.numel()))
        if n == 0:
            thresholds.append(0.0)
        elif k == 0:
            thresholds.append(float(col[0]) + 1.0)
        elif k == n:
            thresholds.append(float(col[-1]) - 1.0)
        else:
            thresholds.append(float(col[k - 1] + col[k]) / 2)
    return torch.tensor(thresholds)


def calibrate_router_bias(model: nn.Module, batches, budget: float, apply_in=None, stop_early: bool = True
                          ) -> dict[str, float]:
    """Shift each NAtS-L router's bias so that argmax routing keeps `budget` of the routable chunks.

    Layer by layer, first to last (a layer's routing changes the inputs of the layers after it): the
    score margins s_softmax - s_linear of the routable chunks of `batches` (dicts with input_ids /
    attention_mask) are collected in eval mode with the earlier layers already shifted; per KV head,
    with k = round(b * n) (b: the layer's share of `budget`, `config.layer_softmax_budget`), the threshold
    midway between the k-th and (k+1)-th largest margin is subtracted from the margin through the bias.
    Afterwards k of those n chunks route softmax in every layer and head, and each router keeps its ranking.
    `apply_in(decoder_layer)`: the context manager to shift that layer's router bias in (FSDP: summon_full_params of that layer's unit only). One
    forward pass over `batches` per NAtS-L layer, plus one after (logits of the last position only);
    with `stop_early` (unpadded blocks; not under FSDP) the passes for layers after the first stop
    at the router being calibrated.
    Returns the realised fraction over all layers before and after (measured).
    """
    base = unwrap(model)
    decoders = natsl_decoder_layers(base)
    layers = [d.self_attn for d in decoders]
    margins, before = _router_margins(model, layers, batches)
    for i, attn in enumerate(layers):
        if i > 0:  # the earlier layers' new routing changed what this router reads
            margins, _ = _router_margins(model, layers, batches, only=i if stop_early else None)
        shift = budget_thresholds(margins[i], base.config.layer_softmax_budget(attn.layer_idx, budget))
        with torch.no_grad(), (apply_in(decoders[i]) if apply_in else contextlib.nullcontext()):
            bias = attn.router.proj.bias  # [H * 2]: (softmax, linear) score bias per head
            bias.add_(torch.stack([-shift / 2, shift / 2], -1).flatten().to(bias))
    _, after = _router_margins(model, layers, batches)
    return {"softmax_fraction_before": before, "softmax_fraction_after": after}


__all__ = ["LOOKED_UP", "allocate_layer_budgets", "budget_shares", "budget_thresholds", "calibrate_router_bias", "collect_routing_samples", "fit_router",
           "fit_routers", "fit_summary", "roc_auc", "source_chunk_scores"]
