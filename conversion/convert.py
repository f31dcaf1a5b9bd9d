"""Convert a Llama / Mistral / Qwen2 / Qwen3 checkpoint into a NAtS-L checkpoint.

    natsl-convert SRC OUT [--chunk-size 64] [--softmax-budget 0.25] [--sink-chunks 1]
                          [--layers 0,1,5] [--dtype bfloat16] [--overwrite]
                          [--gguf-file F.gguf] [--allow-pickle]

Python: `convert_model(source_model, **natsl_options)` converts a loaded model in memory;
`convert_checkpoint(src, out, ...)` reads a checkpoint and writes a NAtS-L one.

What happens (SPEC.md section 5):
1. The source config is mapped to a NatslConfig by its family (conversion/families.py): every
   decoder field is kept, the NAtS-L options are added and validated before anything is read.
2. `NatslForCausalLM` is built; `_init_weights` initialises the NAtS-L parameters (router
   softmax-biased, gdn_alpha = 0, so the model starts (nearly) equal to its source).
3. Every source tensor is copied unchanged into the parameter of the same name, one layer at a
   time (tqdm). Every source tensor must be used and every copied shape must match; anything
   else is an error that lists the offending names.
4. The output is written into a temporary directory next to OUT and renamed into place, so a
   failure never leaves a partial OUT: safetensors, config.json (with auto_map), remote-code
   modules, generation_config.json, tokenizer files and a README.md model card.

Inputs: a directory with config.json and safetensors (`model.safetensors` or shards listed in
`model.safetensors.index.json`); a loaded transformers model; or a GGUF file (dequantised by
transformers' `gguf_file=` loader, needs the `gguf` package). Pickled `.bin` weights are read
only with `allow_pickle=True` (and then with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import stat
import sys
import time
import uuid
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .families import (
    conversion_notes,
    get_family,
    is_ignored_source_tensor,
    is_new_parameter,
    natsl_config_kwargs,
    weight_name_map,
)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ConversionError(RuntimeError):
    """A checkpoint that cannot be converted as given; the message names the problem and the fix."""


# --------------------------------------------------------------------------- tensor sources
class _StateDictSource:
    """Tensors of a loaded model (its state_dict)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], origin: str):
        self.tensors = state_dict
        self.origin = origin

    def keys(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def close(self) -> None:
        pass


class _SafetensorsSource:
    """Lazily read tensors of a safetensors checkpoint (single file or shards with an index)."""

    def __init__(self, src: Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        self._handles: dict[str, object] = {}
        self.src = src
        self.origin = str(src)
        index = src / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ConversionError(f"{index} is not a valid shard index ({err}); re-download the checkpoint.") from err
            missing = sorted({f for f in weight_map.values() if not (src / f).is_file()})
            if missing:
                raise ConversionError(
                    f"The shard index {index} points to missing file(s) {missing}; download the complete checkpoint "
                    "(every shard listed in model.safetensors.index.json)."
                )
            self.file_of = dict(weight_map)
        elif (src / "model.safetensors").is_file():
            self.file_of = {name: "model.safetensors" for name in self._open("model.safetensors").keys()}
        else:
            raise ConversionError(f"No model.safetensors or model.safetensors.index.json in {src}.")

    def _open(self, filename: str):
        if filename not in self._handles:
            try:
                self._handles[filename] = self._safe_open(str(self.src / filename), framework="pt", device="cpu")
            except Exception as err:  # SafetensorError, OSError: header truncated / not safetensors
                raise ConversionError(
                    f"Cannot read {self.src / filename}: {err}. The file is corrupt or truncated; re-download it."
                ) from err
        return self._handles[filename]

    def keys(self) -> set[str]:
        return set(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        filename = self.file_of[name]
        try:
            return self._open(filename).get_tensor(name)
        except ConversionError:
            raise
        except Exception as err:
            raise ConversionError(
                f"Cannot read tensor {name!r} from {self.src / filename}: {err}. The file is corrupt or does not hold "
                "what its shard index says; re-download the checkpoint."
            ) from err

    def close(self) -> None:
        self._handles.clear()


def _pickle_source(src: Path) -> _StateDictSource:
    """Pickled `pytorch_model*.bin` weights, loaded with torch.load(weights_only=True)."""
    index = src / "pytorch_model.bin.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["pytorch_model.bin"]
    state = {}
    for name in files:
        path = src / name
        if not path.is_file():
            raise ConversionError(f"The shard index {index} points to missing file {name}; download the complete checkpoint.")
        try:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:
            raise ConversionError(f"Cannot read {path}: {err}. The file is corrupt; re-download it.") from err
    return _StateDictSource(state, str(src))


# --------------------------------------------------------------------------- core
def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)} or 'auto' (keep the source's).")
    return DTYPES[dtype]


def _validate_options(num_layers: int, natsl_options: dict) -> None:
    """Clear, flag-naming errors for the options users get wrong most (NatslConfig re-validates all)."""
    c = natsl_options.get("chunk_size")
    if c is not None and (not isinstance(c, int) or isinstance(c, bool) or c < 1 or c & (c - 1)):
        raise ValueError(f"chunk_size={c!r} is not a power of two (--chunk-size); use e.g. 32, 64 or 128.")
    layers = natsl_options.get("natsl_layers")
    if layers is not None:
        wrong = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
        if wrong:
            raise ValueError(
                f"natsl_layers {wrong} do not exist (--layers): the source model has {num_layers} layers, "
                f"indices 0-{num_layers - 1}."
            )
        if not layers:
            raise ValueError("natsl_layers is empty (--layers): name at least one layer, or omit it for all layers.")


def _build_natsl_model(source_config, dtype: torch.dtype, natsl_options: dict):
    from natsl_hf import NatslConfig, NatslForCausalLM

    _validate_options(source_config.num_hidden_layers, natsl_options)
    config = NatslConfig(**natsl_config_kwargs(source_config, **natsl_options))
    model = NatslForCausalLM._from_config(config, dtype=dtype)
    model.config.dtype = dtype
    model.eval()
    return model


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


@torch.no_grad()
def _copy_weights(model, source, progress: bool = True) -> dict:
    """Copy every source tensor into `model`; verify names and shapes. Returns counts for the summary."""
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


def convert_model(source_model, *, dtype=None, progress: bool = False, **natsl_options):
    """Convert a loaded Llama / Mistral / Qwen2 / Qwen3 causal LM into a `NatslForCausalLM` in memory.

    source_model: a transformers `*ForCausalLM` (its config's model_type picks the family).
    dtype: torch dtype or name of the result (default: the source's parameter dtype).
    natsl_options: NAtS-L config fields (chunk_size, softmax_budget, num_sink_chunks, natsl_layers,
        router_temperature, router_loss_weight, router_init_bias, gdn_conv_size, route_override,
        use_kernels, max_position_embeddings).
    The source is not modified; the result shares no storage with it.
    """
    model, _ = _convert_model(source_model, dtype=dtype, progress=progress, **natsl_options)
    return model


def _convert_model(source_model, *, dtype=None, progress=False, **natsl_options):
    config = source_model.config
    get_family(getattr(config, "model_type", None))
    dtype = _resolve_dtype(dtype) or next(source_model.parameters()).dtype
    model = _build_natsl_model(config, dtype, natsl_options)
    report = _copy_weights(model, _StateDictSource(source_model.state_dict(), type(source_model).__name__), progress)
    if getattr(source_model, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(source_model.generation_config)
    return model, report


# --------------------------------------------------------------------------- checkpoint
def _read_source_config(src: Path):
    from transformers import AutoConfig

    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src} has no config.json; point SRC at a transformers checkpoint directory.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON ({err}); re-download the checkpoint.") from err
    get_family(raw.get("model_type"))  # refuse unknown families before transformers tries to
    return AutoConfig.from_pretrained(src)


def _source_card_metadata(src: Path) -> dict:
    readme = src / "README.md"
    if not readme.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(readme).data.to_dict()
    except Exception:
        return {}


def _gguf_license(path: Path) -> str | None:
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.license")
        return None if field is None else str(field.contents())
    except Exception:
        return None


def _check_paths(src: Path | None, out: Path, overwrite: bool) -> None:
    """Refuse OUT inside a SRC directory, OUT on or around SRC, and an existing OUT without overwrite."""
    out_r = out.resolve()
    if src is not None:
        src_r = src.resolve()
        if src_r.is_dir() and (out_r == src_r or src_r in out_r.parents):
            raise ValueError(f"OUT {out} lies inside SRC {src}; write the converted checkpoint to a separate directory.")
        if out_r in src_r.parents:
            raise ValueError(f"SRC {src} lies inside OUT {out}; writing OUT would destroy the source. Pick another OUT.")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it, or pick another OUT.")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; remove it or pick another OUT.")


def _command_line(src, out, opts: dict) -> str:
    flags = {
        "chunk_size": "--chunk-size", "softmax_budget": "--softmax-budget", "num_sink_chunks": "--sink-chunks",
        "natsl_layers": "--layers", "dtype": "--dtype", "gguf_file": "--gguf-file", "max_position_embeddings":
        "--max-positions",
    }
    parts = ["natsl-convert", str(src), str(out)]
    for key, flag in flags.items():
        value = opts.get(key)
        if value is None:
            continue
        if key == "natsl_layers":
            value = ",".join(map(str, value))
        parts += [flag, str(value).replace("torch.", "")]
    parts += [f"--{k.replace('_', '-')}" for k in ("overwrite", "allow_pickle") if opts.get(k)]
    line = shlex.join(parts)
    api_only = {k: v for k, v in opts.items() if k not in flags and k not in ("overwrite", "allow_pickle") and v is not None}
    if api_only:  # options without a CLI flag (set through the Python API)
        line += "\n# with Python-API options: " + ", ".join(f"{k}={v!r}" for k, v in sorted(api_only.items()))
    return line


def _write_atomically(out: Path, write) -> None:
    """Run `write(tmp_dir)` into a temp dir beside `out`, then rename it into place.

    The temp dir is made with a plain `mkdir` (mode 0o777 & ~umask), so OUT gets the permissions of
    any directory its user creates (mkdtemp's 0o700 would make it unreadable to other users), and
    every file written into it gets 0o666 & ~umask, as a plain `open` would give it (transformers
    writes model.safetensors 0o600; copied files would keep their source's mode).
    On any failure or interrupt (BaseException) the temp dir is removed; an existing `out` is only
    moved aside once the new one is complete, and moved back if the swap fails.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(out.parent, f".{out.name}.natsl-tmp-", create=True)
    old = None
    try:
        write(tmp)
        _normalise_modes(tmp)
        if out.exists():
            old = _fresh_dir(out.parent, f".{out.name}.natsl-old-", create=False)
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        try:
            if old is not None and old.exists() and not out.exists():
                old.rename(out)  # the swap failed halfway: put the previous OUT back
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _normalise_modes(root: Path) -> None:
    """Give everything under `root` the mode a plain mkdir / open would: root's own mode (0o777 & ~umask),
    without the execute bits for files. Read from root's mode, so the process umask is never changed."""
    dir_mode = stat.S_IMODE(root.stat().st_mode)
    file_mode = dir_mode & 0o666
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        os.chmod(path, dir_mode if path.is_dir() else file_mode)


def _fresh_dir(parent: Path, prefix: str, *, create: bool) -> Path:
    """An unused path `parent/prefix<random>`; made with os.mkdir (umask-respecting) when `create`."""
    for _ in range(100):
        path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
        if not create:
            if not os.path.lexists(path):
                return path
            continue
        try:
            os.mkdir(path)  # mode 0o777 & ~umask, like any mkdir
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"Could not find an unused {prefix}* name in {parent}.")


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
    natsl_options: further NatslConfig NAtS-L fields (router_init_bias, route_override, ...).
    Returns the converted model (in memory). Its conversion summary is at `model.natsl_conversion_report`
    (counts, bytes written, notes, and the `base_model` / `license` written into the card, None if unknown).
    """
    from natsl_hf.hub import render_model_card

    start = time.perf_counter()
    out = Path(out_dir)
    opts = dict(natsl_options, chunk_size=chunk_size, softmax_budget=softmax_budget, num_sink_chunks=num_sink_chunks,
                natsl_layers=None if natsl_layers is None else list(natsl_layers))
    record = dict(opts, dtype=dtype, gguf_file=gguf_file, overwrite=overwrite, allow_pickle=allow_pickle)
    torch_dtype = _resolve_dtype(dtype)
    card_meta: dict = {}
    src = None
    source_model = None
    extra_files: list[Path] = []

    if isinstance(src_dir_or_model, torch.nn.Module):
        source_model = src_dir_or_model
        _check_paths(None, out, overwrite)
        src_label = f"<{type(source_model).__name__} object>"
    else:
        src = Path(src_dir_or_model)
        if src.is_file() and src.suffix == ".gguf":
            gguf_file, src = src.name, src.parent
        if not src.is_dir():
            raise FileNotFoundError(f"SRC {src} does not exist (expected a checkpoint directory or a .gguf file).")
        # a GGUF source is one file: OUT may sit beside it, never on or around it
        _check_paths(src / gguf_file if gguf_file else src, out, overwrite)
        src_label = str(src / gguf_file) if gguf_file else str(src)
        record["gguf_file"] = None  # the source path already names the GGUF file
        card_meta = _source_card_metadata(src)

    if gguf_file is not None:
        path = src / gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist.")
        try:
            import gguf  # noqa: F401
        except ImportError as err:
            raise ImportError("Reading GGUF needs the `gguf` package: pip install gguf (or natsl-hf[demo]).") from err
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        source_config = AutoConfig.from_pretrained(src, gguf_file=gguf_file)
        get_family(source_config.model_type)
        _validate_options(source_config.num_hidden_layers, opts)
        source_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch_dtype or torch.float32)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
        card_meta.setdefault("license", _gguf_license(path))

    if source_model is not None:
        source_name = getattr(source_model.config, "_name_or_path", None)
        notes = conversion_notes(source_model.config)
        model, report = _convert_model(source_model, dtype=torch_dtype, progress=progress, **opts)
    else:
        source_config = _read_source_config(src)
        source_name = None  # a local directory: its hub id (if any) is not recorded in it
        notes = conversion_notes(source_config)
        _validate_options(source_config.num_hidden_layers, opts)
        has_safetensors = (src / "model.safetensors").is_file() or (src / "model.safetensors.index.json").is_file()
        has_pickle = (src / "pytorch_model.bin").is_file() or (src / "pytorch_model.bin.index.json").is_file()
        if not has_safetensors:
            if not has_pickle:
                raise ConversionError(
                    f"No weight files in {src}: expected model.safetensors or model.safetensors.index.json with its shards."
                )
            if not allow_pickle:
                raise ConversionError(
                    f"{src} has only pickled pytorch_model*.bin weights, which can run code when loaded. Convert them to "
                    "safetensors first, or pass allow_pickle=True (--allow-pickle) if you trust the source "
                    "(read with torch.load(weights_only=True))."
                )
            source = _pickle_source(src)
        else:
            source = _SafetensorsSource(src)
        try:
            if torch_dtype is None:
                torch_dtype = source.get("model.embed_tokens.weight").dtype if "model.embed_tokens.weight" in source.keys() else torch.float32
            model = _build_natsl_model(source_config, torch_dtype, opts)
            report = _copy_weights(model, source, progress)
        finally:
            source.close()
        extra_files = [src / name for name in TOKENIZER_FILES + ("generation_config.json",) if (src / name).is_file()]

    base_model = base_model or (None if gguf_file else _hub_id(source_name))
    license = license or card_meta.get("license") or None
    card = render_model_card(
        model,
        base_model=base_model,
        license=license,
        conversion_command=command or _command_line(src_label, out, record),
    )

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        for path in extra_files:
            shutil.copy2(path, tmp / path.name)
        if tokenizer is not None and not extra_files:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")

    _write_atomically(out, write)
    report.update(
        source=src_label,
        out=str(out),
        bytes_written=sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        seconds=time.perf_counter() - start,
        notes=notes,
        num_layers=model.config.num_hidden_layers,
        natsl_layers=list(model.config.natsl_layers),
        base_model=base_model,
        license=license,
    )
    model.natsl_conversion_report = report
    return model


def _hub_id(name) -> str | None:
    """`name` when it looks like a hub repo id (owner/name) rather than a local path."""
    if not name or not isinstance(name, str) or os.path.exists(name) or name.count("/") != 1 or name.startswith((".", "/")):
        return None
    return name


# --------------------------------------------------------------------------- CLI
def _layers_arg(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--layers expects comma-separated integers like 0,1,5, got {text!r}") from err


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="natsl-convert",
        description="Convert a Llama / Mistral / Qwen2 / Qwen3 checkpoint into a NAtS-L checkpoint "
        "(token-routed softmax / Gated DeltaNet attention).",
    )
    p.add_argument("src", help="checkpoint directory (config.json + safetensors) or a .gguf file")
    p.add_argument("out", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--chunk-size", type=int, default=64, help="tokens per routed chunk (power of two)")
    p.add_argument("--softmax-budget", type=float, default=0.25, help="target softmax fraction for training")
    p.add_argument("--sink-chunks", type=int, default=1, help="first chunks always routed softmax")
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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    extra = {} if args.max_positions is None else {"max_position_embeddings": args.max_positions}
    try:
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
            command=shlex.join(["natsl-convert", *argv]),
            **extra,
        )
    except (ConversionError, ValueError, FileExistsError, FileNotFoundError, ImportError) as err:
        print(f"natsl-convert: error: {err}", file=sys.stderr)
        return 1
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


__all__ = ["ConversionError", "build_parser", "convert_checkpoint", "convert_model", "main"]

if __name__ == "__main__":
    sys.exit(main())
