"""NatslAttention: the token-routed NAtS-L attention layer (SPEC.md sections 2-3).

hidden x [B, T, D]
  -> q, k, v with the source model's projections (biases, q/k norms, GQA layout kept)
  -> router: per complete chunk of C tokens and KV group, softmax or linear (GDN)
  -> softmax branch: causal softmax over the own chunk + earlier softmax chunks (RoPE'd q, k)
  -> GDN branch: q~, k~ = L2norm(SiLU(conv(q, k before RoPE))), beta = sigmoid(b_proj x),
     g = -exp(A_log) softplus(a_proj x + dt_bias); state written by linear chunks only,
     read out inter-chunk
  -> o = o_softmax + alpha_h * RMSNormGated(o_gdn, gate_proj x)   (alpha starts at 0)
  -> o_proj

A layer outside config.natsl_layers is the source's plain softmax attention, `NatslSoftmaxAttention`
(modeling/softmax_attention.py). Both derive from `SourceAttention`, what they keep of the source's attention
(projections, q/k norm, RoPE, the softmax KV of the cache layer) and the dispatch to their three paths.

Decisions beyond SPEC.md (documented here, tested in tests/):
- Chunks are counted per row over real (non-padding) tokens, so a left-padded prompt is
  chunked exactly as the same prompt alone.
- The GDN branch reads q and k after the source's q/k norm (Qwen3) and before RoPE.
- The GDN output gate is its own projection (`gdn_gate_proj`, like fla's `g_proj`), normed
  per head with one weight shared by heads (fla's FusedRMSNormGated(head_dim)).
- `route_override="linear"` forces every routable chunk to GDN; sink chunks stay softmax.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import NamedTuple

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F
from torch import nn

from . import kernels, reference
from .kernels.graphs import graph_scope
from .router import (
    NatslRouter,
    Routes,
    chunk_attention_mass,
    decide_routes,
    router_loss,
    routing_supervision_loss,
    routing_targets,
)
from .state import NatslLayerState, PackedLayout, gather_open
from .varlen import Documents


@dataclass
class LayerRouting:
    """What one attention call reports of its routing, beside its output: the model sums the counts and losses
    over its layers (NatslForCausalLM's outputs).

    backend:           "kernels", "sdpa" or "reference": which implementation ran the branches.
    routes:            the chunks this call routed, [B, N, Hkv] (N = 0 for a decode step).
    n_routable:        [B] routable chunks x KV heads of the call (zeros for a decode step).
    n_softmax:         [B] of those, the ones routed softmax.
    router_loss:       training: the supervised-routing loss (stage 1) or the budget hinge (a learned router).
    router_agreement:  stage 1: share of the labelled chunks whose router argmax matches the target (NaN if none).
    """

    backend: str
    routes: Routes
    n_routable: torch.Tensor
    n_softmax: torch.Tensor
    router_loss: torch.Tensor | None = None
    router_agreement: torch.Tensor | None = None

    @classmethod
    def of(cls, backend: str, routes: Routes) -> "LayerRouting":
        """The counts of `routes` (no router loss); `Routes.none` gives zeros."""
        return cls(backend, routes, n_routable=routes.routable.flatten(1).sum(1),  # [B] chunks x KV heads
                   n_softmax=(routes.hard & routes.routable).flatten(1).sum(1))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D], cos/sin: [B, T, D] -> [B, T, H, D]."""
    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, fp32 inside (Llama's): the source's q/k norm, the GDN output norm
    and the decoder norms."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


KERNEL_CHUNK_SIZES = (16, 32, 64)  # what modeling/kernels/gdn_branch.py takes


def use_reference() -> bool:
    return os.environ.get("NATSL_FORCE_REFERENCE", "0") not in ("", "0")


@torch.compiler.assume_constant_result
def kernels_for(device_type: str) -> bool:
    """Whether the kernels serve tensors of this device type (CUDA; CPU only with NATSL_FORCE_KERNELS=1
    under TRITON_INTERPRET=1, for tests) unless NATSL_FORCE_REFERENCE=1. A constant to torch.compile:
    a compiled decode step bakes the choice in instead of tracing imports and environment reads."""
    if use_reference():
        return False
    if device_type != "cuda" and os.environ.get("NATSL_FORCE_KERNELS", "0") != "1":
        return False
    return kernels.kernels_available(torch.empty(0, device=device_type))


def compile_enabled() -> bool:
    """Whether the layers' dense paths (`_dense`) run compiled on CUDA (NATSL_COMPILE=0: eagerly, e.g. to debug)."""
    return os.environ.get("NATSL_COMPILE", "1") not in ("", "0")


def compiles(x: torch.Tensor) -> bool:
    """Whether the dense path of this input runs compiled: CUDA, NATSL_COMPILE not 0, no failed compile yet."""
    return x.is_cuda and compile_enabled() and not _COMPILE_FAILED


_COMPILE_FAILED: list[str] = []  # the error, once torch.compile of the dense path failed in this process


def _compile_failed(err: Exception) -> None:
    _COMPILE_FAILED.append(f"{type(err).__name__}: {err}")
    warnings.warn(
        f"torch.compile of a NAtS-L path (the layers' dense path or the KD loss) failed ({_COMPILE_FAILED[0][:500]}): "
        "running every such path eagerly from now on, which is correct but slower to train. Set NATSL_COMPILE=0 to skip the attempt and silence this warning.",
        RuntimeWarning,
        stacklevel=3,
    )


def dense_call(token_mask, cache, documents) -> bool:
    """Whether a layer call takes the dense path: whole unpadded sequences from their start, no cache, no packed
    documents (training, a forward without cache), the path that runs compiled on CUDA."""
    return cache is None and token_mask is None and documents is None


# Inductor options of every NAtS-L compiled path. The C++ wrapper launches a compiled graph's kernels from compiled code
# instead of generated Python: on an H100 the Trainer's 4 x 2048 checkpointed step went from 0.69x to 0.81x of the
# source's (host-bound: ~1 ms of Python per layer graph call), 16 x 2048 from 0.93x to 0.94x (bench/TRAINING_NOTES.md,
# 2026-12-07). It costs a C++ build per graph at the first step (a few seconds; the compiler triton already needs).
# The KD pieces of distillation compile without it (conversion/trainer.py: torch 2.11 failed to build their backward).
# TORCHINDUCTOR_CPP_WRAPPER=0, inductor's own switch, turns it off here too.
COMPILE_OPTIONS = MappingProxyType({"cpp_wrapper": os.environ.get("TORCHINDUCTOR_CPP_WRAPPER", "1") != "0"})
# The error, once a build with the C++ wrapper failed in this process; every path compiled after it goes without the
# wrapper. torch 2.11's inductor failed to build backward graphs with it ("CudaKernelParamCache not populated for
# triton_..._backward_...": the KD pieces, then the MLP half of a stage-2 piece whose routers were refitted first,
# bench/RECOVERY_NOTES.md 2026-12-07). A backward is built lazily, at the first backward, where nothing could catch the
# failure and the run stopped; a graph compiled with the wrapper therefore builds its backward with its forward.
_WRAPPER_FAILED: list[str] = []


def natsl_compile(fn, **options):
    """`fn` through torch.compile as every NAtS-L path compiles (COMPILE_OPTIONS, `options` overriding them; without
    the C++ wrapper once a build with it failed, `_WRAPPER_FAILED`); made once per process by its caller. With the
    wrapper, inductor runs with AOTAutograd's `force_non_lazy_backward_lowering` while it compiles (nothing per call):
    a graph's backward is built with its forward, so that a failed build surfaces in `run_compiled`. The result's
    `cpp_wrapper` attribute says which it is."""
    options = {**COMPILE_OPTIONS, **options}
    if _WRAPPER_FAILED:
        options["cpp_wrapper"] = False
    wrapper = bool(options["cpp_wrapper"])
    compiled = torch.compile(fn, backend=_InductorBackwardWithForward(options)) if wrapper else \
        torch.compile(fn, options=options)
    compiled.cpp_wrapper = wrapper
    return compiled


class _InductorBackwardWithForward(torch._TorchCompileInductorWrapper):
    """The inductor backend `torch.compile(fn, options=options)` makes (same class, so dynamo treats it as inductor),
    compiling with AOTAutograd's `force_non_lazy_backward_lowering`: a graph's backward is built with its forward."""

    def __init__(self, options: dict):
        super().__init__(None, options, None)  # (mode, options, dynamic), as torch.compile passes them

    def __call__(self, model_, inputs_, **kwargs):
        with functorch_config.patch(force_non_lazy_backward_lowering=True):
            return super().__call__(model_, inputs_, **kwargs)


def run_compiled(first, fn, compiled, *args):
    """`fn(first, *args)` through `compiled()`, its torch.compile made once per process, where args[0] (a tensor: the
    hidden states) is on CUDA. `fn` is a module's dense-path function with the module as `first`: every module of a
    kind calls the same compiled function with itself, so the layers share their graphs (dynamo lifts the parameters
    to graph inputs); or a plain function of tensors (conversion/trainer.py's KD pieces). NATSL_COMPILE=0 runs it
    eagerly; inside an outer trace (a compiled generate step, torch.export) it is traced as part of that graph.

    A failed build with the C++ wrapper (forward or backward: `natsl_compile`) is compiled again without it
    (`_WRAPPER_FAILED`, a warning); any other failed compile runs this and every later call eagerly
    (`_compile_failed`)."""
    if not compiles(args[0]) or torch.compiler.is_compiling():
        return fn(first, *args)
    step = compiled()
    try:
        return step(first, *args)
    except torch._dynamo.exc.BackendCompilerFailed as err:  # compiling failed (nothing ran)
        if not getattr(step, "cpp_wrapper", False):
            _compile_failed(err)
            return fn(first, *args)
        _WRAPPER_FAILED.append(f"{type(err).__name__}: {err}")
        warnings.warn(f"inductor failed to build a NAtS-L graph with its C++ wrapper ({_WRAPPER_FAILED[0][:300]}): "
                      "compiling every NAtS-L path without it from now on (correct, a little slower to train). Set "
                      "TORCHINDUCTOR_CPP_WRAPPER=0 to skip the attempt and silence this warning.", RuntimeWarning,
                      stacklevel=2)
        getattr(compiled, "cache_clear", lambda: None)()  # the next compiled() is made without the wrapper
        return run_compiled(first, fn, compiled, *args)


@functools.cache
def compiled_dense():
    """`NatslAttention._dense` through torch.compile, made once per process: every layer calls the same
    compiled function with itself as the first argument, so the layers of a model share their graphs (dynamo
    lifts the parameters to graph inputs). Shapes start static; a second sequence length makes them dynamic
    (dynamo's default), so a run of varying lengths compiles twice, not once per length."""
    return natsl_compile(NatslAttention._dense)


class Projected(NamedTuple):
    """A call's inputs as the attention paths take them: x [B, n, D] the normed layer input; q [B, n, Hq, Dh],
    k, v [B, n, Hkv, Dh] the source's projections (+ its q/k norm); q_rot, k_rot: q, k with RoPE."""

    x: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_rot: torch.Tensor
    k_rot: torch.Tensor


class Segment(NamedTuple):
    """The tokens a multi-token call attends over (`_segment_tokens`): with a state, the cached open chunk's C slots and
    then the n new tokens (S = C + n), without one the n new tokens (S = n); it starts at a chunk boundary of every row.
    """

    valid: torch.Tensor  # [B, n] bool, the real (non-padding) new tokens
    seen: torch.Tensor  # [B] real tokens before the call
    new_seen: torch.Tensor  # [B] real tokens after the call
    q_pos: torch.Tensor  # [B, n] positions of the new tokens (the queries), -1 padding
    k_pos: torch.Tensor  # [B, S] positions of the segment's tokens (the keys), -1 padding or an empty open slot
    k: torch.Tensor  # [B, S, Hkv, D] RoPE'd keys
    v: torch.Tensor  # [B, S, Hkv, Dv]

    def open_chunk(self, chunk_size: int) -> torch.Tensor:
        """[B] the chunk each row leaves open: the chunks before it close in this call."""
        return torch.div(self.new_seen, chunk_size, rounding_mode="floor")

    def closing(self, chunk_size: int) -> torch.Tensor:
        """[B] bool, the rows that close a chunk in this call."""
        return self.open_chunk(chunk_size) > torch.div(self.seen, chunk_size, rounding_mode="floor")


class KeyRoutes(NamedTuple):
    """The route of each segment token's chunk, as the two branches read it per key (`_route`)."""

    hard: torch.Tensor  # [B, S, Hkv] bool, True = softmax
    weight: torch.Tensor  # [B, S, Hkv] route weight m (value == hard; the router's straight-through gradient)
    complete: torch.Tensor  # [B, S] bool, the token's chunk is complete: it closes in this call


class GdnSegment(NamedTuple):
    """The GDN branch's inputs over a segment (`NatslAttention._gdn_segment`): q~ of the new tokens, the rest of the
    segment's tokens (the cached open chunk's first), and the conv window after the call."""

    q: torch.Tensor  # [B, n, Hq, K] L2-normalised fp32
    k: torch.Tensor  # [B, S, Hkv, K] L2-normalised fp32
    v: torch.Tensor  # [B, S, Hkv, V]
    g: torch.Tensor  # [B, S, Hkv] fp32 log decay (0 on padding)
    beta: torch.Tensor  # [B, S, Hkv] fp32 raw write strength
    conv_state: torch.Tensor  # [B, W-1, (Hq + Hkv) * D]


class SourceAttention(nn.Module):
    """What both attention layers of a NAtS-L model keep of their source's attention, and how a call reaches them.

    q_proj, k_proj, v_proj, o_proj (+ q_norm, k_norm where config.qk_norm), named as the source's: a converted
    checkpoint, its LoRA targets and the tensor-parallel plan are the same for either layer. `forward` sends a call
    to one of the subclass's three paths (`_dense`, `_segment`, `_decode`: same maths, tests compare them); the
    helpers below are the softmax side they share. Subclasses: `NatslAttention` (routed softmax + GDN) and
    `NatslSoftmaxAttention` (a layer kept full softmax, modeling/softmax_attention.py).
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.chunk_size = config.chunk_size
        self.scaling = self.head_dim**-0.5
        qd, kd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, qd, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kd, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kd, bias=config.attention_bias)
        self.o_proj = nn.Linear(qd, config.hidden_size, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        token_mask: torch.Tensor | None = None,
        cache=None,
        documents: Documents | None = None,
    ) -> tuple[torch.Tensor, LayerRouting]:
        """
        hidden_states: [B, n, D] normed layer input; position_embeddings: (cos, sin) [B, n, head_dim]
        token_mask: [B, n] bool, False = padding (None = all real)
        cache: this layer's cache layer (natsl_hf.cache: a NatslCacheLayer, whose state grows, or a
            NatslStaticCacheLayer, preallocated), which holds the state of earlier calls and takes this call's;
            None = no cache, the sequences start here
        documents: packed documents (modeling/varlen.py; no cache, no padding): each document runs as
            its own right-padded row, so no attention and no GDN state cross a boundary
        -> (output [B, n, D], LayerRouting: backend, routes, the counts n_routable / n_softmax ([B] routable
            chunks x KV heads, and those routed softmax: zeros in a full-softmax layer), the router loss of training)

        Three paths, same maths (tests compare them): whole unpadded sequences without a cache
        (`_dense`: training and a forward without cache; compiled on CUDA); a one-token step against a
        cache (`_decode`, both caches: fixed shapes and no host sync against a preallocated state, capturable);
        and everything else, a segment of any length with padding and routing (`_segment`: prefill into a
        cache, multi-token cache calls, padding, packed documents).
        """
        x = hidden_states
        cos, sin = position_embeddings
        if dense_call(token_mask, cache, documents):
            return self._run_dense(x, cos, sin)
        q, k, v = self._project(x)
        p = Projected(x, q, k, v, apply_rope(q, cos, sin), apply_rope(k, cos, sin))
        if documents is not None:
            rows = Projected(*(documents.unpack(t) for t in p))  # [N, Lmax, ...]
            out, routing = self._segment(rows, documents.mask, None, None, right_padded=True)
            routing = replace(routing, n_routable=documents.per_row(routing.n_routable),
                              n_softmax=documents.per_row(routing.n_softmax))
            return documents.repack(out), routing
        if cache is not None and cache.state is None:  # a NatslCache's first call
            cache.take_state(self._new_state(x, v.dtype))
        if cache is not None and x.shape[1] == 1 and not torch.is_grad_enabled():
            return self._decode(p, token_mask, cache)
        # a multi-token call reads what the state holds (`prefix`) and writes into it. Eager, an empty state is read
        # as none, so that a first prefill takes the dense / kernel paths (one sync to know). Traced (no host branch),
        # the state always, empty or not: an empty state computes the same as none (zero GDN and conv states, no
        # kept or open key)
        state = None if cache is None else cache.state
        prefix = state if state is not None and (reference.tracing() or bool((state.seen > 0).any())) else None
        if prefix is not None and torch.is_grad_enabled():  # what the graph saves must outlive the in-place writes
            prefix = prefix.map(torch.clone)
        return self._segment(p, token_mask, prefix, cache)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,n,D] -> q [B,n,Hq,Dh], k, v [B,n,Hkv,Dh]: the source projections (+ its q/k norm)."""
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _output(self, o: torch.Tensor, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """o [B,n,Hq,Dv] -> o_proj [B,n,D] in x's dtype; valid [B,n] bool: padding outputs are zeros."""
        if valid is not None:
            o = o * valid[..., None, None].to(o.dtype)
        return self.o_proj(o.flatten(2).to(x.dtype))

    def _whole_sequences(self, state, token_mask) -> bool:
        """Whether a segment can take the fused paths (the branch kernels, SDPA): whole unpadded sequences with no
        cache prefix, and the reference not forced (`config.use_kernels=False` or NATSL_FORCE_REFERENCE=1)."""
        return not use_reference() and self.config.use_kernels and state is None and token_mask is None

    def _kernels_here(self, x: torch.Tensor) -> bool:
        return self.config.use_kernels and kernels_for(x.device.type)

    def _decode_ops(self, x: torch.Tensor):
        """("kernels", modeling.kernels) on CUDA where usable, else ("reference", modeling.reference):
        the decode entry points of both have the same signatures."""
        return ("kernels", kernels) if self._kernels_here(x) else ("reference", reference)

    def _state_sizes(self) -> dict:
        """The sizes of this layer's state (`NatslLayerState.allocate`'s, but the rows, the capacity and the dtype)."""
        return dict(chunk_size=self.chunk_size, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, natsl=False)

    def _new_state(self, x: torch.Tensor, dtype: torch.dtype) -> NatslLayerState:
        """An empty state of this layer's shapes for the rows of x [B, n, D], its KV in `dtype` (a NatslCache's first
        call; its kept KV grows from there)."""
        return NatslLayerState.allocate(batch_size=x.shape[0], capacity=0, dtype=dtype, device=x.device,
                                        **self._state_sizes())

    def state_layout(self, batch_size: int, dtype: torch.dtype) -> PackedLayout:
        """Where this layer's state of `batch_size` rows, its KV in `dtype`, keeps its packed fields: how a decode step
        over a static cache layer's buffers views them (modeling_natsl.decode_step)."""
        return NatslLayerState.layout_for(batch_size=batch_size, dtype=dtype, **self._state_sizes())

    def _segment_tokens(self, p: Projected, token_mask, state: NatslLayerState | None) -> Segment:
        """The tokens a multi-token call attends over: the cached open chunk's slots, then the n new tokens."""
        B, n, _ = p.x.shape
        C, dev = self.chunk_size, p.x.device
        valid = torch.ones(B, n, dtype=torch.bool, device=dev) if token_mask is None else token_mask.bool()
        seen = torch.zeros(B, dtype=torch.long, device=dev) if state is None else state.seen
        new_seen = seen + valid.sum(1)
        if token_mask is None and state is None:  # a whole sequence from its start: positions 0 .. n-1
            q_pos = torch.arange(n, device=dev).repeat(B, 1)  # [B,n]
        else:
            q_pos = reference.segment_positions(valid, seen)  # [B,n]
        if state is None:
            return Segment(valid, seen, new_seen, q_pos, q_pos, p.k_rot, p.v)
        open_len, open_start = seen % C, seen - seen % C
        slots = torch.arange(C, device=dev)
        open_pos = torch.where(slots[None] < open_len[:, None], open_start[:, None] + slots[None], -1)
        return Segment(valid, seen, new_seen, q_pos, torch.cat([open_pos, q_pos], 1),
                       torch.cat([state.open_k, p.k_rot], 1), torch.cat([state.open_v, p.v], 1))

    def _write_segment(self, cache, seg: Segment, keep: torch.Tensor, routes: Routes, gdn_end=None,
                       gdn_open: dict | None = None) -> None:
        """A multi-token call's result into its cache layer (`write_segment`: `NatslLayerState.write_segment_`): the
        chunks it completes close (their keys in `keep` [B, S, Hkv] join the kept KV; the counters count the routable
        chunks of `routes`, none with `Routes.none`; gdn_end [B, Hkv, K, V]: NAtS-L layers, the GDN state the open
        chunk starts from), the chunk it leaves open replaces the open chunk (gdn_open: its GDN fields)."""
        C = self.chunk_size
        cache.write_segment(seg.valid.shape[1], k_pos=seg.k_pos, k=seg.k, v=seg.v, keep=keep,
                            routable=routes.routable[..., 0], kept=routes.hard, closing=seg.closing(C),
                            gdn_end=gdn_end, seen=seg.new_seen, open_chunk=seg.open_chunk(C), gdn_open=gdn_open)

    def _decode_softmax(self, ops, p: Projected, valid: torch.Tensor, cache) -> torch.Tensor:
        """A decode token's softmax side: its KV and router input into the open chunk (the cache layer's
        `write_token`), then its attention over the kept KV and the open chunk up to itself. -> o [B,1,Hq,Dv]."""
        cache.write_token(p.k_rot[:, 0], p.v[:, 0], p.x[:, 0], valid)
        s = cache.state
        return ops.routed_decode_attention(p.q_rot[:, 0], s.kept_k, s.kept_v, s.kept_len, s.open_k, s.open_v, s.seen,
                                           self.scaling)[:, None]

    def decode_routing(self, x: torch.Tensor) -> LayerRouting:
        """What a decode step (x [B, 1, D]) routes in its outputs: nothing (a chunk it closes is counted in the cache,
        its realised fraction), on the backend the step runs."""
        return LayerRouting.of(self._decode_ops(x)[0], Routes.none(x.shape[0], self.num_kv_heads, x.device))

    def _real_token(self, x: torch.Tensor, token_mask) -> torch.Tensor:
        """[B] bool: whether each row's decode token (x [B, 1, D]) is real, not padding (token_mask [B, 1] or None)."""
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if token_mask is None else token_mask[:, 0].bool()

    def _closing(self, state: NatslLayerState, valid: torch.Tensor) -> torch.Tensor:
        """[B] bool: the rows whose decode token (real: valid [B]) completes its chunk."""
        return valid & ((state.seen + 1) % self.chunk_size == 0)


class NatslAttention(SourceAttention):
    """The NAtS-L layer (module docstring): the source's attention (`SourceAttention`) with a router and a GDN branch."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.router_mode = "learned"
        H = self.num_kv_heads
        qd, kd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.router = NatslRouter(config.hidden_size, H)
        self.gdn_conv = nn.Conv1d(qd + kd, qd + kd, config.gdn_conv_size, groups=qd + kd, bias=False)
        self.a_proj = nn.Linear(config.hidden_size, H, bias=False)
        self.b_proj = nn.Linear(config.hidden_size, H, bias=False)
        self.A_log = nn.Parameter(torch.zeros(H))
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.gdn_gate_proj = nn.Linear(config.hidden_size, qd, bias=False)
        self.gdn_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.gdn_alpha = nn.Parameter(torch.zeros(self.num_heads))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True

    ROUTER_MODES = ("learned", "supervised", "frozen")

    @property
    def router_mode(self) -> str:
        """How training treats the router (a training-time switch, not saved; inference is argmax in
        every mode): "learned" = straight-through routes and the budget hinge (SPEC.md section 2),
        "supervised" = routes and router targets from the layer's own attention mass (stage-1
        distillation, see `_route`), "frozen" = argmax routes of a router that gets no gradient and
        whose input is detached (stage-2 distillation: the backbone adapts to fixed routing)."""
        return self._router_mode

    @router_mode.setter
    def router_mode(self, mode: str) -> None:
        if mode not in self.ROUTER_MODES:
            raise ValueError(f"router_mode={mode!r} is invalid: expected one of {', '.join(self.ROUTER_MODES)}.")
        self._router_mode = mode

    @property
    def softmax_budget(self) -> float:
        """This layer's softmax budget: config.softmax_budget, times its config.layer_budget_scale entry."""
        return self.config.layer_softmax_budget(self.layer_idx)

    @staticmethod
    def initial_gates(num_heads: int) -> dict[str, torch.Tensor]:
        """Fresh GDN gate parameters as fla initialises them: A_log = log U(1, 16),
        dt_bias = softplus^-1(dt), dt log-uniform in [1e-3, 1e-1] (clamped at 1e-4)."""
        A_log = torch.empty(num_heads).uniform_(1, 16).log()
        dt = torch.exp(torch.rand(num_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        return {"A_log": A_log, "dt_bias": dt + torch.log(-torch.expm1(-dt))}

    def branch_backend(self, x: torch.Tensor, state, token_mask) -> str:
        """"kernels" or "reference" for this call (see modeling/kernels/README.md).

        Whole, unpadded sequences with no cache prefix (training and a first prefill) take the Triton/fla
        kernels on CUDA, chunk sizes 16/32/64 (a full-softmax layer: torch's SDPA on any device). A
        single-token decode step (`_decode`) takes the decode kernels on CUDA, in every layer. Everything
        else (CPU, padding, a multi-token call against a cache) runs the reference, which defines the same
        maths. `config.use_kernels=False` or NATSL_FORCE_REFERENCE=1 forces the reference;
        NATSL_FORCE_KERNELS=1 takes the kernels on CPU too when triton runs in interpreter mode (tests).
        """
        whole = self._whole_sequences(state, token_mask) and self.chunk_size in KERNEL_CHUNK_SIZES
        return "kernels" if whole and self._kernels_here(x) else "reference"

    @torch.no_grad()
    def chunk_mass(self, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
        """`chunk_attention_mass` of this layer's own full attention on whole unpadded blocks: hidden_states
        [B, T, D] (normed layer input), position_embeddings (cos, sin) [B, T, head_dim] -> [B, T // C, Hkv]."""
        q, k, _ = self._project(hidden_states)
        cos, sin = position_embeddings
        return chunk_attention_mass(apply_rope(q, cos, sin), apply_rope(k, cos, sin), self.chunk_size, self.scaling,
                                    self.config.num_sink_chunks)

    @torch.no_grad()
    def routing_samples(self, hidden_states: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, ...]:
        """Supervised-routing data of whole unpadded blocks (see router.py), for fitting the router.

        hidden_states: [B, T, D] this layer's (normed) input; position_embeddings: (cos, sin) [B, T, head_dim]
        -> router inputs [B, N, D] fp32 (the mean hidden state of each complete chunk), targets [B, N, Hkv]
        bool (True = softmax) and labelled [B, N, Hkv] bool, from this layer's own full attention.
        """
        x = hidden_states
        mass = self.chunk_mass(x, position_embeddings)
        B, N, C = mass.shape[0], mass.shape[1], self.chunk_size
        routable = (torch.arange(N, device=x.device) >= self.config.num_sink_chunks)[None, :, None].expand_as(mass)
        target, labelled = routing_targets(mass, routable, self.softmax_budget)
        means = x[:, : N * C].float().unflatten(1, (N, C)).mean(2)
        return means, target, labelled

    def _state_sizes(self) -> dict:
        """With the GDN fields (`SourceAttention._state_sizes`)."""
        channels = (self.num_heads + self.num_kv_heads) * self.head_dim  # the short conv's: q and k
        return {**super()._state_sizes(), "natsl": True, "hidden_size": self.hidden_size,
                "conv_size": self.config.gdn_conv_size, "conv_channels": channels}

    def _run_dense(self, x, cos, sin):
        """`_dense`, compiled on CUDA (`compiled_dense`): one graph for every layer of the model (the layers'
        parameters are its inputs), fused glue around the two branch kernels, which torch.compile sees as
        custom ops. NATSL_COMPILE=0 runs it eagerly. The layer's softmax budget goes in as a tensor, not a constant:
        layers whose budgets differ (config.layer_budget_scale) share the graph. It is made on x's device by a fill,
        not copied there: a CPU tensor would make the compiled graph copy it to the GPU first (inductor's blocking
        DeviceCopy of a CPU scalar), a host sync in every layer's forward and checkpoint recompute. A training
        forward replays the branch ops' launches as CUDA graphs (`graph_scope`, modeling/kernels/graphs.py: the
        shapes repeat every step); an inference forward, whose shapes follow the prompt, launches them."""
        budget = torch.full((), self.softmax_budget, device=x.device)
        with graph_scope(self.training and torch.is_grad_enabled()):
            return run_compiled(self, NatslAttention._dense, compiled_dense, x, cos, sin, budget)

    def _dense(self, x, cos, sin, budget: torch.Tensor):
        """Whole unpadded sequences from their start, no cache (training; a forward without cache): every row
        holds positions 0 .. n-1, so chunk c of every row is tokens [cC, (c+1)C) and none of the general
        path's position bookkeeping is needed. The branches are bound once (`_branch_ops`: the kernels on
        CUDA, the reference elsewhere, same signatures).
        x [B, n, D]; cos, sin [B, n, head_dim]; budget: 0-d, the layer's softmax budget (`softmax_budget`)
        -> (out [B, n, D], LayerRouting as in `forward`)."""
        B, n, _ = x.shape
        C = self.chunk_size
        q, k, v = self._project(x)  # [B,n,Hq,Dh], [B,n,Hkv,Dh], [B,n,Hkv,Dh]
        q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        backend, ops = self._branch_ops(x)
        full, N = n // C, -(-n // C)  # complete chunks, all chunks (the last may be open)
        chunk = torch.arange(N, device=x.device)
        complete = (chunk < full).expand(B, N)
        sink = (chunk < self.config.num_sink_chunks).expand(B, N)
        means = x[:, : full * C].float().unflatten(1, (full, C)).mean(2)  # [B, full, D]
        scores = self._score(F.pad(means, (0, 0, 0, N - full)))  # [B, N, Hkv, 2] (the open chunk: not routed)
        routes = decide_routes(scores, complete, sink, self.config.router_temperature, self.config.route_override,
                               self.num_kv_heads)
        routes, supervision = self._supervise(routes, scores, q_rot, k_rot, budget)
        o = ops.routed_softmax_attention(q_rot, k_rot, v, routes.weight, C, self.scaling)  # [B,n,Hq,Dv]
        q_g, k_g, beta, g, _ = self._gdn_inputs(x, q, k, None, None)
        # linear-routed complete chunks write with beta (1 - m); sinks and the open chunk have m = 1 (no write)
        key_weight = routes.weight[:, torch.arange(n, device=x.device) // C]  # [B,n,Hkv]
        o_gdn, _ = ops.routed_gdn_readout(q_g, k_g, v, g, beta * (1.0 - key_weight), C, self.scaling)
        o = self._combine(o, o_gdn, x)
        return self._output(o, x), self._routing(backend, routes, supervision, budget)

    def _branch_ops(self, x: torch.Tensor):
        """("kernels", modeling.kernels) on CUDA with chunk sizes the kernels take, else ("reference",
        modeling.reference): the branch entry points of both have the same signatures."""
        if self.chunk_size in KERNEL_CHUNK_SIZES and self._kernels_here(x):
            return "kernels", kernels
        return "reference", reference

    def _routing(self, backend: str, routes: Routes, supervision: dict | None, budget=None) -> LayerRouting:
        """The LayerRouting of a routed call: per-row counts, and the router loss of training (the
        supervised-routing loss in stage 1, the budget hinge for a learned router; budget: as `_dense` takes
        it, default `softmax_budget`)."""
        routing = LayerRouting.of(backend, routes)
        if supervision is not None:
            routing.router_loss = self.config.router_loss_weight * supervision["loss"]
            routing.router_agreement = supervision["agreement"]
        elif self.training and self.router_mode == "learned":
            budget = self.softmax_budget if budget is None else budget
            routing.router_loss = router_loss(routes, budget, self.config.router_loss_weight)
        return routing

    def _score(self, chunk_mean: torch.Tensor) -> torch.Tensor:
        """Router scores [B, N, Hkv, 2] of chunk means [B, N, D] fp32; a frozen router in training gets no
        gradient (stage 2)."""
        if self.router_mode == "frozen" and self.training:
            with torch.no_grad():
                return self.router(chunk_mean)
        return self.router(chunk_mean)

    def _supervise(self, routes: Routes, scores, q_rot, k_rot, budget) -> tuple[Routes, dict | None]:
        """With `router_mode == "supervised"` (stage-1 training; whole unpadded sequences, no cache): the
        routable chunks are routed by `routing_targets` of this layer's own full-attention mass (its q/k are
        the source's) instead of by the router, which learns those targets through
        `routing_supervision_loss` (router.py explains why); a `config.route_override` wins over the targets.
        -> (routes, {"loss", "agreement": share of labelled chunks whose router argmax matches the target,
        NaN if none}) or (routes, None) otherwise. routes [B, N, Hkv]; q_rot / k_rot [B, S, H, D]; budget: the
        layer's share of chunks labelled softmax (0-d, as `_dense` takes it)."""
        if not (self.router_mode == "supervised" and self.training and self.config.route_override is None):
            return routes, None
        B, N = routes.hard.shape[:2]
        mass = chunk_attention_mass(q_rot, k_rot, self.chunk_size, self.scaling, self.config.num_sink_chunks)  # [B, S//C, Hkv]
        mass = torch.cat([mass, mass.new_full((B, N - mass.shape[1], self.num_kv_heads), float("nan"))], 1)
        target, labelled = routing_targets(mass, routes.routable, budget)
        argmax = scores[..., 0] >= scores[..., 1]  # what the router alone would route
        hard = torch.where(labelled, target, routes.hard)
        agreement = ((argmax == target) & labelled).sum() / labelled.sum()  # no host branch: NaN if none labelled
        return Routes(hard, hard.to(routes.weight.dtype), routes.prob, routes.routable), {
            "loss": routing_supervision_loss(scores, target, labelled, self.config.router_temperature),
            "agreement": agreement,
        }

    def _segment(self, p: Projected, token_mask, state: NatslLayerState | None, cache, right_padded: bool = False):
        """The general path: a segment = the cached open chunk's tokens (slots) + the n new tokens.
        state: what earlier calls left (None: the sequences start here); cache: the cache layer the call's result
        goes to (its `write_segment`; None: no cache). `right_padded`: padding only after each row's tokens
        (packed documents), which the kernels serve exactly (causal: no real query sees a padding key).
        p: the new tokens' projections [B, n, ...] -> (out [B, n, D], LayerRouting)."""
        seg = self._segment_tokens(p, token_mask, state)  # keys [B, S, Hkv, *], S = C + n with a state, else n
        routes, keys = self._route(p.x, seg, state, dense=token_mask is None)  # chunks [B, N+1, Hkv], keys [B, S, Hkv]
        backend = self.branch_backend(p.x, state, None if right_padded else token_mask)
        o = self._softmax_branch(backend, p, seg, routes, keys, state)  # [B, n, Hq, Dv]
        gdn = self._gdn_segment(p, seg, token_mask, state)  # q~ [B, n, Hq, K]; k~, v, g, beta [B, S, Hkv, *]
        o_gdn, gdn_end = self._gdn_branch(backend, gdn, seg, keys, state, cache is not None)  # [B, n, Hq, V] fp32
        out = self._output(self._combine(o, o_gdn, p.x), p.x, None if token_mask is None else seg.valid)  # [B, n, D]
        if cache is not None:  # the chunks the call completes close, the one it leaves open is cached
            self._write_segment(cache, seg, keys.hard & keys.complete[..., None], routes, gdn_end,
                                self._gdn_open_chunk(p.x, seg, gdn, gdn_end, state))
        # the padding dummy chunk N is dropped from what the call reports: routes [B, N, Hkv] on every path
        reported = Routes(*(t[:, :-1] for t in (routes.hard, routes.weight, routes.prob, routes.routable)))
        return out, self._routing(backend, reported, None)

    def _route(self, x, seg: Segment, state, dense: bool = False) -> tuple[Routes, KeyRoutes]:
        """The router: route the chunks of the segment.

        -> routes [B, N+1, Hkv] of the segment's chunks (padding -> chunk N, a dummy softmax chunk), and each segment
        token's route (`KeyRoutes`). Supervised routing (stage 1) takes whole unpadded sequences without a cache
        (`_dense`) and is refused here.
        """
        k_pos = seg.k_pos
        B, S = k_pos.shape
        C = self.chunk_size
        base = torch.div(seg.seen, C, rounding_mode="floor")  # [B] first chunk of the segment
        rel = torch.div(k_pos, C, rounding_mode="floor") - base[:, None]  # [B, S] chunk of each token in the segment
        if (dense and state is None) or reference.tracing():
            # every row holds positions 0 .. S-1: known without a host sync. Traced (torch.compile / torch.export,
            # no host sync possible), the same static bound serves every segment: a row's real tokens are
            # contiguous from its first chunk's start, so they reach chunk ceil(S / C) - 1 at most (ChunkLayout).
            # Chunks past a row's last token have no token: not complete, so routed as incomplete chunks are
            # (softmax, weight 1, not routable, no key); outputs, counts and the next state are the same, and
            # only `routes` then has trailing columns of such chunks.
            N = math.ceil(S / C)
        else:  # the chunks the rows' real tokens reach (one host sync), so `routes` has a column per chunk reached
            N = int((torch.div(k_pos.max(1).values.clamp(min=0), C, rounding_mode="floor") - base).max()) + 1
        rel = torch.where(k_pos >= 0, rel, torch.full_like(rel, N))
        # chunks 0 .. N-1 of the segment and a dummy chunk N that padding goes to: never complete, so it is
        # routed as every incomplete chunk is (softmax, weight 1, not routable; its keys are masked anyway)
        chunks = torch.arange(N + 1, device=x.device)
        counts = torch.zeros(B, N + 1, dtype=torch.long, device=x.device)
        counts.scatter_add_(1, rel, torch.ones_like(rel))
        complete = (counts == C) & (chunks < N)  # [B, N+1]
        sink = (base[:, None] + chunks) < self.config.num_sink_chunks
        rel_new = rel[:, S - x.shape[1]:]  # the new tokens' chunks: their hidden states join the router's sums
        sums = x.new_zeros(B, N + 1, x.shape[-1], dtype=torch.float32)
        sums = sums.scatter_add(1, rel_new[..., None].expand(-1, -1, x.shape[-1]), x.float())
        if state is not None:
            sums[:, 0] = sums[:, 0] + state.router_sum
        scores = self._score(sums / C)
        routes = decide_routes(
            scores, complete, sink, self.config.router_temperature, self.config.route_override, self.num_kv_heads
        )
        if self.router_mode == "supervised" and self.training and self.config.route_override is None:
            raise ValueError(
                "router_mode='supervised' (stage-1 distillation) trains on whole unpadded sequences without a cache: "
                "pass packed blocks with use_cache=False and no padding."
            )
        token_complete = torch.gather(complete, 1, rel) & (k_pos >= 0)  # [B,S] key in a closed chunk
        per_key = rel[..., None].expand(-1, -1, self.num_kv_heads)
        return routes, KeyRoutes(torch.gather(routes.hard, 1, per_key), torch.gather(routes.weight, 1, per_key),
                                 token_complete)

    def _softmax_branch(self, backend: str, p: Projected, seg: Segment, routes: Routes, keys: KeyRoutes,
                        state) -> torch.Tensor:
        """Routed causal softmax of the new tokens over the kept KV (state's), the earlier chunks routed softmax and
        their own chunk -> o [B, n, Hq, Dv]. The kernels take whole unpadded sequences (uniform chunks: routes per
        chunk); the reference any segment (positions and routes per key)."""
        C = self.chunk_size
        if backend == "kernels":  # whole sequences, no padding, no cache prefix: uniform chunks
            route_weight = routes.weight[:, : math.ceil(p.x.shape[1] / C)]
            return kernels.routed_softmax_attention(p.q_rot, seg.k, seg.v, route_weight, C, self.scaling)
        prefix = None if state is None else state.kept()
        return reference.softmax_branch(p.q_rot, seg.k, seg.v, seg.q_pos, seg.k_pos, keys.hard, keys.weight, C,
                                        self.scaling, prefix)

    def _gdn_segment(self, p: Projected, seg: Segment, token_mask, state) -> GdnSegment:
        """The GDN branch's inputs of the new tokens (`_gdn_inputs`, the conv going on from the state's window), behind
        the cached open chunk's (the state's `gdn_k`, `gdn_g`, `gdn_beta`, `open_v`)."""
        q_g, k_g, beta, g, conv_state = self._gdn_inputs(p.x, p.q, p.k, None if token_mask is None else seg.valid,
                                                         None if state is None else state.conv_state)
        if state is None:
            return GdnSegment(q_g, k_g, p.v, g, beta, conv_state)
        k_g, g, beta = (torch.cat([cached, t], 1) for cached, t in ((state.gdn_k, k_g), (state.gdn_g, g),
                                                                     (state.gdn_beta, beta)))
        return GdnSegment(q_g, k_g, torch.cat([state.open_v, p.v], 1), g, beta, conv_state)

    def _gdn_branch(self, backend: str, gdn: GdnSegment, seg: Segment, keys: KeyRoutes, state,
                    to_cache: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gated delta rule over the segment, linear-routed complete chunks writing with beta (1 - m), everything
        else with 0; read out inter-chunk -> o_gdn [B, n, Hq, V] fp32, and (to_cache) the state at the open chunk's
        start [B, Hkv, K, V] fp32, from the state's `gdn_state` (the segment's first chunk's start)."""
        C = self.chunk_size
        beta = gdn.beta * (1.0 - keys.weight) * keys.complete[..., None]  # [B, S, Hkv]
        if backend == "kernels":
            return kernels.routed_gdn_readout(gdn.q, gdn.k, gdn.v, gdn.g, beta, C, self.scaling)
        init = None if state is None else state.gdn_state
        until = seg.open_chunk(C) if to_cache else None
        return reference.gdn_branch(gdn.q, gdn.k, gdn.v, gdn.g, beta, seg.q_pos, seg.k_pos, C, self.scaling, init,
                                    until)

    def _gdn_open_chunk(self, x, seg: Segment, gdn: GdnSegment, gdn_start: torch.Tensor, state) -> dict:
        """The GDN fields of the chunk a multi-token call leaves open (`NatslLayerState.write_segment_`'s gdn_open):
        its tokens' GDN keys, gates and write strengths by slot, the chunk written as if it closes linear on top of
        gdn_start (the state at its start) and its decay so far (what a decode step goes on from), the conv window,
        and the router's sum of its hidden states (x [B, n, D]: the new ones, plus the state's if the chunk was open
        before the call)."""
        C = self.chunk_size
        open_chunk = seg.open_chunk(C)
        router_sum = gather_open(x.float(), seg.q_pos, open_chunk, C).sum(1)  # [B, D]
        if state is not None:
            same_chunk = (open_chunk == torch.div(state.seen, C, rounding_mode="floor"))[:, None]
            router_sum = router_sum + state.router_sum * same_chunk
        open_k, open_g, open_beta, open_v = (gather_open(t.detach(), seg.k_pos, open_chunk, C)
                                             for t in (gdn.k, gdn.g, gdn.beta, gdn.v))  # [B, C, Hkv, *]
        return {
            "gdn_k": open_k, "gdn_g": open_g, "gdn_beta": open_beta,
            "gdn_run": reference.gdn_chunk_write(gdn_start.detach(), open_k, open_v, open_g, open_beta),
            "gdn_decay": open_g.sum(1), "conv_state": gdn.conv_state.detach(), "router_sum": router_sum.detach(),
        }

    def _gdn_inputs(self, x, q, k, valid_new, conv_state):
        """`reference.gdn_inputs` of the new tokens x [B,n,D] (q, k: their projections before RoPE)."""
        return reference.gdn_inputs(q, k, self.a_proj(x), self.b_proj(x), self.gdn_conv.weight, self.A_log,
                                    self.dt_bias, conv_state, valid_new)

    def _combine(self, o: torch.Tensor, o_gdn: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """o + alpha_h * RMSNormGated(o_gdn, gdn_gate_proj x); o, o_gdn: [B,n,Hq,D]."""
        z = self.gdn_gate_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        gated = self.gdn_norm(o_gdn.to(x.dtype)) * F.silu(z)
        return o + gated * self.gdn_alpha.to(x.dtype)[:, None]

    def _decode(self, p: Projected, token_mask, cache):
        """One token per row against the cache layer's state, in place (a row whose token is padding, token_mask
        False, leaves its state unchanged); against a preallocated state with fixed shapes and no host sync.
        The token is written into the open chunk and into `gdn_run`; the output reads the kept KV + the
        open chunk (softmax) and the chunk-start GDN state; then every row whose chunk the token completes
        closes it: routed by the router (sinks and overrides as in `_route`), appended to the kept KV
        (softmax, if it fits) or committed to the GDN state (linear). A NatslCache first makes room for one more
        chunk in every (row, group) (`reserve_chunk`), so it always fits there."""
        x, q, k, v = p.x, p.q, p.k, p.v
        valid = self._real_token(x, token_mask)  # [B]
        cache.reserve_chunk()
        state = cache.state
        ops = self._decode_ops(x)[1]
        # the token's GDN branch: conv window, gates, open-chunk slot, gdn_run write, readout
        o_gdn = ops.gdn_decode_step(
            q[:, 0].flatten(1), k[:, 0].flatten(1), v[:, 0], self.a_proj(x[:, 0]), self.b_proj(x[:, 0]), valid,
            self.gdn_conv.weight, self.A_log, self.dt_bias, state, self.scaling,
        )  # [B, Hq, V] fp32
        o = self._decode_softmax(ops, p, valid, cache)  # [B, 1, Hq, Dv]
        out = self._output(self._combine(o, o_gdn[:, None], x), x)

        closing = self._closing(state, valid)  # [B]
        softmax, routable = self._route_open_chunk(state, closing)  # [B, Hkv], [B]
        ops.close_chunk(state, closing, softmax, routable)
        state.seen.add_(valid.long())
        return out, self.decode_routing(x)

    def _route_open_chunk(self, state: NatslLayerState, closing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router on a decode step: the route of the open chunk, decided in the rows whose token closes it
        (closing [B] bool; sinks and overrides as in `_route`) -> softmax [B, Hkv] bool, routable [B] bool."""
        C = self.chunk_size
        chunk = torch.div(state.seen, C, rounding_mode="floor")  # [B] the chunk the token belongs to
        routable = chunk >= self.config.num_sink_chunks
        scores = self.router(state.router_sum / C)  # [B, Hkv, 2]
        routes = decide_routes(scores[:, None], closing[:, None], ~routable[:, None],
                               self.config.router_temperature, self.config.route_override, self.num_kv_heads)
        return routes.hard[:, 0], routable
