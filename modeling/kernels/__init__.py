"""CUDA (Triton) kernels for the two NAtS-L branches. See README.md in this folder.

routed_softmax_attention(q, k, v, route_weight, chunk_size, scale) -> o
routed_gdn_readout(q, k, v, g, beta, chunk_size, scale, initial_state=None) -> (o, open_chunk_state)
    (training: autograd Functions over the custom ops natsl::softmax_branch_fwd / _bwd and
    natsl::gdn_branch_fwd / _bwd, callable inside torch.compile(fullgraph=True))
routed_decode_attention(q, kept_k, kept_v, kept_len, open_k, open_v, seen, scale) -> o   (one decode step)
gdn_decode_step(q, k, v, a, b, valid, conv_weight, A_log, dt_bias, state, scale) -> o_gdn   (one decode step,
    the NatslLayerState updated in place)
close_chunk(state, closing, softmax, routable)   (the chunk close of a decode step, in place)
kernels_available(tensor) -> bool
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

__all__ = ["routed_softmax_attention", "routed_gdn_readout", "routed_decode_attention", "gdn_decode_step",
           "close_chunk", "kernels_available"]

KERNELS_FIX = (
    "pip install flash-linear-attention fla-core (on Hopper: pip install 'natsl-hf[hopper]'), "
    "or set config.use_kernels=False to run the reference on purpose and silence this warning"
)


@functools.cache
def _import_error(with_fla: bool) -> str | None:
    """Why the kernel modules cannot be imported ("Type: message"), or None. Imported once per process:
    a failed import is not retried on every call. `with_fla`: also fla's chunk pieces (CUDA only)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401

        if with_fla:
            from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h  # noqa: F401
            from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra  # noqa: F401
            from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd, recompute_w_u_fwd  # noqa: F401
    except Exception as err:  # not only ImportError: fla's own imports can fail otherwise (tilelang without z3)
        return f"{type(err).__name__}: {err}"
    return None


@functools.cache
def _usable_on_cuda() -> bool:
    """True when triton and fla import; otherwise warns (once per process) with the error and the fix."""
    error = _import_error(with_fla=True)
    if error is not None:
        warnings.warn(
            f"NAtS-L kernels are unavailable on CUDA ({error}): running the PyTorch reference, which is much "
            f"slower and needs more memory. Fix: {KERNELS_FIX}.",
            RuntimeWarning,
            stacklevel=3,
        )
    return error is None


def _device_type(tensor: torch.Tensor) -> str:
    return tensor.device.type


def kernels_available(tensor: torch.Tensor) -> bool:
    """True when the kernel path can run for tensors on this tensor's device: a CUDA tensor with
    triton and the fla chunk pieces importable (if not, a RuntimeWarning says why and how to fix it,
    once). Under TRITON_INTERPRET=1 also CPU tensors (tests): there the fla pieces are replaced by
    torch (see gdn_branch.py)."""
    device = _device_type(tensor)
    if device == "cuda":
        return _usable_on_cuda()
    return device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1" and _import_error(with_fla=False) is None


def _one_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest: torch.Tensor) -> list[torch.Tensor]:
    """q, k, v (and `rest`, e.g. beta) in one dtype for the kernels' tensor-core operands. The layer hands
    them over mixed: v straight from its projection (the model's compute dtype: bf16 under autocast or
    in a bf16 model), the L2-normalised GDN q/k (and beta) in fp32, the RoPE'd softmax q/k in fp32 when
    the residual stream is fp32. Under autocast: the autocast dtype, as for any matmul there; otherwise
    the lowest-precision dtype of q, k, v (a bf16 model runs its kernels in bf16, an fp32 one in fp32).
    The casts sit outside the autograd Functions, so each gradient comes back in its input's dtype."""
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = min((q.dtype, k.dtype, v.dtype), key=lambda d: torch.finfo(d).bits)
    return [t.to(dtype) for t in (q, k, v, *rest)]


def routed_softmax_attention(q, k, v, route_weight, chunk_size: int = 64, scale: float | None = None):
    q, k, v = _one_dtype(q, k, v)
    return _softmax_branch.routed_softmax_attention(q, k, v, route_weight, chunk_size, scale)


def routed_gdn_readout(q, k, v, g, beta, chunk_size: int = 64, scale: float | None = None, initial_state=None):
    q, k, v, beta = _one_dtype(q, k, v, beta)
    return _gdn_branch.routed_gdn_readout(q, k, v, g, beta, chunk_size, scale, initial_state)


try:  # imported with the package, not in the call: a compiled (torch.compile) step does not import, and the
    # training branches register their custom ops (natsl::softmax_branch_fwd / _bwd, natsl::gdn_branch_fwd / _bwd)
    from . import chunk_close as _chunk_close
    from . import decode as _decode
    from . import gdn_branch as _gdn_branch
    from . import gdn_decode as _gdn_decode
    from . import softmax_branch as _softmax_branch
except Exception:  # noqa: BLE001 - kernels_available() says why, and the layer runs the reference
    _chunk_close = _decode = _gdn_branch = _gdn_decode = _softmax_branch = None


def routed_decode_attention(q, kept_k, kept_v, kept_len, open_k, open_v, seen, scale: float | None = None):
    return _decode.routed_decode_attention(q.to(kept_k.dtype), kept_k, kept_v, kept_len, open_k, open_v, seen, scale)


def gdn_decode_step(q, k, v, a, b, valid, conv_weight, A_log, dt_bias, state, scale: float):
    return _gdn_decode.gdn_decode_step(q, k, v, a, b, valid, conv_weight, A_log, dt_bias, state, scale)


def close_chunk(state, closing, softmax, routable) -> None:
    _chunk_close.close_chunk(state, closing, softmax, routable)
