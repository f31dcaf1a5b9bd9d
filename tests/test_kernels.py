"""Kernel path vs the PyTorch reference (modeling/reference.py).

The Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below before triton
is imported) on CPU tensors, fp32, tiny shapes, chunk size 16 (T not a multiple of C, T < C,
GQA ratios 1 and 4, random routes including all-softmax and all-linear, with/without an initial
state). Outputs AND gradients are compared.

Coverage of the GDN branch under the interpreter: our own Triton kernels (_readout_fwd,
_readout_bwd, _dh_bwd, _chunk_bwd) run for real; fla's chunk kernels cannot run under the
interpreter, so the per-chunk states (w, u, h, v_new) and the w/u backward are computed by the
torch stand-ins in gdn_branch.py (_torch_wu, _torch_h, _torch_wu_bwd). The fla path itself is checked
on the GPU by bench/check_and_time.py (bf16 vs reference at T = 4059 and 1000).

If triton was already imported by an earlier test module without the interpreter, the kernel
tests run in a subprocess with TRITON_INTERPRET=1 instead.
"""

from __future__ import annotations

import os
import subprocess
import sys

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_IN_INTERP = os.environ.get("TRITON_INTERPRET") == "1"


def _mods():
    try:
        from natsl_hf.modeling import kernels as K
        from natsl_hf.modeling import reference as R
    except Exception:  # not installed: load from the source tree
        sys.path.insert(0, ROOT)
        from modeling import kernels as K  # type: ignore
        from modeling import reference as R  # type: ignore
    return K, R


def rerun_in_interpreter(path: str) -> None:
    """The tests of `path` in a subprocess with TRITON_INTERPRET=1 (for when triton was imported without it)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", os.path.abspath(path)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


def _close(a, b, tol, what):
    a, b = a.detach().float(), b.detach().float()
    err = (a - b).abs().max().item()
    ref = b.abs().max().item()
    assert err <= tol * max(1.0, ref), f"{what}: max abs err {err:.3e} (ref max {ref:.3e})"


SOFTMAX_CASES = [
    # B, T, Hq, Hkv, D, Dv, C, p
    (2, 50, 4, 1, 16, 32, 16, 0.5),    # GQA 4, T % C != 0
    (1, 40, 2, 2, 32, 16, 16, 0.5),    # GQA 1
    (1, 10, 4, 4, 16, 16, 16, 0.5),    # T < C
    (1, 70, 8, 2, 16, 16, 16, 1.0),    # all softmax
    (1, 70, 8, 2, 16, 16, 16, 0.0),    # all linear
]

GDN_CASES = [
    # B, T, Hq, Hkv, K, V, C, p, with initial state
    (1, 40, 2, 1, 16, 16, 16, 0.5, False),
    (2, 50, 8, 2, 16, 32, 16, 0.5, True),   # GQA 4, T % C != 0
    (1, 10, 2, 2, 16, 16, 16, 0.5, True),   # T < C
    (1, 48, 4, 1, 32, 16, 16, 0.0, True),   # all linear (every complete chunk writes)
    (1, 48, 2, 2, 16, 16, 16, 1.0, False),  # all softmax (no writes)
]


def _softmax_case(B, T, Hq, Hkv, D, Dv, C, p):
    K, R = _mods()
    g = torch.Generator().manual_seed(T * 7 + Hq)
    NC = -(-T // C)
    q = torch.randn(B, T, Hq, D, generator=g, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, generator=g, requires_grad=True)
    v = torch.randn(B, T, Hkv, Dv, generator=g, requires_grad=True)
    rw = (torch.rand(B, NC, Hkv, generator=g) < p).float()
    if 0 < p < 1:  # make sure both kinds occur
        rw[0, 0, 0], rw[0, -1, -1] = 1.0, 0.0
    rw.requires_grad_()
    scale = D ** -0.5
    o = K.routed_softmax_attention(q, k, v, rw, C, scale)
    do = torch.randn(o.shape, generator=g)
    gk = torch.autograd.grad(o, (q, k, v, rw), do)
    o_r = R.routed_softmax_attention(q, k, v, rw, C, scale)
    gr = torch.autograd.grad(o_r, (q, k, v, rw), do)
    _close(o, o_r, 1e-4, "o")
    for n, a, b in zip(["dq", "dk", "dv", "droute"], gk, gr):
        _close(a, b, 1e-4, n)
    # d route is zero on chunks routed linear
    assert (gk[3][rw.detach() == 0] == 0).all()


def _gdn_case(B, T, Hq, Hkv, Kd, V, C, p, h0):
    K, R = _mods()
    g = torch.Generator().manual_seed(T * 11 + Hq)
    NC = -(-T // C)
    q = R.l2norm(torch.randn(B, T, Hq, Kd, generator=g)).requires_grad_()
    k = R.l2norm(torch.randn(B, T, Hkv, Kd, generator=g)).requires_grad_()
    v = torch.randn(B, T, Hkv, V, generator=g, requires_grad=True)
    gate = (-torch.rand(B, T, Hkv, generator=g) * 0.3).requires_grad_()
    m = (torch.rand(B, NC, Hkv, generator=g) < p).float()[:, torch.arange(T) // C]
    tail = torch.ones(B, T, Hkv)
    tail[:, (T // C) * C:] = 0
    beta = (torch.rand(B, T, Hkv, generator=g) * (1 - m) * tail).requires_grad_()
    S0 = torch.randn(B, Hkv, Kd, V, generator=g).mul(0.5).requires_grad_() if h0 else None
    scale = Kd ** -0.5
    ins = [q, k, v, gate, beta] + ([S0] if h0 else [])
    o, st = K.routed_gdn_readout(q, k, v, gate, beta, C, scale, S0)
    do, dst = torch.randn(o.shape, generator=g), torch.randn(st.shape, generator=g)
    gk = torch.autograd.grad((o, st), ins, (do, dst))
    o_r, st_r = R.routed_gdn_readout(q, k, v, gate, beta, C, scale, S0)
    gr = torch.autograd.grad((o_r, st_r), ins, (do, dst))
    _close(o, o_r, 1e-4, "o")
    _close(st, st_r, 1e-4, "open_chunk_state")
    for n, a, b in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], gk, gr):
        _close(a, b, 1e-4, n)


DECODE_CASES = [
    # B, Hq, Hkv, D, Dv, C, kept entries per (row, group) (None: nothing allocated), new token's slot per row
    (2, 8, 2, 16, 32, 16, [[37, 0], [5, 64]], [3, 15]),  # GQA 4, a group with nothing kept
    (1, 2, 2, 32, 16, 16, [[16, 48]], [0]),              # GQA 1, the new token opens its chunk
    (2, 4, 1, 16, 16, 24, None, [0, 23]),                # nothing kept yet, chunk size not a power of 2
    (1, 4, 2, 16, 16, 16, [[600, 130]], [5], 64),        # 10 splits + the open one: the merge takes 2 steps
]


def _decode_case(B, Hq, Hkv, D, Dv, C, kept, slot, programs=8, *, monkeypatch):
    """The decode kernel against the reference softmax branch with a cache prefix (SPEC section 4).
    TARGET_PROGRAMS is set (`programs`) so that these short caches are split across several programs
    (and some splits hold no valid entry); with more than 8, MERGE_TILE is cut to 8 splits a step, so that the
    merge loops over its splits."""
    from importlib import import_module
    K, R = _mods()
    decode = import_module(K.__name__ + ".decode")
    monkeypatch.setattr(decode, "TARGET_PROGRAMS", programs)
    if programs > 8:
        monkeypatch.setattr(decode, "MERGE_TILE", 8 * max(16, Dv))
        nsplit = decode._num_splits(B * Hkv, max(max(row) for row in kept) + 7)[0]
        assert nsplit + 1 > decode._merge_splits(nsplit, max(16, Dv)) == 8
    g = torch.Generator().manual_seed(B * 31 + C)
    kept_len = torch.tensor(kept if kept is not None else [[0] * Hkv] * B)
    L = int(kept_len.max()) + 7 if kept is not None else 0  # allocated beyond the longest (row, group)
    kept_k = torch.randn(B, Hkv, L, D, generator=g)
    kept_v = torch.randn(B, Hkv, L, Dv, generator=g)  # past kept_len: garbage that must not be read
    open_k, open_v = torch.randn(B, C, Hkv, D, generator=g), torch.randn(B, C, Hkv, Dv, generator=g)
    q = torch.randn(B, Hq, D, generator=g)
    slot = torch.tensor(slot)
    seen = 5 * C + slot  # position of the new token
    o = K.routed_decode_attention(q, kept_k, kept_v, kept_len, open_k, open_v, seen, D ** -0.5)
    o_r = R.routed_decode_attention(q, kept_k, kept_v, kept_len, open_k, open_v, seen, D ** -0.5)
    assert o.shape == (B, Hq, Dv)
    _close(o, o_r, 1e-4, "decode o")

GDN_DECODE_CASES = [
    # B, Hq, Hkv, D, C, conv window, each row's position (its open-chunk slot = position % C), real rows
    (3, 4, 2, 16, 4, 4, [0, 7, 13], [True, False, True]),  # GQA 2, slots 0 / 3 / 1, a padding row
    (2, 2, 2, 24, 16, 2, [31, 40], [True, True]),          # head_dim not a power of 2, the chunk's last slot
    (2, 4, 1, 16, 8, 4, [3, 9], [True, True], torch.bfloat16),  # a bf16 model: bf16 inputs and conv window
]


def _gdn_decode_case(B, Hq, Hkv, D, C, W, seen, valid, dtype=torch.float32):
    """The fused GDN decode step against `reference.gdn_decode_step`: the readout and every buffer it updates
    (conv window, open-chunk slot of k~ / g / beta, gdn_run, gdn_decay), random states, in fp32 (the kernel's
    maths) or with a bf16 model's inputs (the reference rounds the conv products to bf16, the kernel not)."""
    import copy
    from importlib import import_module

    K, R = _mods()
    State = import_module(R.__name__.rsplit(".", 1)[0] + ".state").NatslLayerState
    g = torch.Generator().manual_seed(B * 7 + D)
    ch = (Hq + Hkv) * D
    state = State.allocate(batch_size=B, capacity=2 * C, chunk_size=C, num_kv_heads=Hkv, head_dim=D,
                           dtype=dtype, device="cpu", natsl=True, hidden_size=8, conv_size=W, conv_channels=ch)
    for name in ("gdn_k", "gdn_g", "gdn_beta", "gdn_state", "gdn_run", "gdn_decay", "conv_state"):
        getattr(state, name).copy_(torch.randn(getattr(state, name).shape, generator=g) * 0.5)
    state.seen.copy_(torch.tensor(seen))
    args = (torch.randn(B, Hq * D, generator=g), torch.randn(B, Hkv * D, generator=g), torch.randn(B, Hkv, D, generator=g),
            torch.randn(B, Hkv, generator=g) * 3, torch.randn(B, Hkv, generator=g), torch.tensor(valid),
            torch.randn(ch, 1, W, generator=g) * 0.5, torch.randn(Hkv, generator=g), torch.randn(Hkv, generator=g))
    args = tuple(t.to(dtype) if t.is_floating_point() else t for t in args)
    mine, ref = copy.deepcopy(state), copy.deepcopy(state)
    o = K.gdn_decode_step(*args, mine, D ** -0.5)
    o_r = R.gdn_decode_step(*args, ref, D ** -0.5)
    assert o.shape == (B, Hq, D) and o.dtype == torch.float32 and mine.conv_state.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    _close(o, o_r, tol, "gdn decode o")
    for name, t in mine.tensors().items():  # what it updates, and no write into its buffers' other fields
        _close(t, getattr(ref, name), tol, name)
    padding = ~torch.tensor(valid)
    assert torch.equal(mine.conv_state[padding], state.conv_state[padding])  # a padding token leaves the window


CHUNK_CLOSE_CASES = [
    # B, Hkv, D, Dv, C, capacity (tokens), kept_len per (row, head), closing rows, softmax routes, NAtS-L layer
    (3, 2, 16, 16, 4, 12, [[0, 8], [12, 4], [4, 4]], [True, True, False], [[True, False], [True, True], [True, True]],
     True),   # appended / linear / full (overflow to GDN) / a row that closes nothing
    (2, 1, 24, 16, 16, 48, [[32], [0]], [True, True], [[True], [True]], False),  # a full-softmax layer, odd head dim
]


def _chunk_close_case(B, Hkv, D, Dv, C, capacity, kept, closing, softmax, natsl):
    """The fused chunk close against `reference.close_chunk`: kept KV (the valid part and `kept_len`), the
    realised-fraction and overflow counters, the GDN state / run / decay and the router sum, random states."""
    import copy
    from importlib import import_module

    K, R = _mods()
    State = import_module(R.__name__.rsplit(".", 1)[0] + ".state").NatslLayerState
    g = torch.Generator().manual_seed(B * 5 + C)
    state = State.allocate(batch_size=B, capacity=capacity, chunk_size=C, num_kv_heads=Hkv, head_dim=D,
                           dtype=torch.float32, device="cpu", natsl=natsl, hidden_size=40, conv_size=4,
                           conv_channels=8)
    fields = {**state.tensors(), "kept_v": torch.zeros(B, Hkv, capacity + C, Dv), "open_v": torch.zeros(B, C, Hkv, Dv)}
    state = State.of(**fields)  # the value head dim the allocation does not make
    for t in state.tensors().values():
        if t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=g))
    state.kept_len.copy_(torch.tensor(kept))
    state.kept_chunks.copy_(torch.randint(0, 5, (B, Hkv), generator=g))
    state.closed_chunks.copy_(torch.randint(5, 9, (B,), generator=g))
    closing, softmax, routable = torch.tensor(closing), torch.tensor(softmax), torch.tensor([True] * (B - 1) + [False])
    mine, ref = copy.deepcopy(state), copy.deepcopy(state)
    K.close_chunk(mine, closing, softmax, routable)
    R.close_chunk(ref, closing, softmax, routable)
    for name in ("kept_len", "kept_chunks", "closed_chunks", "overflow_chunks"):
        assert torch.equal(getattr(mine, name), getattr(ref, name)), name
    for name in ("kept_k", "kept_v"):  # the scratch slots past the capacity hold nothing to compare
        _close(getattr(mine, name)[:, :, :capacity], getattr(ref, name)[:, :, :capacity], 1e-6, name)
    for name in mine.layout.names:  # the GDN state / run / decay and router sum, and no other write into the buffers
        _close(getattr(mine, name), getattr(ref, name), 1e-5, name)
    assert int(mine.kept_len.sum()) != int(state.kept_len.sum())  # something was appended


if _IN_INTERP:

    @pytest.mark.parametrize("case", CHUNK_CLOSE_CASES)
    def test_close_chunk_interpreter(case):
        _chunk_close_case(*case)

    @pytest.mark.parametrize("case", GDN_DECODE_CASES)
    def test_gdn_decode_step_interpreter(case):
        _gdn_decode_case(*case)

    @pytest.mark.parametrize("case", SOFTMAX_CASES)
    def test_routed_softmax_attention_interpreter(case):
        _softmax_case(*case)

    @pytest.mark.parametrize("case", GDN_CASES)
    def test_routed_gdn_readout_interpreter(case):
        _gdn_case(*case)

    def test_mixed_input_dtypes_interpreter(monkeypatch):
        """The layer hands the kernels mixed dtypes (v from a half-precision projection, the L2-normalised /
        RoPE'd q and k and beta in fp32). Each branch kernel must receive its operands in one dtype (else
        fla's kernels refuse to compile on the GPU): the autocast dtype under autocast, otherwise the
        lowest precision of q/k/v; gradients come back in each input's dtype; values match the reference
        on the inputs rounded to that dtype."""
        K, R = _mods()
        from importlib import import_module
        seen = {}
        for branch, fn in (("softmax_branch", "routed_softmax_attention"), ("gdn_branch", "routed_gdn_readout")):
            mod = import_module(K.__name__ + "." + branch)
            real = getattr(mod, fn)

            def spy(*args, _real=real, _fn=fn):
                seen[_fn] = {a.dtype for a in args[:3]} | ({args[4].dtype} if _fn == "routed_gdn_readout" else set())
                return _real(*args)

            monkeypatch.setattr(mod, fn, spy)
        g = torch.Generator().manual_seed(3)
        B, T, Hq, Hkv, D, C = 1, 40, 4, 2, 16, 16
        q = R.l2norm(torch.randn(B, T, Hq, D, generator=g)).requires_grad_()
        k = R.l2norm(torch.randn(B, T, Hkv, D, generator=g)).requires_grad_()
        v = torch.randn(B, T, Hkv, D, generator=g).half().requires_grad_()
        gate = -torch.rand(B, T, Hkv, generator=g) * 0.3
        beta = torch.rand(B, T, Hkv, generator=g).requires_grad_()
        rw = torch.tensor([1.0, 0.0, 1.0])[None, :, None].expand(B, 3, Hkv).contiguous()
        half = [t.detach().half().float() for t in (q, k, v, beta)]  # the inputs as the kernels see them

        o, _ = K.routed_gdn_readout(q, k, v, gate, beta, C, D ** -0.5)
        assert seen["routed_gdn_readout"] == {torch.float16}
        dq, dv, db = torch.autograd.grad(o.sum(), (q, v, beta))
        assert (dq.dtype, dv.dtype, db.dtype) == (torch.float32, torch.float16, torch.float32)
        o_r, _ = R.routed_gdn_readout(half[0], half[1], half[2], gate, half[3], C, D ** -0.5)
        _close(o, o_r, 2e-3, "gdn o, mixed dtypes")

        o = K.routed_softmax_attention(q, k, v, rw, C, D ** -0.5)
        assert seen["routed_softmax_attention"] == {torch.float16}
        assert torch.autograd.grad(o.float().sum(), q)[0].dtype == torch.float32
        _close(o, R.routed_softmax_attention(half[0], half[1], half[2], rw, C, D ** -0.5), 2e-3,
               "softmax o, mixed dtypes")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert {t.dtype for t in K._one_dtype(q, k, v.float())} == {torch.bfloat16}

    @pytest.mark.parametrize("case", DECODE_CASES)
    def test_routed_decode_attention_interpreter(case, monkeypatch):
        _decode_case(*case, monkeypatch=monkeypatch)

    def test_misaligned_kv_rows_are_refused_with_the_way_out():
        """The forward's TMA descriptors need K/V rows (Hkv * head_dim elements) of a multiple of 16 bytes."""
        K, _ = _mods()
        q, k, v = torch.randn(1, 20, 2, 18), torch.randn(1, 20, 1, 18), torch.randn(1, 20, 1, 18)  # 72-byte rows
        with pytest.raises(ValueError, match="use_kernels=False"):
            K.routed_softmax_attention(q, k, v, torch.ones(1, 2, 1), 16, 18 ** -0.5)

    def test_kernels_available_cpu_interpreter():
        K, _ = _mods()
        assert K.kernels_available(torch.zeros(1))

else:

    def test_kernels_in_interpreter_subprocess():
        rerun_in_interpreter(__file__)


def test_kernels_available_plain_cpu():
    """Without the interpreter a CPU tensor never takes the kernel path."""
    K, _ = _mods()
    if _IN_INTERP:
        pytest.skip("interpreter on: CPU tensors are allowed for the tests")
    assert not K.kernels_available(torch.zeros(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU checks live in bench/check_and_time.py)")
def test_cuda_bf16_against_reference():
    K, R = _mods()
    if _IN_INTERP:
        pytest.skip("interpreter on")
    torch.manual_seed(0)
    B, T, Hq, Hkv, D, C = 1, 300, 8, 2, 64, 64
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    rw = (torch.rand(B, -(-T // C), Hkv, device="cuda") < 0.5).float()
    o = K.routed_softmax_attention(q, k, v, rw, C, D ** -0.5)
    o_r = R.routed_softmax_attention(q.float(), k.float(), v.float(), rw, C, D ** -0.5)
    assert ((o.float() - o_r).norm() / o_r.norm()).item() < 1e-2
