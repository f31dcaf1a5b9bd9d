"""Data and scoring of the `natsl_local` lm-evaluation-harness task: the repository's short-answer set,
scored by the rule bench/eval_quality.py uses."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(BENCH))

from eval_quality import QA_FILE, is_correct, load_short_qa  # noqa: E402


def short_qa(**kwargs):
    """The task's dataset: bench/data/short_qa.jsonl as the `test` split (aliases joined, for a flat schema)."""
    import datasets

    rows = [{"question": r["question"], "answer": r["answer"], "aliases": "|".join(r.get("aliases", []))}
            for r in load_short_qa(QA_FILE)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc: dict, results: list[str]) -> dict:
    item = {"answer": doc["answer"], "aliases": [a for a in doc["aliases"].split("|") if a]}
    return {"answer_match": float(is_correct(results[0], item))}
