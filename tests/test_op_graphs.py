"""modeling/kernels/graphs.py: when a branch op's call is replayed from a graph, and that a replayed call returns what
the op computes. CUDA graphs need a GPU; here a CPU stand-in "captures" a call as a graph would (static input
buffers, outputs in buffers that every replay overwrites), so that the bookkeeping around it (copy in, clone out,
signatures, warm-up, scope, failure, eviction, the switch) runs as on the GPU. The GPU check of the real graphs is
bench/train_bench.py's `check` section (a training step with NATSL_CUDA_GRAPHS=0 and 1).
"""

from __future__ import annotations

import pytest
import torch

from natsl_hf.modeling.kernels import graphs
from natsl_hf.modeling.kernels.graphs import GraphedOp, graph_scope


class CpuGraph(graphs._Graph):
    """A graph's semantics on the CPU: captured once on clones of the call's tensors; a replay recomputes into the
    same output buffers (a graph writes its outputs to the same memory every time)."""

    captured: list = []

    def __init__(self, fn, args):
        self.fn = fn
        self.inputs = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        self.outputs = fn(*self.inputs)
        self.graph = self
        CpuGraph.captured.append(self)

    def replay(self):
        for static, new in zip(self.outputs, self.fn(*self.inputs)):
            static.copy_(new)


def op(x: torch.Tensor, w, scale: float):
    """A stand-in branch op: two fresh outputs from tensors, an optional tensor and a float."""
    y = x * scale if w is None else x @ w * scale
    return y, y.sum(-1)


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    CpuGraph.captured = []
    monkeypatch.delenv("NATSL_CUDA_GRAPHS", raising=False)


def test_replayed_calls_return_each_calls_own_result():
    g = GraphedOp("test_op", op, forward=False, capture=CpuGraph)
    w = torch.randn(8, 8)
    xs = [torch.randn(2, 5, 8) for _ in range(4)]
    outs = [g(x, w, 0.5) for x in xs]
    assert len(CpuGraph.captured) == 1  # the first call eager (warm-up), the second captured, the rest replayed
    for x, (y, s) in zip(xs, outs):  # nothing stale (inputs copied in) and nothing overwritten (outputs cloned out)
        ref_y, ref_s = op(x, w, 0.5)
        torch.testing.assert_close(y, ref_y)
        torch.testing.assert_close(s, ref_s)
    assert outs[2][0].data_ptr() != outs[3][0].data_ptr()


def test_a_signature_is_the_shapes_strides_dtypes_and_the_other_arguments():
    g = GraphedOp("test_op", op, forward=False, capture=CpuGraph)
    w = torch.randn(8, 8)
    calls = [(torch.randn(2, 5, 8), w, 0.5), (torch.randn(2, 6, 8), w, 0.5), (torch.randn(2, 5, 8), w, 0.25),
             (torch.randn(2, 5, 8), None, 0.5), (torch.randn(2, 5, 8).double(), w.double(), 0.5),
             (torch.randn(2, 8, 5).transpose(1, 2), w, 0.5)]
    for args in calls:
        for _ in range(3):
            torch.testing.assert_close(g(*args), op(*args))
    assert len(CpuGraph.captured) == len(calls) == len(g.graphs)


def test_forward_ops_are_graphed_in_training_scope_only_backward_ops_always():
    fwd = GraphedOp("test_fwd", op, forward=True, capture=CpuGraph)
    bwd = GraphedOp("test_bwd", op, forward=False, capture=CpuGraph)
    x = torch.randn(2, 5, 8)
    for _ in range(3):
        fwd(x, None, 1.0)
        with graph_scope(False):  # an inference forward
            fwd(x, None, 1.0)
    assert not CpuGraph.captured
    for _ in range(3):
        bwd(x, None, 1.0)
    assert len(CpuGraph.captured) == 1
    with graph_scope(True):  # a training forward
        for _ in range(3):
            fwd(x, None, 1.0)
        with graph_scope(False):  # scopes nest and restore
            pass
        assert fwd.wanted((x, None, 1.0))
    assert not fwd.wanted((x, None, 1.0)) and len(CpuGraph.captured) == 2


def test_no_graphs_when_switched_off_or_for_large_calls(monkeypatch):
    g = GraphedOp("test_op", op, forward=False, capture=CpuGraph)
    big = torch.randn(1, graphs.MAX_ELEMENTS + 1, 1)  # one element over the bound
    for _ in range(3):
        g(big, None, 1.0)
    at_bound = torch.randn(2, graphs.MAX_ELEMENTS // 2, 1, dtype=torch.bfloat16)  # exactly the bound: graphed
    assert g.wanted((at_bound, None, 1.0)) and not g.wanted((big, None, 1.0))
    monkeypatch.setenv("NATSL_CUDA_GRAPHS", "0")
    for _ in range(3):
        g(torch.randn(2, 5, 8), None, 1.0)
    assert not CpuGraph.captured


def test_a_failed_capture_leaves_the_signature_eager_with_one_warning():
    def broken(fn, args):
        raise RuntimeError("operation not permitted when stream is capturing")

    g = GraphedOp("test_op", op, forward=False, capture=broken)
    x = torch.randn(2, 5, 8)
    g(x, None, 1.0)
    with pytest.warns(RuntimeWarning, match="NATSL_CUDA_GRAPHS=0"):
        out = g(x, None, 1.0)
    torch.testing.assert_close(out, op(x, None, 1.0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt, no second warning
        torch.testing.assert_close(g(x, None, 1.0), op(x, None, 1.0))


def test_at_most_max_graphs_signatures_are_kept_the_least_recently_used_dropped():
    g = GraphedOp("test_op", op, forward=False, capture=CpuGraph)
    first = torch.randn(1, 1, 4)
    for n in range(graphs.MAX_GRAPHS + 2):
        x = torch.randn(1, n + 1, 4)
        for _ in range(2):
            g(x, None, 1.0)
        g(first, None, 1.0)  # the first signature stays in use
    assert len(g.graphs) == graphs.MAX_GRAPHS and len(CpuGraph.captured) == graphs.MAX_GRAPHS + 2
    assert sorted(k[0][0][1] for k in g.graphs) == [1, *range(4, graphs.MAX_GRAPHS + 3)]  # T = 2, 3 were dropped
