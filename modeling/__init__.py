"""The NAtS-L mechanism, independent of any model family: router, PyTorch reference, kernels,
the layer and its decode state. Imports torch (and, lazily, triton / fla) only."""

from .layer import LayerRouting, NatslAttention, SourceAttention
from .router import NatslRouter, Routes, decide_routes, router_loss
from .softmax_attention import NatslSoftmaxAttention
from .state import NatslLayerState

__all__ = ["LayerRouting", "NatslAttention", "NatslLayerState", "NatslRouter", "NatslSoftmaxAttention", "Routes",
           "SourceAttention", "decide_routes", "router_loss"]
