"""bench/recover_scale.py (the issue-22 recovery in resumable pieces) on a tiny random model on the CPU: stage 1,
then stage 2 resumed from its checkpoint, the export as the shipped layout, and a piece resumed from that; the
same for the layer-interleaved hybrid. Checks what carries from piece to piece: the trained tensors, tokens,
commands and evaluations."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from natsl_hf.conversion.recovered import read_recovered

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "recover_scale.py"
PIECE = ["--quick", "--minutes", "5", "--max-steps", "2", "--batch", "2", "--fit-blocks", "2", "--calibration-blocks", "2",
         "--logging-steps", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def recover():
    spec = importlib.util.spec_from_file_location("recover_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("hybrid", [[], ["--layer-hybrid"]], ids=["natsl", "layer_hybrid"])
def test_pieces_resume_and_export(recover, tmp_path, hybrid):
    w = tmp_path
    assert recover.main(["--stage", "1", "--work", str(w / "w1"), "--out", str(w / "o1"), *PIECE, *hybrid]) == 0
    stage1, progress1 = recover.read_resume(w / "o1")
    assert progress1["pieces"][0]["stage"] == 1 and all(".lora_" not in n for n in stage1)
    assert recover.main(["--stage", "2", "--work", str(w / "w2"), "--out", str(w / "o2"), "--resume", str(w / "o1"),
                         *PIECE, *hybrid]) == 0
    stage2, progress2 = recover.read_resume(w / "o2")
    assert [p["stage"] for p in progress2["pieces"]] == [1, 2] and progress2["pieces"][1]["loaded"]["loaded"] == len(stage1)
    assert any(".lora_A.default." in n for n in stage2)  # stage 2 trains LoRA adapters on q/k/v/o
    assert progress2["tokens_seen"]["stage2"] == progress2["pieces"][1]["tokens"] > 0
    # stage 2 freezes the router weights (its bias is recalibrated at the end); the GDN branch trains on
    routers = [n for n in stage1 if n.endswith(".router.proj.weight")]
    assert routers and all(torch.equal(stage2[n], stage1[n]) for n in routers)
    assert any(not torch.equal(stage2[n], stage1[n]) for n in stage1 if n.endswith(".gdn_alpha"))

    shipped = w / "shipped"
    recover.export(w / "o2", shipped)
    tensors, info = read_recovered(shipped)
    assert info["lora_scale"] == 2.0 and info["tokens_seen"] == progress2["tokens_seen"]
    assert (info["conversion"].get("route_override") == "linear") == bool(hybrid)
    assert set(tensors) == {n.replace(".default.", ".") for n in stage2}
    resumed = recover.read_resume(shipped)[1]  # what --recalibrate reads, and --export of its output then
    assert all(p["budget"] == 0.25 and p["layer_hybrid"] == bool(hybrid) for p in resumed["pieces"])
    assert resumed["tokens_seen"] == progress2["tokens_seen"] and resumed["train_s"] == progress2["train_s"]
    assert recover.main(["--stage", "2", "--work", str(w / "w3"), "--out", str(w / "o3"), "--resume", str(shipped),
                         *PIECE, *hybrid]) == 0
    progress3 = json.loads((w / "o3" / recover.PROGRESS).read_text())
    assert len(progress3["pieces"]) == 3 and progress3["pieces"][2]["loaded"]["loaded"] == len(stage2)
    assert all(p["evaluation"]["student"]["ppl"] > 0 for p in progress3["pieces"][2:])
    # every piece evaluates at twice the block length too (--quick: 256-token blocks joined in pairs)
    longer = [p["evaluation"]["student"]["at_512"] for p in progress3["pieces"]]
    assert all(e["tokens"] == 511 and e["ppl"] > 0 for e in longer)
    assert all(0 <= e["softmax_fraction"] <= 1 for e in longer)
    assert progress3["source_eval"]["at_512"]["softmax_fraction"] is None


def test_seq_len_sets_the_training_and_recall_blocks(recover, tmp_path, monkeypatch):
    """--seq-len: the piece trains on blocks of that length (--quick: an eighth of it), its recall blocks too
    (here in the eight wordings of --varied-recall)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the recall blocks come from bench/build_recovery_data.py
    assert recover.main(["--stage", "1", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"), *PIECE,
                         "--seq-len", "4096", "--recall-share", "0.5", "--varied-recall"]) == 0
    piece = json.loads((tmp_path / "o" / recover.PROGRESS).read_text())["pieces"][0]
    assert piece["seq_len"] == 512 and piece["tokens"] == 2 * 2 * 512
    assert piece["recall"]["share"] == 0.5 and piece["recall"]["varied_wordings"] is True


def test_recalibrate_moves_only_router_biases(recover, tmp_path):
    """--recalibrate sets the router biases at another length and keeps every other tensor; the last piece's record
    keeps the earlier calibration and evaluation beside the new ones."""
    w = tmp_path
    assert recover.main(["--stage", "2", "--work", str(w / "w"), "--out", str(w / "o"), *PIECE]) == 0
    before, _ = recover.read_resume(w / "o")
    assert recover.main(["--recalibrate", str(w / "o"), "--quick", "--calibration-seq-len", "4096",
                         "--calibration-blocks", "4", "--batch", "2", "--out", str(w / "r")]) == 0
    after, progress = recover.read_resume(w / "r")
    assert set(after) == set(before)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.endswith(".router.proj.bias") for n in changed), changed
    last = progress["pieces"][-1]
    assert last["calibration_seq_len"] == 4096 and last["calibration"]["softmax_fraction_after"] == pytest.approx(
        0.25, abs=0.1)
    assert last["earlier"][0]["calibration_seq_len"] == 2048 and last["earlier"][0]["evaluation"]["student"]["ppl"] > 0
    # the set it was calibrated on now, and the piece's own before it; the shipped layout keeps the recalibration
    assert last["calibration_set"]["blocks"] == 4 and last["calibration_set"]["seq_len"] == 4096
    assert last["earlier"][0]["calibration_set"]["seq_len"] == 2048
    assert recover.main(["--export", str(w / "r"), "--to", str(w / "ship")]) == 0
    shipped = json.loads((w / "ship" / "recovered.json").read_text())["pieces"][-1]
    assert shipped["calibration"] == last["calibration"] and shipped["calibration_set"] == last["calibration_set"]


def test_refit_routers_moves_only_routers(recover, tmp_path, monkeypatch):
    """--refit-routers (a resumed piece before it trains, or --recalibrate) fits the routers again to today's targets
    and calibrates them: with --recalibrate only router tensors change, their weights too; a piece records the fit."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the recall blocks come from bench/build_recovery_data.py
    w = tmp_path
    assert recover.main(["--stage", "1", "--work", str(w / "w"), "--out", str(w / "o"), *PIECE]) == 0
    before, _ = recover.read_resume(w / "o")
    assert recover.main(["--recalibrate", str(w / "o"), "--quick", "--refit-routers", "--fit-recall-share", "0.5",
                         "--fit-blocks", "4", "--calibration-blocks", "4", "--batch", "2", "--out", str(w / "r")]) == 0
    after, progress = recover.read_resume(w / "r")
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert {n for n in changed if n.endswith(".router.proj.weight")} and all(".router.proj." in n for n in changed)
    assert progress["pieces"][-1]["calibration"]["router_refit"]["router_fit_chunks_per_head"] > 0
    assert recover.main(["--stage", "2", "--work", str(w / "w2"), "--out", str(w / "o2"), "--resume", str(w / "o"),
                         "--refit-routers", *PIECE]) == 0
    piece = json.loads((w / "o2" / recover.PROGRESS).read_text())["pieces"][-1]
    assert piece["router_fit"]["router_fit_chunks_per_head"] > 0 and "softmax_fraction_after" in piece["router_fit"]["calibration"]


def test_fit_set_holds_its_share_of_recall_blocks(recover, monkeypatch):
    """fit_set: ~n blocks of which round(n * share) are recall blocks (built from training blocks the text part does
    not hold), the rest training blocks, shuffled, the same for the same seed."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    text = recover.train_blocks([], 4096, 3, True)[0]  # --quick: the training blocks fit_set draws from
    fit, looked_up = recover.fit_set([], None, 4096, 8, 0.5, 3, True)
    assert fit.shape == looked_up.shape == (8, text.shape[1])
    assert torch.equal(fit, recover.fit_set([], None, 4096, 8, 0.5, 3, True)[0])
    from_text = [any(torch.equal(b, t) for t in text[:4]) for b in fit]
    assert sum(from_text) == 4 and from_text != sorted(from_text, reverse=True)  # 4 training blocks, shuffled in
    assert not any(any(torch.equal(b, t) for t in text) for b, t_ in zip(fit, from_text) if not t_)
    # the labels follow their blocks through the shuffle: lines in every recall block, none in a training block
    assert [bool(m.any()) for m in looked_up] == [not t_ for t_ in from_text]
    only_text, none = recover.fit_set([], None, 4096, 8, 0.0, 3, True)
    assert torch.equal(only_text, text[:8]) and not none.any()
    varied = recover.fit_set([], None, 4096, 8, 0.5, 3, True, varied=True)[0]  # --varied-recall: the eight wordings
    same = [torch.equal(b, v) for b, v in zip(fit, varied)]
    assert all(s_ for s_, t_ in zip(same, from_text) if t_) and not all(same)  # same training blocks, other recall
    with pytest.raises(ValueError, match="100 blocks of 2048 tokens asked for"):
        recover.fit_set([], None, 4096, 100, 0.5, 3, True)


def test_calibration_set_is_the_training_mix_at_the_calibration_length(recover, monkeypatch):
    """calibration_set: --calibration-blocks blocks of --calibration-seq-len tokens (quick: an eighth), the piece's
    --recall-share of them recall blocks (in its --varied-recall wordings), and what progress.json records of it."""
    import argparse

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    args = argparse.Namespace(calibration_blocks=8, calibration_seq_len=4096, recall_share=0.25, varied_recall=True,
                              quick=True, calibration_recall_share=None)
    blocks = recover.calibration_set(args, [], None, 4096, 5)
    assert blocks.shape == (8, 4096 // 8)
    text = recover.train_blocks([], 4096, 5, True, 4096)[0]
    from_text = sum(any(torch.equal(b, t) for t in text) for b in blocks)
    assert from_text == 8 - 2  # a quarter of the blocks are recall blocks
    assert torch.equal(blocks, recover.fit_set([], None, 4096, 8, 0.25, 5, True, True, 4096)[0])
    args.recall_share = 0.0
    assert torch.equal(recover.calibration_set(args, [], None, 4096, 5), text[:8])
    assert recover.calibration_settings(args) == {"blocks": 8, "seq_len": 4096, "recall_share": 0.0,
                                                  "varied_recall": True}
    # --calibration-recall-share: a recall-richer calibration than the training mix, recorded as such
    args.calibration_recall_share = 0.5
    blocks = recover.calibration_set(args, [], None, 4096, 5)
    assert sum(any(torch.equal(b, t) for t in text) for b in blocks) == 8 - 4
    assert recover.calibration_settings(args)["recall_share"] == 0.5


@pytest.mark.parametrize("argv, message", [
    (["--recalibrate", "CKPT", "--quick", "--out", "O", "--calibration-seq-len", "1000"],
     "--calibration-seq-len 1000: give a multiple of 64"),
    (["--stage", "2", "--quick", "--minutes", "1", "--work", "W", "--out", "O", "--seq-len", "4000"],
     "--seq-len 4000: give a multiple of 64"),
    (["--materialize", "source=F", "--gguf", "G", "--to", "D"], "a label other than 'source'"),
    (["--materialize", "old", "--gguf", "G", "--to", "D"], "expected LABEL=FOLDER"),
    (["--stage", "2", "--quick", "--minutes", "1", "--work", "W", "--out", "O", "--refit-routers"], "give --resume"),
    (["--stage", "1", "--quick", "--minutes", "1", "--work", "W", "--out", "O", "--fit-recall-share", "1"],
     "--fit-recall-share 1.0: give a share in [0, 1)"),
    (["--recalibrate", "CKPT", "--quick", "--out", "O", "--calibration-recall-share", "-0.1"],
     "--calibration-recall-share -0.1: give a share in [0, 1)"),
])
def test_modes_refuse_bad_options_before_any_work(recover, argv, message, capsys):
    with pytest.raises(SystemExit):
        recover.main(argv)
    assert message in capsys.readouterr().err


def test_recall_blocks_keep_lines_and_questions_in_one_block():
    """build_recovery_data.recall_blocks: each recall document is exactly one block (so the training stream
    cannot cut a line from its question), its lines go in at sentence boundaries of the filler, every question is
    answered with its line's value, and the filler is an unbroken prefix of one haystack block."""
    import random
    import re
    import sys

    import numpy as np

    sys.path.insert(0, str(SCRIPT.parent))
    from build_recovery_data import recall_blocks

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    text = " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + "." for _ in range(400))
    L, M = 2048, 3
    haystack = np.stack([np.frombuffer(text[i * 40:][:L].encode(), dtype=np.uint8).astype(np.int64) for i in range(M)])
    boundary = np.zeros(256, dtype=bool)
    boundary[ord(".")] = True
    blocks, looked_up = recall_blocks(haystack, lambda s: list(s.encode()), boundary, eos=0, n=4, seed=3)
    assert blocks.shape == looked_up.shape == (4, L) and (blocks[:, -1] == 0).all()
    for i, (row, mask) in enumerate(zip(blocks, looked_up)):
        doc = bytes(row[:-1].astype(np.uint8)).decode()
        context = doc[: doc.index(" Question:")]
        kv = re.findall(r" The code for (\w+) is (\d{4})\.", context)
        needle = re.findall(r" The special magic number for (\w+) is (\d{7})\.", context)
        lines = needle if i % 2 else kv
        # looked_up marks exactly the lines' tokens (the router fit's softmax labels)
        stated = re.findall(r" The (?:code|special magic number) for \w+ is \d+\.", context)
        assert "".join(chr(c) for c, m in zip(row, mask) if m) == "".join(stated) and len(stated) == len(lines)
        assert len(lines) == (1 if i % 2 else 8) and not (kv if i % 2 else needle)
        answers = re.findall(r" Question: what is the (?:code|special magic number) for (\w+)\? Answer: The "
                             r"(?:code|special magic number) for \w+ is (\d+)\.", doc)
        assert sorted(answers) == sorted(lines)  # every line asked about once, answered with its value
        for key, value in lines:  # inserted at the start or right after a sentence's end
            at = context.index(f" The {'special magic number' if i % 2 else 'code'} for {key} is {value}.")
            assert at == 0 or context[at - 1] == "."
        filler = re.sub(r" The (?:code|special magic number) for \w+ is \d+\.", "", context)
        assert any(text[j * 40:].startswith(filler) for j in range(M)) and len(filler) > L // 3


def test_varied_recall_blocks_use_the_eight_wordings_and_never_the_passkey(monkeypatch):
    """recall_blocks(probes=varied_probes()): each block states its lines in one wording drawn from the eight (the
    kinds still alternating: 8 lines, then 1), asks about each line once in that wording and answers it; the
    evaluation's passkey form, the held-out check, is never among them."""
    import random
    import re

    import numpy as np

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from build_recovery_data import recall_blocks, varied_probes
    from eval_quality import PASSKEY

    probes = varied_probes()
    assert len({p.line for p in probes}) == 8 and PASSKEY not in probes
    assert not any(w in p.line + p.question for p in probes for w in ("vault", "combination"))
    rng = random.Random(1)
    text = " ".join(" ".join(rng.choice(["ab", "cd", "ef"]) for _ in range(rng.randint(3, 9))) + "." for _ in range(2000))
    L = 2048
    haystack = np.stack([np.frombuffer(text[i * 40:][:L].encode(), dtype=np.uint8).astype(np.int64) for i in range(3)])
    boundary = np.zeros(256, dtype=bool)
    boundary[ord(".")] = True
    blocks = recall_blocks(haystack, lambda s: list(s.encode()), boundary, eos=0, n=24, seed=5, probes=probes)[0]
    def stated(p):  # a line of wording p: (key, value)
        return re.escape(p.line).replace(r"\{key\}", r"(\w+)").replace(r"\{value\}", r"(\d{%d})" % p.digits)

    used = set()
    for i, row in enumerate(blocks):
        doc = bytes(row[:-1].astype(np.uint8)).decode()
        context = doc[: doc.index(" Question:")]
        probe = next(p for p in probes if re.search(stated(p), context))
        used.add(probe.line)
        lines = re.findall(stated(probe), context)
        assert len(lines) == (1 if i % 2 else 8)
        asked = re.escape(probe.question).replace(r"\{key\}", r"(\w+)") + r" (\d+)\."
        answers = [(k, v) for k, *_, v in re.findall(asked, doc)]
        assert sorted(answers) == sorted(lines)
    assert len(used) >= 5  # the wordings vary across blocks


def test_recall_share_mixes_recall_blocks_into_a_piece(recover, tmp_path):
    w = tmp_path
    assert recover.main(["--stage", "1", "--work", str(w / "w"), "--out", str(w / "o"), "--recall-share", "0.25",
                         *PIECE]) == 0
    piece = json.loads((w / "o" / recover.PROGRESS).read_text())["pieces"][0]
    assert piece["recall"] == {"share": 0.25, "distinct_blocks": round(64 * 0.25 / 0.75), "varied_wordings": False}
    assert piece["blocks_available"] == 64 + piece["recall"]["distinct_blocks"]
    with pytest.raises(SystemExit):
        recover.main(["--stage", "1", "--work", str(w / "w"), "--out", str(w / "o"), "--recall-share", "1", *PIECE])


def test_layer_budgets_carry_from_stage_1_through_stage_2_to_the_shipped_layout(recover, tmp_path):
    w = tmp_path
    assert recover.main(["--stage", "1", "--work", str(w / "w1"), "--out", str(w / "o1"), "--layer-budgets", *PIECE]) == 0
    _, progress1 = recover.read_resume(w / "o1")
    scale = progress1["layer_budget_scale"]
    assert len(scale) == 2 and sum(scale) / 2 == pytest.approx(1.0)
    assert progress1["pieces"][0]["layer_budgets"] == [min(1.0, 0.25 * s) for s in scale]
    assert recover.main(["--stage", "2", "--work", str(w / "w2"), "--out", str(w / "o2"), "--resume", str(w / "o1"),
                         *PIECE]) == 0
    _, progress2 = recover.read_resume(w / "o2")
    assert progress2["layer_budget_scale"] == scale  # the resumed piece calibrated with the same shares
    recover.export(w / "o2", w / "shipped")
    _, info = read_recovered(w / "shipped")
    assert info["layer_budget_scale"] == scale
    assert recover.read_resume(w / "shipped")[1]["layer_budget_scale"] == scale
    with pytest.raises(SystemExit):  # the shares are made once, at a fresh stage 1
        recover.main(["--stage", "2", "--work", str(w / "w3"), "--out", str(w / "o3"), "--resume", str(w / "o2"),
                      "--layer-budgets", *PIECE])
