"""Can a router tell a needle's chunk from prose by what it reads? (issue 22: the needle lags because of routing)

The routers are linear maps of a chunk's mean hidden state (modeling/router.py). This probe fits, per NAtS-L layer,
the stage-1 targets (`NatslAttention.routing_samples`: today's `chunk_attention_mass`) on needle contexts of
bench/eval_quality.py (with their question and answer, as the training data's recall blocks hold them) by the same
logistic regression as `router_fit.fit_router`, from two router inputs:

  mean      the chunk's mean hidden state (the router's input today)
  mean+max  the mean and the element-wise max over the chunk's tokens

and scores it on other needle contexts (other keys, values, depths and haystack): the needle chunk's rank among the
routable chunks of its row and KV head (1 = ranked first, 0.5 = as a random chunk), averaged over heads and contexts,
and the share of (context, head) pairs where it ranks within the layer's budget. The model runs as full softmax
(route_override, `router_fit._on_source`), as the router fit does.

    python bench/router_input_probe.py --model /tmp/mat2/old93 --text runs/recovery-data/heldout.txt \\
        --fit-contexts 24 --test-contexts 8 --out bench/results/router_input_probe_smollm2_93m.json
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time

import torch

from eval_quality import load_model
from needle_target_probe import load_haystack, needle_rows


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from natsl_hf.conversion.router_fit import _on_source, fit_router

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a NAtS-L checkpoint (bench/recover_scale.py --materialize)")
    p.add_argument("--text", required=True, help="held-out text: the haystack")
    p.add_argument("--fit-contexts", type=int, default=24)
    p.add_argument("--test-contexts", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, "cpu", torch.float32)
    config = model.config
    C, sinks = config.chunk_size, config.num_sink_chunks
    haystack = load_haystack(args.text)

    def samples(rows):
        """Per layer: features {name: [n, F]}, targets / labelled [n, H], and each row's needle chunk index."""
        per_layer: dict[int, list] = {}

        def collect(i, attn, hidden_states, position_embeddings):
            means, target, labelled = attn.routing_samples(hidden_states, position_embeddings)  # [1, N, *]
            N = means.shape[1]
            peak = hidden_states[:, : N * C].float().unflatten(1, (N, C)).amax(2)  # [1, N, D]
            per_layer.setdefault(i, []).append((means[0], torch.cat([means, peak], -1)[0], target[0], labelled[0]))

        for ids, _ in rows:
            _on_source(model, [{"input_ids": ids}], collect)
        return per_layer

    def depths(n):  # spread over (0.1, 0.9): away from the sink chunk and from the question
        return [0.1 + 0.8 * i / max(n - 1, 1) for i in range(n)]

    fit_rows = needle_rows(tokenizer, haystack, args.length, depths(args.fit_contexts), random.Random(1))
    test_rows = needle_rows(tokenizer, haystack, args.length, depths(args.test_contexts), random.Random(2))
    fit, test = samples(fit_rows), samples(test_rows)
    needle = [token // C for _, token in test_rows]
    layers = []
    for i in sorted(fit):
        result = {"layer": config.natsl_layers[i]}
        budget = model.model.layers[config.natsl_layers[i]].self_attn.softmax_budget
        for f, name in ((0, "mean"), (1, "mean+max")):
            X = torch.cat([s[f] for s in fit[i]])
            y, m = torch.cat([s[2] for s in fit[i]]), torch.cat([s[3] for s in fit[i]])
            router = torch.nn.Module()
            router.proj = torch.nn.Linear(X.shape[1], 2 * y.shape[1])
            train_auc = fit_router(router, X, y, m, 1.0, 0.1)
            ranks, kept = [], []
            for sample, c in zip(test[i], needle):
                scores = router.proj(sample[f]).unflatten(-1, (-1, 2))  # [N, H, 2]
                margin = scores[..., 0] - scores[..., 1]  # [N, H]
                routable = torch.arange(margin.shape[0]) >= sinks
                for h in range(margin.shape[1]):
                    col = margin[routable, h]
                    rank = float((col < margin[c, h]).float().mean())  # share of routable chunks below the needle's
                    ranks.append(rank)
                    kept.append(rank >= 1 - budget)
            result[name] = {"train_auc": train_auc, "needle_rank": sum(ranks) / len(ranks),
                            "needle_within_budget": sum(kept) / len(kept)}
        layers.append(result)
        print(json.dumps(result), flush=True)
    def mean(values):  # over the layers where it is defined (a fit AUC needs both classes)
        values = [v for v in values if v == v]
        return sum(values) / len(values) if values else float("nan")

    summary = {name: {k: mean([r[name][k] for r in layers]) for k in ("train_auc", "needle_rank", "needle_within_budget")}
               for name in ("mean", "mean+max")}
    report = {"command": shlex.join([sys.executable, *sys.argv]), "model": args.model, "length": args.length,
              "fit_contexts": args.fit_contexts, "test_contexts": args.test_contexts, "summary": summary,
              "layers": layers, "versions": {"torch": torch.__version__}, "seconds": time.perf_counter() - t0}
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
