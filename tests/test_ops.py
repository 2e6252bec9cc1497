"""The public op layer (``dsa.ops``): agreement with the reference, gradients, dispatch, compile, FlashMLA shim.

Kernel-free: the TileLang path is exercised with spy launchers (fake ``dsa.launch.*`` modules that record the call
and delegate to the reference), so these tests check the op layer's routing and autograd, not the kernels.
"""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Callable

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from benchmarks import problems
from dsa import autograd, compat, hardware, ops, reference, testing
from dsa.testing import assert_close, assert_topk_valid
from tests import layouts
from tests.strategies import AttentionShape

SM_SCALE = 0.37


@pytest.fixture(autouse=True)
def _fresh_hardware_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSA_BACKEND", raising=False)
    hardware.reset_caches()
    yield
    hardware.reset_caches()


SMALL = AttentionShape(batch=2, seq=5, seq_kv=9, heads=3, d_qk=12, d_v=8, topk=6)
"""The sizes of most tests here (``d_v`` is each test's own)."""


def _attention_inputs(
    dtype: torch.dtype, shape: AttentionShape = SMALL, *, seed: int = 0, grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq, seq_kv, heads, d_qk, top = shape.batch, shape.seq, shape.seq_kv, shape.heads, shape.d_qk, shape.topk
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, d_qk, generator=g).to(dtype)
    kv = torch.randn(batch, seq_kv, d_qk, generator=g).to(dtype)
    # -1 and >= S_kv are invalid; duplicates occur; one row is entirely invalid.
    indices = torch.randint(-1, seq_kv + 2, (batch, seq, top), generator=g, dtype=torch.int32)
    indices[0, 0] = -1
    if grad:
        q.requires_grad_(True)
        kv.requires_grad_(True)
    return q, kv, indices


def _indexer_inputs(
    dtype: torch.dtype, *, batch: int = 2, seq: int = 6, heads: int = 3, dim: int = 8, seq_kv: int = 9, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, dim, generator=g).to(dtype)
    k = torch.randn(batch, seq_kv, dim, generator=g).to(dtype)
    w = torch.randn(batch, seq, heads, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return q, k, w


# --------------------------------------------------------------------------------------------------------------------
# Values and gradients against the reference
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_sink", [False, True])
def test_sparse_mla_matches_reference_values_and_grads(dtype: torch.dtype, with_sink: bool) -> None:
    q, kv, indices = _attention_inputs(dtype, grad=True)
    topk_length = torch.randint(0, indices.shape[-1] + 1, indices.shape[:2], dtype=torch.int32)
    sink = torch.randn(q.shape[2], requires_grad=True) if with_sink else None
    kwargs = dict(sm_scale=SM_SCALE, d_v=8, topk_length=topk_length, attn_sink=sink)
    out, lse = ops.sparse_mla(q, kv, indices, **kwargs)
    ref_out, ref_lse = reference.sparse_mla(q, kv, indices, **kwargs)
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=1e-6)
    assert_close(out, ref_out, name="out", **tol)
    assert_close(lse, ref_lse, name="lse", **tol)
    gen = torch.Generator().manual_seed(1)
    d_out = torch.randn(out.shape, generator=gen).to(dtype)
    # A finite gradient for lse (its -inf entries, empty rows, are masked out of the loss below).
    d_lse = torch.randn(lse.shape, generator=gen, dtype=lse.dtype)
    inputs = (q, kv) + ((sink,) if with_sink else ())
    for outputs, ref_outputs, grad_outputs in (
        ((out,), (ref_out,), (d_out,)),  # the usual loss: out only
        ((lse,), (ref_lse,), (d_lse,)),  # lse only (d_out is then zero)
        ((out, lse), (ref_out, ref_lse), (d_out, d_lse)),
    ):
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True)
        ref_grads = torch.autograd.grad(ref_outputs, inputs, grad_outputs, retain_graph=True)
        for name, got, want in zip(("dq", "dkv", "d_sink"), grads, ref_grads):
            assert got.dtype == want.dtype, name
            assert_close(got, want, name=f"{name} from {len(outputs)} output(s)", **tol)


@pytest.mark.parametrize("backend", [None, "tilelang"])
def test_float16_runs_the_reference_at_float32_accuracy(monkeypatch: pytest.MonkeyPatch, backend: str | None) -> None:
    """float16 inputs (what many Ampere/Ada users hold) are accepted by every op and run the reference, even with
    ``DSA_BACKEND=tilelang`` (the kernels take bf16/FP8 only): ``out`` is float16 and matches the float32 computation
    on the same values to float16 rounding, ``lse`` and the indexer's scores are float32, gradients are float16."""
    spies = _install_spies(monkeypatch)
    if backend is not None:
        monkeypatch.setenv("DSA_BACKEND", backend)
    q, kv, indices = _attention_inputs(torch.float16, grad=True)
    out, lse = ops.sparse_mla(q, kv, indices, sm_scale=SM_SCALE, d_v=8)
    want_out, want_lse = reference.sparse_mla(q.detach().float(), kv.detach().float(), indices, sm_scale=SM_SCALE, d_v=8)
    assert (out.dtype, lse.dtype) == (torch.float16, torch.float32)
    assert_close(out.float(), want_out, name="out", atol=2e-3, rtol=2e-3, max_diff=1e-5)
    assert_close(lse, want_lse, name="lse", atol=1e-5, rtol=1e-5)
    out.float().sum().backward()
    assert q.grad.dtype == kv.grad.dtype == torch.float16 and torch.isfinite(q.grad).all()
    qi, ki, w = _indexer_inputs(torch.float16)
    scores = ops.index_scores(qi, ki, w)
    assert scores.dtype == torch.float32
    assert_close(scores, reference.index_scores(qi.float(), ki.float(), w), name="scores", atol=1e-5, rtol=1e-5)
    kernel_calls = {name: len(spy.calls) for name, spy in spies.items() if name != "topk_indices"}
    assert kernel_calls == {"index_scores": 0, "index_topk": 0, "sparse_mla_fwd": 0, "sparse_mla_bwd": 0}


def test_sparse_mla_gradcheck() -> None:
    shape = AttentionShape(batch=2, seq=3, seq_kv=5, heads=2, d_qk=6, d_v=4, topk=4)
    q, kv, indices = _attention_inputs(torch.float64, shape, grad=True)
    sink = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, s: ops.sparse_mla(a, b, indices, sm_scale=SM_SCALE, d_v=4, attn_sink=s)[0], (q, kv, sink)
    )
    # Through lse as well; row (0, 0) is empty (lse = -inf), so only its finite entries enter the checked output.
    finite = torch.isfinite(ops.sparse_mla(q, kv, indices, sm_scale=SM_SCALE, d_v=4, attn_sink=sink)[1])
    assert torch.autograd.gradcheck(
        lambda a, b, s: ops.sparse_mla(a, b, indices, sm_scale=SM_SCALE, d_v=4, attn_sink=s)[1][finite], (q, kv, sink)
    )


@pytest.mark.parametrize("ranged", [False, True])
def test_index_scores_matches_reference_values_and_grads(ranged: bool) -> None:
    q, k, w = _indexer_inputs(torch.float64)
    starts = ends = None
    if ranged:
        starts = torch.randint(0, 4, q.shape[:2], dtype=torch.int32)
        ends = starts + torch.randint(0, 6, q.shape[:2], dtype=torch.int32)
    for t in (q, k, w):
        t.requires_grad_(True)
    scores = ops.index_scores(q, k, w, starts=starts, ends=ends)
    ref = reference.index_scores(q, k, w, starts=starts, ends=ends)
    assert_close(scores, ref, atol=1e-12, rtol=1e-12, name="scores")
    # The upstream gradient is NaN at invisible (-inf) positions: they must receive nothing.
    d_scores = torch.randn(scores.shape, dtype=scores.dtype).masked_fill(torch.isneginf(ref), float("nan"))
    grads = torch.autograd.grad(scores, (q, k, w), d_scores)
    ref_grads = torch.autograd.grad(ref, (q, k, w), torch.nan_to_num(d_scores, nan=0.0))
    for name, got, want in zip(("dq", "dk", "dweights"), grads, ref_grads):
        assert_close(got, want, atol=1e-10, rtol=1e-10, name=name)


def test_index_scores_gradcheck() -> None:
    q, k, w = _indexer_inputs(torch.float64, seq=4, heads=2, dim=4, seq_kv=5)
    for t in (q, k, w):
        t.requires_grad_(True)
    visible = torch.isfinite(reference.index_scores(q.detach(), k.detach(), w.detach()))
    # gradcheck needs finite outputs: compare on the visible positions only.
    assert torch.autograd.gradcheck(lambda a, b, c: ops.index_scores(a, b, c)[visible], (q, k, w))


def test_index_scores_grad_dtypes_bf16_and_fp8() -> None:
    q, k, w = _indexer_inputs(torch.bfloat16)
    for t in (q, k, w):
        t.requires_grad_(True)
    scores = ops.index_scores(q, k, w)
    dq, dk, dw = torch.autograd.grad(scores, (q, k, w), torch.ones_like(scores))
    assert (dq.dtype, dk.dtype, dw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    # FP8: weights still get a gradient (equal to the reference's); q and k get none.
    q8, k8 = q.detach().to(torch.float8_e4m3fn), k.detach().to(torch.float8_e4m3fn)
    k_scale = torch.rand(k.shape[:2]) + 0.5
    w2 = w.detach().clone().requires_grad_(True)
    scores8 = ops.index_scores(q8, k8, w2, k_scale=k_scale)
    (dw8,) = torch.autograd.grad(scores8, (w2,), torch.ones_like(scores8))
    w3 = w.detach().clone().requires_grad_(True)
    ref8 = reference.index_scores(q8, k8, w3, k_scale=k_scale)
    (ref_dw8,) = torch.autograd.grad(ref8.masked_fill(torch.isneginf(ref8), 0.0), (w3,), torch.ones_like(ref8))
    assert_close(dw8, ref_dw8, atol=1e-4, rtol=1e-5, name="dweights fp8")


@given(k=st.integers(1, 12), seed=st.integers(0, 2**16))
@example(k=12, seed=0)  # k > S_kv: -1 padding
def test_topk_indices_contract(k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 4, 9, generator=g)
    scores[0, 1, ::2] = float("-inf")
    indices = ops.topk_indices(scores, k)
    assert_topk_valid(scores, indices, k)


def test_topk_indices_detaches_differentiable_scores() -> None:
    q, k, w = _indexer_inputs(torch.float32)
    w.requires_grad_(True)
    indices = ops.topk_indices(ops.index_scores(q, k, w), 3)
    assert indices.dtype == torch.int32 and not indices.requires_grad


# --------------------------------------------------------------------------------------------------------------------
# Validation happens before dispatch
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda q, kv, i: (q, kv, i.to(torch.int64)), TypeError),
        (lambda q, kv, i: (q, kv.float(), i), TypeError),
        (lambda q, kv, i: (q[0], kv, i), ValueError),
        (lambda q, kv, i: (q, kv[:, :, :-1], i), ValueError),
    ],
)
def test_sparse_mla_rejects_bad_input_before_any_launch(
    monkeypatch: pytest.MonkeyPatch, mutate: Callable, error: type[Exception]
) -> None:
    spies = _install_spies(monkeypatch)
    monkeypatch.setenv("DSA_BACKEND", "tilelang")
    q, kv, indices = mutate(*_attention_inputs(torch.bfloat16))
    with pytest.raises(error):
        ops.sparse_mla(q, kv, indices, sm_scale=SM_SCALE, d_v=8)
    assert not any(spy.calls for spy in spies.values())


@pytest.mark.parametrize("layout", [k for k in layouts.LAYOUTS if k != "row_major"])
def test_kernel_backend_gets_strided_inputs_laid_out_once(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """A strided input (transposed, sliced, expanded, misaligned) is accepted on both backends, with the same result;
    the kernel path receives every tensor row-major and aligned, and an input already so laid out is passed as the
    same object (no copy). Before the fix the kernel backend raised ``q must be contiguous``."""
    spies = _install_spies(monkeypatch)
    q, kv, indices = _attention_inputs(torch.bfloat16)
    topk_length = torch.randint(0, indices.shape[-1] + 1, indices.shape[:2], dtype=torch.int32)
    sink = torch.randn(q.shape[2])
    args = {"q": q, "kv": kv, "indices": indices, "topk_length": topk_length, "attn_sink": sink}
    strided = {name: layouts.relaid(t, layout) for name, t in args.items()}
    plain = {name: t.clone(memory_format=torch.contiguous_format) for name, t in strided.items()}

    def run(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        call = dict(inputs)
        return ops.sparse_mla(call.pop("q"), call.pop("kv"), call.pop("indices"), sm_scale=SM_SCALE, d_v=8, **call)

    want = run(plain)
    for got in (run(strided), None):  # the reference backend, then the kernels' (spied)
        if got is None:
            monkeypatch.setenv("DSA_BACKEND", "tilelang")
            got = run(strided)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    (passed_args, passed_kwargs), = spies["sparse_mla_fwd"].calls
    passed = dict(zip(("q", "kv", "indices"), passed_args), **passed_kwargs)
    for name in args:
        assert layouts.is_row_major_and_aligned(passed[name]), name
        if layouts.is_row_major_and_aligned(strided[name]):
            assert passed[name] is strided[name], f"{name} was copied although the kernels could read it"
    spies["sparse_mla_fwd"].calls.clear()
    run(plain)
    (passed_args, _), = spies["sparse_mla_fwd"].calls
    assert passed_args[0] is plain["q"] and passed_args[1] is plain["kv"] and passed_args[2] is plain["indices"]


# --------------------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------------------


class _Spy:
    """A launcher function stand-in: records each call and returns the reference's result."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.calls: list[tuple] = []

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


def _reference_bwd(  # noqa: ANN202
    q, kv, out, lse, d_out, indices, *, sm_scale, d_v, topk_length=None, attn_sink=None, d_lse=None,  # noqa: ANN001
    ranged=False,  # noqa: ANN001
):
    assert not ranged  # the routing tests pass index lists
    return autograd.sparse_mla_bwd_impl(
        q, kv, out, lse, d_out, indices, sm_scale, d_v, topk_length, attn_sink, d_lse, hardware.REFERENCE
    )


def _install_spies(monkeypatch: pytest.MonkeyPatch) -> dict[str, _Spy]:
    """Replace the five launcher modules with spies that delegate to the reference (for routing tests: which
    implementation an op reaches, and what it passes; the kernels themselves are tested by ``count_launches``
    users and the kernel test modules)."""

    def fwd(q, kv, indices, *, sm_scale, d_v, topk_length=None, attn_sink=None):  # noqa: ANN001, ANN202
        with torch.no_grad():
            return reference.sparse_mla(
                q, kv, indices, sm_scale=sm_scale, d_v=d_v, topk_length=topk_length, attn_sink=attn_sink
            )

    def fused(q, k, w, topk, *, planned, **kw):  # noqa: ANN001, ANN202
        assert planned == _FUSED_PLAN  # the library runs the plan it made
        return reference.index_topk(q, k, w, topk, **kw, return_scores=True)

    spies = {
        "index_scores": _Spy(lambda q, k, w, **kw: reference.index_scores(q, k, w, **kw)),
        "topk_indices": _Spy(reference.topk_indices),
        "index_topk": _Spy(fused),
        "sparse_mla_fwd": _Spy(fwd),
        "sparse_mla_bwd": _Spy(_reference_bwd),
    }
    for module, fn in LAUNCHERS.items():
        # The fused selection's launcher also plans (None: its buffers do not fit): here they always do.
        extra = {"plan": lambda q, seq_kv, topk, *, ranged: _FUSED_PLAN} if fn == "index_topk" else {}
        monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(**{fn: spies[fn]}, **extra))
    return spies


_FUSED_PLAN = "fused-plan"  # what the spy fused launcher's plan() returns

LAUNCHERS = {
    "dsa.launch.indexer": "index_scores",
    "dsa.launch.topk": "topk_indices",
    "dsa.launch.index_topk": "index_topk",
    "dsa.launch.sparse_mla_fwd": "sparse_mla_fwd",
    "dsa.launch.sparse_mla_bwd": "sparse_mla_bwd",
}


def count_launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the calls of the five real launchers (wrapped, not replaced: the kernels still run); returns the live
    counts by launcher function name."""
    import importlib

    counts = dict.fromkeys(LAUNCHERS.values(), 0)
    for module_name, fn_name in LAUNCHERS.items():
        module = importlib.import_module(module_name)
        real = getattr(module, fn_name)

        def counted(*args, _real=real, _name=fn_name, **kwargs):  # noqa: ANN002, ANN003, ANN202
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, fn_name, counted)
    return counts


def _run_all_ops(dtype: torch.dtype) -> None:
    q, kv, indices = _attention_inputs(dtype, grad=True)
    out, _ = ops.sparse_mla(q, kv, indices, sm_scale=SM_SCALE, d_v=8)
    out.float().sum().backward()
    qi, ki, w = _indexer_inputs(dtype)
    ops.topk_indices(ops.index_scores(qi, ki, w), 3)
    ops.index_topk(qi, ki, w, 3)


@pytest.mark.parametrize(
    "backend, dtype, expect_kernels",
    [
        (None, torch.bfloat16, False),  # auto on CPU: reference
        ("auto", torch.bfloat16, False),
        ("reference", torch.bfloat16, False),
        ("tilelang", torch.bfloat16, True),  # CPU + tilelang: the C-target kernels
        ("tilelang", torch.float32, False),  # float32 always runs the reference
    ],
)
def test_dispatch_honours_dsa_backend(
    monkeypatch: pytest.MonkeyPatch, backend: str | None, dtype: torch.dtype, expect_kernels: bool
) -> None:
    spies = _install_spies(monkeypatch)
    if backend is not None:
        monkeypatch.setenv("DSA_BACKEND", backend)
    _run_all_ops(dtype)
    called = {name: len(spy.calls) for name, spy in spies.items()}
    if expect_kernels:
        # float32 scores reach the top-k kernel even though bf16 attention inputs produced them.
        assert called == dict.fromkeys(("index_scores", "topk_indices", "index_topk", "sparse_mla_fwd", "sparse_mla_bwd"), 1)
    else:
        topk_calls = 1 if backend == "tilelang" else 0  # the indexer's float32 scores are kernel input for top-k
        assert called == {
            "index_scores": 0, "topk_indices": topk_calls, "index_topk": 0, "sparse_mla_fwd": 0, "sparse_mla_bwd": 0
        }  # fmt: skip


def test_kernel_path_results_flow_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the launcher returns is what the op returns (no reference recomputation behind its back)."""
    spies = _install_spies(monkeypatch)
    monkeypatch.setenv("DSA_BACKEND", "tilelang")
    sentinel = (torch.full((2, 5, 3, 8), 7.0, dtype=torch.bfloat16), torch.full((2, 5, 3), 3.0))
    spies["sparse_mla_fwd"].fn = lambda *a, **k: sentinel
    q, kv, indices = _attention_inputs(torch.bfloat16)
    out, lse = ops.sparse_mla(q, kv, indices, sm_scale=SM_SCALE, d_v=8)
    assert out is sentinel[0] and lse is sentinel[1]
    args, kwargs = spies["sparse_mla_fwd"].calls[0]
    assert kwargs == dict(sm_scale=SM_SCALE, d_v=8, topk_length=None, attn_sink=None)


def test_bad_backend_value_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSA_BACKEND", "triton")
    q, kv, indices = _attention_inputs(torch.bfloat16)
    with pytest.raises(ValueError, match="DSA_BACKEND"):
        ops.sparse_mla(q, kv, indices, sm_scale=SM_SCALE, d_v=8)


# --------------------------------------------------------------------------------------------------------------------
# torch.compile and the registered custom ops
# --------------------------------------------------------------------------------------------------------------------


class _OpsModule(torch.nn.Module):
    """Indexer scores -> top-k -> sparse attention, with learnable projections on both paths; the second output
    uses the attention's lse, so the compiled backward carries a d_lse too."""

    def __init__(self, d_qk: int = 12, heads: int = 3, index_heads: int = 2, index_dim: int = 8) -> None:
        super().__init__()
        self.heads, self.index_heads, self.index_dim = heads, index_heads, index_dim
        self.q = torch.nn.Linear(d_qk, heads * d_qk, bias=False)
        self.iq = torch.nn.Linear(d_qk, index_heads * index_dim, bias=False)
        self.ik = torch.nn.Linear(d_qk, index_dim, bias=False)
        self.iw = torch.nn.Linear(d_qk, index_heads, bias=False)
        self.sink = torch.nn.Parameter(torch.randn(heads))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, d = x.shape
        scores = ops.index_scores(
            self.iq(x).view(b, s, self.index_heads, self.index_dim), self.ik(x), self.iw(x).float()
        )
        indices = ops.topk_indices(scores, 4)
        q = self.q(x).view(b, s, self.heads, d)
        out, lse = ops.sparse_mla(q, x, indices, sm_scale=SM_SCALE, d_v=8, attn_sink=self.sink)
        # Every row sees itself (causal scores), so lse is finite; its gradient reaches q and x through d_lse.
        return out, torch.logsumexp(scores, dim=-1) + lse.sum(dim=-1)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend: str) -> None:
    """The ops compile with ``fullgraph=True`` (custom ops with fakes) under Inductor, the default backend, which
    generates C++ for the CPU, and under aot_eager; values and every gradient match eager."""
    torch.manual_seed(0)
    module = _OpsModule()
    x = torch.randn(2, 7, 12, requires_grad=True)

    def run(fn: Callable) -> list[torch.Tensor]:
        module.zero_grad(set_to_none=True)
        x.grad = None
        out, index_lse = fn(x)
        (out.square().sum() + index_lse.sum()).backward()
        return [out.detach(), index_lse.detach(), x.grad.clone()] + [p.grad.clone() for p in module.parameters()]

    eager = run(module)
    torch._dynamo.reset()
    compiled = run(torch.compile(module, fullgraph=True, backend=backend))
    for i, (a, b) in enumerate(zip(compiled, eager)):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name=f"tensor {i}")


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_graph_runs_the_c_target_kernels_through_the_custom_ops(
    monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """bf16 under ``DSA_BACKEND=tilelang`` on the CPU: the compiled forward and backward reach every real launcher
    (C-target kernels, counted, none replaced) through the ``dsa::*`` ops, and match eager through the same kernels.
    (Against the reference backend a near-tie of float scores may round differently in the kernel's accumulation
    order; exact ties are broken the same way by both, which ``tests/test_index_topk.py`` checks on integer-valued
    inputs.)"""
    launches = count_launches(monkeypatch)
    monkeypatch.setenv("DSA_BACKEND", "tilelang")
    torch.manual_seed(0)
    module = _OpsModule().bfloat16()
    module.sink.data = module.sink.data.float()  # attn_sink is float32 by contract
    x = torch.randn(2, 7, 12).bfloat16()
    torch._dynamo.reset()
    out, index_lse = torch.compile(module, fullgraph=True, backend=backend)(x)
    (out.float().square().sum() + index_lse.sum()).backward()
    # The module scores with index_scores and selects with topk_indices: the fused selection is not on its path.
    assert launches == {**dict.fromkeys(launches, 1), "index_topk": 0}, launches
    eager_out, eager_lse = module(x)
    assert_close(out, eager_out, atol=1e-2, rtol=1e-2)
    assert_close(index_lse, eager_lse, atol=1e-2, rtol=1e-2, name="index_lse")


def test_registered_ops_have_fakes_and_run() -> None:
    q, kv, indices = _attention_inputs(torch.float32)
    out, lse = torch.ops.dsa.sparse_mla(q, kv, indices, SM_SCALE, 8, None, None, "reference")
    ref_out, ref_lse = reference.sparse_mla(q, kv, indices, sm_scale=SM_SCALE, d_v=8)
    assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    assert_close(lse, ref_lse, atol=1e-6, rtol=1e-6, name="lse")
    for op in ("index_scores", "index_scores_bwd", "topk_indices", "sparse_mla", "sparse_mla_sources_bwd"):
        checks = ("test_schema", "test_faketensor")
        torch.library.opcheck(getattr(torch.ops.dsa, op), _opcheck_args(op), test_utils=checks)


def _opcheck_args(op: str) -> tuple:
    q, kv, indices = _attention_inputs(torch.float32)
    qi, ki, w = _indexer_inputs(torch.float32)
    scores = reference.index_scores(qi, ki, w)
    out, lse = reference.sparse_mla(q, kv, indices, sm_scale=SM_SCALE, d_v=8)
    return {
        "index_scores": (qi, ki, w, None, None, None, "reference"),
        "index_scores_bwd": (qi, ki, w, None, None, None, torch.randn_like(scores), True),
        "topk_indices": (scores, 3, "reference"),
        "sparse_mla": (q, kv, indices, SM_SCALE, 8, None, None, "reference"),
        "sparse_mla_sources_bwd": (
            q, kv, indices, None, None, None, None, False, False, out, lse, torch.randn_like(out), SM_SCALE, 8, None,
            torch.randn_like(lse), "reference",
        ),
    }[op]


# --------------------------------------------------------------------------------------------------------------------
# FlashMLA compatibility shim
# --------------------------------------------------------------------------------------------------------------------


def _flashmla_oracle(q, kv, indices, sm_scale, d_v, attn_sink=None, topk_length=None):  # noqa: ANN001, ANN202
    """FlashMLA's tests/ref.py semantics written independently (natural log, +inf lse for empty rows)."""
    s_q, h_q, d_qk = q.shape
    s_kv = kv.shape[0]
    idx = indices[:, 0].to(torch.int64).clone()
    if topk_length is not None:
        idx[torch.arange(idx.shape[-1]).view(1, -1) >= topk_length.view(-1, 1)] = -1
    invalid = (idx < 0) | (idx >= s_kv)
    gathered = kv[:, 0][idx.clamp(0, s_kv - 1)].double()  # [s_q, topk, d_qk]
    p = torch.einsum("shd,skd->shk", q.double(), gathered) * sm_scale
    p = p.masked_fill(invalid.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(p, dim=-1)
    max_logits = p.max(dim=-1).values
    lse_for_o = lse if attn_sink is None else torch.logaddexp(lse, attn_sink.double().view(1, -1))
    lse_for_o = lse_for_o.masked_fill(torch.isneginf(lse_for_o), float("inf"))
    out = torch.einsum("shk,skd->shd", torch.exp(p - lse_for_o.unsqueeze(-1)), gathered[..., :d_v])
    return out, max_logits, lse.masked_fill(torch.isneginf(lse), float("inf"))


@pytest.mark.parametrize("with_extras", [False, True])
def test_flash_mla_sparse_fwd_matches_flashmla_semantics(with_extras: bool) -> None:
    g = torch.Generator().manual_seed(3)
    s_q, h_q, d_qk, s_kv, top, d_v = 6, 4, 16, 11, 5, 8
    q = torch.randn(s_q, h_q, d_qk, generator=g).bfloat16()
    kv = torch.randn(s_kv, 1, d_qk, generator=g).bfloat16()
    indices = torch.randint(-1, s_kv + 3, (s_q, 1, top), generator=g, dtype=torch.int32)
    indices[2] = -1  # an empty row
    indices[3, 0, :2] = s_kv  # >= s_kv is invalid too
    sink = torch.randn(h_q, generator=g) if with_extras else None
    topk_length = torch.randint(0, top + 1, (s_q,), generator=g, dtype=torch.int32) if with_extras else None
    out, max_logits, lse = compat.flash_mla_sparse_fwd(q, kv, indices, SM_SCALE, d_v, sink, topk_length)
    ref_out, ref_max, ref_lse = _flashmla_oracle(q, kv, indices, SM_SCALE, d_v, sink, topk_length)
    assert out.shape == (s_q, h_q, d_v) and out.dtype == torch.bfloat16
    assert max_logits.dtype == lse.dtype == torch.float32
    assert torch.isposinf(lse[2]).all() and torch.isneginf(max_logits[2]).all() and (out[2] == 0).all()
    assert_close(out, ref_out, atol=1e-2, rtol=1e-2, name="out")
    assert_close(max_logits, ref_max, atol=1e-5, rtol=1e-5, name="max_logits")
    assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5, name="lse")
    # The native op agrees (its empty-row lse is -inf rather than +inf).
    native_out, native_lse = ops.sparse_mla(
        q.unsqueeze(0), kv.squeeze(1).unsqueeze(0), indices.squeeze(1).unsqueeze(0), sm_scale=SM_SCALE, d_v=d_v,
        topk_length=None if topk_length is None else topk_length.unsqueeze(0), attn_sink=sink,
    )
    assert torch.equal(out, native_out.squeeze(0))
    assert torch.equal(lse, native_lse.squeeze(0).masked_fill(torch.isneginf(native_lse.squeeze(0)), float("inf")))
    # base2=True reproduces FlashMLA's first sparse release (log2 units).
    _, max2, lse2 = compat.flash_mla_sparse_fwd(q, kv, indices, SM_SCALE, d_v, sink, topk_length, base2=True)
    assert_close(lse2, lse * math.log2(math.e), atol=1e-5, rtol=1e-6, name="lse base 2")
    assert_close(max2, max_logits * math.log2(math.e), atol=1e-5, rtol=1e-6, name="max_logits base 2")


def test_flash_mla_sparse_fwd_rejects_multiple_kv_heads() -> None:
    q = torch.randn(2, 2, 8).bfloat16()
    with pytest.raises(ValueError, match="h_kv = 1"):
        compat.flash_mla_sparse_fwd(q, torch.randn(4, 2, 8).bfloat16(), torch.zeros(2, 2, 3, dtype=torch.int32), 0.1, 4)


# --------------------------------------------------------------------------------------------------------------------
# Real launchers, when present (TileLang C target)
# --------------------------------------------------------------------------------------------------------------------


def _launcher_or_skip(name: str) -> None:
    try:
        autograd.launcher(name)
    except ImportError as exc:
        pytest.skip(f"{name} not available: {exc}")


# Static parameters shared with the kernel tests where possible, so TileLang's disk cache serves most compiles:
# sparse MLA (3 heads, d_qk 80, d_v 64, no topk_length/sink) as in test_sparse_mla_fwd_kernel, top-k 48 as in
# test_topk_kernel.
CHAIN_HEADS, CHAIN_D_QK, CHAIN_D_V, CHAIN_TOPK = 3, 80, 64, 48


@pytest.mark.cpu_kernel
def test_full_chain_through_c_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """index_scores -> topk_indices -> sparse_mla forward and backward on the C-target kernels, against the
    reference chain (only where the launchers exist)."""
    for name in ("dsa.launch.indexer", "dsa.launch.topk", "dsa.launch.sparse_mla_fwd", "dsa.launch.sparse_mla_bwd"):
        _launcher_or_skip(name)
    g = torch.Generator().manual_seed(5)
    batch, seq, seq_kv = 1, 6, 60  # bottom-right causal: every query sees 55..60 > 48 keys
    qi = torch.randn(batch, seq, 4, 32, generator=g).bfloat16().requires_grad_(True)
    ki = torch.randn(batch, seq_kv, 32, generator=g).bfloat16().requires_grad_(True)
    w = torch.randn(batch, seq, 4, generator=g).requires_grad_(True)
    q = torch.randn(batch, seq, CHAIN_HEADS, CHAIN_D_QK, generator=g).bfloat16().requires_grad_(True)
    kv = torch.randn(batch, seq_kv, CHAIN_D_QK, generator=g).bfloat16().requires_grad_(True)

    def chain() -> tuple[torch.Tensor, ...]:
        scores = ops.index_scores(qi, ki, w)
        indices = ops.topk_indices(scores, CHAIN_TOPK)
        out, lse = ops.sparse_mla(q, kv, indices, sm_scale=SM_SCALE, d_v=CHAIN_D_V)
        d_scores = torch.ones_like(scores)
        grads = torch.autograd.grad((out.float().square().sum(), scores), (q, kv, qi, ki, w), (None, d_scores))
        return (scores.detach(), indices, out.detach(), lse) + grads

    expected = chain()
    monkeypatch.setenv("DSA_BACKEND", "tilelang")
    got = chain()
    names = ("scores", "indices", "out", "lse", "dq", "dkv", "d index q", "d index k", "dweights")
    assert_close(got[0], expected[0], atol=1e-3, rtol=1e-3, name=names[0])
    assert_topk_valid(got[0], got[1], CHAIN_TOPK)
    if not torch.equal(got[1].sort(-1).values, expected[1].sort(-1).values):
        pytest.fail("the kernel chain selected a different top-k set than the reference chain (near-tie?)")
    tolerances = dict(atol=2e-2, rtol=2e-2)
    for name, a, b in zip(names[2:], got[2:], expected[2:]):
        assert_close(a, b, name=name, **tolerances)


# --------------------------------------------------------------------------------------------------------------------
# Any strides on every backend, through the real kernels (TileLang C target)
# --------------------------------------------------------------------------------------------------------------------

STRIDED_LAYOUTS = tuple(kind for kind in layouts.LAYOUTS if kind != "row_major")

Inputs = dict[str, torch.Tensor | None]


def _indexer_problem(dtype: str, mode: str) -> Inputs:
    """Index inputs at the C-target kernels' widths of the kernel tests (4 heads x 32, top-k 16): compiled there."""
    return problems.IndexerProblem(2, 5, 40, 4, 32, dtype, mode, "random", weight_scale=1.0).inputs("cpu", 11)


def _index_scores(a: Inputs) -> tuple[torch.Tensor, ...]:
    return (ops.index_scores(a["q"], a["k"], a["weights"], k_scale=a["k_scale"], starts=a["starts"], ends=a["ends"]),)


def _index_topk(a: Inputs) -> tuple[torch.Tensor, ...]:
    return ops.index_topk(a["q"], a["k"], a["weights"], 16, k_scale=a["k_scale"], starts=a["starts"], ends=a["ends"],
                          return_scores=True)  # fmt: skip


def _sparse_mla_problem() -> Inputs:
    """17 heads, d_qk 96, d_v 64 with topk_length and a sink: a static set of the forward kernel's tests."""
    return {
        key: value
        for key, value in problems.SparseMlaProblem(
            2, 4, 50, 17, 96, 64, 20, has_topk_length=True, has_sink=True, kind="irregular", sm_scale=SM_SCALE
        ).inputs("cpu", 12).items()
        if isinstance(value, torch.Tensor)
    }


def _sparse_mla(a: Inputs) -> tuple[torch.Tensor, ...]:
    return ops.sparse_mla(a["q"], a["kv"], a["indices"], sm_scale=SM_SCALE, d_v=64, topk_length=a["topk_length"],
                          attn_sink=a["attn_sink"])  # fmt: skip


def _decode_problem() -> Inputs:
    """An FP8 cache (unreferenced slots poisoned), a bf16 extra source, a sink, per-query lengths: the decode kernel
    tests' widths (5 heads, d_qk 40, d_v 24, d_rope 8)."""
    from tests.test_sparse_mla_decode_kernel import make_problem

    args = make_problem(seed=13, fmt="fp8", batch=2, s_q=2, context=40, topk=30, length_kind="per_query",
                        sink="random", extra_fmt="bf16")  # fmt: skip
    return {key: value for key, value in args.items() if isinstance(value, torch.Tensor)}


def _sparse_mla_decode(a: Inputs) -> tuple[torch.Tensor, ...]:
    rest = {key: value for key, value in a.items() if key not in ("q", "kv_cache", "indices")}
    return ops.sparse_mla_decode(a["q"], a["kv_cache"], a["indices"], sm_scale=40**-0.5, d_v=24, d_rope=8, **rest)


def _topk_decode_problem() -> Inputs:
    """FP8 key rows behind a shuffled block table with unallocated pages, random ranges (the paged kernel tests')."""
    from tests.test_index_topk_decode import make_problem

    return make_problem(fmt="fp8", seed=14, batch=2, s_q=3, lengths=[70, 33], ranges="random", unallocated=True)


def _index_topk_decode(a: Inputs) -> tuple[torch.Tensor, ...]:
    return ops.index_topk_decode(a["q"], a["k_cache"], a["weights"], 16, block_table=a["block_table"], ends=a["ends"],
                                 starts=a["starts"], return_scores=True)  # fmt: skip


# op -> (inputs, call); index_topk twice: the fused kernel and the chunked indexer + top-k kernels.
STRIDE_CASES: dict[str, tuple[Callable[[], Inputs], Callable[[Inputs], tuple[torch.Tensor, ...]]]] = {
    "index_scores": (lambda: _indexer_problem("float8_e4m3fn", "range"), _index_scores),
    "topk_indices": (
        lambda: {"scores": torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(15))},
        lambda a: (ops.topk_indices(a["scores"], 16),),
    ),
    "index_topk_fused": (lambda: _indexer_problem("float8_e4m3fn", "range"), _index_topk),
    "index_topk_unfused": (lambda: _indexer_problem("bfloat16", "causal"), _index_topk),
    "sparse_mla": (_sparse_mla_problem, _sparse_mla),
    "sparse_mla_decode": (_decode_problem, _sparse_mla_decode),
    "index_topk_decode": (_topk_decode_problem, _index_topk_decode),
}


def _assert_identical(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], what: str) -> None:
    """Bit-for-bit equal outputs, NaN where the other has NaN."""
    for n, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: output {n}"
        assert torch.equal(a.isnan(), b.isnan()), f"{what}: output {n} NaN positions differ"
        assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)), f"{what}: output {n} differs"


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("backend", ["reference", "tilelang"])
@pytest.mark.parametrize("op", list(STRIDE_CASES))
def test_every_op_takes_any_strides_on_both_backends(monkeypatch: pytest.MonkeyPatch, op: str, backend: str) -> None:
    """Every tensor of every op transposed, sliced (FlashMLA's padded buffers, every other element), broadcast with
    stride 0 or starting off a 16-byte boundary gives exactly the output of the same op on fresh row-major copies
    (the kernels: bit for bit, since they receive the same row-major values). Before the fix the kernel backend
    rejected all but the misaligned layout (``q must be contiguous``), and misaligned FP8 cache bytes failed in the
    launchers' float32 view of the scales."""
    monkeypatch.setenv("DSA_BACKEND", backend)
    monkeypatch.setenv("DSA_SELECTION", "unfused" if op == "index_topk_unfused" else "fused")
    make, call = STRIDE_CASES[op]
    base = make()
    for layout in STRIDED_LAYOUTS:
        strided = {name: layouts.relaid(t, layout) for name, t in base.items()}
        plain = {
            name: None if t is None else t.clone(memory_format=torch.contiguous_format) for name, t in strided.items()
        }
        _assert_identical(call(strided), call(plain), f"{op} with {layout} inputs")


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("backend", ["reference", "tilelang"])
def test_gradients_reach_strided_inputs(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """sparse_mla (forward and backward kernels) and index_scores/index_topk on strided views of leaves, with strided
    upstream gradients (a transposed d_out, an expanded d_lse): the gradients equal those of row-major inputs, bit for
    bit, and arrive in the leaves' own shapes."""
    monkeypatch.setenv("DSA_BACKEND", backend)
    g = torch.Generator().manual_seed(16)
    batch, seq, seq_kv = 2, 3, 60
    q_leaf = torch.randn(batch, CHAIN_HEADS, seq, CHAIN_D_QK, generator=g).bfloat16().requires_grad_(True)
    kv_leaf = torch.randn(batch, seq_kv, 2 * CHAIN_D_QK, generator=g).bfloat16().requires_grad_(True)
    indices = testing.make_indices("regular", 17, batch, seq, seq_kv, CHAIN_TOPK)  # no empty row: lse finite
    d_out = torch.randn(batch, seq, CHAIN_D_V, CHAIN_HEADS, generator=g).bfloat16().transpose(2, 3)
    d_lse = torch.randn(1, seq, CHAIN_HEADS, generator=g).expand(batch, seq, CHAIN_HEADS)

    def attention_grads(q: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, lse = ops.sparse_mla(q, kv, indices, sm_scale=SM_SCALE, d_v=CHAIN_D_V)
        assert torch.isfinite(lse).all()
        grads = torch.autograd.grad((out, lse), (q_leaf, kv_leaf), (d_out, d_lse))
        return (out.detach(), lse.detach(), *grads)

    got = attention_grads(q_leaf.transpose(1, 2), kv_leaf[..., ::2])
    want = attention_grads(q_leaf.transpose(1, 2).contiguous(), kv_leaf[..., ::2].contiguous())
    _assert_identical(got, want, "sparse_mla")
    assert got[2].shape == q_leaf.shape and got[3].shape == kv_leaf.shape

    inputs = _indexer_problem("bfloat16", "causal")
    leaves = [inputs["q"].transpose(1, 2).contiguous(), inputs["k"].mT.contiguous(), inputs["weights"].mT.contiguous()]
    leaves = [t.requires_grad_(True) for t in leaves]
    views = (leaves[0].transpose(1, 2), leaves[1].mT, leaves[2].mT)
    copies = tuple(v.contiguous() for v in views)
    for name, fn in (("index_scores", _index_scores), ("index_topk", _index_topk)):
        results = []
        for q, k, w in (views, copies):
            outputs = fn({**inputs, "q": q, "k": k, "weights": w})
            scores = outputs[-1]
            upstream = torch.randn(scores.shape, generator=torch.Generator().manual_seed(18)).mT.contiguous().mT
            grads = torch.autograd.grad(scores, leaves, torch.where(torch.isfinite(scores), upstream, 0.0))
            results.append((*(o.detach() for o in outputs), *grads))
        _assert_identical(results[0], results[1], name)


@pytest.mark.cpu_kernel
def test_compiled_graph_lays_strided_inputs_out_for_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``torch.compile(fullgraph=True)`` (aot_eager) a transposed q and a sliced kv reach the C-target kernels
    row-major through the traced copy, and forward and gradients equal eager mode's."""
    monkeypatch.setenv("DSA_BACKEND", "tilelang")
    g = torch.Generator().manual_seed(21)
    q_leaf = torch.randn(1, CHAIN_HEADS, 4, CHAIN_D_QK, generator=g).bfloat16().requires_grad_(True)
    kv_leaf = torch.randn(1, 50, 2 * CHAIN_D_QK, generator=g).bfloat16().requires_grad_(True)
    indices = testing.make_indices("regular", 22, 1, 4, 50, CHAIN_TOPK)

    def loss(q_leaf: torch.Tensor, kv_leaf: torch.Tensor) -> torch.Tensor:
        out, _ = ops.sparse_mla(q_leaf.transpose(1, 2), kv_leaf[..., ::2], indices, sm_scale=SM_SCALE, d_v=CHAIN_D_V)
        return out.float().square().sum()

    eager = torch.autograd.grad(loss(q_leaf, kv_leaf), (q_leaf, kv_leaf))
    torch._dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(q_leaf, kv_leaf),
                                   (q_leaf, kv_leaf))  # fmt: skip
    _assert_identical(compiled, eager, "compiled gradients")


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("backend", ["reference", "tilelang"])
def test_flash_mla_sparse_fwd_takes_flashmla_test_layouts(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """FlashMLA's prefill test inputs are slices of padded buffers (and its kernels take transposed views): through
    ``dsa.compat.flash_mla_sparse_fwd`` they give exactly the result of row-major copies on both backends. Before the
    fix the kernel backend raised ``sparse_mla: q must be contiguous``."""
    monkeypatch.setenv("DSA_BACKEND", backend)
    g = torch.Generator().manual_seed(19)
    s_q, s_kv, top = 5, 70, CHAIN_TOPK
    q = (torch.randn(s_q, CHAIN_HEADS, CHAIN_D_QK, generator=g) / 10).bfloat16()
    kv = (torch.randn(s_kv, 1, CHAIN_D_QK, generator=g) / 10).bfloat16()
    indices = testing.make_indices("more_than_available", 20, 1, s_q, s_kv, top).view(s_q, 1, top)
    want = compat.flash_mla_sparse_fwd(q, kv, indices, SM_SCALE, CHAIN_D_V)
    for layout in ("padded", "column_major"):
        got = compat.flash_mla_sparse_fwd(
            layouts.relaid(q, layout), layouts.relaid(kv, layout), layouts.relaid(indices, layout), SM_SCALE, CHAIN_D_V
        )
        _assert_identical(got, want, f"flash_mla_sparse_fwd with {layout} inputs")


@pytest.mark.cpu_kernel
@pytest.mark.parametrize(("level", "shown"), [(None, False), ("info", True)])
def test_tilelang_compile_lines_show_only_when_asked(tmp_path, level: str | None, shown: bool) -> None:
    """A C-target compile through the ops writes TileLang's INFO lines (its handler prints them to the console) only
    with ``DSA_LOG=info`` (an empty TileLang cache makes the call compile)."""
    import os
    import subprocess

    env = {**os.environ, "DSA_BACKEND": "tilelang", "TILELANG_CACHE_DIR": str(tmp_path / "tl-cache")}
    env.pop("DSA_LOG", None)
    if level is not None:
        env["DSA_LOG"] = level
    code = "import torch\nfrom dsa import ops\nprint(ops.topk_indices(torch.randn(1, 2, 9), 3).shape)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("TileLang begins to compile" in proc.stdout + proc.stderr) == shown, proc.stdout + proc.stderr
