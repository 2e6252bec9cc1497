"""Sparse MLA forward kernel (``tl_kernels.sparse_mla_fwd`` through ``dsa.launch.sparse_mla_fwd``) against
``dsa.reference.sparse_mla``.

Both outputs are compared with ``dsa.testing.assert_close`` (NaN/inf positions first, then tolerances, then the
scale-sensitive difference): ``out`` (bf16) and ``lse`` (float32, natural log, ``-inf`` for a query with no valid index). Outputs are
NaN-poisoned before every launch, so an element the kernel forgot to write fails.

Tiers:
- ``cpu_kernel``: the C-target build (the same builder: masking, clamped gather, online softmax, sink, head padding),
  over every index pattern of ``tests.strategies`` (regular, irregular, more requested than available, all invalid,
  duplicates, causal, mixed rows), ``topk_length``, ``attn_sink``, head counts that are not multiples of the head
  block (1, 3, 17, 70), widths that are not multiples of ``block_k`` (the last step reads clamped, masked positions),
  and one V3.2-width case (576/512). Static parameter sets are few (each is one compile); shapes and ``sm_scale``
  vary at run time.
- ``build``: the default config and every valid tuning-space config (including the warp-specialised
  ``pipeline="ws"`` schedule) compile for sm_90a at V3.2 shapes (128 heads, 576/512) with wgmma, no register spills,
  shared memory within the limit and a cp.async gather; so does the default of V4's ranged window kernel (64 heads,
  d_qk = d_v = 512, sink); the numbers are logged. (The ranged kernels' CPU tier is
  ``tests/test_sparse_mla_ranged_kernel.py``.)
- ``gpu``: the same properties against the CUDA kernels at V3.2 widths, every valid tuning-space config (needs a
  Hopper GPU).

The ``pipeline="ws"`` config: on the C target it lowers to the same plain loop as the default schedule (the C target
has no threads, mbarriers or cp.async), so the CPU tests that pass it (named ``..._ws_config_...plain_loop...``) check
its config plumbing and its 64-row step but run NONE of the ws schedule's code (producer, mbarriers, consumers); its
GPU correctness is proven only by the GPU tier (and by the autotuner's reference check on the GPU). The build tier
proves only that it compiles cleanly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from benchmarks import problems
from dsa import reference
from dsa.launch import sparse_mla_fwd as launch
from dsa.testing import assert_close, poison_unreferenced_rows
from tests import strategies, support
from tl_kernels import build as tl_build
from tl_kernels import dsl
from tl_kernels import sparse_mla_fwd as kernels

V32 = {"heads": 128, "d_qk": 576, "d_v": 512}
V32_TOPK = 2048
# V3.2's softmax scale: 192^-0.5 (qk_nope + rope head dim) times mscale^2 (1 here).
V32_SCALE = 192**-0.5

# C-target static parameter sets: (heads, d_qk, d_v, has_topk_length, has_sink). Each is one compile (~20 s on a
# loaded 2-core machine), so the set is small; the head counts are not multiples of any head block.
CPU_STATICS: tuple[tuple[int, int, int, bool, bool], ...] = (
    (3, 80, 64, False, False),
    (17, 96, 64, True, True),
    (1, 80, 64, True, False),
    (70, 80, 64, False, True),
)
CPU_V32_STATIC = (2, V32["d_qk"], V32["d_v"], False, False)

# Tolerances. out is rounded to bf16 (relative step 2^-8); on CUDA P also travels as bf16 into the second GEMM.
# The scale-sensitive difference of out: bf16 rounding alone gives ~4e-6 on the C target; a global scale error of 1 %
# gives 5e-5, which the elementwise bounds (1 % relative plus 1e-2) cannot see.
CPU_OUT_TOL = {"atol": 1e-2, "rtol": 1e-2, "max_diff": 2e-5}
CPU_LSE_TOL = {"atol": 1e-4, "rtol": 1e-4}
GPU_OUT_TOL = {"atol": 2e-2, "rtol": 2e-2}
GPU_LSE_TOL = {"atol": 2e-3, "rtol": 1e-3}



Problem = dict[str, Any]
"""The arguments of one forward call (``benchmarks.problems.SparseMlaProblem``'s inputs), on the CPU."""


def make_problem(
    *,
    heads: int,
    d_qk: int,
    d_v: int,
    has_topk_length: bool,
    has_sink: bool,
    batch: int,
    seq: int,
    seq_kv: int,
    topk: int,
    kind: str,
    seed: int,
    sm_scale: float,
    value_scale: float = 1.0,
    sink_scale: float = 2.0,
) -> Problem:
    """Random bf16 q/kv (never zeros), indices of pattern ``kind``, optional topk_length and sink."""
    problem = problems.SparseMlaProblem(
        batch, seq, seq_kv, heads, d_qk, d_v, topk, has_topk_length, has_sink, kind, sm_scale=sm_scale,
        value_scale=value_scale, sink_scale=sink_scale,
    )  # fmt: skip
    return problem.inputs("cpu", seed)


def moved(p: Problem, device: torch.device | str) -> Problem:
    """``p`` with its tensors on ``device``."""
    return {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in p.items()}


_kwargs = problems.SparseMlaProblem.kwargs


def run_kernel(p: Problem, config: kernels.Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    indices_before = p["indices"].clone()
    out, lse = launch.sparse_mla_fwd(p["q"], p["kv"], p["indices"], **_kwargs(p), config=config)
    assert torch.equal(p["indices"], indices_before), "the launcher modified its indices argument"
    return out, lse


def run_reference(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract in float32 from the same bf16 values (moved to the CPU)."""
    c = moved(p, "cpu")
    return problems.SparseMlaProblem.reference({**c, "q": c["q"].float(), "kv": c["kv"].float()})


def check(
    p: Problem, out: torch.Tensor, lse: torch.Tensor, out_tol: dict[str, float], lse_tol: dict[str, float]
) -> None:
    """``out [B, S, H, d_v]`` bf16 and ``lse [B, S, H]`` float32 from a kernel match the reference for ``p``."""
    batch, seq, heads, _ = p["q"].shape
    assert out.shape == (batch, seq, heads, p["d_v"]) and out.dtype == torch.bfloat16
    assert lse.shape == (batch, seq, heads) and lse.dtype == torch.float32
    want_out, want_lse = run_reference(p)
    out, lse = out.cpu(), lse.cpu()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "NaN in the kernel's outputs"
    assert_close(lse, want_lse, name="lse", **lse_tol)
    assert_close(out.float(), want_out.float(), name="out", **out_tol)
    # A query with no valid index: exactly zero output (the reference says so too, but say it explicitly).
    empty = torch.isneginf(want_lse)
    assert (out.float()[empty] == 0).all(), "a query with no valid index must have out == 0"


# --------------------------------------------------------------------------------------------- pure Python checks


V32_HOPPER_STATIC = {**V32, "has_topk_length": False, "has_sink": False, "target": dsl.HOPPER_TARGET}
WS_CONFIG = kernels.Config(block_k=kernels.WS_BLOCK_K, threads=kernels.WS_THREADS, pipeline=kernels.PIPELINE_WS)
"""The warp-specialised schedule's one valid CUDA config."""


def _tuning_configs() -> list[kernels.Config]:
    """Every combination of the kernel's ``TUNING_SPACE`` that ``check_config`` accepts at V3.2 shapes on sm_90a (the
    product holds invalid combinations, e.g. the ws schedule with 256 threads): what the tuner's full search
    compiles."""
    return support.hopper_configs(launch.KERNEL_NAME, {**V32, "has_topk_length": False, "has_sink": False})


def _ws_config(static: dict[str, Any]) -> kernels.Config:
    """``pipeline="ws"`` with its CUDA block and thread count, on top of ``default_config`` (whose head block shrinks
    on the C target)."""
    return dataclasses.replace(
        kernels.default_config(static),
        block_k=WS_CONFIG.block_k,
        threads=WS_CONFIG.threads,
        pipeline=WS_CONFIG.pipeline,
    )


def test_tuning_space_is_small_and_valid() -> None:
    """2-4 valid configs (each an sm_90a compile in CI), the default and the ws schedule among them."""
    configs = _tuning_configs()
    assert 2 <= len(configs) <= 4
    assert len(set(configs)) == len(configs)
    for config in configs:
        assert kernels.smem_bytes(V32_HOPPER_STATIC, config) <= dsl.HOPPER_SMEM_BYTES
    assert kernels.default_config(V32_HOPPER_STATIC) in configs
    assert WS_CONFIG in configs
    assert {config.pipeline for config in configs} == set(kernels.PIPELINES)


@pytest.mark.parametrize("ranged", [False, True])
@pytest.mark.parametrize("heads", [64, 128])
def test_v4_widths_have_both_schedules(heads: int, ranged: bool) -> None:
    """K = V at 512 (DeepSeek-V4, with a sink; index lists and ranges): the tuning space keeps the default and the
    ws schedule (no key-only tail), all within shared memory."""
    static = {"heads": heads, "d_qk": 512, "d_v": 512, "has_topk_length": False, "has_sink": True}
    configs = support.hopper_configs(launch.KERNEL_NAME, {**static, **({"ranged": True} if ranged else {})})
    assert kernels.Config() in configs and WS_CONFIG in configs and len(configs) <= 4
    for config in configs:
        assert kernels.smem_bytes({**static, "target": dsl.HOPPER_TARGET}, config) <= dsl.HOPPER_SMEM_BYTES


def test_default_config_is_the_plain_schedule() -> None:
    """The default stays the plain schedule (one KV tile, no barriers); the ws schedule is opt-in (config or tuner)."""
    for target in (dsl.CPU_TARGET, dsl.HOPPER_TARGET):
        assert kernels.default_config({**V32, "target": target}).pipeline == kernels.PIPELINE_NONE
    assert kernels.Config().pipeline == kernels.PIPELINE_NONE


@pytest.mark.parametrize("heads", [1, 2, 3, 17, 64, 70, 128])
def test_default_config_is_valid(heads: int) -> None:
    for target in (dsl.CPU_TARGET, dsl.HOPPER_TARGET):
        static = {"heads": heads, "d_qk": 576, "d_v": 512, "target": target}
        config = kernels.default_config(static)
        kernels.check_config(static, config)
        if not dsl.is_cpu(target):
            assert config.block_h == kernels.WGMMA_M


@pytest.mark.parametrize(
    ("static", "config", "reason"),
    [
        ({"heads": 8, "d_qk": 64, "d_v": 128}, kernels.Config(), "need 1 <= d_v <= d_qk"),
        ({"heads": 0, "d_qk": 64, "d_v": 64}, kernels.Config(), "heads must be >= 1"),
        ({"heads": 8, "d_qk": 64, "d_v": 64}, kernels.Config(block_h=48), "block_h must be a power of two"),
        ({"heads": 8, "d_qk": 64, "d_v": 64}, kernels.Config(block_k=24), "block_k must be a power of two"),
        ({"heads": 8, "d_qk": 64, "d_v": 64}, kernels.Config(num_stages=0), "num_stages must be >= 1"),
        ({"heads": 8, "d_qk": 64, "d_v": 64}, kernels.Config(block_h=16), "block_h must be 64 on CUDA"),
        ({"heads": 8, "d_qk": 64, "d_v": 64}, kernels.Config(threads=384), "threads must be 256"),
        ({"heads": 8, "d_qk": 64, "d_v": 64}, kernels.Config(block_k=8), "block_k must be a multiple of 16"),
        ({"heads": 8, "d_qk": 64, "d_v": 64}, kernels.Config(num_stages=2), "num_stages must be <= 1"),
        ({"heads": 8, "d_qk": 80, "d_v": 64}, kernels.Config(), "multiples of 64 on CUDA"),
        ({"heads": 8, "d_qk": 64 * 24, "d_v": 512}, kernels.Config(), "shared memory"),
        ({"heads": 8, "d_qk": 64, "d_v": 64}, kernels.Config(block_k=64), "block_k must be <= 32"),  # spills
        ({"heads": 8, "d_qk": 64, "d_v": 64}, kernels.Config(pipeline="double"), "pipeline must be one of"),
        ({"heads": 8, "d_qk": 576, "d_v": 512}, dataclasses.replace(WS_CONFIG, threads=256), "threads must be 384"),
        ({"heads": 8, "d_qk": 576, "d_v": 512}, dataclasses.replace(WS_CONFIG, block_k=32), "block_k must be 64"),
        ({"heads": 8, "d_qk": 576, "d_v": 512}, dataclasses.replace(WS_CONFIG, num_stages=2), "num_stages"),
        ({"heads": 8, "d_qk": 576, "d_v": 448}, WS_CONFIG, "d_v a multiple of 128"),  # halves of whole atoms
        ({"heads": 8, "d_qk": 64 * 12, "d_v": 512}, WS_CONFIG, "shared memory"),  # two 64-row buffers too big
    ],
)
def test_check_config_rejects(static: dict[str, Any], config: kernels.Config, reason: str) -> None:
    """Each invalid combination is rejected for the reason it is invalid (not for another one)."""
    with pytest.raises(ValueError, match=reason):
        kernels.check_config({**static, "target": dsl.HOPPER_TARGET}, config)


def test_check_config_ws() -> None:
    """The ws config is valid at V3.2 widths on CUDA and on the C target (any widths there); an unknown schedule is
    rejected on both targets."""
    kernels.check_config(V32_HOPPER_STATIC, WS_CONFIG)
    for static in ({"heads": 3, "d_qk": 80, "d_v": 64}, {"heads": 3, "d_qk": 64, "d_v": 64}):
        kernels.check_config({**static, "target": dsl.CPU_TARGET}, _ws_config({**static, "target": dsl.CPU_TARGET}))
    with pytest.raises(ValueError, match="pipeline must be one of"):
        kernels.check_config({"heads": 3, "d_qk": 80, "d_v": 64, "target": dsl.CPU_TARGET}, kernels.Config(pipeline=""))


# ------------------------------------------------------------------------------------------------------- CPU tier


def _cpu_problem(static: tuple[int, int, int, bool, bool], **sizes: Any) -> Problem:
    heads, d_qk, d_v, has_topk_length, has_sink = static
    return make_problem(
        heads=heads, d_qk=d_qk, d_v=d_v, has_topk_length=has_topk_length, has_sink=has_sink, **sizes
    )


@pytest.mark.cpu_kernel
@given(
    static=st.sampled_from(CPU_STATICS),
    **strategies.sizes(batch=2, seq=4, seq_kv=80, topk=150),
    kind=st.sampled_from(strategies.INDEX_PATTERNS),
    seed=strategies.SEEDS,
    sm_scale=st.sampled_from([80**-0.5, 0.05, 0.3]),
    value_scale=st.sampled_from([1.0, 3.0]),
)
# Every pattern at least once, mostly on multi-step rows (k > block_k, often not a multiple of it), with and without
# topk_length and sink.
@example(
    static=CPU_STATICS[1], batch=2, seq=3, seq_kv=80, topk=100, kind="irregular", seed=1, sm_scale=0.1, value_scale=1.0,
)
@example(
    static=CPU_STATICS[1], batch=1, seq=4, seq_kv=20,
    topk=130, kind="more_than_available", seed=2, sm_scale=0.1, value_scale=1.0,
)
@example(
    static=CPU_STATICS[0], batch=2, seq=2, seq_kv=30,
    topk=70, kind="all_invalid", seed=3, sm_scale=0.1, value_scale=1.0,
)
@example(static=CPU_STATICS[0], batch=1, seq=1, seq_kv=5, topk=1, kind="regular", seed=4, sm_scale=0.1, value_scale=1.0)
@example(
    static=CPU_STATICS[2], batch=2, seq=4, seq_kv=7, topk=90, kind="duplicates", seed=5, sm_scale=0.3, value_scale=3.0,
)
@example(
    static=CPU_STATICS[3], batch=1, seq=3, seq_kv=80, topk=64, kind="causal", seed=6, sm_scale=0.3, value_scale=3.0,
)
@example(
    static=CPU_STATICS[3], batch=2, seq=4, seq_kv=60,
    topk=129, kind="mixed_rows", seed=7, sm_scale=0.05, value_scale=1.0,
)
def test_cpu_matches_reference(static: tuple[int, int, int, bool, bool], **sizes: Any) -> None:
    """The C-target kernel matches the reference on every index pattern, with and without topk_length and sink
    (``sizes``: the drawn :func:`make_problem` arguments)."""
    p = _cpu_problem(static, **sizes)
    out, lse = run_kernel(p)
    check(p, out, lse, CPU_OUT_TOL, CPU_LSE_TOL)


@pytest.mark.cpu_kernel
@strategies.examples(0.15)
@given(
    **strategies.sizes(batch=2, seq=4, seq_kv=300, topk=300),
    kind=st.sampled_from(strategies.INDEX_PATTERNS),
    seed=strategies.SEEDS,
    sm_scale=st.sampled_from([80**-0.5, 0.3]),
)
# An odd number of 64-row steps (the ws schedule's last step uses buffer 0 with no partner on GPU), with
# topk_length and sink, and an all-invalid row set.
@example(batch=2, seq=3, seq_kv=250, topk=190, kind="irregular", seed=21, sm_scale=0.3)
@example(batch=1, seq=2, seq_kv=40, topk=129, kind="all_invalid", seed=22, sm_scale=0.3)
@example(batch=2, seq=4, seq_kv=60, topk=257, kind="mixed_rows", seed=23, sm_scale=80**-0.5)
def test_cpu_ws_config_runs_the_plain_loop_at_its_64_row_step(
    batch: int, seq: int, seq_kv: int, topk: int, kind: str, seed: int, sm_scale: float
) -> None:
    """A ``pipeline="ws"`` config through the launcher on the C target (17 heads, topk_length and sink).

    The C target has no threads, barriers or asynchronous copies: there the ws config builds the plain loop with the
    ws schedule's 64-row step. This checks that the config is accepted and passed through and that the 64-row step is
    right; it runs NO code of the CUDA ws schedule (producer, mbarriers, consumers): only the GPU tier does.
    """
    static = CPU_STATICS[1]
    p = _cpu_problem(static, batch=batch, seq=seq, seq_kv=seq_kv, topk=topk, kind=kind, seed=seed, sm_scale=sm_scale)
    heads, d_qk, d_v, has_topk_length, has_sink = static
    cpu_static = {"heads": heads, "d_qk": d_qk, "d_v": d_v, "target": dsl.CPU_TARGET}
    out, lse = run_kernel(p, _ws_config(cpu_static))
    check(p, out, lse, CPU_OUT_TOL, CPU_LSE_TOL)


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("sink_scale", [0.0, 30.0, math.inf])
def test_cpu_sink_extremes(sink_scale: float) -> None:
    """A sink far above every score (its exp dominates the denominator), sinks of 0, and sinks of +inf (out = 0)
    and -inf (no sink) on alternate heads, over some empty rows."""
    p = _cpu_problem(
        CPU_STATICS[3], batch=2, seq=3, seq_kv=40, topk=50, kind="mixed_rows", seed=11, sm_scale=0.1,
        sink_scale=1.0 if math.isinf(sink_scale) else sink_scale,
    )
    if math.isinf(sink_scale):
        assert p["attn_sink"] is not None
        sink = p["attn_sink"].clone()
        sink[0::3], sink[1::3] = math.inf, -math.inf
        p = {**p, "attn_sink": sink}
    out, lse = run_kernel(p)
    check(p, out, lse, CPU_OUT_TOL, CPU_LSE_TOL)


def _with_poisoned_rows(p: Problem, extra: int, seed: int) -> Problem:
    """``p`` with ``extra`` more index columns past ``topk_length`` naming random rows (out of range and negative
    too), and NaN/±inf in every kv row that no valid entry selects (an unwritten cache slot may hold anything)."""
    batch, seq, topk = p["indices"].shape
    device = p["indices"].device
    junk = torch.randint(-2, p["kv"].shape[1] + 2, (batch, seq, extra), generator=strategies.generator(seed))
    length = p["topk_length"]
    if length is None:
        length = torch.full((batch, seq), topk, dtype=torch.int32)
    indices = torch.cat([p["indices"], junk.to(p["indices"].dtype).to(device)], dim=-1)
    kv, unreferenced = poison_unreferenced_rows(p["kv"], indices, length.to(device))
    assert unreferenced.any(), "the problem must leave some row unreferenced"
    return {**p, "kv": kv, "indices": indices, "topk_length": length.to(device)}


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("schedule", ["default", "ws_config_plain_loop"])
def test_cpu_non_finite_rows_behind_invalid_entries_change_nothing(schedule: str) -> None:
    """Invalid entries that name rows holding NaN/±inf: out and lse equal the reference's, which never reads them.
    On the C target the ws config builds the plain loop at its 64-row step (no ws code runs: see the module
    docstring)."""
    static = CPU_STATICS[3]
    p = _cpu_problem(static, batch=2, seq=3, seq_kv=90, topk=70, kind="mixed_rows", seed=31, sm_scale=0.1)
    p = _with_poisoned_rows(p, extra=20, seed=32)
    cpu_static = {"heads": static[0], "d_qk": static[1], "d_v": static[2], "target": dsl.CPU_TARGET}
    config = _ws_config(cpu_static) if schedule == "ws_config_plain_loop" else None
    out, lse = run_kernel(p, config)
    check(p, out, lse, CPU_OUT_TOL, CPU_LSE_TOL)


def _poisoned_query_and_row(p: Problem) -> tuple[int, int, int, int]:
    """``(b, t, h, r)``: the first query with two or more valid entries, its last head (in the last, partly masked
    head block when heads are padded), and the kv row of its first valid entry."""
    valid = reference.valid_index_mask(p["indices"], p["kv"].shape[1], p["topk_length"])
    b, t = (valid.sum(-1) >= 2).nonzero()[0].tolist()
    r = int(p["indices"][b, t][valid[b, t]][0])
    return b, t, p["q"].shape[2] - 1, r


def _non_finite_case(p: Problem, case: str) -> tuple[Problem, Any]:
    """``p`` with the non-finite values of ``case`` in it, and a predicate on the reference's ``(out, lse)`` that
    says the case produced what it is about (so that the comparison cannot pass on a problem that missed it).

    Column ``d_v + 1`` is a key-only column (its infinities reach the scores, not the values); column 2 a value one.
    The last query's row is made empty (every index -1).
    """
    q, kv, indices = p["q"].clone(), p["kv"].clone(), p["indices"].clone()
    indices[-1, -1] = -1
    p = {**p, "indices": indices}
    sink = None if p["attn_sink"] is None else p["attn_sink"].clone()
    b, t, h, r = _poisoned_query_and_row(p)
    key = p["d_v"] + 1
    if case == "nan_query":
        q[b, t, h, 3] = math.nan
        expect = lambda out, lse: bool(torch.isnan(lse[b, t, h]) and torch.isnan(out[b, t, h]).all())  # noqa: E731
    elif case == "inf_query":
        q[b, t, h, 3] = math.inf  # +inf scores where kv[., 3] > 0, -inf where < 0
        expect = lambda out, lse: bool(torch.isposinf(lse[b, t, h]) and torch.isnan(out[b, t, h]).all())  # noqa: E731
    elif case == "neg_inf_query_every_score":
        # Every score of (b, t, h) is -inf: lse -inf and out 0, as for an empty row (the row is not empty).
        kv[..., key] = kv[..., key].abs() + 0.5
        q[b, t, h, key] = -math.inf
        expect = lambda out, lse: bool(torch.isneginf(lse[b, t, h]) and (out[b, t, h] == 0).all())  # noqa: E731
    elif case == "nan_key":
        kv[b, r, 2] = math.nan
        expect = lambda out, lse: bool(torch.isnan(lse[b, t]).all() and torch.isnan(out[b, t]).all())  # noqa: E731
    elif case == "inf_key":
        # +inf scores on even heads (lse +inf, out NaN), -inf (the entry drops out) on odd ones.
        kv[b, r, key] = math.inf
        q[b, t, :, key] = q[b, t, :, key].abs() + 0.5
        q[b, t, 1::2, key] = -q[b, t, 1::2, key]
        expect = lambda out, lse: bool(  # noqa: E731
            torch.isposinf(lse[b, t]).any() and torch.isfinite(lse[b, t]).any() and torch.isfinite(out[b, t]).any()
        )
    elif case == "neg_inf_value":
        kv[b, r, 2] = -math.inf  # in the value too: 0 * -inf = NaN in column 2 where that score is -inf
        expect = lambda out, lse: bool(torch.isnan(out[b, t]).any() and torch.isfinite(out[b, t]).any())  # noqa: E731
    elif case == "nan_sink":
        sink[h] = math.nan  # out NaN at head h in every row (empty ones too), lse untouched
        expect = lambda out, lse: bool(  # noqa: E731
            torch.isnan(out[:, :, h]).all() and not torch.isnan(lse).any() and torch.isneginf(lse[-1, -1, h])
        )
    elif case == "inf_sink_inf_key":
        sink[h] = math.inf  # out 0 at head h (the empty row too), but NaN where one of its scores is +inf
        kv[b, r, key] = math.inf
        q[b, t, h, key] = q[b, t, h, key].abs() + 0.5
        expect = lambda out, lse: bool(  # noqa: E731
            torch.isnan(out[b, t, h]).all() and torch.isposinf(lse[b, t, h]) and (out[-1, -1, h] == 0).all()
            and (out[:, :, h] == 0).all(dim=-1).sum() > 1
        )
    else:
        raise AssertionError(case)
    return {**p, "q": q, "kv": kv, "attn_sink": sink}, expect


@pytest.mark.cpu_kernel
@pytest.mark.parametrize(
    ("static", "case"),
    [(static, case) for static in (CPU_STATICS[0], CPU_STATICS[3]) for case in (
        "nan_query", "inf_query", "neg_inf_query_every_score", "nan_key", "inf_key", "neg_inf_value")]
    + [(CPU_STATICS[3], "nan_sink"), (CPU_STATICS[3], "inf_sink_inf_key")],
    ids=lambda v: f"h{v[0]}" if isinstance(v, tuple) else v,
)  # fmt: skip
def test_cpu_non_finite_queries_keys_and_sinks_give_the_references_nan_and_inf(
    static: tuple[int, int, int, bool, bool], case: str
) -> None:
    """NaN/+-inf in ``q``, in a referenced kv row (key or value columns) or in the sink: out and lse hold NaN and
    infinities exactly where the reference does (NaN score: lse and out NaN; +inf score: lse +inf, out NaN; every
    score -inf: lse -inf, out 0; NaN sink: out NaN, lse untouched), the finite rest within tolerance.

    Issue 18: before the fix the kernel's lse was -inf for a NaN or +inf score (``l > 0 ? ... : -inf``) and a NaN
    sink gave out = 0 (``d > 0 ? 1 / d : 0``)."""
    p = _cpu_problem(static, batch=2, seq=3, seq_kv=90, topk=70, kind="mixed_rows", seed=41, sm_scale=0.1)
    p, expect = _non_finite_case(p, case)
    out, lse = run_kernel(p)
    want_out, want_lse = run_reference(p)
    assert expect(want_out.float(), want_lse), f"the problem does not exercise {case}"
    assert_close(lse, want_lse, name="lse", **CPU_LSE_TOL)
    assert_close(out.float(), want_out.float(), name="out", **CPU_OUT_TOL)


@pytest.mark.cpu_kernel
def test_cpu_topk_length_edges() -> None:
    """topk_length of 0 (empty row), 1, exactly k, and above k; negative lengths count as 0."""
    p = _cpu_problem(CPU_STATICS[2], batch=1, seq=4, seq_kv=50, topk=70, kind="regular", seed=12, sm_scale=0.1)
    lengths = torch.tensor([[0, 1, 70, 1000]], dtype=torch.int32)
    p = {**p, "topk_length": lengths}
    out, lse = run_kernel(p)
    check(p, out, lse, CPU_OUT_TOL, CPU_LSE_TOL)
    assert torch.isneginf(lse[0, 0]).all() and torch.isfinite(lse[0, 1:]).all()
    p = {**p, "topk_length": torch.tensor([[-5, 65, 64, 2]], dtype=torch.int32)}
    out, lse = run_kernel(p)
    check(p, out, lse, CPU_OUT_TOL, CPU_LSE_TOL)


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("kind", ["irregular", "duplicates"])
def test_cpu_v32_width(kind: str) -> None:
    """d_qk = 576, d_v = 512 (V3.2 widths) with few heads, multi-step rows with invalid entries and duplicates."""
    p = _cpu_problem(
        CPU_V32_STATIC, batch=1, seq=3, seq_kv=300, topk=200, kind=kind, seed=13, sm_scale=V32_SCALE
    )
    out, lse = run_kernel(p)
    check(p, out, lse, CPU_OUT_TOL, CPU_LSE_TOL)


@pytest.mark.cpu_kernel
def test_cpu_reuses_one_kernel_across_shapes() -> None:
    """B, S, S_kv, k and sm_scale are runtime values: varying them compiles nothing new."""
    static = CPU_STATICS[0]
    run_kernel(_cpu_problem(static, batch=1, seq=1, seq_kv=3, topk=2, kind="regular", seed=14, sm_scale=0.1))
    compiled = len(tl_build._KERNELS)  # noqa: SLF001 - the in-process cache is what is being checked
    for seq_kv, topk, scale in ((200, 150, 0.3), (1, 1, 0.01), (64, 64, 1.0)):
        p = _cpu_problem(static, batch=2, seq=3, seq_kv=seq_kv, topk=topk, kind="irregular", seed=15, sm_scale=scale)
        out, lse = run_kernel(p)
        check(p, out, lse, CPU_OUT_TOL, CPU_LSE_TOL)
    assert len(tl_build._KERNELS) == compiled  # noqa: SLF001


# ----------------------------------------------------------------------------------------------------- build tier

V4_RANGED = {"heads": 64, "d_qk": 512, "d_v": 512, "has_topk_length": False, "has_sink": True, "ranged": True}
"""DeepSeek-V4-Flash's window source: K = V (d_qk = d_v = 512), a sink, a row range per query. Its default build also
stands for V4's index-list kernels (the same code up to how an entry's row is read) and for 128 heads (more head
blocks, the same block). Its ws build (no key-only tail at these widths: 168 registers at launch, 0 spills, 206,464 B)
is left to the GPU tier (``tests/test_sparse_mla_ranged_kernel.py``), which compiles it, for CI's time."""

BUILD_CASES: list[tuple[dict[str, Any], kernels.Config]] = (
    [({**V32, "has_topk_length": False, "has_sink": False}, config) for config in _tuning_configs()]
    + [({**V32, "has_topk_length": True, "has_sink": True}, config) for config in (kernels.Config(), WS_CONFIG)]
    + [(V4_RANGED, kernels.Config())]
)


def _case_id(case: tuple[dict[str, Any], kernels.Config]) -> str:
    static, config = case
    flags = f"tl{int(static['has_topk_length'])}sink{int(static['has_sink'])}"
    shape = f"h{static['heads']}" + ("" if static["d_qk"] == V32["d_qk"] else f"-d{static['d_qk']}")
    shape += "-ranged" if static.get("ranged") else ""
    return f"{shape}-{flags}-" + "-".join(f"{k}{v}" for k, v in dataclasses.asdict(config).items())


hopper_prebuilt = support.prebuilt_fixture(lambda: support.config_builds(kernels.build, BUILD_CASES))


@pytest.mark.build
@pytest.mark.usefixtures("hopper_prebuilt")
@pytest.mark.parametrize("case", BUILD_CASES, ids=_case_id)
def test_hopper_build_is_clean(case: tuple[dict[str, Any], kernels.Config]) -> None:
    """At V3.2 shapes and V4's ranged window (K = V, 512 wide): every GEMM a wgmma, no register spills, shared memory
    within 227 KB, an asynchronous gather (and, for the ws schedule, per-warpgroup register budgets and mbarrier
    hand-offs). A clean build says nothing about the ws kernel's barriers being right: that is the GPU tier's job."""
    kernel, report = support.hopper_build_case(f"sparse_mla_fwd {_case_id(case)}", kernels.build, case)
    assert not report.problems(mma=tl_build.MMA_WGMMA), report.problems(mma=tl_build.MMA_WGMMA)
    source = kernel.get_kernel_source()
    assert "cp_async" in source, "the KV gather is not asynchronous"
    support.assert_wide_addressing(source)
    if case[1].pipeline == kernels.PIPELINE_WS:
        assert "mbarrier_cp_async_arrive_noinc" in source, "the producer does not signal its cp.async completion"
        assert "warpgroup_reg_alloc" in source and "warpgroup_reg_dealloc" in source
    # Invalid entries are zero-filled by a predicated cp.async whose predicate is the row's bounds check (row -1 for
    # an invalid entry), not by a select that would make the gather synchronous.
    assert re.search(r"cp_async_gs_conditional<\d+>\([^;]*\((?:\(int64_t\))?0 <= condval", source), (
        "the gather no longer zero-fills invalid entries asynchronously"
    )
    # check_config's shared-memory estimate is an upper bound of what the kernel really asks for.
    assert report.smem_bytes <= kernels.smem_bytes(case[0], case[1])


# ------------------------------------------------------------------------------------------------------- GPU tier

# Every kernel the GPU tier compiles has one of these static parameter sets, (heads, d_qk, d_v, has_topk_length,
# has_sink), and one of GPU_CONFIGS (each pair is an sm_90a compile of 5-30 s).
GPU_STATICS: tuple[tuple[int, int, int, bool, bool], ...] = (
    (V32["heads"], V32["d_qk"], V32["d_v"], False, False),
    (V32["heads"], V32["d_qk"], V32["d_v"], True, True),
    (70, V32["d_qk"], V32["d_v"], True, False),  # heads padded to two 64-head blocks, the second partly masked
)
GPU_KERNEL_STATICS: tuple[dict[str, Any], ...] = tuple(
    launch.static_params(heads=heads, d_qk=d_qk, d_v=d_v, has_topk_length=has_len, has_sink=has_sink)
    for heads, d_qk, d_v, has_len, has_sink in GPU_STATICS
)
"""``GPU_STATICS`` as the launcher passes them to ``build``."""
GPU_CONFIGS: tuple[kernels.Config, ...] = tuple(_tuning_configs())
"""The configs the GPU tests pass explicitly (both schedules; the default among them): every valid tuning config."""
GPU_KERNELS: dict[str, tuple[dict[str, Any], ...]] = {launch.KERNEL_NAME: GPU_KERNEL_STATICS}
"""What the GPU tests compile, by kernel: the one-shot GPU check compiles these (every config of the whole tuning
space) in parallel before it runs the tests (``pytest --collect-only --dsa-gpu-kernels FILE``, tests/conftest.py)."""


def _gpu_case(static: tuple[int, int, int, bool, bool], **sizes: Any) -> dict[str, Any]:
    return {"static": static, **sizes}


# One GPU problem: the static shape and the sizes/pattern of ``_cpu_problem`` (drawn as one dict so that the tests'
# explicit examples spell the same fields).
GPU_CASES = st.builds(
    _gpu_case,
    static=st.sampled_from(GPU_STATICS),
    **strategies.sizes(batch=2, seq=8, seq_kv=3000),
    topk=st.sampled_from([1, 63, 64, 65, 200, V32_TOPK]),
    kind=st.sampled_from(strategies.INDEX_PATTERNS),
    seed=strategies.SEEDS,
)


def _check_on_gpu(device: torch.device, config: kernels.Config | None, case: dict[str, Any]) -> None:
    sizes = dict(case)
    p = moved(_cpu_problem(sizes.pop("static"), sm_scale=V32_SCALE, **sizes), device)
    out, lse = run_kernel(p, config)
    torch.cuda.synchronize()
    check(p, out, lse, GPU_OUT_TOL, GPU_LSE_TOL)


@pytest.mark.gpu
@strategies.examples(0.1)
@given(case=GPU_CASES, config=st.sampled_from([c for c in GPU_CONFIGS if c.pipeline != kernels.PIPELINE_WS]))
@example(
    case=_gpu_case(GPU_STATICS[0], batch=1, seq=4, seq_kv=2500, topk=V32_TOPK, kind="irregular", seed=1),
    config=kernels.Config(),
)
@example(
    case=_gpu_case(GPU_STATICS[1], batch=2, seq=3, seq_kv=100, topk=V32_TOPK, kind="more_than_available", seed=2),
    config=kernels.Config(block_k=16),
)
@example(
    case=_gpu_case(GPU_STATICS[2], batch=1, seq=2, seq_kv=50, topk=65, kind="all_invalid", seed=3),
    config=kernels.Config(),
)
def test_gpu_matches_reference(cuda_device: torch.device, case: dict[str, Any], config: kernels.Config) -> None:
    """The sm_90a kernel, every valid tuning-space config of the plain schedule, matches the reference at V3.2
    widths."""
    _check_on_gpu(cuda_device, config, case)


@pytest.mark.gpu
@pytest.mark.ws
@strategies.examples(0.1)
@given(case=GPU_CASES)
# Many steps, odd step counts (the last step has no partner in the other buffer), topk_length and sink (rows of
# length 0 skip the loop, rows of length <= 64 run one step), padded heads, invalid entries.
@example(case=_gpu_case(GPU_STATICS[0], batch=1, seq=4, seq_kv=2500, topk=V32_TOPK, kind="irregular", seed=4))
@example(case=_gpu_case(GPU_STATICS[1], batch=2, seq=5, seq_kv=300, topk=200, kind="mixed_rows", seed=5))
@example(case=_gpu_case(GPU_STATICS[2], batch=1, seq=3, seq_kv=90, topk=65, kind="all_invalid", seed=6))
@example(case=_gpu_case(GPU_STATICS[2], batch=2, seq=8, seq_kv=40, topk=63, kind="duplicates", seed=7))
def test_gpu_ws_matches_reference(cuda_device: torch.device, case: dict[str, Any]) -> None:
    """The warp-specialised schedule matches the reference at V3.2 widths: this is where its barriers and producer
    are proven correct (a separate test, marker ``ws``, so that a hang here does not cost the plain schedule's
    checks)."""
    _check_on_gpu(cuda_device, WS_CONFIG, case)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, pytest.param(WS_CONFIG, marks=pytest.mark.ws)], ids=["default", "ws"])
def test_gpu_non_finite_rows_behind_invalid_entries_change_nothing(
    cuda_device: torch.device, config: kernels.Config | None
) -> None:
    """Both schedules zero-fill an invalid entry's tile row (predicated cp.async), so NaN/±inf in rows that only
    invalid entries reach leave out and lse exact."""
    p = _cpu_problem(GPU_STATICS[1], batch=2, seq=4, seq_kv=300, topk=200, kind="mixed_rows", seed=33, sm_scale=V32_SCALE)
    p = moved(_with_poisoned_rows(p, extra=40, seed=34), cuda_device)
    out, lse = run_kernel(p, config)
    torch.cuda.synchronize()
    check(p, out, lse, GPU_OUT_TOL, GPU_LSE_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, pytest.param(WS_CONFIG, marks=pytest.mark.ws)], ids=["default", "ws"])
def test_gpu_v32_causal_prefill(cuda_device: torch.device, config: kernels.Config | None) -> None:
    """A causal V3.2 prefill slice (k = 2048 over 4096 keys) with topk_length and sink: the selected (default or
    tuned) config, and the ws schedule."""
    p = moved(
        _cpu_problem(
            GPU_STATICS[1], batch=1, seq=16, seq_kv=4096, topk=V32_TOPK, kind="causal", seed=21, sm_scale=V32_SCALE
        ),
        cuda_device,
    )
    out, lse = run_kernel(p, config)
    torch.cuda.synchronize()
    check(p, out, lse, GPU_OUT_TOL, GPU_LSE_TOL)
    assert math.isfinite(float(lse[0, -1].max()))


@pytest.mark.gpu
@pytest.mark.portable
@pytest.mark.parametrize(
    "case",
    [
        _gpu_case(GPU_STATICS[0], batch=1, seq=4, seq_kv=2500, topk=V32_TOPK, kind="irregular", seed=41),
        _gpu_case(GPU_STATICS[1], batch=2, seq=3, seq_kv=300, topk=200, kind="mixed_rows", seed=42),
        _gpu_case(GPU_STATICS[2], batch=1, seq=2, seq_kv=50, topk=65, kind="all_invalid", seed=43),
        _gpu_case(GPU_STATICS[1], batch=1, seq=16, seq_kv=4096, topk=V32_TOPK, kind="causal", seed=44),
    ],
    ids=["irregular", "mixed_rows", "all_invalid", "causal_prefill"],
)
def test_gpu_portable_matches_reference(portable_cuda_device: torch.device, case: dict[str, Any]) -> None:
    """The portable schedule (mma.sync, no wgmma or TMA) built for this GPU's portable architecture (sm_90 on Hopper)
    with its default config, at V3.2 widths: padded heads, topk_length, sink, invalid and causal rows."""
    _check_on_gpu(portable_cuda_device, None, case)
