"""Convert a Llama / Mistral / Qwen2 / Qwen3 checkpoint into a NAtS-L checkpoint.

    natsl-convert SRC OUT [--chunk-size 64] [--softmax-budget 0.25] [--sink-chunks 1]
                          [--layers 0,1,5] [--dtype bfloat16] [--overwrite]
                          [--gguf-file F.gguf] [--allow-pickle] [--max-positions N]

Python: `convert_model(source_model, **natsl_options)` converts a loaded model in memory;
`convert_checkpoint(src, out, ...)` reads a checkpoint and writes a NAtS-L one.

What happens (SPEC.md section 5), for every kind of source (sources.py):
1. open: the source's config is read (weights not yet); `natsl_config` maps it to a NatslConfig by
   its family (families.py): every decoder field is kept, the NAtS-L options are added, and NatslConfig
   validates them, once, before a weight is read.
2. build: `NatslForCausalLM` is built; `_init_weights` initialises the NAtS-L parameters (router
   softmax-biased, gdn_alpha = 0, so the model starts (nearly) equal to its source). Every source tensor
   is copied unchanged into the parameter of the same name, one layer at a time (tqdm). Every source
   tensor must be used and every copied shape must match; anything else is an error naming them.
3. write: safetensors, config.json (with auto_map), remote-code modules, generation_config.json,
   tokenizer files and a README.md model card go into a temp dir beside OUT that is renamed into
   place (output.py), so a failure, an interrupt or SIGTERM never leaves a partial OUT.
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .families import conversion_notes, is_ignored_source_tensor, is_new_parameter, natsl_config_kwargs, weight_name_map
from .output import check_output_path, write_atomically
from .sources import ConversionError, OneLineArgumentParser, Source, check_input_path, model_source, open_source

if TYPE_CHECKING:  # torch is imported where it is used, so `natsl-convert --help` starts without it
    import torch

PROG = "natsl-convert"
# --dtype name -> torch dtype name
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
# the natsl-convert flag of each option it has one for (error messages and the recorded command name them)
FLAGS = {
    "chunk_size": "--chunk-size", "softmax_budget": "--softmax-budget", "num_sink_chunks": "--sink-chunks",
    "natsl_layers": "--layers", "dtype": "--dtype", "gguf_file": "--gguf-file",
    "max_position_embeddings": "--max-positions",
}


# --------------------------------------------------------------------------- open: options -> NatslConfig
def _resolve_dtype(dtype) -> torch.dtype | None:
    import torch

    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)} or 'auto' (keep the source's).")
    return getattr(torch, DTYPES[dtype])


def natsl_config(source_config, natsl_options: dict):
    """The NatslConfig of the converted model: the source's decoder fields plus the NAtS-L options. This is
    where the options are validated (by NatslConfig, whose errors name the field: `NatslConfigError.field`)."""
    from natsl_hf import NatslConfig

    if natsl_options.get("natsl_layers") == []:
        raise ValueError("natsl_layers is empty (--layers): name at least one layer, or omit it for all layers.")
    return NatslConfig(**natsl_config_kwargs(source_config, **natsl_options))


def _context_note(source_config, config) -> list[str]:
    source_context = getattr(source_config, "max_position_embeddings", None)
    if source_context is None or config.max_position_embeddings >= source_context:
        return []
    return [f"converted for {config.max_position_embeddings} positions (the source has {source_context}): the model "
            "equals its source only within them"]


# --------------------------------------------------------------------------- build: model + weights
def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


def _copy_weights(model, source, progress: bool = True) -> dict:
    """Copy every source tensor into `model`; verify names and shapes. Returns counts for the summary."""
    import torch

    with torch.no_grad():
        return _copy_weights_no_grad(model, source, progress)


def _copy_weights_no_grad(model, source, progress: bool) -> dict:
    import torch
    from tqdm.auto import tqdm

    config = model.config
    target = model.state_dict()
    mapping = weight_name_map(target)  # target name -> source name
    tied = bool(config.tie_word_embeddings)
    if tied:
        mapping.pop("lm_head.weight", None)
    src_keys = source.keys()
    needed = set(mapping.values())
    missing = sorted(needed - src_keys)
    if missing:
        raise ConversionError(
            f"{len(missing)} tensor(s) the config implies are missing from {source.origin}: {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}. The weights do not match config.json (wrong num_hidden_layers, "
            "bias or tie_word_embeddings?) or the checkpoint is incomplete."
        )
    used = set(needed) | {k for k in src_keys if is_ignored_source_tensor(k)}
    if tied and "lm_head.weight" in src_keys:
        if not torch.equal(source.get("lm_head.weight"), source.get("model.embed_tokens.weight")):
            raise ConversionError(
                f"config.json says tie_word_embeddings=true but {source.origin} holds an lm_head.weight that differs "
                "from model.embed_tokens.weight; fix tie_word_embeddings in config.json."
            )
        used.add("lm_head.weight")
    unused = sorted(src_keys - used)
    if unused:
        raise ConversionError(
            f"{len(unused)} source tensor(s) would be dropped: {unused[:6]}{' ...' if len(unused) > 6 else ''}. "
            f"The checkpoint has weights a {config.source_model_type} model of this config does not (wrong config "
            "or an unsupported variant); refusing to convert it silently."
        )

    by_layer: dict[int | None, list[str]] = {}
    for name in mapping:
        by_layer.setdefault(_layer_of(name), []).append(name)

    copied_params = 0

    def copy(names):
        nonlocal copied_params
        for name in names:
            tensor, dest = source.get(mapping[name]), target[name]
            if tuple(tensor.shape) != tuple(dest.shape):
                raise ConversionError(
                    f"Source tensor {mapping[name]!r} has shape {tuple(tensor.shape)} but the config implies "
                    f"{tuple(dest.shape)}: config.json disagrees with the weights (check hidden_size, "
                    "num_attention_heads, num_key_value_heads, head_dim, intermediate_size, vocab_size)."
                )
            dest.copy_(tensor.to(dest.dtype))
            copied_params += tensor.numel()

    copy(by_layer.pop(None, []))
    for layer in tqdm(sorted(by_layer), desc="copying layers", unit="layer", disable=not progress):
        copy(by_layer[layer])
    added = sum(p.numel() for n, p in model.named_parameters() if is_new_parameter(n))
    return {"copied_tensors": len(mapping), "copied_params": copied_params, "added_params": added}


def _weights_dtype(tensors) -> torch.dtype:
    """The dtype of the source's weights (its embedding's), the output's default."""
    import torch

    name = "model.embed_tokens.weight"
    return tensors.get(name).dtype if name in tensors.keys() else torch.float32


def _build(config, source: Source, dtype: torch.dtype | None, progress: bool):
    """The NatslForCausalLM of `config` holding the source's weights, and the copy counts."""
    from natsl_hf import NatslForCausalLM

    tensors = source.open_tensors(dtype)
    try:
        dtype = dtype or _weights_dtype(tensors)
        model = NatslForCausalLM._from_config(config, dtype=dtype)
        model.config.dtype = dtype
        report = _copy_weights(model.eval(), tensors, progress)
    finally:
        tensors.close()
    if tensors.generation_config is not None:
        model.generation_config = copy.deepcopy(tensors.generation_config)
    return model, report


def convert_model(source_model, *, dtype=None, progress: bool = False, **natsl_options):
    """Convert a loaded Llama / Mistral / Qwen2 / Qwen3 causal LM into a `NatslForCausalLM` in memory.

    source_model: a transformers `*ForCausalLM` (its config's model_type picks the family).
    dtype: torch dtype or name of the result (default: the source's parameter dtype).
    natsl_options: NAtS-L config fields (chunk_size, softmax_budget, num_sink_chunks, natsl_layers,
        router_temperature, router_loss_weight, router_init_bias, gdn_conv_size, route_override,
        use_kernels, max_position_embeddings).
    The source is not modified; the result shares no storage with it.
    """
    source = model_source(source_model)
    model, _ = _build(natsl_config(source.config, natsl_options), source, _resolve_dtype(dtype), progress)
    return model


# --------------------------------------------------------------------------- write: checkpoint + card
def convert_checkpoint(
    src_dir_or_model,
    out_dir,
    *,
    chunk_size: int = 64,
    softmax_budget: float = 0.25,
    num_sink_chunks: int = 1,
    natsl_layers: list[int] | None = None,
    dtype=None,
    overwrite: bool = False,
    gguf_file: str | None = None,
    allow_pickle: bool = False,
    tokenizer=None,
    base_model: str | None = None,
    license: str | None = None,
    progress: bool = True,
    command: str | None = None,
    **natsl_options,
):
    """Convert a checkpoint (directory, GGUF file or loaded model) and write a NAtS-L checkpoint to `out_dir`.

    src_dir_or_model: a directory with config.json + safetensors; a `.gguf` file (or a directory
        with `gguf_file` naming one in it); or a loaded transformers causal LM.
    natsl_layers: layer indices to make NAtS-L (default all); the others stay full softmax.
    dtype: "float32" / "bfloat16" / "float16" / torch dtype; default the source weights' dtype
        (GGUF: float32, the dequantised weights).
    overwrite: replace an existing `out_dir` (atomically: the old one stays until the new one is complete).
    allow_pickle: read pickled pytorch_model*.bin when no safetensors exist (torch.load(weights_only=True)).
    tokenizer: saved into the output when converting a model object (directories copy their files).
    base_model, license: for the model card (default: from the source README / GGUF metadata).
    command: the command line recorded on the card (default: the natsl-convert line equivalent to this call).
    natsl_options: further NatslConfig NAtS-L fields (router_init_bias, route_override, ...).
    Returns the converted model (in memory). Its conversion summary is at `model.natsl_conversion_report`
    (counts, bytes written, notes, and the `base_model` / `license` written into the card, None if unknown).
    """
    from natsl_hf.model_card import render_model_card

    start = time.perf_counter()
    out = Path(out_dir)
    options = dict(natsl_options, chunk_size=chunk_size, softmax_budget=softmax_budget, num_sink_chunks=num_sink_chunks,
                   natsl_layers=None if natsl_layers is None else list(natsl_layers))
    source = open_source(src_dir_or_model, gguf_file=gguf_file, allow_pickle=allow_pickle, tokenizer=tokenizer)
    check_output_path(source.path, out, overwrite)
    config = natsl_config(source.config, options)
    model, report = _build(config, source, _resolve_dtype(dtype), progress)

    base_model = base_model or source.hub_id
    license = license or source.license
    recorded = dict(options, dtype=dtype, overwrite=overwrite, allow_pickle=allow_pickle)
    card = render_model_card(model, base_model=base_model, license=license,
                             conversion_command=command or _command_line(source.label, out, recorded))
    write_atomically(out, lambda tmp: _write_checkpoint(tmp, model, source, card))
    report.update(
        source=source.label,
        out=str(out),
        bytes_written=sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        seconds=time.perf_counter() - start,
        notes=conversion_notes(source.config) + _context_note(source.config, model.config),
        num_layers=model.config.num_hidden_layers,
        natsl_layers=list(model.config.natsl_layers),
        base_model=base_model,
        license=license,
    )
    model.natsl_conversion_report = report
    return model


def _write_checkpoint(folder: Path, model, source: Source, card: str) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    for path in source.files:
        shutil.copy2(path, folder / path.name)
    if source.tokenizer is not None and not source.files:
        source.tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(card, encoding="utf-8")


def _command_line(src, out, opts: dict) -> str:
    """The natsl-convert line equivalent to a Python call (options without a flag follow as a comment)."""
    parts = ["natsl-convert", str(src), str(out)]
    for key, flag in FLAGS.items():
        value = opts.get(key)
        if value is None:
            continue
        if key == "natsl_layers":
            value = ",".join(map(str, value))
        parts += [flag, str(value).replace("torch.", "")]
    parts += [f"--{k.replace('_', '-')}" for k in ("overwrite", "allow_pickle") if opts.get(k)]
    line = shlex.join(parts)
    api_only = {k: v for k, v in opts.items() if k not in FLAGS and k not in ("overwrite", "allow_pickle") and v is not None}
    if api_only:  # options without a CLI flag (set through the Python API)
        line += "\n# with Python-API options: " + ", ".join(f"{k}={v!r}" for k, v in sorted(api_only.items()))
    return line


# --------------------------------------------------------------------------- CLI
def _layers_arg(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--layers expects comma-separated integers like 0,1,5, got {text!r}") from err
    if any(layer < 0 for layer in layers):
        raise argparse.ArgumentTypeError(f"--layers expects layer indices >= 0, got {text!r}")
    return layers


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog=PROG,
        description="Convert a Llama / Mistral / Qwen2 / Qwen3 checkpoint into a NAtS-L checkpoint "
        "(token-routed softmax / Gated DeltaNet attention).",
    )
    p.add_argument("src", help="checkpoint directory (config.json + safetensors) or a .gguf file")
    p.add_argument("out", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--chunk-size", type=int, default=64, help="tokens per routed chunk (power of two)")
    p.add_argument("--softmax-budget", type=float, default=0.25, help="target softmax fraction for training, in (0, 1]")
    p.add_argument("--sink-chunks", type=int, default=1, help="first chunks always routed softmax (>= 0)")
    p.add_argument("--layers", type=_layers_arg, default=None, help="NAtS-L layers, e.g. 0,1,5 (default: all)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES) + ["auto"], help="output dtype (default: source's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside SRC (needs the gguf package)")
    p.add_argument("--allow-pickle", action="store_true", help="read pickled pytorch_model*.bin if no safetensors")
    p.add_argument("--max-positions", type=int, default=None, help="convert for a shorter context (Mistral windows)")
    p.add_argument("--base-model", default=None, help="hub id of the source, for the model card")
    p.add_argument("--license", default=None, help="license id of the source, for the model card")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """The checks of a natsl-convert command line that need neither torch nor the source's weights: the values
    of the count and budget flags (NatslConfig checks the rest once the source's config is read), SRC, and OUT
    against SRC. ValueError / OSError naming the flag and the fix."""
    budget = args.softmax_budget
    if not (math.isfinite(budget) and 0 < budget <= 1):
        raise ValueError(f"softmax_budget={budget!r} is invalid: expected a fraction in (0, 1], the share of chunks "
                         "kept as softmax, e.g. 0.25 (set by --softmax-budget)")
    for flag, value, low in (("--chunk-size", args.chunk_size, 1), ("--sink-chunks", args.sink_chunks, 0),
                             ("--max-positions", args.max_positions, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} {value}: expected an integer >= {low}")
    if args.layers == []:
        raise ValueError("--layers names no layer: name at least one (e.g. 0,1,5), or omit it for all layers")
    check_input_path(args.src, "SRC", directory=False)
    src = Path(args.src)
    if src.is_file() and src.suffix != ".gguf":
        raise ValueError(f"SRC {args.src} is a file but not a .gguf file; pass a checkpoint directory or a .gguf file")
    if args.gguf_file is not None:
        if not src.is_dir():
            raise ValueError(f"--gguf-file names a file inside SRC, but SRC {args.src} is not a directory")
        check_input_path(src / args.gguf_file, "--gguf-file", directory=False)
    check_output_path(src, Path(args.out), args.overwrite)


def _stamp(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _interrupted(out: Path, before) -> str:
    """What an interrupted conversion left (write_atomically renames OUT into place only once it is complete)."""
    now = _stamp(out)
    if now is None or now == before:
        return "nothing was written" + (f" ({out} is as it was)" if now is not None else "")
    return f"{out} had been written completely just before"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    extra = {} if args.max_positions is None else {"max_position_embeddings": args.max_positions}
    out = Path(args.out)
    before = _stamp(out)
    try:
        check_arguments(args)  # before torch is imported: a bad value is refused at once
        model = convert_checkpoint(
            args.src,
            args.out,
            chunk_size=args.chunk_size,
            softmax_budget=args.softmax_budget,
            num_sink_chunks=args.sink_chunks,
            natsl_layers=args.layers,
            dtype=args.dtype,
            overwrite=args.overwrite,
            gguf_file=args.gguf_file,
            allow_pickle=args.allow_pickle,
            base_model=args.base_model,
            license=args.license,
            progress=not args.quiet,
            command=shlex.join([PROG, *argv]),
            **extra,
        )
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {_interrupted(out, before)}", file=sys.stderr)
        return 130
    except (ConversionError, ValueError, OSError, ImportError) as err:
        flag = FLAGS.get(getattr(err, "field", None))
        message = " ".join(str(err).split())  # one line
        if flag is None and "max_position_embeddings=" in message:
            flag = FLAGS["max_position_embeddings"]
        print(f"{PROG}: error: {message}" + (f" (set by {flag})" if flag and flag not in message else ""),
              file=sys.stderr)
        return 2
    r = model.natsl_conversion_report
    print(
        f"converted {model.config.source_model_type} -> NAtS-L: {len(r['natsl_layers'])} of {r['num_layers']} layers "
        f"NAtS-L (chunk {model.config.chunk_size}, sink chunks {model.config.num_sink_chunks}, softmax budget "
        f"{model.config.softmax_budget})\n"
        f"  copied {r['copied_tensors']} tensors ({r['copied_params']:,} params), added {r['added_params']:,} NAtS-L "
        f"params (+{100.0 * r['added_params'] / max(r['copied_params'], 1):.2f}%)\n"
        f"  wrote {r['bytes_written']:,} bytes to {r['out']} in {r['seconds']:.1f} s"
    )
    for note in r["notes"]:
        print(f"  note: {note}")
    return 0


__all__ = ["ConversionError", "build_parser", "check_arguments", "convert_checkpoint", "convert_model", "main",
           "natsl_config"]

if __name__ == "__main__":
    sys.exit(main())
