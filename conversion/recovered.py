"""Recovered NAtS-L parameters: the trained part of a recovered model, shipped apart from the source weights.

A recovery run (bench/recover_scale.py) trains the new NAtS-L parameters of every layer (router, GDN branch)
and LoRA adapters on the attention projections; the source's weights stay as they were. What it learned
therefore fits in a few tens of MB beside a checkpoint anyone can convert again from the source:

    <folder>/recovered.json                       what it is: base model, conversion settings, LoRA scale,
                                                  tokens / GPU time, the run's commands, its held-out numbers
                                                  (and layer_budget_scale when trained with per-layer budgets)
    <folder>/evaluations.json                     optional: GPU evaluations of these parameters for the model card
                                                  (natsl_hf.metrics `evaluations`; bench/card_evaluations.py writes it)
    <folder>/model-0000k-of-0000n.safetensors     the tensors (plain NatslForCausalLM names; LoRA factors as
    <folder>/model.safetensors.index.json         `<proj>.lora_A.weight` [r, in] / `<proj>.lora_B.weight` [out, r])

`apply_recovered(model, folder)` loads it into a freshly converted model: the new parameters are copied and
each projection gets its LoRA update merged in, W <- W + scale * B @ A (PEFT's merge, done here so that
applying needs no PEFT). `export_recovered(state, folder, info)` writes that layout from a training
checkpoint: the matrices and LoRA factors in bfloat16, the small tensors (router, gates, norms, decay, conv) in float32, so
that the router biases, calibrated to the budget, keep their precision.

The recovered parameters of SmolLM2-135M-Instruct at budget 0.25 ship in `recovered/` beside this file
(`SMOLLM2_RECOVERED`); the README main job applies them (conversion/smollm2.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .families import is_new_parameter

if TYPE_CHECKING:  # torch is imported where tensors are made: the main job reads recovered.json before it
    import torch

INFO_FILE = "recovered.json"
EVALUATIONS_FILE = "evaluations.json"
SMOLLM2_RECOVERED = Path(__file__).resolve().parent / "recovered" / "smollm2-135m-instruct-b0.25"
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"
_SMALL = 1 << 16  # tensors with fewer elements stay float32 (router, gates, norms, decay, conv)


def _lora_name(name: str) -> str:
    """A PEFT adapter name (`q_proj.lora_A.default.weight`) as the shipped one (`q_proj.lora_A.weight`)."""
    return name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def export_recovered(state: dict[str, torch.Tensor], folder, info: dict, max_shard_size: str = "15MB") -> list[str]:
    """Write `state` (plain names; PEFT's `.default` adapter names are accepted) to `folder` as the shipped
    layout, with `info` (must hold `lora_scale` when there are LoRA factors) as recovered.json. Returns the
    files written."""
    import torch
    from huggingface_hub import save_torch_state_dict

    state = {_lora_name(n): t for n, t in state.items()}
    unknown = [n for n in state if not (is_new_parameter(n) or n.endswith((_LORA_A, _LORA_B)))]
    if unknown:
        raise ValueError(f"{len(unknown)} tensors are neither new NAtS-L parameters nor LoRA factors, e.g. {unknown[0]}")
    if any(n.endswith(_LORA_A) for n in state) and "lora_scale" not in info:
        raise ValueError("info needs the LoRA scale (lora_alpha / r) as `lora_scale`")
    packed = {n: (t.float() if t.numel() < _SMALL and ".lora_" not in n else t.to(torch.bfloat16)).contiguous()
              for n, t in state.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(packed, folder, max_shard_size=max_shard_size)
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return sorted(p.name for p in folder.iterdir())


def read_recovered(folder) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of a shipped folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / INFO_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no recovered NAtS-L parameters ({INFO_FILE} is missing)")
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state, json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))


def apply_recovered(model, folder) -> dict:
    """Load the recovered parameters in `folder` into `model` (a NatslForCausalLM converted from the same
    source with the same settings): new parameters copied, LoRA merged into the projections. Checks that
    every new parameter of the model is covered and every tensor lands; returns recovered.json."""
    import torch

    with torch.no_grad():
        return _apply(model, Path(folder), *read_recovered(folder))


def _apply(model, folder: Path, state: dict, info: dict) -> dict:
    expected = info.get("conversion", {})
    for field, value in expected.items():
        if getattr(model.config, field, value) != value:
            raise ValueError(f"{folder} was trained on a conversion with {field}={value!r}, this model has "
                             f"{getattr(model.config, field)!r}: convert with the settings in {folder / INFO_FILE}")
    params = dict(model.named_parameters())
    missing = sorted(n for n in params if is_new_parameter(n) and n not in state)
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} new NAtS-L parameters of this model, e.g. {missing[0]}")
    scale = float(info.get("lora_scale", 0.0))
    updates = []  # (parameter, tensor to copy, or None for a LoRA merge) -- all checked before any is written
    for name, value in state.items():
        if name.endswith(_LORA_B):
            continue
        if name.endswith(_LORA_A):
            stem = name[: -len(_LORA_A)]
            target, b = params.get(stem + ".weight"), state.get(stem + _LORA_B)
            if target is None or b is None or tuple(target.shape) != (b.shape[0], value.shape[1]):
                raise ValueError(f"{folder}: the LoRA factors of {stem} do not fit this model's {stem}.weight")
            updates.append((target, (b.float() @ value.float()) * scale, True))
            continue
        if name not in params or params[name].shape != value.shape:
            raise ValueError(f"{folder}: {name} {tuple(value.shape)} has no matching parameter in this model")
        updates.append((params[name], value, False))
    for target, value, merge in updates:
        if merge:  # W <- W + scale * B @ A
            target.add_(value.to(target.dtype))
        else:
            target.copy_(value)
    if info.get("layer_budget_scale") is not None:  # trained with per-layer budgets: a recalibration keeps them
        model.config.layer_budget_scale = info["layer_budget_scale"]
    return info


__all__ = ["EVALUATIONS_FILE", "INFO_FILE", "SMOLLM2_RECOVERED", "apply_recovered", "export_recovered", "read_recovered"]
