"""Helpers shared by the kernel modules: block sizes, the interpreter switch, op registration and the
(head, token) row layout of the query-chunk programs.

Host side
    _pow2(x)          power-of-2 block size >= 16 (tl.dot wants >= 16 rows / columns)
    _hpp(group, C)    q heads per query tile of one KV group, aiming for 128 rows (HPP * C)
    _interp()         True under the Triton interpreter (TRITON_INTERPRET=1: CPU tests)
    cdiv(a, b)        ceil(a / b) by integer arithmetic: also for the SymInts of a fake impl
    register_op(...)  a function as the custom op natsl::<name>, with its fake (shape / dtype) impl and its
                      CUDA kernel replayed as CUDA graphs (graphs.py)
Triton
    _query_rows(...)  rows of a (query chunk, HPP q heads) program: (head, token) pairs
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch
import triton
import triton.language as tl

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2  # exp(x) = exp2(x * LOG2E)


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _hpp(group: int, chunk: int) -> int:
    """q heads per tile: 128 // C rows of each head (at least one head), a divisor of the group."""
    hpp = max(1, 128 // chunk)
    while group % hpp:
        hpp //= 2
    return max(1, hpp)


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a, b):
    """ceil(a / b) for ints and SymInts (triton.cdiv is the same, but not promised for SymInts)."""
    return (a + b - 1) // b


def register_op(name: str, fn: Callable, fake: Callable, *, forward: bool) -> None:
    """Registers `fn` (annotated with the schema types: Tensor, Optional[Tensor], int, float) as the
    custom op `natsl::<name>` (mutates no argument) with `fake` as its fake impl (shapes / dtypes only,
    for torch.compile); on CUDA tensors the op runs `fn` through `graphs.GraphedOp` (its launches replayed as
    CUDA graphs; `forward`: a forward op, graphed in training forwards only). Callers go through
    torch.ops.natsl.<name>. Registered once per process: the same module imported under a second name
    (natsl_hf.modeling.kernels and the source tree's modeling/kernels, as bench scripts do) reuses the first
    registration, which is the same code."""
    from .graphs import GraphedOp

    if hasattr(torch.ops.natsl, name):
        return
    op = torch.library.custom_op(f"natsl::{name}", fn, mutates_args=())
    op.register_fake(fake)
    op.register_kernel("cuda", GraphedOp(name, fn, forward=forward))


@triton.jit
def _query_rows(pid, c, T, HQ, GROUP: tl.constexpr, HPP: tl.constexpr, C: tl.constexpr):
    """Program `pid` of the head axis (B * HQ / HPP of them) for query chunk c: HPP q heads of one
    KV group, rows = (head, token) pairs, HPP * C of them (K/V tiles serve all HPP heads: GQA
    without repeat). -> b (int32), hq0 (first q head), g (KV group), hh [HPP*C] (head of each row,
    from hq0), tq [HPP*C] (token of each row), mq [HPP*C] (tq < T)."""
    nhb = HQ // HPP
    b = pid // nhb
    hq0 = (pid % nhb) * HPP
    g = hq0 // GROUP
    r = tl.arange(0, HPP * C)
    tq = c * C + (r % C)
    return b, hq0, g, r // C, tq, tq < T
