"""Training-speed rows of NAtS-L beside its source, one GPU, one process (issue 21).

The source is a SmolLM2-135M-shaped `LlamaForCausalLM` (random weights: a step's time
does not depend on them) and NAtS-L its conversion with `convert_model` (all 30 layers NAtS-L, chunk
64), routes at softmax fraction p: random router weights and biases calibrated on the row's own batch (as
bench/model_bench.py does). Rows (`bench/results/model_bench_*.json` format, `{"device", "versions",
"command", "rows", "errors"}`):

  trainer         tok/s of a plain HF `Trainer` fine-tune (bf16 autocast, AdamW, labels = inputs) at
                  T = 2048: 16 rows without gradient checkpointing, 4 rows with it. Timed from the end of
                  the warm-up steps to the end of training (one sync at each end).
  distill_stage1  tok/s of `NatslDistillTrainer` stage 1 (attention transfer + supervised routing, the
                  teacher's forward inside), same batches.
  distill_stage2  the same for stage 2 (LM + logit KD, kd_weight 1, the teacher's forward inside).
  profile         one training step (forward + backward + optimizer, bf16 autocast) under the torch
                  profiler: wall ms, GPU busy ms (sum of kernel times), GPU kernels, host syncs, aten ops,
                  the CPU time of the attention modules' forwards, the top kernels and the top CPU ops.
  check           one training step with each switch off and on, loss and gradients compared: the compiled
                  layer path against the eager one (NATSL_COMPILE=0), and the branch ops replayed as CUDA
                  graphs against launched (NATSL_CUDA_GRAPHS=0; modeling/kernels/graphs.py).
                  `--without-graphs` adds, per trainer shape, the NAtS-L row with the graphs off (the A/B).
  prefill         Llama-3.2-1B shape (bench/model_bench.py's), 8k, one forward with last-token logits:
                  ms, and the same profile fields.

Usage (GPU):  python bench/train_bench.py --out bench/results/model_bench_h200_training.json
              [--sections check,trainer,profile,distill,prefill] [--quick] [--compile-mode reduce-overhead]

--without-cpp-wrapper adds, per trainer shape, the NAtS-L row compiled without inductor's C++ wrapper (the product
compiles with it: modeling.layer.COMPILE_OPTIONS), the A/B of that option.
--compile-mode is an experiment, not a product setting: the layers compile their dense path with torch.compile's
default mode; reduce-overhead replays each compiled graph as a CUDA graph (one launch instead of the graph's and
the branch ops' launches: the host time the 4 x 2048 ckpt profile of 2026-12-04 is bound by).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from natsl_hf.conversion import convert_model
from natsl_hf.conversion.trainer import NatslDistillTrainer, prepare_student
from natsl_hf.modeling.layer import NatslAttention

import model_bench
from model_bench import calibrate_routes, random_routers, versions

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True, max_position_embeddings=8192)
T_TRAIN = 2048
SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")


DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a --quick smoke run of the script itself
ACTIVITIES = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def smollm2_source(quick: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    shape = dict(SMOLLM2, num_hidden_layers=2, vocab_size=512) if quick else SMOLLM2
    return LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).to(DEV)


def batch_ids(batch: int, T: int, vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randint(0, vocab, (batch, T), device=DEV, generator=g)


def set_compile_mode(mode: str) -> None:
    """Compile the NAtS-L and full-softmax layers' dense paths with torch.compile `mode` in this process (what
    `modeling.layer.compiled_dense` / `modeling.softmax_attention.compiled_dense` make once per process), without the
    product's inductor options (torch.compile takes a mode or options, not both)."""
    import functools

    from natsl_hf.modeling import layer, softmax_attention

    for module, cls in ((layer, layer.NatslAttention), (softmax_attention, softmax_attention.NatslSoftmaxAttention)):
        module.compiled_dense = functools.cache(lambda cls=cls: torch.compile(cls._dense, mode=mode))


def compile_paths(options: dict | None) -> list[str]:
    """The model's compiled paths (the layers' dense paths, the MLP half; the KD pieces compile without the C++ wrapper
    either way: conversion/trainer.py) made from now on in this process with these inductor options (None: the
    product's, `modeling.layer.COMPILE_OPTIONS`): the A/B of the C++ wrapper.
    The made functions and dynamo's caches are dropped so that the next call compiles again; returns (and clears) a
    compile failure recorded meanwhile (`_COMPILE_FAILED`, or a failed C++-wrapper build: `_WRAPPER_FAILED`), so that
    one failed row does not leave the later rows eager or without the wrapper."""
    import functools

    from natsl_hf import modeling_natsl
    from natsl_hf.modeling import layer, softmax_attention

    paths = ((layer, "compiled_dense", layer.NatslAttention._dense),
             (softmax_attention, "compiled_dense", softmax_attention.NatslSoftmaxAttention._dense),
             (modeling_natsl, "compiled_mlp_block", modeling_natsl.NatslDecoderLayer._mlp_block))
    for module, name, fn in paths:
        setattr(module, name, functools.cache(lambda fn=fn: layer.natsl_compile(fn, **(options or {}))))
    torch._dynamo.reset()
    failed = layer._COMPILE_FAILED + layer._WRAPPER_FAILED  # a failed wrapper build would leave later rows without it
    layer._COMPILE_FAILED.clear()
    layer._WRAPPER_FAILED.clear()
    return failed


def natsl_of(source, p: float, ids: torch.Tensor):
    natsl = convert_model(source, chunk_size=64).to(DEV).float()
    random_routers(natsl)
    natsl.eval()
    calibrate_routes(natsl, p, ids[:1])
    return natsl


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, steps: int):
        self.ids, self.n = ids.cpu(), steps * ids.shape[0]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        row = self.ids[i % self.ids.shape[0]]
        return {"input_ids": row, "labels": row}


class _Clock(TrainerCallback):
    """Wall time of steps [warmup, warmup + timed) (a sync at both ends), then the step after them under the
    torch profiler."""

    def __init__(self, warmup: int, timed: int):
        self.warmup, self.timed, self.t0, self.t1, self.prof, self.prof_ms = warmup, timed, None, None, None, None
        self.t_begin = None

    def on_train_begin(self, args, state, control, **kw):
        self.t_begin = time.perf_counter()

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step in (self.warmup, self.warmup + self.timed):
            sync()
            now = time.perf_counter()
            if state.global_step == self.warmup:
                self.t0 = now
            else:
                self.t1 = now
                self.prof = profile(activities=ACTIVITIES)
                self.prof.__enter__()

    def on_step_end(self, args, state, control, **kw):
        if self.prof is not None and self.prof_ms is None:
            sync()
            self.prof_ms = (time.perf_counter() - self.t1) * 1e3
            self.prof.__exit__(None, None, None)


def training_args(out_dir: str, batch: int, grad_ckpt: bool, steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps, bf16=DEV == "cuda", use_cpu=DEV == "cpu",
        gradient_checkpointing=grad_ckpt, gradient_checkpointing_kwargs={"use_reentrant": False},
        learning_rate=1e-5, save_strategy="no", report_to=[], logging_steps=10**6, remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True,
    )


def run_trainer(kind: str, model, teacher, ids, grad_ckpt: bool, warmup: int, timed: int, tmp: str) -> dict:
    B, T = ids.shape
    _label_attention(model)
    clock = _Clock(warmup, timed)
    args = training_args(tmp, B, grad_ckpt, warmup + timed + 1)
    data = _Dataset(ids, warmup + timed + 1)
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if kind == "trainer":
        model.config.use_cache = False
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[clock])
    else:
        stage = 1 if kind == "distill_stage1" else 2
        student = prepare_student(model, stage)
        trainer = NatslDistillTrainer(student, args, stage=stage, teacher=teacher, kd_weight=1.0 if stage == 2 else 0.0,
                                      train_dataset=data, callbacks=[clock])
    trainer.train()
    seconds = clock.t1 - clock.t0
    row = {"kind": kind, "T": T, "batch": B, "grad_ckpt": grad_ckpt, "steps_timed": timed,
           "tok_s": B * T * timed / seconds, "s_per_step": seconds / timed,
           "warmup_s": clock.t0 - clock.t_begin,  # the warm-up steps: kernel JIT and torch.compile included
           "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else None,
           "profile": summarize(clock.prof, clock.prof_ms, model.config.num_hidden_layers, top=15)}
    model.gradient_checkpointing_disable()
    model.zero_grad(set_to_none=True)
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return row


def _label_attention(model) -> None:
    """Wrap each attention module's forward in a profiler range named by its class (bench only)."""
    for module in model.modules():
        if (isinstance(module, NatslAttention) or type(module).__name__.endswith("Attention")) and \
                not hasattr(module, "_bench_labelled"):
            module._bench_labelled = True
            fwd = module.forward

            def wrapped(*a, _fwd=fwd, _name=type(module).__name__, **k):
                with record_function(f"attn::{_name}"):
                    return _fwd(*a, **k)
            module.forward = wrapped


def summarize(prof, wall_ms: float, n_layers: int, top: int = 30) -> dict:
    """The profile's totals (GPU kernels and their summed time, host syncs, aten ops), the CPU time of the
    attention forwards (`_label_attention` ranges) and the `top` kernels / CPU ops by time."""
    events = prof.events()
    kernels, cpu_ops, attn = {}, {}, {}
    n_aten = n_sync = n_kernels = 0
    gpu_us = 0.0
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            if e.name.startswith("attn::"):  # the GPU side of a profiler range, not a kernel
                continue
            n_kernels += 1
            us = e.time_range.elapsed_us()
            gpu_us += us
            k = kernels.setdefault(e.name[:100], [0, 0.0])
            k[0] += 1
            k[1] += us
            continue
        if e.name.startswith("aten::"):
            n_aten += 1
        if e.name in SYNC_OPS:
            n_sync += 1
        if e.name.startswith("attn::"):
            a = attn.setdefault(e.name, [0, 0.0])
            a[0] += 1
            a[1] += e.time_range.elapsed_us()
        c = cpu_ops.setdefault(e.name[:80], [0, 0.0])
        c[0] += 1
        c[1] += e.self_cpu_time_total
    top_k = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]
    top_c = sorted(cpu_ops.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "wall_ms": wall_ms, "gpu_busy_ms": gpu_us / 1e3, "gpu_kernels": n_kernels, "host_syncs": n_sync,
        "aten_ops": n_aten, "kernels_per_layer": n_kernels / n_layers, "aten_ops_per_layer": n_aten / n_layers,
        "attention_forward": {k: {"calls": v[0], "cpu_ms_per_call": v[1] / 1e3 / max(v[0], 1)} for k, v in attn.items()},
        "top_kernels": [{"name": k, "count": v[0], "ms": v[1] / 1e3} for k, v in top_k],
        "top_cpu_ops": [{"name": k, "count": v[0], "self_cpu_ms": v[1] / 1e3} for k, v in top_c],
    }


def profile_train_row(name: str, model, ids, grad_ckpt: bool) -> dict:
    model.train()
    model.config.use_cache = False
    if grad_ckpt:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=DEV == "cuda")

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(3):
        step()
    sync()
    _label_attention(model)
    with profile(activities=ACTIVITIES) as prof:
        t0 = time.perf_counter()
        step()
        sync()
        wall = (time.perf_counter() - t0) * 1e3
    sync()
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    sync()
    unprofiled = (time.perf_counter() - t0) * 1e3 / 3
    model.gradient_checkpointing_disable()
    model.eval()
    del opt
    B, T = ids.shape
    return {"kind": "profile", "what": "train step (fwd + bwd + AdamW, bf16 autocast)", "model": name, "T": T,
            "batch": B, "grad_ckpt": grad_ckpt, "ms_unprofiled": unprofiled,
            **summarize(prof, wall, model.config.num_hidden_layers)}


SWITCHES = {  # check rows: a training step with the switch off ("0") against on ("1")
    "NATSL_COMPILE": "compiled vs eager NAtS-L layers",
    "NATSL_CUDA_GRAPHS": "branch ops replayed as CUDA graphs vs launched (modeling/kernels/graphs.py)",
}


def check_kd_row(batch: int, T: int, vocab: int, reps: int = 5) -> dict:
    """The stage-2 KD loss (conversion/trainer.kd_loss: checkpointed pieces) on random bf16 logits of a
    [batch, T, vocab] step, its pieces eager (NATSL_COMPILE=0) against compiled (1): value, gradient and the time of
    a forward + backward (median of `reps`, after one warm-up that compiles)."""
    from natsl_hf.conversion.trainer import kd_loss

    g = torch.Generator(device=DEV).manual_seed(0)
    student = torch.randn(batch, T, vocab, device=DEV, generator=g).to(torch.bfloat16).requires_grad_()
    teacher = torch.randn(batch, T, vocab, device=DEV, generator=g).to(torch.bfloat16)

    def step():
        loss = kd_loss(student, teacher, 1.0)
        (grad,) = torch.autograd.grad(loss, student)
        return loss, grad

    out = {}
    try:
        for flag in ("0", "1"):
            os.environ["NATSL_COMPILE"] = flag
            loss, grad = step()
            times = []
            for _ in range(reps):
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - t0)
            out[flag] = (float(loss), grad.float(), sorted(times)[reps // 2])
    finally:
        os.environ.pop("NATSL_COMPILE", None)
    rel = float((out["1"][1] - out["0"][1]).norm() / out["0"][1].norm())
    return {"kind": "check", "what": "KD loss pieces compiled vs eager: forward + backward on random bf16 logits",
            "switch": "NATSL_COMPILE", "batch": batch, "T": T, "vocab": vocab, "loss_off": out["0"][0],
            "loss_on": out["1"][0], "grad_rel_err_max": rel, "ms_off": 1e3 * out["0"][2], "ms_on": 1e3 * out["1"][2]}


def check_switch_row(model, ids, switch: str) -> dict:
    """One bf16-autocast training step with `switch` (an environment switch of SWITCHES) at 0 and at 1: loss and every
    gradient. The first NATSL_CUDA_GRAPHS=1 step captures its graphs (the first layer's call warms up, the second
    captures, the rest replay), so the comparison covers all three."""
    model.train()
    model.config.use_cache = False

    def run(flag: str):
        os.environ[switch] = flag
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        return float(loss), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    try:
        t0 = time.perf_counter()
        loss_off, grads_off = run("0")
        sync()
        t1 = time.perf_counter()
        loss_on, grads_on = run("1")
        sync()
        t2 = time.perf_counter()
    finally:
        os.environ.pop(switch, None)
        model.zero_grad(set_to_none=True)
        model.eval()
    rel = {n: float((grads_on[n] - g).norm() / g.norm().clamp(min=1e-30)) for n, g in grads_off.items()}
    worst = sorted(rel.items(), key=lambda kv: -kv[1])[:5]
    B, T = ids.shape
    return {"kind": "check", "what": SWITCHES[switch] + ": one train step, bf16 autocast", "switch": switch, "T": T,
            "batch": B, "off_step_s": t1 - t0, "first_on_step_s": t2 - t1, "loss_off": loss_off, "loss_on": loss_on,
            "grads_compared": len(rel), "grads_missing_on": sorted(set(grads_off) - set(grads_on)),
            "grad_rel_err_max": worst[0][1] if worst else None, "grad_rel_err_worst": worst}


def prefill_rows(p: float, quick: bool) -> list[dict]:
    source, natsl = model_bench.build_models(quick)
    random_routers(natsl)
    rows = []
    T = 2048 if quick else 8192
    ids = model_bench.prompt(1, T)
    calibrate_routes(natsl, p, ids)
    for name, model in (("natsl", natsl), ("source", source)):
        with torch.no_grad():
            ms = model_bench.time_steps(lambda: model(ids, use_cache=False, logits_to_keep=1), 2, 5, ids.device)
            _label_attention(model)
            with profile(activities=ACTIVITIES) as prof:
                t0 = time.perf_counter()
                model(ids, use_cache=False, logits_to_keep=1)
                sync()
                wall = (time.perf_counter() - t0) * 1e3
        rows.append({"kind": "prefill", "model": name, "shape": "Llama-3.2-1B", "T": T, "batch": 1,
                     "p": p if name == "natsl" else None, "ms": ms, **summarize(prof, wall, model.config.num_hidden_layers)})
    del source, natsl
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", default="check,trainer,profile,distill,prefill")
    ap.add_argument("--p", type=float, default=0.25, help="softmax fraction of the random routes")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="timed Trainer steps per row")
    ap.add_argument("--shapes", help="trainer / profile rows as BATCHxckpt|nockpt,... (default 16xnockpt,4xckpt)")
    ap.add_argument("--quick", action="store_true", help="2 layers, a smoke run")
    ap.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                    default="default", help="torch.compile mode of the layers' dense path (an experiment: the layer "
                    "compiles with the default mode; reduce-overhead replays it as CUDA graphs)")
    ap.add_argument("--without-graphs", action="store_true",
                    help="each trainer shape also as a NAtS-L row with NATSL_CUDA_GRAPHS=0 (the branch ops launched)")
    ap.add_argument("--checks", default=",".join([*SWITCHES, "kd"]),
                    help="the check section's rows: switches of SWITCHES and/or kd (default all)")
    ap.add_argument("--without-cpp-wrapper", action="store_true",
                    help="each trainer shape also as a NAtS-L row compiled without inductor's C++ wrapper (compile_paths)")
    args = ap.parse_args(argv)
    if args.compile_mode != "default":
        set_compile_mode(args.compile_mode)
    sections = set(args.sections.split(","))
    report = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "versions": versions(),
              "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
              "model": {"shape": "SmolLM2-135M", **SMOLLM2, "chunk_size": 64, "weights": "random",
                        "p": args.p, "compile_mode": args.compile_mode},
              "rows": [], "errors": []}
    tmp = os.environ.get("TMPDIR", "/tmp") + "/train_bench"

    def dump():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    def add(rows, **extra):
        for row in rows if isinstance(rows, list) else [rows]:
            row.update(extra)
            report["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("top_") and k != "profile"}), flush=True)
        dump()

    def attempt(label, fn, **extra):
        t0 = time.perf_counter()
        try:
            add(fn(), wall_s=round(time.perf_counter() - t0, 1), **extra)
        except Exception:  # noqa: BLE001 - one failed row must not lose the others
            report["errors"].append({"row": label, "error": traceback.format_exc()})
            print(traceback.format_exc(), flush=True)
            dump()
            gc.collect()
            torch.cuda.empty_cache()

    source = smollm2_source(args.quick)
    vocab = source.config.vocab_size
    T = 256 if args.quick else T_TRAIN
    shapes = [(2, False), (1, True)] if args.quick else [(16, False), (4, True)]
    if args.shapes:
        shapes = [(int(b), c == "ckpt") for b, c in (shape.split("x") for shape in args.shapes.split(","))]
    natsl = natsl_of(source, args.p, batch_ids(1, T, vocab))
    if "check" in sections:
        checks = args.checks.split(",")
        for switch in (s for s in SWITCHES if s in checks):
            attempt(f"check {switch}", lambda: check_switch_row(natsl, batch_ids(2, T, vocab), switch), model="natsl",
                    p=args.p)
        if "kd" in checks:
            attempt("check kd", lambda: check_kd_row(shapes[0][0], T, vocab))
    for B, ckpt in shapes:
        ids = batch_ids(B, T, vocab)
        if "profile" in sections:
            attempt(f"profile source {B} {ckpt}", lambda: profile_train_row("source", source, ids, ckpt))
            attempt(f"profile natsl {B} {ckpt}", lambda: profile_train_row("natsl", natsl, ids, ckpt), p=args.p)
            sections.discard("profile")  # one profile shape (the first) is enough
        if "trainer" in sections:
            for name, model in (("source", source), ("natsl", natsl)):
                attempt(f"trainer {name} {B} {ckpt}", lambda: run_trainer("trainer", model, None, ids, ckpt, args.warmup,
                                                                          args.steps, tmp), model=name)
            if args.without_graphs:  # the same NAtS-L row with the branch ops launched (the A/B of graphs.py)
                os.environ["NATSL_CUDA_GRAPHS"] = "0"
                attempt(f"trainer natsl {B} {ckpt} no graphs", lambda: run_trainer(
                    "trainer", natsl, None, ids, ckpt, args.warmup, args.steps, tmp), model="natsl", cuda_graphs=False)
                os.environ.pop("NATSL_CUDA_GRAPHS")
            if args.without_cpp_wrapper:  # the same NAtS-L row compiled without inductor's C++ wrapper (the A/B)
                failed = compile_paths({"cpp_wrapper": False})  # what the product row above recorded
                if failed:
                    report["errors"].append({"row": f"trainer natsl {B} {ckpt}", "error": failed[0]})
                attempt(f"trainer natsl {B} {ckpt} no cpp_wrapper", lambda: run_trainer(
                    "trainer", natsl, None, ids, ckpt, args.warmup, args.steps, tmp), model="natsl", cpp_wrapper=False)
                failed = compile_paths(None)
                if failed:
                    report["errors"].append({"row": f"trainer natsl {B} {ckpt} no cpp_wrapper", "error": failed[0]})
    if "distill" in sections:
        ids = batch_ids(shapes[0][0], T, vocab)
        teacher = smollm2_source(args.quick)  # a frozen copy, as natsl-distill loads --source
        teacher.load_state_dict(source.state_dict())
        if DEV == "cuda":  # natsl-distill --bf16 loads the teacher in bf16 (distill.load_source)
            teacher.to(torch.bfloat16)
        for kind in ("distill_stage1", "distill_stage2"):
            student = natsl_of(source, args.p, ids)
            attempt(kind, lambda: run_trainer(kind, student, teacher, ids, False, args.warmup, args.steps, tmp),
                    model="natsl", p=args.p)
            del student
        del teacher
    del natsl
    if "prefill" in sections and DEV == "cuda":  # the 1B shape: GPU only
        attempt("prefill 1B", lambda: prefill_rows(0.125, args.quick))
    dump()
    for r in report["rows"]:
        metric = r.get("tok_s") or r.get("ms_unprofiled") or r.get("ms") or float("nan")
        print(f"{r['kind']:>15} {r.get('model', ''):>7} B={r.get('batch')} ckpt={r.get('grad_ckpt')} -> {metric:.1f} "
              f"kernels={r.get('gpu_kernels')} aten={r.get('aten_ops')} syncs={r.get('host_syncs')} "
              f"gpu_busy={r.get('gpu_busy_ms')} peak={r.get('peak_gb')}")
    print(f"{len(report['errors'])} errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
