"""Recover a converted NAtS-L model's quality with two `Trainer` stages (SPEC.md section 5).

Stage 1 -- attention transfer (LoLCATs / RADLADS practice).
    Only the new NAtS-L parameters train (router, GDN conv / gates / output norm and gate,
    alpha); every weight copied from the source stays frozen. Each NAtS-L layer is fed the
    *source model's* input to that layer (captured with forward pre-hooks on a frozen copy of
    the source running alongside) and its attention output is matched to the source layer's
    attention output (captured with forward hooks), so the layers train independently and the
    target is exactly what the source attention computes. The loss is

        align_loss  = mean over NAtS-L layers of ||o_natsl - o_src||^2 / ||o_src||^2
        loss        = align_loss + router_loss

    where `router_loss` is, by default, the supervised-routing loss (modeling/router.py): each
    NAtS-L layer routes the `softmax_budget` fraction of chunks that the source attention's later
    queries attend to most as softmax and the rest to GDN, and its router learns these targets
    with a binary cross-entropy (`router_loss_weight` times it). The GDN branch thus learns exactly
    the chunks it will be given. Before training, each router is fitted to those targets outright
    (`fit_routers`: a logistic regression on the source's activations, the convex problem the
    cross-entropy poses; a few hundred SGD steps barely move a router off the class prior). At the
    end of stage 1 the router biases are calibrated
    (`calibrate_router_bias`): per layer and KV head, the score threshold moves so that argmax
    routing keeps `softmax_budget` of the routable chunks of the training blocks as softmax,
    which inference then does without any budget logic. `supervised_routing=False` (CLI
    `--no-supervised-routing`) instead routes by the router itself with the budget hinge
    `router_loss_weight * (mean p_softmax - softmax_budget)_+^2` per layer (SPEC.md section 2); on
    a converted model that hinge drifts every chunk to GDN together (measured, router.py).
    The alignment is relative (scale-free per layer) so that it and the router loss are
    commensurate for any model width.

Stage 2 -- end-to-end fine-tuning.
    `loss = lm_loss + kd_weight * T^2 KL(p_src(T) || p_natsl(T))` on all parameters but the
    router, or on LoRA adapters (PEFT) on q/k/v/o and the new projections (a_proj, b_proj,
    gdn_gate_proj). The router stays frozen at its calibrated stage-1 state (routes: its argmax,
    no gradient through it), and its bias is calibrated to the budget again at the end, since the
    backbone it reads has changed; `train_router=True` (CLI `--train-router`) trains it too, with
    the straight-through routes and `+ router_loss` (the budget term), and no calibration. With
    LoRA the small GDN parameters keep their stage-1 values.

Both stages log, every logging step, through `Trainer.log` (console / TensorBoard / W&B):
`softmax_fraction` (over routable chunks, as routed in training: with supervised routing, the
targets'), `router_loss`, and `align_loss` + `router_agreement` (stage 1: how often the router's
own argmax matches the targets) or `lm_loss` / `kd_loss` (stage 2), averaged over the steps since
the last log and across processes; at the end `calibration/softmax_fraction_before|after`.

Works with gradient checkpointing (non-reentrant), bf16 autocast, `accelerate launch`
(DDP; FSDP with `NatslDecoderLayer` as the wrap unit, see accelerate_configs/), resuming from
a Trainer checkpoint (`--resume`), and PEFT LoRA.

CLI::

    natsl-distill --stage 1 --model CONVERTED_DIR --source SOURCE_DIR --data TEXT_OR_DATASET \\
        --output-dir OUT [--max-steps N --lr LR --batch-size B --seq-len T --softmax-budget F \\
        --kd-weight W --kd-temperature T --lora --bf16 --gradient-checkpointing --resume [CKPT]]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments

from natsl_hf import NatslForCausalLM

from .layers import decoder_layers, natsl_layer_indices
from .layers import unwrap as _unwrap
from .router_fit import calibrate_router_bias, fit_routers

# Parameters a conversion adds to a NAtS-L layer (names relative to NatslAttention).
NATSL_PARAM_KEYS = ("router.", "gdn_conv.", "a_proj.", "b_proj.", "A_log", "dt_bias", "gdn_gate_proj.",
                    "gdn_norm.", "gdn_alpha")
# LoRA targets in stage 2: the source attention projections and the new token-wise projections.
# (The router reads `proj.weight` functionally, so it is not a LoRA target.)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "a_proj", "b_proj", "gdn_gate_proj")


# ---------------------------------------------------------------------------- model helpers
def is_natsl_parameter(name: str) -> bool:
    """Whether a (NatslForCausalLM) parameter name is one of the parameters conversion adds."""
    if ".self_attn." not in name:
        return False
    local = name.split(".self_attn.", 1)[1]
    return local.startswith(NATSL_PARAM_KEYS)


def freeze_for_stage1(model: NatslForCausalLM) -> list[str]:
    """Train only the new NAtS-L parameters; returns their names."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_natsl_parameter(name))
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(
            "The model has no NAtS-L layers (config.natsl_layers is empty), so stage 1 has nothing to train."
        )
    return trainable


def apply_lora(model: NatslForCausalLM, r: int = 16, alpha: int = 32, dropout: float = 0.0):
    """Wrap the model with PEFT LoRA adapters on q/k/v/o and the new NAtS-L projections."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is in the `train` extra
        raise ImportError("--lora needs PEFT: pip install 'natsl-hf[train]' (or pip install peft).") from err
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in present]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, config)


def check_pair(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a source model that is not the one the NAtS-L model was converted from (shapes)."""
    s, t = _unwrap(student).config, _unwrap(teacher).config
    for field in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if getattr(s, field) != getattr(t, field):
            raise ValueError(
                f"--source does not match --model: {field} is {getattr(t, field)} in the source and "
                f"{getattr(s, field)} in the NAtS-L model. Pass the checkpoint the model was converted from."
            )


class AttentionTransfer:
    """Forward hooks that feed each NAtS-L layer the source's layer input and collect both attention outputs.

    Teacher side: a pre-hook on each source decoder layer records its input hidden states, a hook
    on its `self_attn` records the attention output (before the residual). Student side: a pre-hook
    on each NAtS-L decoder layer replaces its input with the recorded source input (so layers train
    independently and the target is exact), and a hook on `self_attn` records its output.
    The hooks act only while `enabled` is True (the trainer enables them for the forward *and* backward
    of each training step, since recomputation under gradient checkpointing re-runs them with the same
    recorded tensors); otherwise both models run untouched. `remove()` detaches them.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        self.enabled = False
        self.layers = natsl_layer_indices(student)
        self.teacher_in: dict[int, torch.Tensor] = {}
        self.teacher_out: dict[int, torch.Tensor] = {}
        self.student_out: dict[int, torch.Tensor] = {}
        self.handles = []
        s_layers, t_layers = decoder_layers(student), decoder_layers(teacher)
        for i in self.layers:
            self.handles += [
                t_layers[i].register_forward_pre_hook(self._save_teacher_input(i), with_kwargs=True),
                t_layers[i].self_attn.register_forward_hook(self._save(self.teacher_out, i)),
                s_layers[i].register_forward_pre_hook(self._inject_teacher_input(i), with_kwargs=True),
                s_layers[i].self_attn.register_forward_hook(self._save(self.student_out, i)),
            ]

    def _save_teacher_input(self, i):
        def hook(module, args, kwargs):
            if self.enabled:
                self.teacher_in[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def _inject_teacher_input(self, i):
        def hook(module, args, kwargs):
            if not self.enabled:
                return None
            if i not in self.teacher_in:
                raise RuntimeError("AttentionTransfer: run the source model on the batch before the NAtS-L model.")
            hidden = self.teacher_in[i].to(dtype=(args[0] if args else kwargs["hidden_states"]).dtype)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        return hook

    def _save(self, store, i):
        def hook(module, args, output):
            if self.enabled:
                store[i] = output[0] if isinstance(output, tuple) else output
        return hook

    def clear(self):
        self.teacher_in.clear()
        self.teacher_out.clear()
        self.student_out.clear()

    def loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over NAtS-L layers of the relative squared error of the attention outputs."""
        losses = []
        for i in self.layers:
            s, t = self.student_out[i].float(), self.teacher_out[i].float()
            if attention_mask is not None:
                m = attention_mask[..., None].to(s.dtype)
                err = ((s - t) ** 2 * m).sum() / (t**2 * m).sum().clamp_min(1e-12)
            else:
                err = ((s - t) ** 2).sum() / (t**2).sum().clamp_min(1e-12)
            losses.append(err)
        return torch.stack(losses).mean()

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def route_budget_loss(routes, config) -> torch.Tensor:
    """Sum over NAtS-L layers of `router_loss_weight * (mean m - softmax_budget)_+^2` over routable chunks,
    with m = h + p - stopgrad(p) the straight-through route weight (value: the hard route)."""
    total = None
    for r in routes:
        n = r.routable.sum()
        if n == 0:
            term = r.weight.sum() * 0.0
        else:
            frac = (r.weight * r.routable).sum() / n
            term = config.router_loss_weight * torch.relu(frac - config.softmax_budget) ** 2
        total = term if total is None else total + term
    return total


def kd_loss(student_logits, teacher_logits, temperature: float, attention_mask=None) -> torch.Tensor:
    """`T^2 KL(softmax(t/T) || softmax(s/T))` per token, averaged over real tokens."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    if attention_mask is not None:
        m = attention_mask.to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp_min(1) * temperature**2
    return kl.mean() * temperature**2


# ---------------------------------------------------------------------------- Trainer
class NatslDistillTrainer(Trainer):
    """`Trainer` for both NAtS-L recovery stages (see the module docstring).

    Args:
        stage: 1 (attention transfer, only new parameters) or 2 (LM loss + optional logit KD).
        teacher: the frozen source model (required for stage 1 and for stage 2 with kd_weight > 0).
        kd_weight, kd_temperature: stage-2 logit distillation weight and temperature.
        budget_on: "prob" (default) uses the model's router loss, a hinge on the mean router probability
            p (SPEC.md section 2). "route" replaces it by the same hinge on the straight-through route
            weight m (value: the realised hard fraction, gradient: that of p), so the penalty stops once
            the *realised* fraction is within budget; with "prob", homogeneous p ~ budget < 0.5 routes
            every chunk to GDN (realised fraction 0). Not used by supervised routing.
        supervised_routing: stage 1 only (default True): route by the source attention's heavy-hitter
            chunks and train the router on them (module docstring); False routes by the router itself.
        train_router: stage 2 only (default False): keep training the router (straight-through routes and
            the budget term). By default stage 2 freezes it: routes are the calibrated stage-1 router's argmax,
            no gradient reaches the router or flows through its input, and the backbone adapts to that
            routing; the bias is recalibrated at the end. (A router trained on by the straight-through
            gradient under a one-sided budget hinge drifts off the calibrated fraction: on SmolLM2-135M at
            budget 0.25 it fell from 0.30 to 0.17 in 16 steps in an early run of this recipe;
            `bench/smollm2_recover.py --stage2-train-router` measures it for the current one.)
        Everything else is passed to `Trainer` (model, args, train_dataset, data_collator, callbacks, ...).
    """

    def __init__(self, *args, stage: int, teacher: nn.Module | None = None, kd_weight: float = 0.0,
                 kd_temperature: float = 1.0, budget_on: str = "prob", supervised_routing: bool = True,
                 train_router: bool = False, **kwargs):
        if stage not in (1, 2):
            raise ValueError(f"stage={stage!r}: expected 1 (attention transfer) or 2 (LM / KD fine-tuning).")
        if (stage == 1 or kd_weight > 0) and teacher is None:
            raise ValueError(f"stage {stage}{' with kd_weight > 0' if stage == 2 else ''} needs the source model "
                             "as `teacher` (CLI: --source SOURCE_DIR).")
        if kd_temperature <= 0:
            raise ValueError(f"kd_temperature={kd_temperature}: expected > 0.")
        if budget_on not in ("prob", "route"):
            raise ValueError(f"budget_on={budget_on!r}: expected 'prob' (the model's router loss) or 'route'.")
        super().__init__(*args, **kwargs)
        self.stage, self.kd_weight, self.kd_temperature = stage, kd_weight, kd_temperature
        self.budget_on = budget_on
        self.teacher = None
        if teacher is not None:
            check_pair(self.model, teacher)
            self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.transfer = AttentionTransfer(self.model, self.teacher) if stage == 1 else None
        if stage == 1:
            self.router_mode = "supervised" if supervised_routing else "learned"
        else:
            self.router_mode = "learned" if train_router else "frozen"
        if train_router and hasattr(self.model, "get_base_model"):
            raise ValueError("train_router=True with a PEFT (LoRA) model would leave the router frozen: PEFT trains "
                             "only the adapters. Train the router without LoRA, or keep it frozen.")
        for i in natsl_layer_indices(self.model):
            attn = decoder_layers(self.model)[i].self_attn
            attn.router_mode = self.router_mode
            if self.router_mode == "frozen":
                attn.router.requires_grad_(False)
        # our loss is a per-batch mean (it ignores num_items_in_batch): Trainer must divide it by the
        # gradient-accumulation steps. transformers >= 5.2x reads `loss_is_scaled_for_ga`; earlier 5.x
        # releases divide only when the model does not take loss kwargs (NatslForCausalLM does).
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.transfer is None:
            return super().training_step(model, inputs, num_items_in_batch)
        self.transfer.enabled = True  # forward, and backward (recomputation under gradient checkpointing)
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self.transfer.enabled = False
            self.transfer.clear()

    def _router_loss(self, outputs, like: torch.Tensor) -> torch.Tensor:
        if self.router_mode == "frozen":
            return like.new_zeros(())
        if self.budget_on == "prob" or self.router_mode == "supervised":
            return outputs.router_loss if outputs.router_loss is not None else like.new_zeros(())
        return route_budget_loss(outputs.routes, _unwrap(self.model).config)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if self.budget_on == "route" and self.router_mode == "learned":
            inputs["output_routes"] = True
        mask = inputs.get("attention_mask")
        if self.stage == 1:
            if not self.transfer.enabled:
                raise RuntimeError("Stage-1 losses are defined for training steps only (no evaluation loop).")
            inputs.pop("labels", None)
            self.transfer.clear()
            with torch.no_grad():
                self.teacher.model(input_ids=inputs["input_ids"], attention_mask=mask, use_cache=False)
            # logits are not used in stage 1: compute them for the last position only
            outputs = model(**inputs, use_cache=False, logits_to_keep=1)
            align = self.transfer.loss(mask)
            router = self._router_loss(outputs, align)
            loss = align + router
            metrics = {"align_loss": align, "router_loss": router}
        else:
            outputs = model(**inputs, use_cache=False)
            if outputs.lm_loss is None:
                raise ValueError("Stage 2 needs `labels` in the batch (load_packed_dataset provides them).")
            router = self._router_loss(outputs, outputs.lm_loss)
            loss = outputs.lm_loss + router
            metrics = {"lm_loss": outputs.lm_loss, "router_loss": router}
            if self.kd_weight > 0:
                with torch.no_grad():
                    t_logits = self.teacher(input_ids=inputs["input_ids"], attention_mask=mask, use_cache=False).logits
                kd = kd_loss(outputs.logits, t_logits, self.kd_temperature, mask)
                loss = loss + self.kd_weight * kd
                metrics["kd_loss"] = kd
        if outputs.softmax_fraction is not None:
            metrics["softmax_fraction"] = outputs.softmax_fraction
        if outputs.router_agreement is not None:
            metrics["router_agreement"] = outputs.router_agreement
        if model.training:
            for key, value in metrics.items():
                self._metrics[key].append(value.detach().float())
        return (loss, outputs) if return_outputs else loss

    def _blocks(self, num_blocks: int, dataset=None) -> list[dict]:
        """The first `num_blocks` blocks of `dataset` (default: the training blocks) as device batches:
        the same blocks on every process, so what is computed from them is the same on every replica."""
        from torch.utils.data import DataLoader, Subset

        dataset = self.train_dataset if dataset is None else dataset
        dataset = Subset(dataset, range(min(num_blocks, len(dataset))))
        loader = DataLoader(dataset, batch_size=self.args.per_device_train_batch_size, collate_fn=self.data_collator)
        return [{k: v.to(self.args.device) for k, v in b.items() if k in ("input_ids", "attention_mask")}
                for b in loader]

    def _router_access(self):
        """(model to run, apply_in) for router fitting / calibration: under FSDP the wrapped model and a
        summon of one decoder layer (an FSDP unit) at a time to write its router; else the model, None."""
        if not getattr(self, "is_fsdp_enabled", False):
            return self.model, None
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not isinstance(self.model_wrapped, FullyShardedDataParallel):
            # before train() wraps it (Trainer then sets model = model_wrapped = the FSDP module), and
            # Trainer leaves an FSDP model on the CPU
            self.model.to(self.args.device)
            return self.model, None

        def apply_in(unit):
            return FullyShardedDataParallel.summon_full_params(unit, writeback=True)

        return self.model_wrapped, apply_in

    def fit_routers(self, num_blocks: int = 64, dataset=None, l2: float = 0.1) -> dict[str, float]:
        """`fit_routers` on the first `num_blocks` blocks of `dataset` (default: the training blocks);
        logs and returns the fit's statistics. Meant for the start of stage 1 (supervised routing)."""
        model, apply_in = self._router_access()
        result = fit_routers(model, self._blocks(num_blocks, dataset), l2=l2, apply_in=apply_in)
        self.log({f"router_fit/{k}": v for k, v in result.items()})
        return result

    def calibrate_routers(self, num_blocks: int = 32, dataset=None) -> dict[str, float]:
        """`calibrate_router_bias` on the first `num_blocks` blocks of `dataset` (default: the training
        blocks); logs and returns the realised softmax fraction before and after."""
        model, apply_in = self._router_access()
        budget = _unwrap(self.model).config.softmax_budget
        result = calibrate_router_bias(model, self._blocks(num_blocks, dataset), budget, apply_in=apply_in,
                                       stop_early=apply_in is None)  # an FSDP forward must not be cut short
        self.log({f"calibration/{k}": v for k, v in result.items()})
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the NAtS-L metrics (mean since the last log, across processes) to the Trainer logs."""
        if self._metrics and "loss" in logs:
            for key, values in self._metrics.items():
                value = torch.stack(values).nanmean().to(self.args.device)
                value = self.accelerator.reduce(value, reduction="mean")
                logs[key] = round(float(value), 6)
            self._metrics.clear()
        super().log(logs, start_time)


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="natsl-distill",
        description="Recover a converted NAtS-L model: stage 1 (attention transfer, new parameters only) "
        "or stage 2 (LM loss + optional logit KD, full or LoRA) with transformers.Trainer.",
    )
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--model", required=True, help="converted NAtS-L checkpoint directory (natsl-convert output)")
    p.add_argument("--source", help="source checkpoint directory (the model converted from); stage 1 and KD")
    p.add_argument("--data", required=True, help="text file, directory of .txt/.md files, or save_to_disk dataset")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3 stage 1, 2e-5 stage 2, "
                   "2e-4 stage 2 with --lora)")
    p.add_argument("--batch-size", type=int, default=1, help="per-device batch size")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-blocks", type=int, default=None, help="use at most this many packed blocks")
    p.add_argument("--softmax-budget", type=float, default=None, help="override config.softmax_budget")
    p.add_argument("--router-loss-weight", type=float, default=None, help="override config.router_loss_weight")
    p.add_argument("--budget-on", choices=("prob", "route"), default="prob",
                   help="budget hinge on the mean router probability (model's router loss, default) or on the "
                   "straight-through route weight, i.e. the realised fraction (see NatslDistillTrainer)")
    p.add_argument("--no-supervised-routing", action="store_true",
                   help="stage 1: route by the router with the budget hinge instead of by the source attention's "
                   "heavy-hitter chunks (see NatslDistillTrainer)")
    p.add_argument("--train-router", action="store_true",
                   help="stage 2: keep training the router (default: frozen at its calibrated stage-1 state)")
    p.add_argument("--router-fit-blocks", type=int, default=64,
                   help="stage 1: blocks (of --calibration-seq-len tokens) the routers are first fitted on, by "
                   "logistic regression to the source attention's targets (0: start from the converted routers)")
    p.add_argument("--router-fit-l2", type=float, default=0.1,
                   help="L2 penalty of that fit, on standardised features (see bench/router_probe.py)")
    p.add_argument("--calibration-blocks", type=int, default=32,
                   help="blocks used to calibrate the router biases to the budget at the end of stage 1 and of "
                   "stage 2 with a frozen router (0: no calibration)")
    p.add_argument("--calibration-seq-len", type=int, default=None,
                   help="tokens per calibration / router-fit block (default --seq-len). The realised fraction of a "
                   "fixed router grows with context length: calibrate at the length the model will serve")
    p.add_argument("--kd-weight", type=float, default=0.0, help="stage 2: weight of the logit KD term")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--lora", action="store_true", help="stage 2: train LoRA adapters instead of all weights")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="resume from the last checkpoint in --output-dir, or from the given checkpoint dir")
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--save-steps", type=int, default=500)
    p.add_argument("--save-total-limit", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-to", default="none", help="Trainer report_to (e.g. tensorboard, wandb, none)")
    p.add_argument("--no-save-final", action="store_true", help="do not write the final model to --output-dir")
    return p


def _load_tokenizer(*dirs):
    from transformers import AutoTokenizer

    errors = []
    for d in dirs:
        if d is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(d)
        except (OSError, ValueError) as err:
            errors.append(f"{d}: {err}")
    raise OSError("No tokenizer found in --model or --source; save one beside the checkpoint "
                  "(tokenizer.save_pretrained(dir)).\n" + "\n".join(errors))


def load_source(path: str, dtype=torch.float32):
    """The frozen source model (eval mode, no grad)."""
    from transformers import AutoModelForCausalLM

    import natsl_hf  # noqa: F401  (a NAtS-L checkpoint may serve as source too)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval().requires_grad_(False)


def training_arguments(args, stage: int) -> TrainingArguments:
    lr = args.lr if args.lr is not None else (1e-3 if stage == 1 else (2e-4 if args.lora else 2e-5))
    return TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        learning_rate=lr,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        warmup_steps=args.warmup_ratio,
        weight_decay=args.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        report_to=args.report_to,
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        dataloader_drop_last=True,
        disable_tqdm=False,
    )


def prepare_student(model: NatslForCausalLM, stage: int, *, lora: bool = False, lora_r: int = 16,
                    lora_alpha: int = 32, softmax_budget: float | None = None,
                    router_loss_weight: float | None = None):
    """Set the budget overrides and the trainable parameters for `stage`; returns the model to train."""
    if softmax_budget is not None:
        model.config.softmax_budget = float(softmax_budget)
    if router_loss_weight is not None:
        model.config.router_loss_weight = float(router_loss_weight)
    model.config._validate_natsl()
    model.config.use_cache = False
    if stage == 1:
        if lora:
            raise ValueError("--lora applies to stage 2; stage 1 already trains only the new NAtS-L parameters.")
        freeze_for_stage1(model)
        return model
    model.requires_grad_(True)
    return apply_lora(model, lora_r, lora_alpha) if lora else model


def check_routable(config, seq_len: int) -> None:
    need = (config.num_sink_chunks + 1) * config.chunk_size
    if config.natsl_layers and seq_len < need:
        raise ValueError(
            f"--seq-len {seq_len} leaves no routable chunk (chunk_size={config.chunk_size}, "
            f"num_sink_chunks={config.num_sink_chunks}): use --seq-len >= {need}, a multiple of the chunk size."
        )


def model_config(trainer: NatslDistillTrainer):
    return _unwrap(trainer.model).config


def save_final(trainer: NatslDistillTrainer, output_dir: str, tokenizer=None, model_dir: str | None = None,
               training_note: str | None = None) -> None:
    """Write the trained NAtS-L model (LoRA merged) with save_pretrained (keeps auto_map), and a model
    card: base model, license and conversion command carried from `model_dir`'s card (the checkpoint
    training started from), and the recovery training so far (`model_dir`'s plus `training_note`),
    which is also kept in natsl_metrics.json for the next stage and for natsl-hub."""
    from natsl_hf.hub import METRICS_FILE, card_provenance, render_model_card

    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # PEFT
        trainer.accelerator.wait_for_everyone()
        model = trainer.accelerator.unwrap_model(model).merge_and_unload() if trainer.is_world_process_zero() else None
        if model is not None:
            model.config.use_cache = True
            model.save_pretrained(output_dir)
    else:
        model = _unwrap(model)
        model.config.use_cache = True
        trainer.save_model(output_dir)
    if not trainer.is_world_process_zero():
        return
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    known = card_provenance(model_dir) if model_dir is not None else {}
    training = "; ".join(t for t in (known.get("training"), training_note) if t)
    metrics = {"training": training} if training else None
    card = render_model_card(model, base_model=known.get("base_model"), license=known.get("license"),
                             conversion_command=known.get("conversion_command"), metrics=metrics)
    Path(output_dir, "README.md").write_text(card, encoding="utf-8")
    if metrics:
        Path(output_dir, METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def training_summary(trainer: NatslDistillTrainer, args: argparse.Namespace, calibrated: str | None = None,
                     fitted: str | None = None) -> str:
    """One line for the model card: which stage ran, how many tokens, and how the router was treated
    (`fitted` / `calibrated`: the blocks the routers were fitted / their biases calibrated on, if so)."""
    blocks = args.batch_size * args.grad_accum * trainer.args.world_size
    tokens = trainer.state.global_step * blocks * args.seq_len
    router = {"supervised": "supervised routing", "learned": "router trained with the budget term",
              "frozen": "router frozen"}[trainer.router_mode]
    if fitted:
        router += f", routers first fitted to the targets on {fitted}"
    if calibrated:
        router += f", router bias calibrated to the budget on {calibrated}"
    what = "attention transfer, new parameters only" if args.stage == 1 else (
        "LM loss" + (f" + logit KD (weight {args.kd_weight:g})" if args.kd_weight > 0 else "")
        + (", LoRA" if args.lora else ", all parameters"))
    note = (f"stage {args.stage} ({what}; {router}; softmax budget {model_config(trainer).softmax_budget:g}): "
            f"{trainer.state.global_step} steps x {blocks} blocks x {args.seq_len} tokens = {tokens:,} tokens")
    command = getattr(args, "command", None)
    return note + (f", `{command}`" if command else "")


def train(args: argparse.Namespace, callbacks=None) -> NatslDistillTrainer:
    """Run one stage as parsed by `build_parser()`; returns the trainer (model trained, final model saved).
    `callbacks`: extra `TrainerCallback`s (e.g. a step timer) passed to the Trainer."""
    from .data import load_packed_dataset

    if args.stage == 1 and not args.source:
        raise SystemExit("natsl-distill: stage 1 needs --source SOURCE_DIR (the model that was converted).")
    if args.stage == 2 and args.kd_weight > 0 and not args.source:
        raise SystemExit("natsl-distill: --kd-weight > 0 needs --source SOURCE_DIR (the KD teacher).")
    if not Path(args.model, "config.json").exists():
        raise SystemExit(f"natsl-distill: --model {args.model} has no config.json; pass a natsl-convert output dir.")
    router_learned = (args.stage == 1 and args.no_supervised_routing) or (args.stage == 2 and args.train_router)
    for flag, given, applies in (
        ("--train-router", args.train_router, "stage 2 (stage 1 always trains the router)"),
        ("--no-supervised-routing", args.no_supervised_routing, "stage 1"),
        ("--lora", args.lora, "stage 2"),
    ):
        if given and not applies.startswith(f"stage {args.stage}"):
            raise SystemExit(f"natsl-distill: {flag} applies to {applies}, not to --stage {args.stage}.")
    if args.budget_on == "route" and not router_learned:
        raise SystemExit("natsl-distill: --budget-on route only acts on a router trained with the budget term "
                         "(--stage 2 --train-router, or --stage 1 --no-supervised-routing); drop it.")
    if args.train_router and args.lora:
        raise SystemExit("natsl-distill: --train-router with --lora would leave the router frozen (PEFT trains only "
                         "the adapters); train the router without --lora, or keep it frozen.")

    model = NatslForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = _load_tokenizer(args.model, args.source)
    check_routable(model.config, args.seq_len)
    model = prepare_student(model, args.stage, lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                            softmax_budget=args.softmax_budget, router_loss_weight=args.router_loss_weight)
    teacher = None
    if args.stage == 1 or args.kd_weight > 0:
        teacher = load_source(args.source, torch.bfloat16 if args.bf16 else torch.float32)
    train_args = training_arguments(args, args.stage)
    with train_args.main_process_first(desc="tokenise and pack"):
        dataset = load_packed_dataset(args.data, tokenizer, args.seq_len, max_blocks=args.max_blocks)
    trainer = NatslDistillTrainer(
        model=model,
        args=train_args,
        train_dataset=dataset,
        stage=args.stage,
        teacher=teacher,
        kd_weight=args.kd_weight,
        kd_temperature=args.kd_temperature,
        budget_on=args.budget_on,
        supervised_routing=not args.no_supervised_routing,
        train_router=args.train_router,
        callbacks=callbacks,
    )
    seq_len = args.calibration_seq_len or args.seq_len
    long_blocks = None
    if seq_len != args.seq_len and (args.calibration_blocks > 0 or args.router_fit_blocks > 0):
        long_blocks = load_packed_dataset(args.data, tokenizer, seq_len,
                                          max_blocks=max(args.calibration_blocks, args.router_fit_blocks))
    fitted = None
    if trainer.router_mode == "supervised" and args.router_fit_blocks > 0 and not args.resume:
        result = trainer.fit_routers(args.router_fit_blocks, long_blocks, l2=args.router_fit_l2)
        fitted = (f"{min(args.router_fit_blocks, len(dataset if long_blocks is None else long_blocks))} blocks of "
                  f"{seq_len} tokens (training AUC {result['router_fit_train_auc']:.3f})")
        if trainer.is_world_process_zero():
            print(f"natsl-distill: routers fitted to the source attention's targets on {fitted}, "
                  f"{result['router_fit_chunks_per_head']:.0f} chunks a head")
    trainer.train(resume_from_checkpoint=args.resume)
    calibrated = None
    if trainer.router_mode in ("supervised", "frozen") and args.calibration_blocks > 0:
        calibration = dataset if long_blocks is None else long_blocks
        result = trainer.calibrate_routers(args.calibration_blocks, calibration)
        calibrated = f"{min(args.calibration_blocks, len(calibration))} blocks of {seq_len} tokens"
        if trainer.is_world_process_zero():
            print(f"natsl-distill: router calibrated to softmax_budget={model_config(trainer).softmax_budget}: "
                  f"realised softmax fraction {result['softmax_fraction_before']:.3f} -> "
                  f"{result['softmax_fraction_after']:.3f} on {calibrated}")
    trainer.save_state()  # trainer_state.json (log history with the NAtS-L metrics) in --output-dir
    if not args.no_save_final:
        save_final(trainer, args.output_dir, tokenizer, model_dir=args.model,
                   training_note=training_summary(trainer, args, calibrated, fitted))
    return trainer


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command = shlex.join(["natsl-distill", *argv])  # recorded on the model card
    train(args)
    return 0

if __name__ == "__main__":
    sys.exit(main())
