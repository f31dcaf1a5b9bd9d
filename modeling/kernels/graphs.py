"""A training branch op's launches replayed as one CUDA graph per input signature (the host time of a step).

A training step of a small model at a small batch (SmolLM2-135M, 4 x 2048, gradient checkpointing) is host-bound:
the GPU is busy about a quarter of the step, and every NAtS-L layer call spends ~1 ms of host time in the GDN branch
op (fla's Triton launches through their autotune / heuristics wrappers, and ours) and ~0.5 ms in the softmax branch
op (bench/TRAINING_NOTES.md). torch.compile's CUDA graphs (mode="reduce-overhead") would remove that time, but they
fail under the Trainer's non-reentrant activation checkpointing (pytorch/pytorch#154306). `graphed(fn, ...)` captures
the launches of one op call into a CUDA graph instead, one graph per input signature (shapes, strides, dtypes and the
non-tensor arguments), and replays it: the call's tensors are copied into the graph's static inputs, the graph runs as
one launch, and its outputs are cloned out (the next replay overwrites them, and every layer of a model replays the
same graph). At the 135M shape the copies cost ~25 us of GPU time per call, against ~1 ms of host time saved.

When a call is graphed (otherwise it runs eagerly, the same launches):
- CUDA tensors, NATSL_CUDA_GRAPHS not 0 (bench/train_bench.py's A/B), and no capture running on the current stream
  (torch.compile's CUDA graphs or a user's: the launches then join that capture);
- a forward op only inside `graph_scope(True)`, which the NAtS-L layer enters around a training forward (and its
  checkpoint recompute): an inference forward's shapes follow every prompt length, and a graph per length would hold
  its buffers; a backward op is training by nature and always graphed;
- no tensor argument of more than `MAX_ELEMENTS` elements: the launches' host time is fixed (~1 ms a call), the GPU
  time grows with the work, and around 2^25 elements of q (the forward of 8k tokens x 32 heads x 128 on an H200:
  ~1 ms) the GPU time alone covers it, so a larger call's launches hide behind its own kernels and a graph adds only
  its copies and buffers. The SmolLM2 shape at 16 x 2048 (q: 18.9M elements) and the 1B shape at 8k (16.8M) are
  graphed; the 1B shape at 32k (67M) is not (its step is GPU-bound, and at 8k the replays' copies were already ~4 % of
  it: TRAINING_NOTES 2026-12-08). Elements, not bytes: the GDN op takes fp32 q / k and the softmax op bf16 ones
  for the same work;
- from the `WARMUP + 1`-th call of a signature on: the first calls run eagerly, so that Triton compiles and fla's
  autotuners choose their configs there (benchmarking cannot run inside a capture).
A capture that fails leaves its signature eager, with one warning (the results are the same, only slower). At most
`MAX_GRAPHS` signatures per op are kept; the least recently used is dropped.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor

WARMUP = 1  # eager calls of a signature before its capture
MAX_GRAPHS = 8  # signatures kept per op
MAX_ELEMENTS = 2**25  # of the largest tensor argument of a graphed call

_scope = threading.local()


def graphs_enabled() -> bool:
    return os.environ.get("NATSL_CUDA_GRAPHS", "1") not in ("", "0")


@contextlib.contextmanager
def graph_scope(training: bool):
    """Forward ops called inside replay CUDA graphs when `training` (a training forward, which repeats its shapes
    every step); outside any scope, or with training False, they launch their kernels."""
    before = getattr(_scope, "training", False)
    _scope.training = training
    try:
        yield
    finally:
        _scope.training = before


def _clone(out):
    if isinstance(out, Tensor):
        return out.clone()
    return type(out)(_clone(o) for o in out)


class _Graph:
    """One captured call: static inputs (clones of the first captured call's tensors), the graph, its outputs.
    A replay copies each tensor in with `copy_` and clones each output (a cudaMemcpyAsync each). Grouping them into
    one `torch._foreach_copy_` in and out was tried (2026-12-07) and measured slower on an H100: 16 x 2048 87.8k
    against 103.0k tok/s, 4 x 2048 checkpointed not faster (bench/TRAINING_NOTES.md): fewer launches, but (the
    likely cause, not profiled) a multi-tensor kernel moves the 10-100 MB activations slower than a memcpy does."""

    def __init__(self, fn: Callable, args: tuple):
        device = next(a for a in args if isinstance(a, Tensor)).device
        with torch.cuda.device(device):
            self.inputs = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: only this thread's calls can invalidate the capture (the Trainer's other threads, e.g.
            # autograd's device thread or a pin-memory thread, keep working meanwhile)
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = fn(*self.inputs)

    def __call__(self, args: tuple):
        for static, a in zip(self.inputs, args):
            if isinstance(a, Tensor):
                static.copy_(a)
        self.graph.replay()
        return _clone(self.outputs)


def _signature(args: tuple) -> tuple:
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, Tensor) else a for a in args)


class GraphedOp:
    """`fn` (a branch op's implementation: tensors and None / int / float arguments, a tuple of fresh tensors out)
    with its calls replayed as CUDA graphs where the module docstring says: the op's CUDA kernel (`register_op`).
    `forward`: a forward op (graphed only inside `graph_scope(True)`) or a backward op (always). `capture` builds a
    replayable graph of `fn` on `args` (`_Graph`; the tests pass a CPU stand-in)."""

    def __init__(self, name: str, fn: Callable, *, forward: bool, capture: Callable = _Graph):
        self.name, self.fn, self.forward, self.capture = name, fn, forward, capture
        self.graphs: OrderedDict[tuple, object] = OrderedDict()  # signature -> graph, or None: capture failed
        self.calls: dict[tuple, int] = {}  # signature -> eager calls so far

    def wanted(self, args: tuple) -> bool:
        largest = max(a.numel() for a in args if isinstance(a, Tensor))
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        return (graphs_enabled() and (not self.forward or getattr(_scope, "training", False))
                and largest <= MAX_ELEMENTS and not capturing)

    def __call__(self, *args):
        if not self.wanted(args):
            return self.fn(*args)
        key = _signature(args)
        if key not in self.graphs:
            self.calls[key] = self.calls.get(key, 0) + 1
            if self.calls[key] <= WARMUP:
                return self.fn(*args)
            self._add(key, args)
        self.graphs.move_to_end(key)  # the least recently used signature is the one dropped
        graph = self.graphs[key]
        return self.fn(*args) if graph is None else graph(args)

    def _add(self, key: tuple, args: tuple) -> None:
        try:
            graph = self.capture(self.fn, args)
        except Exception as err:  # noqa: BLE001 - any failure of the capture: this signature stays eager
            warnings.warn(f"CUDA graph capture of natsl::{self.name} failed ({type(err).__name__}: {err}): its calls "
                          "of this shape run eagerly (same results, more host time). NATSL_CUDA_GRAPHS=0 skips the "
                          "attempt.", RuntimeWarning, stacklevel=3)
            graph = None
        self.graphs[key] = graph
        self.calls.pop(key, None)
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
