"""The checkpoints natsl-convert reads, each opened as one `Source`.

Three kinds: a loaded transformers model, a checkpoint directory (config.json + safetensors, or pickled
`pytorch_model*.bin` with `allow_pickle`), and a GGUF file (dequantised by transformers' `gguf_file=`
loader, needs the `gguf` package). A `Source` gives the source's transformers config at once and its
tensors only when asked (`open_tensors`), so the conversion options are validated against the config
before a weight is read; it also carries what travels into the output (tokenizer, generation config,
license, hub id).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .families import FAMILIES, get_family

if TYPE_CHECKING:  # torch is imported where tensors are read, so the command lines start without it
    import torch

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


class ConversionError(RuntimeError):
    """A checkpoint that cannot be converted as given; the message names the problem and the fix."""


# --------------------------------------------------------------------------- tensor sources
class _StateDictSource:
    """Tensors of a loaded model (its state_dict), and the model's generation config if it has one."""

    def __init__(self, state_dict: dict[str, torch.Tensor], origin: str, generation_config=None):
        self.tensors = state_dict
        self.origin = origin
        self.generation_config = generation_config

    def keys(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def close(self) -> None:
        pass


class _SafetensorsSource:
    """Lazily read tensors of a safetensors checkpoint (single file or shards with an index)."""

    generation_config = None  # a checkpoint directory's generation_config.json is copied as a file

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
    import torch

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


# --------------------------------------------------------------------------- one source, three kinds
@dataclass
class Source:
    """A checkpoint to convert.

    config: its transformers config (the family and the decoder fields come from it).
    open_tensors: `open_tensors(dtype)` reads its tensors (`dtype`: what a GGUF is dequantised to, None: float32),
        with the generation config of a loaded model (`.generation_config`, None for a directory).
    label: how the summary and the recorded command name it; path: where it is on disk (None: a model object).
    hub_id / license: for the model card, when known. files: files copied unchanged into the output
    (tokenizer, generation_config.json); tokenizer: saved into it when there are no files to copy.
    """

    config: object
    open_tensors: Callable[[torch.dtype | None], _StateDictSource | _SafetensorsSource]
    label: str
    path: Path | None = None
    hub_id: str | None = None
    license: str | None = None
    files: list[Path] = field(default_factory=list)
    tokenizer: object = None


def open_source(src_or_model, *, gguf_file: str | None = None, allow_pickle: bool = False, tokenizer=None) -> Source:
    """A `Source` for a loaded model, a checkpoint directory, a `.gguf` file, or a directory with `gguf_file` in it."""
    if not isinstance(src_or_model, (str, os.PathLike)):
        import torch

        if isinstance(src_or_model, torch.nn.Module):
            return model_source(src_or_model, tokenizer=tokenizer)
    src = Path(src_or_model)
    if src.is_file() and src.suffix == ".gguf":
        gguf_file, src = src.name, src.parent
    if not src.is_dir():
        raise FileNotFoundError(f"SRC {src} does not exist (expected a checkpoint directory or a .gguf file).")
    if gguf_file is not None:
        return _gguf_source(src / gguf_file, tokenizer=tokenizer)
    return _directory_source(src, allow_pickle=allow_pickle)


def model_source(model, tokenizer=None) -> Source:
    get_family(getattr(model.config, "model_type", None))
    name = getattr(model.config, "_name_or_path", None)
    return Source(
        config=model.config,
        open_tensors=lambda dtype: _StateDictSource(model.state_dict(), type(model).__name__,
                                                    getattr(model, "generation_config", None)),
        label=f"<{type(model).__name__} object>",
        hub_id=_hub_id(name),
        tokenizer=tokenizer,
    )


def _directory_source(src: Path, *, allow_pickle: bool) -> Source:
    has_safetensors = (src / "model.safetensors").is_file() or (src / "model.safetensors.index.json").is_file()
    has_pickle = (src / "pytorch_model.bin").is_file() or (src / "pytorch_model.bin.index.json").is_file()
    config = _read_config(src)  # first: a directory that is no checkpoint at all is named as such
    if not has_safetensors and not has_pickle:
        raise ConversionError(
            f"No weight files in {src}: expected model.safetensors or model.safetensors.index.json with its shards."
        )
    if not has_safetensors and not allow_pickle:
        raise ConversionError(
            f"{src} has only pickled pytorch_model*.bin weights, which can run code when loaded. Convert them to "
            "safetensors first, or pass allow_pickle=True (--allow-pickle) if you trust the source "
            "(read with torch.load(weights_only=True))."
        )
    return Source(
        config=config,
        open_tensors=lambda dtype: _SafetensorsSource(src) if has_safetensors else _pickle_source(src),
        label=str(src),
        path=src,
        license=_card_license(src),
        files=[src / name for name in TOKENIZER_FILES + ("generation_config.json",) if (src / name).is_file()],
    )


def _gguf_source(path: Path, *, tokenizer=None) -> Source:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist.")
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ImportError("Reading GGUF needs the `gguf` package: pip install gguf (or, in the natsl-hf clone, "
                          "pip install -e '.[demo]').") from err
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = path.parent, path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    get_family(config.model_type)

    def open_tensors(dtype):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype or torch.float32)
        return _StateDictSource(model.state_dict(), str(path), model.generation_config)

    return Source(
        config=config,
        open_tensors=open_tensors,
        label=str(path),
        path=path,
        license=_card_license(folder) or _gguf_license(path),
        tokenizer=tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(folder, gguf_file=name),
    )


def _read_config(src: Path):
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


def _card_license(folder: Path) -> str | None:
    """The license in the YAML metadata of `folder/README.md`, if any."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict().get("license") or None
    except Exception:  # an unparsable card just has no license to carry
        return None


def _gguf_license(path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.license")
    return None if field is None else str(field.contents())


def _hub_id(name) -> str | None:
    """`name` when it looks like a hub repo id (owner/name) rather than a local path."""
    if not name or not isinstance(name, str) or os.path.exists(name) or name.count("/") != 1 or name.startswith((".", "/")):
        return None
    return name


# --------------------------------------------------------------------------- command-line checks (no torch)
class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, `PROG: error: ... (see PROG --help)`, exit status 2, as
    every other error of the natsl-hf command lines is (argparse would print the usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# The shape of a Hub repo id (`name` or `owner/name`), as huggingface_hub validates it.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?$")


def looks_local(name) -> bool:
    """Whether `name` can only mean a local path, not a Hub repo id: it starts with '.', '/' or '~', has a
    backslash or more than one '/', is no valid repo id, or is `dir/name` where `dir` is a folder here (as
    `out/stage2` beside the `out/` of an earlier stage)."""
    text = os.fspath(name)
    if text.startswith((".", "/", "~")) or os.path.isabs(text) or "\\" in text:
        return True
    if text.count("/") > 1 or not _HUB_ID.match(text) or "--" in text or ".." in text or len(text) > 96:
        return True
    return "/" in text and Path(text.split("/")[0]).is_dir()


def check_input_path(name, what: str, *, hub_ok: bool = False, directory: bool = True) -> None:
    """Refuse at once, with one line naming it, an input path that does not exist (`hub_ok`: unless it may be a
    Hub id, see `looks_local`), or that is not a directory (`directory`). Run before anything is imported or
    looked up, so a typo costs neither the import of torch nor a minute of Hub retries."""
    path = Path(os.fspath(name)).expanduser()
    if not path.exists():
        if hub_ok and not looks_local(name):
            return
        hint = ", and not a Hub id owner/name" if hub_ok else ""
        raise FileNotFoundError(f"{what} {os.fspath(name)} does not exist (no such "
                                f"{'folder' if directory else 'file or folder'}{hint})")
    if directory and not path.is_dir():
        raise NotADirectoryError(f"{what} {os.fspath(name)} is a file, not a folder")


def read_model_type(folder) -> str | None:
    """The `model_type` in `folder/config.json` (read as JSON, without transformers); ValueError if it is not JSON."""
    path = Path(folder, "config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{path} is not a valid config.json ({err}).") from err


def conversion_advice(path, model_type) -> str:
    """What to do with a checkpoint that is not NAtS-L: convert it when natsl-convert supports its family
    (families.py), else say that it cannot be and which families can."""
    if model_type in FAMILIES:
        return f"convert it first (natsl-convert {path} OUT)"
    return (f"its architecture ({model_type!r}) is not one natsl-convert supports ({', '.join(sorted(FAMILIES))}), "
            "so it cannot be converted")


__all__ = ["TOKENIZER_FILES", "ConversionError", "OneLineArgumentParser", "Source", "check_input_path", "conversion_advice", "looks_local",
           "model_source", "open_source", "read_model_type"]
