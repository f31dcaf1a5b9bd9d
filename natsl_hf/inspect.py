"""natsl-inspect: routing maps of a NAtS-L checkpoint on a text.

    natsl-inspect MODEL --text FILE --out DIR [--tokenizer PATH] [--max-tokens N]
                  [--dtype {auto,float32,bfloat16,float16}] [--device DEVICE] [--dpi DPI]

Loads MODEL (a folder or Hub id of a NAtS-L checkpoint) with `AutoModelForCausalLM` after
`import natsl_hf`, tokenises FILE with the tokenizer saved next to the model (or `--tokenizer`),
runs ONE forward in eval mode with `output_routes=True, use_cache=False` and writes into DIR:

    routes_layer{L:02d}.png   one routing map per NAtS-L layer L (model layer index): chunks on x,
                              KV heads on y; softmax / linear (GDN) / not routable (sink chunk or
                              the incomplete last chunk) in three colours
    softmax_fraction.png      bar plot of the softmax fraction per NAtS-L layer
    summary.json              the table below at full precision plus run metadata

and prints a table (layer, routable, softmax, fraction) plus the overall fraction. Counts are
routing decisions, i.e. (chunk, KV head) pairs: the router decides per KV head (GQA group). The
fraction of a layer is `layer_softmax_fraction` of the model output; the counts come from
`outputs.routes` and are checked against it.

The pieces are usable from Python: `routing_summary`, `plot_layer_routes`, `plot_summary`,
`format_table`, `main`. Plots use matplotlib's Agg canvas directly (no pyplot, no GUI, no global
backend switch); matplotlib is the `inspect` extra (`pip install -e '.[inspect]'` in the natsl-hf clone, or
`pip install matplotlib`).

The command line starts without torch: `--help` and the errors about its arguments (a missing text file, a
MODEL or --tokenizer that can only be a local path and does not exist) come at once, before a Hub lookup.
Ctrl-C is one line, exit status 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .conversion.sources import OneLineArgumentParser, check_input_path, conversion_advice

if TYPE_CHECKING:  # imported where tensors are made, so `natsl-inspect --help` starts without torch
    import torch

# colours of the routing map, indexed by the codes of `route_codes`
NOT_ROUTABLE, LINEAR, SOFTMAX = 0, 1, 2
ROUTE_COLORS = {NOT_ROUTABLE: "#d0d0d0", LINEAR: "#1f77b4", SOFTMAX: "#ff7f0e"}
ROUTE_LABELS = {NOT_ROUTABLE: "not routable (sink / incomplete)", LINEAR: "linear (GDN)", SOFTMAX: "softmax"}
LAYER_FIGSIZE = (12.0, 4.0)  # inches; at the default dpi 100 -> 1200 x 400 px
SUMMARY_FIGSIZE = (8.0, 4.0)  # -> 800 x 400 px
DEFAULT_DPI = 100
DEFAULT_MAX_TOKENS = 2048
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tiktoken.model",
)


class InspectError(Exception):
    """A usage error of natsl-inspect (bad path, missing tokenizer, model is not NAtS-L, ...)."""


# ----------------------------------------------------------------------------- analysis
def route_codes(hard: torch.Tensor, routable: torch.Tensor) -> torch.Tensor:
    """hard, routable: [N, H] bool -> [H, N] long codes NOT_ROUTABLE / LINEAR / SOFTMAX."""
    import torch

    codes = torch.where(hard.bool(), SOFTMAX, LINEAR)
    codes = torch.where(routable.bool(), codes, NOT_ROUTABLE)
    return codes.long().T.contiguous()


def routing_summary(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[dict]:
    """One forward (eval mode, `output_routes=True, use_cache=False`) -> one dict per NAtS-L layer.

    Each dict: `layer` (model layer index), `natsl_index` (position in `outputs.routes`),
    `num_chunks` (N), `num_kv_heads`, `routable` / `softmax` /
    `linear` (counts of routable (chunk, KV head) decisions over the batch), `fraction`
    (= the output's `layer_softmax_fraction`; NaN where nothing is routable, where the output has None), and the routes
    `hard` / `routable_mask` as CPU bool tensors [B, N, H].
    The model is left in the train/eval mode it came in.
    """
    import torch

    with torch.no_grad():
        return _routing_summary(model, input_ids, attention_mask)


def _routing_summary(model, input_ids, attention_mask) -> list[dict]:
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    config = model.config
    if not hasattr(config, "natsl_layers"):
        raise InspectError(f"{type(model).__name__} is not a NAtS-L model (config has no `natsl_layers`).")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_routes=True, use_cache=False)
    finally:
        model.train(was_training)
    routes = out.routes or ()
    layers = list(config.natsl_layers)
    if len(routes) != len(layers):
        raise RuntimeError(f"expected {len(layers)} Routes (one per NAtS-L layer), got {len(routes)}")
    rows = []
    for k, (layer, r) in enumerate(zip(layers, routes)):
        hard = r.hard.bool().cpu()  # [B, N, H]
        routable = r.routable.bool().cpu()
        n_routable = int(routable.sum())
        n_softmax = int((hard & routable).sum())
        fractions = out.layer_softmax_fraction  # None when the call routed no chunk
        fraction = math.nan if fractions is None else float(fractions[k])
        counted = n_softmax / n_routable if n_routable else math.nan
        if not (math.isnan(fraction) and math.isnan(counted)) and not math.isclose(fraction, counted, abs_tol=1e-6):
            raise RuntimeError(
                f"layer {layer}: softmax fraction from routes {counted} != layer_softmax_fraction {fraction}"
            )
        rows.append(
            dict(
                layer=layer,
                natsl_index=k,
                num_chunks=hard.shape[1],
                num_kv_heads=hard.shape[2],
                routable=n_routable,
                softmax=n_softmax,
                linear=n_routable - n_softmax,
                fraction=fraction,
                hard=hard,
                routable_mask=routable,
            )
        )
    return rows


def overall_fraction(rows: list[dict]) -> float:
    """Softmax fraction over all NAtS-L layers (= the output's `softmax_fraction`)."""
    routable = sum(r["routable"] for r in rows)
    return sum(r["softmax"] for r in rows) / routable if routable else math.nan


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.4f}"


def format_table(rows: list[dict]) -> str:
    """The printed table: one line per NAtS-L layer plus the overall line."""
    lines = [f"{'layer':>5}  {'routable':>8}  {'softmax':>8}  {'fraction':>8}"]
    for r in rows:
        lines.append(f"{r['layer']:>5}  {r['routable']:>8}  {r['softmax']:>8}  {_fmt(r['fraction']):>8}")
    total_r, total_s = sum(r["routable"] for r in rows), sum(r["softmax"] for r in rows)
    lines.append(f"{'all':>5}  {total_r:>8}  {total_s:>8}  {_fmt(overall_fraction(rows)):>8}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def _figure(figsize, dpi):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise InspectError("natsl-inspect needs matplotlib: pip install matplotlib (or, in the natsl-hf clone, "
                           "pip install -e '.[inspect]')") from e
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def plot_layer_routes(
    row: dict,
    path: str | os.PathLike,
    batch_index: int = 0,
    chunk_size: int | None = None,
    figsize: tuple[float, float] = LAYER_FIGSIZE,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Routing map of one layer (a `routing_summary` row) for batch row `batch_index` -> PNG path.

    x: chunk index, y: KV head; softmax / linear / not routable in ROUTE_COLORS. The PNG is
    exactly `figsize * dpi` pixels (no tight bbox).
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    codes = route_codes(row["hard"][batch_index], row["routable_mask"][batch_index]).numpy()
    fig = _figure(figsize, dpi)
    ax = fig.add_axes((0.06, 0.14, 0.66, 0.72))
    cmap = ListedColormap([ROUTE_COLORS[c] for c in (NOT_ROUTABLE, LINEAR, SOFTMAX)])
    norm = BoundaryNorm([-0.5, 0.5, 1.5, 2.5], cmap.N)
    n_heads, n_chunks = codes.shape
    ax.imshow(codes, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest",
              extent=(-0.5, n_chunks - 0.5, n_heads - 0.5, -0.5))
    if n_chunks <= 128:  # cell borders while they are still visible
        ax.set_xticks([i - 0.5 for i in range(1, n_chunks)], minor=True)
        ax.set_yticks([i - 0.5 for i in range(1, n_heads)], minor=True)
        ax.grid(which="minor", color="white", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=20, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    unit = f" ({chunk_size} tokens each)" if chunk_size else ""
    ax.set_xlabel(f"chunk{unit}")
    ax.set_ylabel("KV head")
    row_r = int(row["routable_mask"][batch_index].sum())
    row_s = int((row["hard"][batch_index] & row["routable_mask"][batch_index]).sum())
    frac = row_s / row_r if row_r else math.nan
    title = f"NAtS-L layer {row['layer']}: softmax fraction {_fmt(frac)} ({row_s}/{row_r} routable chunk-heads)"
    if row["hard"].shape[0] > 1:
        title += f", batch row {batch_index}"
    ax.set_title(title)
    handles = [Patch(facecolor=ROUTE_COLORS[c], edgecolor="black", label=ROUTE_LABELS[c]) for c in (SOFTMAX, LINEAR, NOT_ROUTABLE)]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.735, 0.5), frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


def plot_summary(
    rows: list[dict],
    path: str | os.PathLike,
    budget: float | None = None,
    figsize: tuple[float, float] = SUMMARY_FIGSIZE,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Bar plot of the softmax fraction per NAtS-L layer (+ overall and `budget` lines) -> PNG path."""
    fig = _figure(figsize, dpi)
    ax = fig.add_axes((0.09, 0.13, 0.88, 0.77))
    xs = list(range(len(rows)))
    fracs = [r["fraction"] for r in rows]
    heights = [0.0 if math.isnan(f) else f for f in fracs]
    bars = ax.bar(xs, heights, color=ROUTE_COLORS[SOFTMAX], edgecolor="black", linewidth=0.5)
    if len(rows) <= 48:
        for bar, f in zip(bars, fracs):
            ax.annotate(_fmt(f), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    overall = overall_fraction(rows)
    if not math.isnan(overall):
        ax.axhline(overall, color="black", linestyle="--", linewidth=1, label=f"overall {overall:.4f}")
    if budget is not None:
        ax.axhline(budget, color="tab:red", linestyle=":", linewidth=1, label=f"softmax_budget {budget:g}")
    step = max(1, math.ceil(len(rows) / 32))
    ax.set_xticks(xs[::step], [str(r["layer"]) for r in rows][::step])
    ax.set_xlim(-0.6, max(len(rows), 1) - 0.4)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("NAtS-L layer")
    ax.set_ylabel("softmax fraction of routable chunk-heads")
    ax.set_title("Softmax fraction per NAtS-L layer")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


# ----------------------------------------------------------------------------- CLI
def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def check_exists(name: str, what: str) -> None:
    """Refuse at once a `name` that looks like a local path (conversion/sources.py `looks_local`: it starts with
    '.', '/' or '~', is no Hub id, or is `dir/name` beside an existing `dir/`) and does not exist, rather than
    let transformers look it up on the Hub (which retries for a minute offline)."""
    try:
        check_input_path(name, what, hub_ok=True)
    except OSError as err:
        raise InspectError(str(err)) from None


def load_tokenizer(model: str, tokenizer: str | None = None):
    """AutoTokenizer from `tokenizer` or else from the model folder / id, with a clear error."""
    from transformers import AutoTokenizer

    source = tokenizer or model
    fix = (
        "pass --tokenizer PATH (e.g. the source model the checkpoint was converted from), or save "
        "one into the checkpoint folder with `AutoTokenizer.from_pretrained(SOURCE).save_pretrained(MODEL)`"
    )
    if Path(source).is_dir() and not _has_tokenizer_files(Path(source)):
        where = "--tokenizer folder" if tokenizer else "model folder"
        raise InspectError(f"no tokenizer in the {where} {source!r} (none of {', '.join(TOKENIZER_FILES[:3])}, ...); {fix}.")
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:  # transformers raises OSError / ValueError / KeyError depending on what is missing
        raise InspectError(f"could not load a tokenizer from {source!r} ({type(e).__name__}: {e}); {fix}.") from e


def _resolve_dtype(name: str, device: str) -> torch.dtype | str:
    import torch

    if name == "auto":  # the checkpoint's dtype on an accelerator, float32 on CPU
        return "auto" if not device.startswith("cpu") else torch.float32
    return getattr(torch, name)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="natsl-inspect",
        description="Plot the softmax / linear routing of a NAtS-L checkpoint on a text (one forward pass).",
    )
    p.add_argument("model", metavar="MODEL", help="NAtS-L checkpoint folder or Hub id")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to run the model on")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the PNGs and summary.json")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder or id (default: MODEL)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help=f"keep the first N tokens of the text (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="model dtype (default auto: the checkpoint's dtype on an accelerator, float32 on CPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dpi", type=int, default=DEFAULT_DPI, help=f"PNG resolution (default {DEFAULT_DPI})")
    return p


def run(args: argparse.Namespace) -> list[dict]:
    """Everything `main` does after argument parsing; returns the `routing_summary` rows."""
    text_path = Path(args.text)
    if not text_path.is_file():
        raise InspectError(f"text file {str(text_path)!r} does not exist")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise InspectError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.dpi is not None and args.dpi < 1:
        raise InspectError(f"--dpi must be >= 1, got {args.dpi}")
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InspectError(f"text file {str(text_path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise InspectError(f"text file {str(text_path)!r} is empty")
    check_exists(args.model, "MODEL")
    if args.tokenizer:
        check_exists(args.tokenizer, "--tokenizer")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InspectError(f"--out {args.out} exists and is not a folder; pick another --out")
    local_config = Path(args.model, "config.json")
    if local_config.is_file():  # a local checkpoint: refused before torch is imported when it is not NAtS-L
        model_type = _model_type(local_config)
        if model_type != "natsl":
            raise InspectError(_not_natsl(args.model, model_type))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import natsl_hf

    natsl_hf._load()  # registers NAtS-L with the Auto classes
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device_type = torch.device(device).type
    except (RuntimeError, ValueError) as e:
        raise InspectError(f"--device {device!r} is not a torch device ({e}); use e.g. cpu, cuda or cuda:1") from None
    if device_type == "cuda" and not torch.cuda.is_available():
        raise InspectError(f"--device {device}: CUDA is not available here; use --device cpu")

    tokenizer = load_tokenizer(args.model, args.tokenizer)  # before the (slow) model load
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"][:, : args.max_tokens]

    try:
        config = AutoConfig.from_pretrained(args.model)
    except Exception as e:
        raise InspectError(f"could not load a config from {args.model!r} ({type(e).__name__}: {e})") from e
    if getattr(config, "model_type", None) != "natsl":
        raise InspectError(_not_natsl(args.model, getattr(config, "model_type", None)))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=_resolve_dtype(args.dtype, device))
    model.to(device)

    n_tokens = input_ids.shape[1]
    need = (config.num_sink_chunks + 1) * config.chunk_size
    if n_tokens < need:
        print(
            f"warning: {n_tokens} tokens < {need} = (num_sink_chunks + 1) * chunk_size: no chunk is routable",
            file=sys.stderr,
        )
    if n_tokens > config.max_position_embeddings:
        print(
            f"warning: {n_tokens} tokens > max_position_embeddings={config.max_position_embeddings}: past that position "
            "the model runs outside the context it was converted for (natsl-convert --max-positions); pass "
            f"--max-tokens {config.max_position_embeddings} to stay inside it",
            file=sys.stderr,
        )
    rows = routing_summary(model, input_ids)

    args._writing = out  # from here on an interrupt leaves files in `out` (main says so)
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        plot_layer_routes(r, out / f"routes_layer{r['layer']:02d}.png", chunk_size=config.chunk_size, dpi=args.dpi)
    plot_summary(rows, out / "softmax_fraction.png", budget=config.softmax_budget, dpi=args.dpi)
    summary = {
        "model": str(args.model),
        "text": str(text_path),
        "num_tokens": n_tokens,
        "chunk_size": config.chunk_size,
        "num_sink_chunks": config.num_sink_chunks,
        "overall_fraction": overall_fraction(rows),
        "layers": [{k: v for k, v in r.items() if k not in ("hard", "routable_mask")} for r in rows],
    }
    # NaN is written as null so the file is strict JSON
    clean = json.loads(json.dumps(summary), parse_constant=lambda _: None)
    (out / "summary.json").write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")

    print(f"{args.model}: {n_tokens} tokens, chunk_size {config.chunk_size}, "
          f"{len(rows)} NAtS-L layers; counts are (chunk, KV head) routing decisions")
    print(format_table(rows))
    print(f"overall softmax fraction: {_fmt(overall_fraction(rows))}")
    print(f"wrote {len(rows)} routing maps, softmax_fraction.png and summary.json to {out}")
    return rows


def _model_type(config_path: Path):
    try:
        return json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as e:
        raise InspectError(f"{config_path} is not a valid config.json ({e})") from None


def _not_natsl(model: str, model_type) -> str:
    advice = conversion_advice(model, model_type)
    then = " and inspect OUT" if advice.startswith("convert") else ""
    return f"{model!r} is a {model_type!r} checkpoint, not NAtS-L; {advice}{then}"


def main(argv: list[str] | None = None) -> int:
    """Console entry point `natsl-inspect`; returns 0 (130 after Ctrl-C, with one line), or exits with status 2 and
    a message on a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args._writing = None
    try:
        run(args)
    except InspectError as e:
        parser.exit(2, f"natsl-inspect: error: {' '.join(str(e).split())}\n")
    except KeyboardInterrupt:
        writing = getattr(args, "_writing", None)
        note = ("nothing was written" if writing is None else
                f"the maps in {writing} are incomplete (run again to rewrite them)")
        print(f"natsl-inspect: interrupted; {note}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
