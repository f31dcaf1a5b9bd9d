"""bench/eval_quality.py end to end on a tiny converted checkpoint (CPU, seconds)."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from natsl_hf.conversion import convert_checkpoint
from natsl_hf.modeling_natsl import CACHE_FIELD
from natsl_testing import tiny_model
from test_ddp_cpu import char_tokenizer

EVAL = Path(__file__).resolve().parents[1] / "bench" / "eval_quality.py"


def load_eval():
    spec = importlib.util.spec_from_file_location("eval_quality", EVAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_quality_on_a_tiny_conversion(tmp_path):
    torch.manual_seed(0)
    tok = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    src = tmp_path / "src"
    LlamaForCausalLM(config).save_pretrained(src)
    tok.save_pretrained(src)
    init = tmp_path / "init"
    convert_checkpoint(src, init, chunk_size=16, progress=False)
    text = tmp_path / "held.txt"
    text.write_text(" ".join(f"Sentence number {i} talks about item {i * 7 % 13}." for i in range(60)))
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"What is item {i}?", "answer": str(i * 7 % 13),
                                      "aliases": ["x"]}) + "\n" for i in range(3)))
    wiki = tmp_path / "other_prose.txt"
    wiki.write_text(" ".join(f"Another text, line {i}, names thing {i * 3 % 11}." for i in range(60)))
    out = tmp_path / "q.json"
    assert load_eval().main(["--source", str(src), "--model", f"init={init}", "--text", str(text), "--out", str(out),
                             "--prose-text", str(wiki), "--prose-blocks", "2",
                             "--seq-len", "64", "--ppl-blocks", "2", "--gen-prompts", "1", "--gen-prompt-len", "16",
                             "--gen-tokens", "4", "--retrieval-lengths", "300", "--retrieval-contexts", "1",
                             "--retrieval-pairs", "2", "--retrieval-queries", "2", "--needle-contexts", "2",
                             "--passkey-contexts", "2", "--qa-file", str(qa), "--qa-context", "40", "--qa-tokens", "3", "--qa-batch-size", "2",
                             "--chat-prompts", "2", "--chat-passage", "24", "--chat-tokens", "3"]) == 0
    report = json.loads(out.read_text())
    head = subprocess.run(["git", "-C", str(EVAL.parent.parent), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: the commit the run started on, and whether tracked files differed from it
        assert report["versions"]["git_commit"] == head.stdout.strip()
        assert isinstance(report["versions"]["git_dirty"], bool)
    src_row, row = report["summary"]["source"], report["summary"]["init"]
    # freshly converted: every chunk softmax, the source's numbers exactly
    assert abs(row["ppl_gap_vs_source"]) < 1e-5 and row["top1_agreement"] == 1.0 and row["gen_prefix_match"] == 1.0
    assert src_row["gen_prefix_match"] == 1.0  # the source against its own continuations in fp32: the metric's floor
    assert report["results"]["init"]["generation"]["dtype"] == "float32"
    assert row["retrieval_300"] == src_row["retrieval_300"] and row["needle_300"] == src_row["needle_300"]
    assert row["passkey_300"] == src_row["passkey_300"] and report["results"]["init"]["passkey"]["300"]["queries"] == 2
    assert row["softmax_fraction"] == 1.0 and row["softmax_fraction_retrieval_300"] == 1.0
    assert row["softmax_fraction_other_prose"] == 1.0 and abs(row["ppl_gap_vs_source_other_prose"]) < 1e-5
    assert report["results"]["init"]["prose"]["other_prose"]["tokens"] == 2 * 63
    assert row["perplexity_other_prose"] != row["perplexity"]  # the other text's blocks
    assert row["kv_fraction_retrieval_300"] == 1.0 and row["pair_chunk_softmax_fraction_retrieval_300"] == 1.0
    assert report["results"]["init"]["perplexity"]["layer_softmax_fraction"] == [1.0, 1.0]
    assert report["results"]["init"]["needle"]["300"]["queries"] == 2
    needle_rows = report["results"]["init"]["needle"]["300"]["rows"]
    assert len(needle_rows["correct"]) == 2 and len(needle_rows["pair_kept"]) == 2
    qa_src, qa_init = report["results"]["source"]["short_qa"], report["results"]["init"]["short_qa"]
    assert qa_init["replies"] == qa_src["replies"] and len(qa_init["replies"]) == 3  # greedy answers, batched
    assert row["short_qa_accuracy"] == src_row["short_qa_accuracy"]
    chat_src, chat_init = report["results"]["source"]["chat"], report["results"]["init"]["chat"]
    assert chat_init["replies"] == chat_src["replies"] and chat_init["turns"] == 1  # the text is one document
    assert row["chat_off_passage_replies"] == src_row["chat_off_passage_replies"]
    assert "chat_passage_word_recall" not in src_row
    assert report["settings"]["retrieval_haystack"] == "text" and report["command"].startswith("python ")


def test_chat_scores():
    """A reply keeps the passage's words the source's reply used (its facts), or not; a non-answer takes none."""
    scores = load_eval().chat_scores(
        ["Light is scattered by molecules.", "The answer to this question is:", "Fine."],
        ["Rayleigh scattering of sunlight by nitrogen molecules.", "Sunlight is scattered by nitrogen.", "Okay."],
        ["Rayleigh scattering: sunlight meets nitrogen and oxygen molecules."] * 3)
    # turn 1: source used rayleigh, scattering, sunlight, nitrogen, molecules; the reply keeps molecules (1 of 5;
    # "scattered" is another word); turn 2: sunlight, nitrogen, neither kept; turn 3: no passage word, left out
    assert scores["turns_scored"] == 2 and abs(scores["chat_passage_word_recall"] - (1 / 5 + 0) / 2) < 1e-9
    assert abs(scores["chat_off_passage_replies"] - 2 / 3) < 1e-9  # the non-answer and "Fine."


def test_short_answer_matching():
    module = load_eval()
    item = {"question": "How many days are in a week?", "answer": "seven", "aliases": ["7"]}
    assert module.is_correct("There are 7 days in a week.", item) and module.is_correct("Seven.", item)
    assert module.is_correct("\nSeven", item) and not module.is_correct("Seventy.", item)
    assert not module.is_correct("I do not know.\nSeven", item)  # only the first line counts
    assert module.qa_agreement({"correct": [True, False, True]}, {"correct": [True, True, False]}) == 0.5
    items = module.load_short_qa(module.QA_FILE)
    assert len(items) >= 50 and all(item["answer"] for item in items)


def test_needle_depth():
    module = load_eval()
    tok = char_tokenizer()
    import random

    first = module.build_retrieval_context(tok, 400, 1, random.Random(0), None, module.NEEDLE, 0.0)
    last = module.build_retrieval_context(tok, 400, 1, random.Random(0), None, module.NEEDLE, 1.0)
    assert first[2][0] == 0 and last[2][0] > 300  # the needle's tokens: at the start, at the end
    assert len(first[1][0][1]) == 7  # a 7-digit number


def test_batched_answer_logits_equal_one_forward_per_query():
    """eval_quality scores every query of a context in one right-padded forward against copies of the prefilled
    cache: each row's answer logits equal those of the query run alone (NAtS-L with mixed routes, chunks closing
    inside the queries, and a Llama with its DynamicCache)."""
    module = load_eval()
    g = torch.Generator().manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    for model in (tiny_model(num_hidden_layers=3), llama):
        context = torch.randint(1, 97, (1, 29), generator=g)  # 29 tokens: an open chunk of 1 (chunk 4)
        queries = [(torch.randint(1, 97, (nq,), generator=g).tolist(), torch.randint(1, 97, (na,), generator=g).tolist())
                   for nq, na in ((5, 2), (2, 1), (9, 4), (3, 3))]
        with torch.no_grad():
            cache = getattr(model(input_ids=context, use_cache=True), CACHE_FIELD)
        before = copy.deepcopy(cache)
        batched = module.answer_logits(model, cache, context.shape[1], queries, "cpu")
        for (q, a), got in zip(queries, batched):
            alone = copy.deepcopy(before)
            y = torch.tensor([q + a])
            with torch.no_grad():
                logits = model(input_ids=y, **{CACHE_FIELD: alone}, attention_mask=torch.ones(1, 29 + len(y[0]),
                               dtype=torch.long), use_cache=True).logits[0, len(q) - 1:len(q) - 1 + len(a)]
            torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-4)
        assert cache.get_seq_length() == before.get_seq_length()  # the context's cache is left as it was


def test_needle_rows_score_as_prefill_then_query():
    """eval_quality scores a needle context, its question and its answer as one row of a right-padded batch: each
    row's answer logits equal those of the context prefilled alone into a cache and the question + answer run
    after it (NAtS-L with mixed routes and rows of different lengths, chunks closing inside the questions; a
    Llama)."""
    module = load_eval()
    g = torch.Generator().manual_seed(1)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    rand = lambda n: torch.randint(1, 97, (n,), generator=g).tolist()  # noqa: E731
    for model in (tiny_model(num_hidden_layers=3), llama):
        rows = [(rand(nc), rand(nq), rand(na)) for nc, nq, na in ((29, 5, 2), (41, 2, 1), (16, 9, 4), (33, 3, 3))]
        out, batched = module.row_answer_logits(model, rows, "cpu")
        for (c, q, a), got in zip(rows, batched):
            with torch.no_grad():
                cache = getattr(model(input_ids=torch.tensor([c]), use_cache=True), CACHE_FIELD)
                n = len(c) + len(q) + len(a)
                logits = model(input_ids=torch.tensor([q + a]), **{CACHE_FIELD: cache}, use_cache=True,
                               attention_mask=torch.ones(1, n, dtype=torch.long)).logits[0, len(q) - 1:len(q) - 1 + len(a)]
            torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-4)
        if module.is_natsl(model):  # the routing statistics of the batch: per row, over real tokens only
            stats = module.routing_stats(model, out, [[3, 20], [0], [5], [32]], [len(c) for c, _, _ in rows])
            assert 0 < stats["softmax_fraction"] <= 1 and 0 < stats["kv_fraction"] <= 1
            assert stats["pair_kept"][0] is not None
            assert stats["pair_kept"][1] is None  # token 0: the sink chunk, never routable
            assert stats["pair_kept"][3] is None  # token 32 of a 33-token context: its open chunk, routed only
            # because the question completes it
