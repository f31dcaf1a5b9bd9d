"""natsl-calibrate: zero-shot router fit + calibration to a budget on the user's text, measured on held-out blocks."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from natsl_hf import NatslForCausalLM
from natsl_hf.conversion.calibrate import calibrate_routers, main
from natsl_hf.conversion.router_fit import calibrate_router_bias
from natsl_testing import tiny_model

WORDS = [f"w{i}" for i in range(90)]


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    tokenizer = _tokenizer()
    model = tiny_model(seed=2, vocab_size=len(tokenizer), softmax_budget=0.5).to(torch.bfloat16)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    text = "\n".join(" ".join(WORDS[i] for i in torch.randint(0, 90, (60,), generator=g).tolist()) for _ in range(20))
    (root / "text.txt").write_text(text, encoding="utf-8")
    return root


def test_calibrate_writes_a_checkpoint_at_the_budget_and_reports_it(checkpoint, capsys):
    root = checkpoint
    out = root / "calibrated"
    args = [str(root / "model"), str(out), "--text", str(root / "text.txt"), "--softmax-budget", "0.25",
            "--seq-len", "64", "--calibration-blocks", "6", "--eval-blocks", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out perplexity" in printed and "KV cache" in printed
    result = json.loads((out / "calibration.json").read_text())
    assert result["softmax_budget"] == 0.25 and result["heldout"]["kv_fraction"] < 1
    model = NatslForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.config.softmax_budget == 0.25  # the checkpoint's dtype kept
    before = NatslForCausalLM.from_pretrained(root / "model")
    assert not torch.equal(model.model.layers[0].self_attn.router.proj.bias,
                           before.model.layers[0].self_attn.router.proj.bias)
    # on the calibration blocks themselves the budget holds exactly (per layer and head, as calibrated)
    assert 0.15 <= result["heldout"]["softmax_fraction"] <= 0.45


def test_one_pass_calibration_equals_the_per_layer_one():
    blocks = torch.randint(1, 97, (3, 41))
    a, b = tiny_model(seed=5), tiny_model(seed=5)
    calibrate_routers(a, blocks, 0.4)
    calibrate_router_bias(b, [{"input_ids": blocks}], 0.4)
    for la, lb in zip(a.model.layers, b.model.layers):
        torch.testing.assert_close(la.self_attn.router.proj.bias, lb.self_attn.router.proj.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,message", [
    (["--softmax-budget", "2"], "--softmax-budget 2.0"),
    (["--seq-len", "0"], "--seq-len 0"),
    (["--calibration-blocks", "0"], "--calibration-blocks 0"),
    (["--eval-blocks", "-1"], "--eval-blocks -1"),
])
def test_bad_options_are_one_line_errors_before_any_work(checkpoint, capsys, bad, message):
    root = checkpoint
    with pytest.raises(SystemExit) as exit_:
        main([str(root / "model"), str(root / "never"), "--text", str(root / "text.txt"), *bad])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (root / "never").exists()


def test_in_place_needs_overwrite_and_short_text_writes_nothing(checkpoint, capsys):
    root = checkpoint
    with pytest.raises(SystemExit):
        main([str(root / "model"), str(root / "model"), "--text", str(root / "text.txt")])
    assert "--overwrite" in capsys.readouterr().err
    rc = main([str(root / "model"), str(root / "short"), "--text", str(root / "text.txt"), "--seq-len", "64",
               "--calibration-blocks", "50"])
    assert rc == 2 and "blocks of 64 tokens" in capsys.readouterr().err and not (root / "short").exists()
