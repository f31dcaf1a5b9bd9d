"""Which stage-1 routing target keeps a needle's chunk (issue 22: the needle lags because of routing).

On needle contexts of bench/eval_quality.py (one "The special magic number for KEY is N." line in held-out prose,
then its question and answer, as the recall blocks of the training data hold them), every NAtS-L layer of a model
is run as full softmax attention (route_override, `router_fit._on_source`: what the router fit reads) and its
`attention_profile` (modeling/router.py) scores the chunks by each candidate target:

  sum    sum_j A[j, c] / sum_j E[j, c] over the far query chunks j (`chunk_attention_mass` until 2026-12-04, then
         with distance bins of a quarter octave past 8 chunks)
  max    max_j A[j, c] / E[j, c]: the one later query chunk that looks at c most, over what its distance predicts
         (`chunk_attention_mass` since)

Per (context, layer, KV head) the needle's chunk (the one holding the line's last token) counts as kept when it
ranks among the `round(budget * n)` best of the layer's n labelled chunks (`routing_targets`, the layer's budget).
The JSON gives each target's kept share (mean over contexts, layers and heads; by layer; by context), against the
budget (what a chunk drawn at random gets), and the share of the sum's targets that the max keeps too. The needle at
depth 0 lies in the sink chunk (softmax anyway, never a target), at depth 1 next to its question (no far query).

    python bench/needle_target_probe.py --model /tmp/mat/natsl --text runs/recovery-data/heldout.txt \\
        --contexts 16 --length 2048 --out bench/results/needle_target_probe_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time

import torch

from eval_quality import NEEDLE, build_retrieval_context, haystack_sentences, load_model, probe_query


def load_haystack(text: str) -> list[str]:
    """The held-out text's sentences, the haystack of bench/eval_quality.py's needle contexts."""
    from natsl_hf.conversion.data import load_texts_or_ids

    return [s for t in load_texts_or_ids(text)[1] for s in haystack_sentences(t)]


def needle_rows(tokenizer, haystack: list[str], length: int, depths: list[float], rng: random.Random
                ) -> list[tuple[torch.Tensor, int]]:
    """One needle row per depth as the recall blocks hold it (context + question + answer, ids [1, T]) and the
    position of the needle line's last token (bench/eval_quality.py's contexts, drawn from `rng` in order)."""
    rows = []
    for depth in depths:
        ids, pairs, line_tokens = build_retrieval_context(tokenizer, length, 1, rng, haystack, NEEDLE, depth)
        question, answer = probe_query(tokenizer, NEEDLE, *pairs[0])
        rows.append((torch.tensor([ids + question + answer]), max(line_tokens)))
    return rows


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from natsl_hf.conversion.router_fit import _on_source
    from natsl_hf.modeling.layer import apply_rope
    from natsl_hf.modeling.router import attention_profile, routing_targets

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a NAtS-L checkpoint (bench/recover_scale.py --materialize)")
    p.add_argument("--text", required=True, help="held-out text: the haystack")
    p.add_argument("--contexts", type=int, default=16)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, "cpu", torch.float32)
    config = model.config
    depths = [i / max(args.contexts - 1, 1) for i in range(args.contexts)]
    rows = needle_rows(tokenizer, load_haystack(args.text), args.length, depths, random.Random(args.seed))
    kept = {"sum": [], "max": []}  # per context: [layers, Hkv] bool
    overlap = []
    for depth, (row, line_end) in zip(depths, rows):
        needle_chunk = line_end // config.chunk_size
        per = {name: [] for name in kept}

        def score(i, attn, hidden_states, position_embeddings):
            q, k, _ = attn._project(hidden_states)
            cos, sin = position_embeddings
            A, E, far = attention_profile(apply_rope(q, cos, sin), apply_rope(k, cos, sin), attn.chunk_size,
                                          attn.scaling, config.num_sink_chunks)
            ratio = torch.where(E > 0, A / E.clamp(min=1e-30), torch.zeros_like(A))  # [1, Hkv, Nq, N]
            masses = {"sum": (A * far).sum(2) / E.sum(2).clamp(min=1e-30), "max": ratio.amax(2)}  # [1, Hkv, N]
            N = A.shape[-1]
            routable = (torch.arange(N) >= config.num_sink_chunks)[None, :, None].expand(1, N, A.shape[1])
            targets = {}
            for name, mass in masses.items():
                mass = torch.where(far.any(0), mass, torch.full_like(mass, float("nan"))).transpose(1, 2)  # [1, N, Hkv]
                targets[name] = routing_targets(mass, routable, attn.softmax_budget)[0]
                per[name].append(targets[name][0, needle_chunk])
            overlap.append(float((targets["max"] & targets["sum"]).sum() / targets["sum"].sum().clamp(min=1)))

        _on_source(model, [{"input_ids": row}], score)
        for name in kept:
            kept[name].append(torch.stack(per[name]))  # [layers, Hkv]
        print(f"depth {depth:.2f}: needle chunk kept by sum {float(kept['sum'][-1].float().mean()):.2f}, "
              f"by max {float(kept['max'][-1].float().mean()):.2f}", flush=True)
    budgets = [config.layer_softmax_budget(i, config.softmax_budget) for i in config.natsl_layers]
    result = {
        "command": shlex.join([sys.executable, *sys.argv]), "model": args.model, "contexts": args.contexts,
        "length": args.length, "budget_mean": sum(budgets) / len(budgets),
        "needle_chunk_kept": {name: float(torch.stack(v).float().mean()) for name, v in kept.items()},
        "needle_chunk_kept_by_layer": {name: torch.stack(v).float().mean((0, 2)).tolist() for name, v in kept.items()},
        "needle_chunk_kept_by_context": {name: torch.stack(v).float().mean((1, 2)).tolist() for name, v in kept.items()},
        "max_targets_shared_with_sum": sum(overlap) / len(overlap),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "seconds": time.perf_counter() - t0,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("needle_chunk_kept", "budget_mean", "max_targets_shared_with_sum")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
