"""The NAtS-L mechanism, independent of any model family: router, PyTorch reference, kernels,
the layer and its decode state. Imports torch (and, lazily, triton / fla) only."""

from .layer import LayerRouting, NatslAttention
from .router import NatslRouter, Routes, decide_routes, router_loss
from .state import NatslLayerState

__all__ = ["LayerRouting", "NatslAttention", "NatslLayerState", "NatslRouter", "Routes", "decide_routes", "router_loss"]
