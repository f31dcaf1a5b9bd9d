"""Conversion of tiny Llama / Qwen2 / Qwen3 / Mistral checkpoints to NAtS-L (conversion/).

Every source is built here (no downloads): GQA (4 q heads, 2 KV heads) and head_dim 16 != 48 / 4,
with the norms and biases perturbed away from their 1 / 0 init so an uncopied tensor shows.
Sequences are 37 tokens with chunk_size 4 (9 complete chunks; 8 routable after the sink).

Bounds (fp32):
- route_override="softmax": logits == source logits to 1e-4 (measured ~2e-7).
- default init: the router starts softmax-biased, so every chunk routes softmax (asserted:
  softmax_fraction == 1) and the logits equal the source's to the same 1e-4; the first chunk
  (the sink, always softmax) to 1e-5.
- route_override="linear": the sink chunk still matches to 1e-5, later tokens differ by > 1e-3
  (gdn_alpha = 0 then drops linear chunks from the context), which shows the comparison can fail.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from natsl_hf import NatslForCausalLM
from natsl_hf.conversion import ConversionError, UnsupportedModelError, convert_checkpoint, convert_model
from natsl_hf.conversion.convert import main
from natsl_hf.conversion.families import is_new_parameter

VOCAB, T, C = 97, 37, 4
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def make_source(family: str, **overrides):
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**COMMON, "attention_bias": True, "rope_parameters": LLAMA3_ROPE, **overrides}))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{**COMMON, **overrides}))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**{**COMMON, "tie_word_embeddings": True, **overrides}))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**{**COMMON, **overrides}))
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases: make them differ from their init
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def save_source(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def assert_no_output(out: Path):
    assert not out.exists(), f"{out} was left behind by a failed conversion"
    leftovers = [p.name for p in out.parent.iterdir() if ".natsl-tmp-" in p.name or ".natsl-old-" in p.name]
    assert not leftovers, f"temporary directories left behind: {leftovers}"


FAMILIES = ["llama", "qwen2", "qwen3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_conversion_reproduces_source(family, tmp_path, ids, capsys):
    src_model = make_source(family)
    src = save_source(src_model, tmp_path / "src")
    out = tmp_path / "out"
    assert main([str(src), str(out), "--chunk-size", str(C), "--quiet"]) == 0
    summary = capsys.readouterr().out
    assert "added" in summary and "bytes" in summary

    for name in ("model.safetensors", "config.json", "generation_config.json", "README.md",
                 "configuration_natsl.py", "modeling_natsl.py"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "natsl" and config["source_model_type"] == family
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_natsl.NatslForCausalLM"
    card = (out / "README.md").read_text()
    assert "natsl-convert" in card and f"--chunk-size {C}" in card and "not measured" in card

    # every source tensor is in the output, unchanged
    saved = load_file(out / "model.safetensors")
    for name, tensor in src_model.state_dict().items():
        if name == "lm_head.weight" and src_model.config.tie_word_embeddings:
            continue
        assert torch.equal(saved[name], tensor), name

    ref = logits(src_model, ids)
    forced = NatslForCausalLM.from_pretrained(out, route_override="softmax").eval()
    assert (logits(forced, ids) - ref).abs().max().item() <= 1e-4

    default = NatslForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        outputs = default(ids)
    assert outputs.softmax_fraction.item() == 1.0
    assert (outputs.logits[:, :C] - ref[:, :C]).abs().max().item() <= 1e-5
    assert (outputs.logits - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_python_api_convert_model(family, ids):
    src_model = make_source(family)
    ref = logits(src_model, ids)
    model = convert_model(src_model, chunk_size=8, route_override="softmax")
    cfg = model.config
    assert cfg.chunk_size == 8 and cfg.natsl_layers == [0, 1, 2] and cfg.head_dim == 16
    assert cfg.num_key_value_heads == 2 and cfg.rope_parameters == src_model.config.rope_parameters
    assert cfg.attention_bias == (family != "qwen3") and cfg.qk_norm == (family == "qwen3")
    assert cfg.attention_out_bias == (family == "llama")
    assert cfg.tie_word_embeddings == (family == "qwen3")
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (logits(model, ids) - ref).abs().max().item() <= 1e-4
    # the result shares no storage with the source
    assert model.model.embed_tokens.weight.data_ptr() != src_model.model.embed_tokens.weight.data_ptr()


def test_forced_linear_differs_after_the_sink(ids):
    src_model = make_source("llama")
    ref = logits(src_model, ids)
    linear = logits(convert_model(src_model, chunk_size=C, route_override="linear"), ids)
    assert (linear[:, :C] - ref[:, :C]).abs().max().item() <= 1e-5
    assert (linear[:, 2 * C:] - ref[:, 2 * C:]).abs().max().item() > 1e-3


def test_checkpoint_api_from_model_object(tmp_path, ids):
    src_model = make_source("qwen2")
    model = convert_checkpoint(src_model, tmp_path / "out", chunk_size=C, natsl_layers=[1], progress=False)
    assert model.natsl_conversion_report["added_params"] > 0
    reloaded = NatslForCausalLM.from_pretrained(tmp_path / "out", route_override="softmax")
    assert reloaded.config.natsl_layers == [1]
    assert (logits(reloaded, ids) - logits(src_model, ids)).abs().max().item() <= 1e-4


def test_sharded_input(tmp_path, ids):
    src_model = make_source("llama")
    src = save_source(src_model, tmp_path / "src", max_shard_size="20KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = convert_checkpoint(src, tmp_path / "out", chunk_size=C, route_override="softmax", progress=False)
    assert (logits(model, ids) - logits(src_model, ids)).abs().max().item() <= 1e-4


def test_partial_layers(tmp_path, ids):
    src_model = make_source("qwen3")
    src = save_source(src_model, tmp_path / "src")
    out = tmp_path / "out"
    assert main([str(src), str(out), "--chunk-size", str(C), "--layers", "0,2", "--quiet"]) == 0
    model = NatslForCausalLM.from_pretrained(out).eval()
    assert model.config.natsl_layers == [0, 2]
    names = [n for n, _ in model.named_parameters() if is_new_parameter(n)]
    assert names and not any(".layers.1." in n for n in names)
    assert any(".layers.0." in n for n in names) and any(".layers.2." in n for n in names)
    with torch.no_grad():
        outputs = model(ids)
    assert outputs.layer_softmax_fraction.shape == (2,)
    assert (outputs.logits - logits(src_model, ids)).abs().max().item() <= 1e-4


def test_dtype_and_overwrite(tmp_path):
    src = save_source(make_source("llama"), tmp_path / "src")
    out = tmp_path / "out"
    convert_checkpoint(src, out, chunk_size=C, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_checkpoint(src, out, chunk_size=C, progress=False)
    convert_checkpoint(src, out, chunk_size=C, dtype="bfloat16", overwrite=True, progress=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert_no_output(out / "never")  # and no temp/old dirs beside out


def test_pickle_only_needs_allow_pickle(tmp_path, ids):
    src_model = make_source("llama")
    src = save_source(src_model, tmp_path / "src")  # transformers 5 writes safetensors only: pickle by hand
    torch.save(src_model.state_dict(), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="--allow-pickle"):
        convert_checkpoint(src, out, progress=False)
    assert_no_output(out)
    assert main([str(src), str(out), "--chunk-size", str(C), "--allow-pickle", "--quiet"]) == 0
    model = NatslForCausalLM.from_pretrained(out, route_override="softmax")
    assert (logits(model, ids) - logits(src_model, ids)).abs().max().item() <= 1e-4


def _edit_config(src: Path, **changes):
    path = src / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _break(kind: str, src: Path) -> None:
    if kind == "model_type":
        _edit_config(src, model_type="gpt2")
    elif kind == "missing_weights":
        (src / "model.safetensors").unlink()
    elif kind == "corrupt":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[:64])
    elif kind == "shape":
        _edit_config(src, intermediate_size=80)
    elif kind == "unused_tensor":  # the weights have biases the config does not declare
        _edit_config(src, attention_bias=False)
    elif kind == "extra_layer":
        _edit_config(src, num_hidden_layers=4)


@pytest.mark.parametrize(
    "kind, error, match",
    [
        ("model_type", UnsupportedModelError, "'gpt2' is not supported"),
        ("missing_weights", ConversionError, "No weight files"),
        ("corrupt", ConversionError, "corrupt or truncated"),
        ("shape", ConversionError, r"shape \(96, 48\) but the config implies \(80, 48\)"),
        ("unused_tensor", ConversionError, "would be dropped"),
        ("extra_layer", ConversionError, "missing from"),
    ],
)
def test_bad_checkpoint(kind, error, match, tmp_path, capsys):
    src = save_source(make_source("llama"), tmp_path / "src")
    _break(kind, src)
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        convert_checkpoint(src, out, chunk_size=C, progress=False)
    assert_no_output(out)
    assert main([str(src), str(out), "--quiet"]) == 2
    assert "natsl-convert: error:" in capsys.readouterr().err
    assert_no_output(out)


def test_shard_index_pointing_to_missing_file(tmp_path):
    src = save_source(make_source("llama"), tmp_path / "src", max_shard_size="20KB")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=f"missing file.*{shard.name}"):
        convert_checkpoint(src, out, progress=False)
    assert_no_output(out)


@pytest.mark.parametrize(
    "argv_tail, match",
    [
        (["--chunk-size", "48"], r"chunk_size=48 is invalid: expected a power of two .*\(set by --chunk-size\)"),
        (["--layers", "0,7"], r"natsl_layers=\[7\] is invalid: layer indices must lie in \[0, 2\].*--layers"),
        (["--softmax-budget", "1.5"], r"softmax_budget=1\.5 is invalid.*--softmax-budget"),
    ],
)
def test_bad_options(argv_tail, match, tmp_path, capsys):
    src = save_source(make_source("qwen2"), tmp_path / "src")
    out = tmp_path / "out"
    assert main([str(src), str(out), "--quiet", *argv_tail]) == 2
    import re

    assert re.search(match, capsys.readouterr().err)
    assert_no_output(out)


def test_out_inside_src_refused(tmp_path):
    src = save_source(make_source("llama"), tmp_path / "src")
    with pytest.raises(ValueError, match="inside SRC"):
        convert_checkpoint(src, src / "natsl", progress=False)
    assert not (src / "natsl").exists()
    with pytest.raises(ValueError, match="inside OUT"):
        convert_checkpoint(src, tmp_path, overwrite=True, progress=False)
    assert (src / "model.safetensors").is_file()


def test_sliding_window_sources(tmp_path, ids):
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        convert_model(make_source("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1))
    mistral = make_source("mistral", sliding_window=64)
    with pytest.raises(UnsupportedModelError, match="max_position_embeddings=64"):
        convert_model(mistral)
    model = convert_model(mistral, chunk_size=C, max_position_embeddings=64, route_override="softmax")
    assert model.config.max_position_embeddings == 64
    assert model.config.attention_bias is False and model.config.attention_out_bias is False
    assert (logits(model, ids) - logits(mistral, ids)).abs().max().item() <= 1e-4
    # a window covering the whole context masks nothing and converts as is
    assert convert_model(make_source("mistral", sliding_window=256)).config.max_position_embeddings == 256


def test_missing_gguf_file(tmp_path, capsys):
    src = save_source(make_source("llama"), tmp_path / "src")
    out = tmp_path / "out"
    assert main([str(src), str(out), "--gguf-file", "nope.gguf", "--quiet"]) == 2
    assert "nope.gguf does not exist" in capsys.readouterr().err
    assert_no_output(out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint(tmp_path / "absent.gguf", out, progress=False)
    assert_no_output(out)


def write_tiny_gguf(path: Path, n_vocab=64, dim=32, n_layers=2, n_heads=4, n_kv=2, ffn=64, context_length=128,
                    license: str | None = "mit") -> Path:
    """A float32 llama GGUF with a byte-level SentencePiece-style vocabulary, written with the gguf package.

    The vocabulary is <unk>, <s>, </s> and the bytes 0x00.. (n_vocab=259 covers every byte); no chat
    template. `license` goes into `general.license` (None: no license field).
    """
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(context_length)
    writer.add_embedding_length(dim)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(dim // n_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    if license is not None:
        writer.add_license(license)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(n_vocab - 3)])
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types([2, 3, 3] + [6] * (n_vocab - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    head = dim // n_heads

    def tensor(name, shape, base=0.0):
        writer.add_tensor(name, (base + 0.1 * rng.standard_normal(shape)).astype(np.float32))

    tensor("token_embd.weight", (n_vocab, dim))
    for i in range(n_layers):
        tensor(f"blk.{i}.attn_norm.weight", (dim,), 1.0)
        tensor(f"blk.{i}.ffn_norm.weight", (dim,), 1.0)
        tensor(f"blk.{i}.attn_q.weight", (n_heads * head, dim))
        tensor(f"blk.{i}.attn_k.weight", (n_kv * head, dim))
        tensor(f"blk.{i}.attn_v.weight", (n_kv * head, dim))
        tensor(f"blk.{i}.attn_output.weight", (dim, n_heads * head))
        tensor(f"blk.{i}.ffn_gate.weight", (ffn, dim))
        tensor(f"blk.{i}.ffn_up.weight", (ffn, dim))
        tensor(f"blk.{i}.ffn_down.weight", (dim, ffn))
    tensor("output_norm.weight", (dim,), 1.0)
    tensor("output.weight", (n_vocab, dim))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_source(tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    assert main([str(path), str(out), "--chunk-size", str(C), "--quiet"]) == 0
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "license: mit" in card and f"natsl-convert {path} {out}" in card
    source = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    model = NatslForCausalLM.from_pretrained(out, route_override="softmax").eval()
    ids = torch.randint(0, 64, (1, 19), generator=torch.Generator().manual_seed(2))
    assert model.config.source_model_type == "llama" and model.config.num_key_value_heads == 2
    assert (logits(model, ids) - logits(source, ids)).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------- atomic writes
def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _fail_after_save(monkeypatch, exc: BaseException) -> list[Path]:
    """Make NatslForCausalLM.save_pretrained write its files, then raise `exc`. Returns the dirs written."""
    original = NatslForCausalLM.save_pretrained
    written: list[Path] = []

    def save_then_fail(self, save_directory, *args, **kwargs):
        original(self, save_directory, *args, **kwargs)
        written.append(Path(save_directory))
        raise exc

    monkeypatch.setattr(NatslForCausalLM, "save_pretrained", save_then_fail)
    return written


def _fail_card_write(monkeypatch, exc: BaseException) -> list[Path]:
    """Make the README.md write into a conversion temp dir raise `exc` (after the weights were written)."""
    original = Path.write_text
    written: list[Path] = []

    def write_text(self, *args, **kwargs):
        if self.name == "README.md" and ".natsl-tmp-" in self.parent.name:
            written.append(self.parent)
            assert (self.parent / "model.safetensors").is_file()  # the failure really is midway
            raise exc
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    return written


FAILURES = {
    "save_pretrained-OSError": (_fail_after_save, OSError, "No space left on device"),
    "save_pretrained-KeyboardInterrupt": (_fail_after_save, KeyboardInterrupt, ""),
    "card-OSError": (_fail_card_write, OSError, "No space left on device"),
    "card-KeyboardInterrupt": (_fail_card_write, KeyboardInterrupt, ""),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_failed_write_leaves_no_output(failure, tmp_path, monkeypatch):
    src = save_source(make_source("llama"), tmp_path / "src")
    out = tmp_path / "out"
    patch, exc_type, message = FAILURES[failure]
    written = patch(monkeypatch, exc_type(message))
    with pytest.raises(exc_type):
        convert_checkpoint(src, out, chunk_size=C, progress=False)
    assert written and ".natsl-tmp-" in written[0].name  # files were written before the failure...
    assert_no_output(out)  # ...and none of them is left


@pytest.mark.parametrize("failure", list(FAILURES))
def test_failed_overwrite_keeps_old_output(failure, tmp_path, monkeypatch):
    src = save_source(make_source("llama"), tmp_path / "src")
    out = tmp_path / "out"
    convert_checkpoint(src, out, chunk_size=C, progress=False)
    before = _snapshot(out)
    patch, exc_type, message = FAILURES[failure]
    written = patch(monkeypatch, exc_type(message))
    with pytest.raises(exc_type):
        convert_checkpoint(src, out, chunk_size=8, dtype="bfloat16", overwrite=True, progress=False)
    assert written
    assert _snapshot(out) == before  # byte for byte
    assert_no_output(out / "never")  # no temp/old dirs beside out


@pytest.mark.parametrize("exc_type", [OSError, KeyboardInterrupt])
def test_failed_swap_restores_old_output(exc_type, tmp_path, monkeypatch):
    """The new OUT is complete but renaming it into place fails after the old OUT was moved aside."""
    src = save_source(make_source("llama"), tmp_path / "src")
    out = tmp_path / "out"
    convert_checkpoint(src, out, chunk_size=C, progress=False)
    before = _snapshot(out)
    original = Path.rename

    def rename(self, target):
        if ".natsl-tmp-" in self.name and Path(target) == out:
            assert not out.exists()  # the old OUT is already aside
            raise exc_type("rename failed")
        return original(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(exc_type):
        convert_checkpoint(src, out, chunk_size=8, overwrite=True, progress=False)
    assert _snapshot(out) == before
    assert_no_output(out / "never")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_has_mkdir_permissions(umask, tmp_path):
    """OUT is readable as the umask allows (tempfile.mkdtemp would have made it 0o700)."""
    src = save_source(make_source("llama"), tmp_path / "src")
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        convert_checkpoint(src, out, chunk_size=C, progress=False)
        assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
        convert_checkpoint(src, out, chunk_size=C, overwrite=True, progress=False)
        assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    finally:
        os.umask(previous)
    # like files from a plain open(): transformers itself writes model.safetensors 0o600
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


# --------------------------------------------------------------------------- files carried over
def tiny_tokenizer():
    """A WordLevel tokenizer over VOCAB words (w0 .. w92 + specials) with a chat template; built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 4)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
    return tokenizer


def test_tokenizer_and_generation_config_carried_over(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    src_model = make_source("llama")
    src_model.generation_config = GenerationConfig(
        bos_token_id=2, eos_token_id=3, pad_token_id=1, max_new_tokens=7, do_sample=True, temperature=0.3, top_p=0.8
    )
    src = save_source(src_model, tmp_path / "src")
    tiny_tokenizer().save_pretrained(src)
    from natsl_hf.conversion.sources import TOKENIZER_FILES

    tokenizer_files = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    assert "tokenizer.json" in tokenizer_files and "tokenizer_config.json" in tokenizer_files

    out = tmp_path / "out"
    assert main([str(src), str(out), "--chunk-size", str(C), "--quiet"]) == 0
    for name in tokenizer_files + ["generation_config.json"]:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name

    source_tok, out_tok = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(out)
    text = "w3 w17 w92 unknown w0 w41"
    assert out_tok(text)["input_ids"] == source_tok(text)["input_ids"]
    assert out_tok("w5 w6")["input_ids"] == [9, 10]
    messages = [{"role": "user", "content": "w1 w2"}]
    assert out_tok.apply_chat_template(messages) == source_tok.apply_chat_template(messages)

    generation = GenerationConfig.from_pretrained(out)
    assert (generation.max_new_tokens, generation.temperature, generation.top_p) == (7, 0.3, 0.8)
    assert NatslForCausalLM.from_pretrained(out).generation_config.max_new_tokens == 7


def test_license_from_source_card(tmp_path):
    from huggingface_hub import ModelCard

    src = save_source(make_source("qwen2"), tmp_path / "src")
    (src / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n\n# A tiny source model\n", encoding="utf-8")
    model = convert_checkpoint(src, tmp_path / "out", chunk_size=C, progress=False)
    assert model.natsl_conversion_report["license"] == "mit"
    assert ModelCard.load(tmp_path / "out" / "README.md").data.license == "mit"
    # an explicit license (--license) wins over the source card's
    assert main([str(src), str(tmp_path / "out2"), "--license", "apache-2.0", "--quiet"]) == 0
    assert ModelCard.load(tmp_path / "out2" / "README.md").data.license == "apache-2.0"
    # no README, no license: the card's metadata has none
    (src / "README.md").unlink()
    model = convert_checkpoint(src, tmp_path / "out3", chunk_size=C, progress=False)
    assert model.natsl_conversion_report["license"] is None
    assert ModelCard.load(tmp_path / "out3" / "README.md").data.license is None
