"""CPU, no GPU needed: the size of the graph that generate(cache_implementation="static") hands to the
compiler for one decode step, NAtS-L (convert_model, chunk 64) vs its source Llama, at 2 and 4 layers.

Inductor's compile time grows with the graph it lowers; this counts the FX nodes dynamo captures (a
counting backend that then runs the graph eagerly), so the per-layer difference can be read without a
GPU. Small shapes (hidden 256, 8 q / 2 kv heads, head_dim 64), a 300-token prompt, 8 new tokens.

Rows "natsl-fused-gdn" / "natsl-fused": the same with the GDN side of the static step
(`reference.gdn_decode_step`), and then also its chunk close (`reference.close_chunk`), wrapped as one
custom op each, as the compiler sees the fused Triton kernels of modeling/kernels/gdn_decode.py and
chunk_close.py on CUDA (one call node each): what those kernels take out of the graph, measured here
without a GPU.

Usage: python bench/graph_size.py --out bench/results/graph_size_cpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections import Counter

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import CompileConfig

from natsl_hf.conversion import convert_model
from natsl_hf.modeling import reference
from natsl_hf.modeling.state import NatslLayerState

_GDN_STEP = reference.gdn_decode_step
_STATE = ("conv_state", "gdn_k", "gdn_g", "gdn_beta", "gdn_run", "gdn_state", "gdn_decay", "seen")


@torch.library.custom_op("natsl_bench::gdn_decode_step",
                         mutates_args=("conv_state", "gdn_k", "gdn_g", "gdn_beta", "gdn_run", "gdn_decay"))
def _gdn_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 valid: torch.Tensor, conv_weight: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
                 conv_state: torch.Tensor, gdn_k: torch.Tensor, gdn_g: torch.Tensor, gdn_beta: torch.Tensor,
                 gdn_run: torch.Tensor, gdn_state: torch.Tensor, gdn_decay: torch.Tensor, seen: torch.Tensor,
                 scale: float) -> torch.Tensor:
    from types import SimpleNamespace

    state = SimpleNamespace(conv_state=conv_state, gdn_k=gdn_k, gdn_g=gdn_g, gdn_beta=gdn_beta, gdn_run=gdn_run,
                            gdn_state=gdn_state, gdn_decay=gdn_decay, seen=seen, chunk_size=gdn_k.shape[1])
    return _GDN_STEP(q, k, v, a, b, valid, conv_weight, A_log, dt_bias, state, scale).clone()


@_gdn_step_op.register_fake
def _(q, k, v, a, *args):
    return q.new_empty(q.shape[0], q.shape[1] // (k.shape[1] // a.shape[1]), v.shape[-1], dtype=torch.float32)


def gdn_step_as_one_op(q, k, v, a, b, valid, conv_weight, A_log, dt_bias, state, scale):
    return _gdn_step_op(q, k, v, a, b, valid, conv_weight, A_log, dt_bias, *(getattr(state, n) for n in _STATE), scale)


_CLOSE = reference.close_chunk
_CLOSED = ("kept_k", "kept_v", "kept_len", "kept_chunks", "closed_chunks", "overflow_chunks", "gdn_state", "gdn_run",
           "gdn_decay", "router_sum")


@torch.library.custom_op("natsl_bench::close_chunk", mutates_args=_CLOSED)
def _close_op(closing: torch.Tensor, softmax: torch.Tensor, routable: torch.Tensor, open_k: torch.Tensor,
              open_v: torch.Tensor, kept_k: torch.Tensor, kept_v: torch.Tensor, kept_len: torch.Tensor,
              kept_chunks: torch.Tensor, closed_chunks: torch.Tensor, overflow_chunks: torch.Tensor,
              gdn_state: torch.Tensor, gdn_run: torch.Tensor, gdn_decay: torch.Tensor, router_sum: torch.Tensor,
              capacity: int) -> None:
    from types import SimpleNamespace

    state = SimpleNamespace(open_k=open_k, open_v=open_v, chunk_size=open_k.shape[1], capacity=capacity,
                            **dict(zip(_CLOSED, (kept_k, kept_v, kept_len, kept_chunks, closed_chunks, overflow_chunks,
                                                 gdn_state, gdn_run, gdn_decay, router_sum))))
    state.close_chunks_ = functools.partial(NatslLayerState.close_chunks_, state)  # the state's own transition
    _CLOSE(state, closing, softmax, routable)


def close_as_one_op(state, closing, softmax, routable):
    _close_op(closing, softmax, routable, state.open_k, state.open_v, *(getattr(state, n) for n in _CLOSED),
              state.capacity)


def small_model(name: str, layers: int):
    """The small random Llama of these CPU measurements ("source"), or its NAtS-L conversion (chunk 64, "natsl"),
    set up for greedy generation of a fixed length."""
    shape = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                 max_position_embeddings=4096)
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).eval()
    model = convert_model(source, chunk_size=64) if name == "natsl" else source
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def cpu_compile_config(backend, fullgraph: bool) -> CompileConfig:
    """generate()'s compile config with `backend`, on the CPU too (transformers compiles on CUDA only unless told)."""
    config = CompileConfig(backend=backend, mode="default", fullgraph=fullgraph)
    config._compile_all_devices = True
    return config


def graphs_of_one_generate(name: str, layers: int) -> list[dict]:
    model = small_model(name, layers)
    graphs = []

    def backend(gm, example_inputs):
        ops = Counter(n.op for n in gm.graph.nodes)
        graphs.append({"nodes": len(gm.graph.nodes), **ops})
        return gm.forward
    config = cpu_compile_config(backend, fullgraph=False)
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
    names = ("source", "natsl", "natsl-fused-gdn", "natsl-fused")
    for layers in (2, 4):
        for name in names:
            reference.gdn_decode_step = gdn_step_as_one_op if name.startswith("natsl-fused") else _GDN_STEP
            reference.close_chunk = close_as_one_op if name == "natsl-fused" else _CLOSE
            try:
                graphs = graphs_of_one_generate(name.split("-")[0], layers)
            finally:
                reference.gdn_decode_step, reference.close_chunk = _GDN_STEP, _CLOSE
            report["rows"].append({"model": name, "layers": layers, "graphs": graphs})
            print(name, layers, graphs, flush=True)
    by = {(r["model"], r["layers"]): sum(g["nodes"] for g in r["graphs"]) for r in report["rows"]}
    report["nodes_per_layer"] = {m: (by[(m, 4)] - by[(m, 2)]) / 2 for m in names}
    print(report["nodes_per_layer"])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
