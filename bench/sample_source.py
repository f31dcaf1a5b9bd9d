"""Text the source model writes itself: training shards on the teacher's own distribution (issue 22).

    python bench/sample_source.py --gguf G --data D --out FOLDER --tokens 2000000 [--minutes 3]
    (bench/recover_scale.py --selfgen-tokens N runs the same sampling in its own process, with the teacher it loaded)

Logit KD on natural text teaches the student the source's next-token distribution on that text; what a
user meets is the student continuing its *own* text, and the quality table scores exactly that (greedy
agreement on the source's continuations). Text the source samples itself puts the KD loss there, and
costs only GPU seconds: nothing has to be moved to the device machine.

Prompts come from the train documents in D (bench/build_recovery_data.py's shards, whichever are there):
- half continue a document's opening (16-64 tokens, as the data holds it: prose, documentation, code);
- half are chat turns through the model's chat template (its default system prompt) that ask one of a few
  instructions (`INSTRUCTIONS`: explain, summarise, continue, ...) about a passage of 48-192 tokens of a
  document.
The source samples each at temperature 0.8, top-p 0.95, up to `--new-tokens` tokens or its EOS; one sample
is one document (prompt + continuation, closed by EOS), so the KD loss sees the prompt too. Batches run
until `--tokens` are written or `--minutes` have passed, whichever comes first.

`qa_turns` (bench/recover_scale.py --qa-turns) writes short-answer chat turns the same way: a passage, a short
question in other words and about other things than the evaluation's, and the source's greedy reply.

Writes FOLDER/selfgen-NNNNN.npy.xz (uint16, lzma; the format of bench/build_recovery_data.py) and
FOLDER/manifest.json (split "train"; tokenizer, command, device, seconds), so `--data FOLDER` reads them
as any other shards (natsl_hf.conversion.data.load_token_shards).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

INSTRUCTIONS = (
    "Explain the following text in simple terms.",
    "Summarize the following text in a few sentences.",
    "What are the main points of this text?",
    "Continue this text.",
    "Write three questions about this text, and answer them.",
    "Rewrite this text so that a beginner can follow it.",
)
TEMPERATURE, TOP_P = 0.8, 0.95
WIDTH_STEP = 128  # prompt widths rounded up to this: a few static cache lengths (sample_batch)
SHARD_TOKENS = 4_000_000  # ~3-4 MB compressed: one shard travels on its own


def _openings(docs: list[np.ndarray], rng: random.Random, n: int, low: int, high: int) -> list[list[int]]:
    """`n` openings of random documents longer than `high`, each of a random length in [low, high]."""
    long = [d for d in docs if len(d) > high + 1]
    if not long:
        raise ValueError(f"no train document is longer than {high} tokens: pass more shards with --data")
    return [long[rng.randrange(len(long))][: rng.randint(low, high)].tolist() for _ in range(n)]


def _chat_prompt(tokenizer, message: str) -> list[int]:
    """`message` as one user turn through the chat template (its default system prompt), then the generation prompt."""
    return list(tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def _left_padded(batch: list[list[int]], width: int, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts of `batch` left-padded to `width` -> (input_ids, attention_mask) [len(batch), width] on `device`."""
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    return ids, mask


def _document(prompt: list[int], generated: np.ndarray, eos: int) -> np.ndarray:
    """A prompt and what was generated after it up to its first EOS, closed by EOS: one training document (uint16)."""
    stop = np.flatnonzero(generated == eos)
    return np.concatenate([np.asarray(prompt, dtype=np.int64), generated[: stop[0]] if len(stop) else generated,
                           [eos]]).astype(np.uint16)


def prompts(tokenizer, docs: list[np.ndarray], n: int, rng: random.Random) -> list[list[int]]:
    """`n` prompts (token ids), half plain openings, half chat turns about a passage (module docstring)."""
    plain = _openings(docs, rng, n - n // 2, 16, 64)
    chats = []
    for ids in _openings(docs, rng, n // 2, 48, 192):
        passage = tokenizer.decode(ids, skip_special_tokens=True).strip()
        chats.append(_chat_prompt(tokenizer, f"{rng.choice(INSTRUCTIONS)}\n\n{passage}"))
    out = plain + chats
    rng.shuffle(out)
    return out


@torch.no_grad()
def sample_batch(model, batch: list[list[int]], new_tokens: int, eos: int, pad: int) -> list[np.ndarray]:
    """One left-padded `generate` of the prompts in `batch`; -> one document per prompt: prompt + sampled
    tokens up to the first EOS, closed by EOS (uint16).

    The source's fastest transformers path: a static cache, whose decode step transformers compiles on a GPU. The
    padded width is rounded up to a multiple of `WIDTH_STEP`, so that batches share a few cache lengths and the
    compiled step is reused instead of recompiled per batch. Measured (H100, 2026-12-07): 6.8k tok/s over two batches of
    512 against 6.3k eager; the second batch alone 10.8k. A batch runs until its longest sample ends, so most rows idle
    for most steps (bench/RECOVERY_NOTES.md)."""
    width = -(-max(len(p) for p in batch) // WIDTH_STEP) * WIDTH_STEP
    ids, mask = _left_padded(batch, width, pad, next(model.parameters()).device)
    out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0,
                         max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad, cache_implementation="static")
    return [_document(p, row, eos) for p, row in zip(batch, out[:, width:].cpu().numpy())]


def sample(model, tokenizer, docs: list[np.ndarray], tokens: int, *, minutes: float, batch: int = 512,
           new_tokens: int = 768, seed: int = 0, log=print) -> tuple[list[np.ndarray], dict]:
    """Sample documents from `model` (the source) until `tokens` tokens or `minutes`; -> (documents, stats)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.eval()
    out, written, start = [], 0, time.perf_counter()
    while written < tokens and time.perf_counter() - start < minutes * 60:
        new = sample_batch(model, prompts(tokenizer, docs, batch, rng), new_tokens, eos, pad)
        out += new
        written += sum(len(d) for d in new)
        seconds = time.perf_counter() - start
        log(f"selfgen: {len(out)} documents, {written} tokens, {seconds:.0f} s ({written / seconds:.0f} tok/s)")
    seconds = time.perf_counter() - start
    return out, {"documents": len(out), "tokens": written, "seconds": seconds, "tok_s": written / max(seconds, 1e-9),
                 "batch": batch, "new_tokens": new_tokens, "temperature": TEMPERATURE, "top_p": TOP_P, "seed": seed}


# ----------------------------------------------------------------------------- short-answer chat turns
# What the short-answer row of bench/eval_quality.py asks, in other words and about other things: a user turn of
# a passage and then a short question, answered by the source. The recovered models' commonest failure on that row
# is a non-reply ("The answer to the question in a few words is:"), a format they fall into on a question after
# prose (bench/RECOVERY_NOTES.md, pieces 7-9); the training mix held no such turn. None of these questions is one of
# bench/data/short_qa.jsonl's and none asks about the same subject (tests/test_sample_source.py checks it), and the
# evaluation's instruction ("Answer the question in a few words.") is not among QA_INSTRUCTIONS: the turns teach the
# format and the source's own replies, not the evaluation's answers.
QA_INSTRUCTIONS = (
    "Give a short answer.",
    "Reply with one word or a short phrase.",
    "Answer briefly.",
    "Please answer in as few words as you can:",
    "Short answer only, no explanation.",
    "Answer this in a word or two.",
)
_CAPITALS = ("Portugal", "Greece", "Poland", "Sweden", "Norway", "Finland", "Kenya", "Peru", "Chile", "Argentina",
             "Brazil", "India", "Australia", "Turkey", "Ireland", "Austria", "Cuba", "Thailand", "Vietnam", "Nigeria",
             "Morocco", "Denmark", "Hungary", "Belgium", "the Netherlands", "South Korea", "Iran", "Colombia")
_LANGUAGES = ("Brazil", "Germany", "Japan", "Italy", "Portugal", "Greece", "Russia", "Sweden", "China", "Egypt")
_CONTINENTS = ("Brazil", "Kenya", "Japan", "Canada", "Australia", "Norway", "Peru", "India", "Nigeria", "Poland")
_COLOURS = ("a lemon", "a ripe tomato", "milk", "a carrot", "an emerald", "a blood orange", "chocolate", "a flamingo",
            "the sea on a sunny day", "a fire engine", "charcoal", "a pumpkin")
_COUNTS = ("legs does a dog have", "legs does an insect have", "wheels does a car have", "days are in a year",
           "players are on a football team", "strings does a violin have", "sides does a hexagon have",
           "seconds are in a minute", "weeks are in a year", "legs does a bird have", "arms does an octopus have",
           "letters are in the English alphabet")
_OPPOSITES = ("fast", "old", "wet", "open", "early", "full", "happy", "heavy", "left", "loud", "rich", "young",
              "north", "inside", "win")
_BABIES = ("sheep", "cow", "horse", "goat", "duck", "kangaroo", "frog", "bear", "lion", "swan")
_AUTHORS = ("Hamlet", "Pride and Prejudice", "War and Peace", "The Odyssey", "Oliver Twist", "Don Quixote",
            "Moby-Dick", "Frankenstein")
_PLURALS = ("mouse", "child", "tooth", "goose", "box", "leaf", "man", "foot")
_FACTS = ("What is the largest desert in the world?", "What is the longest river in Africa?",
          "Which planet is closest to the Sun?", "What do caterpillars turn into?", "What do cows drink?",
          "Which animal is known as the king of the jungle?", "What is the hardest natural substance?",
          "What is the main ingredient of bread?", "Which organ pumps blood through the body?",
          "How many continents are there?", "What do plants need from the Sun to grow?",
          "Which bird is a symbol of peace?", "What is the smallest prime number?",
          "Which metal is liquid at room temperature?", "What instrument has black and white keys?",
          "What is the name of our galaxy?", "Which month has the fewest days?", "What colour do you get by mixing "
          "blue and yellow?", "Which sea creature has eight arms?", "What is the currency of Japan?")


def short_questions() -> list[str]:
    """The questions of the short-answer chat turns (see above): templates over other subjects, arithmetic on other
    numbers, a few general facts."""
    q = [f"What is the capital of {c}?" for c in _CAPITALS]
    q += [f"What language is spoken in {c}?" for c in _LANGUAGES]
    q += [f"Which continent is {c} in?" for c in _CONTINENTS]
    q += [f"What color is {t}?" for t in _COLOURS]
    q += [f"How many {c}?" for c in _COUNTS]
    q += [f"What is the opposite of {w}?" for w in _OPPOSITES]
    q += [f"What do you call a baby {a}?" for a in _BABIES]
    q += [f"Who wrote {b}?" for b in _AUTHORS]
    q += [f"What is the plural of {w}?" for w in _PLURALS]
    q += list(_FACTS)
    q += [f"What is {a} + {b}?" for a, b in ((11, 14), (23, 19), (35, 12), (42, 17), (13, 28), (31, 31))]
    q += [f"What is {a} - {b}?" for a, b in ((30, 12), (45, 15), (27, 9), (50, 25), (64, 32), (19, 11))]
    q += [f"What is {a} x {b}?" for a, b in ((3, 4), (6, 7), (8, 9), (11, 3), (12, 5), (4, 9))]
    return q


@torch.no_grad()
def qa_turns(model, tokenizer, docs: list[np.ndarray], n: int, *, seed: int = 0, questions: list[str] | None = None,
             instructions: tuple[str, ...] = QA_INSTRUCTIONS, passage: tuple[int, int] = (128, 1024),
             reply_tokens: int = 24, batch: int = 64, log=print) -> tuple[list[np.ndarray], dict]:
    """`n` short-answer chat turns, each one document: a user turn (the chat template, its default system prompt) of a
    passage of a random train document (`passage` tokens, decoded) and then one of `instructions` with one of
    `questions`, and the source's greedy reply (up to `reply_tokens` tokens or its EOS), closed by EOS. -> (documents,
    stats). Greedy, as the evaluation answers: the turn then holds the source's most likely reply."""
    questions = short_questions() if questions is None else questions
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    model.eval()
    out, start = [], time.perf_counter()
    while len(out) < n:
        prompts = [_chat_prompt(tokenizer, f"{tokenizer.decode(ids, skip_special_tokens=True).strip()}\n\n"
                                           f"{rng.choice(instructions)} {rng.choice(questions)}")
                   for ids in _openings(docs, rng, min(batch, n - len(out)), *passage)]
        width = max(map(len, prompts))
        ids, mask = _left_padded(prompts, width, pad, device)
        replies = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=reply_tokens,
                                 eos_token_id=eos, pad_token_id=pad)[:, width:].cpu().numpy()
        out += [_document(p, row, eos) for p, row in zip(prompts, replies)]
        log(f"qa turns: {len(out)} of {n}, {time.perf_counter() - start:.0f} s")
    seconds = time.perf_counter() - start
    return out, {"documents": len(out), "tokens": int(sum(len(d) for d in out)), "seconds": seconds,
                 "questions": len(questions), "instructions": len(instructions), "passage_tokens": list(passage),
                 "reply_tokens": reply_tokens, "greedy": True, "seed": seed}


def run_info(stats: dict) -> dict:
    """What a manifest of sampled shards records besides them: the command, device, versions and `stats`."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"command": shlex.join([sys.executable, *sys.argv]), "device": device,
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}, **stats}


def write_folder(folder: Path, docs: list[np.ndarray], like_manifest: dict, info: dict,
                 stem: str = "selfgen") -> list[str]:
    """`docs` as shards STEM-NNNNN.npy.xz of <= SHARD_TOKENS tokens in `folder`, with a manifest in the format of
    `like_manifest` (the data folder the prompts came from: same tokenizer). Returns the shard names."""
    from natsl_hf.conversion.data import SHARD_MANIFEST

    from build_recovery_data import encode_shard  # bench/ is on the path: this file's folder

    folder.mkdir(parents=True, exist_ok=True)
    shards, cur = [], []

    def flush():
        if not cur:
            return
        tokens = np.concatenate(cur)
        blob = encode_shard(tokens)
        name = f"{stem}-{len(shards):05d}.npy.xz"
        (folder / name).write_bytes(blob)
        shards.append({"file": name, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
                       "tokens": int(len(tokens)), "documents": len(cur)})
        cur.clear()

    for d in docs:
        if cur and sum(len(c) for c in cur) + len(d) > SHARD_TOKENS:
            flush()
        cur.append(d)
    flush()
    manifest = {"format": like_manifest["format"], "tokenizer": like_manifest["tokenizer"],
                "shard_format": like_manifest.get("shard_format"), "made_by": "bench/sample_source.py", **info,
                "splits": {"train": {"documents": len(docs), "tokens": int(sum(len(d) for d in docs)),
                                     "shards": shards}}}
    tmp = folder / (SHARD_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(folder / SHARD_MANIFEST)
    return [s["file"] for s in shards]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct GGUF")
    p.add_argument("--data", type=Path, required=True, help="bench/build_recovery_data.py's output (the prompts)")
    p.add_argument("--out", type=Path, required=True, help="folder for the shards and their manifest")
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=768)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("sampling millions of tokens needs a GPU (this machine has no CUDA device)")
    from natsl_hf.conversion.data import load_token_shards
    from recover_scale import load_source, manifest_of

    source, tokenizer = load_source(Path(args.gguf), quick=False)
    source = source.to("cuda", torch.bfloat16)
    docs, stats = sample(source, tokenizer, load_token_shards(args.data, "train"), args.tokens, minutes=args.minutes,
                         batch=args.batch, new_tokens=args.new_tokens, seed=args.seed)
    print("\n".join(write_folder(args.out, docs, manifest_of(args.data), run_info(stats))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
