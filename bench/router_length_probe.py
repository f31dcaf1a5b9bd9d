"""Why does a NAtS-L router's softmax share grow with the chunk's position, and which router input would not?

    python bench/router_length_probe.py --model /tmp/mat/old --source /tmp/mat/source \\
        --text runs/recovery-data/heldout.txt --blocks 4 --seq-len 4096 \\
        --out bench/results/router_length_probe_smollm2.json

A router (modeling/router.py) scores chunk n by a linear map of its mean normed hidden state x_n [D]; its
bias is calibrated on blocks of one length (2048) to keep `softmax_budget` of the chunks softmax. Forward
hooks on every NAtS-L layer's router record x_n and the margin s_0 - s_1 on packed blocks of `--seq-len`
tokens. Per layer and chunk index n (mean over blocks and KV heads) the script reports

  (1) the margin, (2) the share routed softmax (margin >= 0, as the model routes; chunk 0 is a sink, always
  softmax in the model), (3) ||x_n||, the cosine of x_n (and of its mean over blocks) with the early mean
  mu_early (chunks 1..E-1, E = 2048 / chunk), and the projection on the drift direction d = mu_late - mu_early,
  (4) the margin of the same router on x_n rescaled to the mean early norm (x * r_early / ||x||),
  (5) the margin with x_n's component along d removed (d cross-fitted: estimated on the other half of the
  blocks), (6) the margin of x_n minus the running mean of the earlier chunks of its block (a causal centring
  that needs no estimated direction).

For every input the summary gives early (chunks 1..E-1) vs late (E..N-1) margin and share, the share of
the original margin drift (late - early) it removes, and the late share after re-calibrating each head's
threshold to keep `softmax_budget` of the early chunks (router_fit.budget_thresholds): the number that says
whether a bias calibrated at 2048 tokens holds at 4096. With --source the same routers also read the source
model's chunk means (no NAtS-L layer anywhere): drift there is the transformer's, not the hybrid's.
Eager fp32 CPU, batch 1, no grad. Writes JSON with the exact command.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def load_blocks(tokenizer, path: str, seq_len: int, n: int) -> torch.Tensor:
    """The first n packed blocks of the text at path (documents = blank-line separated) -> [n, T] long."""
    from natsl_hf.conversion.calibrate import token_blocks

    texts = [t for t in Path(path).read_text().split("\n\n") if t.strip()]
    return token_blocks(tokenizer, texts, seq_len, n, "--text")


@torch.no_grad()
def natsl_router_inputs(model, blocks: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run each block [1, T] through the NAtS-L model with a forward hook on every router.
    -> per NAtS-L layer: chunk means X [B, N, D] fp32 and the router's own margins M [B, N, H]."""
    from natsl_hf.conversion.layers import natsl_decoder_layers

    layers = natsl_decoder_layers(model)
    xs, ms = [[] for _ in layers], [[] for _ in layers]

    def hook(i):
        def save(module, args, out):  # args[0]: chunk_mean [1, N, D]; out: scores [1, N, H, 2]
            xs[i].append(args[0].detach().clone())
            ms[i].append((out[..., 0] - out[..., 1]).detach().clone())
        return save

    handles = [layer.self_attn.router.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for b, row in enumerate(blocks):
            t0 = time.time()
            out = model(row[None], use_cache=False)
            print(f"natsl block {b}: {time.time() - t0:.0f} s, softmax fraction {float(out.softmax_fraction):.3f}",
                  flush=True)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in xs], [torch.cat(m) for m in ms]


@torch.no_grad()
def source_router_inputs(source, blocks: torch.Tensor, chunk: int, layer_ids: list[int]) -> list[torch.Tensor]:
    """Chunk means of the source model's normed attention inputs (pre-hook on self_attn) at the NAtS-L layers.
    -> per layer X [B, N, D] fp32."""
    from natsl_hf.conversion.layers import decoder_layers

    layers = [decoder_layers(source)[i] for i in layer_ids]
    xs = [[] for _ in layers]

    def hook(i):
        def save(module, args, kwargs):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [1, T, D]
            N = h.shape[1] // chunk
            xs[i].append(h[:, : N * chunk].float().unflatten(1, (N, chunk)).mean(2))
        return save

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for row in blocks:
            source(row[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in xs]


def margin(router, x: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] -> router margin s_softmax - s_linear [B, N, H]."""
    s = router(x)
    return s[..., 0] - s[..., 1]


def drift_direction(x: torch.Tensor, early: slice, late: slice) -> torch.Tensor:
    """Unit vector of mu_late - mu_early, means over blocks and chunks. x [B, N, D] -> [D]."""
    d = x[:, late].mean((0, 1)) - x[:, early].mean((0, 1))
    return d / d.norm()


def router_inputs_variants(x: torch.Tensor, early: slice, late: slice) -> dict[str, torch.Tensor]:
    """The router inputs compared, each [B, N, D]:
    original; norm_rescaled (every chunk to the mean early norm); drift_removed (component along the drift
    direction removed, the direction fitted on the other half of the blocks); causal_centred (minus the mean
    of the block's earlier chunks, chunk 0 unchanged)."""
    B = x.shape[0]
    norm = x.norm(dim=-1, keepdim=True)  # [B, N, 1]
    r_early = norm[:, early].mean()
    halves = [torch.arange(B) < B // 2, torch.arange(B) >= B // 2] if B > 1 else [torch.ones(B, dtype=torch.bool)] * 2
    removed = x.clone()
    for fit, apply in (halves, halves[::-1]):
        d = drift_direction(x[fit], early, late)  # [D]
        removed[apply] = x[apply] - (x[apply] @ d)[..., None] * d
    prefix = x.cumsum(1) - x  # [B, N, D] sum of chunks < n
    count = torch.arange(x.shape[1], dtype=x.dtype).clamp(min=1)[None, :, None]
    centred = x - prefix / count
    centred[:, 0] = x[:, 0]
    return {"original": x, "norm_rescaled": x * (r_early / norm), "drift_removed": removed, "causal_centred": centred}


def geometry(x: torch.Tensor, early: slice, late: slice) -> dict:
    """(3): per chunk index [N]: mean ||x_n||, cos(mean_b x_n, mu_early), mean_b cos(x_bn, mu_early), mean
    projection of x_n - mu_early on the drift direction; and scalars: relative size of the mean drift."""
    mu_early = x[:, early].mean((0, 1))  # [D]
    d = drift_direction(x, early, late)
    delta = x[:, late].mean((0, 1)) - mu_early
    return {
        "norm": x.norm(dim=-1).mean(0),
        "cos_mean_vs_early": F.cosine_similarity(x.mean(0), mu_early[None], dim=-1),
        "cos_chunk_vs_early": F.cosine_similarity(x, mu_early[None, None], dim=-1).mean(0),
        "proj_on_drift": ((x - mu_early) @ d).mean(0),
        "drift_norm_over_early_mean_norm": float(delta.norm() / mu_early.norm()),
        "cos_drift_vs_early_mean": float(F.cosine_similarity(delta, mu_early, dim=0)),
    }


def route_stats(m: torch.Tensor, early: slice, late: slice, budget: float) -> dict:
    """(1)/(2) for one router input. m: margins [B, N, H] -> per chunk index margin and share [N], and the
    early/late summary, with the late share after calibrating each head on the early chunks to `budget`."""
    from natsl_hf.conversion.router_fit import budget_thresholds

    soft = (m >= 0).float()
    thr = budget_thresholds(m[:, early].flatten(0, 1), budget)  # [H]
    recal = (m > thr).float()
    return {
        "margin": m.mean((0, 2)), "share": soft.mean((0, 2)),
        "margin_early": float(m[:, early].mean()), "margin_late": float(m[:, late].mean()),
        "margin_drift": float(m[:, late].mean() - m[:, early].mean()),
        "margin_std_early": float(m[:, early].std()),
        "share_early": float(soft[:, early].mean()), "share_late": float(soft[:, late].mean()),
        "recalibrated_share_early": float(recal[:, early].mean()),
        "recalibrated_share_late": float(recal[:, late].mean()),
    }


def drift_split(router, x: torch.Tensor, early: slice, late: slice) -> float:
    """The mean margin drift is exactly w_diff . (mu_late - mu_early) (w_diff [H, D]: softmax minus linear row):
    -> its part from the drift's component along mu_early (a change of scale, which norm rescaling can undo),
    mean over heads (compare with margin_drift)."""
    w = router.proj.weight.detach().float()
    w_diff = w[0::2] - w[1::2]  # [H, D]
    mu_early, delta = x[:, early].mean((0, 1)), x[:, late].mean((0, 1)) - x[:, early].mean((0, 1))
    u = mu_early / mu_early.norm()
    return float((w_diff @ ((delta @ u) * u)).mean())


def layer_report(router, x: torch.Tensor, early: slice, late: slice, budget: float) -> dict:
    """Geometry and routing statistics of every input variant of one layer. x [B, N, D]."""
    variants = router_inputs_variants(x, early, late)
    with torch.no_grad():
        stats = {name: route_stats(margin(router, v), early, late, budget) for name, v in variants.items()}
    base = stats["original"]["margin_drift"]
    stats["original"]["margin_drift_along_early_mean"] = drift_split(router, x, early, late)
    for name, s in stats.items():
        s["drift_removed_share"] = 1.0 - s["margin_drift"] / base if base else float("nan")
    return {"geometry": geometry(x, early, late), "routing": stats}


def overall(layers: list[dict]) -> dict:
    """Means over layers of every scalar; drift_removed_share as a ratio of the layer-mean drifts."""
    out = {"drift_norm_over_early_mean_norm": _mean(l["geometry"]["drift_norm_over_early_mean_norm"] for l in layers)}
    names = layers[0]["routing"].keys()
    for name in names:
        keys = [k for k, v in layers[0]["routing"][name].items() if isinstance(v, float)]
        out[name] = {k: _mean(l["routing"][name][k] for l in layers) for k in keys}
    base = out["original"]["margin_drift"]
    out["original"]["share_of_drift_along_early_mean"] = out["original"]["margin_drift_along_early_mean"] / base
    for name in names:
        out[name]["drift_removed_share"] = 1.0 - out[name]["margin_drift"] / base
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _rounded(obj, nd: int = 4):
    """JSON-ready copy: tensors to lists, floats rounded."""
    if isinstance(obj, torch.Tensor):
        return _rounded(obj.tolist(), nd)
    if isinstance(obj, dict):
        return {k: _rounded(v, nd) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, nd) for v in obj]
    return round(obj, nd) if isinstance(obj, float) else obj


def _dump(obj) -> str:
    """Indented JSON with every list of numbers on one line."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[[-0-9.eE,\s]*\]", lambda m: " ".join(m.group().split()), text)


def analyse(routers, xs: list[torch.Tensor], layer_ids, early, late, budget) -> dict:
    layers = [layer_report(r, x, early, late, budget) for r, x in zip(routers, xs)]
    return {"overall": overall(layers), "layers": {str(i): l for i, l in zip(layer_ids, layers)}}


def print_summary(tag: str, rep: dict) -> None:
    print(f"== {tag}: mean over layers (early = chunks 1..E-1, late = E..N-1)")
    for name, s in rep["overall"].items():
        if isinstance(s, dict):
            print(f"  {name:15s} share {s['share_early']:.3f} -> {s['share_late']:.3f}  margin drift "
                  f"{s['margin_drift']:+.3f} (removed {s['drift_removed_share']:+.2f})  recalibrated share "
                  f"{s['recalibrated_share_early']:.3f} -> {s['recalibrated_share_late']:.3f}")
    print(f"  share of the drift along mu_early: {rep['overall']['original']['share_of_drift_along_early_mean']:.2f}")
    for i, l in rep["layers"].items():
        o, n = l["routing"]["original"], l["routing"]["norm_rescaled"]
        d, c = l["routing"]["drift_removed"], l["routing"]["causal_centred"]
        print(f"  L{i:>2} share {o['share_early']:.2f}->{o['share_late']:.2f} drift {o['margin_drift']:+.2f} "
              f"(std {o['margin_std_early']:.2f}) removed: norm {n['drift_removed_share']:+.2f} dir "
              f"{d['drift_removed_share']:+.2f} centred {c['drift_removed_share']:+.2f}  |mu drift|/|mu| "
              f"{l['geometry']['drift_norm_over_early_mean_norm']:.3f}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a NatslForCausalLM checkpoint")
    p.add_argument("--source", help="its source model: the same routers also read the source's chunk means")
    p.add_argument("--text", required=True)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--early-tokens", type=int, default=2048, help="the calibration length: early = chunks below it")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import natsl_hf
    from natsl_hf.conversion.layers import natsl_decoder_layers

    torch.manual_seed(0)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    cfg = model.config
    C, N = cfg.chunk_size, args.seq_len // cfg.chunk_size
    E = args.early_tokens // C
    if not 1 < E < N:
        raise SystemExit(f"--early-tokens {args.early_tokens} must leave early and late chunks in {N} chunks")
    early, late = slice(1, E), slice(E, N)
    blocks = load_blocks(AutoTokenizer.from_pretrained(args.model), args.text, args.seq_len, args.blocks)
    routers = [layer.self_attn.router for layer in natsl_decoder_layers(model)]
    xs, ms = natsl_router_inputs(model, blocks)
    with torch.no_grad():
        recompute_err = max(float((margin(r, x) - m).abs().max()) for r, x, m in zip(routers, xs, ms))
    report = {"natsl": analyse(routers, xs, cfg.natsl_layers, early, late, cfg.softmax_budget)}
    print_summary("NAtS-L model's own chunk means", report["natsl"])
    if args.source:
        source = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32).eval()
        sx = source_router_inputs(source, blocks, C, cfg.natsl_layers)
        report["source"] = analyse(routers, sx, cfg.natsl_layers, early, late, cfg.softmax_budget)
        print_summary("source model's chunk means, same routers", report["source"])
    result = {
        "command": "python " + shlex.join(["bench/router_length_probe.py", *argv]),
        "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads), eager fp32, batch 1",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "natsl_hf": natsl_hf.__version__, "python": platform.python_version()},
        "settings": vars(args), "chunk_size": C, "chunks": N, "early_chunks": [1, E - 1], "late_chunks": [E, N - 1],
        "softmax_budget": cfg.softmax_budget, "hook_vs_recomputed_margin_max_abs": recompute_err,
        **_rounded(report), "seconds": round(time.time() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(_dump(result))
    print(f"wrote {args.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
