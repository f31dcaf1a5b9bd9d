"""The GPU evaluations the README main job's model card shows beside its CPU numbers (issue 22).

The main job (python -m natsl_hf.conversion.smollm2) measures on the user's CPU what a CPU can measure in a
minute: perplexity, realised softmax fraction and KV saving on two blocks. The lookups, short answers and the
comparison with the layer-interleaved hybrid need the GPU evaluation (bench/eval_quality.py, 128 queries per
lookup row). This script turns the committed reports of those evaluations into the `evaluations` the card
renders (natsl_hf.metrics schema; `side_by_side_evaluation`: one column per model) and writes them beside the
shipped recovered parameters, where the main job reads them:

    python bench/card_evaluations.py          # -> conversion/recovered/smollm2-135m-instruct-b0.25/evaluations.json

Reports come from bench/results/. One of them was rebuilt from the log of a call that ran out of time after
two of its three models (`rebuild`): its result lines are eval_quality's own, the summary is
eval_quality.summarise of them, and the settings are those of the same options' run of the third model:

    python bench/card_evaluations.py rebuild results/quality_smollm2_natsl36_vs_hybrid_gpu_partial.log \
        --label natsl36 --settings-from results/quality_smollm2_layer_hybrid_equal_training_gpu.json \
        --command "COMPARE=... (the call's)" --out results/quality_smollm2_natsl36_equal_training_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from conversion.recovered import EVALUATIONS_FILE, SMOLLM2_RECOVERED  # noqa: E402
from natsl_hf.metrics import side_by_side_evaluation  # noqa: E402

# (title, note, [(column, report file in bench/results, label in that report)])
SMOLLM2_B025 = [
    ("GPU evaluation of these parameters (bench/eval_quality.py, 128 queries per lookup row)",
     "Perplexity on 16 blocks of the training data's held-out split; the Wikipedia rows are the README's text. "
     "A lookup row's softmax fraction is what the routers kept on those contexts; the looked-up chunk kept is the "
     "share of routes (layer x KV head) that kept the chunk holding the line a query asks for.",
     [("source", "quality_smollm2_piece12_171m_gpu.json", "source"),
      ("NAtS-L (these parameters)", "quality_smollm2_piece12_171m_gpu.json", "natsl")]),
    ("NAtS-L against the layer-interleaved hybrid at equal KV and training (budget 0.25, earlier checkpoints)",
     "Both trained on the same data with the same stage-2 recipe (LM + KD 1:1, 16.2M tokens at 2048) after stage 1 "
     "(NAtS-L 20.4M tokens, the hybrid 24.5M): NAtS-L routes chunks in all 30 layers, the hybrid keeps 8 of the 30 "
     "layers full softmax and makes the other 22 GDN. The hybrid routes nothing, so its softmax-fraction rows read 0; "
     "its KV kept rows are the ones to compare.",
     [("source", "quality_smollm2_layer_hybrid_equal_training_gpu.json", "source"),
      ("NAtS-L, 36.7M tokens", "quality_smollm2_natsl36_equal_training_gpu.json", "natsl36"),
      ("layer hybrid, 40.7M tokens", "quality_smollm2_layer_hybrid_equal_training_gpu.json", "hybrid")]),
]


def build(spec, results: Path) -> list[dict]:
    evaluations = []
    for title, note, columns in spec:
        loaded = [(name, json.loads((results / file).read_text()), label) for name, file, label in columns]
        evaluations.append({**side_by_side_evaluation(loaded, title=title), "note": note})
    return evaluations


def rebuild(log: Path, label: str, settings_from: Path, command: str) -> dict:
    """A bench/eval_quality.py report from the result lines its log printed (one JSON object per model)."""
    from eval_quality import summarise

    results = {}
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            try:
                results.update(json.loads(line))
            except json.JSONDecodeError:
                continue  # the closing summary is printed over several lines; only the per-model lines count
    if "source" not in results or label not in results:
        raise SystemExit(f"{log}: result lines for source and {label!r} expected, found {sorted(results)}")
    results = {k: results[k] for k in ("source", label)}
    like = json.loads(settings_from.read_text())
    return {"command": command, "device": like["device"], "dtype": like["dtype"], "versions": like["versions"],
            "settings": like["settings"],
            "note": f"rebuilt by bench/card_evaluations.py from {log.name}: results as the log printed them, summary "
                    f"by eval_quality.summarise; settings, device and versions those of {settings_from.name} (the "
                    "same options, on an H100 of the same pool; the git commit is that later call's)",
            "summary": summarise(results), "results": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("rebuild", help="a report from the result lines of an eval_quality log")
    r.add_argument("log", type=Path)
    r.add_argument("--label", required=True)
    r.add_argument("--settings-from", type=Path, required=True)
    r.add_argument("--command", required=True)
    r.add_argument("--out", type=Path, required=True)
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--out", type=Path, default=SMOLLM2_RECOVERED / EVALUATIONS_FILE)
    args = p.parse_args(argv)
    if args.cmd == "rebuild":
        report = rebuild(args.log, args.label, args.settings_from, args.command)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
        return 0
    evaluations = build(SMOLLM2_B025, args.results)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"evaluations": evaluations}, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(evaluations)} evaluations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
