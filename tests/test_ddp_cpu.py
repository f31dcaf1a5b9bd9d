"""A 2-process DDP (gloo, CPU) stage-1 run through `accelerate launch` and the natsl-distill CLI.

Both ranks must finish and hold bit-identical parameters afterwards (DDP averages gradients, so
replicas that start equal stay equal); the trained parameters must differ from the initial ones.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from natsl_testing import free_port

RANK_SCRIPT = textwrap.dedent(
    """
    import hashlib, os, sys
    from natsl_hf.conversion.distill import parse_args, train

    out = sys.argv[1]
    trainer = train(*parse_args(sys.argv[2:]))
    model = trainer.accelerator.unwrap_model(trainer.model)
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode()); h.update(p.detach().float().contiguous().numpy().tobytes())
    world = trainer.args.world_size
    with open(os.path.join(out, f"rank{trainer.args.process_index}.txt"), "w") as fh:
        fh.write(f"{world} {trainer.state.global_step} {h.hexdigest()}")
    """
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<eos>": 0} | {c: i + 1 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def state_hash(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "accelerate")), reason="accelerate CLI not installed")
def test_ddp_two_cpu_processes_stage1(tmp_path):
    from natsl_hf import NatslForCausalLM
    from natsl_hf.conversion.convert import convert_model

    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    source = LlamaForCausalLM(config)
    src_dir, model_dir, out_dir = tmp_path / "source", tmp_path / "natsl", tmp_path / "out"
    source.save_pretrained(src_dir)
    tokenizer.save_pretrained(src_dir)
    natsl = convert_model(source, chunk_size=8, softmax_budget=0.1, router_loss_weight=10.0)
    natsl.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    init_hash = state_hash(NatslForCausalLM.from_pretrained(model_dir))
    text = tmp_path / "train.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [
        # `--cpu` alone makes accelerate 1.x use its single-process launcher; `--multi_gpu` + use_cpu gives
        # torchrun with 2 CPU processes on gloo (that is what `--cpu --num_processes 2` means elsewhere)
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--main_process_port", str(free_port()), str(script), str(tmp_path),
        "--stage", "1", "--model", str(model_dir), "--source", str(src_dir), "--data", str(text),
        "--output_dir", str(out_dir), "--max_steps", "4", "--learning_rate", "1e-2",
        "--per_device_train_batch_size", "2", "--seq_len", "32", "--logging_steps", "2", "--save_steps", "1000",
        "--report_to", "none",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", ACCELERATE_USE_CPU="true",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0][:2] == ["2", "4"] and ranks[1][:2] == ["2", "4"], ranks  # world size 2, 4 steps each
    assert ranks[0][2] == ranks[1][2], "DDP replicas diverged"
    assert ranks[0][2] != init_hash, "training did not change the parameters"
    # rank 0 wrote the final model with its auto_map
    final = NatslForCausalLM.from_pretrained(out_dir)
    assert state_hash(final) == ranks[0][2]
    assert "auto_map" in final.config.to_dict()
