"""How much does one block's realised softmax fraction vary, and does a calibration on a few blocks hold on prose?
(issue 22: piece 11 calibrated at 4096 tokens realised 0.37 on the README's Wikipedia at 2048)

    python bench/calibration_set_probe.py --model runs/smollm2-natsl-p11 --data runs/recovery-data \\
        --text prose=conversion/texts/heldout_wikipedia.txt heldout=runs/carry-h/heldout.txt \\
        --calibration-seed 2010 --out bench/results/calibration_set_probe_smollm2_cpu.json

For a NAtS-L model (as served: its router biases as shipped), the realised fraction of every block of
  - each `--text` at 2048 and 4096 tokens (`--text-blocks` / half as many), whether the fraction changes with the
    context length on the same text (the router's position drift), and
  - the calibration sets bench/recover_scale.py drew before 2026-12-07 (the first 16 training blocks of 2048 / 8 of
    4096 tokens in the order of `--calibration-seed`: a piece's seed + 1), whether their mean is the data's.
The per-block spread says how many blocks a calibration needs (recover_scale.calibration_set). fp32, eager, CPU
or GPU, batch 1. Writes JSON with the exact command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from recover_scale import train_blocks  # noqa: E402
from retrieval_oracle_probe import write_record  # noqa: E402

LENGTHS = (2048, 4096)


@torch.no_grad()
def block_fractions(model, blocks: torch.Tensor) -> list[float]:
    """The realised softmax fraction (`NatslCausalLMOutput.softmax_fraction`) of each block [n, T] -> n floats."""
    device = next(model.parameters()).device
    return [float(model(input_ids=row[None].to(device), use_cache=False, logits_to_keep=1).softmax_fraction)
            for row in blocks]


def summary(fractions: list[float]) -> dict:
    """mean, spread and range of per-block fractions, and the standard error of their mean."""
    sd = statistics.stdev(fractions) if len(fractions) > 1 else 0.0
    return {"blocks": len(fractions), "mean": statistics.fmean(fractions), "sd": sd,
            "se_of_mean": sd / len(fractions) ** 0.5, "min": min(fractions), "max": max(fractions),
            "per_block": fractions}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a NatslForCausalLM folder (e.g. the README main job's output)")
    p.add_argument("--data", type=Path, required=True, help="bench/build_recovery_data.py's output folder")
    p.add_argument("--text", nargs="+", default=[], metavar="LABEL=FILE", help="texts (documents: blank-line separated)")
    p.add_argument("--text-blocks", type=int, default=4, help="blocks of 2048 tokens per text (half as many of 4096)")
    p.add_argument("--calibration-seed", type=int, nargs="*", default=[], help="seeds of the old calibration draws")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    t0 = time.time()

    import natsl_hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from natsl_hf.conversion.calibrate import token_blocks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    result = {"texts": {}, "calibration_sets": {}}
    for spec in args.text:
        label, _, path = spec.partition("=")
        docs = [t for t in Path(path).read_text().split("\n\n") if t.strip()]
        result["texts"][label] = {"file": path, **{
            str(T): summary(block_fractions(model, token_blocks(tokenizer, docs, T, args.text_blocks * 2048 // T, label)))
            for T in LENGTHS}}
    vocab = model.config.vocab_size
    for seed in args.calibration_seed:  # recover_scale's draws before calibration_set: 16 x 2048, 8 x 4096
        result["calibration_sets"][str(seed)] = {
            str(T): summary(block_fractions(model, train_blocks([args.data], vocab, seed, False, T)[0][: 32768 // T]))
            for T in LENGTHS}
    for label, by_len in {**result["texts"], **{f"calibration seed {s}": v
                                                for s, v in result["calibration_sets"].items()}}.items():
        print(label, "  ".join(f"{T}: {by_len[str(T)]['mean']:.3f} (sd {by_len[str(T)]['sd']:.3f}, "
                                f"{by_len[str(T)]['min']:.2f}-{by_len[str(T)]['max']:.2f})" for T in LENGTHS))
    write_record(args.out, "bench/calibration_set_probe.py", argv, device, t0, model=args.model,
                 softmax_budget=model.config.softmax_budget, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
