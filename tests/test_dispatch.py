"""The layer's backend dispatch: which path ran, and that the kernel path equals the reference.

The kernel path runs on CPU only with triton's interpreter, which must be switched on before
triton is imported, so the comparison runs in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from natsl_testing import tiny_model


def test_cpu_takes_the_reference_and_says_so():
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 9))
    layer = model.model.layers[0].self_attn
    x = torch.randn(1, 9, 64)
    cos, sin = model.model.rotary_emb(x, torch.arange(9)[None])
    _, aux = layer(x, (cos, sin))
    assert aux["backend"] == "reference"
    assert model(ids).logits.isfinite().all()


def test_kernel_path_matches_reference_in_the_model():
    script = textwrap.dedent(
        """
        import os, sys, torch
        sys.path.insert(0, "tests")
        from natsl_testing import tiny_model
        torch.manual_seed(0)
        model = tiny_model(seed=4, chunk_size=16).train()
        ids = torch.randint(1, 97, (2, 45))  # 2 complete chunks + a partial one
        def run(force_ref):
            os.environ["NATSL_FORCE_REFERENCE"] = "1" if force_ref else "0"
            model.zero_grad()
            layer = model.model.layers[1].self_attn
            x = torch.randn(2, 45, 64, generator=torch.Generator().manual_seed(1))
            cos, sin = model.model.rotary_emb(x, torch.arange(45).expand(2, 45))
            _, aux = layer(x, (cos, sin))
            out = model(ids, labels=ids, use_cache=False)
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            return aux["backend"], out.logits.detach(), grads
        b_ref, logits_ref, g_ref = run(True)
        b_ker, logits_ker, g_ker = run(False)
        assert (b_ref, b_ker) == ("reference", "kernels"), (b_ref, b_ker)
        err = (logits_ker - logits_ref).abs().max().item()
        assert err < 2e-3, err
        for name, g in g_ref.items():
            rel = ((g_ker[name] - g).norm() / g.norm().clamp(min=1e-12)).item()
            assert rel < 5e-3, (name, rel)
        print("DISPATCH_OK", err)
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "NATSL_FORCE_KERNELS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "DISPATCH_OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
