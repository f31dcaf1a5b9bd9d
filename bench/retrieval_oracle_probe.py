"""Is a missed needle / passkey a routing miss or a weight miss? (issue 22: lookups at 0.7-0.9x the source)

    python bench/retrieval_oracle_probe.py --model runs/smollm2-natsl-p10 --source /tmp/mat/source \\
        --text runs/carry-h/heldout.txt --contexts 24 --length 2048 \\
        --out bench/results/retrieval_oracle_probe_smollm2_cpu.json

(--model: the README main job's output with the shipped parameters; --source: the source materialized by
`recover_scale.py --materialize`; --text: the held-out split of bench/build_recovery_data.py, as on the GPU.)

On eval_quality's needle and passkey contexts (same builder, seeded, depths spread evenly: one probe line in held-out
prose, then its question and answer, one teacher-forced row each), the recovered model is scored beside the source,
as it serves and with its routes overridden per row (`natsl_hf.modeling.layer.decide_routes` wrapped for the run;
nothing else changes):

  served            the routers' own routes
  line_softmax      the served routes, and every chunk that holds a probe-line token softmax in every layer and KV head
  line_linear       the served routes, and those chunks linear everywhere (what keeping the line is worth)
  all_softmax       every routable chunk softmax (`route_override="softmax"`: the trained weights' ceiling)
  line_softmax@A-B  as line_softmax in layers A..B only (the others as served): which layers' keeping matters

If line_softmax reaches the source, the gap is the routers' (which chunk they keep); if it stays near served, the GDN
branch / LoRA weights lose the line even when it is kept. Per variant: accuracy, the share of the line's (layer, head)
routes kept, and the realised softmax fraction; for the served routes also where the routers rank the line among the
row's chunks (`line_ranks`): whether a better threshold could keep it, or the routers do not see it. fp32, eager, CPU
or GPU; writes JSON with the exact command, device and versions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import eval_quality as eq  # noqa: E402

VARIANTS = ("served", "line_softmax", "line_linear", "all_softmax")


@contextlib.contextmanager
def forced_line_routes(model, rows_chunks: list[list[int]] | None, softmax: bool, layers: range | None = None):
    """Within the block, every routing decision of a forward over rows starting at position 0 sets the listed
    chunks of each row (`rows_chunks[row]`) to softmax (`softmax`) or linear, in every KV head of the NAtS-L layers
    in `layers` (default all), where they are routable. None: no change."""
    import natsl_hf.modeling.layer as layer
    from natsl_hf.modeling.router import Routes

    original, current = layer.decide_routes, [None]
    attns = [m for m in model.modules() if isinstance(m, layer.NatslAttention)]
    hooks = [a.register_forward_pre_hook(lambda m, args: current.__setitem__(0, m.layer_idx)) for a in attns]

    def decide(scores, complete, sink, temperature, override, num_heads):
        routes = original(scores, complete, sink, temperature, override, num_heads)
        if layers is not None and current[0] not in layers:
            return routes
        force = torch.zeros_like(routes.hard[..., 0])  # [B, N]
        for row, chunks in enumerate(rows_chunks):
            force[row, [c for c in chunks if c < force.shape[1]]] = True
        force = force[..., None] & routes.routable  # [B, N, H]
        hard = torch.where(force, torch.full_like(routes.hard, softmax), routes.hard)
        return Routes(hard, hard.to(routes.weight.dtype), routes.prob, routes.routable)

    if rows_chunks is not None:
        layer.decide_routes = decide
    try:
        yield
    finally:
        layer.decide_routes = original
        for hook in hooks:
            hook.remove()


def line_ranks(out, rows_chunks: list[list[int]], context_lens: list[int], chunk_size: int) -> list[tuple]:
    """Where the routers put the line among a row's chunks (served routes). -> per row, NAtS-L layer and KV head:
    (layer index, the share of the row's other routable chunks, complete within the context, with a higher p(softmax)
    than the line's best chunk (0: the line ranks first; kept when under about the realised fraction), whether the
    head keeps the line, whether any KV head of the layer does)."""
    rows = []
    for row, (chunks, n) in enumerate(zip(rows_chunks, context_lens)):
        complete = n // chunk_size
        for layer, r in enumerate(out.routes):
            if r.hard.shape[1] == 0:
                continue
            routable = r.routable[row, :complete]  # [N, H]
            line = [c for c in chunks if c < complete and bool(routable[c].all())]
            if not line:
                continue
            prob = r.prob[row, :complete]  # [N, H]
            best = prob[line].max(0).values  # [H]
            others = routable.clone()
            others[line] = False
            shares = ((prob > best) & others).sum(0).div(others.sum(0).clamp_min(1))  # [H]
            kept = r.hard[row, line].any(0)  # [H]
            rows += [(layer, float(a), bool(k), bool(kept.any())) for a, k in zip(shares, kept)]
    return rows


def rank_summary(rows: list[tuple]) -> dict:
    """`line_ranks` rows pooled: the rank share's mean and quantiles, the shares under 0.25 / 0.5, the share of
    (row, layer, head) routes that keep the line and of those whose layer keeps it in some head; per layer the mean
    rank share and kept share."""
    t = torch.tensor([share for _, share, _, _ in rows])
    layers = sorted({layer for layer, *_ in rows})
    per_layer = {layer: [(share, kept) for l_, share, kept, _ in rows if l_ == layer] for layer in layers}
    return {"rank_share": {"mean": float(t.mean()), **{f"q{int(q * 100)}": float(t.quantile(q)) for q in (0.25, 0.5, 0.75)},
                           "under_0.25": float((t < 0.25).float().mean()), "under_0.5": float((t < 0.5).float().mean())},
            "kept": sum(k for *_, k, _ in rows) / len(rows), "kept_by_some_head": sum(s for *_, s in rows) / len(rows),
            "per_layer": {layer: {"rank_share": sum(a for a, _ in v) / len(v), "kept": sum(k for _, k in v) / len(v)}
                          for layer, v in per_layer.items()}}


@torch.no_grad()
def score(model, tokenizer, contexts, probe, variant: str, batch_size: int, device) -> dict:
    """Accuracy and routing of one variant on `contexts` (eval_quality's (ids, pairs, line tokens) triples)."""
    natsl = eq.is_natsl(model)
    C = model.config.chunk_size if natsl else None
    right, kept, fractions, ranks = [], [], [], []
    name, _, span = variant.partition("@")
    layers = range(int(span.split("-")[0]), int(span.split("-")[1]) + 1) if span else None
    for start in range(0, len(contexts), batch_size):
        batch = contexts[start:start + batch_size]
        rows = [(ids, *eq.probe_query(tokenizer, probe, *pairs[0])) for ids, pairs, _ in batch]
        chunks = [sorted({t // C for t in tokens}) for _, _, tokens in batch] if natsl else None
        force = None if name in ("served", "all_softmax") else chunks
        if natsl:
            model.config.route_override = "softmax" if name == "all_softmax" else None
        with forced_line_routes(model, force, softmax=name == "line_softmax", layers=layers):
            out, answers = eq.row_answer_logits(model, rows, device)
        right += [logits.argmax(-1).tolist() == a for logits, (_, _, a) in zip(answers, rows)]
        if natsl:
            stats = eq.routing_stats(model, out, [tokens for _, _, tokens in batch], [len(ids) for ids, _, _ in batch])
            kept += [k for k in stats["pair_kept"] if k is not None]
            fractions.append(stats["softmax_fraction"])
            if name == "served":
                ranks += line_ranks(out, chunks, [len(ids) for ids, _, _ in batch], C)
    if natsl:
        model.config.route_override = None
    res = {"accuracy": sum(right) / len(right), "correct": right}
    if natsl:
        res.update(line_kept=sum(kept) / max(len(kept), 1), softmax_fraction=sum(fractions) / len(fractions))
    if ranks:
        res["line_rank"] = rank_summary(ranks)
    return res


def single_line_contexts(tokenizer, text: str, length: int, n: int, seed: int):
    """eval_quality's single-line retrieval contexts in the held-out `text` (a file or folder): -> build(probe), the
    `n` contexts of ~`length` tokens of one probe wording, its line at depths spread evenly from 0 to 1. One seeded
    generator serves every call in turn, so the same order of wordings gives the same contexts."""
    from natsl_hf.conversion.data import load_texts_or_ids

    _, texts = load_texts_or_ids(text)
    haystack = [s for t in texts for s in eq.haystack_sentences(t)]
    rng = random.Random(seed)
    depths = [i / max(n - 1, 1) for i in range(n)]
    return lambda probe: [eq.build_retrieval_context(tokenizer, length, 1, rng, haystack, probe, d) for d in depths]


def write_record(out_path: Path, script: str, argv: list[str], device: str, t0: float, **fields) -> None:
    """A probe's JSON: the exact command, device, versions, `fields` and the seconds since `t0`."""
    out = {"command": shlex.join([sys.executable, script, *argv]),
           "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.machine()}, "
           f"{torch.get_num_threads()} threads)",
           "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
           **fields, "seconds": round(time.time() - t0, 1)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1) + "\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the recovered NAtS-L model folder (e.g. the README main job's output)")
    p.add_argument("--source", required=True, help="the source model folder")
    p.add_argument("--text", required=True, help="held-out text (eval_quality's --text)")
    p.add_argument("--contexts", type=int, default=32, help="contexts per task (eval_quality's --needle-contexts)")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--tasks", default="needle,passkey")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = eq.load_model(args.source, device, torch.float32)
    model = eq.load_model(args.model, device, torch.float32)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    build = single_line_contexts(tokenizer, args.text, args.length, args.contexts, args.seed)
    probes = {"needle": eq.NEEDLE, "passkey": eq.PASSKEY}
    results = {}
    for task in args.tasks.split(","):
        contexts = build(probes[task])
        results[task] = {"source": score(source, tokenizer, contexts, probes[task], "served", args.batch_size, device)}
        for variant in args.variants.split(","):
            results[task][variant] = score(model, tokenizer, contexts, probes[task], variant, args.batch_size, device)
            print(task, variant, {k: v for k, v in results[task][variant].items() if k != "correct"}, flush=True)
    summary = {task: {name: {k: v for k, v in r.items() if k != "correct"} for name, r in rows.items()}
               for task, rows in results.items()}
    write_record(args.out, "bench/retrieval_oracle_probe.py", argv, device, t0, length=args.length,
                 contexts=args.contexts, summary=summary, results=results)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
