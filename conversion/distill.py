"""natsl-distill: one recovery stage of a converted NAtS-L model with the HF `Trainer` (SPEC.md section 5).

    natsl-distill --stage 1 --model CONVERTED_DIR --source SOURCE_DIR --data TEXT_OR_DATASET --output_dir OUT
    natsl-distill --stage 2 --model OUT --source SOURCE_DIR --data TEXT_OR_DATASET --kd_weight 1 --output_dir OUT2

The options are the NAtS-L ones (`DistillArguments`) and every `TrainingArguments` flag, parsed by
`HfArgumentParser` and spelled as the fields are (`--max_steps`, `--per_device_train_batch_size`,
`--gradient_accumulation_steps`, `--learning_rate`, `--lr_scheduler_type`, `--optim`, `--save_strategy`,
`--bf16`, `--gradient_checkpointing`, `--report_to`, `--resume_from_checkpoint`, ...), as transformers'
example scripts take them. Where a flag is not given, this recipe's defaults apply (`RECIPE_DEFAULTS`:
cosine schedule with 5 % warmup, 1 epoch, batch 1, logging every 10 steps, at most 2 checkpoints,
seed 0, non-reentrant activation checkpointing) and the learning rate of the stage (`DEFAULT_LEARNING_RATES`:
1e-3 in stage 1, 2e-5 in stage 2, 2e-4 for stage-2 LoRA adapters). `--resume_from_checkpoint last` resumes
from the newest checkpoint in `--output_dir`.

A run (`train`): every input is checked and loaded first, and nothing is written before all pass (an
input error is one `natsl-distill: error: ...` line on stderr, exit status 2); then stage 1 fits the
routers to the source attention (conversion/router_fit.py), the stage trains (conversion/trainer.py),
the router biases are calibrated to the budget, and the model is saved with a model card that carries
the conversion's provenance and the training so far.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments, default_data_collator
from transformers.trainer_utils import get_last_checkpoint

from natsl_hf import NatslForCausalLM

from .layers import unwrap
from .trainer import NatslDistillTrainer, check_stage_options, prepare_student

PROG = "natsl-distill"
# The activation-checkpointing kwargs field (transformers 5.2x renamed `gradient_checkpointing_kwargs`).
_CHECKPOINTING_KWARGS = next(name for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
                             if name in TrainingArguments.__dataclass_fields__)
# TrainingArguments defaults of this recipe (any flag given on the command line wins).
RECIPE_DEFAULTS = {
    "learning_rate": None,  # then DEFAULT_LEARNING_RATES
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,  # a fraction of the training steps
    "num_train_epochs": 1.0,
    "per_device_train_batch_size": 1,
    "logging_steps": 10,
    "save_total_limit": 2,
    "seed": 0,
    "remove_unused_columns": False,  # the batches carry exactly what the models take
    "dataloader_drop_last": True,
    "ddp_find_unused_parameters": False,
    _CHECKPOINTING_KWARGS: {"use_reentrant": False},  # the layer hooks of stage 1 re-run on recomputation
}
# (stage, lora) -> learning rate when --learning_rate is not given.
DEFAULT_LEARNING_RATES = {(1, False): 1e-3, (2, False): 2e-5, (2, True): 2e-4}


@dataclass
class DistillArguments:
    """The NAtS-L options of natsl-distill; `__post_init__` refuses every combination that cannot run."""

    stage: int = field(metadata={"choices": [1, 2], "help": "1: attention transfer (new parameters only); "
                                 "2: LM loss + optional logit KD (all parameters or LoRA)"})
    model: str = field(metadata={"help": "converted NAtS-L checkpoint directory (natsl-convert output, or the "
                                 "output of stage 1)"})
    data: str = field(metadata={"help": "text file, directory of .txt/.md files, or save_to_disk dataset"})
    source: str | None = field(default=None, metadata={
        "help": "source checkpoint directory (the model converted from): the teacher of stage 1 and of KD"})
    seq_len: int = field(default=1024, metadata={"help": "tokens per training block"})
    packing: str = field(default="blocks", metadata={
        "choices": ["blocks", "documents"],
        "help": "blocks: documents concatenated and cut into blocks; documents: the same blocks with position ids "
                "that restart at each document (conversion/data.py)"})
    max_blocks: int | None = field(default=None, metadata={"help": "use at most this many packed blocks"})
    softmax_budget: float | None = field(default=None, metadata={"help": "override config.softmax_budget"})
    router_loss_weight: float | None = field(default=None, metadata={"help": "override config.router_loss_weight"})
    budget_on: str = field(default="prob", metadata={
        "choices": ["prob", "route"],
        "help": "budget hinge of a router trained with the budget term: on the mean router probability (the "
                "model's router loss) or on the straight-through route weight (see NatslDistillTrainer)"})
    supervised_routing: bool = field(default=True, metadata={
        "help": "stage 1: route by the source attention's heavy-hitter chunks and train the router on them "
                "(--no_supervised_routing: the router routes itself, with the budget hinge)"})
    train_router: bool = field(default=False, metadata={
        "help": "stage 2: keep training the router (default: frozen at its calibrated stage-1 state)"})
    router_fit_blocks: int = field(default=64, metadata={
        "help": "stage 1: blocks (of --calibration_seq_len tokens) the routers are first fitted on by logistic "
                "regression to the source attention's targets (0: start from the converted routers)"})
    router_fit_l2: float = field(default=0.1, metadata={
        "help": "L2 penalty of that fit, on standardised features (see bench/router_probe.py)"})
    calibration_blocks: int = field(default=32, metadata={
        "help": "blocks the router biases are calibrated to the budget on, after stage 1 and after stage 2 with "
                "a frozen router (0: no calibration)"})
    calibration_seq_len: int | None = field(default=None, metadata={
        "help": "tokens per calibration / router-fit block (default --seq_len): the realised fraction of a fixed "
                "router grows with the context, so calibrate at the length the model will serve"})
    kd_weight: float = field(default=0.0, metadata={"help": "stage 2: weight of the logit KD term"})
    kd_temperature: float = field(default=1.0, metadata={"help": "stage 2: temperature of the logit KD term"})
    lora: bool = field(default=False, metadata={"help": "stage 2: train LoRA adapters instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    checkpoint_trainable_only: bool = field(default=False, metadata={
        "help": "checkpoints hold only the trained parameters (with --lora: the adapters), not the whole model; "
                "resume them with the same --model"})
    save_final: bool = field(default=True, metadata={
        "help": "write the trained model and its card to --output_dir (--no_save_final: checkpoints only)"})

    def __post_init__(self):
        check_stage_options(self.stage, has_source=bool(self.source), kd_weight=self.kd_weight,
                            kd_temperature=self.kd_temperature, budget_on=self.budget_on,
                            supervised_routing=self.supervised_routing, train_router=self.train_router, lora=self.lora)
        if self.packing == "documents" and self.stage == 1:
            raise ValueError("--packing documents applies to stage 2: stage 1 supervises and fits the routers on "
                             "whole unpadded blocks (each packed document becomes a padded row); use --packing blocks.")
        for flag, value, low in (
            ("--seq_len", self.seq_len, 2), ("--calibration_seq_len", self.calibration_seq_len, 2),
            ("--max_blocks", self.max_blocks, 1), ("--router_fit_blocks", self.router_fit_blocks, 0),
            ("--calibration_blocks", self.calibration_blocks, 0), ("--lora_r", self.lora_r, 1),
        ):
            if value is not None and value < low:
                raise ValueError(f"{flag} {value}: expected an integer >= {low}.")

    def finish_training_arguments(self, training: TrainingArguments) -> TrainingArguments:
        """Give `training` the stage's learning rate when none was given; refuse the Trainer options this
        recipe cannot run with."""
        if training.learning_rate is None:
            training.learning_rate = DEFAULT_LEARNING_RATES[self.stage, self.lora]
        if self.checkpoint_trainable_only and training.load_best_model_at_end:
            raise ValueError("--checkpoint_trainable_only checkpoints are not whole models, so "
                             "--load_best_model_at_end cannot load one; drop one of them.")
        if training.eval_strategy != "no" or training.do_eval:
            raise ValueError("natsl-distill has no evaluation set: drop --eval_strategy / --do_eval and evaluate the "
                             "output with bench/eval_quality.py.")
        return training


class DistillArgumentParser(HfArgumentParser):
    """`HfArgumentParser` over (DistillArguments, TrainingArguments) with the recipe's defaults, whose usage
    errors are one line (the usage of every Trainer flag would be pages)."""

    def __init__(self):
        defaults = ", ".join(f"{k}={v}" for k, v in RECIPE_DEFAULTS.items() if v is not None)
        rates = ", ".join(f"{rate:g} (stage {stage}{' --lora' if lora else ''})"
                          for (stage, lora), rate in DEFAULT_LEARNING_RATES.items())
        super().__init__((DistillArguments, TrainingArguments), prog=PROG,
                         description="Recover a converted NAtS-L model: stage 1 (attention transfer, new parameters "
                         "only) or stage 2 (LM loss + optional logit KD, full or LoRA) with transformers.Trainer. "
                         f"Takes every TrainingArguments flag; where one is not given: {defaults}, "
                         f"learning_rate={rates}.")
        self.set_defaults(**RECIPE_DEFAULTS)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_args(argv: list[str] | None = None) -> tuple[DistillArguments, TrainingArguments]:
    """The NAtS-L and Trainer options of a natsl-distill command line (ValueError for a bad combination)."""
    parser = DistillArgumentParser()
    distill, training, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return distill, distill.finish_training_arguments(training)


# ---------------------------------------------------------------------------- inputs
def load_student_config(distill: DistillArguments):
    """The config of the NAtS-L model to train, with --softmax_budget / --router_loss_weight applied (NatslConfig
    validates them); a checkpoint of another model_type is refused (convert it first)."""
    from natsl_hf import NatslConfig

    config = Path(distill.model, "config.json")
    if not config.is_file():
        raise ValueError(f"--model {distill.model} has no config.json; pass a natsl-convert output directory.")
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    if model_type != "natsl":
        raise ValueError(f"--model {distill.model} is a {model_type!r} checkpoint, not NAtS-L: convert it first "
                         f"(natsl-convert {distill.model} OUT), then pass --model OUT --source {distill.model}.")
    config = NatslConfig.from_pretrained(distill.model)
    if distill.softmax_budget is not None:
        config.softmax_budget = distill.softmax_budget
    if distill.router_loss_weight is not None:
        config.router_loss_weight = distill.router_loss_weight
    return config


def load_source(path: str, dtype=torch.float32):
    """The frozen source model (eval mode, no grad)."""
    from transformers import AutoModelForCausalLM

    import natsl_hf  # noqa: F401  (a NAtS-L checkpoint may serve as source too)

    if not Path(path, "config.json").is_file():
        raise ValueError(f"--source {path} has no config.json; pass the checkpoint the model was converted from.")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().requires_grad_(False)


def load_tokenizer(*dirs):
    """The tokenizer saved beside the first of `dirs` that has one."""
    from transformers import AutoTokenizer

    for d in dirs:
        if d is not None and Path(d, "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(d)
    raise ValueError("No tokenizer in --model or --source; save one beside the checkpoint "
                     "(tokenizer.save_pretrained(dir)).")


def check_routable(config, seq_len: int, flag: str = "--seq_len") -> None:
    need = (config.num_sink_chunks + 1) * config.chunk_size
    if config.natsl_layers and seq_len < need:
        raise ValueError(
            f"{flag} {seq_len} leaves no routable chunk (chunk_size={config.chunk_size}, "
            f"num_sink_chunks={config.num_sink_chunks}): use {flag} >= {need}, a multiple of the chunk size."
        )


def resume_checkpoint(training: TrainingArguments) -> str | None:
    """--resume_from_checkpoint as a checkpoint directory (`last`: the newest in --output_dir)."""
    path = training.resume_from_checkpoint
    if path == "last":
        path = get_last_checkpoint(training.output_dir) if Path(training.output_dir).is_dir() else None
        if path is None:
            raise ValueError(f"--resume_from_checkpoint last: no checkpoint-* folder in --output_dir "
                             f"{training.output_dir}; pass the checkpoint directory.")
    elif path is not None and not Path(path, "trainer_state.json").is_file():
        raise ValueError(f"--resume_from_checkpoint {path} is not a Trainer checkpoint (no trainer_state.json); "
                         "pass an output_dir/checkpoint-N folder, or `last`.")
    return path


def load_blocks(distill: DistillArguments, training: TrainingArguments, tokenizer, seq_len: int,
                max_blocks: int | None, packing: str):
    """The packed blocks of --data (conversion/data.py), tokenised once (the main process first)."""
    from .data import load_packed_dataset

    if Path(distill.data).is_file() and Path(distill.data).stat().st_size == 0:
        raise ValueError(f"--data {distill.data} is empty: pass a file or directory with training text.")
    with training.main_process_first(desc="tokenise and pack"):
        return load_packed_dataset(distill.data, tokenizer, seq_len, max_blocks=max_blocks, packing=packing)


def prepare(distill: DistillArguments, training: TrainingArguments, callbacks=None):
    """Check and load everything a stage needs, writing nothing: -> (trainer, calibration blocks).
    `training.resume_from_checkpoint` becomes the checkpoint directory to resume from (or None)."""
    training.resume_from_checkpoint = resume_checkpoint(training)
    config = load_student_config(distill)
    tokenizer = load_tokenizer(distill.model, distill.source)
    calibration_seq_len = distill.calibration_seq_len or distill.seq_len
    check_routable(config, distill.seq_len)
    check_routable(config, calibration_seq_len, "--calibration_seq_len")
    dataset = load_blocks(distill, training, tokenizer, distill.seq_len, distill.max_blocks, distill.packing)
    calibration = dataset
    calibration_blocks = max(distill.calibration_blocks, distill.router_fit_blocks)
    if (calibration_seq_len != distill.seq_len or distill.packing != "blocks") and calibration_blocks > 0:
        # routers are fitted and calibrated on whole blocks: one sequence each, as the model serves them
        calibration = load_blocks(distill, training, tokenizer, calibration_seq_len, calibration_blocks, "blocks")
    teacher = None
    if distill.stage == 1 or distill.kd_weight > 0:
        teacher = load_source(distill.source, torch.bfloat16 if training.bf16 else torch.float32)
    model = NatslForCausalLM.from_pretrained(distill.model, config=config, dtype=torch.float32)
    model = prepare_student(model, distill.stage, lora=distill.lora, lora_r=distill.lora_r,
                            lora_alpha=distill.lora_alpha)
    trainer = NatslDistillTrainer(
        model=model, args=training, train_dataset=dataset, data_collator=default_data_collator,
        processing_class=tokenizer, callbacks=callbacks,
        stage=distill.stage, teacher=teacher, kd_weight=distill.kd_weight, kd_temperature=distill.kd_temperature,
        budget_on=distill.budget_on, supervised_routing=distill.supervised_routing,
        train_router=distill.train_router, checkpoint_trainable_only=distill.checkpoint_trainable_only,
    )
    return trainer, calibration


# ---------------------------------------------------------------------------- the run
def train(distill: DistillArguments, training: TrainingArguments, callbacks=None,
          command: str | None = None) -> NatslDistillTrainer:
    """Run one stage; returns the trainer (model trained, final model saved unless --no_save_final).
    `callbacks`: extra `TrainerCallback`s; `command`: the command line, for the model card."""
    trainer, calibration = prepare(distill, training, callbacks)
    return run(trainer, calibration, distill, command)


def run(trainer: NatslDistillTrainer, calibration, distill: DistillArguments,
        command: str | None = None) -> NatslDistillTrainer:
    """Fit the routers (stage 1), train, calibrate the router biases, save: the stage `prepare` set up."""
    resume = trainer.args.resume_from_checkpoint
    seq_len = distill.calibration_seq_len or distill.seq_len
    fitted = calibrated = None
    if trainer.router_mode == "supervised" and distill.router_fit_blocks > 0 and resume is None:
        result = trainer.fit_routers(distill.router_fit_blocks, calibration, l2=distill.router_fit_l2)
        fitted = (f"{min(distill.router_fit_blocks, len(calibration))} blocks of {seq_len} tokens "
                  f"(training AUC {result['router_fit_train_auc']:.3f})")
        if trainer.is_world_process_zero():
            print(f"{PROG}: routers fitted to the source attention's targets on {fitted}, "
                  f"{result['router_fit_chunks_per_head']:.0f} chunks a head")
    trainer.train(resume_from_checkpoint=resume)
    if trainer.router_mode in ("supervised", "frozen") and distill.calibration_blocks > 0:
        result = trainer.calibrate_routers(distill.calibration_blocks, calibration)
        calibrated = f"{min(distill.calibration_blocks, len(calibration))} blocks of {seq_len} tokens"
        if trainer.is_world_process_zero():
            print(f"{PROG}: router calibrated to softmax_budget={unwrap(trainer.model).config.softmax_budget}: "
                  f"realised softmax fraction {result['softmax_fraction_before']:.3f} -> "
                  f"{result['softmax_fraction_after']:.3f} on {calibrated}")
    trainer.save_state()  # trainer_state.json (log history with the NAtS-L metrics) in --output_dir
    if distill.save_final:
        save_final(trainer, trainer.args.output_dir, model_dir=distill.model,
                   training_note=training_summary(trainer, distill, calibrated, fitted, command))
    return trainer


def save_final(trainer: NatslDistillTrainer, output_dir: str, model_dir: str | None = None,
               training_note: str | None = None) -> None:
    """Write the trained NAtS-L model (LoRA merged) with save_pretrained (keeps auto_map), its tokenizer
    (the trainer's processing_class), and a model card: base model, license and conversion command carried
    from `model_dir`'s card (the checkpoint training started from), and the recovery training so far
    (`model_dir`'s plus `training_note`), which is also kept in natsl_metrics.json for the next stage and
    for natsl-hub."""
    from natsl_hf.metrics import METRICS_FILE
    from natsl_hf.model_card import card_provenance, render_model_card

    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # PEFT
        trainer.accelerator.wait_for_everyone()
        model = trainer.accelerator.unwrap_model(model).merge_and_unload() if trainer.is_world_process_zero() else None
        if model is not None:
            model.config.use_cache = True
            model.save_pretrained(output_dir)
            if trainer.processing_class is not None:
                trainer.processing_class.save_pretrained(output_dir)
    else:
        model = unwrap(model)
        model.config.use_cache = True
        trainer.save_model(output_dir)  # with the processing_class
    if not trainer.is_world_process_zero():
        return
    known = card_provenance(model_dir) if model_dir is not None else {}
    training = "; ".join(t for t in (known.get("training"), training_note) if t)
    metrics = {"training": training} if training else None
    card = render_model_card(model, base_model=known.get("base_model"), license=known.get("license"),
                             conversion_command=known.get("conversion_command"), metrics=metrics)
    Path(output_dir, "README.md").write_text(card, encoding="utf-8")
    if metrics:
        Path(output_dir, METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def training_summary(trainer: NatslDistillTrainer, distill: DistillArguments, calibrated: str | None = None,
                     fitted: str | None = None, command: str | None = None) -> str:
    """One line for the model card: which stage ran, how many tokens, and how the router was treated
    (`fitted` / `calibrated`: the blocks the routers were fitted / their biases calibrated on, if so)."""
    args = trainer.args
    blocks = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    tokens = trainer.state.global_step * blocks * distill.seq_len
    router = {"supervised": "supervised routing", "learned": "router trained with the budget term",
              "frozen": "router frozen"}[trainer.router_mode]
    if fitted:
        router += f", routers first fitted to the targets on {fitted}"
    if calibrated:
        router += f", router bias calibrated to the budget on {calibrated}"
    what = "attention transfer, new parameters only" if distill.stage == 1 else (
        "LM loss" + (f" + logit KD (weight {distill.kd_weight:g})" if distill.kd_weight > 0 else "")
        + (", LoRA" if distill.lora else ", all parameters")
        + (", packed documents kept apart" if distill.packing == "documents" else ""))
    budget = unwrap(trainer.model).config.softmax_budget
    note = (f"stage {distill.stage} ({what}; {router}; softmax budget {budget:g}): "
            f"{trainer.state.global_step} steps x {blocks} blocks x {distill.seq_len} tokens = {tokens:,} tokens")
    return note + (f", `{command}`" if command else "")


# ---------------------------------------------------------------------------- CLI
INPUT_ERRORS = (ValueError, OSError, ImportError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        distill, training = parse_args(argv)
        trainer, calibration = prepare(distill, training)
    except INPUT_ERRORS as err:  # before anything is written: one line, as argparse reports a usage error
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    run(trainer, calibration, distill, command=shlex.join([PROG, *argv]))
    return 0


__all__ = ["DistillArgumentParser", "DistillArguments", "main", "parse_args", "prepare", "run", "save_final", "train"]

if __name__ == "__main__":
    sys.exit(main())
