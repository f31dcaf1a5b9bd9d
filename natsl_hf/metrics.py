"""The measured numbers behind a NAtS-L model card: reading them from JSON files.

Metrics schema (all optional; several JSON files are merged left to right by `load_metrics`):
    softmax_fraction        float, realised over all NAtS-L layers
    layer_softmax_fraction  list[float] in `config.natsl_layers` order, or {layer: float}
    kv_fraction             float, kept KV bytes / full-cache KV bytes (NatslCache.memory_report()),
                            or kv_bytes + full_kv_bytes (both, full > 0) to derive it; with neither
                            the card says "not measured" (a lone byte count goes to "Other measurements")
    measured_on             str, what the numbers above were measured on
    training                str, the recovery training done (stage, tokens, ...)
    quality                 {name: number or str}, e.g. {"wikitext2 ppl": 12.3}
    quality_command         str, the command that measured `quality` (shown under its table)
    quality_measured_on     str, what `quality` was measured on (text, blocks, device; shown under its table)
    evaluations             list of {"quality": {...}, "quality_command": str, "quality_measured_on": str}:
                            further evaluations, each its own table (load_metrics puts a second file's
                            `quality` here when it was measured by another command, instead of mixing
                            two evaluations' rows, e.g. two perplexity gaps on different texts, in one table);
                            an entry may add "title" (its heading), "note" (a line under its table) and
                            "columns": [model names], its `quality` then {metric: {column: value}}, one column
                            per model (`side_by_side_evaluation` builds one from eval_quality reports)
    speed                   {name: number or str}, e.g. {"decode tok/s (H100, bs 1)": 151.0}
    speed_measured_on       str, device / dtype / setup of the `speed` numbers (shown under its table)
    speed_command           str, the command that measured `speed` (shown under its table)
Any other key (nested dicts flattened to dotted names) goes to an "Other measurements" table.

Two benchmark reports are recognised and mapped onto this schema: one written by bench/eval_quality.py
(`metrics_from_quality_report`; `label` picks the model when it evaluated several), and one written by
bench/decode_bench.py (`metrics_from_decode_report`, onto `speed`), the latter only when the model shape
it was run on (hidden size, layers, heads, KV heads, head dim, chunk size; vocab / MLP size / NAtS-L
layers when recorded) equals the checkpoint's; otherwise it is refused with a ValueError: rerun
`bench/decode_bench.py --model MODEL_DIR` for this checkpoint.

A checkpoint keeps the metrics of its card in `natsl_metrics.json` (METRICS_FILE) beside it, so
re-publishing it keeps its measured numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS_FILE = "natsl_metrics.json"  # the measured numbers behind a card, kept beside it
KNOWN_METRICS = (
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
    "quality_measured_on",
    "evaluations",
    "speed_measured_on",
    "speed_command",
)


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def is_quality_report(data) -> bool:
    """Whether `data` is a report written by bench/eval_quality.py (summary per model label + results)."""
    return isinstance(data, dict) and isinstance(data.get("summary"), dict) and isinstance(data.get("results"), dict)


# bench/eval_quality.py's lookup rows (summary key prefix) and their names on a card
LOOKUP_TASKS = (("retrieval_", "key-value retrieval"), ("needle_", "needle retrieval"),
                ("passkey_", "needle retrieval, untrained form"))


def metrics_from_quality_report(report: dict, label: str | None = None) -> dict:
    """Card metrics from a bench/eval_quality.py report, for the model evaluated under `label`.

    The report's rows are copied, never recomputed (`_summary_rows`): perplexity (and the source's, and the
    relative gap; the same on each prose text), top-1 agreement with the source, greedy prefix match, key-value
    and needle retrieval accuracy per context length (and the needle in a form no training data holds,
    `passkey_`), each with the softmax fraction, KV kept and looked-up chunk kept on its contexts, and short-answer
    accuracy (model and source, and the share of the source's correct answers the model keeps), the chat rows
    (the share of the source reply's passage words a reply keeps; replies taking no passage word), the
    realised softmax fraction on the perplexity blocks (overall and per NAtS-L layer), and the kept /
    full KV bytes after prefilling the longest retrieval context.
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
    row = summary[label]
    rows, src = _summary_rows(row), _summary_rows(summary.get("source", {}))
    quality: dict = {}
    for name, value in rows.items():  # each row, then the source's where it is not measured against the source
        quality[name] = value
        if name in src and not any(w in name for w in ("vs source", "with source")):
            quality[f"source {name}"] = src[name]
    metrics = {"quality": quality}
    if report.get("command"):
        metrics["quality_command"] = report["command"]
    where = _measured_where(report.get("settings") or {}, [report])
    if where:
        metrics["quality_measured_on"] = "bench/eval_quality.py: perplexity on " + where
    if row.get("softmax_fraction") is not None:
        metrics["softmax_fraction"] = row["softmax_fraction"]
        metrics["measured_on"] = "held-out perplexity blocks (bench/eval_quality.py): " + where
        layers = (((report.get("results") or {}).get(label) or {}).get("perplexity") or {}).get("layer_softmax_fraction")
        if layers is not None:
            metrics["layer_softmax_fraction"] = layers
    kv = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in row.items() if k.startswith("kv_fraction_retrieval_"))
    if kv:  # the longest retrieval context's prefill: kept / full KV bytes
        length, metrics["kv_fraction"] = kv[-1]
        there = row.get(f"softmax_fraction_retrieval_{length}")
        there = f"{there:.4g}" if there is not None and math.isfinite(there) else "not measured"
        metrics["measured_on"] = (metrics.get("measured_on", "") + f"; KV cache: after prefilling the {length}-token "
                                  f"retrieval contexts (softmax fraction there {there})").lstrip("; ")
    return metrics


# the settings of bench/eval_quality.py that name files, not the evaluation: they may differ between side-by-side reports
_PATH_SETTINGS = ("source", "out", "models", "model", "qa_file")


def _measured_where(settings: dict, reports: list[dict]) -> str:
    """Where eval_quality reports evaluated with `settings` measured perplexity: the blocks and their text, then each
    device and dtype once ("" if the reports say none of it)."""
    where = []
    if "seq_len" in settings and "ppl_blocks" in settings:
        where.append(f"{settings['ppl_blocks']} blocks of {settings['seq_len']} tokens"
                     + (f" of {settings['text']}" if settings.get("text") else ""))
    where += dict.fromkeys(str(r[k]) for r in reports for k in ("device", "dtype") if r.get(k))
    return ", ".join(where)


def _summary_rows(row: dict) -> dict:
    """One model's summary row of a bench/eval_quality.py report as {card metric name: value}: the one naming of those
    rows, for a single model's card (`metrics_from_quality_report`) and side by side (`side_by_side_evaluation`)."""
    rows: dict = {}
    for key, name in (("perplexity", "perplexity"), ("ppl_gap_vs_source", "perplexity gap vs source"),
                      ("softmax_fraction", "softmax fraction (perplexity blocks)"),
                      ("top1_agreement", "top-1 agreement with source"),
                      ("gen_prefix_match", "greedy prefix match with source")):
        if key in row:
            rows[name] = f"{100.0 * row[key]:+.2f}%" if key == "ppl_gap_vs_source" else row[key]
    for key, value in row.items():  # prose texts: perplexity_<text>, its gap and fraction
        if key.startswith("perplexity_"):
            text = key[len("perplexity_"):]
            rows[f"perplexity, {text}"] = value
            if f"ppl_gap_vs_source_{text}" in row:
                rows[f"perplexity gap vs source, {text}"] = f"{100.0 * row[f'ppl_gap_vs_source_{text}']:+.2f}%"
            if f"softmax_fraction_{text}" in row:
                rows[f"softmax fraction, {text}"] = row[f"softmax_fraction_{text}"]
    for prefix, name in LOOKUP_TASKS:
        for key, value in row.items():
            if key.startswith(prefix):
                length = key[len(prefix):]
                rows[f"{name} accuracy @{length} tokens"] = value
                for what, label in (("softmax_fraction", "softmax fraction"), ("kv_fraction", "KV kept"),
                                    ("pair_chunk_softmax_fraction", "looked-up chunk kept")):
                    if f"{what}_{key}" in row:
                        rows[f"{name} @{length} tokens: {label}"] = row[f"{what}_{key}"]
    for key, name in (("short_qa_accuracy", "short-answer accuracy"),
                      ("short_qa_source_correct_kept", "share of the source's correct short answers kept"),
                      ("chat_passage_word_recall", "chat: share of the source reply's passage words kept"),
                      ("chat_off_passage_replies", "chat: replies taking no word of their passage")):
        if key in row:
            rows[name] = row[key]
    return rows


def side_by_side_evaluation(columns, title: str | None = None) -> dict:
    """One card evaluation of several models, one column each, from bench/eval_quality.py reports.

    columns: [(column name, report, label)]: the model evaluated under `label` in `report` ("source" for the
    report's source). Reports of one evaluation may come from separate runs (a model per call), but the rows are
    only comparable when they measured the same thing, so reports whose settings differ in anything but file paths
    are refused. Returns {"title", "columns", "quality": {metric: {column: value}}, "quality_command" (one line per
    distinct command), "quality_measured_on"}; a metric a model was not measured on is absent from its cell.
    """
    if not columns:
        raise ValueError("side_by_side_evaluation needs at least one (column, report, label)")
    first = columns[0][1].get("settings") or {}
    same = {k: v for k, v in first.items() if k not in _PATH_SETTINGS}
    per_column: dict = {}
    for name, report, label in columns:
        settings = {k: v for k, v in (report.get("settings") or {}).items() if k not in _PATH_SETTINGS}
        if settings != same:
            differ = sorted(k for k in set(settings) | set(same) if settings.get(k) != same.get(k))
            raise ValueError(f"column {name!r}: its report was evaluated with other settings ({', '.join(differ)}); "
                             "side by side needs one bench/eval_quality.py evaluation (the same options) for all")
        if label not in report["summary"]:
            raise ValueError(f"column {name!r}: the report has no model labelled {label!r}; it has "
                             f"{sorted(report['summary'])}")
        per_column[name] = _summary_rows(report["summary"][label])
    # rows in the order of the most complete column (the source lacks the routing rows), then any others
    order = max(per_column.values(), key=len)
    metrics = [*order, *(m for rows in per_column.values() for m in rows if m not in order)]
    quality = {m: {name: rows[m] for name, rows in per_column.items() if m in rows} for m in dict.fromkeys(metrics)}
    commands = list(dict.fromkeys(r["command"] for _, r, _ in columns if r.get("command")))
    evaluation = {"columns": [name for name, _, _ in columns], "quality": quality}
    where = _measured_where(first, [r for _, r, _ in columns])
    if where:
        evaluation["quality_measured_on"] = "bench/eval_quality.py: perplexity on " + where
    if title:
        evaluation = {"title": title, **evaluation}
    if commands:
        evaluation["quality_command"] = "\n".join(commands)
    return evaluation


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
    """Merge metrics JSON files (later files win on equal top-level keys; speed tables merge, and the
    speed provenance of several speed reports is joined; a `quality` table measured by another command
    than the one merged so far becomes an entry of `evaluations`, its own table on the card).

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
        data = dict(data)
        evaluations = [*merged.get("evaluations", []), *data.pop("evaluations", [])]
        if isinstance(data.get("quality"), dict) and merged.get("quality") and (
                data.get("quality_command") != merged.get("quality_command")):
            # another evaluation (other text, blocks or device): its rows stay together under its own command
            evaluations.append({k: data.pop(k) for k in ("quality", "quality_command", "quality_measured_on")
                                if k in data})
        if evaluations:  # an evaluation read twice (a card's own metrics file and its report again) is shown once
            merged["evaluations"] = [e for i, e in enumerate(evaluations) if e not in evaluations[:i]]
        for key, value in data.items():
            if key in ("quality", "speed") and isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            elif key in ("speed_command", "speed_measured_on") and merged.get(key) and merged[key] != value:
                sep = "\n" if key == "speed_command" else "; "  # one command per line in the card's bash block
                merged[key] = f"{merged[key]}{sep}{value}"
            else:
                merged[key] = value
    return merged



def read_metrics_file(model_dir) -> dict:
    """The metrics a checkpoint keeps beside its card (METRICS_FILE), {} when it has none."""
    path = Path(model_dir) / METRICS_FILE
    return load_metrics([path]) if path.is_file() else {}


__all__ = [
    "KNOWN_METRICS",
    "METRICS_FILE",
    "decode_report_mismatch",
    "is_decode_report",
    "is_quality_report",
    "load_metrics",
    "metrics_from_decode_report",
    "metrics_from_quality_report",
    "read_metrics_file",
    "side_by_side_evaluation",
]
