"""Recovery training (conversion/trainer.py and the natsl-distill CLI) on tiny models built here: CPU, seconds each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

from natsl_hf import NatslForCausalLM
from natsl_hf.conversion.data import load_packed_dataset, pack
from natsl_hf.conversion.distill import save_final
from natsl_hf.conversion.families import is_new_parameter
from natsl_hf.conversion.trainer import TRAINABLE_WEIGHTS_NAME, AttentionTransfer, NatslDistillTrainer, prepare_student
from natsl_testing import free_port, mix_routes

VOCAB, SEQ, CHUNK = 64, 32, 8


def tiny_source(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def tiny_natsl(source, seed: int = 0, **options) -> NatslForCausalLM:
    """A NAtS-L model with the source's weights (as natsl-convert does) and fresh NAtS-L parameters."""
    from natsl_hf.conversion.convert import convert_model

    torch.manual_seed(seed)
    options.setdefault("chunk_size", CHUNK)
    return convert_model(source, **options)


def token_dataset(n: int = 32, seed: int = 0) -> Dataset:
    """Sequences over a skewed 12-token alphabet with a repeated motif: learnable by a tiny LM."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        motif = torch.randint(3, 15, (4,), generator=g)
        noise = torch.randint(3, 15, (SEQ,), generator=g)
        seq = torch.where(torch.rand(SEQ, generator=g) < 0.7, motif.repeat(SEQ // 4), noise)
        rows.append(seq.tolist())
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * SEQ] * n, "labels": rows})


def targs(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), max_steps=20, learning_rate=1e-2, per_device_train_batch_size=4,
                logging_steps=5, report_to="none", remove_unused_columns=False, save_strategy="no",
                disable_tqdm=True, use_cpu=True, seed=0, lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


def batch(ds: Dataset, n: int = 8) -> dict:
    return {k: torch.tensor(ds[:n][k]) for k in ("input_ids", "attention_mask", "labels")}


@torch.no_grad()
def alignment(model, teacher, b) -> float:
    transfer = AttentionTransfer(model, teacher)
    transfer.enabled = True
    try:
        teacher.model(input_ids=b["input_ids"])
        model(input_ids=b["input_ids"], use_cache=False)
        return transfer.loss().item()
    finally:
        transfer.remove()


@torch.no_grad()
def lm_loss(model, b) -> float:
    was = model.training
    model.eval()
    out = model(**b, use_cache=False)
    model.train(was)
    return out.lm_loss.item()


@torch.no_grad()
def fraction(model, b) -> float:
    was = model.training
    model.eval()
    out = model(input_ids=b["input_ids"], use_cache=False)
    model.train(was)
    return out.softmax_fraction.item()


def test_stage1_trains_only_new_parameters_and_lowers_alignment(tmp_path):
    src = tiny_source()
    # start GDN-heavy with no budget pressure: the alignment loss alone must bring back the chunks the
    # (untrained) GDN branch cannot serve, through the straight-through route weights into the router
    model = tiny_natsl(src, router_init_bias=-1.0, softmax_budget=1.0)
    ds = token_dataset()
    b = batch(ds)
    before_align = alignment(model, src, b)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not is_new_parameter(n)}
    prepare_student(model, 1)
    trainer = NatslDistillTrainer(model=model, args=targs(tmp_path, max_steps=20, learning_rate=3e-2),
                                  train_dataset=ds, stage=1, teacher=src, supervised_routing=False)
    trainer.train()
    model.eval()
    after_align = alignment(model, src, b)
    assert before_align > 1e-3
    assert after_align < 0.5 * before_align, (before_align, after_align)
    for n, p in model.named_parameters():  # copied source weights untouched
        if n in frozen:
            torch.testing.assert_close(p, frozen[n], rtol=0, atol=0)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all({"align_loss", "router_loss", "softmax_fraction"} <= set(e) for e in logs)


def test_stage1_unsupervised_router_loss_moves_softmax_fraction_toward_budget(tmp_path):
    """supervised_routing=False: the router routes itself and the budget hinge pulls it down."""
    src = tiny_source()
    model = tiny_natsl(src, softmax_budget=0.0, router_loss_weight=50.0, router_init_bias=1.0)
    ds = token_dataset()
    b = batch(ds)
    before = fraction(model, b)
    prepare_student(model, 1)
    trainer = NatslDistillTrainer(model=model, args=targs(tmp_path, max_steps=16, logging_steps=2,
                                                          learning_rate=5e-2),
                                  train_dataset=ds, stage=1, teacher=src, supervised_routing=False)
    trainer.train()
    after = fraction(model, b)
    assert before > 0.9  # softmax-biased init
    assert after < 0.5, (before, after)
    logged = [e["softmax_fraction"] for e in trainer.state.log_history if "softmax_fraction" in e]
    assert logged[-1] < logged[0]
    router = [e["router_loss"] for e in trainer.state.log_history if "router_loss" in e]
    assert router[-1] < router[0]


def test_stage2_lowers_lm_loss_with_kd(tmp_path):
    src = tiny_source()
    model = tiny_natsl(src)
    ds = token_dataset()
    b = batch(ds)
    before = lm_loss(model, b)
    prepare_student(model, 2)
    trainer = NatslDistillTrainer(model=model, args=targs(tmp_path, max_steps=20, learning_rate=3e-3),
                                  train_dataset=ds, stage=2, teacher=src, kd_weight=0.1, kd_temperature=2.0)
    trainer.train()
    after = lm_loss(model, b)
    assert after < before - 0.5, (before, after)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all({"lm_loss", "kd_loss", "router_loss", "softmax_fraction"} <= set(e) for e in logs)


def test_stage2_kd_only(tmp_path):
    """lm_weight=0: the loss is the KD term alone (the LM loss is still logged), and it falls."""
    src = tiny_source()
    ds = token_dataset()
    model = prepare_student(tiny_natsl(src), 2)
    mix_routes(model, seed=1, alpha_std=3.0)
    ids = batch(ds)["input_ids"]

    def kd_now():
        from natsl_hf.conversion.trainer import kd_loss

        model.eval()
        with torch.no_grad():
            return kd_loss(model(ids, use_cache=False).logits, src(ids).logits, 1.0).item()

    before = kd_now()
    trainer = NatslDistillTrainer(model=model, args=targs(tmp_path, max_steps=12, learning_rate=3e-3, logging_steps=1),
                                  train_dataset=ds, stage=2, teacher=src, kd_weight=1.0, lm_weight=0.0)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(e["loss"] == pytest.approx(e["kd_loss"] + e["router_loss"], rel=1e-3, abs=1e-6) for e in logs), logs
    assert all(e["lm_loss"] > 10 * e["kd_loss"] for e in logs)  # logged, but not what trains
    assert kd_now() < 0.7 * before, before


def test_logs_no_fraction_when_nothing_was_routable(tmp_path):
    """Blocks shorter than (sinks + 1) chunks route nothing: the logs carry the losses and no softmax_fraction
    (not a NaN from 0/0)."""
    src = tiny_source()
    model = tiny_natsl(src)
    rows = token_dataset()["input_ids"]
    short = Dataset.from_dict({"input_ids": [r[: 2 * CHUNK - 1] for r in rows],
                               "attention_mask": [[1] * (2 * CHUNK - 1)] * len(rows),
                               "labels": [r[: 2 * CHUNK - 1] for r in rows]})
    prepare_student(model, 2)
    trainer = NatslDistillTrainer(model=model, args=targs(tmp_path, max_steps=5), train_dataset=short, stage=2)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs and all("lm_loss" in e and "softmax_fraction" not in e for e in logs), logs


@pytest.mark.parametrize("train_router", [False, True])
def test_stage2_router_frozen_by_default(tmp_path, train_router):
    """Stage 2 keeps the (calibrated stage-1) router as it is and sends no gradient through it, unless
    train_router=True, which trains it with the straight-through routes and the budget term."""
    src = tiny_source()
    model = tiny_natsl(src, softmax_budget=0.1, router_loss_weight=10.0)
    ds = token_dataset()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".router." in n}
    prepare_student(model, 2)
    trainer = NatslDistillTrainer(model=model, args=targs(tmp_path, max_steps=6, learning_rate=1e-2),
                                  train_dataset=ds, stage=2, train_router=train_router)
    trainer.train()
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    routers = [layer.self_attn.router for layer in model.model.layers]
    if train_router:
        assert changed and all(p.requires_grad for r in routers for p in r.parameters())
        assert any(e["router_loss"] > 0 for e in trainer.state.log_history if "router_loss" in e)
    else:
        assert not changed and not any(p.requires_grad for r in routers for p in r.parameters())
        assert all(e["router_loss"] == 0 for e in trainer.state.log_history if "router_loss" in e)
        # and the routes carry no straight-through gradient into the backbone: route weights are constants
        model.train()
        out = model(input_ids=batch(ds)["input_ids"], use_cache=False, output_routes=True)
        assert out.router_loss is None and not any(r.weight.requires_grad for r in out.routes)


def test_stage2_lora_wraps_natsl_layers_and_saves_merged(tmp_path):
    peft = pytest.importorskip("peft")
    src = tiny_source()
    model = tiny_natsl(src)
    ds = token_dataset()
    b = batch(ds)
    before = lm_loss(model, b)
    peft_model = prepare_student(model, 2, lora=True, lora_r=8, lora_alpha=16)
    assert isinstance(peft_model, peft.PeftModel)
    names = [n for n, _ in peft_model.named_modules()]
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "a_proj", "b_proj", "gdn_gate_proj"):
            assert any(f"layers.{layer}.self_attn.{proj}.lora_A" in n for n in names), (layer, proj)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base_q = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    # lr 1e-2: the loss falls by ~0.17 with both the fused and the plain AdamW; at 5e-2 the fused one (the
    # Trainer default optimizer with current transformers) oscillates here and ends within 0.02 of the start
    trainer = NatslDistillTrainer(model=peft_model, args=targs(tmp_path, max_steps=40, learning_rate=1e-2),
                                  train_dataset=ds, stage=2)
    trainer.train()
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.base_layer.weight, base_q, rtol=0, atol=0)
    lora_b = model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.abs().max() > 0  # LoRA B starts at 0 and trained
    after = lm_loss(peft_model, b)
    assert after < before - 0.05, (before, after)
    out = tmp_path / "final"
    save_final(trainer, str(out))
    merged = NatslForCausalLM.from_pretrained(out)
    assert "auto_map" in merged.config.to_dict()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert abs(lm_loss(merged, b) - after) < 1e-3


class FirstStep(TrainerCallback):
    """Records the global step at which the (resumed) run takes its first step."""

    def __init__(self):
        self.step = None

    def on_step_begin(self, args, state, control, **kw):
        if self.step is None:
            self.step = state.global_step


@pytest.mark.parametrize("saved", ["model", "trainable", "lora"])
def test_resume_from_checkpoint_continues_the_run(tmp_path, saved):
    """A run resumed from its step-3 checkpoint continues at step 3 and ends with the parameters of the run
    that was not interrupted. model: stage-1 checkpoints of the whole model (the Trainer's own); trainable:
    checkpoints of the new NAtS-L parameters alone (checkpoint_trainable_only); lora: stage 2, whose PEFT
    checkpoints hold the adapters alone."""
    pytest.importorskip("peft")
    src = tiny_source()
    ds = token_dataset()
    stage = 2 if saved == "lora" else 1

    def run(out, resume=None, callbacks=()):
        model = tiny_natsl(src, seed=1, softmax_budget=0.1, router_loss_weight=10.0)
        model = prepare_student(model, stage, lora=saved == "lora", lora_r=4, lora_alpha=8)
        args = targs(out, max_steps=6, save_strategy="steps", save_steps=3, logging_steps=1, learning_rate=2e-2)
        trainer = NatslDistillTrainer(model=model, args=args, train_dataset=ds, stage=stage,
                                      teacher=src if stage == 1 else None,
                                      checkpoint_trainable_only=saved == "trainable", callbacks=list(callbacks))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-3"
    weights = {"model": "model.safetensors", "trainable": TRAINABLE_WEIGHTS_NAME, "lora": "adapter_model.safetensors"}
    assert {p.name for p in ckpt.iterdir()} & set(weights.values()) == {weights[saved]}
    if saved == "trainable":
        names = set(load_file(ckpt / TRAINABLE_WEIGHTS_NAME))
        assert names == {n for n, _ in full.model.named_parameters() if is_new_parameter(n)}
    first = FirstStep()
    resumed = run(tmp_path / "resumed", resume=str(ckpt), callbacks=[first])
    assert first.step == 3 and resumed.state.global_step == 6
    trained = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    for n, p in resumed.model.named_parameters():
        if n in trained:
            torch.testing.assert_close(p, trained[n], rtol=1e-5, atol=1e-6, msg=n)


def test_resume_refuses_trainable_parameters_of_another_setup(tmp_path):
    """A checkpoint of stage-1 parameters does not resume stage 2 (which trains other parameters)."""
    src = tiny_source()
    model = prepare_student(tiny_natsl(src), 1)
    args = targs(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    NatslDistillTrainer(model=model, args=args, train_dataset=token_dataset(4), stage=1, teacher=src,
                        checkpoint_trainable_only=True).train()
    stage2 = NatslDistillTrainer(model=prepare_student(tiny_natsl(src), 2), args=targs(tmp_path / "s2", max_steps=2),
                                 train_dataset=token_dataset(4), stage=2, checkpoint_trainable_only=True)
    with pytest.raises(ValueError, match="trained parameters of another setup"):
        stage2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_packed_text_data(tmp_path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.WordLevel({c: i + 1 for i, c in enumerate(chars)} | {"<eos>": 0}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world " * 10)
    (tmp_path / "docs" / "b.md").write_text("second document " * 10)
    ds = load_packed_dataset(tmp_path / "docs", tokenizer, 16)
    assert len(ds) == (120 + 1 + 160 + 1) // 16
    assert all(len(r) == 16 for r in ds["input_ids"]) and ds["labels"] == ds["input_ids"]
    Dataset.from_dict({"text": ["hello world " * 10]}).save_to_disk(str(tmp_path / "saved"))
    assert len(load_packed_dataset(tmp_path / "saved", tokenizer, 16)) == 121 // 16
    assert pack([[5, 6], [7]], 2, eos_token_id=0) == [[5, 6], [0, 7]]
    with pytest.raises(ValueError, match="--seq-len"):
        load_packed_dataset(tmp_path / "docs" / "a.txt", tokenizer, 4096)
    with pytest.raises(FileNotFoundError, match="--data"):
        load_packed_dataset(tmp_path / "missing", tokenizer, 16)


def test_stage2_on_packed_documents_sees_them_as_the_source_does(tmp_path):
    """packing="documents": the source (KD teacher) and the NAtS-L model both keep the packed documents
    apart. A converted model equals its source, so the first step's KD term is 0 only if they agree."""
    from test_ddp_cpu import char_tokenizer

    tok = char_tokenizer()
    src = tiny_source()
    src.resize_token_embeddings(len(tok), mean_resizing=False)
    (tmp_path / "docs").mkdir()
    for i, length in enumerate((20, 45, 70, 30)):  # documents that start and end inside the 32-token blocks
        (tmp_path / "docs" / f"{i}.txt").write_text(("abcdefghij"[i:] * 10)[:length])
    ds = load_packed_dataset(tmp_path / "docs", tok, SEQ, packing="documents")
    assert any(0 in row[1:] for row in ds["position_ids"])  # some block holds a document start
    model = prepare_student(tiny_natsl(src), 2)
    trainer = NatslDistillTrainer(model=model, args=targs(tmp_path / "out", max_steps=1, logging_steps=1,
                                                          per_device_train_batch_size=len(ds)),
                                  train_dataset=ds, stage=2, teacher=src, kd_weight=1.0)
    trainer.train()
    kd = next(e["kd_loss"] for e in trainer.state.log_history if "kd_loss" in e)
    assert kd < 1e-6, kd


def test_route_budget_loss_is_hinge_on_realised_fraction():
    from natsl_hf.conversion.trainer import route_budget_loss

    src = tiny_source()
    model = tiny_natsl(src, softmax_budget=0.25, router_loss_weight=2.0)
    model.train()
    b = batch(token_dataset())
    out = model(input_ids=b["input_ids"], use_cache=False, output_routes=True)
    loss = route_budget_loss(out.routes, model.config)
    # value: the hinge on the realised (hard) fraction per layer; init routes everything softmax -> 2 * 0.75^2
    expected = sum(2.0 * max(0.0, (r.hard & r.routable).sum().item() / r.routable.sum().item() - 0.25) ** 2
                   for r in out.routes)
    assert abs(loss.item() - expected) < 1e-5 and expected > 1.0
    loss.backward()  # gradient reaches the router through the straight-through weights
    assert model.model.layers[0].self_attn.router.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_checkpointing_gives_the_same_training(tmp_path, stage):
    src = tiny_source()
    ds = token_dataset(8)

    def run(gc: bool):
        model = prepare_student(tiny_natsl(src, seed=3, softmax_budget=0.1), stage)
        args = targs(tmp_path / f"gc{gc}", max_steps=2, gradient_checkpointing=gc,
                     gradient_checkpointing_kwargs={"use_reentrant": False} if gc else None)
        trainer = NatslDistillTrainer(model=model, args=args, train_dataset=ds, stage=stage, teacher=src,
                                      kd_weight=0.5 if stage == 2 else 0.0)
        trainer.train()
        assert all(layer.gradient_checkpointing == gc for layer in model.model.layers)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = run(False), run(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)


def test_cli_stages_carry_the_model_card(tmp_path):
    """natsl-distill stage 1 then stage 2 through `main` on a natsl-convert output: each output folder is a
    complete checkpoint whose card keeps the source's provenance and lists the training done so far."""
    from huggingface_hub import ModelCard

    from natsl_hf.conversion import convert_checkpoint
    from natsl_hf.conversion.distill import main
    from test_ddp_cpu import char_tokenizer

    tok = char_tokenizer()
    src = tmp_path / "src"
    source = tiny_source()
    source.config.vocab_size = len(tok)
    source.resize_token_embeddings(len(tok))
    source.save_pretrained(src)
    tok.save_pretrained(src)
    init = tmp_path / "init"
    convert_checkpoint(src, init, chunk_size=CHUNK, softmax_budget=0.3, license="mit", base_model="org/tiny",
                       progress=False, command="natsl-convert src init --chunk-size 8")
    data = tmp_path / "train.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    common = ["--data", str(data), "--seq_len", "32", "--max_steps", "3", "--logging_steps", "1", "--save_steps", "100",
              "--report_to", "none", "--source", str(src)]
    assert main(["--stage", "1", "--model", str(init), "--output_dir", str(tmp_path / "s1"), "--layer_budgets",
                 *common]) == 0
    scale = NatslForCausalLM.from_pretrained(tmp_path / "s1").config.layer_budget_scale
    assert len(scale) == 2 and sum(scale) / 2 == pytest.approx(1.0)  # --layer_budgets: stored with the model
    assert main(["--stage", "2", "--model", str(tmp_path / "s1"), "--output_dir", str(tmp_path / "s2"),
                 "--kd_weight", "0.5", "--calibration_seq_len", "64", "--packing", "documents", *common]) == 0
    card = ModelCard.load(tmp_path / "s2" / "README.md")
    assert card.data.license == "mit" and card.data.base_model == "org/tiny"
    assert "natsl-convert src init --chunk-size 8" in card.text
    assert ("stage 1 (attention transfer, new parameters only; supervised routing, routers first fitted to the "
            "targets on 56 blocks of 32 tokens (training AUC"
            in card.text) and "router bias calibrated to the budget on 32 blocks of 32 tokens" in card.text
    assert ("stage 2 (LM loss + logit KD (weight 0.5), all parameters, packed documents kept apart; router frozen, "
            "router bias calibrated to the budget on 28 blocks of 64 tokens" in card.text)
    assert "3 steps x 1 blocks x 32 tokens = 96 tokens" in card.text and "`natsl-distill --stage 2" in card.text
    assert NatslForCausalLM.from_pretrained(tmp_path / "s2").config.softmax_budget == 0.3
    assert NatslForCausalLM.from_pretrained(tmp_path / "s2").config.layer_budget_scale == scale
    assert "overall; per layer (from the source attention)" in card.text


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_accumulation_averages_the_loss(tmp_path, stage):
    """One step of 2 accumulated micro-batches of 2 == one step of a batch of 4: same logged loss,
    same update. (Earlier transformers 5.x releases summed the micro-batch losses of a model that takes
    loss kwargs; on a 1B model that doubled the logged loss of the 1-GPU run of bench/multi_gpu.py.)"""
    src = tiny_source()
    runs = []
    for bs, ga in ((4, 1), (2, 2)):
        model = tiny_natsl(src)
        prepare_student(model, stage)
        trainer = NatslDistillTrainer(
            model=model, args=targs(tmp_path / f"{bs}x{ga}", max_steps=1, logging_steps=1, learning_rate=1e-3,
                                    per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                                    max_grad_norm=1e9, optim="sgd"),
            train_dataset=token_dataset(n=4), stage=stage, teacher=src if stage == 1 else None)
        trainer.train()
        loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
        runs.append((loss, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_full, params_full), (loss_ga, params_ga) = runs
    assert loss_ga == pytest.approx(loss_full, rel=1e-4)
    for name, p in params_full.items():
        torch.testing.assert_close(params_ga[name], p, rtol=1e-4, atol=1e-6, msg=name)


def test_missing_datasets_package_names_the_extra(tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("some text " * 50)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r"natsl-hf\[train\]"):
        load_packed_dataset(text, None, 8)


FSDP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
sys.path.insert(0, sys.argv[3])
from test_distill import NatslDistillTrainer, prepare_student, targs, tiny_natsl, tiny_source, token_dataset
from natsl_hf.modeling_natsl import NatslDecoderLayer
from pathlib import Path

model = tiny_natsl(tiny_source(), softmax_budget=0.5)
prepare_student(model, 2)
trainer = NatslDistillTrainer(model=model, args=targs(Path(sys.argv[1])), train_dataset=token_dataset(), stage=2)
trainer.is_fsdp_enabled = True
_, apply_in = trainer._router_access()  # before wrapping: the plain model, no per-unit summon
assert apply_in is None
wrapped = FSDP(model, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({NatslDecoderLayer}),
               use_orig_params=True)
trainer.model = trainer.model_wrapped = wrapped  # what Trainer does once it has wrapped the model
run, apply_in = trainer._router_access()
assert run is wrapped and apply_in is not None
result = trainer.calibrate_routers(num_blocks=8)
assert result["softmax_fraction_before"] == 1.0 and abs(result["softmax_fraction_after"] - 0.5) < 0.15, result
print("ok")
"""


def test_router_calibration_under_fsdp_after_wrapping(tmp_path):
    """After train() the Trainer's model *is* the FSDP wrapper: calibration must write each router through
    its unit's summon_full_params and run whole forwards (one CPU process, gloo, real FSDP wrapping)."""
    script = tmp_path / "fsdp_calibration.py"
    script.write_text(FSDP_SCRIPT)
    cmd = [sys.executable, str(script), str(tmp_path / "out"), str(free_port()), str(Path(__file__).parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]


# ---------------------------------------------------------------------------- the natsl-distill command line
def test_cli_takes_every_trainer_flag_over_the_recipe_defaults():
    from natsl_hf.conversion.distill import parse_args

    common = ["--model", "m", "--data", "d", "--output_dir", "o"]
    distill, training = parse_args(["--stage", "1", "--source", "s", *common])
    assert (training.learning_rate, training.lr_scheduler_type, training.per_device_train_batch_size) == (
        1e-3, "cosine", 1)
    assert distill.supervised_routing and distill.packing == "blocks" and training.dataloader_drop_last
    assert parse_args(["--stage", "2", *common])[1].learning_rate == 2e-5
    assert parse_args(["--stage", "2", "--lora", *common])[1].learning_rate == 2e-4
    distill, training = parse_args(["--stage", "2", *common, "--learning_rate", "3e-5", "--lr_scheduler_type", "linear",
                                    "--optim", "sgd", "--save_strategy", "no", "--packing", "documents"])
    assert (training.learning_rate, training.lr_scheduler_type, training.optim, training.save_strategy) == (
        3e-5, "linear", "sgd", "no")
    assert distill.packing == "documents"


@pytest.mark.parametrize("argv, message", [
    (["--stage", "2", "--no_supervised_routing"], "--no_supervised_routing applies to --stage 1"),
    (["--stage", "1", "--source", "s", "--lora"], "--lora applies to --stage 2"),
    (["--stage", "2", "--train_router", "--lora"], "--train_router with --lora"),
    (["--stage", "1", "--source", "s", "--budget_on", "route"], "--budget_on route only acts"),
    (["--stage", "1", "--source", "s", "--packing", "documents"], "--packing documents applies to stage 2"),
    (["--stage", "2", "--checkpoint_trainable_only", "--load_best_model_at_end", "--eval_strategy", "steps",
      "--save_strategy", "steps"], "--load_best_model_at_end cannot load one"),
    (["--stage", "2", "--eval_strategy", "steps"], "no evaluation set"),
    (["--stage", "1", "--source", "s", "--lm_weight", "0.5"], "--lm_weight applies to --stage 2"),
    (["--stage", "2", "--source", "s", "--lm_weight", "0"], "leaves stage 2 without a loss"),
    (["--stage", "2", "--lm_weight", "-1"], "--lm_weight -1.0: expected a weight >= 0"),
])
def test_cli_refuses_option_conflicts(argv, message):
    from natsl_hf.conversion.distill import parse_args

    with pytest.raises(ValueError, match=message):
        parse_args([*argv, "--model", "m", "--data", "d", "--output_dir", "o"])


@pytest.fixture(scope="module")
def cli_dirs(tmp_path_factory):
    """A saved Llama source and its NAtS-L conversion (each with a tokenizer), training text, an empty file."""
    from natsl_testing import save_cli_checkpoints

    root = save_cli_checkpoints(tmp_path_factory.mktemp("cli")).root
    (root / "empty.txt").write_text("")
    return root


def run_cli(argv, capsys) -> tuple[int, str]:
    from natsl_hf.conversion.distill import main

    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, message: str, out: Path) -> None:
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("natsl-distill: error: ") and message in errors[0], err
    assert not out.exists()  # nothing written


def test_cli_refuses_a_model_that_is_not_natsl_before_writing(cli_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["--stage", "1", "--model", str(cli_dirs / "src"), "--source", str(cli_dirs / "src"),
                         "--data", str(cli_dirs / "train.txt"), "--seq_len", "32", "--output_dir", str(out)], capsys)
    assert_one_line_error(code, err, "is a 'llama' checkpoint, not NAtS-L: convert it first (natsl-convert", out)


def test_cli_refuses_an_empty_data_file(cli_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["--stage", "1", "--model", str(cli_dirs / "natsl"), "--source", str(cli_dirs / "src"),
                         "--data", str(cli_dirs / "empty.txt"), "--seq_len", "32", "--output_dir", str(out)], capsys)
    assert_one_line_error(code, err, "empty.txt is empty", out)


@pytest.mark.parametrize("argv, message", [
    (["--stage", "3"], "argument --stage: invalid choice: 3"),
    (["--stage", "2", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["--stage", "1"], "stage 1 needs the source model: --source"),
    (["--stage", "2", "--data", "DIRS/missing.txt"], "missing.txt does not exist"),
    (["--stage", "2", "--seq_len", "8"], "--seq_len 8 leaves no routable chunk"),
    (["--stage", "2", "--softmax_budget", "3"], "softmax_budget=3.0 is invalid"),
    (["--stage", "2", "--kd_weight", "1", "--source", "DIRS"], "has no config.json; pass the checkpoint"),
    (["--stage", "2", "--resume_from_checkpoint", "last"], "--resume_from_checkpoint last: no checkpoint"),
])
def test_cli_input_errors_are_one_line(cli_dirs, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    defaults = ["--model", str(cli_dirs / "natsl"), "--data", str(cli_dirs / "train.txt"), "--seq_len", "32",
                "--output_dir", str(out)]
    argv = [arg.replace("DIRS", str(cli_dirs)) for arg in argv]
    code, err = run_cli([*defaults, *argv], capsys)  # of a flag given twice, the later wins
    assert_one_line_error(code, err, message, out)


def test_kd_loss_in_pieces_equals_the_whole(monkeypatch):
    """The KD loss is computed a few tokens at a time (checkpointed pieces): the same value and gradient as the
    formula over the whole batch, with and without a mask."""
    import torch.nn.functional as F

    from natsl_hf.conversion import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "KD_CHUNK_TOKENS", 5)  # 3 x 7 tokens -> pieces of 5, 5, 5, 5, 1
    torch.manual_seed(0)
    student = torch.randn(3, 7, 11, requires_grad=True)
    teacher = torch.randn(3, 7, 11)
    mask = (torch.rand(3, 7) > 0.3).long()
    for m in (None, mask):
        got = trainer_module.kd_loss(student, teacher, 2.0, m)
        (g_got,) = torch.autograd.grad(got, student)
        kl = F.kl_div(F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1), log_target=True,
                      reduction="none").sum(-1)
        want = (kl.mean() if m is None else (kl * m).sum() / m.sum()) * 4
        (g_want,) = torch.autograd.grad(want, student)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(g_got, g_want)


def test_kd_loss_pieces_compiled_equal_eager(monkeypatch):
    """On CUDA the KD pieces run through torch.compile (`_piece_kl`, the layers' compile policy); forced here on the
    CPU, the compiled pieces give the eager value and gradient, checkpointed pieces and a short last piece included."""
    from natsl_hf.conversion import trainer as trainer_module
    from natsl_hf.modeling import layer as layer_module

    monkeypatch.setattr(trainer_module, "KD_CHUNK_TOKENS", 8)  # 2 x 9 tokens -> pieces of 8, 8, 2
    torch.manual_seed(1)
    student = torch.randn(2, 9, 13, requires_grad=True)
    teacher = torch.randn(2, 9, 13)
    want = trainer_module.kd_loss(student, teacher, 2.0)
    (g_want,) = torch.autograd.grad(want, student)
    calls = []
    compiled = trainer_module._compiled_token_kl

    def counted():
        calls.append(1)
        return compiled()

    monkeypatch.setattr(layer_module, "compiles", lambda x: True)
    monkeypatch.setattr(trainer_module, "_compiled_token_kl", counted)
    got = trainer_module.kd_loss(student, teacher, 2.0)
    (g_got,) = torch.autograd.grad(got, student)
    assert len(calls) >= 3 and not layer_module._COMPILE_FAILED  # every piece compiled (and its recompute)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)
