"""Can a chunk's pooled hidden state tell a later-looked-up line from its haystack? (issue 22: the routers rank the
needle's chunk only in the top ~21-24 % of chunks, bench/retrieval_oracle_probe.py)

    python bench/router_pooling_probe.py --model runs/smollm2-natsl-p10 --text runs/carry-h/heldout.txt \\
        --contexts 24 --length 2048 --out bench/results/router_pooling_probe_smollm2_cpu.json

On eval_quality's retrieval contexts (one probe line in held-out prose, depths spread evenly) of three templates
(the needle, the passkey, and an "account" line no data of this repository holds), each NAtS-L layer's (normed)
input is pooled per complete routable chunk in several ways, and a linear probe (L2 logistic regression on
standardised features; label: the chunk holds a line token) is fitted on two templates and scored on the third
(ROC AUC, and the line's rank share: the share of the row's other chunks scored above it, as in the oracle
probe). Beside it, the served routers' own p(softmax) (mean over KV heads) on the held-out template, and the
mean-pooled probe fitted on the activations router_fit fits on (every chunk softmax: "mean@softmax") but scored on
the served ones (what a router fitted there sees when it serves). If the
mean-pooled probe separates the line across templates, the router's input holds the signal and its fit (targets,
data) is the lever; if only another pooling does, the router's input is. fp32, eager, CPU or GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import eval_quality as eq  # noqa: E402
from retrieval_oracle_probe import single_line_contexts, write_record  # noqa: E402

ACCOUNT = eq.Probe("The password of the {key} account is {value}.",
                   " Question: what is the password of the {key} account? Answer: The password of the {key} account is",
                   6)
POOLINGS = ("mean", "max", "mean+max", "mean+std")


def pooled(x: torch.Tensor, how: str) -> torch.Tensor:
    """x [N, C, D] (complete chunks) -> [N, F]."""
    parts = {"mean": [x.mean(1)], "max": [x.amax(1)], "mean+max": [x.mean(1), x.amax(1)],
             "mean+std": [x.mean(1), x.std(1)]}[how]
    return torch.cat(parts, -1)


@torch.no_grad()
def collect(model, contexts, device, override: str | None = None) -> list[dict]:
    """Per context: per NAtS-L layer the [N, C, D] chunks of its input, the served p(softmax) [N] (mean over heads),
    and the label [N] (the chunk holds a line token); sink chunks left out. override="softmax": every chunk routed
    softmax (the activations router_fit fits on, `_on_source`), not the served routes."""
    from natsl_hf.modeling.layer import NatslAttention

    C, sink = model.config.chunk_size, model.config.num_sink_chunks
    attns = [m for m in model.modules() if isinstance(m, NatslAttention)]
    seen = {}
    hooks = [a.register_forward_pre_hook(lambda m, args, kw: seen.__setitem__(m.layer_idx, (kw.get("hidden_states")
             if "hidden_states" in kw else args[0]).detach()), with_kwargs=True) for a in attns]
    rows = []
    model.config.route_override = override
    try:
        for ids, _, tokens in contexts:
            seen.clear()
            out = model(torch.tensor([ids], device=device), use_cache=False, output_routes=True)
            N = len(ids) // C
            label = torch.zeros(N, dtype=torch.bool)
            label[[t // C for t in tokens if t // C < N]] = True
            row = {"label": label[sink:], "layers": {}}
            for layer_idx, routes in enumerate(out.routes):
                if layer_idx not in seen or routes.hard.shape[1] == 0:
                    continue
                x = seen[layer_idx][0, : N * C].float().unflatten(0, (N, C))[sink:]
                row["layers"][layer_idx] = (x.cpu(), routes.prob[0, sink:N].float().mean(-1).cpu())
            rows.append(row)
    finally:
        model.config.route_override = None
        for h in hooks:
            h.remove()
    return rows


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 200) -> tuple:
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    pos = y.float().mean().clamp(1e-3, 1 - 1e-3)
    weight = torch.where(y, 0.5 / pos, 0.5 / (1 - pos))  # balanced classes
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.float(), weight=weight)
                + l2 * w.square().sum())
        loss.backward()
        return loss
    opt.step(closure)
    return lambda q: ((q - mu) / sd) @ w.detach() + b.detach()


def rank_shares(rows_scores: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Per row: the share of non-line chunks scored above the line's best chunk."""
    out = []
    for score, label in rows_scores:
        if label.any() and (~label).any():
            out.append(float((score[~label] > score[label].max()).float().mean()))
    return out


def summary_of(rows_scores) -> dict:
    from natsl_hf.conversion.router_fit import roc_auc

    score = torch.cat([s for s, _ in rows_scores])
    label = torch.cat([lab for _, lab in rows_scores])
    shares = torch.tensor(rank_shares(rows_scores))
    return {"auc": roc_auc(score, label), "rank_share_median": float(shares.median()),
            "rank_share_under_0.25": float((shares < 0.25).float().mean())}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the recovered NAtS-L model folder (e.g. the README main job's output)")
    p.add_argument("--text", required=True, help="held-out text (eval_quality's --text)")
    p.add_argument("--contexts", type=int, default=24, help="contexts per template")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--l2", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = eq.load_model(args.model, device, torch.float32)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    build = single_line_contexts(tokenizer, args.text, args.length, args.contexts, args.seed)
    probes = {"needle": eq.NEEDLE, "passkey": eq.PASSKEY, "account": ACCOUNT}
    data, fit_domain = {}, {}
    for task, probe in probes.items():
        contexts = build(probe)
        data[task] = collect(model, contexts, device)
        fit_domain[task] = collect(model, contexts, device, "softmax")
        print(task, "collected", round(time.time() - t0), "s", flush=True)
    layers = sorted(data["needle"][0]["layers"])
    results = {}
    for held in probes:
        train = [r for task, rows in data.items() if task != held for r in rows]
        test = data[held]
        per_layer = {}
        for layer in layers:
            row = {"router": summary_of([(r["layers"][layer][1], r["label"]) for r in test])}
            for how in POOLINGS:
                x = torch.cat([pooled(r["layers"][layer][0], how) for r in train])
                y = torch.cat([r["label"] for r in train])
                f = fit_logistic(x, y, args.l2)
                row[how] = summary_of([(f(pooled(r["layers"][layer][0], how)), r["label"]) for r in test])
            # the mean-pooled probe fitted where router_fit fits (every chunk softmax), scored on served activations
            x = torch.cat([pooled(r["layers"][layer][0], "mean") for task, rows in fit_domain.items() if task != held
                           for r in rows])
            f = fit_logistic(x, torch.cat([r["label"] for r in train]), args.l2)
            row["mean@softmax"] = summary_of([(f(pooled(r["layers"][layer][0], "mean")), r["label"]) for r in test])
            per_layer[layer] = row
        results[held] = per_layer
        print(held, {k: round(sum(per_layer[layer][k]["auc"] for layer in layers) / len(layers), 3)
                     for k in ("router", *POOLINGS, "mean@softmax")}, flush=True)
    # per held-out wording and layer span: each measure's mean over the span's layers (per layer: AUC, the median rank
    # share over the rows, the share of rows under 0.25)
    spans = {"0-13": range(0, 14), "14-29": range(14, 30)}
    scorers, measures = ("router", *POOLINGS, "mean@softmax"), ("auc", "rank_share_median", "rank_share_under_0.25")
    summary = {}
    for held, res in results.items():
        for name, span in spans.items():
            in_span = [layer for layer in span if layer in res]
            summary.setdefault(held, {})[name] = {k: {m: sum(res[layer][k][m] for layer in in_span) / len(in_span)
                                                      for m in measures} for k in scorers}
    write_record(args.out, "bench/router_pooling_probe.py", argv, device, t0, length=args.length,
                 contexts=args.contexts, l2=args.l2, summary=summary, per_layer=results)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
