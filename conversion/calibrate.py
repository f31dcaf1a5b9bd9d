"""natsl-calibrate: zero-shot routing for any converted checkpoint, on your own text, without training.

    natsl-convert path/to/llama-or-qwen out/natsl
    natsl-calibrate out/natsl out/natsl-b0.25 --text my_text.txt --softmax-budget 0.25

1. The text is tokenised and packed into blocks of `--seq-len` tokens: the first `--calibration-blocks` fit and
   calibrate the routers, the next `--eval-blocks` are held out and measure the result.
2. Router fit (`router_fit.fit_routers`): with every chunk routed softmax a converted model computes its
   source exactly, so one pass gives each layer's routing targets, the `softmax_budget` share of chunks the
   source attention's later queries attend to most (modeling/router.py); each router is fitted to them by
   logistic regression.
3. Calibration (`calibrate_routers`): each router's bias is shifted so that plain argmax routing keeps the
   budget of the routable chunks per KV head, in one forward pass (every layer reads its input through the
   layers before it, already calibrated).
4. Held-out measurement (`evaluate_heldout`): perplexity with every chunk softmax (the source model, for a
   model that was not trained after conversion) and as routed, the realised softmax fraction and the KV cache
   after a prefill of each block, against the full cache. Printed, and written to OUT/calibration.json.

OUT is written atomically (conversion/output.py); OUT = MODEL replaces the model in place with --overwrite.
The realised fraction of a fixed router grows with the context: calibrate at the length you serve.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

PROG = "natsl-calibrate"


def token_blocks(tokenizer, texts: list[str], seq_len: int, num_blocks: int, what: str):
    """The first `num_blocks` packed blocks of `seq_len` tokens of `texts` ([num_blocks, seq_len] long); a
    ValueError saying how many there are when the text holds fewer."""
    import torch

    from .data import pack

    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    blocks = pack(ids, seq_len, tokenizer.eos_token_id)
    if len(blocks) < num_blocks:
        raise ValueError(f"the {what} text holds {len(blocks)} blocks of {seq_len} tokens, not {num_blocks}")
    return torch.tensor(blocks[:num_blocks])


def calibrate_routers(model, input_ids, budget: float, progress: bool = False) -> None:
    """Shift each NAtS-L router's bias so that argmax routing keeps `budget` of the routable chunks of
    `input_ids` ([B, T], unpadded blocks) per KV head (each layer its share of it, `config.layer_softmax_budget`),
    in one forward pass; `config.softmax_budget` becomes `budget`.

    The same thresholds as `router_fit.calibrate_router_bias`, which runs one forward per layer: here a
    forward hook on each router shifts its bias and its scores as the pass reaches it, so every layer
    reads its input through the already calibrated layers before it, as there (tested equal). Eager: the
    hooks change the routers' outputs, which a compiled layer would have to trace. progress: a bar that
    advances as the pass reaches each layer.
    """
    from functools import partial

    import torch
    from tqdm.auto import tqdm

    from .layers import natsl_decoder_layers
    from .router_fit import budget_thresholds

    config = model.config
    T = input_ids.shape[1]
    attns = [layer.self_attn for layer in natsl_decoder_layers(model)]
    bar = tqdm(total=len(attns), desc="calibrating router biases (one pass)", unit="layer", disable=not progress)

    def calibrate(router, args, scores, layer_budget: float):  # scores [B, N, H, 2]: (softmax, linear) scores
        chunk = torch.arange(scores.shape[1], device=scores.device)
        routable = ((chunk + 1) * config.chunk_size <= T) & (chunk >= config.num_sink_chunks)
        margins = (scores[..., 0] - scores[..., 1]).masked_fill(~routable[None, :, None], float("nan"))
        shift = budget_thresholds(margins.flatten(0, 1), layer_budget).to(scores)
        delta = torch.stack([-shift / 2, shift / 2], -1)  # [H, 2]
        router.proj.bias.add_(delta.flatten().to(router.proj.bias))
        bar.update()
        return scores + delta

    layer_budgets = [config.layer_softmax_budget(attn.layer_idx, budget) for attn in attns]  # each layer's share
    hooks = [attn.router.register_forward_hook(partial(calibrate, layer_budget=b))
             for attn, b in zip(attns, layer_budgets)]
    was_training, override = model.training, config.route_override
    model.eval()
    config.route_override = None
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        bar.close()
        for hook in hooks:
            hook.remove()
        config.route_override = override
        model.train(was_training)
    config.softmax_budget = budget


def fit_and_calibrate(model, blocks, budget: float, progress: bool = True) -> dict:
    """Fit every router to the source attention's targets on `blocks` ([n, T], one forward each, on the
    source's activations), then `calibrate_routers` on all of them -> the fit's statistics.

    The fit is `router_fit.fit_routers` step by step, so that each step has its progress bar: one source
    forward per block collects every layer's samples (`collect_routing_samples`), then each layer's router is
    fitted by logistic regression (`fit_router`, l2 0.1). Returns fit_routers' summary (tested equal)."""
    from tqdm.auto import tqdm

    from .layers import natsl_decoder_layers, unwrap
    from .router_fit import collect_routing_samples, fit_router, fit_summary

    base = unwrap(model)
    batches = tqdm([{"input_ids": b[None]} for b in blocks], desc="routing targets (source forwards)", unit="block",
                   disable=not progress)
    samples = collect_routing_samples(model, batches)
    decoders = natsl_decoder_layers(base)
    aucs, counts = [], []
    for d, (means, target, labelled) in tqdm(list(zip(decoders, samples)), desc="fitting routers (logistic regression)",
                                             unit="layer", disable=not progress):
        aucs.append(fit_router(d.self_attn.router, means, target, labelled, base.config.router_temperature, 0.1))
        counts.append(float(labelled.sum(0).float().mean()))
    calibrate_routers(model, blocks, budget, progress=progress)
    return fit_summary(aucs, counts)


def _all_softmax(model, x) -> float:
    """The loss of a conversion with every chunk routed softmax: its source model's loss, exactly."""
    override = model.config.route_override
    model.config.route_override = "softmax"
    try:
        return model(input_ids=x, labels=x, use_cache=False).loss.item()
    finally:
        model.config.route_override = override


def evaluate_heldout(model, blocks, progress: bool = True, source=None) -> dict:
    """Perplexity of the source and of the routed model on `blocks` ([n, T], one block per forward), the realised
    softmax fraction and the KV cache after a prefill of each block, against the full cache.

    source: the conversion the source's numbers come from, with every chunk routed softmax (default `model`: the
    source model exactly, for a model not trained since its conversion; a trained one has other weights)."""
    import torch
    from tqdm.auto import tqdm

    from natsl_hf.modeling_natsl import CACHE_FIELD

    nll = {"source": 0.0, "natsl": 0.0}
    fractions, layer_fractions, memory = [], [], []
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # one pass: no graph to compile for it
        for block in tqdm(blocks, desc="held-out perplexity (source, converted)", unit="block", disable=not progress):
            x = block[None].to(model.device)
            nll["source"] += _all_softmax(source or model, x)
            out = model(input_ids=x, labels=x, use_cache=True)
            nll["natsl"] += out.loss.item()
            fractions.append(out.softmax_fraction.item())
            layer_fractions.append(out.layer_softmax_fraction.float().cpu())
            memory.append(getattr(out, CACHE_FIELD).memory_report())
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
        "tokens": int(blocks.shape[1]),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("model", type=Path, help="a NAtS-L checkpoint directory (natsl-convert's output)")
    p.add_argument("out", type=Path, help="where the calibrated checkpoint goes (may be MODEL with --overwrite)")
    p.add_argument("--text", type=Path, required=True, help="a text file or a directory of .txt / .md files")
    p.add_argument("--softmax-budget", type=float, help="share of routable chunks kept softmax (default: the "
                   "checkpoint's softmax_budget)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per block: the length you serve (default 2048)")
    p.add_argument("--calibration-blocks", type=int, default=8, help="blocks to fit and calibrate on (default 8)")
    p.add_argument("--eval-blocks", type=int, default=2, help="held-out blocks to measure on (default 2; 0: none)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Every argument checked before any work: one `error:` line (exit 2) naming the fix."""
    from .output import check_output_path

    if not (args.model / "config.json").is_file():
        p.error(f"{args.model} is not a checkpoint directory (no config.json): pass natsl-convert's output.")
    if not args.text.exists():
        p.error(f"--text {args.text} does not exist: pass a text file or a directory of .txt / .md files.")
    if args.softmax_budget is not None and not 0 < args.softmax_budget <= 1:
        p.error(f"--softmax-budget {args.softmax_budget}: expected a share in (0, 1], e.g. 0.25.")
    for flag, value, low in (("--seq-len", args.seq_len, 1), ("--calibration-blocks", args.calibration_blocks, 1),
                             ("--eval-blocks", args.eval_blocks, 0)):
        if value < low:
            p.error(f"{flag} {value}: expected an integer >= {low}.")
    try:
        if args.out.resolve() != args.model.resolve():
            check_output_path(args.model, args.out, args.overwrite)
        elif not args.overwrite:
            raise FileExistsError(f"OUT is MODEL ({args.model}): pass --overwrite to calibrate it in place.")
    except (ValueError, FileExistsError) as err:
        p.error(str(err))
    if args.device == "cuda" or args.device is None:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible here; drop --device to run on the CPU.")


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    print(f"{PROG}: loading {args.model}", flush=True)
    try:
        return _run(args, argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {args.out} was not written.", file=sys.stderr)
        return 130
    except ValueError as err:  # the text is too short, a model that is not NAtS-L
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


def _run(args, argv) -> int:
    import torch
    from transformers import AutoTokenizer

    from natsl_hf import NatslForCausalLM

    from .data import load_texts_or_ids
    from .output import write_atomically

    t0 = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    saved_dtype = json.loads((args.model / "config.json").read_text()).get("dtype") or "float32"
    model = NatslForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)  # fits in fp32
    if not model.config.natsl_layers:
        raise ValueError(f"{args.model} has no NAtS-L layers (config.natsl_layers is empty): nothing routes.")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    kind, texts = load_texts_or_ids(args.text)
    if kind != "text":
        raise ValueError(f"--text {args.text} is a tokenised dataset: pass raw text.")
    budget = model.config.softmax_budget if args.softmax_budget is None else args.softmax_budget
    try:
        blocks = token_blocks(tokenizer, texts, args.seq_len, args.calibration_blocks + args.eval_blocks, "--text")
    except ValueError as err:
        raise ValueError(f"{err}: give more text, or lower --calibration-blocks / --eval-blocks or --seq-len") from err
    calibration, heldout = blocks[: args.calibration_blocks].to(device), blocks[args.calibration_blocks:]
    print(f"{PROG}: {len(calibration)} calibration + {len(heldout)} held-out blocks of {args.seq_len} tokens, "
          f"budget {budget}", flush=True)
    fit = fit_and_calibrate(model, calibration, budget)
    result = {"command": shlex.join([PROG, *(sys.argv[1:] if argv is None else argv)]), "model": str(args.model),
              "softmax_budget": budget, "seq_len": args.seq_len, "calibration_blocks": len(calibration),
              "eval_blocks": len(heldout), **fit}
    if len(heldout):
        result["heldout"] = evaluate_heldout(model, heldout)
    result["seconds"] = round(time.perf_counter() - t0, 1)

    def write(tmp: Path) -> None:
        model.to(getattr(torch, saved_dtype)).save_pretrained(tmp)  # the checkpoint's own dtype
        tokenizer.save_pretrained(tmp)
        (tmp / "calibration.json").write_text(json.dumps(result, indent=1), encoding="utf-8")

    write_atomically(args.out, write)
    print(report(result, args.out))
    return 0


def report(result: dict, out: Path) -> str:
    lines = [f"routers fitted to the source attention (train AUC {result['router_fit_train_auc']:.3f}) and calibrated "
             f"to budget {result['softmax_budget']} on {result['calibration_blocks']} x {result['seq_len']} tokens"]
    h = result.get("heldout")
    if h:
        gap = h["perplexity"] / h["source_perplexity"] - 1
        lines += [
            f"held-out perplexity ({result['eval_blocks']} x {result['seq_len']} tokens): every chunk softmax "
            f"(the source) {h['source_perplexity']:.2f}, routed {h['perplexity']:.2f} ({100 * gap:+.1f} %)",
            f"realised softmax fraction there: {h['softmax_fraction']:.3f} of the routable chunks",
            f"KV cache after a {result['seq_len']}-token prefill: {h['kv_bytes'] / 2**20:.2f} MiB of "
            f"{h['full_kv_bytes'] / 2**20:.2f} MiB (saving {100 * (1 - h['kv_fraction']):.1f} %; sink chunks and the "
            f"open chunk are always kept), plus a {h['state_bytes'] / 2**20:.2f} MiB GDN state",
        ]
    lines.append(f"written to {out} (calibration.json holds these numbers); no training was done")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
