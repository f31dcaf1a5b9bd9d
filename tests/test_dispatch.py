"""The layer's backend dispatch: which path ran, and that the kernel path equals the reference.

The kernel path runs on CPU only with triton's interpreter, which must be switched on before
triton is imported, so the comparison runs in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from natsl_testing import tiny_model


def test_cpu_takes_the_reference_and_says_so():
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 9))
    layer = model.model.layers[0].self_attn
    x = torch.randn(1, 9, 64)
    cos, sin = model.model.rotary_emb(x, torch.arange(9)[None])
    _, routing = layer(x, (cos, sin))
    assert routing.backend == "reference"
    assert model(ids).logits.isfinite().all()


def test_full_softmax_layers_take_sdpa_and_match_the_reference(monkeypatch):
    """A layer kept full softmax (outside natsl_layers) is causal attention: torch SDPA (GQA without
    repeating K/V) on whole unpadded sequences, the reference otherwise; same outputs and gradients."""
    model = tiny_model(seed=2, num_hidden_layers=3, natsl_layers=[1]).train()
    ids = torch.randint(1, 97, (2, 23))
    layer = model.model.layers[0].self_attn
    x = torch.randn(2, 23, 64)
    cos, sin = model.model.rotary_emb(x, torch.arange(23).expand(2, 23))
    assert layer(x, (cos, sin))[1].backend == "sdpa"
    assert layer(x, (cos, sin), token_mask=torch.ones(2, 23, dtype=torch.bool).tril(22))[1].backend == "reference"

    def run(force_reference):
        monkeypatch.setenv("NATSL_FORCE_REFERENCE", "1" if force_reference else "0")
        model.zero_grad()
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (logits_ref, g_ref), (logits_sdpa, g_sdpa) = run(True), run(False)
    torch.testing.assert_close(logits_sdpa, logits_ref, rtol=1e-5, atol=1e-5)
    for name, g in g_ref.items():
        torch.testing.assert_close(g_sdpa[name], g, rtol=1e-4, atol=1e-6, msg=name)


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
            _, routing = layer(x, (cos, sin))
            out = model(ids, labels=ids, use_cache=False)
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            return routing.backend, out.logits.detach(), grads
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


@pytest.mark.parametrize("static", [False, True])
def test_decode_kernel_matches_reference_in_the_model(static):
    """Decode steps against either cache take the decode kernel (modeling/kernels/decode.py) in every layer,
    NAtS-L or full softmax, and give the reference's logits; a left-padded row has its own chunk phase.
    Every step takes it, the chunk-closing ones included, the NAtS-L layer's GDN branch takes the fused
    step (modeling/kernels/gdn_decode.py) and every layer the fused chunk close (modeling/kernels/chunk_close.py)."""
    script = "STATIC = %r\n" % static + textwrap.dedent(
        """
        import os, sys, torch
        sys.path.insert(0, "tests")
        from natsl_testing import tiny_model
        from natsl_hf import NatslCache, NatslStaticCache
        from natsl_hf.modeling import layer as L
        calls = {"decode": 0, "gdn_decode": 0, "close": 0}
        def counting(name, real):
            def counted(*args):
                calls[name] += 1
                return real(*args)
            return counted
        L.kernels.routed_decode_attention = counting("decode", L.kernels.routed_decode_attention)
        L.kernels.gdn_decode_step = counting("gdn_decode", L.kernels.gdn_decode_step)
        L.kernels.close_chunk = counting("close", L.kernels.close_chunk)
        model = tiny_model(seed=4, chunk_size=16, natsl_layers=[1])
        ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(2, 20, dtype=torch.long)
        mask[1, :7] = 0  # row 1: a 13-token prompt, left-padded
        def run(force_ref):
            os.environ["NATSL_FORCE_REFERENCE"] = "1" if force_ref else "0"
            cache = NatslStaticCache(model.config, 2, 40, 1.0) if STATIC else NatslCache(model.config)
            with torch.no_grad():
                logits = [model(ids[:, :20], attention_mask=mask, past_key_values=cache).logits[:, -1:]]
                for t in range(20, 40):
                    seen = torch.cat([mask, torch.ones(2, t + 1 - 20, dtype=torch.long)], 1)
                    logits.append(model(ids[:, t:t + 1], attention_mask=seen, past_key_values=cache).logits)
            return torch.cat(logits, 1)
        ref = run(True)
        assert calls["decode"] == 0
        ker = run(False)
        # every step takes them, against either cache, the chunk-closing ones included: row 0 closes one at
        # position 31 (step t=31), row 1 (13-token prompt, position t-7) at 15 and 31 (t=22, 38)
        assert calls["decode"] == 20 * 2, calls  # 20 steps x 2 layers
        assert calls["gdn_decode"] == 20, calls  # the NAtS-L layer's fused GDN step
        assert calls["close"] == 40, calls  # the fused chunk close, every layer and step
        err = (ker - ref).abs().max().item()
        assert err < 1e-4, err
        print("DECODE_OK", err)
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "NATSL_FORCE_KERNELS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "DECODE_OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.fixture
def kernels_without_fla(monkeypatch):
    """The kernel package as on a CUDA machine where fla fails to import: every tensor counts as a CUDA
    tensor, the fla modules are blocked in sys.modules, and the cached import checks start empty."""
    from natsl_hf.modeling import kernels

    monkeypatch.setattr(kernels, "_device_type", lambda tensor: "cuda")
    monkeypatch.setenv("NATSL_FORCE_KERNELS", "1")  # the layer's own CUDA test (x.is_cuda) is False on CPU
    monkeypatch.setitem(sys.modules, "fla.ops.common.chunk_delta_h", None)
    for cached in (kernels._import_error, kernels._usable_on_cuda):
        cached.cache_clear()
    yield kernels
    for cached in (kernels._import_error, kernels._usable_on_cuda):
        cached.cache_clear()


def test_failed_kernel_import_on_cuda_warns_once_with_the_fix(kernels_without_fla):
    model = tiny_model(seed=1, chunk_size=16)  # a chunk size the kernels take
    ids = torch.randint(1, 97, (1, 9))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = model(ids, use_cache=False)
    assert out.logits.isfinite().all()  # ran the reference
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages  # 2 layers x 2 calls, one warning
    for needed in ("chunk_delta_h", "pip install flash-linear-attention fla-core", "use_kernels=False"):
        assert needed in messages[0], messages[0]


def test_use_kernels_false_never_warns(kernels_without_fla):
    model = tiny_model(seed=1, chunk_size=16, use_kernels=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randint(1, 97, (1, 9)), use_cache=False)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert not kernels_without_fla._import_error.cache_info().currsize  # nothing was even imported
