"""Quality of NAtS-L checkpoints against their source: perplexity, generation, retrieval, short answers.

    python bench/eval_quality.py --source SRC_DIR --model natsl=NATSL_DIR --model layer_hybrid=HYBRID_DIR \\
        --text HELDOUT.txt --out bench/results/quality_X.json

For the source and every `--model LABEL=DIR` (NAtS-L checkpoints, e.g. a NAtS-L model and the
layer-level hybrid of conversion/baselines.py side by side), in this order:

- perplexity: exp(mean next-token NLL) over `--ppl-blocks` packed blocks of `--seq-len` tokens of
  the held-out text (`natsl_hf.conversion.data` packing), plus top-1 agreement with the source's
  next-token argmax on the same tokens;
- `--prose-text FILE ...`: the same perplexity and softmax fraction on `--prose-blocks` blocks of each further
  held-out text (named by its file name without suffix in the JSON and the summary), e.g. the README main job's
  Wikipedia summaries: routers keep more of fact-dense prose, and a budget is kept only if it holds on each text;
- greedy agreement: the source greedily continues `--gen-prompts` prompts (the first `--gen-prompt-len`
  tokens of held-out blocks, long enough to span routed chunks) by `--gen-tokens` tokens; each model is scored on those continuations with teacher forcing:
  `gen_prefix_match` = mean fraction of the continuation before the model's greedy choice first
  differs (exactly what free-running greedy decoding of the model would reproduce, given that a full
  forward equals prefill + decode), `gen_token_match` = per-position top-1 agreement. Both run with the models in
  `--agreement-dtype` (default float32, whatever `--dtype` the rest runs in): a third of the source's own greedy tokens
  are near-ties (top-1 and top-2 probabilities within 0.1), and in bf16 the source's teacher-forced forward disagrees
  with its own generate() at enough of them to score ~0.55 against itself (bench/prefix_probe.py, RECOVERY_NOTES
  2026-12-07); the source's row reports its own score, the metric's floor (1.0 in fp32);
- short answers: the questions of `--qa-file` (bench/data/short_qa.jsonl: simple factual, arithmetic
  and completion questions with known answers and aliases), each after the same `--qa-context` tokens
  of held-out text (the last documents of `--text`; a question alone would sit in the sink chunk,
  where a NAtS-L model is its source exactly), through the chat template when there is one; the
  greedy answer (`--qa-tokens`, `generate` in left-padded batches) is right when its first line holds
  the answer or an alias as whole words. `short_qa_source_correct_kept` = the share of the questions
  the source answers right that the model answers right too;
- chat: `--chat-prompts` turns through the chat template, each a passage of held-out text (`--chat-passage` tokens
  of a paragraph of `--chat-text`, default `--text`) and an instruction about it (summarise, explain, name the facts), answered
  greedily (`--chat-tokens`) by the source and by each model: `chat_passage_word_recall` = the mean share of the
  passage's words that the source's reply uses and the model's reply keeps (its facts, as the README main job prints
  them), `chat_off_passage_replies` = the share of replies that take no word of their passage (non-answers);
- retrieval, at each of `--retrieval-lengths`, in contexts of held-out text (a run of consecutive
  sentences of `--text`; `--retrieval-haystack words`: random sentences of common words, which a
  router trained on natural text may treat as out of distribution): key-value recall, `--retrieval-
  contexts` contexts with `--retrieval-pairs` lines "The code for WORD is NUMBER." spread through
  each and `--retrieval-queries` queries per context; and needle in a haystack, `--needle-contexts`
  contexts with one line "The special magic number for WORD is NUMBER." (7 digits) at depths spread
  evenly from the start to the end; and the same needle task in a form no training data of this repository
  holds (`--passkey-contexts`, "The WORD vault opens with the combination NUMBER.", 6 digits), since the
  recall blocks of the recovery train on the other two forms. A query "... Question: what is the code for WORD? Answer: The code
  for WORD is" counts if greedy decoding reproduces NUMBER exactly, scored teacher-forced: a key-value
  context is prefilled once (cache) and its queries run together against copies of that cache; a needle
  context, its question and its answer are one row, `--probe-batch-size` right-padded rows a forward;
- the realised softmax fraction (NAtS-L models, inference routing) on the perplexity blocks (also per
  NAtS-L layer) and on the retrieval contexts, and the kept / full KV-cache bytes after prefilling a
  key-value context, or after a needle row (`NatslCache.memory_report()["kv_fraction"]`); `pair_chunk_softmax_fraction` =
  the share of the routable chunks holding a pair line that the routers keep softmax (over NAtS-L
  layers and KV heads): what recall from the softmax branch can reach, against the context's
  overall fraction.

The defaults ask 128 queries per length and task (16 contexts x 8 key-value queries, 128 needles),
so one point of accuracy is not noise; set them lower for a CPU run.

Writes one JSON with device, library versions, the exact command and all numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import re
import shlex
import sys
import time
from typing import NamedTuple
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
QA_FILE = REPO / "bench" / "data" / "short_qa.jsonl"

WORDS = ("apple river stone cloud maple copper violet harbor lantern meadow falcon silver garden pepper "
         "candle orbit willow thunder marble velvet cactus glacier harvest compass ember tulip canyon "
         "saddle beacon pillow quartz raven nickel orchid timber comet cobalt fern basil dune prism "
         "walnut hazel lotus cedar pebble summit violet jasper otter badger canvas ribbon mosaic").split()
FILLER = ("the of and a to in is was that for on with as by at from this which an be are or it not "
          "but had have one all were when there can more about some time would into only other then "
          "people over also after first well new years many these may such through where much before "
          "day way between each under most long three world great still both high small large every").split()


def versions() -> dict:
    import transformers

    import natsl_hf

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "natsl_hf": natsl_hf.__version__}
    try:
        import subprocess

        git = ["git", "-C", str(REPO)]
        out["git_commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                           check=True).stdout.strip()
        # tracked files changed against that commit: the numbers are of the tree, not of the commit alone
        out["git_dirty"] = bool(subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                               capture_output=True, text=True, check=True).stdout.strip())
    except Exception:  # noqa: BLE001 - not a git checkout
        pass
    return out


def device_info(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def load_model(path: str, device, dtype):
    from transformers import AutoModelForCausalLM

    import natsl_hf  # noqa: F401  registers the natsl model type

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def is_natsl(model) -> bool:
    return getattr(model.config, "model_type", None) == "natsl"


@torch.no_grad()
def forward(model, input_ids, **kw):
    kw = dict(kw)
    if is_natsl(model):
        kw.setdefault("use_cache", False)
    return model(input_ids=input_ids, **kw)


# ------------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, src_argmax: list[torch.Tensor] | None, batch_size: int):
    nll, count, agree, fractions, layer_fractions = 0.0, 0, 0, [], []
    argmaxes = []
    for i in range(0, len(blocks), batch_size):
        x = blocks[i:i + batch_size]
        out = forward(model, x)
        logits = out.logits[:, :-1].float()
        nll += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
        am = logits.argmax(-1)
        argmaxes.append(am)
        if src_argmax is not None:
            agree += (am == src_argmax[len(argmaxes) - 1]).sum().item()
        if getattr(out, "softmax_fraction", None) is not None:
            fractions.append(float(out.softmax_fraction))
            layer_fractions.append(out.layer_softmax_fraction.float().cpu())
    res = {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}
    if src_argmax is not None:
        res["top1_agreement"] = agree / count
    if fractions:
        res["softmax_fraction"] = sum(fractions) / len(fractions)
        res["layer_softmax_fraction"] = torch.stack(layer_fractions).nanmean(0).tolist()  # per NAtS-L layer
    return res, argmaxes


@torch.no_grad()
def source_continuations(source, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy continuations of the source ([P, n_new]); prompts [P, L] (no padding)."""
    out = source.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n_new,
                          min_new_tokens=n_new, do_sample=False, pad_token_id=source.config.eos_token_id)
    return out[:, prompts.shape[1]:]


@torch.no_grad()
def greedy_agreement(model, prompts: torch.Tensor, conts: torch.Tensor, batch_size: int = 16) -> dict:
    """prompts [P, L] and the source's greedy continuations conts [P, K], teacher-forced `batch_size` rows a
    forward (all rows L + K long: no padding)."""
    L, K = prompts.shape[1], conts.shape[1]
    x = torch.cat([prompts, conts], 1)  # [P, L + K]
    preds = torch.cat([forward(model, x[i:i + batch_size]).logits[:, L - 1:L - 1 + K].argmax(-1)
                       for i in range(0, len(x), batch_size)])  # [P, K]
    prefix, token = [], []
    for pred, c in zip(preds, conts):
        ok = pred == c
        token.append(ok.float().mean().item())
        first_bad = (~ok).nonzero()
        prefix.append((first_bad[0, 0].item() if len(first_bad) else K) / K)
    return {"gen_prefix_match": sum(prefix) / len(prefix), "gen_token_match": sum(token) / len(token),
            "gen_prompts": len(prefix), "gen_tokens": K}


def haystack_sentences(text: str) -> list[str]:
    """Sentences (and lines) of a natural text, for retrieval haystacks."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in parts if len(p.strip()) > 1]


class Probe(NamedTuple):
    """A retrieval task: `line` states a key's value somewhere in the context, `question` (at the end)
    asks for it; the answer counts when greedy decoding reproduces the value exactly."""

    line: str
    question: str
    digits: int


KEY_VALUE = Probe("The code for {key} is {value}.", " Question: what is the code for {key}? Answer: The code for {key} is", 4)
NEEDLE = Probe("The special magic number for {key} is {value}.",
               " Question: what is the special magic number for {key}? Answer: The special magic number for {key} is", 7)
# a needle of a form that no training data of this repository holds (the recall blocks and documents of
# bench/build_recovery_data.py use KEY_VALUE and NEEDLE): whether keeping a looked-up chunk carries beyond those forms
PASSKEY = Probe("The {key} vault opens with the combination {value}.",
                " Question: which combination opens the {key} vault? Answer: The {key} vault opens with the combination", 6)


def build_retrieval_context(tokenizer, length: int, n_pairs: int, rng: random.Random,
                            haystack: list[str] | None = None, probe: Probe = KEY_VALUE, depth: float | None = None):
    """-> (context token ids of ~`length` tokens, [(key, value)], positions of the pair lines' tokens).

    haystack: sentences of held-out natural text; a random run of consecutive sentences fills the
    context (the router sees text like its training text). None: random sentences of common words.
    depth: where the (single) line goes, as a fraction of the filler (0 = first, 1 = last); None:
    the `n_pairs` lines at random positions.
    """
    keys = rng.sample(WORDS, n_pairs)
    pairs = [(k, str(rng.randint(10 ** (probe.digits - 1), 10 ** probe.digits - 1))) for k in keys]
    n_tok = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    pair_lines = [probe.line.format(key=k, value=v) for k, v in pairs]
    budget = length - sum(n_tok(" " + s) for s in pair_lines) - 16
    filler = []
    start = rng.randrange(len(haystack)) if haystack else 0
    while budget > 0:
        if haystack:
            sentence = haystack[(start + len(filler)) % len(haystack)]
        else:
            sentence = " ".join(rng.choice(FILLER) for _ in range(rng.randint(6, 14))).capitalize() + "."
        cost = n_tok(" " + sentence)
        if haystack and cost > budget:
            break
        filler.append(sentence)
        budget -= cost
    if depth is None:
        slots = sorted(rng.sample(range(len(filler) + 1), n_pairs))
    else:
        if n_pairs != 1:
            raise ValueError("depth places a single line (n_pairs=1).")
        slots = [round(depth * len(filler))]
    lines = list(filler)
    for offset, (slot, line) in enumerate(zip(slots, pair_lines)):
        lines.insert(slot + offset, line)
    text = " ".join(lines)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, at = [], 0  # character spans of the pair lines in `text`
    for line in lines:
        if line in pair_lines:
            spans.append((at, at + len(line)))
        at += len(line) + 1
    pair_tokens = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if any(a < e and b > s for s, e in spans)]
    return enc["input_ids"], pairs, pair_tokens


@torch.no_grad()
def answer_logits(model, cache, context_len: int, queries: list[tuple[list[int], list[int]]], device) -> list:
    """The logits that predict each answer after its question, teacher-forced, for (question ids, answer ids)
    pairs that follow the same prefilled context (`cache`, left unchanged): one forward for all of them, a
    right-padded row each against copies of the cache. Causal attention and the chunk positions counted over
    real tokens only mean that a row's padding changes nothing before it, so each row scores as if alone
    (tests/test_eval_quality.py compares it with one forward per query). -> [len(answer), vocab] per query."""
    from natsl_hf.modeling_natsl import CACHE_FIELD

    width = max(len(q) + len(a) for q, a in queries)
    y = torch.tensor([q + a + [0] * (width - len(q) - len(a)) for q, a in queries], device=device)  # [Q, width]
    mask = torch.tensor([[1] * (context_len + len(q) + len(a)) + [0] * (width - len(q) - len(a)) for q, a in queries],
                        device=device)  # [Q, context + width]
    rows = copy.deepcopy(cache)
    rows.batch_repeat_interleave(len(queries))
    logits = model(input_ids=y, **{CACHE_FIELD: rows}, attention_mask=mask, use_cache=True).logits
    return [row[len(q) - 1:len(q) - 1 + len(a)] for row, (q, a) in zip(logits, queries)]


def routing_stats(model, out, pair_tokens: list[list[int]], context_lens: list[int]) -> dict:
    """What a NAtS-L forward of probe rows routed (`output_routes=True`, with a cache): the softmax fraction and
    the kept / full KV of the call (over all its rows), and per row the share of the routable chunks holding a
    probe line's token that stayed softmax (over NAtS-L layers and KV heads; None when none is routable).
    pair_tokens: per row, the token positions of its probe lines; context_lens: per row, the context's length:
    only chunks complete within it count, as after a prefill of the context alone (a chunk that a question
    completes is routed with the question's tokens in its mean)."""
    from natsl_hf.modeling_natsl import CACHE_FIELD

    C = model.config.chunk_size
    kept_rows = []
    for row, (tokens, n) in enumerate(zip(pair_tokens, context_lens)):
        chunks = torch.tensor(sorted({t // C for t in tokens if t // C < n // C}), device=out.logits.device,
                              dtype=torch.long)
        kept = [r.hard[row, chunks][r.routable[row, chunks]].float() for r in out.routes if r.hard.shape[1] > 0]
        kept = torch.cat(kept) if kept else torch.zeros(0)
        kept_rows.append(float(kept.mean()) if kept.numel() else None)
    return {"softmax_fraction": float(out.softmax_fraction),
            "kv_fraction": getattr(out, CACHE_FIELD).memory_report()["kv_fraction"], "pair_kept": kept_rows}


def probe_result(correct: int, total: int, stats: list[dict]) -> dict:
    """Accuracy, and the mean routing statistics of the forwards (`routing_stats`; none for a softmax model)."""
    res = {"accuracy": correct / total, "queries": total}
    if stats:
        res["softmax_fraction"] = sum(s["softmax_fraction"] for s in stats) / len(stats)
        res["kv_fraction"] = sum(s["kv_fraction"] for s in stats) / len(stats)
        kept = [k for s in stats for k in s["pair_kept"] if k is not None]
        if kept:
            res["pair_chunk_softmax_fraction"] = sum(kept) / len(kept)
    return res


def probe_query(tokenizer, probe: Probe, key: str, value: str) -> tuple[list[int], list[int]]:
    """(question ids, answer ids) of one query: the answer is the value after a space."""
    return (tokenizer(probe.question.format(key=key), add_special_tokens=False)["input_ids"],
            tokenizer(f" {value}", add_special_tokens=False)["input_ids"])


@torch.no_grad()
def retrieval(model, tokenizer, contexts, n_queries: int, device, probe: Probe = KEY_VALUE) -> dict:
    """Several queries per context: each context prefilled once (cache), its queries scored together against
    copies of that cache (`answer_logits`). Routing statistics per context, after its prefill."""
    from natsl_hf.modeling_natsl import CACHE_FIELD  # this transformers' name of the cache argument / field

    correct, total, stats = 0, 0, []
    natsl = is_natsl(model)
    for ids, pairs, pair_tokens in contexts:
        x = torch.tensor([ids], device=device)
        out = model(input_ids=x, use_cache=True, **({"output_routes": True} if natsl else {}))
        if getattr(out, "softmax_fraction", None) is not None:
            stats.append(routing_stats(model, out, [pair_tokens], [len(ids)]))
        queries = [probe_query(tokenizer, probe, key, value) for key, value in pairs[:n_queries]]
        for logits, (_, a) in zip(answer_logits(model, getattr(out, CACHE_FIELD), len(ids), queries, device), queries):
            correct += int(logits.argmax(-1).tolist() == a)
            total += 1
    return probe_result(correct, total, stats)


@torch.no_grad()
def needle_retrieval(model, tokenizer, contexts, device, batch_size: int, probe: Probe = NEEDLE) -> dict:
    """One query per context: each context with its question and answer is one teacher-forced row (a forward of
    the whole row computes what prefill + query computes: tests/test_eval_quality.py), `batch_size` right-padded
    rows a forward, no copy of a cache. Routing statistics per forward, over its rows; the softmax fraction and the
    KV count the whole rows (context, question and answer: ~20 tokens more than the context's prefill, and a chunk
    the question completes), the probe line's chunks only those complete within the context."""
    stats, right = [], []
    for start in range(0, len(contexts), batch_size):
        batch = contexts[start:start + batch_size]
        rows = [(ids, *probe_query(tokenizer, probe, *pairs[0])) for ids, pairs, _ in batch]
        out, answers = row_answer_logits(model, rows, device)
        if getattr(out, "softmax_fraction", None) is not None:
            stats.append(routing_stats(model, out, [tokens for _, _, tokens in batch], [len(ids) for ids, _, _ in batch]))
        right += [logits.argmax(-1).tolist() == a for logits, (_, _, a) in zip(answers, rows)]
    res = probe_result(sum(right), len(right), stats)
    # per context, in the order of the depths: right or not, and the share of its needle's chunk kept softmax
    res["rows"] = {"correct": right, "pair_kept": [k for s in stats for k in s["pair_kept"]] if stats else None}
    return res


@torch.no_grad()
def row_answer_logits(model, rows: list[tuple[list[int], list[int], list[int]]], device):
    """(context, question, answer) ids per row -> (the output of one forward of the right-padded rows, with a cache
    and routes for a NAtS-L model; per row the logits [len(answer), vocab] that predict its answer)."""
    natsl = is_natsl(model)
    lengths = [len(c) + len(q) + len(a) for c, q, a in rows]
    width = max(lengths)
    x = torch.tensor([c + q + a + [0] * (width - n) for (c, q, a), n in zip(rows, lengths)], device=device)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], device=device)  # [rows, width]
    out = model(input_ids=x, attention_mask=mask, use_cache=natsl, **({"output_routes": True} if natsl else {}))
    at = [len(c) + len(q) - 1 for c, q, _ in rows]  # the position that predicts the answer's first token
    return out, [logits[i:i + len(a)] for logits, i, (_, _, a) in zip(out.logits, at, rows)]


def load_short_qa(path) -> list[dict]:
    """The offline short-answer questions: one JSON object a line, {"question", "answer", "aliases"?}."""
    items = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [i for i, item in enumerate(items) if not {"question", "answer"} <= set(item)]
    if bad:
        raise SystemExit(f"--qa-file {path}: lines {bad[:5]} lack a 'question' or an 'answer'.")
    return items


def normalise(text: str) -> str:
    """Lower case, words of letters and digits only, without articles: what answer matching compares."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def is_correct(reply: str, item: dict) -> bool:
    """Whether the first line of a reply contains the answer (or an alias) as whole words."""
    first = f" {normalise(reply.strip().splitlines()[0] if reply.strip() else '')} "
    return any(f" {normalise(a)} " in first for a in [item["answer"], *item.get("aliases", [])])


def user_turn(tokenizer, content: str) -> list[int]:
    """`content` as one user turn through the chat template (its default system prompt, the generation prompt)
    when the tokenizer has one, else as plain text ending in "Answer:"."""
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(f"{content}\nAnswer:", add_special_tokens=False)["input_ids"])


def qa_prompts(tokenizer, items: list[dict], context: str) -> list[list[int]]:
    """Each question after the same `context` (so that the prompt spans routed chunks: a short prompt
    alone fits in the sink chunk, where a NAtS-L model computes its source exactly), as a user turn."""
    return [user_turn(tokenizer, (f"{context}\n\n" if context else "") +
                      f"Answer the question in a few words. {item['question']}") for item in items]


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts: list[list[int]], n_new: int, batch_size: int, device) -> list[str]:
    """Greedy replies to `prompts` (left-padded batches of `generate`, up to `n_new` tokens or EOS), decoded."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False, pad_token_id=pad)
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [r.strip() for r in replies]


def short_qa(model, tokenizer, prompts: list[list[int]], items: list[dict], n_new: int, batch_size: int,
             device) -> dict:
    """Greedy answers -> accuracy and which questions were answered right."""
    replies = greedy_replies(model, tokenizer, prompts, n_new, batch_size, device)
    correct = [is_correct(r, item) for r, item in zip(replies, items)]
    return {"accuracy": sum(correct) / len(correct), "questions": len(correct), "correct": correct,
            "replies": replies}


CHAT_INSTRUCTIONS = (
    "Summarize the text above in two sentences.",
    "What is the text above about? Answer in two sentences.",
    "Explain the main point of the text above in simple terms.",
    "Name the most important facts in the text above.",
)


def chat_prompts(tokenizer, texts: list[str], n: int, passage_tokens: int) -> tuple[list[list[int]], list[str]]:
    """`n` chat turns (the chat template, its default system prompt): a passage (a paragraph of the texts, one of
    those of 40 words or more, evenly spaced through them, cut to `passage_tokens` tokens) followed by one of
    CHAT_INSTRUCTIONS. -> (prompts, passages)."""
    paragraphs = [p.strip() for t in texts for p in re.split(r"\n\s*\n", t) if len(p.split()) >= 40]
    if not paragraphs:
        raise SystemExit("--chat-prompts: the chat text has no paragraph of 40 words or more.")
    picked = [paragraphs[i * len(paragraphs) // n] for i in range(min(n, len(paragraphs)))]
    passages = [tokenizer.decode(tokenizer(p, add_special_tokens=False)["input_ids"][:passage_tokens]).strip()
                for p in picked]
    prompts = [user_turn(tokenizer, f"{passage}\n\n{CHAT_INSTRUCTIONS[i % len(CHAT_INSTRUCTIONS)]}")
               for i, passage in enumerate(passages)]
    return prompts, passages


def chat_scores(replies: list[str], source_replies: list[str], passages: list[str]) -> dict:
    """The chat replies against the source's on the same turns: `chat_passage_word_recall`, the mean share of the
    passage's words in the source's reply (4 letters or more, common ones left out: its facts) that the model's reply
    has too (turns whose source reply takes no passage word are left out); `chat_off_passage_replies`, the share of
    replies that take no word of their passage at all (a non-answer such as "The answer to this question is:")."""
    from natsl_hf.conversion.smollm2 import _words, lost_words

    recall, off = [], []
    for reply, src, passage in zip(replies, source_replies, passages):
        in_passage = set(_words(passage))
        used = set(_words(src)) & in_passage
        if used:
            recall.append(1.0 - len(lost_words(src, reply, passage)) / len(used))
        off.append(not set(_words(reply)) & in_passage)
    return {"chat_passage_word_recall": sum(recall) / len(recall) if recall else float("nan"),
            "turns_scored": len(recall), "chat_off_passage_replies": sum(off) / len(off)}


def qa_agreement(model_qa: dict, source_qa: dict) -> float:
    """Share of the questions the source answers right that the model answers right too (NaN: none)."""
    right = [m for m, s in zip(model_qa["correct"], source_qa["correct"]) if s]
    return sum(right) / len(right) if right else float("nan")


# ------------------------------------------------------------------------------------------ main
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, help="source checkpoint dir (reference for agreement)")
    p.add_argument("--model", action="append", default=[], metavar="LABEL=DIR",
                   help="checkpoint to evaluate against the source (repeatable, e.g. natsl=DIR layer_hybrid=DIR)")
    p.add_argument("--text", required=True, help="held-out text file/dir/saved dataset (not used in training)")
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ppl-blocks", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--gen-prompts", type=int, default=32)
    p.add_argument("--gen-prompt-len", type=int, default=448,
                   help="prompt tokens (<= --seq-len): long enough to span routed chunks (a prompt and continuation "
                   "inside the sink chunk and the open chunk after it never meet a routing decision)")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--retrieval-lengths", type=int, nargs="*", default=[2048, 4096],
                   help="context lengths of the key-value and needle tasks")
    p.add_argument("--retrieval-contexts", type=int, default=16, help="key-value contexts per length")
    p.add_argument("--retrieval-pairs", type=int, default=8, help="key-value lines per context")
    p.add_argument("--retrieval-queries", type=int, default=8, help="queries per context (<= pairs)")
    p.add_argument("--needle-contexts", type=int, default=128,
                   help="needle-in-a-haystack contexts per length (one needle each, depths evenly spread over 0..1)")
    p.add_argument("--passkey-contexts", type=int, default=128,
                   help="needle contexts per length in a form that no training data here holds (PASSKEY: 'The WORD "
                   "vault opens with the combination N.'): whether recall carries beyond the trained forms")
    p.add_argument("--probe-batch-size", type=int, default=16,
                   help="rows per teacher-forced forward of the needle task (right-padded) and of the greedy-"
                   "agreement scoring")
    p.add_argument("--retrieval-haystack", choices=("text", "words"), default="text",
                   help="what surrounds the key-value lines: consecutive sentences of the held-out --text (default; "
                   "the routers see in-distribution text) or random sentences of common words")
    p.add_argument("--qa-file", default=str(QA_FILE), help="short questions with known answers (JSON lines)")
    p.add_argument("--qa-questions", type=int, default=None, help="the first N questions of --qa-file (default all)")
    p.add_argument("--qa-context", type=int, default=1024,
                   help="tokens of held-out text before each question (0: the question alone)")
    p.add_argument("--qa-tokens", type=int, default=16, help="greedy answer length")
    p.add_argument("--qa-batch-size", type=int, default=16)
    p.add_argument("--prose-text", nargs="*", default=[],
                   help="further held-out texts: perplexity and softmax fraction on --prose-blocks blocks of each")
    p.add_argument("--prose-blocks", type=int, default=4, help="blocks of --seq-len tokens of each --prose-text")
    p.add_argument("--chat-prompts", type=int, default=32,
                   help="chat turns (a held-out passage + an instruction, the chat template) answered greedily")
    p.add_argument("--chat-text", default=None,
                   help="held-out text whose paragraphs are the chat turns' passages (default: --text)")
    p.add_argument("--chat-passage", type=int, default=192, help="tokens of each chat turn's passage")
    p.add_argument("--chat-tokens", type=int, default=48, help="greedy reply length of a chat turn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--agreement-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the greedy-agreement rows (the source's continuations and every model's scoring): "
                   "float32 keeps rounding from deciding the source's near-ties")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default=None, help="free text stored in the JSON (e.g. what the data was)")
    return p


def parse_models(specs: list[str]) -> list[tuple[str, str]]:
    models = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"--model {spec!r}: expected LABEL=DIR (e.g. natsl=out/stage2).")
        if label == "source" or label in dict(models):
            raise SystemExit(f"--model {spec!r}: the label {label!r} is taken; give each model its own label.")
        models.append((label, path))
    return models


def evaluate(model, path: str, data: dict, reference: dict | None, args, tokenizer, device) -> dict:
    """Every measurement of one model; `reference`: the source's entry (None: this is the source)."""
    ppl, argmax = perplexity(model, data["blocks"], reference and reference["argmax"], args.batch_size)
    entry = {"path": path, "perplexity": ppl}
    if is_natsl(model):
        entry["config"] = {k: getattr(model.config, k, None) for k in
                           ("chunk_size", "num_sink_chunks", "softmax_budget", "natsl_layers", "route_override")}
    if reference is None:
        entry["argmax"] = argmax  # the source's next-token choices, for top1_agreement (not written out)
    if data["prose"]:
        entry["prose"] = {name: perplexity(model, blocks, None, args.batch_size)[0]
                          for name, blocks in data["prose"].items()}
    entry["retrieval"] = {str(L): retrieval(model, tokenizer, c, args.retrieval_queries, device)
                          for L, c in data["kv_contexts"].items()}
    for task, probe in (("needle", NEEDLE), ("passkey", PASSKEY)):
        if data[f"{task}_contexts"]:
            entry[task] = {str(L): needle_retrieval(model, tokenizer, c, device, args.probe_batch_size, probe)
                           for L, c in data[f"{task}_contexts"].items()}
    if data["chat_prompts"]:
        replies = greedy_replies(model, tokenizer, data["chat_prompts"], args.chat_tokens, args.qa_batch_size, device)
        entry["chat"] = {"turns": len(replies), "replies": replies}
        source_replies = replies if reference is None else reference["chat"]["replies"]
        entry["chat"].update(chat_scores(replies, source_replies, data["chat_passages"]))
    if data["qa_prompts"]:
        entry["short_qa"] = short_qa(model, tokenizer, data["qa_prompts"], data["qa_items"], args.qa_tokens,
                                     args.qa_batch_size, device)
        if reference is not None:
            entry["short_qa"]["source_correct_kept"] = qa_agreement(entry["short_qa"], reference["short_qa"])
    return entry


def summarise(results: dict) -> dict:
    src_ppl = results["source"]["perplexity"]["perplexity"]
    summary = {}
    for label, entry in results.items():
        row = {"perplexity": entry["perplexity"]["perplexity"],
               "ppl_gap_vs_source": entry["perplexity"]["perplexity"] / src_ppl - 1.0}
        for key in ("softmax_fraction", "top1_agreement"):
            if key in entry["perplexity"]:
                row[key] = entry["perplexity"][key]
        for name, r in entry.get("prose", {}).items():
            row[f"perplexity_{name}"] = r["perplexity"]
            row[f"ppl_gap_vs_source_{name}"] = r["perplexity"] / results["source"]["prose"][name]["perplexity"] - 1.0
            if "softmax_fraction" in r:
                row[f"softmax_fraction_{name}"] = r["softmax_fraction"]
        if "generation" in entry:
            row["gen_prefix_match"] = entry["generation"]["gen_prefix_match"]
        if "chat" in entry:  # the source's word recall is against itself (1): left out
            if label != "source":
                row["chat_passage_word_recall"] = entry["chat"]["chat_passage_word_recall"]
            row["chat_off_passage_replies"] = entry["chat"]["chat_off_passage_replies"]
        if "short_qa" in entry:
            row["short_qa_accuracy"] = entry["short_qa"]["accuracy"]
            if "source_correct_kept" in entry["short_qa"]:
                row["short_qa_source_correct_kept"] = entry["short_qa"]["source_correct_kept"]
        for task in ("retrieval", "needle", "passkey"):
            for L, r in entry.get(task, {}).items():
                row[f"{task}_{L}"] = r["accuracy"]
                for key in ("softmax_fraction", "kv_fraction", "pair_chunk_softmax_fraction"):
                    if key in r:
                        row[f"{key}_{task}_{L}"] = r[key]
        summary[label] = row
    return summary


def prepare_data(args, tokenizer, device) -> dict:
    """Held-out blocks, prompts, retrieval / needle contexts and QA prompts, the same for every model."""
    from natsl_hf.conversion.data import load_packed_dataset, load_texts_or_ids

    ds = load_packed_dataset(args.text, tokenizer, args.seq_len, max_blocks=args.ppl_blocks)
    blocks = torch.tensor(ds["input_ids"], device=device)
    rng = random.Random(args.seed)
    haystack = None
    kind, texts = load_texts_or_ids(args.text)
    if args.retrieval_haystack == "text":
        if kind != "text":
            raise SystemExit("--retrieval-haystack text needs raw text in --text; use --retrieval-haystack words.")
        haystack = [s for t in texts for s in haystack_sentences(t)]
    kv = {L: [build_retrieval_context(tokenizer, L, args.retrieval_pairs, rng, haystack)
              for _ in range(args.retrieval_contexts)] for L in args.retrieval_lengths}
    depths = [i / max(args.needle_contexts - 1, 1) for i in range(args.needle_contexts)]
    needle = {L: [build_retrieval_context(tokenizer, L, 1, rng, haystack, NEEDLE, depth) for depth in depths]
              for L in args.retrieval_lengths}
    depths = [i / max(args.passkey_contexts - 1, 1) for i in range(args.passkey_contexts)]  # drawn after the others:
    passkey = {L: [build_retrieval_context(tokenizer, L, 1, rng, haystack, PASSKEY, depth) for depth in depths]
               for L in args.retrieval_lengths}  # the contexts above stay what they were without this task
    chat, passages = [], []
    if args.chat_prompts:
        chat_kind, chat_texts = load_texts_or_ids(args.chat_text) if args.chat_text else (kind, texts)
        if chat_kind != "text":
            raise SystemExit("--chat-prompts needs raw text (--chat-text, default --text) for its passages; pass "
                             "--chat-prompts 0.")
        chat, passages = chat_prompts(tokenizer, chat_texts, args.chat_prompts, args.chat_passage)
    items = load_short_qa(args.qa_file)[: args.qa_questions]
    context = ""
    if args.qa_context:
        if kind != "text":
            raise SystemExit("--qa-context needs raw text in --text; pass --qa-context 0.")
        context = tokenizer.decode(tokenizer(" ".join(texts[::-1]), add_special_tokens=False)["input_ids"][: args.qa_context])
    prose = {Path(path).stem: torch.tensor(load_packed_dataset(path, tokenizer, args.seq_len,
                                                               max_blocks=args.prose_blocks)["input_ids"], device=device)
             for path in args.prose_text}
    return {"blocks": blocks, "prompts": blocks[: args.gen_prompts, : args.gen_prompt_len], "continuations": None,
            "prose": prose,
            "kv_contexts": kv, "needle_contexts": needle if args.needle_contexts else {},
            "passkey_contexts": passkey if args.passkey_contexts else {},
            "qa_items": items, "qa_prompts": qa_prompts(tokenizer, items, context) if items else [],
            "chat_prompts": chat, "chat_passages": passages}


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    # natsl_hf comes from the installed package (an editable install in a checkout): the repository's natsl_hf/
    # folder alone is not the package (setup.py maps modeling/ and conversion/ into it)
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    models = parse_models(args.model)
    if args.retrieval_queries > args.retrieval_pairs:
        raise SystemExit("--retrieval-queries must be <= --retrieval-pairs.")
    if args.gen_prompt_len > args.seq_len:
        raise SystemExit(f"--gen-prompt-len {args.gen_prompt_len} exceeds --seq-len {args.seq_len}: the prompts are "
                         "prefixes of the perplexity blocks.")
    torch.manual_seed(args.seed)
    device, dtype, agreement_dtype = torch.device(args.device), getattr(torch, args.dtype), getattr(torch, args.agreement_dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.source)
    data = prepare_data(args, tokenizer, device)

    results, t_start = {}, time.time()
    run_versions = versions()  # at the start: the code that runs, not the checkout at the end of a long run
    for label, path in [("source", args.source), *models]:
        t0 = time.time()
        model = load_model(path, device, dtype)
        entry = evaluate(model, path, data, results.get("source"), args, tokenizer, device)
        if args.gen_prompts:  # the greedy agreement in --agreement-dtype (module docstring)
            exact = model if agreement_dtype == dtype else load_model(path, device, agreement_dtype)
            if label == "source":
                data["continuations"] = source_continuations(exact, data["prompts"], args.gen_tokens)
            entry["generation"] = {**greedy_agreement(exact, data["prompts"], data["continuations"],
                                                      args.probe_batch_size), "dtype": args.agreement_dtype}
            del exact
        entry["seconds"] = round(time.time() - t0, 1)
        results[label] = entry
        print(json.dumps({label: {k: v for k, v in entry.items() if k != "argmax"}}), flush=True)
        del model
    results["source"].pop("argmax")

    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(__file__).relative_to(REPO))
                                                                  if Path(__file__).is_relative_to(REPO)
                                                                  else __file__, *argv]),
        "device": device_info(device),
        "dtype": args.dtype,
        "versions": run_versions,
        "settings": {k: v for k, v in vars(args).items() if k not in ("model",)},
        "note": args.note,
        "summary": summarise(results),
        "results": results,
        "seconds": round(time.time() - t_start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
