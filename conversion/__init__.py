"""Conversion of pretrained Llama / Mistral / Qwen2 / Qwen3 checkpoints to NAtS-L (SPEC.md section 5).

`convert_model` converts a loaded model in memory; `convert_checkpoint` reads a checkpoint
directory, GGUF file or model object and writes a NAtS-L checkpoint (CLI: `natsl-convert`).
The per-family config and weight maps live in `families.py`.
"""

from .convert import ConversionError, convert_checkpoint, convert_model
from .families import FAMILIES, UnsupportedModelError

__all__ = ["FAMILIES", "ConversionError", "UnsupportedModelError", "convert_checkpoint", "convert_model"]
