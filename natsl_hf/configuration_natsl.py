"""NAtS-L model configuration.

`NatslConfig` carries the decoder fields of the Llama / Qwen2 / Qwen3 family (so a converted
checkpoint keeps its source architecture exactly) plus the fields of the NAtS-L layer
(SPEC.md sections 2-3). Every field with a rule in `FIELD_RULES` is checked whenever it is set
(constructor, `from_pretrained` kwargs, attribute assignment, `update`), and the relations between
fields are checked on the whole config; a bad value raises `NatslConfigError` (a `ValueError`) that
names the field, the value and what is allowed, and leaves the config unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

from transformers import PreTrainedConfig

ROUTE_OVERRIDES = (None, "softmax", "linear")

_VALIDATED = "_natsl_validated"
_CHANGED = "_natsl_changed_by_kwargs"  # trained fields a from_pretrained kwarg changed: {field: (saved, given)}

# Fields a trained checkpoint's parameters depend on: its weights' shapes, and what its routers and GDN
# were trained on (chunks of chunk_size tokens after num_sink_chunks sinks, in the layers of natsl_layers).
# `from_pretrained(ckpt, field=value)` that changes one of them would silently load a different model
# (the routers would score chunks they never saw, or weights would be dropped / re-initialised), so
# NatslPreTrainedModel.from_pretrained refuses it; the other fields (route_override, use_kernels,
# softmax_budget, router_temperature, router_loss_weight, router_init_bias, rope_parameters,
# max_position_embeddings, the output flags...) change how a loaded model runs or trains and may be
# overridden. To experiment with a changed trained field anyway, assign it on a loaded config and pass
# `config=`: an explicit config is taken as given.
TRAINED_FIELDS = ("chunk_size", "num_sink_chunks", "natsl_layers", "gdn_conv_size", "vocab_size", "hidden_size",
                  "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "hidden_act", "qk_norm", "attention_bias", "attention_out_bias", "mlp_bias", "tie_word_embeddings")


class NatslConfigError(ValueError):
    """A NatslConfig field set to a value it cannot take; `field` names it, the message says what is allowed."""

    def __init__(self, field: str, value, allowed: str):
        super().__init__(f"NatslConfig.{field}={value!r} is invalid: {allowed}.")
        self.field = field


def _invalid(field: str, value, allowed: str):
    raise NatslConfigError(field, value, allowed)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _largest_power_of_two(n: int) -> int:
    return 1 << max(n, 1).bit_length() - 1


class FieldRule(NamedTuple):
    """What one field may hold: `ok(value)` says whether a value is allowed, `allowed` says so in words,
    `normalise` (optional) maps an allowed value to the one stored."""

    ok: Callable[[Any], bool]
    allowed: str
    normalise: Callable[[Any], Any] | None = None

    def check(self, field: str, value):
        if not self.ok(value):
            _invalid(field, value, self.allowed)
        return value if self.normalise is None else self.normalise(value)


_POSITIVE_INT = FieldRule(lambda v: _is_int(v) and v > 0, "expected a positive integer")
_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")

# The rule of every validated field, applied to each value it is given (NatslConfig.__setattr__).
FIELD_RULES = {
    **{field: _POSITIVE_INT for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "max_position_embeddings")},
    "head_dim": FieldRule(lambda v: _is_int(v) and v > 0 and v % 2 == 0,
                          "expected an even positive integer (RoPE rotates pairs of dimensions)"),
    "rms_norm_eps": FieldRule(lambda v: _is_number(v) and v > 0, "expected a number > 0 (e.g. 1e-6)"),
    "hidden_act": FieldRule(lambda v: v in _ACTIVATIONS, f"expected one of {', '.join(_ACTIVATIONS)}"),
    "chunk_size": FieldRule(lambda v: _is_int(v) and v > 0 and v & (v - 1) == 0, "expected a power of two (e.g. 64)"),
    "num_sink_chunks": FieldRule(lambda v: _is_int(v) and v >= 0, "expected an integer >= 0"),
    "softmax_budget": FieldRule(lambda v: _is_number(v) and 0 <= v <= 1, "expected a fraction in [0, 1] (e.g. 0.25)"),
    "router_temperature": FieldRule(lambda v: _is_number(v) and v > 0, "expected a number > 0"),
    "router_loss_weight": FieldRule(lambda v: _is_number(v) and v >= 0, "expected a number >= 0"),
    "router_init_bias": FieldRule(_is_number, "expected a number"),
    "gdn_conv_size": FieldRule(lambda v: _is_int(v) and v >= 1, "expected an integer >= 1 (4 is standard)"),
    "route_override": FieldRule(lambda v: v in ROUTE_OVERRIDES, "expected None, 'softmax' or 'linear'"),
    "use_kernels": FieldRule(lambda v: isinstance(v, bool), "expected True or False"),
    "layer_budget_scale": FieldRule(
        lambda v: v is None or (isinstance(v, (list, tuple)) and all(_is_number(x) and x >= 0 for x in v)),
        "expected None or one number >= 0 per decoder layer (multipliers of softmax_budget)",
        normalise=lambda v: None if v is None else [float(x) for x in v]),
    "natsl_layers": FieldRule(lambda v: isinstance(v, (list, tuple)) and all(_is_int(i) and i >= 0 for i in v),
                              "expected a list of layer indices (integers >= 0)", normalise=lambda v: sorted(set(v))),
}


class NatslConfig(PreTrainedConfig):
    r"""Configuration of a NAtS-L causal language model.

    Decoder fields (as in `LlamaConfig` / `Qwen2Config` / `Qwen3Config`):
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads, head_dim, hidden_act, max_position_embeddings, initializer_range,
        rms_norm_eps, use_cache, pad/bos/eos_token_id, tie_word_embeddings, rope_parameters
        (incl. scaling: `{"rope_type": "llama3", "factor": ..., ...}`), mlp_bias.
        attention_bias (`bool`): bias on q/k/v projections (Llama: all four projections,
            Qwen2: q/k/v only, Qwen3: all four).
        attention_out_bias (`bool`): bias on o_proj (Llama/Qwen3: = attention_bias; Qwen2: False).
        qk_norm (`bool`): per-head RMSNorm on q and k before RoPE (Qwen3).

    NAtS-L fields:
        chunk_size (`int`, 64): tokens per routed chunk, a power of two.
        num_sink_chunks (`int`, 1): the first chunks of every sequence are always softmax (keeps the
            attention sink pretrained models rely on).
        softmax_budget (`float`, 0.25): target fraction of routable chunks kept as softmax. Training with a
            learned router: the router loss pushes the mean softmax probability down to it. Stage-1
            distillation: the share of chunks labelled softmax, and the fraction the router bias is
            calibrated to. Never enforced at inference (argmax routing; the realised fraction is reported).
        router_temperature (`float`, 1.0): p = softmax(score / router_temperature).
        router_loss_weight (`float`, 1.0): weight of the router loss per layer: `(mean p_softmax -
            softmax_budget)_+^2` for a learned router, the supervised-routing cross-entropy in stage 1.
        router_init_bias (`float`, 2.0): initial score margin in favour of softmax (router weight starts
            N(0, initializer_range)), so a freshly converted model routes (nearly) every chunk to softmax
            and starts (nearly) equal to its source. 0 starts from an even mix.
        layer_budget_scale (`list[float]` or None): one multiplier of softmax_budget per decoder layer: layer i
            labels and is calibrated to `min(1, softmax_budget * layer_budget_scale[i])` of its chunks (the
            entries of full-softmax layers are not read). `conversion.router_fit.allocate_layer_budgets` sets it
            from the source attention, with mean 1 over the NAtS-L layers, so that the model keeps
            softmax_budget overall while layers whose attention only decays with distance keep less. None = the
            same budget in every layer.
        gdn_conv_size (`int`, 4): kernel of the causal depthwise conv on the GDN q/k.
        natsl_layers (`list[int]` or None): layers that are NAtS-L; the others stay full softmax
            attention. None = all layers.
        route_override (None | "softmax" | "linear"): force every routable (complete, non-sink) chunk
            to one branch in every path (reference, kernels, cache); for tests and analysis.
        use_kernels (`bool`, True): use the Triton/fla kernels on CUDA tensors where they cover the
            call; False (or env `NATSL_FORCE_REFERENCE=1`) always runs the PyTorch reference.
        source_model_type (`str` or None): model_type of the checkpoint this model was converted from.
    """

    model_type = "natsl"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_out_bias: bool | None = None
    mlp_bias: bool = False
    qk_norm: bool = False
    # NAtS-L
    chunk_size: int = 64
    num_sink_chunks: int = 1
    softmax_budget: float = 0.25
    router_temperature: float = 1.0
    router_loss_weight: float = 1.0
    router_init_bias: float = 2.0
    layer_budget_scale: list[float] | None = None
    gdn_conv_size: int = 4
    natsl_layers: list[int] | None = None
    route_override: str | None = None
    use_kernels: bool = True
    source_model_type: str | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        if self.natsl_layers is None:
            self.natsl_layers = list(range(self.num_hidden_layers))
        super().__post_init__(**kwargs)
        if self.rope_parameters is None or "rope_type" not in self.rope_parameters:
            rope = dict(self.rope_parameters or {})
            rope.setdefault("rope_type", "default")
            rope.setdefault("rope_theta", 10000.0)
            self.rope_parameters = rope
        self._validate_natsl()
        # every saved config points trust_remote_code loaders at the re-export modules (remote_code.py)
        from .remote_code import AUTO_MAP

        self.auto_map = dict(AUTO_MAP)
        self.__dict__[_VALIDATED] = True  # from here on every assignment is checked against the whole config

    def __setattr__(self, key, value):
        """Check a validated field before it is set, however it is set: the constructor, `from_pretrained(...,
        field=value)`, `config.field = value` or `config.update(...)`. After construction the relations between
        fields are checked too, and a rejected assignment leaves the config as it was."""
        rule = FIELD_RULES.get(key)
        if rule is None:
            super().__setattr__(key, value)
        elif not self.__dict__.get(_VALIDATED):  # constructing: None means "derive it", relations come at the end
            super().__setattr__(key, value if value is None else rule.check(key, value))
        else:
            self.update({key: value})

    def update(self, config_dict: dict):
        """Set several fields at once; the result is validated as a whole (so a batch may pass through states
        that are only invalid midway), and a rejected update changes nothing."""
        if not self.__dict__.get(_VALIDATED):
            return super().update(config_dict)
        before = dict(self.__dict__)
        self.__dict__[_VALIDATED] = False
        try:
            super().update(config_dict)
            self._validate_natsl()
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise
        self.__dict__[_VALIDATED] = True
        for field in config_dict:  # a field assigned on the config is taken as given (see TRAINED_FIELDS)
            self.__dict__.get(_CHANGED, {}).pop(field, None)

    def to_dict(self) -> dict:
        output = super().to_dict()
        output.pop(_VALIDATED, None)  # bookkeeping, not configuration
        output.pop(_CHANGED, None)
        return output

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """`PreTrainedConfig.from_dict`, which `from_pretrained(path, **kwargs)` (AutoConfig's too) ends in; it also
        notes which TRAINED_FIELDS the kwargs changed from the saved values, for NatslPreTrainedModel.from_pretrained
        to refuse (a config only noted, never changed)."""
        given = [field for field in TRAINED_FIELDS if field in kwargs]
        saved = None
        if given:
            try:
                saved = cls(**copy.deepcopy(config_dict))
            except ValueError:  # a saved config only the kwargs make valid: nothing trained to compare with
                given = []
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        changed = {f: (getattr(saved, f), getattr(config, f)) for f in given if getattr(saved, f) != getattr(config, f)}
        if changed:
            config.__dict__[_CHANGED] = changed
        return result

    def changed_trained_fields(self) -> dict:
        """{field: (saved, given)} for each TRAINED_FIELDS entry that a `from_pretrained` kwarg changed."""
        return dict(self.__dict__.get(_CHANGED, {}))

    def _validate_natsl(self) -> None:
        """Every field rule on the current values, then the relations between fields."""
        for field, rule in FIELD_RULES.items():
            object.__setattr__(self, field, rule.check(field, getattr(self, field)))
        if self.num_attention_heads % self.num_key_value_heads != 0:
            _invalid("num_key_value_heads", self.num_key_value_heads,
                     f"must divide num_attention_heads={self.num_attention_heads}")
        wrong = [i for i in self.natsl_layers if i >= self.num_hidden_layers]
        if wrong:
            _invalid("natsl_layers", wrong, f"layer indices must lie in [0, {self.num_hidden_layers - 1}]")
        if self.layer_budget_scale is not None and len(self.layer_budget_scale) != self.num_hidden_layers:
            _invalid("layer_budget_scale", self.layer_budget_scale,
                     f"expected one multiplier per decoder layer ({self.num_hidden_layers})")
        first_routable_end = (self.num_sink_chunks + 1) * self.chunk_size
        if self.natsl_layers and first_routable_end > self.max_position_embeddings:
            _invalid("chunk_size", self.chunk_size,
                     f"the first chunk that can be routed ends at token {first_routable_end} ((num_sink_chunks="
                     f"{self.num_sink_chunks} + 1) x chunk_size), past max_position_embeddings="
                     f"{self.max_position_embeddings}, so no chunk could ever be routed; use chunk_size <= "
                     f"{_largest_power_of_two(self.max_position_embeddings // (self.num_sink_chunks + 1))}")
        self._validate_rope_parameters()

    def _validate_rope_parameters(self) -> None:
        """rope_type must be one transformers implements, with the keys that type needs (transformers'
        own `validate_rope`, whose KeyError becomes a ValueError naming the field)."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rope = self.rope_parameters
        if not isinstance(rope, dict):
            _invalid("rope_parameters", rope, "expected a dict with rope_type and rope_theta")
        known = ("default", *sorted(ROPE_INIT_FUNCTIONS))
        if rope.get("rope_type") not in known:
            _invalid("rope_parameters", rope, f"rope_type must be one of {', '.join(known)}")
        if not _is_number(rope.get("rope_theta")) or rope["rope_theta"] <= 0:
            _invalid("rope_parameters", rope, "rope_theta must be a number > 0 (e.g. 10000.0)")
        try:
            self.validate_rope()
        except KeyError as err:
            _invalid("rope_parameters", rope, f"rope_type {rope['rope_type']!r} must have the keys it needs ({err})")

    def layer_softmax_budget(self, layer_idx: int, budget: float | None = None) -> float:
        """The softmax budget of layer `layer_idx`: `budget` (default softmax_budget, the model-wide target) times
        the layer's layer_budget_scale entry, at most 1."""
        budget = self.softmax_budget if budget is None else budget
        if self.layer_budget_scale is None:
            return budget
        return min(1.0, budget * self.layer_budget_scale[layer_idx])

    def is_natsl_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` is token-routed NAtS-L (else it keeps full softmax attention)."""
        return layer_idx in self.natsl_layers



__all__ = ["NatslConfig", "NatslConfigError", "TRAINED_FIELDS"]
