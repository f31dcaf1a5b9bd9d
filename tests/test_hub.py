"""natsl_hf.hub: model card rendering, the hub folder, dry-run and failing uploads (no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from transformers import LlamaConfig, LlamaForCausalLM

from natsl_hf import NatslConfig
from natsl_hf.conversion import convert_model
from natsl_hf.hub import NOT_MEASURED, main, push_to_hub, render_model_card, save_for_hub

FAKE_ENDPOINT = "http://127.0.0.1:9"  # discard port: nothing listens, the connection is refused at once


def tiny_config(**kw) -> NatslConfig:
    return NatslConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, chunk_size=4, natsl_layers=[0, 1, 3], source_model_type="llama", **kw,
    )


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    src = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2))
    return convert_model(src, chunk_size=4).eval()


def parse(card_text: str) -> ModelCard:
    card = ModelCard(card_text)
    ModelCardData(**card.data.to_dict())  # the metadata round-trips through the hub's schema class
    return card


def test_card_without_metrics_says_not_measured():
    card = parse(render_model_card(tiny_config(), base_model="org/source-model", license="apache-2.0"))
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["base_model"] == "org/source-model" and data["license"] == "apache-2.0"
    assert {"natsl", "hybrid-attention", "gated-deltanet", "llama"} <= set(data["tags"])
    text = card.text
    for heading in ("## Routing and KV memory", "## Quality", "## Speed"):
        assert heading in text
    # softmax fraction, kv fraction, kv saving, measured on, per-layer table, quality, speed
    assert text.count(NOT_MEASURED) == 7
    assert "0-1, 3 (3 of 4)" in text and "| chunk size | 4 |" in text
    assert "trust_remote_code=True" in text and "pip install natsl-hf" in text
    assert "Conversion command: not recorded." in text


def test_card_with_metrics_shows_exactly_the_given_numbers():
    metrics = {
        "softmax_fraction": 0.3125,
        "layer_softmax_fraction": [1.0, 0.125, float("nan")],
        "kv_fraction": 0.4375,
        "measured_on": "wikitext-2 test, 2048-token windows",
        "quality": {"wikitext2 ppl": 14.27, "source wikitext2 ppl": 13.91},
        "custom": {"note": "x"},
    }
    text = parse(render_model_card(tiny_config(), conversion_command="natsl-convert a b --chunk-size 4",
                                   metrics=metrics, repo_id="me/tiny-natsl")).text
    assert "0.3125 (31.2% of routable chunks)" in text
    assert "| 1 | 0.125 |" in text and "| 3 | n/a (nothing routable) |" in text
    assert "| KV cache kept / full (bytes) | 0.4375 |" in text and "| KV-cache saving | 56.2% |" in text
    assert "| wikitext2 ppl | 14.27 |" in text and "| source wikitext2 ppl | 13.91 |" in text
    assert "| custom.note | x |" in text
    assert "natsl-convert a b --chunk-size 4" in text and 'from_pretrained("me/tiny-natsl"' in text
    assert "## Speed\n\nnot measured" in text
    assert text.count(NOT_MEASURED) == 1  # speed only


def test_card_refuses_mismatched_layer_metrics():
    with pytest.raises(ValueError, match="3 NAtS-L layers"):
        render_model_card(tiny_config(), metrics={"layer_softmax_fraction": [1.0, 0.5]})
    with pytest.raises(TypeError):
        render_model_card(LlamaConfig())


def test_save_for_hub_and_dry_run(converted, tmp_path, capsys):
    folder = save_for_hub(converted, tmp_path / "hub", metrics={"softmax_fraction": 1.0})
    for name in ("model.safetensors", "config.json", "configuration_natsl.py", "modeling_natsl.py", "README.md"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoConfig"] == "configuration_natsl.NatslConfig"
    files = push_to_hub(folder, "me/tiny-natsl", dry_run=True, endpoint=FAKE_ENDPOINT)
    printed = capsys.readouterr().out
    assert "[dry run]" in printed and "model.safetensors" in printed
    assert set(files) >= {"model.safetensors", "config.json", "README.md", "modeling_natsl.py"}


def test_upload_to_unreachable_endpoint_fails_clearly(converted, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folder = save_for_hub(converted, tmp_path / "hub")
    with pytest.raises(RuntimeError, match=r"127\.0\.0\.1:9.*(token|HF_TOKEN)"):
        push_to_hub(folder, "me/tiny-natsl", token="hf_not_a_real_token", endpoint=FAKE_ENDPOINT)


def test_cli_dry_run_folder_loads_with_remote_code_in_fresh_process(converted, tmp_path, capsys):
    model_dir = tmp_path / "model"
    converted.save_pretrained(model_dir)
    metrics_file = tmp_path / "bench.json"
    metrics_file.write_text(json.dumps({"softmax_fraction": 0.5, "speed": {"decode tok/s": 123.4}}))
    out = tmp_path / "hub"
    argv = [str(model_dir), "--repo-id", "me/tiny-natsl", "--out", str(out), "--dry-run",
            "--metrics", str(metrics_file), "--license", "apache-2.0", "--endpoint", FAKE_ENDPOINT]
    assert main(argv) == 0
    assert "[dry run] would upload" in capsys.readouterr().out
    card = parse((out / "README.md").read_text())
    assert card.data.license == "apache-2.0"
    assert "| decode tok/s | 123.4 |" in card.text and "0.5 (50.0% of routable chunks)" in card.text
    # the numbers travel with the folder: publishing it again keeps them without --metrics
    assert json.loads((out / "natsl_metrics.json").read_text())["softmax_fraction"] == 0.5
    assert main([str(out), "--repo-id", "me/tiny-natsl", "--out", str(tmp_path / "again"), "--dry-run"]) == 0
    assert "| decode tok/s | 123.4 |" in (tmp_path / "again" / "README.md").read_text()

    ids = torch.randint(0, 64, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = converted(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        from transformers import AutoModelForCausalLM
        assert "natsl_hf" not in sys.modules, "natsl_hf imported before loading"
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "NatslForCausalLM"
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / 'ids.pt')!r})).logits
        torch.save(logits, {str(tmp_path / 'logits.pt')!r})
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_cli_upload_failure_returns_error(converted, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model_dir = tmp_path / "model"
    converted.save_pretrained(model_dir)
    argv = [str(model_dir), "--repo-id", "me/tiny-natsl", "--token", "hf_not_a_real_token", "--endpoint", FAKE_ENDPOINT]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "natsl-hub: error:" in err and FAKE_ENDPOINT in err
    assert main([str(tmp_path / "nowhere"), "--repo-id", "me/x", "--dry-run"]) == 2
    assert main([str(model_dir), "--repo-id", "me/x", "--dry-run", "--metrics", str(tmp_path / "missing.json")]) == 2
    assert "Cannot read metrics file" in capsys.readouterr().err


def test_cli_keeps_conversion_command_from_existing_card(tmp_path):
    from natsl_hf.conversion import convert_checkpoint

    src = tmp_path / "src"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(src)
    convert_checkpoint(src, tmp_path / "natsl", chunk_size=4, license="mit", progress=False)
    out = tmp_path / "hub"
    assert main([str(tmp_path / "natsl"), "--repo-id", "me/x", "--out", str(out), "--dry-run"]) == 0
    card = parse((out / "README.md").read_text())
    assert card.data.license == "mit"
    assert f"natsl-convert {src} {tmp_path / 'natsl'} --chunk-size 4" in card.text


def test_eval_quality_report_is_mapped_onto_the_card(tmp_path):
    from natsl_hf.hub import load_metrics

    report = {
        "command": "python bench/eval_quality.py --source S --model init=A --model stage2=B --text held.txt",
        "device": "NVIDIA H100", "dtype": "bfloat16",
        "settings": {"seq_len": 512, "ppl_blocks": 16, "text": "held.txt"},
        "summary": {
            "source": {"perplexity": 10.0, "ppl_gap_vs_source": 0.0, "retrieval_2048": 0.875},
            "init": {"perplexity": 10.01, "ppl_gap_vs_source": 0.001, "softmax_fraction": 1.0},
            "stage2": {"perplexity": 10.5, "ppl_gap_vs_source": 0.05, "softmax_fraction": 0.3,
                       "top1_agreement": 0.91, "gen_prefix_match": 0.6, "retrieval_2048": 0.75},
        },
        "results": {},
    }
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(report))
    with pytest.raises(ValueError, match="--label"):
        load_metrics([path])
    metrics = load_metrics([path], label="stage2")
    text = parse(render_model_card(tiny_config(), metrics=metrics)).text
    assert "| perplexity | 10.5 |" in text and "| source perplexity | 10 |" in text
    assert "| perplexity gap vs source | +5.00% |" in text and "| top-1 agreement with source | 0.91 |" in text
    assert "| key-value retrieval accuracy @2048 tokens | 0.75 |" in text
    assert "| source key-value retrieval accuracy @2048 tokens | 0.875 |" in text
    assert "0.3 (30.0% of routable chunks)" in text and "16 blocks of 512 tokens of held.txt" in text
    assert report["command"] in text and "## Speed\n\nnot measured" in text
