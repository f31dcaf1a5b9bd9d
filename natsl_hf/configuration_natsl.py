"""NAtS-L model configuration.

`NatslConfig` carries the decoder fields of the Llama / Qwen2 / Qwen3 family (so a converted
checkpoint keeps its source architecture exactly) plus the fields of the NAtS-L layer
(SPEC.md sections 2-3). Every NAtS-L field is validated in `__post_init__`; a bad value raises
a `ValueError` that names the field, the value and what is allowed.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

ROUTE_OVERRIDES = (None, "softmax", "linear")


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
        else:
            self.natsl_layers = sorted({int(i) for i in self.natsl_layers})
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

    def _validate_natsl(self):
        def bad(field, value, allowed):
            raise ValueError(f"NatslConfig.{field}={value!r} is invalid: {allowed}.")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "head_dim", "vocab_size", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, field)
            if not is_int(value) or value <= 0:
                bad(field, value, "expected a positive integer")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            bad("num_key_value_heads", self.num_key_value_heads,
                f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            bad("head_dim", self.head_dim, "expected an even number (RoPE rotates pairs of dimensions)")
        if not isinstance(self.rms_norm_eps, (int, float)) or isinstance(self.rms_norm_eps, bool) or self.rms_norm_eps <= 0:
            bad("rms_norm_eps", self.rms_norm_eps, "expected a number > 0 (e.g. 1e-6)")
        self._validate_rope_parameters(bad)
        c = self.chunk_size
        if not is_int(c) or c < 1 or c & (c - 1):
            bad("chunk_size", c, "expected a power of two (e.g. 64)")
        if not is_int(self.num_sink_chunks) or self.num_sink_chunks < 0:
            bad("num_sink_chunks", self.num_sink_chunks, "expected an integer >= 0")
        if not isinstance(self.softmax_budget, (int, float)) or not 0.0 <= self.softmax_budget <= 1.0:
            bad("softmax_budget", self.softmax_budget, "expected a fraction in [0, 1]")
        if not isinstance(self.router_temperature, (int, float)) or self.router_temperature <= 0:
            bad("router_temperature", self.router_temperature, "expected a number > 0")
        if not isinstance(self.router_loss_weight, (int, float)) or self.router_loss_weight < 0:
            bad("router_loss_weight", self.router_loss_weight, "expected a number >= 0")
        if not isinstance(self.router_init_bias, (int, float)):
            bad("router_init_bias", self.router_init_bias, "expected a number")
        if not is_int(self.gdn_conv_size) or self.gdn_conv_size < 1:
            bad("gdn_conv_size", self.gdn_conv_size, "expected an integer >= 1 (4 is standard)")
        if self.route_override not in ROUTE_OVERRIDES:
            bad("route_override", self.route_override, "expected None, 'softmax' or 'linear'")
        wrong = [i for i in self.natsl_layers if not 0 <= i < self.num_hidden_layers]
        if wrong:
            bad("natsl_layers", wrong, f"layer indices must lie in [0, {self.num_hidden_layers - 1}]")
        if self.hidden_act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu"):
            bad("hidden_act", self.hidden_act, "expected one of silu, swish, gelu, gelu_pytorch_tanh, relu")

    def _validate_rope_parameters(self, bad) -> None:
        """rope_type must be one transformers implements, with the keys that type needs (transformers'
        own `validate_rope`, whose KeyError becomes a ValueError naming the field)."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rope = self.rope_parameters
        known = ("default", *sorted(ROPE_INIT_FUNCTIONS))
        if rope.get("rope_type") not in known:
            bad("rope_parameters", rope, f"rope_type must be one of {', '.join(known)}")
        theta = rope.get("rope_theta")
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
            bad("rope_parameters", rope, "rope_theta must be a number > 0 (e.g. 10000.0)")
        try:
            self.validate_rope()
        except KeyError as err:
            bad("rope_parameters", rope, f"rope_type {rope['rope_type']!r} must have the keys it needs ({err})")

    def is_natsl_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` is token-routed NAtS-L (else it keeps full softmax attention)."""
        return layer_idx in self.natsl_layers


__all__ = ["NatslConfig"]
