"""Quality of NAtS-L checkpoints against their source: perplexity, greedy agreement, long-range recall.

    python bench/eval_quality.py --source SRC_DIR --model init=CONVERTED_DIR --model stage1=S1_DIR \\
        --model stage2=S2_DIR --text HELDOUT.txt --out bench/results/quality_X.json

For the source and every `--model LABEL=DIR` (NAtS-L checkpoints), in this order:

- perplexity: exp(mean next-token NLL) over `--ppl-blocks` packed blocks of `--seq-len` tokens of
  the held-out text (`natsl_hf.conversion.data` packing), plus top-1 agreement with the source's
  next-token argmax on the same tokens;
- greedy agreement: the source greedily continues `--gen-prompts` prompts (prefixes of held-out
  blocks) by `--gen-tokens` tokens; each model is scored on those continuations with teacher forcing:
  `gen_prefix_match` = mean fraction of the continuation before the model's greedy choice first
  differs (exactly what free-running greedy decoding of the model would reproduce, given that a full
  forward equals prefill + decode), `gen_token_match` = per-position top-1 agreement;
- retrieval: synthetic key-value recall in contexts of `--retrieval-lengths` tokens of held-out text
  (a run of consecutive sentences of `--text`; `--retrieval-haystack words`: random sentences of
  common words, which a router trained on natural text may treat as out of distribution) with
  `--retrieval-pairs` lines "The code for WORD is NUMBER." spread through it; the
  context is prefilled once (cache), then for each of `--retrieval-queries` queries
  "... The code for WORD is" the answer counts if greedy decoding reproduces NUMBER exactly (scored in
  one teacher-forced call from a copy of the cache);
- the realised softmax fraction (NAtS-L models, inference routing) on the perplexity blocks (also per
  NAtS-L layer) and on the retrieval contexts, and the kept / full KV-cache bytes after prefilling a
  retrieval context (`NatslCache.memory_report()["kv_fraction"]`); `pair_chunk_softmax_fraction` =
  the share of the routable chunks holding a pair line that the routers keep softmax (over NAtS-L
  layers and KV heads): what recall from the softmax branch can reach, against the context's
  overall fraction.

Writes one JSON with device, library versions, the exact command and all numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import re
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]

WORDS = ("apple river stone cloud maple copper violet harbor lantern meadow falcon silver garden pepper "
         "candle orbit willow thunder marble velvet cactus glacier harvest compass ember tulip canyon "
         "saddle beacon pillow quartz raven nickel orchid timber comet cobalt fern basil dune prism "
         "walnut hazel lotus cedar pebble summit violet jasper otter badger canvas ribbon mosaic").split()
FILLER = ("the of and a to in is was that for on with as by at from this which an be are or it not "
          "but had have one all were when there can more about some time would into only other then "
          "people over also after first well new years many these may such through where much before "
          "day way between each under most long three world great still both high small large every").split()


def versions() -> dict:
    import transformers

    import natsl_hf

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "natsl_hf": natsl_hf.__version__}
    try:
        import subprocess

        out["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        pass
    return out


def device_info(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def load_model(path: str, device, dtype):
    from transformers import AutoModelForCausalLM

    import natsl_hf  # noqa: F401  registers the natsl model type

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def is_natsl(model) -> bool:
    return getattr(model.config, "model_type", None) == "natsl"


@torch.no_grad()
def forward(model, input_ids, **kw):
    kw = dict(kw)
    if is_natsl(model):
        kw.setdefault("use_cache", False)
    return model(input_ids=input_ids, **kw)


# ------------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, src_argmax: list[torch.Tensor] | None, batch_size: int):
    nll, count, agree, fractions, layer_fractions = 0.0, 0, 0, [], []
    argmaxes = []
    for i in range(0, len(blocks), batch_size):
        x = blocks[i:i + batch_size]
        out = forward(model, x)
        logits = out.logits[:, :-1].float()
        nll += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
        am = logits.argmax(-1)
        argmaxes.append(am)
        if src_argmax is not None:
            agree += (am == src_argmax[len(argmaxes) - 1]).sum().item()
        if getattr(out, "softmax_fraction", None) is not None:
            fractions.append(float(out.softmax_fraction))
            layer_fractions.append(out.layer_softmax_fraction.float().cpu())
    res = {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}
    if src_argmax is not None:
        res["top1_agreement"] = agree / count
    if fractions:
        res["softmax_fraction"] = sum(fractions) / len(fractions)
        res["layer_softmax_fraction"] = torch.stack(layer_fractions).nanmean(0).tolist()  # per NAtS-L layer
    return res, argmaxes


@torch.no_grad()
def source_continuations(source, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy continuations of the source ([P, n_new]); prompts [P, L] (no padding)."""
    out = source.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n_new,
                          min_new_tokens=n_new, do_sample=False, pad_token_id=source.config.eos_token_id)
    return out[:, prompts.shape[1]:]


@torch.no_grad()
def greedy_agreement(model, prompts: torch.Tensor, conts: torch.Tensor) -> dict:
    L, K = prompts.shape[1], conts.shape[1]
    prefix, token = [], []
    for p, c in zip(prompts, conts):
        x = torch.cat([p, c])[None]
        pred = forward(model, x).logits[0, L - 1:L - 1 + K].argmax(-1)
        ok = pred == c
        token.append(ok.float().mean().item())
        first_bad = (~ok).nonzero()
        prefix.append((first_bad[0, 0].item() if len(first_bad) else K) / K)
    return {"gen_prefix_match": sum(prefix) / len(prefix), "gen_token_match": sum(token) / len(token),
            "gen_prompts": len(prefix), "gen_tokens": K}


def haystack_sentences(text: str) -> list[str]:
    """Sentences (and lines) of a natural text, for retrieval haystacks."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in parts if len(p.strip()) > 1]


def build_retrieval_context(tokenizer, length: int, n_pairs: int, rng: random.Random,
                            haystack: list[str] | None = None):
    """-> (context token ids of ~`length` tokens, [(key, value)], positions of the pair lines' tokens).

    haystack: sentences of held-out natural text; a random run of consecutive sentences fills the
    context (the router sees text like its training text). None: random sentences of common words.
    """
    keys = rng.sample(WORDS, n_pairs)
    pairs = [(k, str(rng.randint(1000, 9999))) for k in keys]
    # filler sentences, with the pair lines at evenly spread random positions
    n_tok = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    pair_lines = [f"The code for {k} is {v}." for k, v in pairs]
    budget = length - sum(n_tok(" " + s) for s in pair_lines) - 16
    filler = []
    start = rng.randrange(len(haystack)) if haystack else 0
    while budget > 0:
        if haystack:
            sentence = haystack[(start + len(filler)) % len(haystack)]
        else:
            sentence = " ".join(rng.choice(FILLER) for _ in range(rng.randint(6, 14))).capitalize() + "."
        cost = n_tok(" " + sentence)
        if haystack and cost > budget:
            break
        filler.append(sentence)
        budget -= cost
    slots = sorted(rng.sample(range(len(filler) + 1), n_pairs))
    lines = list(filler)
    for offset, (slot, line) in enumerate(zip(slots, pair_lines)):
        lines.insert(slot + offset, line)
    text = " ".join(lines)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, at = [], 0  # character spans of the pair lines in `text`
    for line in lines:
        if line in pair_lines:
            spans.append((at, at + len(line)))
        at += len(line) + 1
    pair_tokens = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if any(a < e and b > s for s, e in spans)]
    return enc["input_ids"], pairs, pair_tokens


@torch.no_grad()
def retrieval(model, tokenizer, contexts, n_queries: int, device) -> dict:
    from natsl_hf.modeling_natsl import CACHE_FIELD  # this transformers' name of the cache argument / field

    correct, total, fractions, kv, pair_kept = 0, 0, [], [], []
    natsl = is_natsl(model)
    for ids, pairs, pair_tokens in contexts:
        x = torch.tensor([ids], device=device)
        out = model(input_ids=x, use_cache=True, **({"output_routes": True} if natsl else {}))
        if getattr(out, "softmax_fraction", None) is not None:
            fractions.append(float(out.softmax_fraction))
            kv.append(getattr(out, CACHE_FIELD).memory_report()["kv_fraction"])  # kept / full KV after the prefill
            # routable chunks that hold a pair line's token: the share of them kept softmax (layers, KV heads)
            chunks = torch.tensor(sorted({t // model.config.chunk_size for t in pair_tokens}), device=device)
            kept = [r.hard[0, chunks][r.routable[0, chunks]].float() for r in out.routes if r.hard.shape[1] > 0]
            kept = torch.cat(kept) if kept else torch.zeros(0)
            if kept.numel():
                pair_kept.append(float(kept.mean()))
        for key, value in pairs[:n_queries]:
            q = tokenizer(f" Question: what is the code for {key}? Answer: The code for {key} is",
                          add_special_tokens=False)["input_ids"]
            a = tokenizer(f" {value}", add_special_tokens=False)["input_ids"]
            cache = copy.deepcopy(getattr(out, CACHE_FIELD))
            y = torch.tensor([q + a], device=device)
            mask = torch.ones(1, len(ids) + len(q) + len(a), dtype=torch.long, device=device)
            logits = model(input_ids=y, **{CACHE_FIELD: cache}, attention_mask=mask, use_cache=True).logits[0]
            pred = logits[len(q) - 1:len(q) - 1 + len(a)].argmax(-1).tolist()
            correct += int(pred == a)
            total += 1
    res = {"accuracy": correct / total, "queries": total}
    if fractions:
        res["softmax_fraction"] = sum(fractions) / len(fractions)
        res["kv_fraction"] = sum(kv) / len(kv)
    if pair_kept:
        res["pair_chunk_softmax_fraction"] = sum(pair_kept) / len(pair_kept)
    return res


# ------------------------------------------------------------------------------------------ main
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, help="source checkpoint dir (reference for agreement)")
    p.add_argument("--model", action="append", default=[], metavar="LABEL=DIR",
                   help="NAtS-L checkpoint to evaluate (repeatable, e.g. init=DIR stage1=DIR stage2=DIR)")
    p.add_argument("--text", required=True, help="held-out text file/dir/saved dataset (not used in training)")
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ppl-blocks", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--gen-prompts", type=int, default=8)
    p.add_argument("--gen-prompt-len", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--retrieval-lengths", type=int, nargs="*", default=[2048, 4096])
    p.add_argument("--retrieval-contexts", type=int, default=2, help="contexts per length")
    p.add_argument("--retrieval-pairs", type=int, default=8, help="key-value lines per context")
    p.add_argument("--retrieval-queries", type=int, default=8, help="queries per context (<= pairs)")
    p.add_argument("--retrieval-haystack", choices=("text", "words"), default="text",
                   help="what surrounds the key-value lines: consecutive sentences of the held-out --text (default; "
                   "the routers see in-distribution text) or random sentences of common words")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default=None, help="free text stored in the JSON (e.g. what the data was)")
    return p


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))
    from natsl_hf.conversion.data import load_packed_dataset

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    models = []
    for spec in args.model:
        if "=" not in spec:
            raise SystemExit(f"--model {spec!r}: expected LABEL=DIR (e.g. stage2=out/stage2).")
        label, path = spec.split("=", 1)
        models.append((label, path))
    if args.retrieval_queries > args.retrieval_pairs:
        raise SystemExit("--retrieval-queries must be <= --retrieval-pairs.")
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.source)

    ds = load_packed_dataset(args.text, tokenizer, args.seq_len, max_blocks=args.ppl_blocks)
    blocks = torch.tensor(ds["input_ids"], device=device)
    prompts = blocks[: args.gen_prompts, : args.gen_prompt_len]
    rng = random.Random(args.seed)
    haystack = None
    if args.retrieval_haystack == "text":
        from natsl_hf.conversion.data import load_texts_or_ids

        kind, texts = load_texts_or_ids(args.text)
        if kind != "text":
            raise SystemExit("--retrieval-haystack text needs raw text in --text; use --retrieval-haystack words.")
        haystack = [s for t in texts for s in haystack_sentences(t)]
    contexts = {L: [build_retrieval_context(tokenizer, L, args.retrieval_pairs, rng, haystack)
                    for _ in range(args.retrieval_contexts)] for L in args.retrieval_lengths}

    results, t_start = {}, time.time()
    source = load_model(args.source, device, dtype)
    t0 = time.time()
    ppl, src_argmax = perplexity(source, blocks, None, args.batch_size)
    conts = source_continuations(source, prompts, args.gen_tokens) if args.gen_prompts else None
    entry = {"path": args.source, "perplexity": ppl}
    entry["retrieval"] = {str(L): retrieval(source, tokenizer, c, args.retrieval_queries, device)
                          for L, c in contexts.items()}
    entry["seconds"] = round(time.time() - t0, 1)
    results["source"] = entry
    print(json.dumps({"source": entry}), flush=True)
    del source

    for label, path in models:
        t0 = time.time()
        model = load_model(path, device, dtype)
        ppl, _ = perplexity(model, blocks, src_argmax, args.batch_size)
        entry = {"path": path, "perplexity": ppl,
                 "config": {k: getattr(model.config, k, None) for k in
                            ("chunk_size", "num_sink_chunks", "softmax_budget", "natsl_layers")}}
        if conts is not None:
            entry["generation"] = greedy_agreement(model, prompts, conts)
        entry["retrieval"] = {str(L): retrieval(model, tokenizer, c, args.retrieval_queries, device)
                              for L, c in contexts.items()}
        entry["seconds"] = round(time.time() - t0, 1)
        results[label] = entry
        print(json.dumps({label: entry}), flush=True)
        del model

    src_ppl = results["source"]["perplexity"]["perplexity"]
    summary = {}
    for label, entry in results.items():
        row = {"perplexity": entry["perplexity"]["perplexity"],
               "ppl_gap_vs_source": entry["perplexity"]["perplexity"] / src_ppl - 1.0}
        for key in ("softmax_fraction", "top1_agreement"):
            if key in entry["perplexity"]:
                row[key] = entry["perplexity"][key]
        if "generation" in entry:
            row["gen_prefix_match"] = entry["generation"]["gen_prefix_match"]
        for L, r in entry["retrieval"].items():
            row[f"retrieval_{L}"] = r["accuracy"]
            for key in ("softmax_fraction", "kv_fraction", "pair_chunk_softmax_fraction"):
                if key in r:
                    row[f"{key}_retrieval_{L}"] = r[key]
        summary[label] = row
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(__file__).relative_to(REPO))
                                                                  if Path(__file__).is_relative_to(REPO)
                                                                  else __file__, *argv]),
        "device": device_info(device),
        "dtype": args.dtype,
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("model",)},
        "note": args.note,
        "summary": summary,
        "results": results,
        "seconds": round(time.time() - t_start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
