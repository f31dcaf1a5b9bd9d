"""The dense layer path (`NatslAttention._dense`: training, forward without cache) under torch.compile.

On CUDA the layer runs `_dense` compiled (`modeling.layer.compiled_dense`). Here, on CPU, the same function
is compiled with the `aot_eager` backend (dynamo + AOTAutograd, no inductor code generation) over the kernel
path under triton's interpreter, which must be switched on before triton is imported: a subprocess. Checked:
fullgraph (no graph break: the branch kernels are custom ops to dynamo), values and gradients equal to the
eager path in each router mode (learned, stage-1 supervised, stage-2 frozen), and one graph per mode serving
every layer of the model (no recompile per layer, whose budgets differ here, or per step).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def test_dense_path_compiles_whole_once_for_all_layers():
    script = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, "tests")
        from torch._dynamo.utils import counters
        from natsl_testing import tiny_model
        from natsl_hf.modeling.layer import NatslAttention

        torch.manual_seed(0)
        # two layers whose budgets differ share the graph (a recompile per layer would show on the second)
        model = tiny_model(seed=4, chunk_size=16, num_hidden_layers=2, natsl_layers=[0, 1],
                           layer_budget_scale=[0.5, 1.5]).train()
        layers = [layer.self_attn for layer in model.model.layers]
        for layer in layers:
            with torch.no_grad():
                layer.gdn_alpha.fill_(0.5)  # the GDN branch reaches the output (and its gradients flow)
        compiled = torch.compile(NatslAttention._dense, backend="aot_eager", fullgraph=True)
        x = torch.randn(2, 45, 64, requires_grad=True)  # 2 complete chunks + an open one
        cos, sin = model.model.rotary_emb(x, torch.arange(45).expand(2, 45))

        def run(fn, layer):
            x.grad = None
            layer.zero_grad()
            out, routing = fn(layer, x, cos, sin, torch.tensor(layer.softmax_budget))
            (out.square().sum() + (routing.router_loss if routing.router_loss is not None else 0.0)).backward()
            grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
            return out.detach(), routing, x.grad.clone(), grads

        eager = {}  # (mode, layer) -> the eager results: the second learned step repeats the first's inputs
        for mode in ("learned", "learned", "supervised", "frozen"):  # two steps, then stage 1 / stage 2 routing
            for layer in layers:
                layer.router_mode = mode
            for i, layer in enumerate(layers):
                if (mode, i) not in eager:
                    eager[mode, i] = run(NatslAttention._dense, layer)
                out_e, routing_e, dx_e, g_e = eager[mode, i]
                out_c, routing_c, dx_c, g_c = run(compiled, layer)
                assert routing_c.backend == "kernels", routing_c.backend
                torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(dx_c, dx_e, rtol=1e-4, atol=1e-6)
                assert set(g_c) == set(g_e) and "A_log" in g_c, sorted(g_c)
                assert ("router.proj.weight" in g_c) == (mode != "frozen"), (mode, sorted(g_c))
                for name in g_e:
                    torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-4, atol=1e-6, msg=name)
                assert torch.equal(routing_c.n_softmax, routing_e.n_softmax)
                assert torch.equal(routing_c.routes.hard, routing_e.routes.hard)
        assert counters["stats"]["unique_graphs"] == 3, "expected one graph per router mode for all layers"
        for layer in layers:
            layer.router_mode = "learned"
        for n in (35, 61):  # other lengths (2 and 3 complete chunks): one recompile with a dynamic length serves both
            x = torch.randn(2, n, 64, requires_grad=True)
            cos, sin = model.model.rotary_emb(x, torch.arange(n).expand(2, n))
            for layer in layers:
                out_e, _, dx_e, _ = run(NatslAttention._dense, layer)
                out_c, _, dx_c, _ = run(compiled, layer)
                torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(dx_c, dx_e, rtol=1e-4, atol=1e-6)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == 4, f"{graphs} graphs: 3 router modes + one dynamic-length graph expected"
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1", NATSL_FORCE_KERNELS="1", NATSL_FORCE_REFERENCE="0")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_a_failed_compile_warns_once_and_runs_eagerly(monkeypatch):
    """If torch.compile fails on a user's stack, training goes on with the eager path and a warning naming the
    switch, instead of stopping; the next calls do not try again."""
    import warnings

    import pytest
    import torch
    from torch._dynamo.exc import BackendCompilerFailed

    from natsl_hf.modeling import layer as layer_module
    from natsl_testing import tiny_model

    calls = []

    def broken(*args):
        calls.append(1)
        err = BackendCompilerFailed.__new__(BackendCompilerFailed)  # its __init__ differs across torch releases
        Exception.__init__(err, "backend='inductor' raised: RuntimeError: no compiler here")
        raise err

    monkeypatch.setattr(layer_module, "_COMPILE_FAILED", [])
    monkeypatch.setattr(layer_module, "compiled_dense", lambda: broken)
    monkeypatch.setattr(layer_module, "compiles", lambda x: not layer_module._COMPILE_FAILED)
    model = tiny_model(seed=1)
    ids = torch.randint(1, 97, (2, 19))
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="NATSL_COMPILE=0"):
            out = model(ids, use_cache=False).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = model(ids, use_cache=False).logits
    assert len(calls) == 1  # one attempt, then eager for every layer and call
    monkeypatch.setattr(layer_module, "compiles", lambda x: False)
    with torch.no_grad():
        torch.testing.assert_close(out, model(ids, use_cache=False).logits)
    torch.testing.assert_close(again, out)


def test_a_failed_cpp_wrapper_build_of_a_backward_is_caught_at_the_forward_and_compiled_again_without_it(monkeypatch):
    """torch 2.11's inductor failed to build backward graphs with the C++ wrapper, at the first backward, where nothing
    caught it. A graph compiled with the wrapper builds its backward with its forward (natsl_compile), so such a
    failure surfaces in run_compiled: it warns, compiles again without the wrapper (every later compile too) and the
    step goes on, with the eager path's gradients. Real torch.compile on the CPU; inductor's compile_fx is replaced by
    AOTAutograd with boxed no-op compilers whose backward compiler raises where the wrapper was asked for."""
    import functools
    import warnings

    import pytest
    import torch
    import torch._inductor.compile_fx as inductor_compile_fx
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from natsl_hf.modeling import layer as layer_module

    asked = []

    def no_backward(gm, example_inputs):
        raise RuntimeError("CudaKernelParamCache not populated for triton_poi_fused_silu_backward_0")

    def compile_fx(model_, inputs_, config_patches=None, **kwargs):
        asked.append(config_patches["cpp_wrapper"])
        as_is = lambda gm, _: make_boxed_func(gm.forward)  # noqa: E731
        return aot_autograd(fw_compiler=as_is, bw_compiler=no_backward if config_patches["cpp_wrapper"] else as_is)(
            model_, inputs_)

    def block(weight, x):
        return torch.sin(x * weight) * x

    torch._dynamo.reset()
    monkeypatch.setattr(inductor_compile_fx, "compile_fx", compile_fx)
    monkeypatch.setattr(layer_module, "COMPILE_OPTIONS", {"cpp_wrapper": True})
    monkeypatch.setattr(layer_module, "_WRAPPER_FAILED", [])
    monkeypatch.setattr(layer_module, "_COMPILE_FAILED", [])
    monkeypatch.setattr(layer_module, "compiles", lambda x: not layer_module._COMPILE_FAILED)
    factory = functools.cache(lambda: layer_module.natsl_compile(block))
    weight = torch.randn(5, requires_grad=True)
    x = torch.randn(3, 5)
    with pytest.warns(RuntimeWarning, match="TORCHINDUCTOR_CPP_WRAPPER=0"):
        out = layer_module.run_compiled(weight, block, factory, x)
    out.sum().backward()  # a lazy build would have raised here
    assert asked == [True, False] and layer_module._WRAPPER_FAILED and not layer_module._COMPILE_FAILED
    expected = torch.func.grad(lambda w: block(w, x).sum())(weight.detach())
    torch.testing.assert_close(weight.grad, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer_module.run_compiled(weight, block, factory, x).sum().backward()  # no new attempt, no warning
    assert asked == [True, False] and factory().cpp_wrapper is False
    torch._dynamo.reset()


def test_router_fit_and_calibration_run_the_layers_eagerly(monkeypatch):
    """Router fitting / calibration stop forwards at router hooks and switch route_override: on CUDA they must
    not trace (or compile a graph for) the compiled dense path. Checked with a compile that counts graphs."""
    import functools

    import torch
    from torch._dynamo.utils import counters

    from natsl_hf.conversion.router_fit import calibrate_router_bias, fit_routers
    from natsl_hf.modeling import layer as layer_module
    from natsl_hf.modeling.layer import NatslAttention
    from natsl_testing import tiny_model

    monkeypatch.setattr(layer_module, "compiles", lambda x: True)
    monkeypatch.setattr(layer_module, "compiled_dense",
                        functools.cache(lambda: torch.compile(NatslAttention._dense, backend="eager")))
    model = tiny_model(seed=3)
    batches = [{"input_ids": torch.randint(1, 97, (2, 33))} for _ in range(2)]
    before = counters["stats"]["unique_graphs"]
    fit_routers(model, batches)
    calibrate_router_bias(model, batches, 0.5)
    assert counters["stats"]["unique_graphs"] == before
    with torch.no_grad():
        model(batches[0]["input_ids"], use_cache=False)  # outside them the compiled path does run
    assert counters["stats"]["unique_graphs"] > before


def test_the_mlp_half_of_the_decoder_layer_compiles_on_the_dense_path_only(monkeypatch):
    """The decoder layer after its attention (`NatslDecoderLayer._mlp_block`: residual add, norm, MLP, residual add)
    runs compiled where the attention's dense path does (training, a forward without cache), as one graph for every
    layer with the eager values and gradients; a call with a cache (prefill, decode) runs it eagerly: nothing is
    compiled for generate() without a static cache. Compiles counted with the eager backend."""
    import functools

    import torch
    from torch._dynamo.utils import counters

    from natsl_hf import NatslCache, modeling_natsl
    from natsl_hf.modeling import layer as layer_module
    from natsl_hf.modeling.layer import NatslAttention
    from natsl_testing import tiny_model

    torch.manual_seed(0)
    model = tiny_model(seed=5).train()
    ids = torch.randint(1, 97, (2, 37))

    def step():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_e, grads_e = step()
    torch._dynamo.reset()
    monkeypatch.setattr(layer_module, "compiles", lambda x: True)
    monkeypatch.setattr(layer_module, "compiled_dense",
                        functools.cache(lambda: torch.compile(NatslAttention._dense, backend="eager")))
    block = functools.cache(lambda: torch.compile(modeling_natsl.NatslDecoderLayer._mlp_block, backend="aot_eager",
                                                  fullgraph=True))
    monkeypatch.setattr(modeling_natsl, "compiled_mlp_block", block)
    counters.clear()
    loss_c, grads_c = step()
    step()  # a second step: no recompile
    mlp_graphs = counters["stats"]["unique_graphs"]
    torch.testing.assert_close(loss_c, loss_e)
    assert set(grads_c) == set(grads_e)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert block.cache_info().currsize == 1 and mlp_graphs >= 1
    model.eval()
    with torch.no_grad():  # a cached prefill and a decode step: the eager path, no new graph
        before = counters["stats"]["unique_graphs"]
        cache = NatslCache(model.config)
        model(ids[:, :30], past_key_values=cache)
        model(ids[:, 30:31], past_key_values=cache)
        assert counters["stats"]["unique_graphs"] == before


def test_every_compiled_path_compiles_with_the_cpp_wrapper_but_the_kd_pieces(monkeypatch):
    """The four compiled paths (NAtS-L and full-softmax dense paths, the MLP half, the KD pieces) are made by
    `natsl_compile`, which hands torch.compile the product's inductor options: the C++ wrapper (modeling.layer
    COMPILE_OPTIONS, measured in bench/TRAINING_NOTES.md), except for the KD pieces, whose backward the wrapper failed
    to build on torch 2.11 (conversion/trainer.py)."""
    import functools

    import torch

    from natsl_hf import modeling_natsl
    from natsl_hf.conversion import trainer
    from natsl_hf.modeling import layer, softmax_attention

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append((fn, kwargs)) or functools.partial(fn))
    paths = ((layer.compiled_dense, layer.NatslAttention._dense),
             (softmax_attention.compiled_dense, softmax_attention.NatslSoftmaxAttention._dense),
             (modeling_natsl.compiled_mlp_block, modeling_natsl.NatslDecoderLayer._mlp_block),
             (trainer._compiled_token_kl, trainer._token_kl))
    made = [factory.__wrapped__() for factory, _ in paths]
    assert [fn for fn, _ in seen] == [fn for _, fn in paths] and [m.cpp_wrapper for m in made] == [True] * 3 + [False]
    for _, kwargs in seen[:3]:  # inductor with the wrapper, its backward built with the forward (natsl_compile)
        assert isinstance(kwargs["backend"], layer._InductorBackwardWithForward) and kwargs["backend"].config == {
            "cpp_wrapper": True} and kwargs["backend"].compiler_name == "inductor"
    assert seen[3][1] == {"options": {"cpp_wrapper": False}}


def test_inductor_switch_turns_the_cpp_wrapper_off():
    """TORCHINDUCTOR_CPP_WRAPPER=0 (inductor's own switch) reaches the product's compile options; unset, the wrapper is
    on (a fresh interpreter: the options are read at import)."""
    import os
    import subprocess
    import sys

    code = "from natsl_hf.modeling.layer import COMPILE_OPTIONS; print(COMPILE_OPTIONS['cpp_wrapper'])"
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CPP_WRAPPER"}
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    off = subprocess.run([sys.executable, "-c", code], env={**env, "TORCHINDUCTOR_CPP_WRAPPER": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert (on.strip(), off.strip()) == ("True", "False")


def test_train_bench_compile_paths_go_through_natsl_compile_and_hand_back_every_failure(monkeypatch):
    """bench/train_bench.py's C++-wrapper A/B remakes the model's compiled paths with `natsl_compile` (the product's
    backends, options overriding them) and returns and clears the failures recorded before it, a failed wrapper build
    included, so that one row's failure is reported and does not change how the later rows compile."""
    import importlib.util
    from pathlib import Path

    import torch

    from natsl_hf import modeling_natsl
    from natsl_hf.modeling import layer, softmax_attention

    bench = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("train_bench", bench / "train_bench.py")
    train_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_bench)
    for module, name in ((layer, "compiled_dense"), (softmax_attention, "compiled_dense"),
                         (modeling_natsl, "compiled_mlp_block")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    monkeypatch.setattr(layer, "_COMPILE_FAILED", ["eager failure"])
    monkeypatch.setattr(layer, "_WRAPPER_FAILED", ["wrapper failure"])
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or (lambda *a: fn(*a)))
    assert train_bench.compile_paths({"cpp_wrapper": False}) == ["eager failure", "wrapper failure"]
    assert layer._COMPILE_FAILED == [] and layer._WRAPPER_FAILED == []
    made = [layer.compiled_dense(), softmax_attention.compiled_dense(), modeling_natsl.compiled_mlp_block()]
    assert seen == [{"options": {"cpp_wrapper": False}}] * 3 and [m.cpp_wrapper for m in made] == [False] * 3
    seen.clear()
    assert train_bench.compile_paths(None) == []
    assert layer.compiled_dense().cpp_wrapper is layer.COMPILE_OPTIONS["cpp_wrapper"]
