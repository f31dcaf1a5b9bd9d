"""NAtS-L decoder models: NatslPreTrainedModel, NatslModel, NatslForCausalLM.

The decoder is the Llama / Qwen2 / Qwen3 block (pre-norm attention + SwiGLU MLP) with each
attention replaced by `NatslAttention` (natsl_hf.modeling.layer): token-routed softmax / Gated
DeltaNet attention. Layers outside `config.natsl_layers` keep the source's plain softmax attention,
`NatslSoftmaxAttention` (natsl_hf.modeling.softmax_attention). Caching goes through `NatslCache`
(natsl_hf.cache), which keeps only softmax chunks' KV plus the GDN state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .cache import NatslCache, NatslStaticCache, NatslStaticCacheLayer, check_kept_fraction, static_cache_length
from .configuration_natsl import TRAINED_FIELDS, NatslConfig
from .modeling.layer import LayerRouting, NatslAttention, RMSNorm, dense_call, natsl_compile, run_compiled
from .modeling.softmax_attention import NatslSoftmaxAttention
from .modeling.varlen import Documents, document_starts
from .remote_code import write_remote_code

logger = logging.get_logger(__name__)

# transformers 5.24 renamed `past_key_values` to `cache`, as forward argument and as output field (the
# old name stays a deprecated alias there). NAtS-L models take either name and fill the output field
# this transformers has, so one checkpoint and one code path serve 5.x releases on both sides.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# Whether torch.compiler.nested_compile_region compiles the decoder layers' decode step once for all the layers of a
# kind: torch >= 2.13. torch 2.11 compiles a region per layer all the same (each layer's kept KV has its own dynamic
# size, which its reuse check does not unify; 2.13 guards the sizes equal), so there the step stays inlined, as measured.
DECODE_REGIONS = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 13)


NatslCaches = (NatslCache, NatslStaticCache)

NO_ATTENTION_WEIGHTS = (
    "NAtS-L models do not return attention weights (the softmax branch runs as fused kernels and the GDN branch has "
    "no attention matrix): pass output_attentions=False (and set config.output_attentions=False); output_routes=True "
    "returns each chunk's route."
)


def _one_cache(cache: NatslCache | None, past_key_values: NatslCache | None) -> NatslCache | None:
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the cache once, as `cache=` (transformers >= 5.24) or `past_key_values=`, not both.")
    return cache if cache is not None else past_key_values


class RoutedFractions:
    """The realised softmax fractions of a NAtS-L output, from its per-row counts (`softmax_chunks`,
    `routable_chunks`). Computed when read (one host sync); None when the call routed no chunk (a prompt
    shorter than sinks + 1 chunks, a decode step that closes no chunk, every step against a
    NatslStaticCache: see `NatslStaticCache.realised_fraction()`), never 0/0."""

    softmax_chunks: torch.LongTensor | None
    routable_chunks: torch.LongTensor | None

    @property
    def softmax_fraction(self) -> torch.Tensor | None:
        """Share of the routable chunks routed softmax, over all rows, KV heads and NAtS-L layers."""
        if self.routable_chunks is None or not bool(self.routable_chunks.sum() > 0):
            return None
        return self.softmax_chunks.sum() / self.routable_chunks.sum()

    @property
    def layer_softmax_fraction(self) -> torch.Tensor | None:
        """[num_natsl_layers] the same per NAtS-L layer (in `config.natsl_layers` order)."""
        if self.softmax_fraction is None:
            return None
        return self.softmax_chunks.sum(0) / self.routable_chunks.sum(0).clamp(min=1)


@dataclass
class NatslModelOutputWithPast(RoutedFractions, BaseModelOutputWithPast):
    """
    router_loss: sum over NAtS-L layers of the router loss in training (the budget hinge, or the supervised-
        routing loss of stage-1 distillation); None at inference and for frozen routers.
    routable_chunks: [B, num_natsl_layers] long: per row and NAtS-L layer, the routable chunks this call
        closed, counted once per KV head (each KV head routes its own). Per row, so a row's counts do not
        depend on the rest of the batch; packed documents add up into their row. None at a decode step
        against a NatslStaticCache (it counts in the cache).
    softmax_chunks: [B, num_natsl_layers] long: of those, the ones routed softmax.
        `softmax_fraction` / `layer_softmax_fraction` (RoutedFractions) are their ratios.
    routes: per NAtS-L layer the `Routes` of this call (when `output_routes=True`).
    router_agreement: supervised routing (stage-1 distillation) only: the fraction of labelled chunks on
        which the router's own argmax (margin >= 0, i.e. before any bias calibration) matches the target it
        is trained on, mean over the NAtS-L layers that labelled any chunk (NaN if none did: a block too short
        for a chunk with later queries). With few positives a router that ranks well but is not yet
        calibrated sits near the share of negatives; `bench/router_probe.py` measures the ranking (AUC).
    """

    router_loss: torch.FloatTensor | None = None
    softmax_chunks: torch.LongTensor | None = None
    routable_chunks: torch.LongTensor | None = None
    routes: tuple | None = None
    router_agreement: torch.FloatTensor | None = None


@dataclass
class NatslCausalLMOutputWithPast(RoutedFractions, CausalLMOutputWithPast):
    """`loss` = LM loss + router_loss (when labels are given). Other fields as NatslModelOutputWithPast."""

    lm_loss: torch.FloatTensor | None = None
    router_loss: torch.FloatTensor | None = None
    softmax_chunks: torch.LongTensor | None = None
    routable_chunks: torch.LongTensor | None = None
    routes: tuple | None = None
    router_agreement: torch.FloatTensor | None = None


class NatslRMSNorm(RMSNorm):
    """The decoder's RMSNorm (input / post-attention / final), the same maths as Llama's."""


class NatslMLP(nn.Module):
    def __init__(self, config: NatslConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class NatslRotaryEmbedding(nn.Module):
    """RoPE as in the source model (default / llama3 / yarn / linear / dynamic scaling)."""

    inv_freq: torch.Tensor

    def __init__(self, config: NatslConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: NatslConfig, device=None, seq_len=None, **kwargs):
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def decode_step(layer: "NatslDecoderLayer", hidden_states, cos, sin, token_mask, *cache_tensors) -> torch.Tensor:
    """One decoder layer's decode step against a NatslStaticCache layer whose buffers are `cache_tensors`
    (NatslStaticCacheLayer.step_tensors, written in place): hidden_states [B, 1, D] -> [B, 1, D]. The state's packed
    fields are viewed where the layer's shapes put them (`state_layout`: plain ints, so that the step's inputs are
    the buffers and nothing else)."""
    kept_k = cache_tensors[1]
    layout = layer.self_attn.state_layout(kept_k.shape[0], kept_k.dtype)
    cache_layer = NatslStaticCacheLayer.over(cache_tensors, layout)
    return layer._layer(hidden_states, (cos, sin), token_mask, cache_layer, None)[0]


# `decode_step` as a compile region (torch.compiler.nested_compile_region), what the decoder layers call: when
# generate() compiles the decode step, dynamo and inductor compile it once per kind of layer (NAtS-L, full softmax)
# and reuse it for every layer of that kind, where inlined they compiled each layer's copy (the first compiled step
# of an 8-layer model, inductor's cache off, torch 2.13: 28.7 -> 16.7 s on the CPU, bench/decode_compile_cpu.py).
# Eagerly, a call.
decode_step_region = torch.compiler.nested_compile_region(decode_step) if DECODE_REGIONS else decode_step


@functools.cache
def compiled_mlp_block():
    """`NatslDecoderLayer._mlp_block` through torch.compile, made once per process and shared by every decoder layer
    (as the attention's dense path is by the attention modules: `modeling.layer.run_compiled`)."""
    return natsl_compile(NatslDecoderLayer._mlp_block)


class NatslDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: NatslConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        attention = NatslAttention if config.is_natsl_layer(layer_idx) else NatslSoftmaxAttention
        self.self_attn = attention(config, layer_idx)
        self.mlp = NatslMLP(config)
        self.input_layernorm = NatslRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = NatslRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        token_mask: torch.Tensor | None = None,
        cache: NatslCache | NatslStaticCache | None = None,
        documents: Documents | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, LayerRouting]:
        cache_layer = None if cache is None else cache.layers[self.layer_idx]
        if isinstance(cache_layer, NatslStaticCacheLayer) and hidden_states.shape[1] == 1 and not torch.is_grad_enabled():
            # a decode step against a static cache: one compile region that every layer of a kind reuses
            out = decode_step_region(self, hidden_states, *position_embeddings, token_mask, *cache_layer.step_tensors())
            return out, self.self_attn.decode_routing(hidden_states)
        return self._layer(hidden_states, position_embeddings, token_mask, cache_layer, documents)

    def _layer(self, hidden_states, position_embeddings, token_mask, cache_layer, documents):
        """The layer's maths, [B, n, D] -> ([B, n, D], LayerRouting): pre-norm attention, then `_mlp_block`."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, routing = self.self_attn(hidden_states, position_embeddings, token_mask, cache_layer,
                                                documents=documents)
        if dense_call(token_mask, cache_layer, documents):  # compiled on CUDA, as the attention's dense path
            return run_compiled(self, NatslDecoderLayer._mlp_block, compiled_mlp_block, residual, hidden_states), routing
        return self._mlp_block(residual, hidden_states), routing

    def _mlp_block(self, residual: torch.Tensor, attention_out: torch.Tensor) -> torch.Tensor:
        """The layer after its attention, [B, n, D] -> [B, n, D]: the residual add, the post-attention norm, the MLP
        and its residual add. Compiled on CUDA (`run_compiled`): one graph, which fuses the norm's and the adds'
        elementwise work and runs as one autograd node, where the eager modules launched a kernel per op and
        recorded a node per op (the host time of a small training step)."""
        hidden_states = residual + attention_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class NatslPreTrainedModel(PreTrainedModel):
    config_class = NatslConfig
    config: NatslConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NatslDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    # the GDN state cannot be rolled back: assisted / speculative decoding must refuse
    _is_stateful = True
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    # a decode step against a NatslStaticCache has fixed shapes and no host sync (tests/test_static_cache.py)
    _can_compile_fullgraph = True

    # how to get a model with a different value of a trained field, named in the from_pretrained refusal
    _TRAINED_FIELD_FIX = {
        "chunk_size": "convert the source again (natsl-convert SRC OUT --chunk-size N) and distill it",
        "num_sink_chunks": "convert the source again (natsl-convert SRC OUT --sink-chunks N) and distill it",
        "natsl_layers": "convert the source again (natsl-convert SRC OUT --layers ...) and distill it",
        "vocab_size": "load it as saved, then call model.resize_token_embeddings(new_size)",
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing (before anything is loaded) a kwarg that changes a field the
        checkpoint's parameters depend on (`TRAINED_FIELDS` in configuration_natsl.py: chunk_size, num_sink_chunks,
        natsl_layers, the head layout and the other weight shapes): the model would load without a word but no longer
        be the trained one. Other config kwargs (route_override, use_kernels, softmax_budget, rope_parameters...)
        are applied as transformers applies them. An explicit `config=` with a field assigned is taken as given."""
        if kwargs.get("output_attentions"):
            raise ValueError(NO_ATTENTION_WEIGHTS)
        probe = config if isinstance(config, PreTrainedConfig) else None
        if probe is None and any(field in kwargs for field in TRAINED_FIELDS) and not kwargs.get("gguf_file"):
            hub = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
            probe = cls.config_class.from_pretrained(
                config if config is not None else pretrained_model_name_or_path,
                **{k: v for k, v in kwargs.items() if k in hub or k in TRAINED_FIELDS},
            )
        changed = probe.changed_trained_fields() if hasattr(probe, "changed_trained_fields") else {}
        if changed:
            field, (saved, given) = next(iter(changed.items()))
            fix = cls._TRAINED_FIELD_FIX.get(field, "train / convert a checkpoint with that value")
            raise ValueError(
                f"from_pretrained(..., {field}={given!r}) changes a field the checkpoint was trained with ({field}="
                f"{saved!r}): its weights and routers depend on it, so it would load a different model. Drop the "
                f"argument; for a model with {field}={given!r}, {fix} (to experiment anyway: config = "
                f"NatslConfig.from_pretrained(path); config.{field} = {given!r}; from_pretrained(path, config=config))."
            )
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained` plus the remote-code modules its `auto_map` names."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, NatslAttention):
            std = self.config.initializer_range
            init.normal_(module.router.proj.weight, mean=0.0, std=std)
            bias = torch.zeros(module.num_kv_heads, 2)
            bias[:, 0] = self.config.router_init_bias
            init.copy_(module.router.proj.bias, bias.flatten())
            conv = torch.zeros_like(module.gdn_conv.weight)
            conv[:, 0, -1] = 1.0
            init.copy_(module.gdn_conv.weight, conv)
            for proj in (module.a_proj, module.b_proj, module.gdn_gate_proj):
                init.normal_(proj.weight, mean=0.0, std=std)
            fresh = NatslAttention.initial_gates(module.num_kv_heads)
            init.copy_(module.A_log, fresh["A_log"])
            init.copy_(module.dt_bias, fresh["dt_bias"])
            init.ones_(module.gdn_norm.weight)
            init.zeros_(module.gdn_alpha)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, NatslRotaryEmbedding):
            rope_fn = (
                module.compute_default_rope_parameters
                if module.rope_type == "default"
                else ROPE_INIT_FUNCTIONS[module.rope_type]
            )
            buffer_value, _ = rope_fn(module.config)
            init.copy_(module.inv_freq, buffer_value)
            init.copy_(module.original_inv_freq, buffer_value)


class NatslModel(NatslPreTrainedModel):
    def __init__(self, config: NatslConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([NatslDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = NatslRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = NatslRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: NatslCache | NatslStaticCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_routes: bool = False,
        cache: NatslCache | NatslStaticCache | None = None,
        **kwargs,
    ) -> NatslModelOutputWithPast:
        """
        attention_mask: 2D [B, past + n] or [B, n] (with a NatslStaticCache also [B, its max_cache_len], what
            generate() passes: the new tokens at columns past .. past + n - 1) with 1 (True) for real tokens and 0
            for padding (left, right or inside a row), any dtype; other values (an additive 0 / -inf mask) are
            refused. 4D masks are refused: NAtS-L builds its routed mask itself. A row (or a batch) of padding
            only runs: its outputs are meaningless, as Llama's are, and its cache state stays empty.
        position_ids: [B, n] or [1, n] integers (RoPE positions; chunks are counted over real tokens); default:
            real-token positions from the mask and the cache, so a left-padded row gets the positions it would
            have alone. Over the real tokens they must be >= 0 and not decrease, except that a position 0 after the
            row's first real token starts a new packed document (transformers' DataCollatorWithFlattening): each
            document runs exactly as if alone (no attention, GDN state or chunk crosses a boundary), also when the
            packed rows are padded (padding's position ids are not read), and no cache is returned. Packed
            documents with a cache are refused (one state per row), and so is generate() from them. Positions
            past config.max_position_embeddings warn (see `_warn_past_context`).
        cache / past_key_values: a NatslCache or NatslStaticCache (either name; see CACHE_FIELD), or None.
        output_attentions: not supported (True raises): the softmax branch runs fused and the GDN branch has
            no attention matrix; `output_routes=True` returns what each chunk was routed to.
        """
        past_key_values = _one_cache(cache, past_key_values)
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if output_attentions or (output_attentions is None and self.config.output_attentions):
            raise ValueError(NO_ATTENTION_WEIGHTS)
        inputs_embeds = self._embed(input_ids, inputs_embeds)
        B, n = inputs_embeds.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            if past_key_values is not None:
                raise ValueError(
                    "A cache cannot be used in training with gradient checkpointing: the recomputed forward would "
                    "write it a second time. Pass no cache, or call model.eval() (or gradient_checkpointing_disable())."
                )
            use_cache = False
        if past_key_values is not None and not isinstance(past_key_values, NatslCaches):
            raise TypeError(
                f"NAtS-L models need a NatslCache or NatslStaticCache, got {type(past_key_values).__name__}. Pass "
                "`past_key_values=None` (the model creates one) or `natsl_hf.NatslCache(model.config)`."
            )
        if past_key_values is not None and not torch.compiler.is_compiling():
            past_key_values.check_model(self.config)  # shapes only, no host sync
        # a one-token step against a cache (the layers' `_decode`) reads no mask or position value on the host: it
        # takes the mask as it is (a mask of ones computes what none does), and one token can neither restart a
        # packed document nor go backwards. Against a static cache it is the compiled step: no host read at all
        decode_step = past_key_values is not None and n == 1 and not torch.is_grad_enabled()
        static_step = decode_step and isinstance(past_key_values, NatslStaticCache)
        if isinstance(past_key_values, NatslStaticCache) and not torch.compiler.is_compiling():
            past_key_values.place_(inputs_embeds.device, self.dtype)
            past_key_values.check_room(B, n)
        token_mask = self._token_mask(attention_mask, B, n, past_key_values, dense_ok=not decode_step)
        # packed documents (position_ids restarting at 0, as DataCollatorWithFlattening gives; with or without
        # padding): each runs as if alone, and no cache is built for them
        documents, explicit_max = None, None
        if position_ids is not None:
            position_ids = self._check_position_ids(position_ids, B, n)
            if not decode_step and not torch.compiler.is_compiling():
                documents, explicit_max = self._documents(position_ids, token_mask, B, past_key_values)
        if self.training and torch.is_grad_enabled() and past_key_values is None:
            # a training step gets no cache unless it passes one: building a NatslCache would send every layer
            # down the general segment path (state bookkeeping) instead of the compiled dense one, for a cache
            # nobody reads (a plain Trainer run leaves config.use_cache=True)
            use_cache = False
        if use_cache and past_key_values is None and documents is None:
            past_key_values = NatslCache(self.config)
        if position_ids is None:
            state = None if past_key_values is None else past_key_values.layer_state(0)
            seen = torch.zeros(B, dtype=torch.long, device=inputs_embeds.device) if state is None else state.seen
            valid = torch.ones(B, n, dtype=torch.long, device=inputs_embeds.device) if token_mask is None else token_mask.long()
            position_ids = (seen[:, None] + valid.cumsum(1) - 1).clamp(min=0)

        if not static_step and not torch.compiler.is_compiling():
            self._warn_past_context(position_ids, past_key_values, n, explicit_max)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden = () if output_hidden_states else None
        router_loss, routes, agreements = None, [], []
        n_routable, n_softmax = [], []  # per NAtS-L layer
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states, routing = layer(hidden_states, position_embeddings, token_mask, past_key_values, documents)
            if not isinstance(layer.self_attn, NatslAttention):  # a full-softmax layer routes nothing
                continue
            if routing.router_loss is not None:
                router_loss = routing.router_loss if router_loss is None else router_loss + routing.router_loss
            if routing.router_agreement is not None:
                agreements.append(routing.router_agreement.detach())
            n_routable.append(routing.n_routable)
            n_softmax.append(routing.n_softmax)
            if output_routes:
                routes.append(routing.routes)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        routable = softmax = None  # [B, num_natsl_layers]
        if n_routable and not static_step:
            routable, softmax = torch.stack(n_routable, 1), torch.stack(n_softmax, 1)
        return NatslModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_FIELD: past_key_values if use_cache else None},
            hidden_states=all_hidden,
            router_loss=router_loss,
            softmax_chunks=softmax,
            routable_chunks=routable,
            routes=tuple(routes) if output_routes else None,
            router_agreement=torch.stack(agreements).nanmean() if agreements else None,
        )

    def _warn_past_context(self, position_ids, cache, n: int, explicit_max: int | None = None) -> None:
        """Warn once when positions reach config.max_position_embeddings (a conversion with --max-positions
        below the source's: past it the model no longer computes what its source would). A warning, not an
        error, as for Llama: RoPE is defined past it, only no longer what the model was made for. For explicit
        position_ids `explicit_max` is their largest real position (already read); for the default ones the
        exact check syncs, so it runs only when the call could reach that far."""
        limit = self.config.max_position_embeddings
        upper = n + (0 if cache is None else int(cache.get_seq_length()))
        reached = (explicit_max >= limit if explicit_max is not None
                   else upper > limit and int(position_ids.max()) >= limit)
        if reached:
            logger.warning_once(
                f"The input runs past this model's max_position_embeddings={limit}: beyond it the RoPE tables (and the "
                "source model) were never meant to run. Convert again with a larger --max-positions, or keep inputs shorter."
            )

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        """-> inputs_embeds [B, n, D]; refuses what the layers cannot take, naming the fix."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be 2D [batch, length], got shape {tuple(input_ids.shape)}; "
                                 "for one sequence use input_ids[None] (or tokenizer(..., return_tensors='pt')).")
            if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
                raise ValueError(f"input_ids must be integer token ids (torch.long), got dtype {input_ids.dtype}; pass "
                                 "input_ids.long() (or inputs_embeds= for vectors).")
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be 3D [batch, length, hidden], got shape {tuple(inputs_embeds.shape)}.")
        elif inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds has hidden size {inputs_embeds.shape[-1]}, the model's is "
                             f"{self.config.hidden_size}: pass model.get_input_embeddings()(input_ids).")
        if inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"The input is empty (shape {tuple(inputs_embeds.shape[:2])}): pass at least one token per row.")
        return inputs_embeds

    @staticmethod
    def _token_mask(attention_mask, B: int, n: int, cache, dense_ok: bool) -> torch.Tensor | None:
        """[B, n] bool (False = padding) from a 2D mask of the new tokens, of past + new, or (a NatslStaticCache)
        of the cache's length, as generate() gives it (`create_masks_for_generate`); None when every token is
        real. The mask holds 1 (or True) for tokens and 0 for padding, in any dtype; other values (an additive
        0 / -inf mask, weights in between) are refused, in the same host sync that finds "every token real".
        `dense_ok=False` (a decode step, which has no dense path), like a traced call, keeps the mask as it is instead
        of checking it on the host."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError(f"attention_mask must be a tensor [batch, length] of 1 (token) / 0 (padding), got "
                             f"{type(attention_mask).__name__}; pass torch.tensor(mask) (or return_tensors='pt').")
        if attention_mask.dim() != 2:
            raise ValueError(
                f"NAtS-L takes a 2D attention_mask [batch, length] (1 = token, 0 = padding), got shape "
                f"{tuple(attention_mask.shape)}; it builds the routed causal mask itself."
            )
        if attention_mask.is_complex():
            raise ValueError(f"attention_mask must hold 1 (token) / 0 (padding), got dtype {attention_mask.dtype}.")
        static = isinstance(cache, NatslStaticCache)
        if not torch.compiler.is_compiling():  # the cache's length is read here only: a traced read of the Python int
            # is a guard on its value, and a compiled step would recompile for every cache length
            cache_len = cache.cache_len if static else None
            past = 0 if cache is None else int(cache.get_seq_length())
            if attention_mask.shape[0] != B or attention_mask.shape[1] not in (n, past + n, cache_len):
                expected = f"[{B}, {n}]" if past == 0 else f"[{B}, {n}] (the new tokens) or [{B}, {past + n}] (cached + new tokens)"
                if cache_len is not None:
                    expected += f" or [{B}, {cache_len}] (the NatslStaticCache's length)"
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {expected}.")
        if static and attention_mask.shape[1] != n:
            # [B, cache_len] (generate's mask) or [B, past + n]: the new tokens are columns past .. past + n - 1, past
            # the cache's column count, a device tensor: gathered, not sliced, so one compiled step serves every past;
            # and the test is against n, not the cache's length, so that it holds for a dynamic mask length too
            columns = cache.get_seq_length() + torch.arange(n, device=attention_mask.device)
            token_mask = attention_mask.gather(1, columns.expand(B, n)).bool()
        else:
            token_mask = attention_mask[:, -n:].bool()
        # Traced (torch.compile / torch.export: no host branch on the mask's values), the mask is kept as it is
        # and not checked: every call then takes the padded path, which computes the same as the all-real one for
        # a mask of ones (tests/test_export.py). Eager calls read the mask once, to refuse non-0/1 values and to
        # send an all-real batch to the dense path (whole sequences, compiled and on kernels on CUDA), as
        # transformers' masking_utils keeps its all-real shortcut outside tracing only.
        if not dense_ok or torch.compiler.is_compiling():
            return token_mask
        if attention_mask.dtype == torch.bool:
            all_real = bool(token_mask.all())
        else:
            bad, all_real = torch.stack([((attention_mask != 0) & (attention_mask != 1)).any(),
                                         token_mask.all()]).tolist()
            if bad:
                value = attention_mask[(attention_mask != 0) & (attention_mask != 1)][0].item()
                raise ValueError(
                    f"attention_mask must hold 1 for tokens and 0 for padding, got {value!r}; pass the 0/1 mask the "
                    "tokenizer returns (NAtS-L takes no additive 0 / -inf mask, nor weights between 0 and 1)."
                )
        return None if all_real else token_mask

    @staticmethod
    def _check_position_ids(position_ids, B: int, n: int) -> torch.Tensor:
        """Shape and dtype of explicit position_ids (no host sync): [B, n] or [1, n] integers, one per new token.
        -> position_ids as given."""
        if not isinstance(position_ids, torch.Tensor):
            raise ValueError(f"position_ids must be a tensor [batch, length], got {type(position_ids).__name__}; pass "
                             "torch.tensor(positions)[None] or leave position_ids=None (positions from the mask).")
        shape = tuple(position_ids.shape)
        if position_ids.dim() == 1:
            raise ValueError(f"position_ids must be 2D [batch, length], got shape {shape}; for one sequence pass "
                             "position_ids[None] (or leave position_ids=None).")
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be 2D [batch, length], got shape {shape} (NAtS-L has one position "
                             "per token: no multimodal RoPE sections).")
        if position_ids.dtype == torch.bool or position_ids.is_floating_point() or position_ids.is_complex():
            raise ValueError(f"position_ids must be integers (torch.long), got dtype {position_ids.dtype}; pass "
                             "position_ids.long().")
        if position_ids.shape[0] not in (1, B) or position_ids.shape[1] != n:
            expected = f"[{B}, {n}]" + (f" (or [1, {n}] for every row)" if B > 1 else "")
            raise ValueError(f"position_ids has shape {shape}; expected {expected}: one position per new token.")
        return position_ids

    def _documents(self, position_ids, token_mask, B: int, cache) -> tuple[Documents | None, int]:
        """The values of explicit position_ids (one host sync; eager calls only): over the real tokens they are
        >= 0 and do not decrease along each document, where a document starts at a row's first real token and again at
        each real token at position 0 (packed documents, DataCollatorWithFlattening's layout). Padding's
        positions are not read, so packed rows may also be padded (left or right): each document still runs
        exactly as it does alone. Packed documents cannot go into a cache (each would need its own state), so
        they are refused with one. -> (Documents or None, the largest real position)."""
        pos = position_ids.expand(B, -1)
        n = pos.shape[1]
        t = torch.arange(n, device=pos.device)
        valid = torch.ones_like(pos, dtype=torch.bool) if token_mask is None else token_mask.to(pos.device)
        last = torch.where(valid, t, -1).cummax(1).values  # [B, n] the last real token at or before t
        prev = F.pad(last, (1, 0), value=-1)[:, :-1]  # ... strictly before t (-1: none)
        prev_pos = pos.gather(1, prev.clamp(min=0))
        after = valid & (prev >= 0)  # a real token with a real token before it in the row
        negative = valid & (pos < 0)
        restart = after & (pos == 0)
        # a repeated position is accepted: transformers' generate without a cache gives the first new token of a
        # right-padded row the padding's position + 1, which may equal the last real token's (its own tests do)
        backwards = after & (pos < prev_pos) & ~restart & ~negative
        largest = torch.where(valid, pos, torch.full_like(pos, -1)).max()
        any_negative, any_backwards, any_restart, largest = torch.stack(
            [negative.any(), backwards.any(), restart.any(), largest]).tolist()
        if any_negative:
            b, i = negative.nonzero()[0].tolist()
            raise ValueError(f"position_ids must be >= 0, got {int(pos[b, i])} (row {b}, token {i}); pass each token's "
                             "position in its sequence (0, 1, 2, ...) or leave position_ids=None.")
        if any_backwards:
            b, i = backwards.nonzero()[0].tolist()
            raise ValueError(
                f"position_ids must not decrease along a sequence, got {int(prev_pos[b, i])} then {int(pos[b, i])} (row {b}, "
                f"token {i}); a new packed document starts at 0 (DataCollatorWithFlattening), or leave position_ids=None."
            )
        if not any_restart:
            return None, largest
        if cache is not None:
            raise ValueError(
                "position_ids restart at 0 inside a row (packed documents), which a cache cannot hold: call the model "
                "without a cache (use_cache=False, no past_key_values) for packed documents, or give each document its own row."
            )
        return Documents.from_position_ids(pos, token_mask), largest


class NatslForCausalLM(NatslPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: NatslConfig):
        super().__init__(config)
        self.model = NatslModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: the model creates its NatslCache itself
        return False

    # what `generate(cache_config=...)` may hold with cache_implementation="static" (NatslStaticCache's arguments)
    STATIC_CACHE_CONFIG_KEYS = ("max_kept_fraction", "max_cache_len")

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length, *args, **kwargs):
        """`generate(..., cache_implementation="static")` decodes with a NatslStaticCache sized to the call
        (rows x beams; prompt + max_new_tokens, rounded up by `static_cache_length`), which transformers then
        compiles as it does a StaticCache; a later call at another length builds its own cache and reuses the
        compiled step (compile once: the cache's length-dependent sizes are dynamic).
        `cache_config={"max_kept_fraction": f}` sets its kept-KV share (`max_cache_len`: a larger size, taken as
        given, as generation_config.max_cache_len). Without it (or with "dynamic"), the model creates a NatslCache
        in its first forward. Other cache implementations (offloaded, quantized, sliding-window...) hold dense KV and are
        refused, as are cache_config keys NatslStaticCache does not take, before anything runs."""
        user_cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        self._generate_cache = user_cache  # generate() reports a NatslStaticCache's overflow afterwards
        implementation = generation_config.cache_implementation
        if implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported by NAtS-L models (their caches hold routed "
                "chunks and a GDN state, not dense KV): use cache_implementation='static' (NatslStaticCache, compiled "
                "decoding) or leave it unset (NatslCache)."
            )
        cache_config = dict(getattr(generation_config, "cache_config", None) or {})
        if cache_config and (implementation != "static" or user_cache is not None):
            raise ValueError(
                f"cache_config={cache_config!r} applies only with cache_implementation='static' (the NatslStaticCache "
                "generate() builds); pass both, or set max_kept_fraction on a NatslStaticCache you pass as past_key_values."
            )
        unknown = sorted(set(cache_config) - set(self.STATIC_CACHE_CONFIG_KEYS))
        if unknown:
            raise ValueError(
                f"cache_config key(s) {', '.join(map(repr, unknown))} are unknown: NatslStaticCache takes "
                f"{' and '.join(self.STATIC_CACHE_CONFIG_KEYS)}."
            )
        if implementation != "static" or user_cache is not None or generation_config.use_cache is False:
            if implementation == "dynamic" and user_cache is None:
                return  # the model creates its NatslCache (transformers would warn that it ignores "dynamic")
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs
            )
        fraction = cache_config.get("max_kept_fraction")
        check_kept_fraction(fraction, "generate(cache_config=...)")
        given = [n for n in (cache_config.get("max_cache_len"), getattr(generation_config, "max_cache_len", None))
                 if n is not None]
        for extra in given:
            if isinstance(extra, bool) or not isinstance(extra, int) or extra < 1:
                raise ValueError(f"max_cache_len={extra!r} for generate() is invalid: expected an integer >= 1 "
                                 "(the cache is sized to at least prompt + max_new_tokens).")
        if max_cache_length > max(given, default=0):  # sized by the call: to its step of the scale, so that later
            # calls up to that length reuse the cache and its compiled step (a given max_cache_len is taken as given)
            max_cache_length = static_cache_length(max_cache_length, self.config.max_position_embeddings)
        max_cache_length = max([max_cache_length, *given])
        if max_cache_length > self.config.max_position_embeddings:  # decode steps skip the check (no host sync)
            self.model._warn_past_context(None, None, max_cache_length, explicit_max=max_cache_length - 1)
        rows = max(generation_config.num_beams, generation_config.num_return_sequences) * batch_size
        # the call's own cache, as transformers builds a new StaticCache per call (`_prepare_static_cache`): the model
        # keeps no reference to it, so a process that generates at several sizes holds none of them afterwards (a
        # cache kept for reuse held the last call's buffers, 5.4 GB after a 16k x 32 call). Nothing recompiles for a
        # new cache: the sizes that follow its length are dynamic (NatslStaticCache). `return_dict_in_generate=True`
        # returns it (`.cache`; `.past_key_values` before transformers 5.24); pass one as `cache=` (`past_key_values=`)
        # to reuse it on purpose.
        cache = NatslStaticCache(self.config, max_batch_size=rows, max_cache_len=max_cache_length,
                                 max_kept_fraction=fraction, device=self.device, dtype=self.dtype)
        model_kwargs[CACHE_FIELD] = self._generate_cache = cache

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`; before it, packed position_ids (documents restarting at 0) are refused:
        generate() continues one sequence per row. Afterwards, a warning if a NatslStaticCache ran out of kept-KV
        room (softmax-routed chunks then went to the GDN state: see NatslStaticCache, `max_kept_fraction`)."""
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2:
            mask = kwargs.get("attention_mask")
            valid = mask.bool() if isinstance(mask, torch.Tensor) and mask.shape == position_ids.shape else None
            starts = document_starts(position_ids, valid)
            rows = position_ids.shape[0] if valid is None else int(valid.any(1).sum())
            if int(starts.sum()) > rows:
                raise ValueError(
                    "generate() continues one sequence per row, but position_ids restart at 0 inside a row (packed "
                    "documents): give each prompt its own row (left-padded, with attention_mask) and leave position_ids unset."
                )
        self._generate_cache = None
        try:
            out = super().generate(*args, **kwargs)
        finally:  # the call's cache is not kept, also when generate() raised (an out-of-memory error of a server)
            cache, self._generate_cache = self._generate_cache, None
        if isinstance(cache, NatslStaticCache) and (overflow := cache.overflow_report()["total"]):
            logger.warning(
                f"NatslStaticCache ran out of room for kept softmax KV: {overflow} (layer, row, KV group) chunks routed "
                "softmax were written to the GDN state instead. Pass a larger max_kept_fraction: generate(..., "
                "cache_implementation='static', cache_config={'max_kept_fraction': f}) or past_key_values="
                "NatslStaticCache(model.config, max_batch_size, max_cache_len, max_kept_fraction=f)."
            )
        return out

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, *args, **kwargs):
        """generate() asks compileable caches for a mask of fixed size, which NAtS-L takes as the 2D mask padded
        to the NatslStaticCache's length (`NatslModel._token_mask` reads the new tokens' columns): the same shape
        and strides at every step, so the compiled step is not recompiled (a view of the growing mask changes both
        at every step), and what transformers' export of a multi-token decode keeps of a 2D mask, the last step's
        (`decompose_for_generation`), still covers every token it merges. Without a static cache: the new
        tokens' columns."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.24 / < 5.24
        if attention_mask is None:
            return None
        if isinstance(cache, NatslStaticCache):
            mask = F.pad(attention_mask, (0, cache.cache_len - attention_mask.shape[1]))
            torch._dynamo.maybe_mark_dynamic(mask, 1)  # its length is the cache's: dynamic, as the kept slots are
            return mask
        return attention_mask[:, -inputs_embeds.shape[1]:].clone(memory_format=torch.contiguous_format)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: NatslCache | NatslStaticCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_routes: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        cache: NatslCache | NatslStaticCache | None = None,
        **kwargs,
    ) -> NatslCausalLMOutputWithPast:
        """labels -> `loss` = next-token cross-entropy + router loss (the budget term, training only).
        cache / past_key_values: a NatslCache or NatslStaticCache (either name; see CACHE_FIELD), or None."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            output_routes=output_routes,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = lm_loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = lm_loss if outputs.router_loss is None else lm_loss + outputs.router_loss
        return NatslCausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            logits=logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            router_loss=outputs.router_loss,
            softmax_chunks=outputs.softmax_chunks,
            routable_chunks=outputs.routable_chunks,
            routes=outputs.routes,
            router_agreement=outputs.router_agreement,
        )


__all__ = ["NatslPreTrainedModel", "NatslModel", "NatslForCausalLM"]
