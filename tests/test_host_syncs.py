"""No host sync in a NAtS-L layer's training step on the CUDA path (issue 21).

A training step of the layer is its dense path (`NatslAttention._dense`, compiled on CUDA) around the two branch
ops. What makes the host wait for the GPU there: reading a value (`.item()`, `int()`, `bool()`, `.tolist()`, a
Python branch on a tensor: all `aten._local_scalar_dense`), an op whose output size depends on values
(`nonzero`, boolean-mask indexing), and a tensor crossing between the CPU and the GPU (a CPU budget tensor in
the graph made inductor copy it to the GPU with a blocking DeviceCopy: one sync per layer forward and
checkpoint recompute, 60 of the 62 syncs per step of bench/results/model_bench_h200_training_ckpt_profile.json).

Without a GPU the path still runs here, on meta tensors (shapes, dtypes and a device that is not the CPU, no
data: a value read raises there too): the layer is told the kernels serve them (`kernels_for`), so it takes its
CUDA branch, and the branch ops run their fake impls. Off CUDA the layer runs eagerly, the function the compiled
graph traces; a guard beneath refuses every op above. The host code inside the real ops (their launchers) is
checked on CPU tensors under TRITON_INTERPRET=1: the same launchers, the GDN chunk states by torch instead of fla
(whose chunk helpers read nothing on the host either with cu_seqlens=None: bench/TRAINING_NOTES.md).
"""

from __future__ import annotations

import contextlib

from test_kernels import _IN_INTERP  # first: its import switches the interpreter on before triton is imported
from test_kernels import rerun_in_interpreter

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from natsl_testing import tiny_model  # noqa: E402

from natsl_hf.modeling import layer as layer_module  # noqa: E402

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
           aten.masked_select.default, aten.index.Tensor}  # index: refused only with a bool index (below)


class NoHostSync(TorchDispatchMode):
    """Raises on an op that makes the host wait for the device: a value read, a data-dependent output size, or
    tensors of two device types in one op (a copy between them; a CPU scalar in a GPU op, which the compiled
    graph turns into a blocking copy)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in SYNCING and (func != aten.index.Tensor or any(t.dtype == torch.bool for t in tensors[1:])):
            raise AssertionError(f"host sync: {func}")
        out = func(*args, **kwargs)
        devices = {t.device.type for t in tensors + [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]}
        if len(devices) > 1:
            raise AssertionError(f"host sync: {func} mixes devices {sorted(devices)}")
        return out


@pytest.mark.parametrize("mode", ["learned", "supervised", "frozen"])
def test_training_forward_and_backward_on_the_kernel_path_never_sync(mode, monkeypatch):
    monkeypatch.setattr(layer_module, "kernels_for", lambda device_type: True)  # the CUDA path on meta tensors
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: False)  # meta has no autocast:
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: contextlib.nullcontext())  # none to switch off
    model = tiny_model(seed=3, chunk_size=16, num_hidden_layers=1, natsl_layers=[0]).train()
    layer = model.model.layers[0].self_attn.to("meta")
    layer.router_mode = mode
    x = torch.empty(2, 45, 64, device="meta", requires_grad=True)  # 2 complete chunks + an open one
    cos, sin = torch.empty(2, 2, 45, 16, device="meta").unbind(0)
    with NoHostSync():
        out, routing = layer(x, (cos, sin))
        loss = out.square().sum()
        if routing.router_loss is not None:
            loss = loss + routing.router_loss
        loss.backward()
    assert routing.backend == "kernels"  # the branch ops ran (their fake impls), not the reference
    assert (routing.router_loss is not None) == (mode != "frozen")
    assert x.grad is not None and layer.q_proj.weight.grad is not None


def test_the_guard_catches_a_cpu_budget(monkeypatch):
    """The guard is what catches the budget sync: the budget made on the CPU again (as it was) fails."""
    run_compiled = layer_module.run_compiled

    def cpu_budget(self, dense, compiled, x, cos, sin, budget):
        return run_compiled(self, dense, compiled, x, cos, sin, torch.tensor(self.softmax_budget))

    monkeypatch.setattr(layer_module, "run_compiled", cpu_budget)
    with pytest.raises(AssertionError, match="mixes devices"):
        test_training_forward_and_backward_on_the_kernel_path_never_sync("learned", monkeypatch)


if _IN_INTERP:

    def test_branch_ops_host_code_never_syncs():
        from natsl_hf.modeling.kernels import gdn_branch, softmax_branch  # noqa: F401 - registers the ops
        ops = torch.ops.natsl
        g = torch.Generator().manual_seed(0)
        B, T, Hq, Hkv, D, C = 2, 40, 4, 2, 16, 16  # a trailing partial chunk
        q, do = (torch.randn(B, T, Hq, D, generator=g) for _ in range(2))
        k = torch.nn.functional.normalize(torch.randn(B, T, Hkv, D, generator=g), dim=-1)
        v = torch.randn(B, T, Hkv, D, generator=g)
        rw = (torch.rand(B, -(-T // C), Hkv, generator=g) > 0.5).float()
        gate, beta = -torch.rand(B, T, Hkv, generator=g), torch.rand(B, T, Hkv, generator=g)
        with NoHostSync():
            o, lse, lst, cnt = ops.softmax_branch_fwd(q, k, v, rw, C, 0.25)
            ops.softmax_branch_bwd(q, k, v, o, lse, rw, lst, cnt, do, C, 0.25)
            o, final, gcr, A = ops.gdn_branch_fwd(q, k, v, gate, beta, None, C, 0.25)
            ops.gdn_branch_bwd(q, k, v, gate, beta, None, gcr, A, do, final, C, 0.25)

else:

    def test_host_syncs_in_interpreter_subprocess():
        rerun_in_interpreter(__file__)
