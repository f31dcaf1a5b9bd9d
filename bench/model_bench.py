"""Model-level NAtS-L vs its source, side by side on one GPU, as a user runs them (issues 14 and 15).

The source is a Llama-3.2-1B-shaped `LlamaForCausalLM` (hidden 2048, 16 layers, 32 q / 8 kv heads,
head_dim 64, random weights, bf16, SDPA); NAtS-L is its conversion with the project's own
`convert_model` (every layer NAtS-L, chunk 64, one sink chunk). Random routes at softmax fraction p:
each router gets random weights, and before each row a bias calibrated on that row's own prompt so
that p of its routable chunks go softmax per layer and KV head (gdn_alpha stays 0, so the routers'
inputs do not depend on the routing); the realised fraction is measured and reported.

Rows (all in one JSON, `{"device", "versions", "command", "rows"}`):
  decode     tok/s of `generate()` (greedy, batch B, context T): source with its default DynamicCache
             ("source-default") and with `cache_implementation="static"` ("source-static", which
             transformers compiles), NAtS-L with `cache_implementation="static"` (NatslStaticCache,
             compiled the same way). tok/s = B * 128 / (time of 144 new tokens - time of 16), so the
             prefill cancels out; compile time (the first call) is reported apart. peak_gb = peak memory
             of the 144-token call.
  prefill    ms of one forward with last-token logits, no cache (torch.cuda events, median of 3).
  train_step ms of forward + backward with labels, gradient checkpointing (no optimizer step).
  train_profile  (not in the default sections) the 8k train step once more under the torch profiler: GPU
             kernels and busy time, host syncs, aten ops, top kernels and CPU ops (train_bench.summarize).
  max_batch  the largest batch at 32k context whose prefill + 4 new tokens fit, from the measured peak
             memory at batch 1 and 2 (linear in the batch), then checked by running it.
  profile    CUDA kernels, cudaGraphLaunch calls and host syncs per decode step (torch profiler), eager
             and compiled.
             Static rows also time a first call at a second cache length (`recompile_s`: that call minus a
             warm one; `second_cache_len`: the next step of `static_cache_length` past 1.3 x the first).
  server     (not in the default sections) one process, one model: generate() at SERVER_SHAPES in turn, nothing
             freed between calls; per call seconds, memory allocated after it, peak, or the error.
  natsl-inlined  (decode + profile sections) the 8k decode and profile rows again with the decoder layers'
             decode step inlined into the compiled step instead of one compile region per layer kind
             (`modeling_natsl.decode_step` / `decode_step_region`): the region's before / after in the same run.

Usage (GPU):  python bench/model_bench.py --out bench/results/model_bench_h200.json [--sections decode,prefill]
              [--contexts 8192,32768] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import traceback

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import natsl_hf
from natsl_hf import NatslCache, NatslStaticCache
from natsl_hf.cache import static_cache_length
from natsl_hf.conversion import convert_model

from decode_bench import time_steps  # CUDA-event median, as the decode bench times its steps

SHAPE = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
             tie_word_embeddings=True, max_position_embeddings=131072)
N_SHORT, N_LONG = 16, 144  # new tokens of the two generate() calls whose difference is timed


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "natsl_hf": natsl_hf.__version__}
    for name in ("triton", "fla"):
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 - recorded, not fatal
            out[name] = f"not importable: {err}"
    return out


def build_models(quick: bool):
    shape = dict(SHAPE, num_hidden_layers=2) if quick else SHAPE
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).to(torch.bfloat16)
    natsl = convert_model(source, chunk_size=64)
    for m in (source, natsl):
        m.to("cuda").eval()
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = 0
    return source, natsl


@torch.no_grad()
def random_routers(natsl, seed: int = 0) -> None:
    g = torch.Generator(device=natsl.device).manual_seed(seed)
    for layer in natsl.model.layers:
        router = layer.self_attn.router
        router.proj.weight.normal_(0.0, 1.0 / natsl.config.hidden_size ** 0.5, generator=g)
        router.proj.bias.zero_()


class _Stop(Exception):
    pass


@torch.compiler.set_stance("force_eager")  # each forward stops at a router hook: no compile for that
@torch.no_grad()
def calibrate_routes(natsl, p: float, ids: torch.Tensor) -> None:
    """Router biases that keep p of the routable chunks of `ids` [B, T] softmax, per layer and KV head,
    layer by layer (a layer's routing changes what the softmax branch shows later layers), each forward
    stopped at the router being calibrated. On each row's own prompt: the chunk means drift with
    position, so a bias fitted at one length routes a different share at another."""
    sinks = natsl.config.num_sink_chunks
    for layer in natsl.model.layers:
        router = layer.self_attn.router
        margins = []

        def save(module, args, out):
            margins.append((out[0, sinks:, :, 0] - out[0, sinks:, :, 1]).float())  # [N, Hkv]
            raise _Stop
        hook = router.register_forward_hook(save)
        for b in range(ids.shape[0]):  # one row at a time: the prefill memory of batch 1
            try:
                natsl(ids[b : b + 1], use_cache=False, logits_to_keep=1)
            except _Stop:
                pass
        hook.remove()
        bias = router.proj.bias.view(-1, 2)
        bias[:, 0] -= torch.quantile(torch.cat(margins), 1.0 - p, dim=0)  # p of the chunks above it
    natsl.config.softmax_budget = p  # sizes NatslStaticCache's default kept capacity (2 x budget)


def dynamo_counts() -> dict:
    """torch._dynamo's running totals: graphs compiled, frames that broke, recompiles (guard failures)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0}


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def free(*models):
    """Drop what generate() keeps on a model between calls (transformers' earlier `_cache`, its worst-case length),
    so that each row's peak is its own."""
    for m in models:
        for name in ("_cache", "_previous_max_cache_length"):
            if hasattr(m, name):
                delattr(m, name)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def prompt(batch: int, T: int, seed: int = 1) -> torch.Tensor:
    """[batch, T] random tokens, one row repeated: random prompts differ in their chunk-mean statistics
    so much that one router bias routes 0 % of one prompt and 85 % of another (seen at 16k x 32); with
    equal rows the calibrated fraction holds in every row (the step time does not depend on the tokens)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, SHAPE["vocab_size"], (1, T), device="cuda", generator=g).expand(batch, T).contiguous()


def reset_routes(model, name: str, p, ids) -> None:
    """NAtS-L rows: routers re-calibrated to fraction p on this row's prompt (bias only)."""
    if name.startswith("natsl"):
        for layer in model.model.layers:
            layer.self_attn.router.proj.bias.data.zero_()
        calibrate_routes(model, p, ids)


def realised_fraction(natsl, ids) -> float:
    with torch.no_grad():
        out = natsl(ids[:1], use_cache=False, logits_to_keep=1)
    return None if out.softmax_fraction is None else float(out.softmax_fraction)


def decode_row(model, name: str, T: int, batch: int, p, cache_implementation) -> dict:
    ids = prompt(batch, T)
    reset_routes(model, name, p, ids[:1])
    mask = torch.ones_like(ids)
    model.generation_config.max_cache_len = T + N_LONG  # one cache shape for both calls: no recompile

    def gen(n):
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              cache_implementation=cache_implementation)

    free(model)
    first = sync_time(lambda: gen(N_SHORT))  # compiles (static caches)
    short = min(sync_time(lambda: gen(N_SHORT)) for _ in range(2))
    torch.cuda.reset_peak_memory_stats()
    long = sync_time(lambda: gen(N_LONG))
    row = {"kind": "decode", "model": name, "T": T, "batch": batch, "p": p,
           "tok_s": batch * (N_LONG - N_SHORT) / (long - short), "ms_per_step": 1e3 * (long - short) / (N_LONG - N_SHORT),
           "peak_gb": torch.cuda.max_memory_allocated() / 2**30, "first_call_s": first, "compile_s_estimate": first - short}
    if name.startswith("natsl"):
        row["realised_fraction"] = realised_fraction(model, ids)
    if cache_implementation == "static":  # a second cache length (the next step of static_cache_length's scale past
        # 1.25 x this one): what a new max_new_tokens or prompt costs a user once the first call compiled
        model.generation_config.max_cache_len = static_cache_length(math.ceil(1.3 * (T + N_LONG)), 1 << 30)
        row["second_cache_len"] = model.generation_config.max_cache_len
        row["recompile_s"] = sync_time(lambda: gen(N_SHORT)) - short
    model.generation_config.max_cache_len = None
    return row


# (context, batch) of the server row's calls: the sequence in which issue 24 saw the source run out of memory and
# NAtS-L fail in torch's CUDA-graph trees, then a short call again
SERVER_SHAPES = ((8192, 1), (32768, 1), (65536, 1), (16384, 32), (8192, 1))


def server_row(model, name: str, p, shapes=SERVER_SHAPES) -> dict:
    """A long-lived process as a server runs one (issue 24): generate(cache_implementation="static") at several sizes
    in turn, one model, nothing freed between calls (generate keeps its cache on the model, as it does for a user).
    Per call: seconds, memory allocated after it and its peak, or the error; the call that fails does not stop the
    sequence."""
    calls = []
    free(model)
    for T, batch in shapes:
        ids = prompt(batch, T, seed=T + batch)
        reset_routes(model, name, p, ids[:1])
        torch.cuda.reset_peak_memory_stats()
        call = {"T": T, "batch": batch}
        try:
            call["s"] = sync_time(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_SHORT,
                                                         min_new_tokens=N_SHORT, do_sample=False,
                                                         cache_implementation="static"))
        except Exception as e:  # noqa: BLE001 - the row records what a server would have seen
            call["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        call["allocated_after_gb"] = torch.cuda.memory_allocated() / 2**30
        call["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        calls.append(call)
        print(json.dumps({"server": name, **call}), flush=True)
    free(model)
    return {"kind": "server", "model": name, "p": p, "calls": calls, "errors": sum("error" in c for c in calls),
            "max_allocated_after_gb": max(c["allocated_after_gb"] for c in calls)}


def inlined_layers(row_fn):
    """`row_fn` with the decoder layers' decode step inlined into the compiled step (`modeling_natsl.decode_step`,
    what ran before each layer kind became one compile region, `decode_step_region`), between two dynamo resets:
    the region's before and after in one run (rows "natsl-inlined"). (The fused kernels' A/B that this slot held,
    rows "natsl-torch-step", is in results/model_bench_h100_decode_profile_8k_kernels.json.)"""
    from natsl_hf import modeling_natsl

    def row(*args):
        region = modeling_natsl.decode_step_region
        torch._dynamo.reset()
        modeling_natsl.decode_step_region = modeling_natsl.decode_step
        try:
            return row_fn(*args)
        finally:
            modeling_natsl.decode_step_region = region
            torch._dynamo.reset()

    row.__name__ = f"inlined_{row_fn.__name__}"
    return row


def prefill_row(model, name, T, p) -> dict:
    ids = prompt(1, T)
    reset_routes(model, name, p, ids)
    free(model)
    with torch.no_grad():
        ms = time_steps(lambda: model(ids, use_cache=False, logits_to_keep=1), 0, 3, ids.device)
    row = {"kind": "prefill", "model": name, "T": T, "batch": 1, "p": p, "ms": ms,
           "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
    if name.startswith("natsl"):
        row["realised_fraction"] = realised_fraction(model, ids)
    return row


def train_row(model, name, T, p, profiled: bool = False) -> dict:
    """One forward + backward with labels and gradient checkpointing; `profiled`: the same step once more
    under the torch profiler after the timed ones (kind "train_profile": kernels, host syncs, aten ops,
    the top kernels and CPU ops, as train_bench's profile rows)."""
    ids = prompt(1, T)
    reset_routes(model, name, p, ids)
    model.train()
    model.gradient_checkpointing_enable()
    free(model)

    def step():
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
    try:
        ms = time_steps(step, 1, 3, ids.device)  # one warm-up step (kernel compilation, autotune)
        row = {"kind": "train_step", "model": name, "T": T, "batch": 1, "p": p, "ms": ms,
               "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
        if profiled:
            from torch.profiler import ProfilerActivity, profile

            from train_bench import summarize  # train_bench imports this module: import it here, not at the top
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) * 1e3
            row = {**row, "kind": "train_profile", **summarize(prof, wall, model.config.num_hidden_layers)}
    finally:
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing_disable()
        model.eval()
    return row


def peak_for_batch(model, T: int, batch: int, cache_implementation: str) -> float:
    ids = prompt(batch, T)
    model.generation_config.max_cache_len = T + 8
    free(model)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                   cache_implementation=cache_implementation, disable_compile=True)
    model.generation_config.max_cache_len = None
    return torch.cuda.max_memory_allocated() / 2**30


def max_batch_row(model, name, T, p) -> dict:
    reset_routes(model, name, p, prompt(2, T))
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    one, two = peak_for_batch(model, T, 1, "static"), peak_for_batch(model, T, 2, "static")
    per_row = two - one
    predicted = int((0.97 * total - (one - per_row)) // per_row)
    row = {"kind": "max_batch", "model": name, "T": T, "p": p, "peak_gb_b1": one, "peak_gb_b2": two,
           "per_row_gb": per_row, "device_gb": total, "batch": predicted,
           "method": "linear in batch from b=1,2; generate(static cache, 4 new tokens, disable_compile=True)"}
    row["tried"] = []  # the prediction, then 10 % steps down until a batch runs (at most 4 tries)
    for batch in [predicted] + [int(predicted * (1 - 0.1 * i)) for i in range(1, 4)]:
        try:
            peak = peak_for_batch(model, T, batch, "static")
        except torch.OutOfMemoryError:
            row["tried"].append({"batch": batch, "fits": False})
            free(model)
            continue
        row["tried"].append({"batch": batch, "fits": True, "peak_gb": peak})
        row["max_batch_run"] = batch
        break
    row["checked"] = row["tried"][0]["fits"]
    free(model)
    return row


def profile_row(model, name, T: int, p) -> dict:
    """GPU kernels, CUDA-graph launches, kernel launches from the host and host syncs per new token of a
    compiled `generate(cache_implementation="static")` (torch profiler over 32 tokens, after warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    ids = prompt(1, T)
    reset_routes(model, name, p, ids)
    n = 32
    model.generation_config.max_cache_len = T + n + N_SHORT

    def gen(k):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                              do_sample=False, cache_implementation="static")
    free(model)
    gen(N_SHORT)
    counts, by_name = {}, {}
    for k in (N_SHORT, N_SHORT + n):  # the difference is n decode steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            gen(k)
            torch.cuda.synchronize()
        events = prof.events()
        by_name[k] = {}
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                n_t = by_name[k].setdefault(e.name, [0, 0.0])
                n_t[0] += 1
                n_t[1] += e.time_range.elapsed_us()
        counts[k] = {
            "gpu_kernels": sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
            "graph_launches": sum(1 for e in events if e.name.startswith("cudaGraphLaunch")),
            "host_launches": sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")),
            "host_syncs": sum(1 for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                               "cudaEventSynchronize", "aten::_local_scalar_dense")),
        }
    host = host_python_per_token(lambda k: (gen(k), torch.cuda.synchronize()), N_SHORT, n)
    model.generation_config.max_cache_len = None
    per_token = {key: (counts[N_SHORT + n][key] - counts[N_SHORT][key]) / n for key in counts[N_SHORT]}
    kernels = []  # per decode token: launches and GPU microseconds of each kernel name
    for kname, (cnt, us) in by_name[N_SHORT + n].items():
        c0, u0 = by_name[N_SHORT].get(kname, [0, 0.0])
        if cnt - c0 > 0:
            kernels.append({"name": kname[:120], "per_token": (cnt - c0) / n, "us_per_token": (us - u0) / n})
    kernels.sort(key=lambda r: -r["us_per_token"])
    return {"kind": "profile", "model": name, "T": T, "batch": 1, "p": p, "mode": "compiled generate, static cache",
            **{f"{key}_per_token": value for key, value in per_token.items()},
            "gpu_us_per_token": sum(r["us_per_token"] for r in kernels), "kernels": kernels[:60], "host_python": host}


def host_python_per_token(run, short: int, n: int, top: int = 30) -> dict:
    """Where the host's time per decode token goes, by Python function: cProfile over run(short) and
    run(short + n), the difference of each function's own time (tottime: C calls such as dynamo's guards or a
    graph replay count in the function that makes them) over the n extra tokens. cProfile slows every Python
    call alike, so the shares are what to read, not the absolute times."""
    import cProfile
    import pstats

    own = {}
    for k in (short, short + n):
        prof = cProfile.Profile()
        prof.runcall(run, k)
        for (file, line, fn), (_, calls, tottime, _, _) in pstats.Stats(prof).stats.items():
            entry = own.setdefault(f"{os.path.basename(file)}:{line}:{fn}", {short: (0, 0.0), short + n: (0, 0.0)})
            entry[k] = (calls, tottime)
    rows = [{"function": name, "calls_per_token": (c[short + n][0] - c[short][0]) / n,
             "us_per_token": 1e6 * (c[short + n][1] - c[short][1]) / n} for name, c in own.items()]
    rows.sort(key=lambda r: -r["us_per_token"])
    return {"us_per_token": sum(r["us_per_token"] for r in rows), "functions": rows[:top]}


def check_static_equals_dynamic(natsl, T: int) -> dict:
    """bf16 logits of 70 eager decode steps (one chunk close at least) with NatslStaticCache vs NatslCache."""
    ids = prompt(1, T + 70, seed=7).repeat(2, 1)
    reset_routes(natsl, "natsl", 0.25, ids[:1, :T])
    out = {}
    with torch.no_grad():
        for kind in ("dynamic", "static"):
            cache = (NatslStaticCache(natsl.config, max_batch_size=2, max_cache_len=T + 70) if kind == "static"
                     else NatslCache(natsl.config))
            logits = [natsl(ids[:, :T], past_key_values=cache, logits_to_keep=1).logits.float()]
            for t in range(T, T + 70):
                logits.append(natsl(ids[:, t : t + 1], past_key_values=cache).logits.float())
            out[kind] = torch.cat(logits, 1)
    ref = out["dynamic"]
    return {"kind": "check", "what": "static vs dynamic cache logits, 70 decode steps, bf16", "T": T,
            "rel_err": float((out["static"] - ref).norm() / ref.norm()),
            "argmax_agreement": float((out["static"].argmax(-1) == ref.argmax(-1)).float().mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--sections", default="check,decode,prefill,train,max_batch,profile")
    p.add_argument("--contexts", default="8192,32768,65536", help="decode / prefill contexts at batch 1")
    p.add_argument("--fractions", default="0.125,0.25")
    p.add_argument("--models", default="natsl,source",
                   help="rows to run: natsl, source (all source rows) or one source row kind, e.g. source-static")
    p.add_argument("--quick", action="store_true", help="2 layers, short contexts (a smoke run)")
    p.add_argument("--batch-shapes", default="16384x32", help="decode rows at batch > 1: TxB,... ('' for none)")
    p.add_argument("--no-batch1-decode", action="store_true", help="skip the batch-1 decode rows")
    args = p.parse_args(argv)
    sections = set(args.sections.split(","))
    contexts = [int(t) for t in args.contexts.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    report = {"device": torch.cuda.get_device_name(0), "versions": versions(),
              "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
              "env": {k: os.environ[k] for k in ("TORCH_LOGS", "NATSL_FORCE_REFERENCE", "TORCHINDUCTOR_CACHE_DIR",
                                               "PYTORCH_CUDA_ALLOC_CONF")
                      if k in os.environ},
              "model": {"shape": "Llama-3.2-1B", **SHAPE, "chunk_size": 64, "num_sink_chunks": 1,
                        "dtype": "bfloat16", "weights": "random"},
              "rows": [], "errors": []}

    def dump():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    def run(fn, *a):
        t0 = time.perf_counter()
        before = dynamo_counts()
        try:
            row = fn(*a)
            row["wall_s"] = time.perf_counter() - t0
            after = dynamo_counts()
            row["dynamo"] = {key: after[key] - before[key] for key in after}  # this row's compiles
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
        except Exception:  # noqa: BLE001 - one failed row must not lose the others
            report["errors"].append({"call": f"{fn.__name__}{tuple(str(x)[:20] for x in a)}", "error": traceback.format_exc()})
            print(traceback.format_exc(), flush=True)
            dump()  # before free(): after a device-side fault (illegal address) every CUDA call raises
            free(*a[:1])
        dump()

    source, natsl = build_models(args.quick)
    random_routers(natsl)
    models = set(args.models.split(","))
    jobs = []  # in priority order: each NAtS-L row beside the source rows it is compared with
    p0 = fractions[0]
    if "check" in sections:
        jobs.append((check_static_equals_dynamic, natsl, 1000))
    def decode_jobs(shapes):
        for T, B in shapes:
            jobs.extend([(decode_row, natsl, "natsl", T, B, p0, "static"),
                         (decode_row, source, "source-static", T, B, None, "static"),
                         (decode_row, source, "source-default", T, B, None, None)])
    # in priority order (a call cut by its limit keeps what ran): batch-1 decode, profile, prefill,
    # batch-32 decode, train, max_batch
    if "decode" in sections and not args.no_batch1_decode:
        decode_jobs([(T, 1) for T in contexts])
    if "profile" in sections:
        jobs += [(profile_row, natsl, "natsl", 8192, p0), (profile_row, source, "source-static", 8192, None)]
    if "decode" in sections and "profile" in sections:  # the layers as compile regions against inlined
        jobs += [(inlined_layers(decode_row), natsl, "natsl-inlined", 8192, 1, p0, "static"),
                 (inlined_layers(profile_row), natsl, "natsl-inlined", 8192, p0)]
    if "prefill" in sections:
        for T in contexts:
            jobs += [(prefill_row, natsl, "natsl", T, p0), (prefill_row, source, "source", T, None)]
    if "decode" in sections:
        decode_jobs([tuple(int(x) for x in shape.split("x")) for shape in args.batch_shapes.split(",") if shape])
    if "train" in sections:
        for T in contexts[:2]:
            jobs += [(train_row, natsl, "natsl", T, p0), (train_row, source, "source", T, None)]
    if "train_profile" in sections:  # where the 8k step's time goes, both models
        jobs += [(train_row, natsl, "natsl", 8192, p0, True), (train_row, source, "source", 8192, None, True)]
    if "max_batch" in sections:
        jobs += [(max_batch_row, natsl, "natsl", 32768, p0), (max_batch_row, source, "source", 32768, None)]
    if "server" in sections:
        jobs += [(server_row, natsl, "natsl", p0), (server_row, source, "source-static", None)]
    for frac in fractions[1:]:
        if "decode" in sections:
            jobs += [(decode_row, natsl, "natsl", T, B, frac, "static") for T, B in [(T, 1) for T in contexts]]
        if "prefill" in sections:
            jobs += [(prefill_row, natsl, "natsl", T, frac) for T in contexts]
        if "train" in sections:
            jobs += [(train_row, natsl, "natsl", T, frac) for T in contexts[:2]]
    for fn, *a in jobs:
        name = a[1] if isinstance(a[1], str) else "natsl"  # "natsl", "source", "source-static", ...
        if name in models or name.split("-")[0] in models:
            run(fn, *a)
    from torch._dynamo.utils import compile_times
    report["compile_times"] = compile_times(repr="str", aggregate=True)  # dynamo / inductor phases, whole run
    dump()
    print_table(report)
    return 0


def print_table(report) -> None:
    rows = report["rows"]
    for r in rows:
        metric = r.get("tok_s") or r.get("ms") or r.get("batch")
        print(f"{r['kind']:>10} {r.get('model', ''):>15} T={r.get('T')} B={r.get('batch')} p={r.get('p')} "
              f"-> {metric if not isinstance(metric, float) else round(metric, 2)} peak={round(r.get('peak_gb', 0), 2)}")
    print(f"{len(report['errors'])} errors")


if __name__ == "__main__":
    sys.exit(main())
