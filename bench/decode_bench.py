"""Decode-step time and cache bytes: NAtS-L (NatslCache) vs the same model's softmax-only path.

A 1B-class Llama shape (Llama-3.2-1B: hidden 2048, 16 layers, 32 q / 8 kv heads, head_dim 64),
random weights, bf16. For each context length T the caches are filled directly (a full-length
prefill of the PyTorch reference would need T x T scores): the baseline `LlamaForCausalLM`
(SDPA) gets a `DynamicCache` with T random keys/values per layer; the NAtS-L model (the same
weights, converted in memory) gets per layer a NatslLayerState with a random routing at softmax
fraction p: the sink chunk plus round(p * routable chunks) chunks per (row, KV group) kept, the
GDN state random. Then a run of `chunk_size` one-token decode steps is timed (CUDA events,
median over repeats) and divided by its length: the NAtS-L step that closes a chunk (routing,
GDN write) is counted at its real frequency, as are the steps in between.

`--model DIR` takes the shape from a NAtS-L checkpoint's config.json instead (weights stay
random: only the shape sets the step time): the NAtS-L model is that config exactly (chunk size,
sink chunks, NAtS-L layers; layers outside `natsl_layers` keep every chunk), the baseline is its
source family (llama / qwen2 / qwen3; others as llama) with the same shape. The report records
that shape under "model", which `natsl-hub` checks before it puts the numbers on the card.

Usage:  python bench/decode_bench.py --out bench/results/decode_<device>.json [--small | --model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

import natsl_hf
from natsl_hf import NatslCache, NatslConfig, NatslForCausalLM
from natsl_hf.modeling.state import NatslLayerState
from natsl_hf.modeling_natsl import CACHE_FIELD


def llama_config(small: bool) -> LlamaConfig:
    if small:
        return LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                       tie_word_embeddings=True)


def natsl_from(llama: LlamaForCausalLM, chunk_size: int) -> NatslForCausalLM:
    c = llama.config
    cfg = NatslConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                      rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
                      chunk_size=chunk_size)
    model = NatslForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected, unexpected
    return model


def checkpoint_models(model_dir: str) -> tuple[torch.nn.Module, NatslForCausalLM, str]:
    """(softmax baseline, NAtS-L model, baseline family) with the shape of the checkpoint in
    `model_dir` (its config.json only; random weights: the step time depends on the shape)."""
    cfg = NatslConfig.from_pretrained(model_dir)
    family = cfg.source_model_type if cfg.source_model_type in ("llama", "qwen2", "qwen3") else "llama"
    base_cfg = AutoConfig.for_model(
        family, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act=cfg.hidden_act,
        rope_parameters=dict(cfg.rope_parameters), tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias, max_position_embeddings=cfg.max_position_embeddings,
    )
    return AutoModelForCausalLM.from_config(base_cfg), NatslForCausalLM(cfg), family


def synthetic_state(cfg: NatslConfig, B: int, T: int, p: float, device, dtype, gen,
                    natsl: bool = True) -> NatslLayerState:
    """A layer state after T tokens (T a multiple of chunk_size); natsl=False: a full-softmax layer,
    every chunk kept, no GDN fields."""
    C, H, D = cfg.chunk_size, cfg.num_key_value_heads, cfg.head_dim
    n_chunks = T // C
    routable = n_chunks - cfg.num_sink_chunks
    keep = cfg.num_sink_chunks + round(p * routable) if natsl else n_chunks  # chunks kept per (row, group)
    L = keep * C
    state = NatslLayerState.allocate(
        batch_size=B, capacity=L, chunk_size=C, num_kv_heads=H, head_dim=D, dtype=dtype, device=device, natsl=natsl,
        hidden_size=cfg.hidden_size, conv_size=cfg.gdn_conv_size, conv_channels=(cfg.num_attention_heads + H) * D,
    )  # what a NatslCache holds
    state.seen.fill_(T)
    state.kept_k[:, :, :L] = torch.randn(B, H, L, D, device=device, generator=gen).to(dtype)
    state.kept_v[:, :, :L] = torch.randn(B, H, L, D, device=device, generator=gen).to(dtype)
    state.kept_len.fill_(L)
    if natsl:
        state.gdn_state.copy_(torch.randn(B, H, D, D, device=device, generator=gen) * 0.1)
        state.gdn_run.copy_(state.gdn_state)
    return state


def time_steps(step, n_warmup: int, n_iter: int, device) -> float:
    for _ in range(n_warmup):
        step()
    times = []
    for _ in range(n_iter):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke run")
    parser.add_argument("--model", metavar="DIR",
                        help="take the model shape from this NAtS-L checkpoint's config.json (default: the "
                        "Llama-3.2-1B shape, chunk 64, every layer NAtS-L)")
    parser.add_argument("--contexts", default="8192,32768,65536")
    parser.add_argument("--fractions", default="0.125,0.25")
    parser.add_argument("--iters", type=int, default=5, help="repeats of a chunk-long run of decode steps")
    args = parser.parse_args(argv)
    if args.small and args.model:
        parser.error("--small and --model both set the model shape; give one")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    contexts = [int(x) for x in args.contexts.split(",")]
    fractions = [float(x) for x in args.fractions.split(",")]
    gen = torch.Generator(device=device).manual_seed(0)
    torch.manual_seed(0)
    if args.model:
        llama, natsl, family = checkpoint_models(args.model)
    else:
        llama, family = LlamaForCausalLM(llama_config(args.small)), "llama"
        natsl = natsl_from(llama, 64)
    llama, natsl = llama.to(device, dtype).eval(), natsl.to(device, dtype).eval()
    llama.config._attn_implementation = "sdpa"
    cfg = natsl.config
    token = torch.randint(0, cfg.vocab_size, (1, 1), device=device)
    rows = []
    for T in contexts:
        # baseline: dense DynamicCache of T tokens + SDPA
        cache = DynamicCache(config=llama.config)
        H, D = cfg.num_key_value_heads, cfg.head_dim
        for i in range(cfg.num_hidden_layers):
            cache.update(torch.randn(1, H, T, D, device=device, generator=gen).to(dtype),
                         torch.randn(1, H, T, D, device=device, generator=gen).to(dtype), i)
        kv_bytes = sum(layer.keys.numel() * 2 * layer.keys.element_size() for layer in cache.layers)
        C = cfg.chunk_size

        def base_step():
            for t in range(C):
                llama(token, **{CACHE_FIELD: cache}, position_ids=torch.full((1, 1), T + t, device=device), use_cache=True)
            for layer in cache.layers:  # back to length T: drop the appended tokens
                layer.keys, layer.values = layer.keys[:, :, :T], layer.values[:, :, :T]

        base_ms = time_steps(base_step, 2, args.iters, device) / C
        rows.append({"context": T, "model": "softmax (DynamicCache + SDPA)", "step_ms": base_ms,
                     "cache_bytes": kv_bytes})
        del cache
        for p in fractions:
            states = [synthetic_state(cfg, 1, T, p, device, dtype, gen, natsl=cfg.is_natsl_layer(i))
                      for i in range(cfg.num_hidden_layers)]
            ncache = NatslCache(cfg)

            def natsl_step():
                for i, s in enumerate(states):  # every repeat from the state after T tokens (steps write in place)
                    layer = ncache.layers[i]
                    layer.state, layer.processed, layer.steps_with_room = s.map(torch.clone), T, 0
                for _ in range(C):
                    natsl(token, **{CACHE_FIELD: ncache}, use_cache=True)

            ms = time_steps(natsl_step, 2, args.iters, device) / C
            for i, s in enumerate(states):
                ncache.layers[i].state = s
            report = ncache.memory_report()
            rows.append({"context": T, "model": f"NAtS-L p={p}", "softmax_fraction": p, "step_ms": ms,
                         "cache_bytes": report["kv_bytes"] + report["state_bytes"],
                         "kv_bytes": report["kv_bytes"], "state_bytes": report["state_bytes"],
                         "full_kv_bytes": report["full_kv_bytes"]})
            del states, ncache
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1 - len(fractions):], indent=None), flush=True)

    result = {
        "benchmark": "decode step, batch 1, one new token: mean over a run of chunk_size steps, median of repeats",
        "command": " ".join([sys.executable, *(sys.argv if argv is None else [os.path.relpath(__file__), *argv])]),
        "device": torch.cuda.get_device_name() if device.type == "cuda"
        else f"CPU {platform.machine() or platform.processor() or ''}".strip(),
        "dtype": str(dtype),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "natsl_hf": natsl_hf.__version__, "python": platform.python_version()},
        "model": {
            **{k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                            "num_key_value_heads", "head_dim", "chunk_size", "intermediate_size",
                                            "vocab_size", "num_sink_chunks")},
            "natsl_layers": list(cfg.natsl_layers),
            "checkpoint": args.model,  # None: the built-in shape (--small or the 1B default)
            "baseline": f"{family} (SDPA), same shape",
        },
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'T':>7} {'model':<32} {'step ms':>9} {'cache MiB':>10}")
    for r in rows:
        print(f"{r['context']:>7} {r['model']:<32} {r['step_ms']:>9.3f} {r['cache_bytes'] / 2**20:>10.1f}")


if __name__ == "__main__":
    main()
