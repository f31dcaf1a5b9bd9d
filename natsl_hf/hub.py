"""Share NAtS-L checkpoints: a rendered model card, a hub-ready folder, and the upload.

- `render_model_card` fills `model_cards/natsl_model_card.md` (package data
  `natsl_hf.model_cards`, a `string.Template`: no templating dependency) with YAML metadata
  built by huggingface_hub's `ModelCardData`, the model's NAtS-L settings, and the numbers
  in `metrics`. A number that is not in `metrics` is printed as the literal "not measured";
  nothing is estimated or invented.
- `save_for_hub` writes what a hub repository needs: safetensors weights, config.json with
  `auto_map`, the remote-code modules (all three by `NatslForCausalLM.save_pretrained`), the
  tokenizer and README.md.
- `push_to_hub` uploads such a folder with `HfApi.create_repo` + `upload_folder` (token from
  the argument, `HF_TOKEN` or the `hf auth login` store); `dry_run=True` lists and uploads
  nothing. Failures are re-raised as RuntimeError naming the endpoint and the fix.
- CLI: `natsl-hub MODEL_DIR --repo-id ID [--out DIR] [--dry-run] [--overwrite] [--metrics JSON ...]`.
  The folder is written to `--out`; without it a dry run writes `<MODEL_DIR>-hub` beside the
  checkpoint (kept, so it can be inspected) and an upload stages in a temporary folder removed
  afterwards. An existing non-empty output folder is refused unless `--overwrite`, which replaces
  it only when an earlier natsl-hub run wrote it (its `.natsl-hub` marker), never a checkpoint.

Metrics schema (all optional; several JSON files are merged left to right):
    softmax_fraction        float, realised over all NAtS-L layers
    layer_softmax_fraction  list[float] in `config.natsl_layers` order, or {layer: float}
    kv_fraction             float, kept KV bytes / full-cache KV bytes (NatslCache.memory_report()),
                            or kv_bytes + full_kv_bytes (both, full > 0) to derive it; with neither
                            the card says "not measured" (a lone byte count goes to "Other measurements")
    measured_on             str, what the numbers above were measured on
    training                str, the recovery training done (stage, tokens, ...)
    quality                 {name: number or str}, e.g. {"wikitext2 ppl": 12.3}
    quality_command         str, the command that measured `quality` (shown under its table)
    speed                   {name: number or str}, e.g. {"decode tok/s (H100, bs 1)": 151.0}
    speed_measured_on       str, device / dtype / setup of the `speed` numbers (shown under its table)
    speed_command           str, the command that measured `speed` (shown under its table)
Any other key (nested dicts flattened to dotted names) goes to an "Other measurements" table.
A NaN softmax fraction (no routable chunk seen) reads "n/a (no routable chunk was measured)".
A report written by bench/eval_quality.py is recognised and mapped onto this schema
(`metrics_from_quality_report`; `--label` picks the model when it evaluated several).
A report written by bench/decode_bench.py is mapped onto `speed` (`metrics_from_decode_report`)
only when the model shape it was run on (hidden size, layers, heads, KV heads, head dim, chunk
size; vocab / MLP size / NAtS-L layers when recorded) equals the checkpoint's; otherwise it is
refused with a ValueError: rerun `bench/decode_bench.py --model MODEL_DIR` for this checkpoint.
`save_for_hub` stores the metrics it was given in `natsl_metrics.json` beside the card, and
`natsl-hub` reads that file from MODEL_DIR first (then `--metrics` files), so re-publishing a
folder keeps its measured numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from string import Template

NOT_MEASURED = "not measured"
NO_ROUTABLE = "n/a (no routable chunk was measured)"  # how a NaN softmax fraction reads
METRICS_FILE = "natsl_metrics.json"  # the measured numbers behind a card, kept beside it
HUB_MARKER = ".natsl-hub"  # marks a folder natsl-hub wrote (never uploaded: dot files are skipped)
CARD_TEMPLATE = "natsl_model_card.md"
BASE_TAGS = ["natsl", "hybrid-attention", "gated-deltanet", "linear-attention", "text-generation"]
_KNOWN_METRICS = (
    "softmax_fraction",
    "layer_softmax_fraction",
    "kv_fraction",
    "kv_bytes",
    "full_kv_bytes",
    "measured_on",
    "training",
    "quality",
    "speed",
    "quality_command",
    "speed_measured_on",
    "speed_command",
)


# --------------------------------------------------------------------------- card
def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return NO_ROUTABLE
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _pct(value) -> str:
    return f"{100.0 * value:.1f}%"


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def _softmax_fraction_text(fraction) -> str:
    """The card's overall softmax fraction: value and percentage, or why there is none."""
    if fraction is None:
        return NOT_MEASURED
    fraction = float(fraction)
    if math.isnan(fraction):
        return NO_ROUTABLE  # no percentage of nothing
    return f"{_fmt(fraction)} ({_pct(fraction)} of routable chunks)"


def _kv_cells(metrics: dict) -> tuple[str, str, set[str]]:
    """(kept/full cell, saving cell, byte keys consumed) from kv_fraction or kv_bytes + full_kv_bytes.

    The fraction is only taken as given or derived from both byte counts (full > 0); anything less
    reads "not measured", and a lone byte count is left for "Other measurements".
    """
    kv, full = metrics.get("kv_bytes"), metrics.get("full_kv_bytes")
    have_bytes = kv is not None and full is not None and full > 0
    fraction = metrics.get("kv_fraction")
    if fraction is None and have_bytes:
        fraction = kv / full
    if fraction is None or not math.isfinite(float(fraction)):
        return NOT_MEASURED, NOT_MEASURED, set()
    kept = _fmt(float(fraction)) + (f" ({int(kv):,} / {int(full):,} bytes)" if have_bytes else "")
    return kept, _pct(1.0 - float(fraction)), ({"kv_bytes", "full_kv_bytes"} if have_bytes else set())


def _layers_text(layers: list[int], num_layers: int) -> str:
    if not layers:
        return f"none (0 of {num_layers})"
    runs, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return f"{', '.join(runs)} ({len(layers)} of {num_layers})"


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> str:
    if not rows:
        return NOT_MEASURED
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {_fmt(k)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _flatten(prefix: str, value, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)) and (len(value) > 16 or any(isinstance(v, (dict, list)) for v in value)):
        out.append((prefix, f"{len(value)} entries (see {METRICS_FILE})"))
    else:
        out.append((prefix, _fmt(value) if not isinstance(value, (list, tuple)) else ", ".join(map(_fmt, value))))


def _card_metadata(config, base_model, license, tags) -> str:
    from huggingface_hub import ModelCardData

    all_tags = list(dict.fromkeys(BASE_TAGS + ([config.source_model_type] if config.source_model_type else []) + list(tags or [])))
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model,
        license=license,
        tags=all_tags,
    )
    return data.to_yaml()


def render_model_card(
    model_or_config,
    *,
    base_model: str | None = None,
    license: str | None = None,
    conversion_command: str | None = None,
    metrics: dict | None = None,
    repo_id: str | None = None,
    tags: list[str] | None = None,
) -> str:
    """The README.md (model card) of a NAtS-L checkpoint.

    model_or_config: a NatslForCausalLM (or any model with a NatslConfig `.config`) or a NatslConfig.
    base_model: hub id of the source model (YAML `base_model`, and the card's "converted from").
    license: the source's license id (e.g. "apache-2.0"); omitted from the metadata when unknown.
    conversion_command: the command that produced the checkpoint, shown verbatim.
    metrics: measured numbers (schema in the module docstring); absent ones read "not measured".
    repo_id: the id used in the loading snippet (defaults to a placeholder path).
    """
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "model_type", None) != "natsl":
        raise TypeError(f"render_model_card needs a NAtS-L model or NatslConfig, got {type(model_or_config).__name__}.")
    metrics = dict(metrics or {})
    source = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "its source checkpoint"
    source += f" (`{config.source_model_type}`)" if config.source_model_type else ""

    kv_kept, kv_saving, kv_used = _kv_cells(metrics)
    layer_fracs = metrics.get("layer_softmax_fraction")
    if isinstance(layer_fracs, dict):
        layer_rows = [(str(k), _fmt(float(v))) for k, v in layer_fracs.items()]
    elif layer_fracs is not None:
        if len(layer_fracs) != len(config.natsl_layers):
            raise ValueError(
                f"metrics['layer_softmax_fraction'] has {len(layer_fracs)} values but the model has "
                f"{len(config.natsl_layers)} NAtS-L layers; give one per layer in natsl_layers order or a {{layer: value}} dict."
            )
        layer_rows = [(str(layer), _fmt(float(v))) for layer, v in zip(config.natsl_layers, layer_fracs)]
    else:
        layer_rows = []

    def named_table(key):
        value = metrics.get(key)
        if not value:
            return NOT_MEASURED
        rows: list[tuple[str, str]] = []
        _flatten("", value, rows)
        return _table(rows, ("metric", "value"))

    other: list[tuple[str, str]] = []
    for key, value in metrics.items():
        if key not in _KNOWN_METRICS or (key in ("kv_bytes", "full_kv_bytes") and key not in kv_used):
            _flatten(key, value, other)
    speed_notes = ""
    if metrics.get("speed"):
        if metrics.get("speed_measured_on"):
            speed_notes += f"\n\nMeasured on: {_fmt(metrics['speed_measured_on'])}"
        if metrics.get("speed_command"):
            speed_notes += f"\n\nMeasured with:\n\n```bash\n{metrics['speed_command']}\n```"
    other_section = f"\n## Other measurements\n\n{_table(other, ('metric', 'value'))}\n" if other else ""

    training = metrics.get("training")
    status = (
        f"**Recovery training:** {training}."
        if training
        else "**Recovery training:** not recorded. A freshly converted model starts with its router biased to "
        "softmax and the GDN output weight at 0, so it computes (nearly) what its source computes and keeps "
        "(nearly) all KV until the router and GDN parameters are trained (natsl_hf.conversion.distill)."
    )
    if conversion_command:
        conversion = f"```bash\n{conversion_command}\n```"
    else:
        conversion = "Conversion command: not recorded."

    template = Template(resources.files("natsl_hf.model_cards").joinpath(CARD_TEMPLATE).read_text(encoding="utf-8"))
    title = repo_id.split("/")[-1] if repo_id else (f"{base_model.split('/')[-1]}-NAtS-L" if base_model else "NAtS-L model")
    return template.substitute(
        metadata=_card_metadata(config, base_model, license, tags),
        title=title,
        source=source,
        status=status,
        source_model_type=config.source_model_type or "not recorded",
        natsl_layers=_layers_text(list(config.natsl_layers), config.num_hidden_layers),
        chunk_size=config.chunk_size,
        num_sink_chunks=config.num_sink_chunks,
        softmax_budget=_fmt(float(config.softmax_budget)),
        router_temperature=_fmt(float(config.router_temperature)),
        router_init_bias=_fmt(float(config.router_init_bias)),
        gdn_conv_size=config.gdn_conv_size,
        route_override=config.route_override or "none (learned routing)",
        shape=f"{config.num_hidden_layers} / {config.num_attention_heads} / {config.num_key_value_heads} / {config.head_dim}",
        softmax_fraction=_softmax_fraction_text(metrics.get("softmax_fraction")),
        kv_fraction=kv_kept,
        kv_saving=kv_saving,
        measured_on=_fmt(metrics["measured_on"]) if metrics.get("measured_on") else NOT_MEASURED,
        layer_table=_table(layer_rows, ("layer", "softmax fraction")),
        quality_table=named_table("quality") + (
            f"\n\nEvaluated with:\n\n```bash\n{metrics['quality_command']}\n```" if metrics.get("quality_command") else ""
        ),
        speed_table=named_table("speed") + speed_notes,
        other_section=other_section,
        repo_id=repo_id or "path/to/this-checkpoint",
        conversion=conversion,
    )


def is_quality_report(data) -> bool:
    """Whether `data` is a report written by bench/eval_quality.py (summary per model label + results)."""
    return isinstance(data, dict) and isinstance(data.get("summary"), dict) and isinstance(data.get("results"), dict)


def metrics_from_quality_report(report: dict, label: str | None = None) -> dict:
    """Card metrics from a bench/eval_quality.py report, for the model evaluated under `label`.

    The report's rows are copied, never recomputed: perplexity (and the source's, and the relative
    gap), top-1 agreement with the source, greedy prefix match, retrieval accuracy per context
    length (model and source), the realised softmax fraction on the perplexity blocks (overall and
    per NAtS-L layer), and the kept / full KV bytes after prefilling the longest retrieval context.
    `label` may be omitted when the report evaluated exactly one model besides the source.
    """
    summary = report["summary"]
    labels = [k for k in summary if k != "source"]
    if label is None:
        if len(labels) != 1:
            raise ValueError(f"The quality report evaluates {labels}; pick one with --label (label=...).")
        label = labels[0]
    if label not in summary:
        raise ValueError(f"The quality report has no model labelled {label!r}; it has {labels}.")
    row, src = summary[label], summary.get("source", {})
    quality: dict = {}
    if "perplexity" in row:
        quality["perplexity"] = row["perplexity"]
    if "perplexity" in src:
        quality["source perplexity"] = src["perplexity"]
    if "ppl_gap_vs_source" in row:
        quality["perplexity gap vs source"] = f"{100.0 * row['ppl_gap_vs_source']:+.2f}%"
    if "top1_agreement" in row:
        quality["top-1 agreement with source"] = row["top1_agreement"]
    if "gen_prefix_match" in row:
        quality["greedy prefix match with source"] = row["gen_prefix_match"]
    for key, value in row.items():
        if key.startswith("retrieval_") and not key.startswith(("softmax_fraction_", "kv_fraction_")):
            length = key[len("retrieval_"):]
            quality[f"key-value retrieval accuracy @{length} tokens"] = value
            if key in src:
                quality[f"source key-value retrieval accuracy @{length} tokens"] = src[key]
    settings = report.get("settings") or {}
    where = []
    if "seq_len" in settings and "ppl_blocks" in settings:
        where.append(f"{settings['ppl_blocks']} blocks of {settings['seq_len']} tokens"
                     + (f" of {settings['text']}" if settings.get("text") else ""))
    where += [str(report[k]) for k in ("device", "dtype") if report.get(k)]
    metrics = {"quality": quality}
    if report.get("command"):
        metrics["quality_command"] = report["command"]
    if row.get("softmax_fraction") is not None:
        metrics["softmax_fraction"] = row["softmax_fraction"]
        metrics["measured_on"] = "held-out perplexity blocks (bench/eval_quality.py): " + ", ".join(where)
        layers = (((report.get("results") or {}).get(label) or {}).get("perplexity") or {}).get("layer_softmax_fraction")
        if layers is not None:
            metrics["layer_softmax_fraction"] = layers
    kv = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in row.items() if k.startswith("kv_fraction_retrieval_"))
    if kv:  # the longest retrieval context's prefill: kept / full KV bytes
        length, metrics["kv_fraction"] = kv[-1]
        metrics["measured_on"] = (metrics.get("measured_on", "") + f"; KV cache: after prefilling the {length}-token "
                                  f"retrieval contexts (softmax fraction there "
                                  f"{_fmt(float(row.get(f'softmax_fraction_retrieval_{length}', float('nan'))))})").lstrip("; ")
    return metrics


# the model shape a decode benchmark must share with the checkpoint before its numbers describe it
DECODE_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "chunk_size")
DECODE_OPTIONAL_KEYS = ("intermediate_size", "vocab_size", "natsl_layers", "num_sink_chunks")  # checked if recorded


def is_decode_report(data) -> bool:
    """Whether `data` is a report written by bench/decode_bench.py (model shape + rows of step times)."""
    if not (isinstance(data, dict) and isinstance(data.get("model"), dict) and isinstance(data.get("rows"), list)):
        return False
    return bool(data["rows"]) and all(isinstance(r, dict) and "step_ms" in r and "context" in r for r in data["rows"])


def decode_report_mismatch(report: dict, config) -> list[str]:
    """The shape fields on which the decode report's model differs from `config` (empty: it matches).

    The six DECODE_SHAPE_KEYS must be recorded and equal; DECODE_OPTIONAL_KEYS are compared when the
    report records them (reports older than `decode_bench.py --model` do not).
    """
    shape = report["model"]
    wrong = []
    for key in DECODE_SHAPE_KEYS + DECODE_OPTIONAL_KEYS:
        ours = getattr(config, key, None)
        if key not in shape:
            if key in DECODE_SHAPE_KEYS:
                wrong.append(f"{key}: not recorded in the report vs {ours} in the checkpoint")
            continue
        theirs = shape[key]
        if key == "natsl_layers":
            theirs, ours = sorted(theirs), sorted(ours)
        if theirs != ours:
            wrong.append(f"{key}: {theirs} in the report vs {ours} in the checkpoint")
    return wrong


def metrics_from_decode_report(report: dict, config, source: str = "the decode report",
                               model_dir: str | None = None) -> dict:
    """Card `speed` metrics from a bench/decode_bench.py report, if it was run on `config`'s shape.

    Per context length and model row: the decode step time (ms, batch 1) and the cache bytes
    (NAtS-L rows split into kept KV + GDN/conv state), each named with the device and the row's
    model ("softmax (DynamicCache + SDPA)" baseline or "NAtS-L p=<synthetic softmax fraction>").
    Copied, never recomputed. Raises ValueError naming every mismatching shape field and the fix
    when the benchmark ran on another model shape: its numbers would not describe this checkpoint.
    model_dir: the checkpoint's directory, named in that error's rerun command.
    """
    wrong = decode_report_mismatch(report, config)
    if wrong:
        model_dir = model_dir or getattr(config, "_name_or_path", "") or "MODEL_DIR"
        raise ValueError(
            f"{source} is a bench/decode_bench.py report for another model shape ({'; '.join(wrong)}), so its "
            f"speed numbers do not describe this checkpoint. Rerun the benchmark on this checkpoint's config: "
            f"`python bench/decode_bench.py --model {model_dir} --out bench/results/decode_<device>.json` on the "
            f"GPU to quote, and pass that JSON with --metrics."
        )
    device = report.get("device") or "unknown device"
    speed: dict = {}
    for row in report["rows"]:
        where = f"@ {row['context']} ctx ({device}, {row.get('model', 'unnamed')})"
        speed[f"decode step ms {where}"] = float(row["step_ms"])
        if row.get("cache_bytes") is not None:
            cache = int(row["cache_bytes"])
            text = f"{_mib(cache)} ({cache:,} bytes)"
            if row.get("kv_bytes") is not None and row.get("state_bytes") is not None:
                text += f": KV {_mib(int(row['kv_bytes']))} + GDN/conv state {_mib(int(row['state_bytes']))}"
            speed[f"decode cache {where}"] = text
    setup = ", ".join(str(report[k]) for k in ("device", "dtype") if report.get(k))
    measured_on = (
        f"{setup}: {report.get('benchmark', 'decode step, batch 1')} (bench/decode_bench.py). Random weights of this "
        "checkpoint's shape; caches filled synthetically, NAtS-L rows at the softmax fraction p they name "
        "(not this checkpoint's learned routing)"
    )
    metrics = {"speed": speed, "speed_measured_on": measured_on}
    if report.get("command"):
        metrics["speed_command"] = report["command"]
    return metrics


def load_metrics(paths, label: str | None = None, config=None, model_dir: str | None = None) -> dict:
    """Merge metrics JSON files (later files win on equal top-level keys; quality/speed merge, and
    the speed provenance of several speed reports is joined).

    A file written by bench/eval_quality.py is recognised and mapped with
    `metrics_from_quality_report(report, label)`; one written by bench/decode_bench.py with
    `metrics_from_decode_report(report, config)`, which needs the checkpoint's `config` and refuses a
    report run on another model shape (`model_dir` only names the checkpoint in that error). Any
    other file must follow the module's schema.
    """
    merged: dict = {}
    for path in paths or []:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"Cannot read metrics file {path}: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"Metrics file {path} must hold a JSON object, got {type(data).__name__}.")
        if is_quality_report(data):
            data = metrics_from_quality_report(data, label)
        elif is_decode_report(data):
            if config is None:
                raise ValueError(f"{path} is a bench/decode_bench.py report; pass the checkpoint's config "
                                 "(load_metrics(..., config=...)) so its model shape can be checked.")
            data = metrics_from_decode_report(data, config, source=str(path), model_dir=model_dir)
        for key, value in data.items():
            if key in ("quality", "speed") and isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            elif key in ("speed_command", "speed_measured_on") and merged.get(key) and merged[key] != value:
                sep = "\n" if key == "speed_command" else "; "  # one command per line in the card's bash block
                merged[key] = f"{merged[key]}{sep}{value}"
            else:
                merged[key] = value
    return merged


# --------------------------------------------------------------------------- folder + upload
def save_for_hub(model, out_dir, tokenizer=None, **card_kwargs) -> Path:
    """Write a hub-ready folder: safetensors, config.json (auto_map), remote-code modules,
    tokenizer (when given) and README.md rendered by `render_model_card(model, **card_kwargs)`.
    Returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    card = render_model_card(model, **card_kwargs)  # render first: a bad metrics dict writes nothing
    model.save_pretrained(out, safe_serialization=True)
    if getattr(model, "generation_config", None) is not None and not (out / "generation_config.json").exists():
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "README.md").write_text(card, encoding="utf-8")
    if card_kwargs.get("metrics"):
        (out / METRICS_FILE).write_text(json.dumps(card_kwargs["metrics"], indent=2) + "\n", encoding="utf-8")
    return out


def _upload_files(folder: Path) -> list[tuple[str, int]]:
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            files.append((rel.as_posix(), path.stat().st_size))
    return files


def push_to_hub(
    folder,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    endpoint: str | None = None,
    commit_message: str = "Upload NAtS-L checkpoint (natsl-hf)",
) -> list[str] | str:
    """Upload `folder` to the model repo `repo_id` (created if missing).

    token: None uses huggingface_hub's usual sources (HF_TOKEN, then the `hf auth login` store).
    dry_run: print the files that would be uploaded and return their names; contacts nothing.
    endpoint: a hub endpoint other than huggingface.co (default: HF_ENDPOINT or huggingface.co).
    Returns the commit URL of the upload (or the file list for a dry run). Raises RuntimeError
    naming the endpoint and the fix when the hub cannot be reached or refuses the token.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; write the folder with save_for_hub() or natsl-hub --out first.")
    files = _upload_files(folder)
    if dry_run:
        total = sum(size for _, size in files)
        print(f"[dry run] would upload {len(files)} files ({total / 1e6:.2f} MB) from {folder} to {repo_id} "
              f"({'private' if private else 'public'}):")
        for name, size in files:
            print(f"  {name}  ({size:,} bytes)")
        return [name for name, _ in files]

    from huggingface_hub import HfApi, constants

    target = endpoint or constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=commit_message,
            ignore_patterns=[".*", "__pycache__/*"],
        )
    except Exception as err:  # network, auth and hub errors all get the same actionable wrapper
        raise RuntimeError(
            f"Uploading {folder} to {repo_id!r} on {target} failed: {type(err).__name__}: {err}. "
            "Check that the endpoint is reachable (--endpoint / HF_ENDPOINT), that HF_HUB_OFFLINE is not set, and "
            "that a token with write access is available (--token, HF_TOKEN, or `hf auth login`)."
        ) from err
    return str(getattr(info, "commit_url", info))


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="natsl-hub",
        description="Write a hub-ready folder for a NAtS-L checkpoint (weights, auto_map config, remote code, "
        "tokenizer, model card) and upload it.",
    )
    p.add_argument("model_dir", help="a NAtS-L checkpoint directory (save_pretrained / natsl-convert output)")
    p.add_argument("--repo-id", required=True, help="hub repository, e.g. user/SmolLM2-135M-NAtS-L")
    p.add_argument("--out", help="write the hub folder here and keep it (default: with --dry-run, MODEL_DIR-hub beside "
                   "the checkpoint; otherwise a temporary folder removed after the upload)")
    p.add_argument("--dry-run", action="store_true",
                   help="write the hub folder (to --out or MODEL_DIR-hub), list the files that would be uploaded; "
                   "upload nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder, only one an earlier natsl-hub run wrote (marked "
                   f"{HUB_MARKER}); without it a non-empty output folder is refused")
    p.add_argument("--metrics", nargs="+", default=[], metavar="JSON",
                   help=f"metrics JSON files for the card, merged after MODEL_DIR/{METRICS_FILE} if present; "
                   "bench/eval_quality.py and bench/decode_bench.py reports are recognised (a decode report must "
                   "have been run on this checkpoint's shape: bench/decode_bench.py --model MODEL_DIR)")
    p.add_argument("--label", help="model label to take from a bench/eval_quality.py report (if it has several)")
    p.add_argument("--base-model", help="hub id of the source model (card metadata)")
    p.add_argument("--license", help="license id of the source model, e.g. apache-2.0")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", help="hub token (default: HF_TOKEN or the `hf auth login` store)")
    p.add_argument("--endpoint", help="hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    return p


def _existing_card_metadata(model_dir: Path) -> dict:
    readme = model_dir / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme).data.to_dict()
    except Exception:
        return {}
    base = data.get("base_model")
    return {"base_model": base[0] if isinstance(base, list) and base else base, "license": data.get("license")}


def card_provenance(model_dir) -> dict:
    """What an existing checkpoint's README.md and natsl_metrics.json say about where the model comes
    from: base_model, license, conversion_command, training (each None when not recorded). Used to
    carry them to the card of a checkpoint trained from it (natsl-distill) or published (natsl-hub)."""
    model_dir = Path(model_dir)
    out = {"base_model": None, "license": None, "training": None, **_existing_card_metadata(model_dir)}
    out["conversion_command"] = _conversion_command_from_card(model_dir)
    metrics = model_dir / METRICS_FILE
    if metrics.is_file():
        try:
            out["training"] = json.loads(metrics.read_text(encoding="utf-8")).get("training")
        except (json.JSONDecodeError, AttributeError):
            pass
    return out


def _check_out(out: Path, model_dir: Path, overwrite: bool) -> str | None:
    """Why `out` must not receive the hub folder (None: it may; --overwrite then replaces it)."""
    target, model = out.resolve(), model_dir.resolve()
    if target == model or target in model.parents:
        return f"the output folder {out} is (or contains) the checkpoint {model_dir}; pick another --out."
    if target.exists() and not target.is_dir():
        return f"the output path {out} exists and is not a folder; pick another --out."
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            return (f"the output folder {out} already exists and is not empty; pass --overwrite to replace it, "
                    "or pick another --out.")
        if not (target / HUB_MARKER).is_file():
            return (f"--overwrite only replaces a folder an earlier natsl-hub run wrote (it holds {HUB_MARKER}), and "
                    f"{out} is not one (a checkpoint, perhaps); remove it yourself or pick another --out.")
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        print(f"natsl-hub: error: {model_dir} has no config.json (expected a NAtS-L checkpoint directory).", file=sys.stderr)
        return 2
    import natsl_hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoTokenizer

    from natsl_hf import NatslConfig, NatslForCausalLM

    staging = None
    if args.out:
        out = Path(args.out)
    elif args.dry_run:  # a dry run exists to be inspected: keep the folder beside the checkpoint
        out = model_dir.resolve().parent / f"{model_dir.resolve().name}-hub"
    else:
        out = None
    try:
        config = NatslConfig.from_pretrained(model_dir)
        own = [model_dir / METRICS_FILE] if (model_dir / METRICS_FILE).is_file() else []
        metrics = load_metrics(own + list(args.metrics), label=args.label, config=config, model_dir=str(model_dir))
    except ValueError as err:
        print(f"natsl-hub: error: {err}", file=sys.stderr)
        return 2
    problem = None if out is None else _check_out(out, model_dir, args.overwrite)
    if problem:
        print(f"natsl-hub: error: {problem}", file=sys.stderr)
        return 2
    known = card_provenance(model_dir)
    model = NatslForCausalLM.from_pretrained(model_dir)
    tokenizer = None
    if any((model_dir / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    card_kwargs = dict(
        base_model=args.base_model or known.get("base_model"),
        license=args.license or known.get("license"),
        metrics=metrics,
        repo_id=args.repo_id,
    )
    card_kwargs["conversion_command"] = known["conversion_command"]
    if out is None:
        out = Path(staging := tempfile.mkdtemp(prefix="natsl-hub-"))
    try:
        render_model_card(model, **card_kwargs)  # a card that cannot render leaves an existing folder alone
        if out.is_dir() and any(out.iterdir()):  # checked by _check_out: an earlier natsl-hub folder, --overwrite given
            shutil.rmtree(out)  # its stale files (an old tokenizer, metrics) must not ride along to the hub
        save_for_hub(model, out, tokenizer=tokenizer, **card_kwargs)
        (out / HUB_MARKER).write_text("written by natsl-hub; --overwrite may replace this folder\n", encoding="utf-8")
        result = push_to_hub(
            out, args.repo_id, token=args.token, private=args.private, dry_run=args.dry_run, endpoint=args.endpoint
        )
        if not args.dry_run:
            print(f"uploaded {out} to {args.repo_id}: {result}")
        else:
            print(f"hub folder written to {out} (nothing uploaded; run again without --dry-run to upload)")
    except (RuntimeError, ValueError) as err:
        print(f"natsl-hub: error: {err}", file=sys.stderr)
        return 1
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return 0


def _conversion_command_from_card(model_dir: Path) -> str | None:
    """The conversion command recorded in an existing README.md (natsl-convert writes one), if any."""
    readme = model_dir / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8")
    marker = "## Conversion"
    if marker not in text:
        return None
    section = text.split(marker, 1)[1]
    if "```bash\n" not in section:
        return None
    return section.split("```bash\n", 1)[1].split("\n```", 1)[0].strip() or None


if __name__ == "__main__":
    sys.exit(main())
