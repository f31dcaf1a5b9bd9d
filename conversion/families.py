"""Source model families that convert to NAtS-L: Llama, Mistral, Qwen2, Qwen3.

All four share one decoder block (pre-norm attention + SwiGLU MLP, RMSNorm, RoPE) and, in
transformers, one parameter layout, which `NatslForCausalLM` keeps name for name. A family is
therefore described by data, not by a converter of its own:

- which projections carry a bias (`attention_bias` = q/k/v, `attention_out_bias` = o_proj, `mlp_bias`),
- whether q/k get a per-head RMSNorm (`qk_norm`, Qwen3),
- which source settings NAtS-L cannot represent (refused with the reason and the fix).

The weight-name map is the identity for every copied tensor (`weight_name_map`); only the
NAtS-L parameters (router, GDN projections and gates, output norm, alpha) are new.

Decisions (documented once, here):
- `attention_dropout` is ignored: conversion targets inference and recovery fine-tuning, and
  the NAtS-L layer has no attention dropout. A non-zero value is reported in `notes`.
- Sliding-window attention is refused (Qwen2/Qwen3 `use_sliding_window=True` or any
  `layer_types` entry other than full attention): NAtS-L's softmax branch sees every earlier
  softmax chunk, so the converted model would not equal its source past the window.
- Mistral's `sliding_window` is accepted when it covers the context being converted
  (`sliding_window >= max_position_embeddings`; a window that long never masks anything).
  A shorter window is refused unless `max_position_embeddings` is lowered to the window
  (natsl option `max_position_embeddings=W`), which converts the model for contexts up to W
  tokens, where it equals the source exactly.
- Llama's `pretraining_tp` is a training-time sharding detail with no effect on the weights or
  on transformers 5's forward; it is not carried over.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

# Decoder fields copied verbatim from the source config (same name and meaning in NatslConfig).
COPIED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
)

# NAtS-L fields a user may set at conversion time (NatslConfig validates their values), plus
# `max_position_embeddings`, which may only be lowered (see the Mistral note above).
NATSL_OPTIONS = (
    "chunk_size",
    "num_sink_chunks",
    "softmax_budget",
    "router_temperature",
    "router_loss_weight",
    "router_init_bias",
    "gdn_conv_size",
    "natsl_layers",
    "route_override",
    "use_kernels",
    "max_position_embeddings",
)

# Per NAtS-L layer, the parameters the converter does not copy: `_init_weights` initialises
# them so the model starts (nearly) equal to its source (router softmax-biased, gdn_alpha = 0),
# and recovery stage 1 trains them alone (conversion/trainer.py). The one list of these names.
NEW_PARAMETER_SUFFIXES = (
    "self_attn.router.proj.weight",
    "self_attn.router.proj.bias",
    "self_attn.gdn_conv.weight",
    "self_attn.a_proj.weight",
    "self_attn.b_proj.weight",
    "self_attn.A_log",
    "self_attn.dt_bias",
    "self_attn.gdn_gate_proj.weight",
    "self_attn.gdn_norm.weight",
    "self_attn.gdn_alpha",
)

# Source tensors that are derived state, not weights (old checkpoints saved the RoPE table).
IGNORED_SOURCE_SUFFIXES = ("self_attn.rotary_emb.inv_freq",)


class UnsupportedModelError(ValueError):
    """The source checkpoint uses an architecture or setting NAtS-L conversion cannot represent."""


def _full_attention_only(cfg, model_type: str) -> None:
    layer_types = getattr(cfg, "layer_types", None) or []
    sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
    if getattr(cfg, "use_sliding_window", False) or sliding:
        raise UnsupportedModelError(
            f"This {model_type} checkpoint uses sliding-window attention (use_sliding_window="
            f"{getattr(cfg, 'use_sliding_window', None)}, non-full layers {sliding[:8]}); NAtS-L keeps every "
            "earlier softmax chunk visible, so the converted model would differ from its source. Convert a "
            "checkpoint with use_sliding_window=false (the released Qwen2/Qwen3 models are)."
        )


def _mistral_window(cfg, model_type: str, max_positions: int) -> None:
    window = getattr(cfg, "sliding_window", None)
    if window is not None and window < max_positions:
        raise UnsupportedModelError(
            f"This {model_type} checkpoint has sliding_window={window} < max_position_embeddings={max_positions}; "
            "NAtS-L has no sliding window, so the converted model equals its source only up to "
            f"{window} tokens. Convert for that context with `max_position_embeddings={window}` "
            f"(natsl-convert --max-positions {window}), or use a checkpoint without a window."
        )


@dataclass(frozen=True)
class Family:
    """How one source `model_type` maps onto NatslConfig.

    bias: source config -> (attention_bias for q/k/v, attention_out_bias for o_proj, mlp_bias).
    qk_norm: the source has per-head q_norm / k_norm (Qwen3).
    check: raises UnsupportedModelError for settings NAtS-L cannot represent; gets the source
        config and the max_position_embeddings being converted.
    """

    model_type: str
    bias: Callable[[object], tuple[bool, bool, bool]]
    qk_norm: bool = False
    check: Callable[[object, int], None] | None = None


def _same_bias(cfg) -> tuple[bool, bool, bool]:
    b = bool(getattr(cfg, "attention_bias", False))
    return b, b, bool(getattr(cfg, "mlp_bias", False))


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", bias=_same_bias),
    "mistral": Family(
        "mistral",
        bias=lambda cfg: (False, False, False),
        check=lambda cfg, n: _mistral_window(cfg, "mistral", n),
    ),
    "qwen2": Family(
        "qwen2",
        bias=lambda cfg: (True, False, False),
        check=lambda cfg, n: _full_attention_only(cfg, "qwen2"),
    ),
    "qwen3": Family(
        "qwen3",
        bias=lambda cfg: (bool(getattr(cfg, "attention_bias", False)),) * 2 + (False,),
        qk_norm=True,
        check=lambda cfg, n: _full_attention_only(cfg, "qwen3"),
    ),
}


def get_family(model_type: str | None) -> Family:
    """The Family of `model_type`, or UnsupportedModelError naming the supported ones."""
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by natsl-convert; supported: {', '.join(sorted(FAMILIES))}. "
            "A decoder with the same block (RMSNorm, RoPE, SwiGLU, q/k/v/o projections) is one entry in "
            "natsl_hf/conversion/families.py."
        )
    return FAMILIES[model_type]


def natsl_config_kwargs(source_config, **natsl_options) -> dict:
    """NatslConfig kwargs for a source transformers config plus NAtS-L options.

    The decoder fields are copied (so every copied weight keeps its shape and the model its
    function); `natsl_options` may set only the names in NATSL_OPTIONS. Raises
    UnsupportedModelError for an unknown family or an unrepresentable setting, ValueError for an
    unknown option.
    """
    family = get_family(getattr(source_config, "model_type", None))
    unknown = sorted(set(natsl_options) - set(NATSL_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown NAtS-L conversion option(s) {unknown}; allowed: {', '.join(NATSL_OPTIONS)}.")
    kwargs = {}
    for name in COPIED_FIELDS:
        value = getattr(source_config, name, None)
        if value is not None or name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            kwargs[name] = copy.deepcopy(value)
    if kwargs.get("head_dim") is None:
        kwargs["head_dim"] = source_config.hidden_size // source_config.num_attention_heads
    rope = getattr(source_config, "rope_parameters", None)
    if rope is None:  # configs written before rope_parameters existed
        rope = dict(getattr(source_config, "rope_scaling", None) or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope.setdefault("rope_theta", getattr(source_config, "rope_theta", 10000.0))
    kwargs["rope_parameters"] = copy.deepcopy(dict(rope))

    max_positions = natsl_options.pop("max_position_embeddings", None)
    if max_positions is not None:
        if not isinstance(max_positions, int) or not 0 < max_positions <= kwargs["max_position_embeddings"]:
            raise ValueError(
                f"max_position_embeddings={max_positions!r} must be a positive integer no larger than the source's "
                f"{kwargs['max_position_embeddings']} (it can only shorten the converted context)."
            )
        kwargs["max_position_embeddings"] = max_positions
    if family.check is not None:
        family.check(source_config, kwargs["max_position_embeddings"])

    attention_bias, attention_out_bias, mlp_bias = family.bias(source_config)
    kwargs.update(
        attention_bias=attention_bias,
        attention_out_bias=attention_out_bias,
        mlp_bias=mlp_bias,
        qk_norm=family.qk_norm,
        source_model_type=family.model_type,
    )
    kwargs.update(natsl_options)
    return kwargs


def conversion_notes(source_config) -> list[str]:
    """Human-readable notes on source settings the conversion drops on purpose."""
    notes = []
    dropout = getattr(source_config, "attention_dropout", 0.0) or 0.0
    if dropout:
        notes.append(f"source attention_dropout={dropout} ignored (NAtS-L layers have no attention dropout)")
    tp = getattr(source_config, "pretraining_tp", 1) or 1
    if tp != 1:
        notes.append(f"source pretraining_tp={tp} ignored (no effect on weights or inference)")
    return notes


def is_new_parameter(name: str) -> bool:
    """Whether a NatslForCausalLM parameter name is a NAtS-L addition (not copied from the source)."""
    return name.endswith(NEW_PARAMETER_SUFFIXES)


def is_ignored_source_tensor(name: str) -> bool:
    return name.endswith(IGNORED_SOURCE_SUFFIXES)


def weight_name_map(target_names) -> dict[str, str]:
    """{NatslForCausalLM tensor name: source tensor name} for every copied tensor.

    The identity for all four families (NatslForCausalLM keeps transformers' Llama names);
    NAtS-L parameters are excluded. A family that renames tensors would map them here.
    """
    return {name: name for name in target_names if not is_new_parameter(name)}


__all__ = [
    "COPIED_FIELDS",
    "FAMILIES",
    "NATSL_OPTIONS",
    "Family",
    "UnsupportedModelError",
    "conversion_notes",
    "get_family",
    "is_ignored_source_tensor",
    "is_new_parameter",
    "natsl_config_kwargs",
    "weight_name_map",
]
