"""Where the decoder layers and the NAtS-L attentions are in a causal LM, through DDP / FSDP / PEFT wrappers.

Recovery training reads and writes per-layer state (hooks on the source's layers, the NAtS-L routers) of
models that the Trainer may have wrapped; these helpers find the Llama-style `model.model.layers` behind
the wrappers once, for every file of the recovery recipe.
"""

from __future__ import annotations

from torch import nn

from natsl_hf.modeling import NatslAttention


def unwrap(model: nn.Module) -> nn.Module:
    """The NatslForCausalLM / source *ForCausalLM behind DDP / FSDP / PEFT wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        else:
            return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """`model.model.layers` of a Llama-style causal LM (NAtS-L or source), through wrappers."""
    base = unwrap(model)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(base).__name__} has no `model.layers`: natsl-distill needs a Llama/Qwen2/Qwen3-style "
            "causal LM (the source) and a NatslForCausalLM (the converted model)."
        )
    return layers


def natsl_layer_indices(model: nn.Module) -> list[int]:
    """Indices of the decoder layers whose attention is NAtS-L (config.natsl_layers)."""
    return [i for i, layer in enumerate(decoder_layers(model)) if isinstance(layer.self_attn, NatslAttention)]


def natsl_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers whose attention is NAtS-L, in order."""
    layers = decoder_layers(model)
    return [layers[i] for i in natsl_layer_indices(model)]
