"""The sparse MLA kernels with a ranged source (``ranged=True``: a contiguous row range per query, DeepSeek-V4's
sliding window and HCA entries) against ``dsa.reference.sparse_mla`` fed with the same range written out as an index
list.

A range ``(start, end)`` of query ``(b, t)`` selects the rows ``r`` with ``start <= r < end`` and ``0 <= r < S_kv``;
the oracle here builds exactly that mask over all ``S_kv`` rows (:func:`ranges_as_indices`), independently of the
kernels' clamping arithmetic. Ranges are drawn per query from every shape that matters: inside, empty
(``end <= start``), starting below 0, ending past ``S_kv``, the full ``[0, S_kv)``, a causal window ending at the
query, and the int32 extremes (whose ``end - start`` would overflow).

Tier ``cpu_kernel`` (C target, bf16 inputs): the forward (the plain loop, which is also what a ws config builds on
the C target) and the backward, one C-target kernel each (K = V: d_qk = d_v, with a sink). Tier ``gpu``: both
forward schedules (the ws one without a key-only tail at these widths: only this tier compiles and runs it) and the
backward at V4-Flash widths (64 heads, d_qk = d_v = 512, sink). The build tier holds the default forward's sm_90a
build at those widths (``tests/test_sparse_mla_fwd_kernel.py``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from dsa.launch import sparse_mla_bwd as bwd_launch
from dsa.launch import sparse_mla_fwd as fwd_launch
from dsa.testing import poison_unreferenced_rows
from tests import strategies
from tests import test_sparse_mla_bwd_kernel as bwd_tests
from tests.test_sparse_mla_fwd_kernel import (
    CPU_LSE_TOL,
    CPU_OUT_TOL,
    GPU_LSE_TOL,
    GPU_OUT_TOL,
    check,
    make_problem,
    moved,
)
from tl_kernels import dsl
from tl_kernels import sparse_mla_fwd as fwd_kernels

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
RANGE_KINDS: tuple[str, ...] = ("inside", "empty", "negative_start", "past_end", "full", "window", "extreme")
WINDOW = 9
"""The causal window's width in the ``window`` kind (several steps of the C target's 32-row step at most)."""

FWD_STATIC = (17, 64, 64, True)
"""(heads, d_qk, d_v, has_sink) of the ranged forward's one C-target kernel: K = V (V4's layout) with a sink, 17 heads
over a padded head block. The range only changes which row an entry names, so d_qk > d_v (the index-list tests'
layout) would add nothing here but a compile."""


def make_ranges(seed: int, batch: int, seq: int, seq_kv: int) -> torch.Tensor:
    """``[batch, seq, 2]`` int32 (start, end), each query's range of a random kind of :data:`RANGE_KINDS`."""
    g = strategies.generator(seed)
    kinds = torch.randint(len(RANGE_KINDS), (batch, seq), generator=g)
    a = torch.randint(0, seq_kv + 1, (batch, seq), generator=g)
    b = torch.randint(0, seq_kv + 1, (batch, seq), generator=g)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    over = torch.randint(1, 40, (batch, seq), generator=g)
    t = torch.arange(seq).expand(batch, seq) + (seq_kv - seq)  # the query's own row, aligned bottom-right
    choices = {
        "inside": (lo, hi),
        "empty": (hi, lo),  # end <= start (equal or inverted)
        "negative_start": (-over, hi),
        "past_end": (lo, seq_kv + over),
        "full": (torch.zeros_like(lo), torch.full_like(lo, seq_kv)),
        "window": (t - WINDOW + 1, t + 1),
        "extreme": (torch.full_like(lo, INT32_MIN), torch.full_like(lo, INT32_MAX)),
    }
    start, end = torch.zeros_like(lo), torch.zeros_like(lo)
    for n, name in enumerate(RANGE_KINDS):
        first, last = choices[name]
        start, end = torch.where(kinds == n, first, start), torch.where(kinds == n, last, end)
    # Swap a few extremes: start INT32_MAX, end INT32_MIN (empty; also overflows as end - start).
    flip = (kinds == RANGE_KINDS.index("extreme")) & (torch.rand((batch, seq), generator=g) < 0.5)
    start, end = torch.where(flip, end, start), torch.where(flip, start, end)
    return torch.stack([start, end], dim=-1).to(torch.int32)


def ranges_as_indices(ranges: torch.Tensor, seq_kv: int) -> torch.Tensor:
    """``ranges [B, S, 2]`` int32 as the index list ``[B, S, S_kv]`` int32 the reference takes: row ``r`` where
    ``start <= r < end``, -1 elsewhere (the obvious definition, over every row)."""
    rows = torch.arange(seq_kv, dtype=torch.int64, device=ranges.device)
    start, end = ranges[..., :1].to(torch.int64), ranges[..., 1:].to(torch.int64)
    return torch.where((start <= rows) & (rows < end), rows, -1).to(torch.int32)


def ranged_problem(
    static: tuple[int, int, int, bool], *, batch: int, seq: int, seq_kv: int, seed: int, sm_scale: float
) -> tuple[dict[str, Any], torch.Tensor]:
    """A forward problem whose ``indices`` are the materialised ranges (for the reference), and the ranges."""
    heads, d_qk, d_v, has_sink = static
    p = make_problem(
        heads=heads, d_qk=d_qk, d_v=d_v, has_topk_length=False, has_sink=has_sink, batch=batch, seq=seq,
        seq_kv=seq_kv, topk=1, kind="regular", seed=seed, sm_scale=sm_scale,
    )  # fmt: skip
    ranges = make_ranges(seed + 7, batch, seq, seq_kv)
    return {**p, "indices": ranges_as_indices(ranges, seq_kv)}, ranges


def run_ranged_fwd(
    p: dict[str, Any], ranges: torch.Tensor, config: fwd_kernels.Config | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward launcher with ``ranges`` as its ``indices`` (ranged plan); checks it leaves them unchanged."""
    before = ranges.clone()
    out, lse = fwd_launch.sparse_mla_fwd(
        p["q"], p["kv"], ranges, sm_scale=p["sm_scale"], d_v=p["d_v"], attn_sink=p["attn_sink"], config=config,
        ranged=True,
    )  # fmt: skip
    assert torch.equal(ranges, before), "the launcher modified its ranges"
    return out, lse


# ------------------------------------------------------------------------------------------------------- forward


def test_ranged_forward_rejects_topk_length() -> None:
    """A range's end bounds its entries: a ranged kernel has no topk_length (config check and launcher)."""
    static = {"heads": 4, "d_qk": 64, "d_v": 64, "has_topk_length": True, "ranged": True, "target": dsl.CPU_TARGET}
    with pytest.raises(ValueError, match="no topk_length"):
        fwd_kernels.check_config(static, fwd_kernels.Config())
    with pytest.raises(ValueError, match="sparse_mla_fwd: a ranged kernel takes no topk_length"):
        fwd_launch.static_params(heads=4, d_qk=64, d_v=64, has_topk_length=True, has_sink=False, ranged=True)


def test_ranged_static_params_key_only_ranged_kernels() -> None:
    """``ranged`` is a static parameter of ranged kernels only: the index-list kernels keep their keys (and tuned
    cache entries), and the two never share a key."""
    plain = fwd_launch.static_params(heads=4, d_qk=64, d_v=64, has_topk_length=False, has_sink=True)
    ranged = fwd_launch.static_params(heads=4, d_qk=64, d_v=64, has_topk_length=False, has_sink=True, ranged=True)
    assert "ranged" not in plain and ranged == {**plain, "ranged": True}


def test_ranges_as_indices_is_the_range() -> None:
    """The oracle's materialisation on hand-checked rows (empty, negative start, past the end, extremes)."""
    ranges = torch.tensor([[[2, 5], [4, 4], [-3, 2], [3, 99], [INT32_MIN, INT32_MAX], [INT32_MAX, INT32_MIN]]])
    got = ranges_as_indices(ranges.to(torch.int32), 5)
    want = [[-1, -1, 2, 3, 4], [-1] * 5, [0, 1, -1, -1, -1], [-1, -1, -1, 3, 4], [0, 1, 2, 3, 4], [-1] * 5]
    assert got[0].tolist() == want


@pytest.mark.cpu_kernel
@given(
    **strategies.sizes(batch=2, seq=6, seq_kv=150),
    seed=strategies.SEEDS,
    sm_scale=st.sampled_from([64**-0.5, 0.3]),
)
# Multi-step ranges (150 rows: up to five 32-row steps) and the smallest problem.
@example(batch=2, seq=6, seq_kv=150, seed=1, sm_scale=0.3)
@example(batch=2, seq=6, seq_kv=150, seed=2, sm_scale=64**-0.5)
@example(batch=1, seq=1, seq_kv=1, seed=3, sm_scale=0.3)
def test_cpu_ranged_forward_matches_reference(batch: int, seq: int, seq_kv: int, seed: int, sm_scale: float) -> None:
    """The C-target ranged forward equals the reference over the materialised ranges (every range kind)."""
    p, ranges = ranged_problem(FWD_STATIC, batch=batch, seq=seq, seq_kv=seq_kv, seed=seed, sm_scale=sm_scale)
    out, lse = run_ranged_fwd(p, ranges)
    check(p, out, lse, CPU_OUT_TOL, CPU_LSE_TOL)


@pytest.mark.cpu_kernel
def test_cpu_ranged_forward_never_reads_rows_outside_the_ranges() -> None:
    """Rows no range covers hold NaN/±inf: out and lse are still the reference's (the kernel reads no row outside a
    range)."""
    p, ranges = ranged_problem(FWD_STATIC, batch=2, seq=5, seq_kv=200, seed=11, sm_scale=0.1)
    ranges = torch.tensor(
        [[[5, 90], [-20, 3], [180, 260], [70, 70], [100, 30]], [[0, 200], [150, 199], [-9, 0], [130, 131], [1, 2]]],
        dtype=torch.int32,
    )
    p = {**p, "indices": ranges_as_indices(ranges, 200)}
    kv, unreferenced = poison_unreferenced_rows(p["kv"], p["indices"])
    assert unreferenced.any()
    p = {**p, "kv": kv}
    out, lse = run_ranged_fwd(p, ranges)
    check(p, out, lse, CPU_OUT_TOL, CPU_LSE_TOL)


# ------------------------------------------------------------------------------------------------------ backward

BWD_STATIC = (5, 64, 64, True)
"""(heads, d_qk, d_v, has_sink) of the ranged backward: K = V (V4's layout) with a sink, 5 heads in a 16-head block,
the C-target default config (32-row steps)."""


@pytest.mark.cpu_kernel
@given(
    **strategies.sizes(batch=2, seq=4, seq_kv=100),
    seed=strategies.SEEDS,
    sm_scale=st.sampled_from([64**-0.5, 0.3]),
    with_d_lse=st.booleans(),
)
@example(batch=2, seq=4, seq_kv=100, seed=1, sm_scale=0.3, with_d_lse=True)
@example(batch=1, seq=1, seq_kv=1, seed=2, sm_scale=0.3, with_d_lse=False)
def test_cpu_ranged_backward_matches_reference(
    batch: int, seq: int, seq_kv: int, seed: int, sm_scale: float, with_d_lse: bool
) -> None:
    """The C-target ranged backward: dq and dkv equal float32 autograd through the reference over the materialised
    ranges (every range kind; rows outside every range get dkv = 0)."""
    _check_ranged_backward(BWD_STATIC, batch, seq, seq_kv, seed, sm_scale, with_d_lse, torch.device("cpu"))


def _check_ranged_backward(
    static: tuple[int, int, int, bool], batch: int, seq: int, seq_kv: int, seed: int, sm_scale: float,
    with_d_lse: bool, device: torch.device, *, atol: float = bwd_tests.ATOL, rtol: float = bwd_tests.RTOL,
) -> None:  # fmt: skip
    """The ranged backward launcher on ``device`` against float32 autograd through the reference over the
    materialised ranges (every kv row no range covers holds NaN/±inf)."""
    heads, d_qk, d_v, has_sink = static
    ranges = make_ranges(seed + 7, batch, seq, seq_kv)
    sink = torch.randn((heads,), generator=strategies.generator(seed + 3)) if has_sink else None
    problem = bwd_tests.make_problem(
        seed=seed, seq_kv=seq_kv, heads=heads, d_qk=d_qk, d_v=d_v, indices=ranges_as_indices(ranges, seq_kv),
        sm_scale=sm_scale, topk_length=None, attn_sink=sink, with_d_lse=with_d_lse, poison_unreferenced=True,
        device=device,
    )  # fmt: skip
    dq, dkv = bwd_launch.sparse_mla_bwd(
        problem.q, problem.kv, problem.out, problem.lse, problem.d_out, ranges.to(device), sm_scale=sm_scale,
        d_v=d_v, attn_sink=problem.attn_sink, d_lse=problem.d_lse, ranged=True,
    )  # fmt: skip
    bwd_tests.check_grad(dq.cpu(), problem.dq_ref.cpu(), "dq", atol=atol, rtol=rtol)
    bwd_tests.check_grad(dkv.cpu(), problem.dkv_ref.cpu(), "dkv", atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------------ GPU tier

V4_FLASH = (64, 512, 512, True)
"""(heads, d_qk, d_v, has_sink) of DeepSeek-V4-Flash's window source: K = V at 512, a sink."""
V4_SCALE = 512**-0.5
WS_GPU_CONFIG = fwd_kernels.Config(
    block_k=fwd_kernels.WS_BLOCK_K, threads=fwd_kernels.WS_THREADS, pipeline=fwd_kernels.PIPELINE_WS
)
"""The ws schedule on CUDA; at d_qk = d_v it has no key-only tail (only the GPU tier runs that code)."""


@pytest.mark.gpu
@strategies.examples(0.1)
@given(**strategies.sizes(batch=2, seq=8, seq_kv=1200), seed=strategies.SEEDS)
@example(batch=2, seq=8, seq_kv=1200, seed=1)
@example(batch=1, seq=3, seq_kv=65, seed=2)
@pytest.mark.parametrize(
    "config", [None, pytest.param(WS_GPU_CONFIG, marks=pytest.mark.ws)], ids=["default", "ws"]
)
def test_gpu_ranged_forward_matches_reference(
    cuda_device: torch.device, config: fwd_kernels.Config | None, batch: int, seq: int, seq_kv: int, seed: int
) -> None:
    """The sm_90a ranged forward at V4-Flash widths (both schedules) equals the reference over the materialised
    ranges; rows outside every range hold NaN/±inf."""
    p, ranges = ranged_problem(V4_FLASH, batch=batch, seq=seq, seq_kv=seq_kv, seed=seed, sm_scale=V4_SCALE)
    kv, _ = poison_unreferenced_rows(p["kv"], p["indices"])
    p = moved({**p, "kv": kv}, cuda_device)
    out, lse = run_ranged_fwd(p, ranges.to(cuda_device), config)
    torch.cuda.synchronize()
    check(p, out, lse, GPU_OUT_TOL, GPU_LSE_TOL)


@pytest.mark.gpu
@strategies.examples(0.1)
@given(**strategies.sizes(batch=2, seq=4, seq_kv=600), seed=strategies.SEEDS, with_d_lse=st.booleans())
@example(batch=2, seq=4, seq_kv=600, seed=3, with_d_lse=True)
def test_gpu_ranged_backward_matches_reference(
    cuda_device: torch.device, batch: int, seq: int, seq_kv: int, seed: int, with_d_lse: bool
) -> None:
    """The sm_90a ranged backward at V4-Flash widths: dq and dkv equal float32 autograd over the materialised
    ranges."""
    _check_ranged_backward(V4_FLASH, batch, seq, seq_kv, seed, V4_SCALE, with_d_lse, cuda_device,
                           atol=bwd_tests.GPU_ATOL, rtol=bwd_tests.GPU_RTOL)  # fmt: skip
