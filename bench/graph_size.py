"""CPU, no GPU needed: the size of the graph that generate(cache_implementation="static") hands to the
compiler for one decode step, NAtS-L (convert_model, chunk 64) vs its source Llama, at 2 and 4 layers.

Inductor's compile time grows with the graph it lowers; this counts the FX nodes dynamo captures (a
counting backend that then runs the graph eagerly), so the per-layer difference can be read without a
GPU. Small shapes (hidden 256, 8 q / 2 kv heads, head_dim 64), a 300-token prompt, 8 new tokens.

Usage: python bench/graph_size.py --out bench/results/graph_size_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import CompileConfig

from natsl_hf.conversion import convert_model


def graphs_of_one_generate(name: str, layers: int) -> list[dict]:
    shape = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                 max_position_embeddings=4096)
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).eval()
    model = convert_model(source, chunk_size=64) if name == "natsl" else source
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    graphs = []

    def backend(gm, example_inputs):
        ops = Counter(n.op for n in gm.graph.nodes)
        graphs.append({"nodes": len(gm.graph.nodes), **ops})
        return gm.forward
    config = CompileConfig(backend=backend, mode="default", fullgraph=False)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    ids = torch.randint(0, 1000, (1, 300))
    model.generation_config.max_cache_len = 300 + 8
    torch._dynamo.reset()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                       cache_implementation="static", compile_config=config)
    return graphs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    report = {"device": "cpu", "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])), "rows": []}
    for layers in (2, 4):
        for name in ("source", "natsl"):
            graphs = graphs_of_one_generate(name, layers)
            report["rows"].append({"model": name, "layers": layers, "graphs": graphs})
            print(name, layers, graphs, flush=True)
    by = {(r["model"], r["layers"]): sum(g["nodes"] for g in r["graphs"]) for r in report["rows"]}
    report["nodes_per_layer"] = {m: (by[(m, 4)] - by[(m, 2)]) / 2 for m in ("source", "natsl")}
    print(report["nodes_per_layer"])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
