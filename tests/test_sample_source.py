"""bench/sample_source.py (the source's own text as training shards) on a tiny random Llama and a word-level
tokenizer with a chat template, on the CPU: prompts of both kinds, documents closed by EOS, shards that the
project's shard reader and bench/recover_scale.py's block builder read back beside another folder."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name):
    sys.path.insert(0, str(BENCH))  # the scripts import their siblings, as `python bench/x.py` runs them
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def tools():
    return _load("sample_source"), _load("recover_scale")


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<eos>"] + [f"w{i}" for i in range(61)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = "{% for m in messages %}w1 {{ m['content'] }} <eos> {% endfor %}w2"
    return tok


def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                        max_position_embeddings=512, eos_token_id=2, pad_token_id=1))


def data_folder(folder: Path, docs: list[np.ndarray], eos: int, name: str = "train-00000.npy.xz") -> Path:
    """A folder in bench/build_recovery_data.py's format holding `docs`."""
    import hashlib

    from build_recovery_data import encode_shard  # noqa: E402 (bench on the path through the fixture's modules)

    folder.mkdir(parents=True)
    blob = encode_shard(np.concatenate(docs))
    (folder / name).write_bytes(blob)
    manifest = {"format": "natsl-recovery-data/1", "tokenizer": {"eos_token_id": eos, "vocab_size": 64},
                "splits": {"train": {"shards": [{"file": name, "sha256": hashlib.sha256(blob).hexdigest()}]}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_prompts_sample_and_shards(tools, tmp_path):
    sample_source, recover = tools
    sys.path.insert(0, str(BENCH))
    try:
        tok = word_tokenizer()
        eos = tok.eos_token_id
        rng = np.random.default_rng(0)
        docs = [np.append(rng.integers(3, 64, size=int(n)), eos).astype(np.uint16) for n in rng.integers(200, 300, 12)]
        natural = data_folder(tmp_path / "natural", docs, eos)

        prompts = sample_source.prompts(tok, docs, 6, random.Random(0))
        assert len(prompts) == 6
        chats = [p for p in prompts if p[0] == tok.convert_tokens_to_ids("w1")]
        assert len(chats) == 3 and all(p[-1] == tok.convert_tokens_to_ids("w2") for p in chats)  # generation prompt
        plain = [p for p in prompts if p not in chats]
        assert all(16 <= len(p) <= 64 and any(np.array_equal(p, d[: len(p)]) for d in docs) for p in plain)

        sampled, stats = sample_source.sample(tiny_llama(64), tok, docs, 150, minutes=5, batch=4, new_tokens=8, seed=0)
        assert stats["tokens"] == sum(len(d) for d in sampled) >= 150 and stats["documents"] == len(sampled)
        for d in sampled:  # prompt + at most 8 sampled tokens, closed by EOS (a chat prompt holds the template's own)
            assert d[-1] == eos
            assert len(d) <= 64 + 8 + 1 or d[0] == tok.convert_tokens_to_ids("w1")
        files = sample_source.write_folder(tmp_path / "selfgen", sampled, recover.manifest_of(natural),
                                           {"command": "test"})
        assert files == ["selfgen-00000.npy.xz"]

        from natsl_hf.conversion.data import load_token_shards

        back = load_token_shards(tmp_path / "selfgen", "train")
        assert sum(len(d) for d in back) == stats["tokens"]
        blocks, names = recover.train_blocks([natural, tmp_path / "selfgen"], 64, seed=0, quick=False, seq_len=128)
        total = sum(len(d) for d in docs) + stats["tokens"]
        assert blocks.shape == (total // 128, 128)
        assert names == ["natural/train-00000.npy.xz", "selfgen/selfgen-00000.npy.xz"]
        own = recover.train_blocks([tmp_path / "selfgen"], 64, seed=0, quick=False, seq_len=128)[0]
        nat = recover.train_blocks([natural], 64, seed=0, quick=False, seq_len=128)[0]
        mixed = recover.mix_blocks(nat, own, 0.75, seed=0)
        from_own = sum(any(torch.equal(m, o) for o in own) for m in mixed)
        assert len(mixed) == len(nat) * 4 and from_own == 3 * len(nat)  # own blocks cycled up to the share
    finally:
        sys.path.remove(str(BENCH))


def test_recover_scale_refuses_selfgen_without_gpu(tools, tmp_path, capsys):
    _, recover = tools
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    with pytest.raises(SystemExit):
        recover.main(["--stage", "2", "--minutes", "1", "--quick", "--work", str(tmp_path), "--out", str(tmp_path / "o"),
                      "--selfgen-tokens", "100"])
    assert "--selfgen-tokens samples with the source on the GPU" in capsys.readouterr().err
