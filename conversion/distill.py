"""natsl-distill: one recovery stage of a converted NAtS-L model with the HF `Trainer` (SPEC.md section 5).

    natsl-distill --stage 1 --model CONVERTED_DIR --source SOURCE_DIR --data TEXT_OR_DATASET --output_dir OUT
    natsl-distill --stage 2 --model OUT --source SOURCE_DIR --data TEXT_OR_DATASET --kd_weight 1 --output_dir OUT2

The options are the NAtS-L ones (`DistillArguments`) and every `TrainingArguments` flag, parsed by
`HfArgumentParser` and spelled as the fields are (`--max_steps`, `--per_device_train_batch_size`,
`--gradient_accumulation_steps`, `--learning_rate`, `--lr_scheduler_type`, `--optim`, `--save_strategy`,
`--bf16`, `--activation_checkpointing`, `--report_to`, `--resume_from_checkpoint`, ...), as transformers'
example scripts take them. `--activation_checkpointing` is transformers 5.23's name of `--gradient_checkpointing`
(before 5.23 the only name, since then a deprecated alias): natsl-distill takes either on every transformers it
supports. Where a flag is not given, this recipe's defaults apply (`RECIPE_DEFAULTS`: cosine schedule with 5 %
warmup, 1 epoch, batch 1, logging every 10 steps, at most 2 checkpoints, seed 0, non-reentrant activation
checkpointing) and the learning rate of the stage (`DEFAULT_LEARNING_RATES`: 1e-3 in stage 1, 2e-5 in stage 2,
2e-4 for stage-2 LoRA adapters). `--resume_from_checkpoint last` resumes from the newest checkpoint in
`--output_dir`.

A run (`train`): every input is checked and loaded first, and nothing is written before all pass (an input error
is one `natsl-distill: error: ...` line on stderr, exit status 2; `--output_dir` is required and must lie apart
from `--model` and `--source`); then stage 1 fits the routers to the source attention (conversion/router_fit.py),
the stage trains (conversion/trainer.py), the router biases are calibrated to the budget, and the model is saved
with a model card that carries the conversion's provenance and the training so far. Ctrl-C is one line, exit
status 130. Every file written gets the mode the umask gives (output.py `honour_umask`).

The command line starts without torch or transformers: `--help` (the NAtS-L options; `--help-all` adds every
Trainer flag) and the errors of the NAtS-L options and of the paths come first (`quick_parser`,
`check_command_line`); the Trainer flags are parsed after that, by `HfArgumentParser` (`parse_args`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shlex
import shutil
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .output import file_stamps, honour_umask
from .sources import OneLineArgumentParser, check_input_path, conversion_advice, read_model_type

PROG = "natsl-distill"
# TrainingArguments defaults of this recipe (any flag given on the command line wins), less the activation-
# checkpointing kwargs, whose field name depends on transformers (see `recipe_defaults`).
_RECIPE_DEFAULTS = {
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
}
# (stage, lora) -> learning rate when --learning_rate is not given.
DEFAULT_LEARNING_RATES = {(1, False): 1e-3, (2, False): 2e-5, (2, True): 2e-4}
# What the card and the log say when the routers' training AUC is NaN (router_fit.roc_auc: a head whose labelled
# chunks are all of one class has none, and one such layer makes the mean NaN).
NO_AUC = "n/a: in a layer no KV head had labelled chunks of both classes (softmax and linear)"


def _checkpointing_fields(training_fields) -> tuple[str, str]:
    """(flag, kwargs field) of activation checkpointing in this transformers: 5.23 renamed
    `gradient_checkpointing[_kwargs]` to `activation_checkpointing[_kwargs]` (the old names stay as aliases)."""
    if "activation_checkpointing" in training_fields:
        return "activation_checkpointing", "activation_checkpointing_kwargs"
    return "gradient_checkpointing", "gradient_checkpointing_kwargs"


def recipe_defaults() -> dict:
    """The recipe's TrainingArguments defaults (imports transformers)."""
    from transformers import TrainingArguments

    kwargs_field = _checkpointing_fields(TrainingArguments.__dataclass_fields__)[1]
    # non-reentrant: the layer hooks of stage 1 re-run on recomputation
    return {**_RECIPE_DEFAULTS, kwargs_field: {"use_reentrant": False}}


def check_values(options) -> None:
    """The ranges of the NAtS-L options (`options`: DistillArguments or the namespace of `quick_parser`); ValueError
    naming the flag. NatslConfig validates the config fields again once the model's config is read."""
    for flag, value, low in (
        ("--seq_len", options.seq_len, 2), ("--calibration_seq_len", options.calibration_seq_len, 2),
        ("--max_blocks", options.max_blocks, 1), ("--router_fit_blocks", options.router_fit_blocks, 0),
        ("--calibration_blocks", options.calibration_blocks, 0), ("--lora_r", options.lora_r, 1),
        ("--lora_alpha", options.lora_alpha, 1),
    ):
        if value is not None and value < low:
            raise ValueError(f"{flag} {value}: expected an integer >= {low}.")
    budget = options.softmax_budget
    if budget is not None and not (math.isfinite(budget) and 0 < budget <= 1):
        raise ValueError(f"--softmax_budget {budget}: softmax_budget={budget} is invalid: expected a fraction in "
                         "(0, 1], the share of chunks kept as softmax (e.g. 0.25).")
    for flag, value, what in (
        ("--router_loss_weight", options.router_loss_weight, "a weight >= 0"),
        ("--router_fit_l2", options.router_fit_l2, "a penalty >= 0"),
        ("--kd_weight", options.kd_weight, "a weight >= 0"),
        ("--lm_weight", options.lm_weight, "a weight >= 0"),
    ):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag} {value}: expected {what}.")
    if not (math.isfinite(options.kd_temperature) and options.kd_temperature > 0):
        raise ValueError(f"--kd_temperature {options.kd_temperature}: expected a temperature > 0.")


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
    softmax_budget: float | None = field(default=None, metadata={
        "help": "override config.softmax_budget, in (0, 1]"})
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
    layer_budgets: bool = field(default=False, metadata={
        "help": "stage 1: before the router fit, share the softmax budget among the layers by what their source "
                "attention looks up beyond its distance (router_fit.allocate_layer_budgets, on the router-fit "
                "blocks), stored as config.layer_budget_scale; targets and calibration then use each layer's share"})
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
    lm_weight: float = field(default=1.0, metadata={
        "help": "stage 2: weight of the LM loss (0 with --kd_weight > 0: logit KD only, the student follows the source)"})
    lora: bool = field(default=False, metadata={"help": "stage 2: train LoRA adapters instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    checkpoint_trainable_only: bool = field(default=False, metadata={
        "help": "checkpoints hold only the trained parameters (with --lora: the adapters), not the whole model; "
                "resume them with the same --model"})
    save_final: bool = field(default=True, metadata={
        "help": "write the trained model and its card to --output_dir (--no_save_final: checkpoints only)"})

    def __post_init__(self):
        from .trainer import check_stage_options

        check_stage_options(self.stage, has_source=bool(self.source), kd_weight=self.kd_weight,
                            kd_temperature=self.kd_temperature, budget_on=self.budget_on,
                            supervised_routing=self.supervised_routing, train_router=self.train_router, lora=self.lora,
                            lm_weight=self.lm_weight)
        if self.layer_budgets and not (self.stage == 1 and self.supervised_routing and self.router_fit_blocks > 0):
            raise ValueError("--layer_budgets shares the budget at the start of stage 1 with supervised routing, on "
                             "the router-fit blocks: use it with --stage 1, without --no_supervised_routing, and "
                             "with --router_fit_blocks > 0.")
        if self.packing == "documents" and self.stage == 1:
            raise ValueError("--packing documents applies to stage 2: stage 1 supervises and fits the routers on "
                             "whole unpadded blocks (each packed document becomes a padded row); use --packing blocks.")
        check_values(self)

    def finish_training_arguments(self, training):
        """Give `training` (TrainingArguments) the stage's learning rate when none was given; refuse the Trainer
        options this recipe cannot run with, and the values the Trainer would only trip over once training."""
        if training.learning_rate is None:
            training.learning_rate = DEFAULT_LEARNING_RATES[self.stage, self.lora]
        if self.checkpoint_trainable_only and training.load_best_model_at_end:
            raise ValueError("--checkpoint_trainable_only checkpoints are not whole models, so "
                             "--load_best_model_at_end cannot load one; drop one of them.")
        if training.eval_strategy != "no" or training.do_eval:
            raise ValueError("natsl-distill has no evaluation set: drop --eval_strategy / --do_eval and evaluate the "
                             "output with bench/eval_quality.py.")
        check_training_values(training)
        return training


def check_training_values(training) -> None:
    """The Trainer flags whose bad values the Trainer accepts and only fails on (or silently misreads) once the
    models are loaded and training starts; ValueError naming the flag."""
    for flag, value, low in (("--per_device_train_batch_size", training.per_device_train_batch_size, 1),
                             ("--gradient_accumulation_steps", training.gradient_accumulation_steps, 1)):
        if value < low:
            raise ValueError(f"{flag} {value}: expected an integer >= {low}.")
    if not (math.isfinite(training.learning_rate) and training.learning_rate >= 0):
        raise ValueError(f"--learning_rate {training.learning_rate}: expected a rate >= 0.")
    if training.max_steps == 0 or training.max_steps < -1:  # the Trainer reads any max_steps <= 0 as "use epochs"
        raise ValueError(f"--max_steps {training.max_steps}: expected a number of steps >= 1 (or -1, the default: "
                         "train for --num_train_epochs).")
    if training.max_steps < 1 and not (math.isfinite(training.num_train_epochs) and training.num_train_epochs > 0):
        raise ValueError(f"--num_train_epochs {training.num_train_epochs}: expected a number of epochs > 0 "
                         "(or give --max_steps).")
    if training.warmup_steps is not None and not training.warmup_steps >= 0:
        raise ValueError(f"--warmup_steps {training.warmup_steps}: expected >= 0 (a fraction < 1 of the training "
                         "steps, or a number of steps).")


# ---------------------------------------------------------------------------- command line
def _option_strings(name: str) -> list[str]:
    """The flags of a dataclass field, as HfArgumentParser spells them (`--seq_len` and its alias `--seq-len`)."""
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def _string_to_bool(text: str) -> bool:
    if isinstance(text, bool):
        return text
    if text.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if text.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"Truthy value expected: got {text} but expected one of yes/no, true/false, "
                                     "t/f, y/n, 1/0 (case insensitive).")


def quick_parser() -> argparse.ArgumentParser:
    """The NAtS-L options and --output_dir, parsed as HfArgumentParser parses them (the same flags, types, choices
    and `--no_*` complements) but without importing transformers: `--help` and their usage errors come at once,
    and `parse_known_args` leaves the Trainer flags to `parse_args`."""
    rates = ", ".join(f"{rate:g} (stage {stage}{' --lora' if lora else ''})"
                      for (stage, lora), rate in DEFAULT_LEARNING_RATES.items())
    defaults = ", ".join(f"{k}={v}" for k, v in _RECIPE_DEFAULTS.items() if v is not None)
    parser = OneLineArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Recover a converted NAtS-L model: stage 1 (attention transfer, new parameters only) or stage 2 "
        "(LM loss + optional logit KD, full or LoRA) with transformers.Trainer.",
        epilog="natsl-distill also takes every transformers TrainingArguments flag (--max_steps, --learning_rate, "
        "--per_device_train_batch_size, --gradient_accumulation_steps, --bf16, --activation_checkpointing, "
        f"--save_strategy, --report_to, --resume_from_checkpoint last, ...); `{PROG} --help-all` lists them (it "
        f"imports transformers, a few seconds). Where one is not given: {defaults}, non-reentrant activation "
        f"checkpointing, learning_rate={rates}.")
    hints = typing.get_type_hints(DistillArguments)
    for f in dataclasses.fields(DistillArguments):
        kind = hints[f.name]
        kwargs = {k: v for k, v in f.metadata.items()}
        required = f.default is dataclasses.MISSING
        if kind is bool:
            kwargs.update(type=_string_to_bool, nargs="?", const=True, default=f.default)
        else:
            base = next(t for t in typing.get_args(kind) if t is not type(None)) if typing.get_args(kind) else kind
            kwargs.update(type=base)
            if required:
                kwargs["required"] = True
            else:
                kwargs["default"] = f.default
        parser.add_argument(*_option_strings(f.name), **kwargs)
        if kind is bool and f.default is True:
            parser.add_argument(f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}", action="store_false",
                                dest=f.name, help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", "--output-dir", required=True,
                        help="where the checkpoints, the trained model and its card go (a new folder, or the "
                        "folder of the run to resume; apart from --model and --source)")
    parser.add_argument("--help-all", action="store_true",
                        help="list the Trainer flags too (imports transformers)")
    return parser


def _paths_apart(output_dir: str, flag: str, path: str) -> str | None:
    """Why --output_dir must not be `path` (given by `flag`), or None."""
    out, inp = Path(output_dir).expanduser().resolve(), Path(path).expanduser().resolve()
    if out == inp:
        return f"--output_dir {output_dir} is the {flag} directory"
    if inp in out.parents:
        return f"--output_dir {output_dir} lies inside the {flag} directory {path}"
    if out in inp.parents:
        return f"the {flag} directory {path} lies inside --output_dir {output_dir}, whose checkpoint folders the run rotates"
    return None


def check_command_line(options, output_dir: str) -> None:
    """What a command line can be refused for before anything is imported or loaded: the NAtS-L values, the input
    paths, and an --output_dir that would overwrite (or sit inside, or hold) --model or --source."""
    check_values(options)
    check_input_path(options.model, "--model")
    if options.source:
        check_input_path(options.source, "--source")
    check_input_path(options.data, "--data", directory=False)
    for flag in ("--model", "--source"):
        path = getattr(options, flag[2:])
        problem = path and _paths_apart(output_dir, flag, path)
        if problem:
            raise ValueError(f"{problem}: the run would write its checkpoints and the trained model over its own "
                             f"input. Pick an --output_dir apart from {flag} (e.g. a new folder beside it).")
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ValueError(f"--output_dir {output_dir} exists and is not a folder; pick another --output_dir.")


def _full_parser_class():
    from transformers import HfArgumentParser, TrainingArguments

    class DistillArgumentParser(HfArgumentParser):
        """`HfArgumentParser` over (DistillArguments, TrainingArguments) with the recipe's defaults and a required
        --output_dir, whose usage errors are one line (the usage of every Trainer flag would be pages)."""

        def __init__(self):
            defaults = recipe_defaults()
            shown = ", ".join(f"{k}={v}" for k, v in defaults.items() if v is not None)
            rates = ", ".join(f"{rate:g} (stage {stage}{' --lora' if lora else ''})"
                              for (stage, lora), rate in DEFAULT_LEARNING_RATES.items())
            super().__init__((DistillArguments, TrainingArguments), prog=PROG, allow_abbrev=False,
                             description="Recover a converted NAtS-L model: stage 1 (attention transfer, new "
                             "parameters only) or stage 2 (LM loss + optional logit KD, full or LoRA) with "
                             f"transformers.Trainer. Takes every TrainingArguments flag; where one is not given: "
                             f"{shown}, learning_rate={rates}.")
            self.set_defaults(**defaults)
            for action in self._actions:
                if action.dest == "output_dir":
                    action.required = True  # without it the Trainer would write into ./trainer_output

        def error(self, message):
            self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    return DistillArgumentParser


def _parser_class():
    if "DistillArgumentParser" not in globals():
        globals()["DistillArgumentParser"] = _full_parser_class()
    return globals()["DistillArgumentParser"]


def __getattr__(name: str):  # the names that need transformers, made on first use
    if name == "DistillArgumentParser":
        return _parser_class()
    if name == "RECIPE_DEFAULTS":
        return recipe_defaults()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _checkpointing_aliases(argv: list[str], training_fields=None) -> list[str]:
    """`--activation_checkpointing[_kwargs]` and `--gradient_checkpointing[_kwargs]` both, on every transformers:
    each is spelt as this transformers' TrainingArguments (`training_fields`: its field names) names the field
    (5.23 renamed it and kept the old name as an alias)."""
    if training_fields is None:
        from transformers import TrainingArguments

        training_fields = TrainingArguments.__dataclass_fields__
    flag, kwargs_field = _checkpointing_fields(training_fields)
    other = "gradient_checkpointing" if flag == "activation_checkpointing" else "activation_checkpointing"
    if other in training_fields:
        return argv  # both names are fields of this TrainingArguments
    pattern = re.compile(rf"^--{other.replace('_', '[_-]')}(?P<kwargs>[_-]kwargs)?(?P<value>=.*)?$")
    out = []
    for arg in argv:
        m = pattern.match(arg)
        out.append(f"--{kwargs_field if m.group('kwargs') else flag}{m.group('value') or ''}" if m else arg)
    return out


def parse_args(argv: list[str] | None = None) -> tuple[DistillArguments, object]:
    """The NAtS-L and Trainer options (DistillArguments, TrainingArguments) of a natsl-distill command line
    (ValueError for a bad combination or value)."""
    parser = _parser_class()()
    argv = _checkpointing_aliases(list(sys.argv[1:] if argv is None else argv))
    distill, training, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return distill, distill.finish_training_arguments(training)


# ---------------------------------------------------------------------------- inputs
def load_student_config(distill: DistillArguments):
    """The config of the NAtS-L model to train, with --softmax_budget / --router_loss_weight applied (NatslConfig
    validates them); a checkpoint of another model_type is refused (convert it first)."""
    from natsl_hf import NatslConfig

    check_input_path(distill.model, "--model")
    if not Path(distill.model, "config.json").is_file():
        raise ValueError(f"--model {distill.model} has no config.json; pass a natsl-convert output directory.")
    model_type = read_model_type(distill.model)
    if model_type != "natsl":
        advice = conversion_advice(distill.model, model_type)
        then = f", then pass --model OUT --source {distill.model}" if advice.startswith("convert") else ""
        raise ValueError(f"--model {distill.model} is a {model_type!r} checkpoint, not NAtS-L: {advice}{then}.")
    config = NatslConfig.from_pretrained(distill.model)
    if distill.softmax_budget is not None:
        config.softmax_budget = distill.softmax_budget
    if distill.router_loss_weight is not None:
        config.router_loss_weight = distill.router_loss_weight
    return config


def load_source(path: str, dtype=None):
    """The frozen source model (eval mode, no grad; `dtype` default float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    import natsl_hf

    natsl_hf._load()  # registered with the Auto classes: a NAtS-L checkpoint may serve as source too
    check_input_path(path, "--source")
    if not Path(path, "config.json").is_file():
        raise ValueError(f"--source {path} has no config.json; pass the checkpoint the model was converted from.")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).eval().requires_grad_(False)


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


def resume_checkpoint(training) -> str | None:
    """--resume_from_checkpoint as a checkpoint directory (`last`: the newest in --output_dir)."""
    from transformers.trainer_utils import get_last_checkpoint

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


def load_blocks(distill: DistillArguments, training, tokenizer, seq_len: int, max_blocks: int | None, packing: str,
                flag: str = "--seq_len"):
    """The packed blocks of --data (conversion/data.py), tokenised once (the main process first); `flag`: the
    option `seq_len` comes from, which data.py's errors are made to name."""
    from .data import load_packed_dataset

    if Path(distill.data).is_file() and Path(distill.data).stat().st_size == 0:
        raise ValueError(f"--data {distill.data} is empty: pass a file or directory with training text.")
    with training.main_process_first(desc="tokenise and pack"):
        try:
            return load_packed_dataset(distill.data, tokenizer, seq_len, max_blocks=max_blocks, packing=packing)
        except ValueError as err:  # data.py knows the length, not the flag it came from
            message = re.sub(r"--seq[-_]len\b", flag, str(err))
            if message == str(err):
                raise
            raise ValueError(message) from err


def prepare(distill: DistillArguments, training, callbacks=None):
    """Check and load everything a stage needs, writing nothing: -> (trainer, calibration blocks).
    `training.resume_from_checkpoint` becomes the checkpoint directory to resume from (or None)."""
    import torch
    from transformers import default_data_collator

    from natsl_hf import NatslForCausalLM

    from .trainer import NatslDistillTrainer, prepare_student

    check_command_line(distill, training.output_dir)  # before anything is loaded (main has checked it already)
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
        calibration = load_blocks(distill, training, tokenizer, calibration_seq_len, calibration_blocks, "blocks",
                                  flag="--calibration_seq_len" if distill.calibration_seq_len else "--seq_len")
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
        lm_weight=distill.lm_weight, budget_on=distill.budget_on, supervised_routing=distill.supervised_routing,
        train_router=distill.train_router, checkpoint_trainable_only=distill.checkpoint_trainable_only,
    )
    return trainer, calibration


# ---------------------------------------------------------------------------- the run
def train(distill: DistillArguments, training, callbacks=None, command: str | None = None):
    """Run one stage; returns the trainer (model trained, final model saved unless --no_save_final).
    `callbacks`: extra `TrainerCallback`s; `command`: the command line, for the model card."""
    trainer, calibration = prepare(distill, training, callbacks)
    return run(trainer, calibration, distill, command)


def _auc_text(auc: float) -> str:
    return f"{auc:.3f}" if math.isfinite(auc) else NO_AUC


def _umask_callback(output_dir: Path, before: dict):
    """A TrainerCallback that gives each checkpoint's files the umask's mode as it is saved (`honour_umask`)."""
    from transformers import TrainerCallback

    class HonourUmask(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            honour_umask(output_dir, before)

    return HonourUmask()


def run(trainer, calibration, distill: DistillArguments, command: str | None = None):
    """Fit the routers (stage 1), train, calibrate the router biases, save: the stage `prepare` set up."""
    from .layers import unwrap

    output_dir = Path(trainer.args.output_dir)
    before = file_stamps(output_dir)  # what was there before: only what this run writes gets the umask's mode
    trainer.add_callback(_umask_callback(output_dir, before))
    resume = trainer.args.resume_from_checkpoint
    seq_len = distill.calibration_seq_len or distill.seq_len
    fitted = calibrated = None
    if trainer.router_mode == "supervised" and distill.router_fit_blocks > 0 and resume is None:
        if distill.layer_budgets:
            budgets = trainer.allocate_layer_budgets(distill.router_fit_blocks, calibration)
            natsl = unwrap(trainer.model).config.natsl_layers
            if trainer.is_world_process_zero():
                print(f"{PROG}: softmax budget shared among the layers by their source attention: "
                      + ", ".join(f"{i}: {budgets[i]:.3f}" for i in natsl))
        result = trainer.fit_routers(distill.router_fit_blocks, calibration, l2=distill.router_fit_l2)
        fitted = (f"{min(distill.router_fit_blocks, len(calibration))} blocks of {seq_len} tokens "
                  f"(training AUC {_auc_text(result['router_fit_train_auc'])})")
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
    honour_umask(output_dir, before)
    return trainer


def save_final(trainer, output_dir: str, model_dir: str | None = None, training_note: str | None = None) -> None:
    """Write the trained NAtS-L model (LoRA merged) with save_pretrained (keeps auto_map), its tokenizer
    (the trainer's processing_class), and a model card: base model, license and conversion command carried
    from `model_dir`'s card (the checkpoint training started from), and the recovery training so far
    (`model_dir`'s plus `training_note`), which is also kept in natsl_metrics.json for the next stage and
    for natsl-hub. Every file written gets the mode the umask gives (`honour_umask`), as a plain open() would."""
    from natsl_hf.metrics import METRICS_FILE
    from natsl_hf.model_card import card_provenance, render_model_card

    from .layers import unwrap

    before = file_stamps(Path(output_dir))
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
    honour_umask(Path(output_dir), before)
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


def training_summary(trainer, distill: DistillArguments, calibrated: str | None = None, fitted: str | None = None,
                     command: str | None = None) -> str:
    """One line for the model card: which stage ran, how many tokens, and how the router was treated
    (`fitted` / `calibrated`: the blocks the routers were fitted / their biases calibrated on, if so)."""
    from .layers import unwrap

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
        (f"LM loss (weight {distill.lm_weight:g})" if distill.lm_weight != 1 else "LM loss")
        + (f" + logit KD (weight {distill.kd_weight:g})" if distill.kd_weight > 0 else "")
        + (", LoRA" if distill.lora else ", all parameters")
        + (", packed documents kept apart" if distill.packing == "documents" else ""))
    budget = unwrap(trainer.model).config.softmax_budget
    note = (f"stage {distill.stage} ({what}; {router}; softmax budget {budget:g}): "
            f"{trainer.state.global_step} steps x {blocks} blocks x {distill.seq_len} tokens = {tokens:,} tokens")
    return note + (f", `{command}`" if command else "")


# ---------------------------------------------------------------------------- CLI
INPUT_ERRORS = (ValueError, OSError, ImportError)


def _interrupted(output_dir: Path, existed: bool, before: dict) -> str:
    """What an interrupted run left in `output_dir` (whose files were `before`, and which `existed`)."""
    written = sorted(p for p, stamp in file_stamps(output_dir).items() if before.get(p) != stamp)
    if not written:
        if not existed and output_dir.is_dir() and all(p.is_dir() and not p.is_symlink() for p in output_dir.rglob("*")):
            shutil.rmtree(output_dir, ignore_errors=True)  # folders the Trainer made, holding nothing
        return "nothing was written"
    checkpoints = sorted({p.relative_to(output_dir).parts[0] for p in written
                          if p.relative_to(output_dir).parts[0].startswith("checkpoint-")})
    where = f", among them {', '.join(checkpoints)}: resume with --resume_from_checkpoint last" if checkpoints else ""
    return f"{output_dir} holds the {len(written)} files written before it{where}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help-all" in argv:
        _parser_class()().print_help()
        return 0
    options, _ = quick_parser().parse_known_args(argv)  # --help and the usage errors of the NAtS-L flags: at once
    output_dir = Path(options.output_dir)
    existed, before = output_dir.exists(), file_stamps(output_dir)
    try:
        try:
            check_command_line(options, options.output_dir)  # still without torch
            distill, training = parse_args(argv)
            trainer, calibration = prepare(distill, training)
        except INPUT_ERRORS as err:  # before anything is written: one line, as argparse reports a usage error
            print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        run(trainer, calibration, distill, command=shlex.join([PROG, *argv]))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {_interrupted(output_dir, existed, before)}", file=sys.stderr)
        return 130
    return 0


__all__ = ["DistillArgumentParser", "DistillArguments", "check_command_line", "main", "parse_args", "prepare",
           "quick_parser", "run", "save_final", "train"]

if __name__ == "__main__":
    sys.exit(main())
