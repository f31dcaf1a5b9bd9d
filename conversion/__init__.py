"""Conversion of pretrained Llama / Mistral / Qwen2 / Qwen3 checkpoints to NAtS-L (SPEC.md section 5).

`convert_model` converts a loaded model in memory; `convert_checkpoint` reads a checkpoint
directory, GGUF file or model object and writes a NAtS-L checkpoint (CLI: `natsl-convert`).
The per-family config and weight maps live in `families.py`.

Recovery training, one job a file: `data.py` (packed training blocks), `router_fit.py` (routers
fitted to the source attention, biases calibrated to the budget), `trainer.py` (`NatslDistillTrainer`:
stage 1 attention transfer, stage 2 LM / KD, freezing, LoRA) and `distill.py` (the `natsl-distill`
command line); `layers.py` finds the layers behind DDP / FSDP / PEFT wrappers.

The names below are imported on first use, so that the command lines in this package start without
torch (their `--help` and usage errors answer at once).
"""

import importlib as _importlib

_EXPORTS = {
    "ConversionError": ".sources",
    "convert_checkpoint": ".convert",
    "convert_model": ".convert",
    "FAMILIES": ".families",
    "UnsupportedModelError": ".families",
}

__all__ = ["FAMILIES", "ConversionError", "UnsupportedModelError", "convert_checkpoint", "convert_model"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
