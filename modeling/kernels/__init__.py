"""CUDA (Triton) kernels for the two NAtS-L branches. See README.md in this folder.

routed_softmax_attention(q, k, v, route_weight, chunk_size, scale) -> o
routed_gdn_readout(q, k, v, g, beta, chunk_size, scale, initial_state=None) -> (o, open_chunk_state)
kernels_available(tensor) -> bool
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["routed_softmax_attention", "routed_gdn_readout", "kernels_available"]


def _importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
        return True
    except Exception:
        return False


def _fla_importable() -> bool:
    try:
        from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h  # noqa: F401
        from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra  # noqa: F401
        from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd, recompute_w_u_fwd  # noqa: F401
        return True
    except Exception:
        return False


def kernels_available(tensor: torch.Tensor) -> bool:
    """True when the kernel path can run for tensors on this tensor's device: a CUDA tensor with
    triton and the fla chunk pieces importable. Under TRITON_INTERPRET=1 also CPU tensors (tests):
    there the fla pieces are replaced by torch (see gdn_branch.py)."""
    if not _importable():
        return False
    if tensor.device.type == "cuda":
        return _fla_importable()
    return tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _one_dtype(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The kernels' tensor-core operands in one dtype. The layer hands them over mixed under autocast
    (v from a projection in bf16, L2-normalised GDN q/k and the RoPE'd softmax q/k in fp32): then the
    autocast dtype, as for any matmul under autocast; otherwise the promoted dtype of the inputs.
    The casts sit outside the autograd Functions, so each gradient comes back in its input's dtype."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return [t.to(dtype) for t in tensors]


def routed_softmax_attention(q, k, v, route_weight, chunk_size: int = 64, scale: float | None = None):
    from .softmax_branch import routed_softmax_attention as _f
    q, k, v = _one_dtype(q, k, v)
    return _f(q, k, v, route_weight, chunk_size, scale)


def routed_gdn_readout(q, k, v, g, beta, chunk_size: int = 64, scale: float | None = None, initial_state=None):
    from .gdn_branch import routed_gdn_readout as _f
    q, k, v, beta = _one_dtype(q, k, v, beta)
    return _f(q, k, v, g, beta, chunk_size, scale, initial_state)
