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


@pytest.mark.parametrize("flag", ["--selfgen-tokens", "--qa-turns"])
def test_recover_scale_refuses_sampling_without_gpu(tools, tmp_path, capsys, flag):
    _, recover = tools
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    with pytest.raises(SystemExit):
        recover.main(["--stage", "2", "--minutes", "1", "--quick", "--work", str(tmp_path), "--out", str(tmp_path / "o"),
                      flag, "100"])
    assert f"{flag} samples with the source on the GPU" in capsys.readouterr().err


def test_qa_turns_are_a_passage_a_question_and_the_sources_greedy_reply(tools, tmp_path):
    sample_source, recover = tools
    tok = word_tokenizer()
    eos, w = tok.eos_token_id, tok.convert_tokens_to_ids
    rng = np.random.default_rng(1)
    docs = [np.append(rng.integers(20, 64, size=int(n)), eos).astype(np.uint16) for n in rng.integers(100, 150, 6)]  # w17+
    model = tiny_llama(64)
    questions = ["w5 w6", "w7 w8"]
    turns, stats = sample_source.qa_turns(model, tok, docs, 7, seed=0, questions=questions, instructions=("w9",),
                                          passage=(16, 32), reply_tokens=5, batch=3, log=lambda *_: None)
    assert len(turns) == stats["documents"] == 7 and stats["tokens"] == sum(len(t) for t in turns)
    for t in turns:
        ids = t.tolist()
        assert ids[0] == w("w1") and ids[-1] == eos  # the user turn opens, EOS closes the document
        gen = ids.index(w("w2"))  # the generation prompt: the reply follows it
        assert 1 <= len(ids) - 1 - gen <= 6  # up to 5 reply tokens (+ the source's own EOS), then the closing EOS
        i = ids.index(w("w9"))  # the instruction, then one of the questions, then the template's end of turn
        assert ids[i + 1:i + 3] in ([w("w5"), w("w6")], [w("w7"), w("w8")]) and ids[i + 3] == eos
        assert 16 <= i - 1 <= 32  # the passage: a document's opening (the template's "w1" before it)
    prompt = turns[0].tolist()[: turns[0].tolist().index(w("w2")) + 1]
    alone = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=5, eos_token_id=eos,
                           pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    reply = turns[0].tolist()[len(prompt):-1]
    assert reply == alone[: len(reply)]  # greedy, as the evaluation answers; left padding in the batch changes nothing


def test_short_questions_ask_nothing_the_evaluation_asks():
    import re

    sys.path.insert(0, str(BENCH))
    try:
        import eval_quality
        import sample_source
    finally:
        sys.path.remove(str(BENCH))
    bank = sample_source.short_questions()
    evaluation = [item["question"] for item in eval_quality.load_short_qa(eval_quality.QA_FILE)]
    assert len(bank) == len(set(bank)) >= 150
    assert not {q.lower() for q in bank} & {q.lower() for q in evaluation}
    forms = [r"What is the capital of (.+)\?", r"What language is spoken in (.+)\?", r"Which continent is (.+) in\?",
             r"What colou?r (?:is|are) (.+)\?", r"How many (.+)\?", r"What is the opposite of (.+)\?",
             r"What do you call a baby (.+)\?", r"Who wrote (.+)\?", r"What is (\d+ [-+x] \d+)\?"]
    for form in forms:  # the same kind of question, never about the same subject
        subjects = {m.group(1) for q in bank if (m := re.fullmatch(form, q))}
        asked = {m.group(1) for q in evaluation if (m := re.fullmatch(form, q))}
        assert subjects and not subjects & asked, form

    class Text:  # a tokenizer without a chat template whose "ids" are the prompt's characters: the wording itself
        chat_template = None

        def __call__(self, text, add_special_tokens):
            return {"input_ids": text}

    prompt = "".join(eval_quality.qa_prompts(Text(), [{"question": "Q?"}], "")[0])
    instruction = prompt.split(" Q?")[0]
    assert instruction == "Answer the question in a few words."
    assert not any(instruction.lower() in i.lower() or i.lower() in instruction.lower()
                   for i in sample_source.QA_INSTRUCTIONS)


def test_own_text_is_written_once_and_mixed_at_its_share(tools, tmp_path):
    """recover_scale's path for --selfgen-tokens and --qa-turns: the teacher's text written as shards in the work
    folder by the first call, reused by a later one (nothing sampled again), then mixed into the blocks."""
    sample_source, recover = tools
    sys.path.insert(0, str(BENCH))  # own_text imports its siblings, as `python bench/recover_scale.py` runs it
    try:
        own_text_checks(sample_source, recover, tmp_path)
    finally:
        sys.path.remove(str(BENCH))


def own_text_checks(sample_source, recover, tmp_path):
    tok = word_tokenizer()
    eos = tok.eos_token_id
    rng = np.random.default_rng(2)
    docs = [np.append(rng.integers(20, 64, size=int(n)), eos).astype(np.uint16) for n in rng.integers(100, 150, 12)]
    natural = data_folder(tmp_path / "natural", docs, eos)
    calls = []

    def write(train_docs):
        calls.append(len(train_docs))
        return sample_source.qa_turns(tiny_llama(64), tok, train_docs, 9, passage=(16, 32), reply_tokens=4,
                                      questions=["w5"], log=lambda *_: None)

    first = recover.own_text(tmp_path / "qa-turns", natural, write, "qa")
    again = recover.own_text(tmp_path / "qa-turns", natural, write, "qa")
    assert calls == [len(docs)] and first["documents"] == again["documents"] == 9
    assert [s["file"] for s in again["shards"]] == first["shards"] == ["qa-00000.npy.xz"]

    class Args:
        quick, seq_len = False, 64

    blocks = recover.train_blocks([natural], 64, seed=0, quick=False, seq_len=64)[0]
    mixed, shards = recover.own_text_mix(blocks, ["natural/train-00000.npy.xz"], tmp_path / "qa-turns", 0.2, 64,
                                         Args, seed=0)
    own = recover.train_blocks([tmp_path / "qa-turns"], 64, seed=0, quick=False, seq_len=64)[0]
    from_own = sum(any(torch.equal(m, o) for o in own) for m in mixed)
    assert shards == ["natural/train-00000.npy.xz", "qa-turns/qa-00000.npy.xz"]
    assert from_own == round(len(blocks) * 0.2 / 0.8) and len(mixed) == len(blocks) + from_own
