"""How well can a NAtS-L router predict its supervised targets? A linear probe on a converted model.

    python bench/router_probe.py --model CONVERTED_DIR --train TRAIN.txt --heldout HELDOUT.txt \\
        --out bench/results/router_probe_X.json [--seq-len 1024 --blocks 48 --heldout-blocks 16]

The router reads one thing per chunk and KV group: the mean of the layer's (normed) input over
the chunk, through a linear map. Stage 1 trains it on targets from the source attention
(`routing_targets` of `chunk_attention_mass`: the `softmax_budget` share of chunks that later
queries attend to most, relative to a uniform share). This script measures, per NAtS-L layer and
KV head, how predictable those targets are from that input, independently of the SGD budget of a
stage-1 run: it collects (chunk mean, target) pairs from the converted model (which computes its
source's attention at init) on packed blocks of the training text, fits an L2-regularised logistic
regression (full batch, LBFGS: the best a linear router can do on these samples), and reports on
held-out blocks the ROC AUC and the precision of the top `budget` share (random routing: AUC 0.5,
precision = budget). Writes JSON with the exact command.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def collect(model, blocks: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per NAtS-L layer: chunk means [n, D], targets [n, H] (bool), labelled [n, H] (bool)."""
    from natsl_hf.modeling.layer import apply_rope
    from natsl_hf.modeling.router import chunk_attention_mass, routing_targets

    layers = {i: layer.self_attn for i, layer in enumerate(model.model.layers) if layer.self_attn.natsl}
    inputs: dict[int, tuple] = {}
    hooks = [attn.register_forward_pre_hook(
        lambda m, args, i=i: inputs.__setitem__(i, (args[0], args[1]))) for i, attn in layers.items()]
    out: dict[int, list] = {i: [] for i in layers}
    try:
        for block in blocks:
            model(block[None], use_cache=False, logits_to_keep=1)
            for i, attn in layers.items():
                x, (cos, sin) = inputs[i]
                q = attn.q_proj(x).unflatten(-1, (attn.num_heads, attn.head_dim))
                k = attn.k_proj(x).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
                if attn.config.qk_norm:
                    q, k = attn.q_norm(q), attn.k_norm(k)
                mass = chunk_attention_mass(apply_rope(q, cos, sin), apply_rope(k, cos, sin), attn.chunk_size,
                                            attn.scaling)  # [1, N, H]
                N, C = mass.shape[1], attn.chunk_size
                routable = (torch.arange(N) >= attn.config.num_sink_chunks)[None, :, None].expand_as(mass)
                target, labelled = routing_targets(mass, routable, attn.config.softmax_budget)
                means = x[0, : N * C].float().unflatten(0, (N, C)).mean(1)  # [N, D]
                out[i].append((means, target[0], labelled[0]))
    finally:
        for h in hooks:
            h.remove()
    return {i: tuple(torch.cat(parts) for parts in zip(*rows)) for i, rows in out.items()}


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch L2-regularised logistic regression (LBFGS) on standardised features."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def auc(score: torch.Tensor, y: torch.Tensor) -> float:
    """ROC AUC by ranks (ties averaged)."""
    pos, neg = int(y.sum()), int((1 - y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = score.argsort()
    ranks = torch.empty_like(score)
    ranks[order] = torch.arange(1, len(score) + 1, dtype=score.dtype)
    return float((ranks[y.bool()].sum() - pos * (pos + 1) / 2) / (pos * neg))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a natsl-convert output (routes at init = the source's attention)")
    p.add_argument("--train", required=True, help="text the probe is fitted on")
    p.add_argument("--heldout", required=True, help="text it is scored on")
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--blocks", type=int, default=48)
    p.add_argument("--heldout-blocks", type=int, default=16)
    p.add_argument("--l2", type=float, default=1e-3)
    args = p.parse_args(argv)

    import transformers
    from transformers import AutoTokenizer

    import natsl_hf
    from natsl_hf.conversion.data import load_packed_dataset

    torch.manual_seed(0)
    t0 = time.time()
    model = natsl_hf.NatslForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    train = torch.tensor(load_packed_dataset(args.train, tok, args.seq_len, max_blocks=args.blocks)["input_ids"])
    held = torch.tensor(load_packed_dataset(args.heldout, tok, args.seq_len, max_blocks=args.heldout_blocks)["input_ids"])
    fit_data, test_data = collect(model, train), collect(model, held)
    budget = model.config.softmax_budget
    rows = []
    for layer in fit_data:
        xs, ys, ls = fit_data[layer]
        xt, yt, lt = test_data[layer]
        mu, sd = xs.mean(0), xs.std(0).clamp_min(1e-6)
        for h in range(ys.shape[1]):
            x, y = (xs[ls[:, h]] - mu) / sd, ys[ls[:, h], h].float()
            w, b = fit_logistic(x, y, args.l2)
            xh, yh = (xt[lt[:, h]] - mu) / sd, yt[lt[:, h], h].float()
            score = xh @ w + b
            k = max(1, int(round(budget * len(yh))))
            rows.append({
                "layer": layer, "kv_head": h, "train_chunks": len(y), "heldout_chunks": len(yh),
                "train_auc": auc(x @ w + b, y), "heldout_auc": auc(score, yh),
                "heldout_top_budget_precision": float(yh[score.topk(k).indices].mean()),
                "heldout_positive_rate": float(yh.mean()),
            })
            print(json.dumps(rows[-1]), flush=True)
    mean = {key: sum(r[key] for r in rows) / len(rows)
            for key in ("train_auc", "heldout_auc", "heldout_top_budget_precision", "heldout_positive_rate")}
    report = {
        "command": "python " + shlex.join(["bench/router_probe.py", *argv]),
        "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "natsl_hf": natsl_hf.__version__},
        "settings": vars(args), "softmax_budget": budget, "chunk_size": model.config.chunk_size,
        "mean": mean, "rows": rows, "seconds": round(time.time() - t0, 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(mean, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
