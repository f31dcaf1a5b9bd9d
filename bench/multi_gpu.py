"""natsl-distill under `accelerate launch` on 1 and 2 GPUs, DDP and FSDP (issue 9).

One script, one JSON per call (written to --out). On the lent 2-GPU machine, from the repo root,
with natsl_hf and fla installed under /tmp/site (see ../shared/gpu/README.md):

    PYTHONPATH=/tmp/site python3 bench/multi_gpu.py --stage 1 --out $OUT/multi_gpu_stage1.json
    PYTHONPATH=/tmp/site python3 bench/multi_gpu.py --stage 2 --out $OUT/multi_gpu_stage2.json

Here, on the CPU, `--smoke` runs the same pipeline on a tiny model with gloo processes (a check
of the script, not a measurement).

What it does, per call:
  prepare  a random Llama-shaped source, `--preset 1b` = Llama-3.2-1B's decoder (hidden 2048,
           16 layers, 32 q / 8 kv heads, head_dim 64, MLP 8192) with a byte-level BPE vocabulary
           of 8192 trained here on the training text (Python's standard library sources, the one
           sizeable text on a bare machine); saved with save_pretrained, converted with
           `natsl-convert` (chunk 64, budget 0.25, all layers NAtS-L).
  runs     the same `natsl-distill --stage S` (bf16, gradient checkpointing, seed 0, same global
           batch and per-device micro-batch) as
             1gpu   one process, --gradient_accumulation_steps 2 (two micro-batches a step)
             ddp    2 processes, accelerate_configs/ddp.yaml
             fsdp   2 processes, accelerate_configs/fsdp.yaml (full shard, NatslDecoderLayer units)
           Stage 2 starts from the stage-1 1gpu run's output (run first if this call has none:
           `--init-steps` steps, recorded as `stage1_init`).
  per run  the logged curves (loss, align_loss / lm_loss, softmax_fraction, router_loss); steady
           throughput (tokens/s per GPU, from a step timer, after the first --warmup steps); a
           digest of every rank's router parameters (a check for DDP, whose replicas calibrate their
           routers independently after training; under FSDP every rank all-gathers the same shards,
           so there it only confirms the gather). FSDP runs also keep the
           logits of the in-memory model at save time on a fixed block and a sha256 of every
           tensor of the gathered full state dict, both compared afterwards, in a fresh single
           process, with `AutoModelForCausalLM.from_pretrained(output_dir)`.
  summary  curve differences of ddp / fsdp vs 1gpu next to the curves' own noise (the std of
           the 1gpu curve's residual around its 3-point running mean: the step-to-step scatter of
           a logged value), DDP and FSDP scaling efficiency (per-GPU throughput on 2 GPUs / on 1),
           router digests equal across ranks, reload checks.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PRESETS = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}
VOCAB = 8192
PROCESSES = {"1gpu": 1, "ddp": 2, "fsdp": 2}  # the global batch is 2 micro-batches in every mode


# ---------------------------------------------------------------------------- prepare
def training_text(path: Path, megabytes: float) -> None:
    """The standard library's .py files, sorted, concatenated up to `megabytes`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    budget, parts = int(megabytes * 2**20), []
    for f in sorted(stdlib.rglob("*.py")):
        if "site-packages" in f.parts or "test" in f.parts:
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        budget -= len(text)
        if budget <= 0:
            break
    path.write_text("\n".join(parts), encoding="utf-8")


def build_tokenizer(text: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(text)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", bos_token="<eos>")


def prepare(work: Path, preset: str, text_mb: float) -> dict:
    """Source and converted checkpoints under `work` (reused when already there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    text, src, conv = work / "train.txt", work / "source", work / "natsl"
    if (conv / "config.json").exists():
        return {"text": str(text), "source": str(src), "natsl": str(conv), "reused": True}
    work.mkdir(parents=True, exist_ok=True)
    training_text(text, text_mb)
    tokenizer = build_tokenizer(text)
    torch.manual_seed(0)
    init_device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 1B weights: seconds on a GPU
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True,
                         **PRESETS[preset])
    with torch.device(init_device):
        source = LlamaForCausalLM(config)
    source.save_pretrained(src)
    tokenizer.save_pretrained(src)
    params = sum(p.numel() for p in source.parameters())
    del source
    cmd = [sys.executable, "-m", "natsl_hf.conversion.convert", str(src), str(conv), "--chunk-size", "64",
           "--softmax-budget", "0.25", "--quiet"]
    subprocess.run(cmd, check=True, cwd=str(work))  # not the repo root: its natsl_hf/ would shadow the package
    return {"text": str(text), "source": str(src), "natsl": str(conv), "source_params": params,
            "convert_command": shlex.join(["natsl-convert", *cmd[3:]]), "reused": False}


# ---------------------------------------------------------------------------- worker (one rank)
def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def worker(result: str, block_file: str, distill_argv: list[str], reload_records: bool) -> None:
    """Inside `accelerate launch`: one natsl-distill run plus the per-rank records."""
    from transformers import TrainerCallback

    from natsl_hf.conversion.distill import parse_args, train

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[tuple[int, float]] = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append((state.global_step, time.perf_counter()))

    timer = StepTimer()
    trainer = train(*parse_args(distill_argv), callbacks=[timer], command=shlex.join(["natsl-distill", *distill_argv]))
    acc, model = trainer.accelerator, trainer.model_wrapped
    rank = acc.process_index

    # this rank's router parameters (FSDP: all-gathered into every rank)
    if trainer.is_fsdp_enabled:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            router = {_clean(n): _digest(p) for n, p in model.named_parameters() if ".router." in n}
    else:
        router = {n: _digest(p) for n, p in acc.unwrap_model(model).named_parameters() if ".router." in n}

    record = {"rank": rank, "world_size": acc.num_processes, "global_step": trainer.state.global_step,
              "router_digest": hashlib.sha256(json.dumps(router, sort_keys=True).encode()).hexdigest()[:16],
              "router_tensors": len(router), "step_times": timer.times,
              "fsdp": bool(trainer.is_fsdp_enabled)}
    if reload_records:
        # the in-memory model's logits at save time (every rank takes part in an FSDP forward)
        block = torch.load(block_file)
        model.eval()
        with torch.no_grad(), acc.autocast():
            logits = model(input_ids=block.to(acc.device), use_cache=False).logits.float().cpu()
        state = acc.get_state_dict(trainer.model)  # full state dict on rank 0 (FSDP: gathered)
        if acc.is_main_process:
            torch.save(logits, result + ".logits.pt")
            record["state_digests"] = {_clean(k): _digest(v) for k, v in state.items()}
    Path(f"{result}.rank{rank}.json").write_text(json.dumps(record))
    acc.wait_for_everyone()


# ---------------------------------------------------------------------------- orchestrator
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_args(mode: str, smoke: bool) -> list[str]:
    port = ["--main_process_port", str(_free_port())]
    if mode == "1gpu":
        base = ["--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]
        return base + (["--cpu", "--mixed_precision", "no"] if smoke else ["--mixed_precision", "bf16"])
    config = str(REPO / "accelerate_configs" / f"{mode}.yaml")
    if smoke:  # DDP over gloo CPU processes: `--multi_gpu` with ACCELERATE_USE_CPU (see tests/test_ddp_cpu.py)
        return ["--config_file", config, "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no", *port]
    return ["--config_file", config, "--num_processes", "2", *port]


def distill_args(stage: int, mode: str, model: str, paths: dict, out_dir: Path, steps: int, a) -> list[str]:
    argv = ["--stage", str(stage), "--model", model, "--data", paths["text"],
            "--output_dir", str(out_dir), "--max_steps", str(steps),
            "--per_device_train_batch_size", str(a.micro_batch),
            "--gradient_accumulation_steps", str(2 // PROCESSES[mode]), "--seq_len", str(a.seq_len),
            "--max_blocks", str(steps * 2 * a.micro_batch), "--logging_steps", str(a.logging_steps),
            "--save_steps", "1000000", "--seed", "0", "--report_to", "none",
            "--router_fit_blocks", str(a.fit_blocks), "--calibration_blocks", str(a.calibration_blocks),
            "--learning_rate", str(a.lr_stage1 if stage == 1 else a.lr_stage2)]
    if stage == 1:
        argv += ["--source", paths["source"]]
    if not a.smoke:
        argv += ["--bf16", "--gradient_checkpointing"]
    return argv


def curves(out_dir: Path) -> dict[str, list]:
    history = json.loads((out_dir / "trainer_state.json").read_text())["log_history"]
    keys = ("loss", "align_loss", "lm_loss", "router_loss", "softmax_fraction", "router_agreement")
    rows = [h for h in history if "loss" in h and "step" in h]
    out = {"step": [h["step"] for h in rows]}
    for k in keys:
        if any(k in h for h in rows):
            out[k] = [h.get(k) for h in rows]
    out["final"] = {k: v for h in history for k, v in h.items() if k.startswith("calibration/")
                    or k in ("train_runtime",)}
    return out


def reload_check(out_dir: Path, result: str, block: torch.Tensor, device: str) -> dict:
    """Fresh process: from_pretrained(output_dir) vs the worker's records."""
    code = f"""
import json, sys, torch
import natsl_hf
from transformers import AutoModelForCausalLM
sys.path.insert(0, {str(REPO / 'bench')!r})
from multi_gpu import _digest
m = AutoModelForCausalLM.from_pretrained({str(out_dir)!r}, dtype=torch.float32).to({device!r}).eval()
block = torch.load({result + '.block.pt'!r}).to({device!r})
with torch.no_grad():
    with torch.autocast({device.split(':')[0]!r}, dtype=torch.bfloat16, enabled={device != 'cpu'}):
        amp = m(input_ids=block, use_cache=False).logits.float().cpu()
    fp32 = m(input_ids=block, use_cache=False).logits.float().cpu()
mem = torch.load({result + '.logits.pt'!r})
rec = json.load(open({result + '.rank0.json'!r}))["state_digests"]
loaded = {{k: _digest(v) for k, v in m.state_dict().items()}}
common = sorted(set(rec) & set(loaded))
scale = float(mem.std())
print(json.dumps({{
    "tensors_compared": len(common), "tensors_equal": sum(rec[k] == loaded[k] for k in common),
    "only_in_memory": sorted(set(rec) - set(loaded)), "only_in_checkpoint": sorted(set(loaded) - set(rec)),
    "logits_max_abs_diff": float((amp - mem).abs().max()), "logits_std": scale,
    "logits_max_abs_diff_same_autocast_vs_fp32": float((amp - fp32).abs().max()),
    "argmax_agreement": float((amp.argmax(-1) == mem.argmax(-1)).float().mean()),
}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(out_dir))
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def throughput(step_times: list, warmup: int, tokens_per_step: int, world: int) -> dict:
    times = [(s, t) for s, t in step_times if s >= warmup]
    if len(times) < 2:
        return {"tokens_per_s_per_gpu": None, "steps_timed": len(times)}
    (s0, t0), (s1, t1) = times[0], times[-1]
    tps = (s1 - s0) * tokens_per_step / (t1 - t0)
    return {"tokens_per_s_per_gpu": tps / world, "tokens_per_s": tps, "steps_timed": s1 - s0,
            "s_per_step": (t1 - t0) / (s1 - s0)}


def stop_launch(proc: subprocess.Popen, tag: str) -> None:
    """End a launch and every rank it started: SIGTERM to the launcher's group (torchrun's agent then
    stops its workers, which run in sessions of their own), then SIGKILL to the group and to any
    process still running with `tag` (a path unique to this run) in its command line."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    pattern = re.escape(tag)
    for _ in range(60):  # until no rank is left: the next run must have the GPUs to itself
        subprocess.run(["pkill", "-KILL", "-f", pattern], check=False)
        if subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode != 0:
            return
        time.sleep(1)
    raise RuntimeError(f"processes of {tag} survive SIGKILL: later timings would be contaminated")


def run_one(name: str, stage: int, mode: str, model: str, steps: int, paths: dict, a, work: Path,
            block: torch.Tensor) -> dict:
    out_dir = work / name
    result = str(work / name)
    torch.save(block, result + ".block.pt")
    dargs = distill_args(stage, mode, model, paths, out_dir, steps, a)
    reload_records = mode == "fsdp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args(mode, a.smoke), str(Path(__file__).resolve()), "worker",
           result, result + ".block.pt", str(int(reload_records)), "--", *dargs]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="4" if not a.smoke else "1")
    if a.smoke:
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true")
    elif mode == "1gpu":
        env["CUDA_VISIBLE_DEVICES"] = "0"
    start = time.perf_counter()
    # own session: on a timeout the whole group (launcher + every rank) is killed, so that no orphaned
    # rank keeps training on the GPUs while the next run is timed
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=str(work), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=a.run_timeout)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        stop_launch(proc, result)
        stdout, stderr = proc.communicate(timeout=60)
        returncode = "timeout"
    rec = {"mode": mode, "stage": stage, "start_model": model, "steps": steps, "command": shlex.join(cmd),
           "returncode": returncode, "wall_s": round(time.perf_counter() - start, 1)}
    if returncode != 0:
        rec["log_tail"] = stdout[-2000:] + "\n" + stderr[-6000:]
        return rec
    ranks = [json.loads(Path(f"{result}.rank{r}.json").read_text()) for r in range(PROCESSES[mode])]
    world, step_tokens = ranks[0]["world_size"], 2 * a.micro_batch * a.seq_len
    rec.update({
        "world_size": world, "global_step": ranks[0]["global_step"],
        "global_batch_tokens": step_tokens,
        "router_digests": [r["router_digest"] for r in ranks],
        "router_same_across_ranks": len({r["router_digest"] for r in ranks}) == 1,
        "router_tensors": ranks[0]["router_tensors"],
        "curves": curves(out_dir),
        "throughput": throughput(ranks[0]["step_times"], a.warmup, step_tokens, world),
    })
    if reload_records:
        rec["reload"] = reload_check(out_dir, result, block, "cpu" if a.smoke else "cuda:0")
    return rec


def curve_noise(x: list[float]) -> float:
    """Std of x around its 3-point running mean (interior points): the scatter of one logged value."""
    res = [x[i] - (x[i - 1] + x[i] + x[i + 1]) / 3 for i in range(1, len(x) - 1)]
    if not res:
        return float("nan")
    mean = sum(res) / len(res)
    return (sum((r - mean) ** 2 for r in res) / len(res)) ** 0.5


def compare(ref: dict, other: dict) -> dict:
    out = {}
    for k in ("loss", "align_loss", "lm_loss", "softmax_fraction", "router_loss"):
        x, y = ref["curves"].get(k), other["curves"].get(k)
        if not x or not y or len(x) != len(y) or None in x or None in y:
            continue
        d = [abs(a - b) for a, b in zip(x, y)]
        noise = curve_noise(x)
        out[k] = {"max_abs_diff": max(d), "mean_abs_diff": sum(d) / len(d),
                  "mean_rel_diff": sum(di / max(abs(a), 1e-12) for di, a in zip(d, x)) / len(d),
                  "ref_curve_noise": noise, "mean_abs_diff_over_noise": (sum(d) / len(d)) / noise if noise else None,
                  "first_ref": x[0], "first_other": y[0], "last_ref": x[-1], "last_other": y[-1]}
    return out


def summarise(runs: dict, stage: int) -> dict:
    summary = {}
    ref = runs.get(f"stage{stage}_1gpu")
    for mode in ("ddp", "fsdp"):
        rec = runs.get(f"stage{stage}_{mode}")
        if rec is None or rec["returncode"] != 0:
            continue
        summary[f"{mode}_router_same_across_ranks"] = rec["router_same_across_ranks"]
        if "reload" in rec:
            summary[f"{mode}_reload"] = rec["reload"]
        if ref is None or ref["returncode"] != 0:
            continue
        summary[f"{mode}_vs_1gpu"] = compare(ref, rec)
        one, two = ref["throughput"]["tokens_per_s_per_gpu"], rec["throughput"]["tokens_per_s_per_gpu"]
        if one and two:
            summary[f"{mode}_scaling_efficiency"] = two / one
    return summary


def versions() -> dict:
    import accelerate
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__}
    for name in ("triton", "fla", "natsl_hf"):
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 - recorded, not fatal
            out[name] = f"not importable: {type(err).__name__}"
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        sep = argv.index("--")
        worker(argv[1], argv[2], argv[sep + 1:], reload_records=argv[3] == "1")
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", type=int, nargs="+", choices=(1, 2), default=[1])
    p.add_argument("--modes", nargs="+", choices=("1gpu", "ddp", "fsdp"), default=None,
                   help="default: 1gpu ddp fsdp (--smoke: 1gpu ddp)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--init-steps", type=int, default=50, help="stage-1 steps for stage 2's start, if needed")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2, help="per-device batch; global batch = 2 x this")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the throughput window")
    p.add_argument("--fit-blocks", type=int, default=16)
    p.add_argument("--calibration-blocks", type=int, default=8)
    p.add_argument("--lr-stage1", type=float, default=1e-3)
    p.add_argument("--lr-stage2", type=float, default=2e-4)
    p.add_argument("--text-mb", type=float, default=12.0)
    p.add_argument("--work", default="/tmp/natsl_multi_gpu")
    p.add_argument("--run-timeout", type=int, default=420)
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny model: a check of this script")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.smoke and a.preset == "1b":
        a.preset = "tiny"
    if a.modes is None:
        a.modes = ["1gpu", "ddp"] if a.smoke else ["1gpu", "ddp", "fsdp"]
    if a.smoke and "fsdp" in a.modes:
        p.error("--smoke runs on the CPU, where accelerate refuses FSDP: use --modes 1gpu ddp")

    work = Path(a.work)
    t0 = time.perf_counter()
    paths = prepare(work, a.preset, a.text_mb)
    device = "cpu (smoke)" if a.smoke else ", ".join(
        torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    report = {"issue": 9, "device": device, "versions": versions(),
              "command": shlex.join(["python3", "bench/multi_gpu.py", *argv]),
              "settings": {k: v for k, v in vars(a).items() if k not in ("out", "work")},
              "model": {"preset": a.preset, **PRESETS[a.preset], "vocab_size": VOCAB, **paths,
                        "prepare_s": round(time.perf_counter() - t0, 1)},
              "runs": {}, "summary": {}}
    block = torch.randint(1, VOCAB if not a.smoke else 100, (1, a.seq_len), generator=torch.Generator().manual_seed(0))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stage in a.stage:
        start_model = paths["natsl"]
        if stage == 2:
            if not (work / "stage1_1gpu" / "config.json").exists():
                print("stage 1 init (start of stage 2) ...", flush=True)
                rec = run_one("stage1_init", 1, "1gpu", paths["natsl"], a.init_steps, paths, a, work, block)
                report["runs"]["stage1_init"] = rec
                out.write_text(json.dumps(report, indent=1) + "\n")
                if rec["returncode"] != 0:
                    print(rec.get("log_tail", ""), flush=True)
                    break
                start_model = str(work / "stage1_init")
            else:
                start_model = str(work / "stage1_1gpu")
        for mode in a.modes:
            print(f"stage {stage} {mode} ...", flush=True)
            rec = run_one(f"stage{stage}_{mode}", stage, mode, start_model, a.steps, paths, a, work, block)
            report["runs"][f"stage{stage}_{mode}"] = rec
            print(json.dumps({k: v for k, v in rec.items() if k not in ("curves", "command", "log_tail")}), flush=True)
            if "log_tail" in rec:
                print(rec["log_tail"][-3000:], flush=True)
            report["summary"][f"stage{stage}"] = summarise(report["runs"], stage)
            out.write_text(json.dumps(report, indent=1) + "\n")  # after every run: partial results survive
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
