"""Does one compiled decode step serve every NatslStaticCache length? (issue 24, CPU-runnable)

    python bench/compile_once_probe.py --backend inductor --out bench/results/compile_once_cpu.json

A tiny Llama-shaped NAtS-L model (tests/test_static_cache.py's `tiny_model`) generates with
`cache_implementation="static"` and a compiled decode step (transformers' CompileConfig, on any device) at several
`max_new_tokens`, each sizing a cache of another length (`static_cache_length`). Per call: the cache length, the
frames dynamo compiled in it (0 = the compiled step was reused), its seconds, and whether its tokens equal a
dynamic-cache generate's. The test suite checks the same with the eager backend (guards only); this runs a real
compiler.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from torch._dynamo.utils import counters
from transformers import CompileConfig

from natsl_hf.modeling_natsl import CACHE_FIELD

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_static_cache import tiny_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="inductor")
    p.add_argument("--new-tokens", default="11,16,26,36", help="max_new_tokens of the calls, in order")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    model = tiny_model(seed=3).eval()
    config = CompileConfig(backend=args.backend)
    config._compile_all_devices = True  # transformers compiles the step on CUDA only unless told
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(7))
    torch.compiler.reset()
    calls = []
    for new in (int(n) for n in args.new_tokens.split(",")):
        counters.clear()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, do_sample=False, cache_implementation="static",
                             compile_config=config, return_dict_in_generate=True)
        seconds = time.perf_counter() - t0
        cache, out = getattr(out, CACHE_FIELD), out.sequences
        calls.append({"max_new_tokens": new, "cache_len": cache.cache_len,
                      "frames_compiled": counters["stats"]["unique_graphs"], "s": round(seconds, 2),
                      "tokens_equal_dynamic": torch.equal(out, model.generate(ids, max_new_tokens=new, do_sample=False))})
        print(json.dumps(calls[-1]), flush=True)
    report = {"command": " ".join(["python", "bench/compile_once_probe.py", *(argv or sys.argv[1:])]),
              "device": platform.processor() or platform.machine(), "backend": args.backend,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()}, "calls": calls}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
