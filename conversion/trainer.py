"""The `Trainer` of NAtS-L recovery: stage 1 (attention transfer) and stage 2 (LM loss + logit KD), SPEC.md section 5.

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
    the chunks it will be given. Before training the routers are fitted to those targets outright
    and at the end their biases are calibrated to the budget (conversion/router_fit.py;
    `NatslDistillTrainer.fit_routers` / `calibrate_routers`). `supervised_routing=False` instead
    routes by the router itself with the budget hinge
    `router_loss_weight * (mean p_softmax - softmax_budget)_+^2` per layer (SPEC.md section 2); on
    a converted model that hinge drifts every chunk to GDN together (measured, router.py).
    The alignment is relative (scale-free per layer) so that it and the router loss are
    commensurate for any model width.

Stage 2 -- end-to-end fine-tuning.
    `loss = lm_weight * lm_loss + kd_weight * T^2 KL(p_src(T) || p_natsl(T))` on all parameters but the
    router, or on LoRA adapters (PEFT) on q/k/v/o and the new projections (a_proj, b_proj,
    gdn_gate_proj). The router stays frozen at its calibrated stage-1 state (routes: its argmax,
    no gradient through it), and its bias is calibrated to the budget again at the end, since the
    backbone it reads has changed; `train_router=True` trains it too, with the straight-through
    routes and `+ router_loss` (the budget term), and no calibration. With LoRA the small GDN
    parameters keep their stage-1 values.

Both stages log, every logging step, through `Trainer.log` (console / TensorBoard / W&B):
`softmax_fraction` (over routable chunks, as routed in training: with supervised routing, the
targets'), `router_loss`, and `align_loss` + `router_agreement` (stage 1: how often the router's
own argmax matches the targets) or `lm_loss` / `kd_loss` (stage 2), averaged over the steps since
the last log and across processes; after a calibration `calibration/softmax_fraction_before|after`.

Works with gradient checkpointing (non-reentrant), bf16 autocast, `accelerate launch` (DDP; FSDP
with `NatslDecoderLayer` as the wrap unit, see accelerate_configs/), resuming from a Trainer
checkpoint, and PEFT LoRA. With `checkpoint_trainable_only=True` a checkpoint holds only the
trained parameters (`TRAINABLE_WEIGHTS_NAME`; with LoRA, PEFT's adapter files) besides the optimizer
and trainer state, so a run resumes from the model it started from plus ~10M parameters (SmolLM2).
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict

import safetensors.torch
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import Trainer

from natsl_hf.modeling.layer import natsl_compile, run_compiled

from .families import is_new_parameter
from .layers import decoder_layers, natsl_decoder_layers, natsl_layer_indices, unwrap
from .router_fit import LOOKED_UP, allocate_layer_budgets, calibrate_router_bias, fit_routers

# LoRA targets in stage 2: the source attention projections and the new token-wise projections.
# (The router reads `proj.weight` functionally, so it is not a LoRA target.)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "a_proj", "b_proj", "gdn_gate_proj")
# The file of a checkpoint written with checkpoint_trainable_only (not a loadable model on purpose).
TRAINABLE_WEIGHTS_NAME = "natsl_trainable.safetensors"
# Batch columns the models take (the packed datasets of conversion/data.py carry them).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


# ---------------------------------------------------------------------------- trainable parameters
def freeze_for_stage1(model: nn.Module) -> list[str]:
    """Train only the new NAtS-L parameters (conversion/families.py names them); returns their names."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_new_parameter(name))
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(
            "The model has no NAtS-L layers (config.natsl_layers is empty), so stage 1 has nothing to train."
        )
    return trainable


def apply_lora(model: nn.Module, r: int = 16, alpha: int = 32):
    """Wrap the model with PEFT LoRA adapters on q/k/v/o and the new NAtS-L projections."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is in the `train` extra
        raise ImportError("--lora needs PEFT: pip install 'natsl-hf[train]' (or pip install peft).") from err
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in present]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, config)


def prepare_student(model: nn.Module, stage: int, *, lora: bool = False, lora_r: int = 16, lora_alpha: int = 32):
    """Set the trainable parameters for `stage` (and no cache in training); returns the model to train."""
    model.config.use_cache = False
    if stage == 1:
        if lora:
            raise ValueError("--lora applies to --stage 2; stage 1 trains only the new NAtS-L parameters.")
        freeze_for_stage1(model)
        return model
    model.requires_grad_(True)
    return apply_lora(model, lora_r, lora_alpha) if lora else model


def check_pair(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a source model that is not the one the NAtS-L model was converted from (shapes)."""
    s, t = unwrap(student).config, unwrap(teacher).config
    for field in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if getattr(s, field) != getattr(t, field):
            raise ValueError(
                f"--source does not match --model: {field} is {getattr(t, field)} in the source and "
                f"{getattr(s, field)} in the NAtS-L model. Pass the checkpoint the model was converted from."
            )


def check_stage_options(stage: int, *, has_source: bool, kd_weight: float = 0.0, kd_temperature: float = 1.0,
                        budget_on: str = "prob", supervised_routing: bool = True, train_router: bool = False,
                        lora: bool = False, lm_weight: float = 1.0) -> None:
    """Refuse the options of a recovery stage that cannot run together, naming the fix: the one check of
    them, for NatslDistillTrainer and natsl-distill (whose flags are the same names, `--train_router`)."""
    if stage not in (1, 2):
        raise ValueError(f"--stage {stage!r}: expected 1 (attention transfer) or 2 (LM / KD fine-tuning).")
    if (stage == 1 or kd_weight > 0) and not has_source:
        raise ValueError(f"{'stage 1' if stage == 1 else '--kd_weight > 0'} needs the source model: --source "
                         "SOURCE_DIR, the checkpoint that was converted (NatslDistillTrainer: teacher=).")
    if kd_weight < 0 or kd_temperature <= 0:
        raise ValueError(f"--kd_weight {kd_weight} / --kd_temperature {kd_temperature}: expected a weight >= 0 "
                         "and a temperature > 0.")
    if lm_weight < 0:
        raise ValueError(f"--lm_weight {lm_weight}: expected a weight >= 0.")
    if stage == 2 and lm_weight == 0 and kd_weight == 0:
        raise ValueError("--lm_weight 0 with --kd_weight 0 leaves stage 2 without a loss: give --kd_weight > 0 "
                         "(logit KD only) or keep the LM loss.")
    if budget_on not in ("prob", "route"):
        raise ValueError(f"--budget_on {budget_on!r}: expected 'prob' (the model's router loss) or 'route'.")
    for flag, given, applies in (
        ("--train_router", train_router, 2),
        ("--no_supervised_routing", not supervised_routing, 1),
        ("--lora", lora, 2),
        ("--kd_weight", kd_weight != 0, 2),
        ("--lm_weight", lm_weight != 1, 2),
    ):
        if given and stage != applies:
            raise ValueError(f"{flag} applies to --stage {applies}, not to --stage {stage}.")
    if budget_on == "route" and not (not supervised_routing if stage == 1 else train_router):
        raise ValueError("--budget_on route only acts on a router trained with the budget term "
                         "(--stage 2 --train_router, or --stage 1 --no_supervised_routing); drop it.")
    if train_router and lora:
        raise ValueError("--train_router with --lora would leave the router frozen (PEFT trains only the "
                         "adapters); train the router without --lora, or keep it frozen.")


# ---------------------------------------------------------------------------- losses
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
    """Sum over NAtS-L layers of `router_loss_weight * (mean m - budget)_+^2` over routable chunks, with m = h + p -
    stopgrad(p) the straight-through route weight (value: the hard route) and budget the layer's
    (`config.layer_softmax_budget`). routes: one per NAtS-L layer, in `config.natsl_layers` order."""
    total = None
    for layer_idx, r in zip(config.natsl_layers, routes, strict=True):
        n = r.routable.sum()
        if n == 0:
            term = r.weight.sum() * 0.0
        else:
            frac = (r.weight * r.routable).sum() / n
            term = config.router_loss_weight * torch.relu(frac - config.layer_softmax_budget(layer_idx)) ** 2
        total = term if total is None else total + term
    return total


KD_CHUNK_TOKENS = 2048  # tokens per piece of the KD loss: its fp32 vocabulary-wide tensors stay this size


def _token_kl(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """[n, V] logits -> [n] KL(softmax(t/T) || softmax(s/T)), in fp32."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1)


@functools.cache
def _compiled_token_kl():
    """`_token_kl` through torch.compile, made once per process. Eager, a piece is ~10 vocabulary-wide fp32 passes
    (two upcasts, two log-softmaxes, the KL and their backward, again in the checkpoint's recompute); compiled, the
    softmaxes, the KL and the gradient fuse into a few passes over the bf16 logits (bench/TRAINING_NOTES.md).

    Without the C++ wrapper: with it, torch 2.11's inductor failed to build this graph's backward ("CudaKernelParamCache
    not populated for triton_red_fused__log_softmax__log_softmax_backward_data...", a stage-2 piece of 8 x 4096 on an
    H100, bench/RECOVERY_NOTES.md 2026-12-07); run_compiled now builds a backward with its forward and compiles again
    without the wrapper on such a failure, but a piece is a few vocabulary-wide kernels ([2048, 49152] fp32 each),
    GPU-bound: the launches the wrapper saves are a few per piece, not worth a failed build."""
    return natsl_compile(_token_kl, cpp_wrapper=False)


def _piece_kl(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """`_token_kl` of one piece, compiled where the NAtS-L layers are (CUDA, NATSL_COMPILE not 0, no failed compile:
    modeling.layer.run_compiled), else eagerly."""
    return run_compiled(student_logits, _token_kl, _compiled_token_kl, teacher_logits, temperature)


def kd_loss(student_logits, teacher_logits, temperature: float, attention_mask=None) -> torch.Tensor:
    """`T^2 KL(softmax(t/T) || softmax(s/T))` per token, averaged over real tokens.

    Computed `KD_CHUNK_TOKENS` tokens at a time, each piece checkpointed: the fp32 log-probabilities of both
    models are never held for the whole batch (at 16 x 2048 tokens and a 49k vocabulary they are 6.4 GB
    each, several of them kept for the backward), only the bf16 logits are."""
    V = student_logits.shape[-1]
    student, teacher = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
    kl = []
    # split, not a slice per piece: a slice's backward writes a zero tensor of the whole batch's logits around its
    # piece's gradient and autograd adds those up (with accelerate's fp32 outputs: a 6.4 GB fill and add per piece at
    # 16 x 2048, ~140 ms a step on an H100, bench/TRAINING_NOTES.md); split's backward concatenates the pieces once
    for piece in zip(student.split(KD_CHUNK_TOKENS), teacher.split(KD_CHUNK_TOKENS)):
        if torch.is_grad_enabled() and student.requires_grad:
            kl.append(torch.utils.checkpoint.checkpoint(_piece_kl, *piece, temperature, use_reentrant=False))
        else:
            kl.append(_piece_kl(*piece, temperature))
    kl = torch.cat(kl).view(student_logits.shape[:-1])
    if attention_mask is not None:
        m = attention_mask.to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp_min(1) * temperature**2
    return kl.mean() * temperature**2


def source_inputs(batch: dict) -> dict:
    """The source model's view of a training batch. Packed documents (`position_ids` restarting at each
    document, conversion/data.py) go without the attention mask, which is how transformers' models keep
    the documents apart (their packed-sequence masks; the blocks are never padded)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}


# ---------------------------------------------------------------------------- Trainer
class NatslDistillTrainer(Trainer):
    """`Trainer` for both NAtS-L recovery stages (see the module docstring).

    Args:
        stage: 1 (attention transfer, only new parameters) or 2 (LM loss + optional logit KD).
        teacher: the frozen source model (required for stage 1 and for stage 2 with kd_weight > 0).
        kd_weight, kd_temperature: stage-2 logit distillation weight and temperature.
        lm_weight: stage-2 weight of the LM loss (default 1). 0 with kd_weight > 0 is pure logit KD: the
            student then follows the source's distribution rather than the training text's (the LM term pulls
            it towards the data: bench/RECOVERY_NOTES.md measured greedy agreement 0.05 after LM + KD at 1 : 1).
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
        checkpoint_trainable_only: checkpoints hold only the parameters that train (module docstring);
            resuming from one needs the run to start from the same model with the same trainable set.
        Everything else is passed to `Trainer` (train_dataset, data_collator, callbacks, ...).
    """

    def __init__(self, model: nn.Module, args, *, stage: int, teacher: nn.Module | None = None,
                 kd_weight: float = 0.0, kd_temperature: float = 1.0, lm_weight: float = 1.0, budget_on: str = "prob",
                 supervised_routing: bool = True, train_router: bool = False,
                 checkpoint_trainable_only: bool = False, **kwargs):
        check_stage_options(stage, has_source=teacher is not None, kd_weight=kd_weight,
                            kd_temperature=kd_temperature, budget_on=budget_on, supervised_routing=supervised_routing,
                            train_router=train_router, lora=hasattr(model, "get_base_model"), lm_weight=lm_weight)
        if teacher is not None:
            check_pair(model, teacher)
        super().__init__(model=model, args=args, **kwargs)
        if checkpoint_trainable_only and self.is_fsdp_enabled:
            raise ValueError("checkpoint_trainable_only is not supported under FSDP (its checkpoints are sharded "
                             "state dicts): drop it, or train with DDP.")
        self.stage, self.kd_weight, self.kd_temperature, self.lm_weight = stage, kd_weight, kd_temperature, lm_weight
        self.budget_on = budget_on
        self.checkpoint_trainable_only = checkpoint_trainable_only
        self._saving_checkpoint = False
        self.teacher = None if teacher is None else teacher.to(self.args.device).eval().requires_grad_(False)
        self.transfer = AttentionTransfer(self.model, self.teacher) if stage == 1 else None
        if stage == 1:
            self.router_mode = "supervised" if supervised_routing else "learned"
        else:
            self.router_mode = "learned" if train_router else "frozen"
        for decoder in natsl_decoder_layers(self.model):
            decoder.self_attn.router_mode = self.router_mode
            if self.router_mode == "frozen":
                decoder.self_attn.router.requires_grad_(False)
        # our loss is a per-batch mean (it ignores num_items_in_batch): Trainer must divide it by the
        # gradient-accumulation steps. transformers >= 5.2x reads `loss_is_scaled_for_ga`; earlier 5.x
        # releases divide only when the model does not take loss kwargs (NatslForCausalLM does).
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)

    # ------------------------------------------------------------------ steps and losses
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
        return route_budget_loss(outputs.routes, unwrap(self.model).config)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if self.budget_on == "route" and self.router_mode == "learned":
            inputs["output_routes"] = True
        mask = inputs.get("attention_mask")
        teacher_inputs = source_inputs(inputs)
        if self.stage == 1:
            if not self.transfer.enabled:
                raise RuntimeError("Stage-1 losses are defined for training steps only (no evaluation loop).")
            inputs.pop("labels", None)
            self.transfer.clear()
            with torch.no_grad():
                self.teacher.model(**teacher_inputs, use_cache=False)
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
            loss = self.lm_weight * outputs.lm_loss + router  # lm_loss is logged at any weight: KD-only runs show it
            metrics = {"lm_loss": outputs.lm_loss, "router_loss": router}
            if self.kd_weight > 0:
                with torch.no_grad():
                    t_logits = self.teacher(**teacher_inputs, use_cache=False).logits
                kd = kd_loss(outputs.logits, t_logits, self.kd_temperature, mask)
                loss = loss + self.kd_weight * kd
                metrics["kd_loss"] = kd
        if outputs.routable_chunks is not None:
            # this step's realised fraction; 0/0 = NaN when it routed nothing, which the logged nanmean
            # skips (no host sync per step)
            metrics["softmax_fraction"] = outputs.softmax_chunks.sum() / outputs.routable_chunks.sum()
        if outputs.router_agreement is not None:
            metrics["router_agreement"] = outputs.router_agreement
        if model.training:
            for key, value in metrics.items():
                self._metrics[key].append(value.detach().float())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the NAtS-L metrics (mean since the last log, across processes) to the Trainer logs."""
        if self._metrics and "loss" in logs:
            for key, values in self._metrics.items():
                value = torch.stack(values).nanmean().to(self.args.device)
                value = self.accelerator.reduce(value, reduction="mean")
                if not torch.isnan(value):  # NaN: no step since the last log had any (e.g. nothing routable)
                    logs[key] = round(float(value), 6)
            self._metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ router fit and calibration
    def _blocks(self, num_blocks: int, dataset=None) -> list[dict]:
        """The first `num_blocks` blocks of `dataset` (default: the training blocks) as device batches:
        the same blocks on every process, so what is computed from them is the same on every replica."""
        from torch.utils.data import DataLoader, Subset

        dataset = self.train_dataset if dataset is None else dataset
        dataset = Subset(dataset, range(min(num_blocks, len(dataset))))
        loader = DataLoader(dataset, batch_size=self.args.per_device_train_batch_size, collate_fn=self.data_collator)
        return [{k: v.to(self.args.device) for k, v in b.items() if k in (*MODEL_INPUTS, LOOKED_UP)} for b in loader]

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

    def allocate_layer_budgets(self, num_blocks: int = 64, dataset=None) -> list[float]:
        """`allocate_layer_budgets` on the first `num_blocks` blocks of `dataset` (default: the training blocks):
        each NAtS-L layer's share of the softmax budget from the source attention, in `config.layer_budget_scale`
        (stage-1 targets and calibration then use it). Logs and returns every decoder layer's budget. Meant for
        the start of stage 1, before `fit_routers`."""
        model, _ = self._router_access()
        budgets = allocate_layer_budgets(model, self._blocks(num_blocks, dataset))
        config = unwrap(self.model).config
        self.log({f"layer_budget/{i}": budgets[i] for i in config.natsl_layers})
        return budgets

    def calibrate_routers(self, num_blocks: int = 32, dataset=None) -> dict[str, float]:
        """`calibrate_router_bias` on the first `num_blocks` blocks of `dataset` (default: the training
        blocks); logs and returns the realised softmax fraction before and after."""
        model, apply_in = self._router_access()
        budget = unwrap(self.model).config.softmax_budget
        result = calibrate_router_bias(model, self._blocks(num_blocks, dataset), budget, apply_in=apply_in,
                                       stop_early=apply_in is None)  # an FSDP forward must not be cut short
        self.log({f"calibration/{k}": v for k, v in result.items()})
        return result

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, *args, **kwargs):
        self._saving_checkpoint = True  # what save_model writes now is a checkpoint
        try:
            super()._save_checkpoint(*args, **kwargs)
        finally:
            self._saving_checkpoint = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As `Trainer.save_model`; inside a checkpoint with `checkpoint_trainable_only`, the trained
        parameters alone (a PEFT model's checkpoint already holds only its adapters)."""
        if not (self._saving_checkpoint and self.checkpoint_trainable_only) or hasattr(self.model, "get_base_model"):
            return super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            state = {n: p.detach().cpu().contiguous() for n, p in unwrap(self.model).named_parameters()
                     if p.requires_grad}
            safetensors.torch.save_file(state, os.path.join(output_dir, TRAINABLE_WEIGHTS_NAME),
                                        metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """As `Trainer._load_from_checkpoint`, and for a checkpoint of the trained parameters alone."""
        path = os.path.join(resume_from_checkpoint, TRAINABLE_WEIGHTS_NAME)
        if not os.path.isfile(path):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        base = unwrap(self.model if model is None else model)
        state = safetensors.torch.load_file(path)
        trainable = {n for n, p in base.named_parameters() if p.requires_grad}
        if set(state) != trainable:
            differ = sorted(set(state) ^ trainable)
            raise ValueError(
                f"{path} holds the trained parameters of another setup ({len(differ)} names differ, e.g. "
                f"{differ[0]}): resume with the --model, --stage and --lora / --train_router of the run that wrote it."
            )
        base.load_state_dict(state, strict=False)


__all__ = [
    "AttentionTransfer",
    "LORA_TARGETS",
    "NatslDistillTrainer",
    "TRAINABLE_WEIGHTS_NAME",
    "apply_lora",
    "check_pair",
    "check_stage_options",
    "freeze_for_stage1",
    "kd_loss",
    "prepare_student",
    "route_budget_loss",
]
