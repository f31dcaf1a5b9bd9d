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
precision = budget), for each `--l2`. The samples and the fit are stage 1's own (conversion/router_fit.py:
`collect_routing_samples`, `fit_router`). Writes JSON with the exact command.
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
    p.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    args = p.parse_args(argv)

    import transformers
    from transformers import AutoTokenizer

    import natsl_hf
    from natsl_hf.conversion.data import load_packed_dataset
    from natsl_hf.conversion.router_fit import collect_routing_samples, fit_router, roc_auc
    from natsl_hf.modeling import NatslRouter

    torch.manual_seed(0)
    t0 = time.time()
    model = natsl_hf.NatslForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)

    def blocks(path, n):
        ids = load_packed_dataset(path, tok, args.seq_len, max_blocks=n)["input_ids"]
        return [{"input_ids": torch.tensor([row])} for row in ids]

    fit_data = collect_routing_samples(model, blocks(args.train, args.blocks))
    test_data = collect_routing_samples(model, blocks(args.heldout, args.heldout_blocks))
    cfg = model.config
    budget = cfg.softmax_budget
    rows = []
    for layer, (xs, ys, ls), (xt, yt, lt) in zip(cfg.natsl_layers, fit_data, test_data):
        for l2 in args.l2:
            router = NatslRouter(cfg.hidden_size, cfg.num_key_value_heads)
            train_auc = fit_router(router, xs, ys, ls, cfg.router_temperature, l2)
            with torch.no_grad():
                margin = (lambda s: s[..., 0] - s[..., 1])(router(xt))  # [n, H]
            for h in range(ys.shape[1]):
                score, y = margin[lt[:, h], h], yt[lt[:, h], h]
                k = max(1, int(round(budget * len(y))))
                rows.append({
                    "layer": layer, "kv_head": h, "l2": l2, "train_chunks": int(ls[:, h].sum()),
                    "heldout_chunks": len(y), "train_auc_mean_heads": train_auc, "heldout_auc": roc_auc(score, y),
                    "heldout_top_budget_precision": float(y[score.topk(k).indices].float().mean()),
                    "heldout_positive_rate": float(y.float().mean()),
                })
            print(json.dumps(rows[-1]), flush=True)
    keys = ("heldout_auc", "heldout_top_budget_precision", "heldout_positive_rate")
    mean = {str(l2): {key: sum(r[key] for r in rows if r["l2"] == l2) / sum(r["l2"] == l2 for r in rows) for key in keys}
            for l2 in args.l2}
    report = {
        "command": "python " + shlex.join(["bench/router_probe.py", *argv]),
        "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "natsl_hf": natsl_hf.__version__},
        "settings": vars(args), "softmax_budget": budget, "chunk_size": cfg.chunk_size,
        "mean_by_l2": mean, "rows": rows, "seconds": round(time.time() - t0, 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(mean, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
