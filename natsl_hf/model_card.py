"""The model card (README.md) of a NAtS-L checkpoint.

`render_model_card` fills `model_cards/natsl_model_card.md` (package data `natsl_hf.model_cards`, a
`string.Template`: no templating dependency) with YAML metadata built by huggingface_hub's
`ModelCardData`, the model's NAtS-L settings, and the numbers in `metrics` (schema in
natsl_hf/metrics.py). A number that is not in `metrics` is printed as the literal "not measured";
nothing is estimated or invented. A NaN softmax fraction (no routable chunk seen) reads
"n/a (no routable chunk was measured)".

Where the checkpoint comes from is data in the card's YAML metadata (`base_model`, `license`, and
`natsl_conversion_command`, the command that made it), so the tools that write the card of a checkpoint
made from another (natsl-distill, natsl-hub) read it back with `card_provenance` from metadata, never from
the rendered text.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from string import Template

from .metrics import KNOWN_METRICS, METRICS_FILE, read_metrics_file

NOT_MEASURED = "not measured"
NO_ROUTABLE = "n/a (no routable chunk was measured)"  # how a NaN softmax fraction reads
CARD_TEMPLATE = "natsl_model_card.md"
BASE_TAGS = ["natsl", "hybrid-attention", "gated-deltanet", "linear-attention", "text-generation"]
CONVERSION_COMMAND_KEY = "natsl_conversion_command"  # card metadata: the command that made the checkpoint


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
    kept = _fmt(float(fraction)) + (f" ({int(kv):,} of {int(full):,} bytes)" if have_bytes else "")
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


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A markdown table: each row a name (formatted here) and its formatted cells, one per header column after the
    first."""
    if not rows:
        return NOT_MEASURED
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join([_fmt(name), *cells]) + " |" for name, *cells in rows]
    return "\n".join(lines)


def _flatten(prefix: str, value, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)) and (len(value) > 16 or any(isinstance(v, (dict, list)) for v in value)):
        out.append((prefix, f"{len(value)} entries (see {METRICS_FILE})"))
    else:
        out.append((prefix, _fmt(value) if not isinstance(value, (list, tuple)) else ", ".join(map(_fmt, value))))


def _columns_table(evaluation: dict) -> str:
    """A side-by-side evaluation (natsl_hf.metrics.side_by_side_evaluation): a column per model, a row per metric."""
    columns = list(evaluation["columns"])
    rows = []
    for metric, cells in evaluation["quality"].items():
        if not isinstance(cells, dict):
            raise ValueError(f"metrics['evaluations'] with 'columns' hold {{metric: {{column: value}}}}; {metric!r} "
                             f"has {cells!r}.")
        rows.append((metric, *(_fmt(cells[c]) if c in cells else "" for c in columns)))
    return _table(rows, ("metric", *map(_fmt, columns)))


def _evaluation_text(evaluation: dict) -> str:
    """One evaluation's table, then what it was measured on and the command that measured it."""
    if evaluation.get("columns"):
        text = _columns_table(evaluation)
    else:
        rows: list[tuple[str, str]] = []
        _flatten("", evaluation["quality"], rows)
        text = _table(rows, ("metric", "value"))
    if evaluation.get("note"):
        text += f"\n\n{evaluation['note']}"
    if evaluation.get("quality_measured_on"):
        text += f"\n\nMeasured on: {_fmt(evaluation['quality_measured_on'])}"
    if evaluation.get("quality_command"):
        text += f"\n\nEvaluated with:\n\n```bash\n{evaluation['quality_command']}\n```"
    return text


def _quality_text(metrics: dict) -> str:
    """The card's quality section: the main evaluation, then each further one (metrics["evaluations"])
    under its own heading, so that rows of different texts or devices are never read as one table."""
    evaluations = ([metrics] if metrics.get("quality") else []) + list(metrics.get("evaluations") or [])
    for evaluation in evaluations:
        if not (isinstance(evaluation, dict) and isinstance(evaluation.get("quality"), dict)):
            raise ValueError(f"metrics['evaluations'] entries are {{'quality': {{name: value}}, 'quality_command': ..., "
                             f"'quality_measured_on': ...}}; got {evaluation!r}.")
    if not evaluations:
        return NOT_MEASURED
    return "\n\n".join(_heading(e, i) + _evaluation_text(e) for i, e in enumerate(evaluations, start=1))


def _heading(evaluation: dict, i: int) -> str:
    """An evaluation's heading: its title, else "Evaluation i" after the first (which goes under "Quality")."""
    title = evaluation.get("title") or (f"Evaluation {i}" if i > 1 else None)
    return f"### {title}\n\n" if title else ""


def _layer_budgets_text(config) -> str:
    """What the budget row adds for per-layer budgets (config.layer_budget_scale): each NAtS-L layer's share."""
    if config.layer_budget_scale is None:
        return ""
    shares = ", ".join(f"{i}: {_fmt(round(config.layer_softmax_budget(i), 3))}" for i in config.natsl_layers)
    return f" overall; per layer (from the source attention): {shares}"


def _card_metadata(config, base_model, license, tags, conversion_command) -> str:
    from huggingface_hub import ModelCardData

    all_tags = list(dict.fromkeys(BASE_TAGS + ([config.source_model_type] if config.source_model_type else []) + list(tags or [])))
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model,
        license=license,
        tags=all_tags,
        **({CONVERSION_COMMAND_KEY: conversion_command} if conversion_command else {}),
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
    conversion_command: the command that produced the checkpoint, shown verbatim and kept in the metadata.
    metrics: measured numbers (schema in natsl_hf/metrics.py); absent ones read "not measured".
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
        if key not in KNOWN_METRICS or (key in ("kv_bytes", "full_kv_bytes") and key not in kv_used):
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
        metadata=_card_metadata(config, base_model, license, tags, conversion_command),
        title=title,
        source=source,
        status=status,
        source_model_type=config.source_model_type or "not recorded",
        natsl_layers=_layers_text(list(config.natsl_layers), config.num_hidden_layers),
        chunk_size=config.chunk_size,
        num_sink_chunks=config.num_sink_chunks,
        softmax_budget=_fmt(float(config.softmax_budget)) + _layer_budgets_text(config),
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
        quality_table=_quality_text(metrics),
        speed_table=named_table("speed") + speed_notes,
        other_section=other_section,
        repo_id=repo_id or "path/to/this-checkpoint",
        conversion=conversion,
    )



def card_provenance(model_dir) -> dict:
    """Where a checkpoint comes from, as its card's metadata and its metrics file record it: base_model,
    license, conversion_command, training (each None when not recorded). natsl-distill and natsl-hub carry
    them to the card of a checkpoint made from this one."""
    data = _card_data(Path(model_dir) / "README.md")
    base = data.get("base_model")
    return {
        "base_model": base[0] if isinstance(base, list) and base else base,
        "license": data.get("license"),
        "conversion_command": data.get(CONVERSION_COMMAND_KEY),
        "training": read_metrics_file(model_dir).get("training"),
    }


def _card_data(readme: Path) -> dict:
    if not readme.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict()
    except Exception:  # a card without valid metadata records no provenance
        return {}


__all__ = ["CONVERSION_COMMAND_KEY", "NOT_MEASURED", "card_provenance", "render_model_card"]
