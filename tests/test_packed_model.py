"""Packed documents through the model (position_ids restarting at 0, DataCollatorWithFlattening's
layout): logits and gradients equal each document run alone, with the reference and with the kernels
(under the Triton interpreter), and no cache is built for a packed batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from natsl_hf.modeling_natsl import CACHE_FIELD
from natsl_testing import tiny_model

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, "tests")
    from natsl_testing import tiny_model
    from natsl_hf.modeling import layer as L

    calls = {"kernels": 0}
    real = L.kernels.routed_softmax_attention
    def spy(*args, **kwargs):
        calls["kernels"] += 1
        return real(*args, **kwargs)
    L.kernels.routed_softmax_attention = spy

    CHUNK, LENGTHS = int(sys.argv[1]), eval(sys.argv[2])
    model = tiny_model(seed=3, chunk_size=CHUNK).train()
    gen = torch.Generator().manual_seed(0)
    docs = [[torch.randint(1, 97, (n,), generator=gen) for n in row] for row in LENGTHS]
    ids = torch.stack([torch.cat(row) for row in docs])
    positions = torch.stack([torch.cat([torch.arange(len(d)) for d in row]) for row in docs])
    weights = None

    def logits_and_grads(run):
        global weights
        logits = run()
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7)) if weights is None else weights
        params = [p for p in model.parameters() if p.requires_grad]
        return logits, torch.autograd.grad((logits * weights).sum(), params, allow_unused=True)

    packed, g_packed = logits_and_grads(lambda: model(ids, position_ids=positions, use_cache=False).logits)
    packed_calls = calls["kernels"]
    alone, g_alone = logits_and_grads(lambda: torch.cat(
        [torch.cat([model(d[None], use_cache=False).logits for d in row], 1) for row in docs]))
    assert (packed - alone).abs().max() < 1e-5, (packed - alone).abs().max()
    for a, b in zip(g_packed, g_alone):
        if b is not None:
            assert ((a - b).norm() / b.norm().clamp(min=1e-12)) < 5e-3
    print("PACKED_OK", packed_calls)
    """
)


def run_script(chunk: int, lengths, kernels: bool) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1" if kernels else "0", "NATSL_FORCE_KERNELS": "1" if kernels else "0"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(chunk), repr(lengths)], capture_output=True, text=True,
                            env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "PACKED_OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout.split("PACKED_OK")[1].split()[0]


def test_packed_documents_equal_each_document_alone_reference():
    """Chunk 4: odd lengths, a document shorter than a chunk, one that ends on a boundary."""
    assert run_script(4, [[13, 6, 9, 4], [7, 25]], kernels=False) == "0"


def test_packed_documents_equal_each_document_alone_kernels():
    """Chunk 16 under the interpreter: the packed call takes the kernels (one call per layer)."""
    assert run_script(16, [[37, 20, 7], [50, 14]], kernels=True) == "2"


def test_a_packed_batch_builds_no_cache():
    model = tiny_model(seed=4)
    ids = torch.randint(1, 97, (1, 12))
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        assert getattr(model(ids, position_ids=positions), CACHE_FIELD) is None
        assert getattr(model(ids), CACHE_FIELD) is not None  # one document: the usual cache
