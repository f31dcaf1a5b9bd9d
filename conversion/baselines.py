"""Baselines at NAtS-L's KV budget: the layer-interleaved hybrid.

    python -m natsl_hf.conversion.baselines SRC OUT [--softmax-budget 0.25] [--softmax-layers 1,5,9] [--overwrite]

The hybrid a reader asks for first (as in Jamba, the Qwen3-Next / GDN hybrids and the KL-guided layer
selection of linearisation work): a share `softmax_budget` of the layers keeps full softmax attention
with every past token's KV, the other layers are Gated DeltaNet only. Against NAtS-L at the same
budget it answers whether choosing *which tokens* keep softmax KV (per chunk, in every layer) beats
choosing *which layers* keep it.

Built with `convert_checkpoint` on the same weights and NAtS-L parameters as a NAtS-L conversion:

- the softmax layers are plain source attention layers (not in `natsl_layers`);
- every other layer is a NAtS-L layer with `route_override="linear"`: every routable chunk goes to the
  GDN state. What a "GDN-only" layer means here is therefore NAtS-L's own linear path, and it keeps
  what that path keeps in any NAtS-L layer: the sink chunk (the first `num_sink_chunks` chunks, always
  softmax) and, for each query, softmax attention within its own chunk (the open chunk of the cache).
  These are the parts of the cache that NAtS-L at any budget keeps too, so the two models differ only
  in where the routed softmax KV goes; a KV cache of T tokens and L layers holds
  `n_softmax * T + (L - n_softmax) * (sink + open chunk)` tokens, which for `n_softmax = budget * L`
  equals NAtS-L's `L * (sink + open + budget * routable)`.

Which layers keep softmax (`softmax_layers`): `n = round(budget * L)` layers (at least one), evenly
spaced: the middle layer of each of n equal spans of the stack (30 layers, budget 0.25 -> 8 layers:
1, 5, 9, 13, 16, 20, 24, 28). Evenly spaced, because no training signal is used to choose them here
(KL-guided selection would need one); `--softmax-layers` takes any other choice.

Evaluate it beside NAtS-L with `bench/eval_quality.py --model natsl=DIR --model layer_hybrid=OUT`.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from .convert import convert_checkpoint


def softmax_layers(num_layers: int, softmax_budget: float) -> list[int]:
    """The evenly spaced layers that keep full softmax: the middle layer of each of n equal spans,
    n = round(softmax_budget * num_layers), at least 1 and at most num_layers."""
    if not 0.0 < softmax_budget <= 1.0:
        raise ValueError(f"softmax_budget={softmax_budget} must lie in (0, 1] (--softmax-budget).")
    n = min(num_layers, max(1, round(softmax_budget * num_layers)))
    return [int((i + 0.5) * num_layers / n) for i in range(n)]


def layer_hybrid_options(num_layers: int, softmax_budget: float, softmax: list[int] | None = None) -> dict:
    """`convert_checkpoint` options of the layer-interleaved hybrid: the layers not in `softmax`
    (default `softmax_layers`) NAtS-L with every routable chunk routed to GDN."""
    softmax = sorted(set(softmax_layers(num_layers, softmax_budget) if softmax is None else softmax))
    wrong = [i for i in softmax if not 0 <= i < num_layers]
    if wrong:
        raise ValueError(f"softmax layers {wrong} do not exist (--softmax-layers): the model has layers 0-{num_layers - 1}.")
    gdn = [i for i in range(num_layers) if i not in softmax]
    if not gdn:
        raise ValueError("Every layer keeps softmax: that is the source model, not a hybrid. Name fewer --softmax-layers.")
    return {"natsl_layers": gdn, "route_override": "linear", "softmax_budget": softmax_budget}


def source_num_layers(src) -> int:
    """Decoder layers of a checkpoint directory, GGUF file or loaded model (read from its config only)."""
    from .sources import open_source

    return open_source(src).config.num_hidden_layers


def convert_layer_hybrid(src, out, *, softmax_budget: float = 0.25, softmax: list[int] | None = None,
                         command: str | None = None, **convert_kwargs):
    """Convert `src` into the layer-interleaved hybrid at `softmax_budget` and write it to `out`.

    softmax: the layers that keep full softmax (default: `softmax_layers`, evenly spaced).
    convert_kwargs: further `convert_checkpoint` arguments (chunk_size, overwrite, dtype, ...).
    Returns the converted model (`convert_checkpoint`'s).
    """
    options = layer_hybrid_options(source_num_layers(src), softmax_budget, softmax)
    return convert_checkpoint(src, out, command=command, **options, **convert_kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m natsl_hf.conversion.baselines", description=__doc__.split("\n")[0])
    p.add_argument("src", help="source checkpoint directory or .gguf file")
    p.add_argument("out", help="output directory")
    p.add_argument("--softmax-budget", type=float, default=0.25, help="share of layers that keep full softmax")
    p.add_argument("--softmax-layers", type=lambda t: [int(x) for x in t.split(",") if x.strip()], default=None,
                   help="comma-separated layers that keep softmax (default: evenly spaced, see the module docstring)")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        model = convert_layer_hybrid(args.src, args.out, softmax_budget=args.softmax_budget, softmax=args.softmax_layers,
                                     chunk_size=args.chunk_size, overwrite=args.overwrite,
                                     command=shlex.join(["python", "-m", "natsl_hf.conversion.baselines", *argv]))
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = model.config
    kept = [i for i in range(config.num_hidden_layers) if i not in config.natsl_layers]
    print(f"layer hybrid written to {args.out}: softmax layers {kept}, "
          f"{len(config.natsl_layers)}/{config.num_hidden_layers} layers GDN only (sink + own chunk kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
