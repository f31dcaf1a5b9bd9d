"""CPU time and memory of the PyTorch reference path (modeling/reference.py), no GPU needed.

time:    a SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 q / 3 kv heads, head_dim 64, random
         weights) with transformers' SDPA attention vs its in-memory NAtS-L conversion (chunk 64, every
         layer NAtS-L, the conversion's softmax-heavy routing), forward over one row of `--tokens`
         tokens, fp32, no grad. The two models alternate within one process, `--repeats` times each,
         so load on a shared machine hits both alike; the report keeps every wall-clock and process
         CPU time (with one thread the CPU time does not count the time other processes held the
         core) and their medians.
memory:  a 1-layer tiny NAtS-L model (hidden 64, 4 q / 2 kv heads, head_dim 16, chunk 64, mixed
         routes) forward at each of `--memory-tokens`, no grad, one fresh subprocess each, which
         reports its peak resident set (VmHWM) and its resident set before the forward (imports,
         weights, inputs). The subprocess runs under an address-space limit (`--memory-limit-gb`
         above what it had mapped before the forward), so a formulation that needs more fails
         with an allocation error instead of taking the machine down.

Usage:  python bench/reference_cpu_bench.py --label after [--threads 1] [--tokens 2048] [--repeats 3]
            [--memory-tokens 4096 32768] [--out bench/results/reference_cpu.json] [--reference FILE]
Each call adds to the run named `--label` in the JSON file (replacing what it measures again).
`--reference FILE` times another version of modeling/reference.py, e.g. the one before a change:
    git show REV:modeling/reference.py > /tmp/reference_REV.py
    python bench/reference_cpu_bench.py --label before --reference /tmp/reference_REV.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                    rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)

# one forward of the tiny model in a fresh process; prints a JSON line
MEMORY_CHILD = """
import json, resource, sys, torch
sys.path.insert(0, {tests!r})
sys.path.insert(0, {bench!r})
from natsl_testing import tiny_model
from reference_cpu_bench import use_reference
use_reference({reference!r})

def status_bytes(field):  # from /proc/self/status (this process only; ru_maxrss would count the parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

T, limit = {tokens}, {limit}
torch.set_num_threads(1)
model = tiny_model(seed=0, num_hidden_layers=1, chunk_size=64)
ids = torch.randint(1, 97, (1, T), generator=torch.Generator().manual_seed(0))
before = status_bytes("VmRSS")
resource.setrlimit(resource.RLIMIT_AS, (status_bytes("VmSize") + limit, resource.RLIM_INFINITY))
try:
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    ok, error = bool(logits.isfinite().all()), None
except (RuntimeError, MemoryError) as err:
    ok, error = False, str(err).splitlines()[0][:200]
print(json.dumps({{"T": T, "ok": ok, "error": error, "rss_before_mib": round(before / 2**20, 1),
                  "peak_rss_mib": round(status_bytes("VmHWM") / 2**20, 1)}}))
"""


def use_reference(path: str | None) -> None:
    """Run the layers on the reference functions defined in `path` (None: the installed ones)."""
    if path is None:
        return
    from natsl_hf.modeling import reference

    with open(path) as f:
        exec(compile(f.read(), path, "exec"), reference.__dict__)  # the layer calls reference.<name>


def measure_memory(tokens: int, limit_gb: float, reference: str | None) -> dict:
    code = MEMORY_CHILD.format(tests=os.path.join(ROOT, "tests"), bench=os.path.join(ROOT, "bench"),
                               reference=reference, tokens=tokens, limit=int(limit_gb * 2**30))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NATSL_FORCE_REFERENCE": "1"}
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"T": tokens, "ok": False, "error": (result.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return {**json.loads(lines[-1]), "wall_s": round(time.perf_counter() - t0, 2)}


def build_models():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from natsl_hf.conversion.convert import convert_model

    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M, attn_implementation="sdpa")).eval()
    natsl = convert_model(source, chunk_size=64).eval()
    natsl.config.use_kernels = False  # CPU: the reference path either way; say so explicitly
    return source, natsl


def measure_time(tokens: int, repeats: int) -> dict:
    import torch

    source, natsl = build_models()
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    wall, cpu = {"source": [], "natsl": []}, {"source": [], "natsl": []}
    with torch.no_grad():
        for model in (source, natsl):  # warm-up
            model(ids, use_cache=False)
        for _ in range(repeats):
            for name, model in (("source", source), ("natsl", natsl)):
                t0, c0 = time.perf_counter(), time.process_time()
                model(ids, use_cache=False)
                wall[name].append(round(time.perf_counter() - t0, 3))
                cpu[name].append(round(time.process_time() - c0, 3))
    report = {"tokens": tokens, "batch": 1, "dtype": "float32", "wall_s": wall, "cpu_s": cpu}
    for kind, times in (("wall", wall), ("cpu", cpu)):
        med = {name: statistics.median(ts) for name, ts in times.items()}
        report[f"median_{kind}_s"] = med
        report[f"ratio_{kind}"] = round(med["natsl"] / med["source"], 3)
    return report


def versions() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": platform.machine(), "cpu_count": os.cpu_count()}


def git_head() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--label", required=True, help="name of this run in the JSON (e.g. before / after)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-tokens", type=int, nargs="*", default=[4096, 32768])
    p.add_argument("--memory-limit-gb", type=float, default=4.0)
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--reference", help="a version of modeling/reference.py to run instead of the installed one")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "reference_cpu.json"))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    use_reference(args.reference)
    command = " ".join(["python", "bench/reference_cpu_bench.py", *(argv or sys.argv[1:])])
    stamp = {"command": command, "git_head": git_head(), "versions": versions(),
             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    run = {}
    if not args.skip_time:
        run["time"] = {**stamp, "threads": args.threads, **measure_time(args.tokens, args.repeats)}
        print(json.dumps(run["time"]), flush=True)
    if args.memory_tokens:
        run["memory"] = {**stamp, "limit_gb": args.memory_limit_gb,
                         "rows": [measure_memory(T, args.memory_limit_gb, args.reference) for T in args.memory_tokens]}
        for row in run["memory"]["rows"]:
            print(json.dumps(row), flush=True)

    report = {"runs": {}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            report = json.load(f)
    report["runs"].setdefault(args.label, {}).update(run)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
