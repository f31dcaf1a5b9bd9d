"""The training kernels as custom ops (issue 21): natsl::softmax_branch_fwd / _bwd and
natsl::gdn_branch_fwd / _bwd, called by thin autograd Functions.

* `_torch_wu_bwd`, the analytic backward of the CPU stand-in `_torch_wu` (inside a custom op
  autograd does not record), against torch autograd of `_torch_wu`, with a trailing partial chunk.
* torch.library.opcheck of the four ops on tiny shapes: schema, fake impl (shapes, dtypes,
  strides, also with symbolic shapes), no aliasing of inputs.
* torch.compile(fullgraph=True, backend="aot_eager") of a function calling both branches
  (requires_grad inputs, then backward): no graph break (fullgraph raises on one), the same values
  and gradients as eager, also on a second length (recompiled with a symbolic T).

The kernels run under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, switched on by
importing test_kernels before triton is imported); if triton was imported earlier without it, the
tests run in a subprocess.
"""

from __future__ import annotations

from importlib import import_module

from test_kernels import _IN_INTERP  # first: its import switches the interpreter on before triton is imported
from test_kernels import _mods as _kernel_mods
from test_kernels import rerun_in_interpreter

import pytest  # noqa: E402
import torch  # noqa: E402


def _mods():
    """(kernels package, softmax_branch, gdn_branch); importing them registers the ops."""
    K, _ = _kernel_mods()
    return K, import_module(K.__name__ + ".softmax_branch"), import_module(K.__name__ + ".gdn_branch")


def _rand(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


def test_torch_wu_bwd_matches_autograd():
    """w = A (k beta e^g), u = A (v beta), A = (I + L)^-1 per chunk: every input's gradient, T = 40 with
    C = 16 (a trailing chunk of 8), unnormalised keys and strong gates so that each term counts."""
    _, _, GB = _mods()
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V, C = 2, 40, 2, 16, 8, 16
    k = _rand(gen, B, T, H, K, scale=0.5).requires_grad_()
    v = _rand(gen, B, T, H, V).requires_grad_()
    beta = torch.rand(B, T, H, generator=gen).requires_grad_()
    gnat = GB._local_cumsum_log2(-torch.rand(B, T, H, generator=gen) * 0.5, C).requires_grad_()  # natural units
    dw, du = _rand(gen, B, T, H, K), _rand(gen, B, T, H, V)
    w, u = GB._torch_wu(k, v, beta, gnat, C)
    want = torch.autograd.grad((w, u), (k, v, beta, gnat), (dw, du))
    got = GB._torch_wu_bwd(k.detach(), v.detach(), beta.detach(), gnat.detach(), C, dw, du)
    for name, a, b in zip(("dk", "dv", "dbeta", "dg"), got, want):
        assert a.shape == b.shape and a.dtype == torch.float32 and a.is_contiguous(), name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        assert b[:, 32:].abs().max() > 1e-2, name  # the partial chunk has gradients to get right


def _softmax_inputs(gen, B=1, T=40, Hq=4, Hkv=2, D=16, C=16):
    NC = -(-T // C)
    rw = (torch.rand(B, NC, Hkv, generator=gen) < 0.5).float()
    rw[0, 0, 0], rw[0, -1, -1] = 1.0, 0.0
    return _rand(gen, B, T, Hq, D), _rand(gen, B, T, Hkv, D), _rand(gen, B, T, Hkv, D), rw


def _gdn_inputs(gen, B=1, T=40, Hq=4, Hkv=2, D=16):
    norm = torch.nn.functional.normalize
    return (norm(_rand(gen, B, T, Hq, D), dim=-1), norm(_rand(gen, B, T, Hkv, D), dim=-1), _rand(gen, B, T, Hkv, D),
            -torch.rand(B, T, Hkv, generator=gen) * 0.3, torch.rand(B, T, Hkv, generator=gen),
            _rand(gen, B, Hkv, D, D, scale=0.5))


if _IN_INTERP:

    def test_softmax_ops_opcheck():
        _mods()  # imports the kernel modules: registers the ops
        gen = torch.Generator().manual_seed(1)
        q, k, v, rw = _softmax_inputs(gen, T=20)  # T % C != 0, GQA 2
        C, scale = 16, 0.25
        torch.library.opcheck(torch.ops.natsl.softmax_branch_fwd.default, (q, k, v, rw, C, scale))
        o, lse, lst, cnt = torch.ops.natsl.softmax_branch_fwd(q, k, v, rw, C, scale)
        assert (o.shape, lse.shape, lst.shape, lst.dtype) == ((1, 20, 4, 16), (1, 4, 20), (1, 2, 2), torch.int32)
        do = torch.randn(o.shape, generator=gen)
        torch.library.opcheck(torch.ops.natsl.softmax_branch_bwd.default, (q, k, v, o, lse, rw, lst, cnt, do, C, scale))

    @pytest.mark.parametrize("with_h0", [True, False])
    def test_gdn_ops_opcheck(with_h0):
        """Without an initial state d initial_state is an empty tensor (a custom op returns no None)."""
        _mods()  # imports the kernel modules: registers the ops
        gen = torch.Generator().manual_seed(2)
        q, k, v, gate, beta, h0 = _gdn_inputs(gen, T=20)
        h0 = h0 if with_h0 else None
        C, scale = 16, 0.25
        torch.library.opcheck(torch.ops.natsl.gdn_branch_fwd.default, (q, k, v, gate, beta, h0, C, scale))
        o, st, gcr, A = torch.ops.natsl.gdn_branch_fwd(q, k, v, gate, beta, h0, C, scale)
        assert A.numel() == 0  # fla's A exists on CUDA only
        do, dst = torch.randn(o.shape, generator=gen), torch.randn(st.shape, generator=gen)
        args = (q, k, v, gate, beta, h0, gcr, A, do, dst, C, scale)
        torch.library.opcheck(torch.ops.natsl.gdn_branch_bwd.default, args)
        assert torch.ops.natsl.gdn_branch_bwd(*args)[5].shape == ((1, 2, 16, 16) if with_h0 else (0,))

    def test_gdn_fwd_fake_on_cuda_has_flas_A(monkeypatch):
        """The fake forward on a (fake) CUDA device, outside the interpreter, says what fla returns there:
        A [B,T,Hkv,C] in k's dtype."""
        _, _, GB = _mods()
        monkeypatch.setattr(GB, "_interp", lambda: False)
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            q = torch.empty(1, 40, 4, 16, device="cuda", dtype=torch.bfloat16)
            k = torch.empty(1, 40, 2, 16, device="cuda", dtype=torch.bfloat16)
            gate = torch.empty(1, 40, 2, device="cuda")
            o, st, gcr, A = GB._gdn_branch_fwd_fake(q, k, k, gate, gate, None, 32, 0.25)
            assert (A.shape, A.dtype) == ((1, 40, 2, 32), torch.bfloat16)
            assert (o.dtype, st.shape, gcr.shape) == (torch.float32, (1, 2, 16, 16), (1, 40, 2))

    def test_compiled_fullgraph_matches_eager():
        """Both branches (through the package's wrappers) in one torch.compile(fullgraph=True) region with
        requires_grad inputs: no graph break, the eager values and gradients; a second length recompiles
        with a symbolic T (the fake impls' shapes are integer arithmetic)."""
        K, _, _ = _mods()
        C, scale = 16, 16 ** -0.5

        def f(q, k, v, rw, gq, gk, gate, beta, h0):
            o = K.routed_softmax_attention(q, k, v, rw, C, scale)
            o_gdn, state = K.routed_gdn_readout(gq, gk, v, gate, beta, C, scale, h0)
            return (o * o_gdn).sum() + o.square().sum() + (state * h0).sum()

        torch._dynamo.reset()
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        try:
            for T in (40, 27):
                gen = torch.Generator().manual_seed(T)
                q, k, v, rw = _softmax_inputs(gen, T=T, Hkv=1)
                gq, gk, _, gate, beta, h0 = _gdn_inputs(gen, T=T, Hkv=1)
                inputs = (q, k, v, rw, gq, gk, gate, beta, h0)
                eager = [t.clone().requires_grad_() for t in inputs]
                comp = [t.clone().requires_grad_() for t in inputs]
                loss = f(*eager)
                loss.backward()
                loss_c = compiled(*comp)
                loss_c.backward()
                torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
                for i, (a, b) in enumerate(zip(comp, eager)):
                    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6, msg=f"grad {i}, T={T}")
        finally:
            torch._dynamo.reset()

else:

    def test_kernel_ops_in_interpreter_subprocess():
        rerun_in_interpreter(__file__)
