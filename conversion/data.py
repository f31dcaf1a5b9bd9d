"""Offline training data for NAtS-L recovery: local text or a saved `datasets` dataset, packed.

`load_packed_dataset(path, tokenizer, seq_len)` accepts

- a text file (``.txt``, ``.md``, ``.rst``, ... any UTF-8 text): one document per file;
- a directory of text files (searched recursively for ``*.txt``, ``*.md``, ``*.rst``);
- a directory written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` with a
  ``text`` column (or an ``input_ids`` column, already tokenised); for a `DatasetDict` the
  ``train`` split is used unless `split` says otherwise;
- token-id shards written by bench/build_recovery_data.py: its output directory (``manifest.json``
  and ``<split>-NNNNN.npy.xz``; `split` is ``train`` or ``heldout``), or one shard file alone. A
  shard is a uint16 ``.npy`` inside ``.xz`` holding documents each closed by the EOS token; each is
  checked against the manifest's sha256, the tokenizer against the manifest's EOS id and vocabulary
  size, and the shards of the split that are present are read (a GPU run may carry a few; the
  missing ones are named in a warning). See bench/RECOVERY_DATA.md.

Every document is tokenised, an EOS token is appended, all documents are concatenated and cut
into blocks of exactly `seq_len` tokens (the remainder is dropped), the usual
`run_clm.py` "group_texts" packing. Each example has ``input_ids``, ``attention_mask`` and
``labels`` (= ``input_ids``; the model shifts them).

`packing` says whether a block is one sequence or keeps its documents apart:

- ``"blocks"`` (default): a block is one sequence; attention crosses document boundaries.
- ``"documents"``: the same blocks, plus ``position_ids`` that restart at 0 at every document start
  and at the block start (a document cut by the block boundary continues as a fresh piece; RoPE
  only sees relative positions, so its attention is unchanged), the layout of transformers'
  `DataCollatorWithFlattening`. The model then keeps the documents apart (no attention and no
  GDN state across a boundary, chunks restart, see modeling/varlen.py), and ``labels`` are -100 at
  every position 0, so no document's first token is predicted from the previous document.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import warnings
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
SHARD_SUFFIX = ".npy.xz"
SHARD_MANIFEST = "manifest.json"
SHARD_FORMAT = "natsl-recovery-data/"


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _read_text_files(path: Path) -> list[str]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(
                f"No text files ({', '.join(TEXT_SUFFIXES)}) under {path}. Pass a text file, a directory of "
                "text files, or a directory written by `datasets.Dataset.save_to_disk`."
            )
    texts = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            texts.append(text)
    return texts


def _datasets(*names: str):
    """Names from the `datasets` package (the `train` extra), with an error that says how to get it."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("natsl-distill keeps its training blocks in a `datasets.Dataset`: "
                          "pip install 'natsl-hf[train]' (or pip install datasets).") from err
    return tuple(getattr(datasets, n) for n in names)


def read_shard(path: str | os.PathLike):
    """The tokens of one shard of bench/build_recovery_data.py: a 1-D uint16 numpy array."""
    import numpy as np

    with lzma.open(path) as fh:
        return np.load(io.BytesIO(fh.read()), allow_pickle=False)


def _shard_manifest(folder: Path) -> dict | None:
    path = folder / SHARD_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return manifest if isinstance(manifest, dict) and str(manifest.get("format", "")).startswith(SHARD_FORMAT) else None


def _is_shard_data(path: Path) -> bool:
    return path.name.endswith(SHARD_SUFFIX) if path.is_file() else _shard_manifest(path) is not None


def load_token_shards(path: str | os.PathLike, split: str = "train", tokenizer=None) -> list:
    """The documents (uint16 numpy arrays, each closed by the EOS token) of the shards at `path`: a directory
    written by bench/build_recovery_data.py (the shards of `split` listed in its manifest that are there) or
    one shard file (its manifest is used when it lies beside it; otherwise `tokenizer` gives the EOS id)."""
    import numpy as np

    path = Path(path)
    folder = path.parent if path.is_file() else path
    manifest = _shard_manifest(folder)
    if path.is_dir() and manifest is None:
        raise ValueError(f"{path} has no {SHARD_MANIFEST} of bench/build_recovery_data.py: pass its output directory "
                         "or one shard file.")
    listed = {}
    if manifest is not None:
        splits = manifest.get("splits", {})
        if path.is_dir() and split not in splits:
            raise ValueError(f"The shards at {path} have splits {sorted(splits)}, not {split!r}; pass split=...")
        listed = {s["file"]: s for entries in splits.values() for s in entries.get("shards", [])}
    eos = getattr(tokenizer, "eos_token_id", None)
    if manifest is not None:
        made = manifest.get("tokenizer", {})
        if eos is not None and made.get("eos_token_id") not in (None, eos):
            raise ValueError(f"The shards at {folder} were tokenised with EOS id {made.get('eos_token_id')} "
                             f"({made.get('base_model') or made.get('file') or 'see its manifest'}), this tokenizer's "
                             f"is {eos}: pass the tokenizer they were made with, or rebuild them with this one.")
        size = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
        if size is not None and made.get("vocab_size") not in (None, size):
            raise ValueError(f"The shards at {folder} hold ids of a {made.get('vocab_size')}-token vocabulary, this "
                             f"tokenizer has {size}: pass the tokenizer they were made with, or rebuild them.")
        eos = made.get("eos_token_id", eos)
    if eos is None:
        raise ValueError(f"{path} is a token shard without a manifest beside it: pass the tokenizer it was made with "
                         "(its EOS token separates the documents).")
    if path.is_file():
        files = [path]
    else:
        names = [s["file"] for s in splits[split]["shards"]]
        files = [folder / n for n in names if (folder / n).is_file()]
        if not files:
            raise FileNotFoundError(f"None of the {len(names)} {split} shards listed in {folder / SHARD_MANIFEST} is in "
                                    f"{folder}: copy them there, or rebuild with bench/build_recovery_data.py.")
        if len(files) < len(names):
            warnings.warn(f"{folder}: {len(files)} of the {len(names)} {split} shards are here; reading those "
                          f"(missing: {', '.join(n for n in names if not (folder / n).is_file())[:300]}).",
                          stacklevel=2)
    arrays = []
    for f in files:
        entry = listed.get(f.name)
        if entry is not None and hashlib.sha256(f.read_bytes()).hexdigest() != entry["sha256"]:
            raise ValueError(f"{f} does not match the sha256 in {folder / SHARD_MANIFEST}: copy it again or rebuild.")
        arrays.append(read_shard(f))
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.uint16)
    ends = np.flatnonzero(tokens == eos) + 1
    docs = np.split(tokens, ends)
    return docs if docs and len(docs[-1]) else docs[:-1]


def _shard_dataset(path: Path, split: str, tokenizer):
    """The documents of `load_token_shards` as a `datasets.Dataset` with an ``input_ids`` column (no Python lists)."""
    import numpy as np
    import pyarrow as pa

    (Dataset,) = _datasets("Dataset")
    from datasets.table import InMemoryTable

    docs = load_token_shards(path, split, tokenizer)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    values = np.concatenate(docs) if docs else np.zeros(0, np.uint16)
    column = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
    return Dataset(InMemoryTable(pa.table({"input_ids": column})))


def load_texts_or_ids(path: str | os.PathLike, split: str = "train", *, tokenizer=None):
    """Load the raw data at `path`: -> ("text", list[str]) or ("input_ids", datasets.Dataset).

    tokenizer: checked against the manifest of token shards (EOS id, vocabulary size); a lone shard
    without its manifest takes its EOS id from it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist: pass a text file, a directory of .txt files, "
                                "or a dataset saved with `save_to_disk`.")
    if _is_shard_data(path):
        return "input_ids", _shard_dataset(path, split, tokenizer)
    if not _is_saved_dataset(path):
        return "text", _read_text_files(path)
    DatasetDict, load_from_disk = _datasets("DatasetDict", "load_from_disk")
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise ValueError(f"Saved DatasetDict at {path} has splits {list(ds)}, not {split!r}; pass split=...")
        ds = ds[split]
    if "input_ids" in ds.column_names:
        return "input_ids", ds
    if "text" in ds.column_names:
        return "text", [t for t in ds["text"] if t and t.strip()]
    raise ValueError(
        f"Saved dataset at {path} has columns {ds.column_names}; NAtS-L distillation needs a 'text' column "
        "(raw text) or an 'input_ids' column (tokenised). Rename the column with `dataset.rename_column`."
    )


PACKINGS = ("blocks", "documents")
IGNORE_INDEX = -100  # labels the loss skips (transformers' convention)


def _stream(token_lists, eos_token_id: int | None) -> tuple[list[int], list[int]]:
    """Token lists concatenated with an EOS closing each document -> (tokens, index of each document's
    first token)."""
    stream: list[int] = []
    starts: list[int] = []
    for ids in token_lists:
        starts.append(len(stream))
        stream.extend(ids)
        if eos_token_id is not None and (not ids or ids[-1] != eos_token_id):
            stream.append(eos_token_id)
    return stream, starts


def pack(token_lists, seq_len: int, eos_token_id: int | None) -> list[list[int]]:
    """Concatenate token lists (EOS between documents) and cut into full blocks of `seq_len`."""
    stream, _ = _stream(token_lists, eos_token_id)
    n_blocks = len(stream) // seq_len
    return [stream[i * seq_len:(i + 1) * seq_len] for i in range(n_blocks)]


def pack_documents(token_lists, seq_len: int, eos_token_id: int | None):
    """`pack`'s blocks and, for each, position ids restarting at 0 at every document start in the
    block and at the block start -> (blocks, position_ids), two list[list[int]]."""
    stream, starts = _stream(token_lists, eos_token_id)
    n_blocks = len(stream) // seq_len
    is_start = bytearray(len(stream))
    for i in starts:
        if i < len(stream):
            is_start[i] = 1
    positions, p = [], 0
    for i in range(n_blocks * seq_len):
        p = 0 if is_start[i] or i % seq_len == 0 else p + 1
        positions.append(p)
    blocks = [stream[i * seq_len:(i + 1) * seq_len] for i in range(n_blocks)]
    return blocks, [positions[i * seq_len:(i + 1) * seq_len] for i in range(n_blocks)]


def load_packed_dataset(path, tokenizer, seq_len: int, split: str = "train", max_blocks: int | None = None,
                        packing: str = "blocks"):
    """Tokenise and pack the data at `path` into a `datasets.Dataset` of `seq_len`-token blocks.

    packing: "blocks" (columns input_ids, attention_mask, labels) or "documents" (also position_ids
    restarting at each document, labels -100 at each document's first token); see the module docstring.
    """
    (Dataset,) = _datasets("Dataset")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: need at least 2 tokens per block for next-token prediction.")
    if packing not in PACKINGS:
        raise ValueError(f"packing={packing!r} (--packing) is not one of {', '.join(PACKINGS)}.")
    kind, data = load_texts_or_ids(path, split, tokenizer=tokenizer)
    if kind == "text" and not any(text.strip() for text in data):
        raise ValueError(f"{path} holds no text (empty or whitespace only): pass a file or dataset with training text.")
    if kind == "text":
        token_lists = tokenizer(data, add_special_tokens=False)["input_ids"]
    else:
        token_lists = data["input_ids"]
    if packing == "documents":
        blocks, positions = pack_documents(token_lists, seq_len, tokenizer.eos_token_id)
    else:
        blocks, positions = pack(token_lists, seq_len, tokenizer.eos_token_id), None
    if not blocks:
        total = sum(len(t) for t in token_lists)
        raise ValueError(
            f"{path} holds {total} tokens, fewer than one block of --seq-len {seq_len}: add text or lower --seq-len."
        )
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    columns = {"input_ids": blocks, "attention_mask": [[1] * seq_len for _ in blocks]}
    if positions is None:
        columns["labels"] = [list(b) for b in blocks]
    else:
        positions = positions[: len(blocks)]
        columns["position_ids"] = positions
        columns["labels"] = [[IGNORE_INDEX if p == 0 else t for t, p in zip(b, ps)] for b, ps in zip(blocks, positions)]
    return Dataset.from_dict(columns)


__all__ = ["PACKINGS", "load_packed_dataset", "load_texts_or_ids", "load_token_shards", "pack", "pack_documents",
           "read_shard"]
