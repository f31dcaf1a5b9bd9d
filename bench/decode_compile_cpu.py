"""CPU, no GPU needed: the first compiled decode step of generate(cache_implementation="static") with the decoder
layers' decode step as a compile region (`modeling_natsl.decode_step_region`, on from torch 2.13: DECODE_REGIONS)
against inlined (`decode_step`) (issue 24: the first compile; bench/MODEL_BENCH_NOTES.md).

bench/graph_size.py's small model: a NAtS-L conversion (chunk 64, every layer) of a small random Llama (hidden 256,
8 q / 2 kv heads, head_dim 64, `--layers` layers); a 300-token prompt, `--new-tokens` greedy tokens, transformers compiling the step with inductor
on the CPU (its caches off: TORCHINDUCTOR_FORCE_DISABLE_CACHES=1, so each mode compiles from nothing). Per mode: the
seconds of the first generate() (prefill eager + the compile + the steps) and of a second one (compiled), their
difference the compile; and whether both modes give the same tokens. On the CPU the decode step's attention, GDN
step and chunk close are the reference's torch ops, where CUDA runs one fused kernel each: the compiled graph here
is larger than the GPU's.

Usage: python bench/decode_compile_cpu.py --out bench/results/decode_compile_cpu_torch213.json [--layers 8]
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

from graph_size import cpu_compile_config, small_model  # noqa: E402  (bench/ is on the path: this file's folder)
from natsl_hf import modeling_natsl  # noqa: E402


def generate(model, ids, new_tokens: int):
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                             compile_config=cpu_compile_config("inductor", fullgraph=True))
    return out[:, ids.shape[1]:], time.perf_counter() - t0


def run(mode: str, layers: int, new_tokens: int) -> dict:
    region = modeling_natsl.decode_step_region
    if mode == "inlined":
        modeling_natsl.decode_step_region = modeling_natsl.decode_step
    torch._dynamo.reset()
    try:
        model = small_model("natsl", layers)
        ids = torch.randint(1, 1000, (1, 300), generator=torch.Generator().manual_seed(1))
        model.generation_config.max_cache_len = 300 + new_tokens
        tokens, first = generate(model, ids, new_tokens)
        again, second = generate(model, ids, new_tokens)
        assert torch.equal(tokens, again)
        return {"mode": mode, "region_on": modeling_natsl.decode_step_region is not modeling_natsl.decode_step,
                "layers": layers, "first_generate_s": first, "second_generate_s": second, "compile_s": first - second,
                "tokens": tokens[0].tolist()}
    finally:
        modeling_natsl.decode_step_region = region


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=4)
    args = p.parse_args(argv)
    rows = [run(mode, args.layers, args.new_tokens) for mode in ("region", "inlined")]
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k != "tokens"}), flush=True)
    report = {"device": "cpu", "threads": torch.get_num_threads(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
              "env": {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"]},
              "rows": rows, "same_tokens": rows[0]["tokens"] == rows[1]["tokens"],
              "compile_ratio_region_over_inlined": rows[0]["compile_s"] / rows[1]["compile_s"]}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print({k: report[k] for k in ("same_tokens", "compile_ratio_region_over_inlined")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
