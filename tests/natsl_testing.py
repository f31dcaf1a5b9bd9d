"""Shared helpers for the tests: tiny configs and models with mixed routing, tiny saved checkpoints for the CLIs."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import NamedTuple

import torch

from natsl_hf import NatslConfig, NatslForCausalLM


def free_port() -> int:
    """A free TCP port on localhost, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(**overrides) -> NatslConfig:
    kwargs = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        chunk_size=4,
        num_sink_chunks=1,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return NatslConfig(**kwargs)


def mix_routes(model: torch.nn.Module, seed: int = 0, router_std: float = 0.5, alpha_std: float = 1.0):
    """Randomise routers (so chunks split between softmax and GDN) and switch the GDN output on."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "NatslAttention":
                module.router.proj.weight.copy_(torch.randn(module.router.proj.weight.shape, generator=g) * router_std)
                module.router.proj.bias.zero_()
                module.gdn_alpha.copy_(torch.randn(module.gdn_alpha.shape, generator=g) * alpha_std)
                module.a_proj.weight.copy_(torch.randn(module.a_proj.weight.shape, generator=g) * 0.3)
                module.b_proj.weight.copy_(torch.randn(module.b_proj.weight.shape, generator=g) * 0.3)
                module.gdn_conv.weight.add_(torch.randn(module.gdn_conv.weight.shape, generator=g) * 0.2)
    return model


def tiny_model(seed: int = 0, mixed: bool = True, **overrides) -> NatslForCausalLM:
    torch.manual_seed(seed)
    model = NatslForCausalLM(tiny_config(**overrides)).eval()
    return mix_routes(model, seed) if mixed else model


class CliCheckpoints(NamedTuple):
    """What `save_cli_checkpoints` wrote under `root`."""

    root: Path
    source: Path  # root / "src": a tiny Llama, with a tokenizer
    natsl: Path  # root / "natsl": its NAtS-L conversion (chunk 8), with the same tokenizer
    train_text: Path  # root / "train.txt": a short English training text


def save_cli_checkpoints(root: Path) -> CliCheckpoints:
    """Save the tiny checkpoints the command-line tests run on (test_distill.py's `cli_dirs`, test_cli_robustness.py's
    `dirs`): a Llama source (test_distill.tiny_source, embeddings resized to the character tokenizer of
    test_ddp_cpu.char_tokenizer), its NAtS-L conversion (test_distill.tiny_natsl), each with that tokenizer, and a
    training text. Deterministic: the models are seeded."""
    from test_ddp_cpu import char_tokenizer
    from test_distill import tiny_natsl, tiny_source

    root = Path(root)
    paths = CliCheckpoints(root, root / "src", root / "natsl", root / "train.txt")
    tok = char_tokenizer()
    source = tiny_source()
    source.resize_token_embeddings(len(tok), mean_resizing=False)
    for folder, model in ((paths.source, source), (paths.natsl, tiny_natsl(source))):
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    paths.train_text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    return paths
