"""natsl-inspect: routing maps, summary plot, table and errors on a tiny saved checkpoint."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

pytest.importorskip("matplotlib")
import matplotlib.image as mpimg  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from natsl_hf import NatslConfig, NatslForCausalLM  # noqa: E402
from natsl_hf.inspect import (  # noqa: E402
    LINEAR,
    NOT_ROUTABLE,
    ROUTE_COLORS,
    SOFTMAX,
    main,
    route_codes,
    routing_summary,
)

SENTENCES = [
    "the router sends each chunk to softmax or to linear attention",
    "a chunk of tokens is routed per key value head",
    "sink chunks always use softmax and incomplete chunks are not routed",
    "gated delta net keeps a state while softmax keeps the keys and values",
]
TEXT = " ".join(SENTENCES * 2)  # 90 words -> 90 tokens -> 23 chunks of 4, the last one incomplete
CHUNK = 4


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def _model(vocab_size: int) -> NatslForCausalLM:
    torch.manual_seed(0)
    config = NatslConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, chunk_size=CHUNK, router_init_bias=0.0,
        bos_token_id=None, eos_token_id=None,
    )
    model = NatslForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.router.proj.weight, std=0.5)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    tokenizer = _tokenizer()
    model = _model(len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    model.save_pretrained(root / "bare")  # no tokenizer
    short = copy.deepcopy(model)
    short.config.max_position_embeddings = 64  # as natsl-convert --max-positions 64 leaves it
    short.save_pretrained(root / "short-context")
    tokenizer.save_pretrained(root / "short-context")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    return root, model, tokenizer


def _rgb(hex_colour: str) -> torch.Tensor:
    return torch.tensor([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])


def _colour_area(png: torch.Tensor, hex_colour: str) -> int:
    return int(((png[..., :3] - _rgb(hex_colour)).abs().max(-1).values < 2 / 255).sum())


def test_main_writes_maps_table_and_matches_model(checkpoint, capsys):
    root, model, tokenizer = checkpoint
    out = root / "out"
    assert main([str(root / "model"), "--text", str(root / "text.txt"), "--out", str(out), "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out

    # the reference: one direct forward of the in-memory model on the same tokens
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 90
    with torch.no_grad():
        ref = model(input_ids=ids, output_routes=True, use_cache=False)
    expected = []
    for routes in ref.routes:
        hard, routable = routes.hard[0], routes.routable[0]
        expected.append((int(routable.sum()), int((hard & routable).sum())))
    # 23 chunks: sink chunk 0 and incomplete chunk 22 are not routable -> 21 chunks x 2 KV heads
    assert [e[0] for e in expected] == [42, 42]
    assert all(0 < s < r for r, s in expected), f"routes not mixed: {expected}"

    # printed table: layer, routable, softmax, fraction (4 decimals)
    table = {int(m[1]): (int(m[2]), int(m[3]), float(m[4]))
             for m in re.finditer(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+([0-9.]+)\s*$", printed, re.M)}
    assert sorted(table) == [0, 1]
    for layer, (r, s) in enumerate(expected):
        assert table[layer][:2] == (r, s)
        assert table[layer][2] == pytest.approx(s / r, abs=5e-5)
        assert table[layer][2] == pytest.approx(float(ref.layer_softmax_fraction[layer]), abs=5e-5)
    overall = float(re.search(r"overall softmax fraction: ([0-9.]+)", printed)[1])
    assert overall == pytest.approx(float(ref.softmax_fraction), abs=5e-5)

    # summary.json: full precision
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_tokens"] == 90
    assert summary["overall_fraction"] == pytest.approx(float(ref.softmax_fraction), abs=1e-6)
    for row, (r, s), frac in zip(summary["layers"], expected, ref.layer_softmax_fraction.tolist()):
        assert (row["routable"], row["softmax"], row["num_chunks"], row["num_kv_heads"]) == (r, s, 23, 2)
        assert row["fraction"] == pytest.approx(s / r, abs=1e-6) and row["fraction"] == pytest.approx(frac, abs=1e-6)

    # PNGs: fixed pixel size (figsize * dpi), the map's colours cover a real area
    for layer, (r, s) in enumerate(expected):
        png = torch.from_numpy(mpimg.imread(out / f"routes_layer{layer:02d}.png"))
        assert png.shape[:2] == (400, 1200)
        areas = {c: _colour_area(png, ROUTE_COLORS[c]) for c in (SOFTMAX, LINEAR, NOT_ROUTABLE)}
        # each cell is ~ (0.66*1200/23) x (0.72*400/2) px = 34 x 144 px, far more than a legend patch;
        # a softmax cell and a linear cell are of equal size, so the areas follow the counts
        assert min(areas.values()) > 2000, areas
        ratio = areas[SOFTMAX] / areas[LINEAR]
        assert ratio == pytest.approx(s / (r - s), rel=0.15), (areas, r, s)
    bar = mpimg.imread(out / "softmax_fraction.png")
    assert bar.shape[:2] == (400, 800)
    assert _colour_area(torch.from_numpy(bar), ROUTE_COLORS[SOFTMAX]) > 1000


def test_routing_summary_counts_and_codes(checkpoint):
    _, model, tokenizer = checkpoint
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :37]  # 10 chunks, last one 1 token
    model.train()
    rows = routing_summary(model, ids)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids, output_routes=True, use_cache=False)
    assert [r["layer"] for r in rows] == [0, 1]
    for row, routes, frac in zip(rows, ref.routes, ref.layer_softmax_fraction.tolist()):
        assert row["hard"].shape == (1, 10, 2)
        assert torch.equal(row["hard"], routes.hard) and torch.equal(row["routable_mask"], routes.routable)
        assert row["fraction"] == pytest.approx(frac, abs=1e-6)
        assert row["softmax"] + row["linear"] == row["routable"] == 8 * 2
        codes = route_codes(row["hard"][0], row["routable_mask"][0])
        assert codes.shape == (2, 10)
        assert (codes[:, 0] == NOT_ROUTABLE).all() and (codes[:, -1] == NOT_ROUTABLE).all()  # sink, incomplete
        assert int((codes == SOFTMAX).sum()) == row["softmax"] and int((codes == LINEAR).sum()) == row["linear"]


def test_too_short_text_reports_na(checkpoint, capsys):
    root, _, _ = checkpoint
    (root / "short.txt").write_text("the router sends each chunk", encoding="utf-8")  # 5 tokens: chunk 0 sink, 1 open
    assert main([str(root / "model"), "--text", str(root / "short.txt"), "--out", str(root / "short")]) == 0
    captured = capsys.readouterr()
    assert "no chunk is routable" in captured.err
    assert re.search(r"^\s*0\s+0\s+0\s+n/a\s*$", captured.out, re.M)
    assert json.loads((root / "short" / "summary.json").read_text())["overall_fraction"] is None
    assert (root / "short" / "routes_layer01.png").is_file()


def test_text_past_the_converted_context_warns(checkpoint, capsys):
    root, _, _ = checkpoint
    argv = ["--text", str(root / "text.txt"), "--out", str(root / "long")]
    assert main([str(root / "short-context"), *argv]) == 0
    assert ("90 tokens > max_position_embeddings=64: past that position the model runs outside the context it was "
            "converted for (natsl-convert --max-positions); pass --max-tokens 64") in capsys.readouterr().err
    assert main([str(root / "short-context"), *argv, "--max-tokens", "64"]) == 0
    assert "max_position_embeddings" not in capsys.readouterr().err


def test_missing_text_file_is_a_clear_error(checkpoint, capsys):
    root, _, _ = checkpoint
    with pytest.raises(SystemExit) as exc:
        main([str(root / "model"), "--text", str(root / "nope.txt"), "--out", str(root / "o1")])
    assert exc.value.code == 2
    assert "nope.txt" in capsys.readouterr().err and not (root / "o1").exists()


def test_missing_tokenizer_is_a_clear_error_and_tokenizer_flag_fixes_it(checkpoint, capsys):
    root, _, _ = checkpoint
    args = [str(root / "bare"), "--text", str(root / "text.txt"), "--out", str(root / "o2")]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no tokenizer" in err and "--tokenizer" in err and "bare" in err
    assert not (root / "o2").exists()

    assert main(args + ["--tokenizer", str(root / "model"), "--max-tokens", "40"]) == 0
    summary = json.loads((root / "o2" / "summary.json").read_text())
    assert summary["num_tokens"] == 40 and all(r["routable"] == 9 * 2 for r in summary["layers"])  # 10 full chunks - sink
    assert not math.isnan(summary["overall_fraction"])
