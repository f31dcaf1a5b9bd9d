"""The README main job's zero-shot conversion with the stage-1 routing targets of an earlier commit (an A/B).

    python bench/zero_shot_targets_ab.py --commit 75b146c runs/smollm2-zeroshot-75b146c --zero-shot

Loads `chunk_attention_mass` from `git show COMMIT:modeling/router.py` and puts it in place of today's in the
layer (router fitting and supervised routing read it there), then runs `python -m natsl_hf.conversion.smollm2`
with the remaining arguments. 75b146c holds the position-biased mass (the mean over queries two chunks later);
476a261 replaced it (modeling/router.py explains why). Results: bench/RECOVERY_NOTES.md, 2026-12-03.
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--commit", required=True, help="git commit whose modeling/router.py gives the targets")
    args, rest = p.parse_known_args(argv)
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{args.commit}:modeling/router.py"],
                            check=True, capture_output=True, text=True).stdout
    old = types.ModuleType(f"router_{args.commit}")
    exec(compile(source, f"{args.commit}:modeling/router.py", "exec"), old.__dict__)
    takes_sinks = "num_sink_chunks" in inspect.signature(old.chunk_attention_mass).parameters

    def chunk_attention_mass(q, k, chunk_size, scale, num_sink_chunks=0):
        if takes_sinks:
            return old.chunk_attention_mass(q, k, chunk_size, scale, num_sink_chunks)
        return old.chunk_attention_mass(q, k, chunk_size, scale)

    import natsl_hf.modeling.layer as layer
    from natsl_hf.conversion import smollm2

    layer.chunk_attention_mass = chunk_attention_mass
    print(f"stage-1 routing targets: chunk_attention_mass of {args.commit}", flush=True)
    return smollm2.main(rest)


if __name__ == "__main__":
    sys.exit(main())
