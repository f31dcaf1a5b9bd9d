"""natsl_hf.hub: model card rendering, the hub folder, dry-run and failing uploads (no network)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from transformers import LlamaConfig, LlamaForCausalLM

from natsl_hf import NatslConfig, NatslForCausalLM
from natsl_hf.conversion import convert_model
from natsl_hf.hub import NOT_MEASURED, load_metrics, main, push_to_hub, render_model_card, save_for_hub

FAKE_ENDPOINT = "http://127.0.0.1:9"  # discard port: nothing listens, the connection is refused at once
REPO_ROOT = Path(__file__).resolve().parents[1]
DECODE_H200 = REPO_ROOT / "bench" / "results" / "decode_h200.json"  # the committed 1B-shape decode benchmark


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
    assert "trust_remote_code=True" in text and "pip install -e ." in text  # natsl-hf is not on PyPI
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
    assert "| 1 | 0.125 |" in text and "| 3 | n/a (no routable chunk was measured) |" in text
    assert "| KV cache kept (fraction of a full cache) | 0.4375 |" in text and "| KV-cache saving | 56.2% |" in text
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
    assert "missing.json does not exist" in capsys.readouterr().err


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


QUALITY_REPORT = {
    "command": "python bench/eval_quality.py --source S --model init=A --model stage2=B --text held.txt",
    "device": "NVIDIA H100", "dtype": "bfloat16",
    "settings": {"seq_len": 512, "ppl_blocks": 16, "text": "held.txt"},
    "summary": {
        "source": {"perplexity": 10.0, "ppl_gap_vs_source": 0.0, "retrieval_2048": 0.875, "needle_2048": 1.0,
                   "short_qa_accuracy": 0.4375, "chat_off_passage_replies": 0.0},
        "init": {"perplexity": 10.01, "ppl_gap_vs_source": 0.001, "softmax_fraction": 1.0},
        "stage2": {"perplexity": 10.5, "ppl_gap_vs_source": 0.05, "softmax_fraction": 0.3,
                   "top1_agreement": 0.91, "gen_prefix_match": 0.6, "retrieval_2048": 0.75,
                   "softmax_fraction_retrieval_2048": 0.28, "kv_fraction_retrieval_2048": 0.3125,
                   "needle_2048": 0.5, "softmax_fraction_needle_2048": 0.21, "short_qa_accuracy": 0.5,
                   "short_qa_source_correct_kept": 0.9, "chat_passage_word_recall": 0.625,
                   "chat_off_passage_replies": 0.125},
    },
    "results": {"stage2": {"perplexity": {"layer_softmax_fraction": [0.25, 0.35, 0.3]}}},
}


def quality_report(tmp_path):
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(QUALITY_REPORT))
    return path


def test_eval_quality_report_is_mapped_onto_the_card(tmp_path):
    report, path = QUALITY_REPORT, quality_report(tmp_path)
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
    assert metrics["layer_softmax_fraction"] == [0.25, 0.35, 0.3] and "| 0 | 0.25 |" in text and "| 1 | 0.35 |" in text
    assert metrics["kv_fraction"] == 0.3125 and "68.8%" in text  # KV-cache saving 1 - 0.3125
    assert "2048-token retrieval contexts (softmax fraction there 0.28)" in text
    assert "retrieval accuracy @2048 tokens | 0.28" not in text  # the fraction is not read as an accuracy
    assert "| needle retrieval accuracy @2048 tokens | 0.5 |" in text and "retrieval accuracy @2048 tokens | 0.21" not in text
    assert "| source needle retrieval accuracy @2048 tokens | 1 |" in text
    assert "| short-answer accuracy | 0.5 |" in text and "| source short-answer accuracy | 0.4375 |" in text
    assert "| share of the source's correct short answers kept | 0.9 |" in text
    assert "| chat: share of the source reply's passage words kept | 0.625 |" in text
    assert "| chat: replies taking no word of their passage | 0.125 |" in text
    assert "| source chat: replies taking no word of their passage | 0 |" in text
    assert "Measured on: bench/eval_quality.py: perplexity on 16 blocks of 512 tokens of held.txt" in text


def test_a_second_evaluation_keeps_its_own_table(tmp_path):
    """The main job's metrics, then a GPU quality report: two perplexity gaps on two texts, never one table."""
    quality = quality_report(tmp_path)
    main_job = tmp_path / "natsl_metrics.json"
    main_job.write_text(json.dumps({
        "softmax_fraction": 0.31, "measured_on": "2 blocks of wiki, CPU", "quality_measured_on": "2 blocks of wiki, CPU",
        "quality": {"held-out perplexity": 12.2, "perplexity gap vs source": "-5.00%"},
        "quality_command": "python -m natsl_hf.conversion.smollm2 out"}))
    metrics = load_metrics([main_job, quality], label="stage2")
    assert metrics["quality"] == {"held-out perplexity": 12.2, "perplexity gap vs source": "-5.00%"}
    (second,) = metrics["evaluations"]
    assert second["quality"]["perplexity gap vs source"] == "+5.00%" and second["quality_command"].startswith("python bench")
    main, other = parse(render_model_card(tiny_config(), metrics=metrics)).text.split("### Evaluation 2", 1)
    assert "| perplexity gap vs source | -5.00% |" in main and "Measured on: 2 blocks of wiki, CPU" in main
    assert "python -m natsl_hf.conversion.smollm2 out" in main and "+5.00%" not in main
    assert "| perplexity gap vs source | +5.00% |" in other and "python bench/eval_quality.py" in other.split("## Speed")[0]
    # the card's own metrics file read again with the same report: the second evaluation is shown once
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(metrics))
    assert load_metrics([saved, quality], label="stage2")["evaluations"] == [second]
    # evaluations alone render too; a malformed entry is refused, naming the schema
    text = parse(render_model_card(tiny_config(), metrics={"evaluations": [second]})).text
    assert "| perplexity gap vs source | +5.00% |" in text and "### Evaluation" not in text
    with pytest.raises(ValueError, match="'quality'"):
        render_model_card(tiny_config(), metrics={"evaluations": [{"ppl": 3.0}]})
    # the same command twice is one evaluation: its rows merge as before
    assert "evaluations" not in load_metrics([quality, quality], label="stage2")


def kv_rows(text: str) -> tuple[str, str]:
    kept = text.split("| KV cache kept (fraction of a full cache) | ", 1)[1].split(" |", 1)[0]
    saving = text.split("| KV-cache saving | ", 1)[1].split(" |", 1)[0]
    return kept, saving


def test_kv_saving_needs_both_byte_counts():
    full = 268435456
    # a full-cache size alone says nothing about what was kept: no fraction, no saving
    text = parse(render_model_card(tiny_config(), metrics={"full_kv_bytes": full})).text
    assert kv_rows(text) == (NOT_MEASURED, NOT_MEASURED)
    assert "100.0%" not in text and "| KV cache kept (fraction of a full cache) | 0 |" not in text
    assert f"| full_kv_bytes | {full} |" in text  # the lone number is kept, as an other measurement
    text = parse(render_model_card(tiny_config(), metrics={"kv_bytes": 1024})).text
    assert kv_rows(text) == (NOT_MEASURED, NOT_MEASURED) and "| kv_bytes | 1024 |" in text
    text = parse(render_model_card(tiny_config(), metrics={"kv_bytes": 5, "full_kv_bytes": 0})).text
    assert kv_rows(text) == (NOT_MEASURED, NOT_MEASURED)
    # both counts: derived, with the bytes shown
    text = parse(render_model_card(tiny_config(), metrics={"kv_bytes": full // 4, "full_kv_bytes": full})).text
    assert kv_rows(text) == ("0.25 (67,108,864 of 268,435,456 bytes)", "75.0%")
    assert "## Other measurements" not in text
    text = parse(render_model_card(tiny_config(), metrics={"kv_fraction": 0.5})).text
    assert kv_rows(text) == ("0.5", "50.0%")


def test_nan_softmax_fraction_renders_without_a_percentage():
    text = parse(render_model_card(tiny_config(), metrics={"softmax_fraction": float("nan")})).text
    assert "| realised softmax fraction (all NAtS-L layers) | n/a (no routable chunk was measured) |" in text
    assert "nan" not in text.lower().replace("nats", "")


def load_decode_bench():
    spec = importlib.util.spec_from_file_location("decode_bench", REPO_ROOT / "bench" / "decode_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_report_of_another_shape_is_refused(converted, tmp_path, capsys):
    model_dir = tmp_path / "model"
    converted.save_pretrained(model_dir)
    report = json.loads(DECODE_H200.read_text())
    with pytest.raises(ValueError, match=r"hidden_size: 2048 in the report vs 32.*chunk_size: 64 in the report vs 4.*"
                                         r"decode_bench\.py --model"):
        load_metrics([DECODE_H200], config=converted.config)
    with pytest.raises(ValueError, match="config"):  # no config, no way to check: refused too
        load_metrics([DECODE_H200])
    # the CLI refuses it before writing anything, naming the rerun for this checkpoint
    out = tmp_path / "hub"
    argv = [str(model_dir), "--repo-id", "me/x", "--out", str(out), "--dry-run", "--metrics", str(DECODE_H200)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"bench/decode_bench.py --model {model_dir}" in err and "num_hidden_layers" in err and not out.exists()
    # one recorded field that differs (here vocab) is enough to refuse; an unrecorded shape field too
    shape = {k: getattr(converted.config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                       "num_key_value_heads", "head_dim", "chunk_size")}
    no_head_dim = {k: v for k, v in shape.items() if k != "head_dim"}
    path = tmp_path / "decode.json"
    for model, bad in (({**shape, "vocab_size": 999}, "vocab_size"), (no_head_dim, "head_dim: not recorded")):
        path.write_text(json.dumps({**report, "model": model}))
        with pytest.raises(ValueError, match=bad):
            load_metrics([path], config=converted.config)
    # the same report on the checkpoint's shape is accepted
    path.write_text(json.dumps({**report, "model": shape}))
    speed = load_metrics([path], config=converted.config)["speed"]
    assert speed["decode step ms @ 8192 ctx (NVIDIA H200, NAtS-L p=0.125)"] == report["rows"][1]["step_ms"]


def test_decode_bench_on_the_checkpoint_puts_speed_on_the_card(tmp_path, capsys):
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    NatslForCausalLM(tiny_config()).save_pretrained(model_dir)  # layer 2 stays full softmax
    bench_json = tmp_path / "decode.json"
    load_decode_bench().main(["--model", str(model_dir), "--out", str(bench_json), "--contexts", "16",
                              "--fractions", "0.5", "--iters", "1"])
    report = json.loads(bench_json.read_text())
    assert report["model"]["natsl_layers"] == [0, 1, 3] and report["model"]["chunk_size"] == 4
    assert f"--model {model_dir}" in report["command"]
    row = {r["model"]: r for r in report["rows"]}
    out = tmp_path / "hub"
    argv = [str(model_dir), "--repo-id", "me/x", "--out", str(out), "--dry-run", "--metrics", str(bench_json)]
    assert main(argv) == 0
    text = parse((out / "README.md").read_text()).text
    speed = text.split("## Speed", 1)[1].split("## How to use", 1)[0]
    dev = report["device"]
    nat, base = row["NAtS-L p=0.5"], row["softmax (DynamicCache + SDPA)"]
    assert f"| decode step ms @ 16 ctx ({dev}, NAtS-L p=0.5) | {nat['step_ms']:.4g} |" in speed
    assert f"| decode step ms @ 16 ctx ({dev}, softmax (DynamicCache + SDPA)) | {base['step_ms']:.4g} |" in speed
    assert f"({nat['cache_bytes']:,} bytes)" in speed and f"({base['cache_bytes']:,} bytes)" in speed
    assert f"Measured on: {dev}, torch.float32" in speed and report["command"] in speed
    assert "## Other measurements" not in text and NOT_MEASURED not in speed
    # the synthetic benchmark's KV bytes are not this checkpoint's measured KV saving
    assert kv_rows(text) == (NOT_MEASURED, NOT_MEASURED)


def test_dry_run_without_out_keeps_the_folder_beside_the_model(converted, tmp_path, capsys):
    model_dir = tmp_path / "model"
    converted.save_pretrained(model_dir)
    default = tmp_path / "model-hub"
    assert main([str(model_dir), "--repo-id", "me/x", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"hub folder written to {default}" in printed and "[dry run] would upload" in printed
    for name in ("model.safetensors", "config.json", "modeling_natsl.py", "README.md"):
        assert (default / name).is_file(), name
    # a second dry run does not silently write over it ...
    (default / "stale.txt").write_text("old")
    assert main([str(model_dir), "--repo-id", "me/x", "--dry-run"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (default / "stale.txt").is_file()
    # ... --overwrite replaces it, stale files included
    assert main([str(model_dir), "--repo-id", "me/x", "--dry-run", "--overwrite"]) == 0
    assert (default / "README.md").is_file() and not (default / "stale.txt").exists()
    # --overwrite never deletes a folder that is not an earlier hub folder, nor the checkpoint itself
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main([str(model_dir), "--repo-id", "me/x", "--dry-run", "--out", str(other), "--overwrite"]) == 2
    assert (other / "keep.txt").is_file()
    for target in (model_dir, tmp_path):
        assert main([str(model_dir), "--repo-id", "me/x", "--dry-run", "--out", str(target), "--overwrite"]) == 2
    assert (model_dir / "config.json").is_file()
    # nor another checkpoint (config.json + README.md, as every natsl-convert / natsl-distill output has)
    other_model = tmp_path / "other-model"
    converted.save_pretrained(other_model)
    (other_model / "README.md").write_text("---\nlicense: mit\n---\n# another checkpoint\n")
    assert main([str(model_dir), "--repo-id", "me/x", "--dry-run", "--out", str(other_model), "--overwrite"]) == 2
    assert (other_model / "model.safetensors").is_file()
    assert (default / ".natsl-hub").is_file() and ".natsl-hub" not in printed  # the marker is never uploaded
    assert "MODEL_DIR-hub" in " ".join(build_help().split())


def build_help() -> str:
    from natsl_hf.hub import build_parser

    return build_parser().format_help()


def test_side_by_side_evaluation_puts_each_model_in_a_column():
    """Reports of one evaluation from separate calls (a model each) become one table, a column per model; reports
    of another evaluation (other options) are refused; a model not measured on a row leaves its cell empty."""
    from natsl_hf.metrics import side_by_side_evaluation

    other = copy.deepcopy(QUALITY_REPORT)
    other["command"] = "python bench/eval_quality.py --source S --model hybrid=C --text held.txt"
    other["settings"]["source"] = "/tmp/elsewhere"  # file paths may differ
    other["summary"] = {"source": QUALITY_REPORT["summary"]["source"],
                        "hybrid": {"perplexity": 10.2, "ppl_gap_vs_source": 0.02, "retrieval_2048": 0.25}}
    evaluation = side_by_side_evaluation([("source", QUALITY_REPORT, "source"), ("NAtS-L", QUALITY_REPORT, "stage2"),
                                          ("hybrid", other, "hybrid")], title="At equal training")
    assert evaluation["columns"] == ["source", "NAtS-L", "hybrid"]
    assert evaluation["quality"]["key-value retrieval accuracy @2048 tokens"] == {"source": 0.875, "NAtS-L": 0.75,
                                                                                  "hybrid": 0.25}
    assert evaluation["quality"]["perplexity gap vs source"]["hybrid"] == "+2.00%"
    assert evaluation["quality"]["key-value retrieval @2048 tokens: softmax fraction"] == {"NAtS-L": 0.28}
    assert evaluation["quality_command"] == f"{QUALITY_REPORT['command']}\n{other['command']}"
    # the rows follow the most complete column: the routing rows sit beside the accuracy they belong to
    rows = list(evaluation["quality"])
    assert rows.index("key-value retrieval @2048 tokens: softmax fraction") == \
        rows.index("key-value retrieval accuracy @2048 tokens") + 1
    text = parse(render_model_card(tiny_config(), metrics={"evaluations": [{**evaluation, "note": "Read me."}]})).text
    assert "### At equal training\n\n| metric | source | NAtS-L | hybrid |\n|---|---|---|---|\n" in text
    assert "| key-value retrieval accuracy @2048 tokens | 0.875 | 0.75 | 0.25 |" in text
    assert "| key-value retrieval @2048 tokens: softmax fraction |  | 0.28 |  |" in text
    # the same line as a single model's card (the text included)
    assert ("Read me.\n\nMeasured on: bench/eval_quality.py: perplexity on 16 blocks of 512 tokens of held.txt, "
            "NVIDIA H100") in text

    other["settings"]["seq_len"] = 1024
    with pytest.raises(ValueError, match="'hybrid'.*other settings \\(seq_len\\)"):
        side_by_side_evaluation([("NAtS-L", QUALITY_REPORT, "stage2"), ("hybrid", other, "hybrid")])
    with pytest.raises(ValueError, match="no model labelled 'nope'"):
        side_by_side_evaluation([("NAtS-L", QUALITY_REPORT, "nope")])
    with pytest.raises(ValueError, match="column"):
        render_model_card(tiny_config(), metrics={"evaluations": [{"columns": ["a"], "quality": {"ppl": 3.0}}]})


def test_shipped_card_evaluations_are_rebuilt_from_the_committed_reports():
    """conversion/recovered/*/evaluations.json is what bench/card_evaluations.py makes of bench/results' reports."""
    from natsl_hf.conversion.recovered import EVALUATIONS_FILE, SMOLLM2_RECOVERED

    bench = Path(__file__).resolve().parent.parent / "bench"
    spec = importlib.util.spec_from_file_location("card_evaluations", bench / "card_evaluations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = json.loads((SMOLLM2_RECOVERED / EVALUATIONS_FILE).read_text())["evaluations"]
    assert module.build(module.SMOLLM2_B025, bench / "results") == shipped
    assert [e["columns"][0] for e in shipped] == ["source", "source"]
    render_model_card(tiny_config(), metrics={"evaluations": shipped})  # renders
