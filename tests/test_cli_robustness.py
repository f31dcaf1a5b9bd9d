"""The command lines under a careless hand (issue 23): natsl-convert, natsl-distill, natsl-inspect and natsl-hub
refuse a bad argument with one line before anything loads or is written, start without torch for `--help` and
their usage errors, say one line on Ctrl-C (exit 130), write files with the umask's mode, and name only flags,
install commands and keyword arguments that exist."""

from __future__ import annotations

import ast
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from natsl_hf.conversion import distill as distill_cli
from natsl_hf.conversion.convert import main as convert_main
from natsl_hf.hub import main as hub_main
from natsl_hf.inspect import main as inspect_main

ROOT = Path(__file__).resolve().parent.parent


def one_line(text: str, prog: str) -> str:
    """The one line a CLI printed on stderr (`PROG: ...`), asserting there is no other message (progress bars aside),
    no usage block and no traceback."""
    lines = [line for line in text.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: ") and "Traceback" not in text, text
    return lines[0]


def exit_code(call) -> int:
    try:
        return call()
    except SystemExit as exit_:  # argparse's own usage errors
        return exit_.code


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A saved Llama source, its NAtS-L conversion (chunk 8, both with a tokenizer), a GPT-2 checkpoint,
    training text and a text to inspect."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from natsl_testing import save_cli_checkpoints
    from test_ddp_cpu import char_tokenizer

    paths = save_cli_checkpoints(tmp_path_factory.mktemp("cli"))
    root = paths.root
    vocab = len(char_tokenizer())  # the tokenizer saved with the checkpoints
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(root / "gpt2")
    (root / "text.txt").write_text("the router sends each chunk to softmax or to linear attention " * 2)
    return root


def distill_argv(dirs: Path, out, *extra) -> list[str]:
    return ["--stage", "2", "--model", str(dirs / "natsl"), "--data", str(dirs / "train.txt"), "--seq_len", "32",
            "--output_dir", str(out), "--report_to", "none", *extra]


# --------------------------------------------------------------------------- 1. --output_dir and the inputs
@pytest.mark.parametrize("where", ["model", "inside model", "source", "inside source", "symlink to model",
                                   "holds model"])
def test_distill_refuses_an_output_dir_on_its_inputs(dirs, tmp_path, capsys, where):
    model, source = tmp_path / "natsl", tmp_path / "src"
    for folder, original in ((model, dirs / "natsl"), (source, dirs / "src")):
        folder.mkdir()
        for f in original.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    (tmp_path / "link").symlink_to(model)
    out = {"model": model, "inside model": model / "out", "source": source, "inside source": source / "stage1",
           "symlink to model": tmp_path / "link", "holds model": tmp_path}[where]
    before = snapshot(model), snapshot(source)
    argv = ["--stage", "1", "--model", str(model), "--source", str(source), "--data", str(dirs / "train.txt"),
            "--seq_len", "32", "--output_dir", str(out), "--max_steps", "1", "--report_to", "none"]
    assert exit_code(lambda: distill_cli.main(argv)) == 2
    line = one_line(capsys.readouterr().err, "natsl-distill")
    assert line.startswith("natsl-distill: error: ") and "Pick an --output_dir apart from --" in line
    assert (snapshot(model), snapshot(source)) == before and not (model / "out").exists()


def test_distill_requires_an_output_dir(dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--stage", "2", "--model", str(dirs / "natsl"), "--data", str(dirs / "train.txt"), "--seq_len", "32"]
    assert exit_code(lambda: distill_cli.main(argv)) == 2
    line = one_line(capsys.readouterr().err, "natsl-distill")
    assert "the following arguments are required: --output_dir" in line
    assert not (tmp_path / "trainer_output").exists()
    with pytest.raises(SystemExit):  # the parser of the Python API too
        distill_cli.parse_args(argv)
    assert "required: --output_dir" in capsys.readouterr().err


# --------------------------------------------------------------------------- 2. the flags messages name
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def _messages(tree: ast.Module) -> list[str]:
    """The user-facing strings of a module: its docstring, the messages of its raise statements and of its print /
    error / exit calls, and help / description / epilog texts."""
    roots = [n for n in ast.walk(tree) if isinstance(n, ast.Raise)
             or (isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", None)) in ("print", "error", "exit"))]
    roots += [k.value for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords
              if k.arg in ("help", "description", "epilog")]
    roots += [v for n in ast.walk(tree) if isinstance(n, ast.Dict) for k, v in zip(n.keys, n.values)
              if isinstance(k, ast.Constant) and k.value == "help"]
    texts = [n.value for root in roots for n in ast.walk(root) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return texts + [ast.get_docstring(tree) or ""]


def _primary(parser) -> set[str]:
    return {next(s for s in a.option_strings if s.startswith("--")) for a in parser._actions
            if any(s.startswith("--") for s in a.option_strings)}


def test_distill_messages_name_the_real_flags():
    """Every `--flag` that natsl-distill's module writes (help, docstrings, errors) and every one in the error
    messages of the recovery modules it runs is a flag natsl-distill has, spelt as its primary option string
    (`--seq_len`, not HfArgumentParser's alias `--seq-len`)."""
    flags = _primary(distill_cli.DistillArgumentParser()) | _primary(distill_cli.quick_parser())
    flags |= {"--activation_checkpointing", "--gradient_checkpointing"}  # _checkpointing_aliases: both, always
    mentioned = {}
    for name in ("distill.py", "trainer.py", "router_fit.py", "layers.py"):
        for text in _messages(ast.parse((ROOT / "conversion" / name).read_text(encoding="utf-8"))):
            for flag in FLAG.findall(text):
                mentioned.setdefault(flag, name)
    unknown = {flag: where for flag, where in mentioned.items() if flag not in flags}
    assert not unknown, unknown
    assert "--seq_len" in mentioned


@pytest.mark.parametrize("flag", ["--seq_len", "--calibration_seq_len"])
def test_too_little_data_names_the_flag_of_the_length(dirs, tmp_path, flag):
    from transformers import TrainingArguments

    from test_ddp_cpu import char_tokenizer

    (tmp_path / "short.txt").write_text("a few words")
    options = distill_cli.DistillArguments(stage=2, model=str(dirs / "natsl"), data=str(tmp_path / "short.txt"))
    training = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    with pytest.raises(ValueError) as err:
        distill_cli.load_blocks(options, training, char_tokenizer(), 64, None, "blocks", flag=flag)
    assert f"{flag} 64" in str(err.value) and "--seq-len" not in str(err.value)


# --------------------------------------------------------------------------- 3 + 6. a stage-1 run: AUC, file modes
@pytest.fixture(scope="module")
def stage1_run(dirs, tmp_path_factory):
    """natsl-distill stage 1 (1 step, a checkpoint) under umask 027, with the routers' fit reporting a NaN AUC."""
    from natsl_hf.conversion.trainer import NatslDistillTrainer

    out = tmp_path_factory.mktemp("stage1") / "out"
    real_fit = NatslDistillTrainer.fit_routers

    def fit_with_nan_auc(self, *args, **kwargs):
        return {**real_fit(self, *args, **kwargs), "router_fit_train_auc": float("nan")}

    argv = ["--stage", "1", "--model", str(dirs / "natsl"), "--source", str(dirs / "src"), "--data",
            str(dirs / "train.txt"), "--seq_len", "32", "--max_steps", "1", "--save_strategy", "steps",
            "--save_steps", "1", "--report_to", "none", "--router_fit_blocks", "2", "--calibration_blocks", "2",
            "--output_dir", str(out)]
    previous = os.umask(0o027)
    mp = pytest.MonkeyPatch()
    mp.setattr(NatslDistillTrainer, "fit_routers", fit_with_nan_auc)
    import io
    from contextlib import redirect_stdout

    stdout = io.StringIO()
    try:
        with redirect_stdout(stdout):
            code = distill_cli.main(argv)
    finally:
        mp.undo()
        os.umask(previous)
    return code, stdout.getvalue(), out


def test_a_nan_router_fit_auc_says_what_happened(stage1_run):
    code, stdout, out = stage1_run
    assert code == 0
    fitted = next(line for line in stdout.splitlines() if "routers fitted" in line)
    assert "nan" not in fitted.lower() and f"training AUC {distill_cli.NO_AUC}" in fitted
    card = (out / "README.md").read_text()
    assert "training AUC nan" not in card and f"training AUC {distill_cli.NO_AUC}" in card


def test_distill_writes_files_with_the_umask_mode(stage1_run):
    code, _, out = stage1_run
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert code == 0 and "model.safetensors" in modes and any(name.startswith("checkpoint-") for name in modes)
    assert set(modes.values()) == {0o640}, modes  # 0o666 & ~0o027, as a plain open() gives


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_hub_folder_files_have_the_umask_mode(dirs, tmp_path, umask, capsys):
    previous = os.umask(umask)
    try:
        assert hub_main([str(dirs / "natsl"), "--repo-id", "me/x", "--dry-run", "--out", str(tmp_path / "hub")]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hub").iterdir() if p.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_honour_umask_changes_only_what_was_written(tmp_path):
    from natsl_hf.conversion.output import file_stamps, honour_umask

    old, new = tmp_path / "old.txt", tmp_path / "sub" / "new.safetensors"
    old.write_text("kept")
    os.chmod(old, 0o600)
    before = file_stamps(tmp_path)
    new.parent.mkdir()
    new.write_text("written")
    os.chmod(new, 0o600)
    previous = os.umask(0o022)
    try:
        assert honour_umask(tmp_path, before) == [new]
    finally:
        os.umask(previous)
    assert (stat.S_IMODE(old.stat().st_mode), stat.S_IMODE(new.stat().st_mode)) == (0o600, 0o644)


# --------------------------------------------------------------------------- 4. missing local paths, at once
@pytest.fixture
def no_hub(monkeypatch):
    """Any lookup of a checkpoint by transformers fails the test (a Hub call, or loading a missing path)."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"looked up {args[:1]} before refusing the path")

    for cls in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.mark.parametrize("cli", ["inspect", "inspect --tokenizer", "convert", "distill --model", "distill --source",
                                 "hub"])
def test_a_missing_local_path_is_named_before_any_lookup(dirs, tmp_path, monkeypatch, capsys, no_hub, cli):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()  # `out/stage2` beside an existing `out/` can only be a local path
    missing = "out/stage2"
    text = str(dirs / "text.txt")
    prog, call = {
        "inspect": ("natsl-inspect", lambda: inspect_main([missing, "--text", text, "--out", "maps"])),
        "inspect --tokenizer": ("natsl-inspect", lambda: inspect_main([str(dirs / "natsl"), "--tokenizer", missing,
                                                                        "--text", text, "--out", "maps"])),
        "convert": ("natsl-convert", lambda: convert_main([missing, "converted", "--quiet"])),
        "distill --model": ("natsl-distill", lambda: distill_cli.main(
            ["--stage", "2", "--model", missing, "--data", text, "--output_dir", "o"])),
        "distill --source": ("natsl-distill", lambda: distill_cli.main(
            ["--stage", "1", "--model", str(dirs / "natsl"), "--source", missing, "--data", text, "--output_dir", "o"])),
        "hub": ("natsl-hub", lambda: hub_main([missing, "--repo-id", "me/x", "--dry-run", "--out", "hub"])),
    }[cli]
    assert exit_code(call) == 2
    line = one_line(capsys.readouterr().err, prog)
    assert f"{missing} does not exist" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written


def test_what_looks_local(tmp_path, monkeypatch):
    from natsl_hf.conversion.sources import looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("./x", "../x", "/abs/x", "~/x", "a/b/c", "runs/stage2", "with space/x", "a--b/c"):
        assert looks_local(name), name
    for name in ("HuggingFaceTB/SmolLM2-135M", "gpt2", "me/model-natsl"):
        assert not looks_local(name), name


# --------------------------------------------------------------------------- 5. advice for other architectures
def test_an_unsupported_architecture_is_not_advised_to_natsl_convert(dirs, tmp_path, capsys):
    gpt2 = dirs / "gpt2"
    supported = "not one natsl-convert supports (llama, mistral, qwen2, qwen3), so it cannot be converted"
    for prog, call in (
        ("natsl-hub", lambda: hub_main([str(gpt2), "--repo-id", "me/x", "--dry-run", "--out", str(tmp_path / "h")])),
        ("natsl-distill", lambda: distill_cli.main(["--stage", "2", "--model", str(gpt2), "--data",
                                                    str(dirs / "train.txt"), "--output_dir", str(tmp_path / "o")])),
        ("natsl-inspect", lambda: inspect_main([str(gpt2), "--text", str(dirs / "text.txt"), "--out",
                                                str(tmp_path / "m")])),
    ):
        assert exit_code(call) == 2
        line = one_line(capsys.readouterr().err, prog)
        assert "'gpt2'" in line and supported in line and "OUT" not in line, line
    assert list(tmp_path.iterdir()) == []
    assert hub_main([str(dirs / "src"), "--repo-id", "me/x", "--dry-run", "--out", str(tmp_path / "h")]) == 2
    assert f"convert it first (natsl-convert {dirs / 'src'} OUT)" in capsys.readouterr().err


# --------------------------------------------------------------------------- 7. a quick start
CLI_MODULES = {"natsl-convert": "natsl_hf.conversion.convert", "natsl-distill": "natsl_hf.conversion.distill",
               "natsl-inspect": "natsl_hf.inspect", "natsl-hub": "natsl_hf.hub"}


def _imported(importtime_stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("prog", sorted(CLI_MODULES))
@pytest.mark.parametrize("args", [["--help"], []], ids=["help", "usage error"])
def test_help_and_usage_errors_start_without_torch(prog, args, tmp_path):
    """`--help` and a usage error import neither torch nor transformers, as a console script and as `python -m`."""
    script = Path(sys.executable).parent / prog
    commands = [[sys.executable, "-X", "importtime", "-m", CLI_MODULES[prog], *args]]
    if script.is_file():  # the console script setup.py installs
        commands.append([sys.executable, "-X", "importtime", str(script), *args])
    for command in commands:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == (0 if args else 2), proc.stderr[-3000:]
        heavy = {m for m in _imported(proc.stderr) if m.split(".")[0] in ("torch", "transformers", "safetensors")}
        assert not heavy, (command, sorted(heavy)[:10])
        if args:
            assert f"usage: {prog}" in proc.stdout
        else:
            errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
            assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: "), proc.stderr[-3000:]


def test_import_natsl_hf_still_registers_and_the_cli_loads_on_use(tmp_path):
    check = ("import sys, natsl_hf; from transformers import AutoConfig; "
             "assert type(AutoConfig.for_model('natsl')).__name__ == 'NatslConfig'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    lazy = ("import sys; sys.argv = ['natsl-hub']; import natsl_hf; assert 'torch' not in sys.modules; "
            "config = natsl_hf.NatslConfig; from transformers import AutoConfig; "
            "assert type(AutoConfig.for_model('natsl')) is config; print('ok')")
    proc = subprocess.run([sys.executable, "-c", lazy], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_the_commands_run_end_to_end_as_commands(dirs, tmp_path):
    """In a process started as a command, natsl_hf imports (and registers) its classes on first use: each command
    still converts, trains, inspects and publishes (`python -m`, as `accelerate launch -m` runs natsl-distill)."""
    pytest.importorskip("matplotlib")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1")
    out = tmp_path
    steps = [
        ("natsl-convert", [str(dirs / "src"), str(out / "natsl"), "--chunk-size", "8", "--quiet"]),
        ("natsl-distill", ["--stage", "2", "--model", str(out / "natsl"), "--data", str(dirs / "train.txt"),
                           "--seq_len", "32", "--max_steps", "1", "--report_to", "none", "--calibration_blocks", "2",
                           "--output_dir", str(out / "stage2")]),
        ("natsl-inspect", [str(out / "stage2"), "--text", str(dirs / "text.txt"), "--out", str(out / "maps")]),
        ("natsl-hub", [str(out / "stage2"), "--repo-id", "me/x", "--dry-run", "--out", str(out / "hub")]),
    ]
    for prog, args in steps:
        proc = subprocess.run([sys.executable, "-m", CLI_MODULES[prog], *args], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env=env)
        assert proc.returncode == 0, (prog, proc.stdout[-2000:], proc.stderr[-4000:])
    assert (out / "maps" / "summary.json").is_file() and (out / "hub" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- 8. Ctrl-C
def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def interrupted_main(call) -> int:
    """`call()`'s exit status; a KeyboardInterrupt that escapes it fails the test (rather than stopping pytest)."""
    try:
        return call()
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main: a traceback instead of one line")


@pytest.mark.parametrize("overwrite", [False, True])
def test_ctrl_c_in_convert(dirs, tmp_path, monkeypatch, capsys, overwrite):
    from natsl_hf.conversion import convert

    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "old.txt").write_text("previous conversion")
    real_write = convert._write_checkpoint

    def write_then_interrupt(folder, *args):
        real_write(folder, *args)  # the checkpoint is all in the temp folder when Ctrl-C comes
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "_write_checkpoint", write_then_interrupt)
    argv = [str(dirs / "src"), str(out), "--chunk-size", "8", "--quiet"] + (["--overwrite"] if overwrite else [])
    assert interrupted_main(lambda: convert_main(argv)) == 130
    line = one_line(capsys.readouterr().err, "natsl-convert")
    assert line.startswith("natsl-convert: interrupted; nothing was written"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if overwrite else [])  # no temp folder left
    if overwrite:
        assert snapshot(out) == {"old.txt": b"previous conversion"}


def test_ctrl_c_in_distill(dirs, tmp_path, monkeypatch, capsys):
    from natsl_hf.conversion.trainer import NatslDistillTrainer

    monkeypatch.setattr(NatslDistillTrainer, "train", interrupt)
    out = tmp_path / "out"
    assert interrupted_main(lambda: distill_cli.main(distill_argv(dirs, out, "--max_steps", "1"))) == 130
    line = one_line(capsys.readouterr().err, "natsl-distill")
    assert line == "natsl-distill: interrupted; nothing was written" and not out.exists()


def test_ctrl_c_in_inspect(dirs, tmp_path, monkeypatch, capsys):
    import natsl_hf.inspect

    monkeypatch.setattr(natsl_hf.inspect, "routing_summary", interrupt)
    out = tmp_path / "maps"
    assert interrupted_main(lambda: inspect_main([str(dirs / "natsl"), "--text", str(dirs / "text.txt"),
                                                  "--out", str(out)])) == 130
    assert one_line(capsys.readouterr().err, "natsl-inspect") == "natsl-inspect: interrupted; nothing was written"
    assert not out.exists()


def test_ctrl_c_in_hub(dirs, tmp_path, monkeypatch, capsys):
    import natsl_hf.hub

    def save_then_interrupt(model, out_dir, **kwargs):
        Path(out_dir, "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(natsl_hf.hub, "save_for_hub", save_then_interrupt)
    out = tmp_path / "hub"
    assert interrupted_main(lambda: hub_main([str(dirs / "natsl"), "--repo-id", "me/x", "--dry-run",
                                              "--out", str(out)])) == 130
    assert one_line(capsys.readouterr().err, "natsl-hub") == "natsl-hub: interrupted; nothing was written"
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 9. names that exist
def test_card_and_readme_say_how_to_install_and_pass_the_cache():
    from natsl_hf.model_card import render_model_card

    from natsl_testing import tiny_config

    card = render_model_card(tiny_config())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for text in (card, readme):
        assert not re.search(r"pip install ['\"]?natsl-hf", text)  # no such distribution on PyPI
        assert "cache=cache" in text and "past_key_values=" in text and "5.24" in text  # both names, and when
    assert "pip install -e ." in card and "trust_remote_code=True" in card
    assert "--activation_checkpointing" in readme and "--gradient_checkpointing" in readme


def test_both_activation_checkpointing_flags_on_every_transformers():
    """natsl-distill spells `--activation_checkpointing` / `--gradient_checkpointing` as this transformers has it
    (5.17-5.22: only gradient_*; 5.23+: activation_*, with gradient_* a deprecated alias)."""
    old = {"gradient_checkpointing": None, "gradient_checkpointing_kwargs": None}
    argv = ["--activation_checkpointing", "--activation-checkpointing-kwargs={\"use_reentrant\": false}", "--x"]
    assert distill_cli._checkpointing_aliases(argv, old) == [
        "--gradient_checkpointing", "--gradient_checkpointing_kwargs={\"use_reentrant\": false}", "--x"]
    new = {**old, "activation_checkpointing": None, "activation_checkpointing_kwargs": None}
    assert distill_cli._checkpointing_aliases(argv, new) == argv
    common = ["--stage", "2", "--model", "m", "--data", "d", "--output_dir", "o"]
    for flag in ("--activation_checkpointing", "--gradient_checkpointing"):
        _, training = distill_cli.parse_args([*common, flag])
        assert training.gradient_checkpointing is True
        kwargs = getattr(training, "activation_checkpointing_kwargs", None) or training.gradient_checkpointing_kwargs
        assert kwargs == {"use_reentrant": False}


# --------------------------------------------------------------------------- bad values, each one line, nothing written
DISTILL_BAD = [
    (["--seq_len", "1"], "--seq_len 1: expected an integer >= 2"),
    (["--max_blocks", "0"], "--max_blocks 0: expected an integer >= 1"),
    (["--router_fit_blocks", "-1"], "--router_fit_blocks -1: expected an integer >= 0"),
    (["--calibration_blocks", "-2"], "--calibration_blocks -2: expected an integer >= 0"),
    (["--calibration_seq_len", "0"], "--calibration_seq_len 0: expected an integer >= 2"),
    (["--lora_alpha", "0"], "--lora_alpha 0: expected an integer >= 1"),
    (["--softmax_budget", "0"], "expected a fraction in (0, 1]"),
    (["--softmax_budget", "1.5"], "expected a fraction in (0, 1]"),
    (["--softmax_budget", "nan"], "expected a fraction in (0, 1]"),
    (["--router_loss_weight", "-1"], "--router_loss_weight -1.0: expected a weight >= 0"),
    (["--router_fit_l2", "-0.1"], "--router_fit_l2 -0.1: expected a penalty >= 0"),
    (["--kd_temperature", "0"], "--kd_temperature"),
    (["--max_steps", "0"], "--max_steps 0: expected a number of steps >= 1"),
    (["--max_steps", "-5"], "--max_steps -5: expected a number of steps >= 1"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: expected an integer >= 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: expected an integer >= 1"),
    (["--learning_rate", "-0.0001"], "--learning_rate -0.0001: expected a rate >= 0"),
    (["--num_train_epochs", "0"], "--num_train_epochs 0.0: expected a number of epochs > 0"),
    (["--warmup_steps", "-1"], "warmup_steps"),
    (["--data", "DIRS/missing.txt"], "--data DIRS/missing.txt does not exist"),
    (["--model", "DIRS/train.txt"], "--model DIRS/train.txt is a file, not a folder"),
    (["--output_dir", "DIRS/train.txt"], "exists and is not a folder"),
]


@pytest.mark.parametrize("argv, message", DISTILL_BAD, ids=[" ".join(a) for a, _ in DISTILL_BAD])
def test_distill_bad_values(dirs, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    argv = [a.replace("DIRS", str(dirs)) for a in argv]
    assert exit_code(lambda: distill_cli.main(distill_argv(dirs, out, *argv))) == 2
    line = one_line(capsys.readouterr().err, "natsl-distill")
    assert line.startswith("natsl-distill: error: ") and message.replace("DIRS", str(dirs)) in line, line
    assert not out.exists() and list(tmp_path.iterdir()) == []


CONVERT_BAD = [
    (["--softmax-budget", "0"], r"softmax_budget=0\.0 is invalid: expected a fraction in \(0, 1\]"),
    (["--softmax-budget", "-0.5"], r"softmax_budget=-0\.5 is invalid: expected a fraction in \(0, 1\]"),
    (["--sink-chunks", "-1"], r"--sink-chunks -1: expected an integer >= 0"),
    (["--chunk-size", "0"], r"--chunk-size 0: expected an integer >= 1"),
    (["--max-positions", "0"], r"--max-positions 0: expected an integer >= 1"),
    (["--max-positions", "100000"], r"max_position_embeddings=100000 must be .*\(set by --max-positions\)"),
    (["--layers", "-1"], r"--layers expects layer indices >= 0"),
    (["--layers", ","], r"--layers names no layer"),
    (["--gguf-file", "model.gguf"], r"--gguf-file .*model\.gguf does not exist"),
]


@pytest.mark.parametrize("argv, match", CONVERT_BAD, ids=[" ".join(a) for a, _ in CONVERT_BAD])
def test_convert_bad_values(dirs, tmp_path, capsys, argv, match):
    assert exit_code(lambda: convert_main([str(dirs / "src"), str(tmp_path / "out"), "--quiet", *argv])) == 2
    line = one_line(capsys.readouterr().err, "natsl-convert")
    assert re.search(match, line), line
    assert list(tmp_path.iterdir()) == []


def test_convert_src_that_is_a_plain_file(dirs, tmp_path, capsys):
    assert convert_main([str(dirs / "train.txt"), str(tmp_path / "out")]) == 2
    assert "is a file but not a .gguf file" in one_line(capsys.readouterr().err, "natsl-convert")


INSPECT_BAD = [
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--dpi", "0"], "--dpi must be >= 1"),
    (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    (["--text", "BINARY"], "is not UTF-8 text"),
    (["--out", "FILE"], "exists and is not a folder"),
]


@pytest.mark.parametrize("argv, message", INSPECT_BAD, ids=[" ".join(a) for a, _ in INSPECT_BAD])
def test_inspect_bad_values(dirs, tmp_path, capsys, argv, message):
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3")
    (tmp_path / "file").write_text("")
    argv = [a.replace("BINARY", str(tmp_path / "binary.txt")).replace("FILE", str(tmp_path / "file")) for a in argv]
    base = [str(dirs / "natsl"), "--text", str(dirs / "text.txt"), "--out", str(tmp_path / "maps")]
    assert exit_code(lambda: inspect_main([*base, *argv])) == 2
    assert message in one_line(capsys.readouterr().err, "natsl-inspect")
    assert not (tmp_path / "maps").exists()


def test_hub_bad_values(dirs, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    model = str(dirs / "natsl")
    for argv, message in (
        (["--metrics", str(tmp_path / "missing.json")], "--metrics " + str(tmp_path / "missing.json") + " does not exist"),
        (["--out", str(tmp_path / "file")], "exists and is not a folder"),
        (["--out", model], "is (or contains) the checkpoint"),
    ):
        assert exit_code(lambda: hub_main([model, "--repo-id", "me/x", "--dry-run", *argv])) == 2
        assert message in one_line(capsys.readouterr().err, "natsl-hub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
