"""lm-evaluation-harness on a saved NAtS-L checkpoint: the repository's local task `natsl_local`
(bench/lm_eval_tasks, data in bench/data) through `lm_eval.simple_evaluate`, loaded the way
`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` loads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from natsl_testing import tiny_model
from test_ddp_cpu import char_tokenizer

lm_eval = pytest.importorskip("lm_eval")
REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "bench" / "lm_eval_tasks"


def test_lm_eval_runs_the_local_task_on_a_natsl_checkpoint(tmp_path):
    from lm_eval.tasks import TaskManager

    tok = char_tokenizer()
    model = tiny_model(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       chunk_size=8, max_position_embeddings=512)
    model.save_pretrained(tmp_path / "natsl")
    tok.save_pretrained(tmp_path / "natsl")
    config = json.loads((tmp_path / "natsl" / "config.json").read_text())
    assert config["model_type"] == "natsl" and "auto_map" in config  # loaded through its remote code

    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'natsl'},trust_remote_code=True,dtype=float32",
        tasks=["natsl_local"], task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),  # no index
        device="cpu", batch_size=16,
        gen_kwargs="max_gen_toks=4", num_fewshot=2, limit=16,  # the task's 32 shots, 64 questions: too slow for CI
    )
    result = out["results"]["natsl_local"]
    assert 0.0 <= result["answer_match,none"] <= 1.0
    assert out["n-samples"]["natsl_local"]["effective"] == 16
    prompt = out["samples"]["natsl_local"][0]["arguments"][0][0]
    assert prompt.count("Question:") == 3  # two shots, then the question
