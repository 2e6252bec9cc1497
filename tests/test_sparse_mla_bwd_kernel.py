"""Sparse MLA backward kernels (``tl_kernels.sparse_mla_bwd`` through ``dsa.launch.sparse_mla_bwd``).

Tiers:
- ``cpu_kernel``: the C-target build against autograd through ``dsa.reference.sparse_mla`` (float32 reference on the
  bf16-rounded inputs), over every index pattern of ``tests.strategies`` plus ``topk_length``, attention sinks and
  head counts that are not multiples of the head block. A few fixed static-parameter cases keep compiles to a handful.
- ``build``: every config of the tuning space compiles for sm_90a at DeepSeek-V3.2 shapes with no register spills,
  shared memory within the limit and wgmma in the main kernel.
- ``gpu``: the same properties against the CUDA kernels at V3.2 shapes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsa import reference
from dsa.launch import sparse_mla_bwd as launch
from dsa.testing import assert_close, poison_unreferenced_rows
from tests import strategies, support
from tl_kernels import build as tl_build
from tl_kernels import sparse_mla_bwd as kernels

# Against float32 autograd on the same bf16 inputs. The C target keeps its MMA operands in float32, so only the bf16
# rounding of dq/dkv remains (worst error seen over 150 examples: 0.17 of a 2e-2 tolerance). On CUDA p and ds
# also enter the MMAs as bf16 and sums run over up to 2048 entries, hence the looser GPU tolerance.
ATOL = 1e-2
RTOL = 1e-2
GPU_ATOL = 2e-2
GPU_RTOL = 2e-2


@dataclasses.dataclass(frozen=True)
class StaticCase:
    """One compiled main kernel on the C target: static parameters plus the config it runs with."""

    name: str
    heads: int
    d_qk: int
    d_v: int
    has_topk_length: bool
    has_sink: bool
    config: kernels.Config

    @property
    def dims(self) -> dict[str, int]:
        """``heads``, ``d_qk`` and ``d_v``, as :func:`make_problem` takes them."""
        return {"heads": self.heads, "d_qk": self.d_qk, "d_v": self.d_v}


# Few static cases, each one C-target compile; runtime sizes (B, S, S_kv, k <= 64, index pattern) vary freely.
SMALL_CASES = (
    # 5 heads in one 16-head block; 32-index blocks (two per padded row of 64), dkv computed transposed.
    StaticCase("h5_plain", 5, 80, 64, False, False, kernels.CPU_DEFAULT),
    # 20 heads over two 16-head blocks; one 64-index block, dkv as [block_topk, chunk] over chunks of 32, 32, 16.
    StaticCase(
        "h20_len_sink", 20, 80, 64, True, True,
        kernels.Config(block_h=16, block_topk=64, dkv_chunk=32, num_stages=0, threads=128),
    ),
)
# The exact Hopper default schedule (64-head block, 64-column chunks) at V3.2 widths with 3 heads, on the C target.
WIDE_CASE = StaticCase("v32_width_h3", 3, 576, 512, True, True, kernels.Config())
MAX_TOPK_CPU = kernels.TOPK_ALIGN  # every k drawn pads to one static topk

V32 = {"heads": 128, "d_qk": 576, "d_v": 512, "topk": 2048}
V32_SM_SCALE = 192**-0.5  # V3.2's softmax scale before the YaRN mscale factor



@dataclasses.dataclass
class Problem:
    """One backward problem: bf16 inputs, the forward's out/lse, and the float32 autograd reference."""

    q: torch.Tensor
    kv: torch.Tensor
    indices: torch.Tensor
    d_out: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    sm_scale: float
    d_v: int
    topk_length: torch.Tensor | None
    attn_sink: torch.Tensor | None
    d_lse: torch.Tensor | None
    dq_ref: torch.Tensor
    dkv_ref: torch.Tensor


def make_problem(
    *,
    seed: int,
    seq_kv: int,
    heads: int,
    d_qk: int,
    d_v: int,
    indices: torch.Tensor,
    sm_scale: float,
    topk_length: torch.Tensor | None,
    attn_sink: torch.Tensor | None,
    with_d_lse: bool = False,
    poison_unreferenced: bool = False,
    device: torch.device | str = "cpu",
) -> Problem:
    """Random bf16 inputs and the float32 reference gradients (autograd through ``dsa.reference.sparse_mla``).

    The kernel receives the forward's ``out`` rounded to bf16, as a real forward returns it, so its
    ``delta = rowsum(out * d_out)`` differs from float32 autograd's by ``delta_err``. When a row's softmax is sharp,
    ``dp - delta`` cancels and that rounding would dominate the comparison. The gradient is linear in delta, with
    ``d grad / d delta = -sm_scale * p`` where ``p = exp(s - lse_eff) = exp(s - lse) * exp(lse - lse_eff)``, i.e. the
    gradient of ``lse`` scaled by ``exp(lse - lse_eff)``. So autograd of ``<out, d_out> + <lse, c>`` with
    ``c = -delta_err * exp(lse - lse_eff)`` (0 on empty rows) is exactly the gradient for the kernel's inputs.

    With ``with_d_lse`` the loss also has a random gradient ``d_lse [B, S, H]`` for ``lse`` (given to the kernel; the
    reference receives it plus ``c``). With ``poison_unreferenced`` every kv row that no valid entry selects holds
    NaN/±inf (see ``tests.helpers.poison_unreferenced_rows``). Batch and queries are those of ``indices [B, S, k]``.
    """
    batch, seq, _ = indices.shape
    g = strategies.generator(seed)
    q = torch.randn((batch, seq, heads, d_qk), generator=g).to(torch.bfloat16)
    kv = torch.randn((batch, seq_kv, d_qk), generator=g).to(torch.bfloat16)
    if poison_unreferenced:
        kv, _ = poison_unreferenced_rows(kv, indices, topk_length)
    d_out = torch.randn((batch, seq, heads, d_v), generator=g).to(torch.bfloat16)
    user_d_lse = torch.randn((batch, seq, heads), generator=g).to(device) if with_d_lse else None
    q32 = q.float().to(device).requires_grad_(True)
    kv32 = kv.float().to(device).requires_grad_(True)
    d_out32 = d_out.float().to(device)
    sink = None if attn_sink is None else attn_sink.to(device)
    out32, lse = reference.sparse_mla(
        q32,
        kv32,
        indices.to(device),
        sm_scale=sm_scale,
        d_v=d_v,
        topk_length=None if topk_length is None else topk_length.to(device),
        attn_sink=sink,
    )
    with torch.no_grad():
        out_bf16 = out32.to(torch.bfloat16)
        delta_err = ((out_bf16.double() - out32.double()) * d_out32.double()).sum(-1)
        lse64 = lse.double()
        lse_eff = lse64 if sink is None else torch.logaddexp(lse64, sink.double().view(1, 1, -1))
        scale = torch.where(torch.isfinite(lse64), torch.exp(lse64 - lse_eff), torch.zeros_like(lse64))
        d_lse = (-delta_err * scale).float()
        if user_d_lse is not None:
            d_lse = d_lse + user_d_lse
    torch.autograd.backward((out32, lse), (d_out32, d_lse))
    return Problem(
        q=q.to(device),
        kv=kv.to(device),
        indices=indices.to(device),
        d_out=d_out.to(device),
        out=out_bf16,
        lse=lse.detach().float().contiguous(),
        sm_scale=sm_scale,
        d_v=d_v,
        topk_length=None if topk_length is None else topk_length.to(device),
        attn_sink=None if attn_sink is None else attn_sink.to(device),
        d_lse=user_d_lse,
        dq_ref=q32.grad.detach(),
        dkv_ref=kv32.grad.detach(),
    )


def run_and_check(
    problem: Problem, config: kernels.Config | None = None, *, atol: float = ATOL, rtol: float = RTOL
) -> None:
    """Run the launcher on ``problem`` and compare dq and dkv with the reference."""
    dq, dkv = launch.sparse_mla_bwd(
        problem.q,
        problem.kv,
        problem.out,
        problem.lse,
        problem.d_out,
        problem.indices,
        sm_scale=problem.sm_scale,
        d_v=problem.d_v,
        topk_length=problem.topk_length,
        attn_sink=problem.attn_sink,
        d_lse=problem.d_lse,
        config=config,
    )
    assert dq.dtype == torch.bfloat16 and dkv.dtype == torch.bfloat16
    check_grad(dq, problem.dq_ref, "dq", atol=atol, rtol=rtol)
    check_grad(dkv, problem.dkv_ref, "dkv", atol=atol, rtol=rtol)


def check_grad(
    actual: torch.Tensor, expected: torch.Tensor, name: str, *, atol: float = ATOL, rtol: float = RTOL
) -> None:
    """Tolerances for bf16 gradients plus the scale-sensitive difference, which ``dsa.testing.compare`` skips where
    the reference is zero up to ``atol``: a row with a single valid index has ``dq = p * (dp - delta) * k = 0``
    exactly; the kernel returns 0 while the float32 reference leaves ~1e-8 of noise, which has no scale to compare."""
    assert_close(actual, expected, atol=atol, rtol=rtol, name=name)


SINK_KINDS = ("normal", "large", "some_neg_inf", "some_pos_inf")


def _sink(seed: int, heads: int, kind: str) -> torch.Tensor:
    """``[heads]`` float32 sink logits: ordinary, dominating every score, or absent (``-inf``) or absorbing
    everything (``+inf``: out = 0, only the gradient through ``lse`` is left) for some heads."""
    g = strategies.generator(seed)
    sink = torch.randn((heads,), generator=g)
    if kind == "large":
        sink = sink + 8.0
    elif kind in ("some_neg_inf", "some_pos_inf"):
        infinity = float("-inf") if kind == "some_neg_inf" else float("inf")
        sink = torch.where(torch.rand((heads,), generator=g) < 0.5, infinity, sink)
    return sink.float()


# --------------------------------------------------------------------------------------------------- CPU tier


@st.composite
def cpu_problems(
    draw: st.DrawFn,
    cases: tuple[StaticCase, ...],
    max_seq: int,
    max_seq_kv: int,
    topk_range: tuple[int, int] = (1, MAX_TOPK_CPU),
):
    case = draw(st.sampled_from(cases))
    batch = draw(st.integers(1, 2))
    seq = draw(st.integers(1, max_seq))
    seq_kv = draw(st.integers(1, max_seq_kv))
    k = draw(st.integers(*topk_range))
    kind, indices = draw(strategies.index_patterns(batch, seq, seq_kv, k))
    seed = draw(strategies.SEEDS)
    sm_scale = draw(st.sampled_from((case.d_qk**-0.5, 0.3)))  # 0.3: sharp softmax rows
    topk_length = strategies.make_topk_length(seed + 1, batch, seq, k) if case.has_topk_length else None
    sink_kind = draw(st.sampled_from(SINK_KINDS))
    sink = _sink(seed + 2, case.heads, sink_kind) if case.has_sink else None
    with_d_lse = draw(st.booleans())
    problem = make_problem(
        seed=seed, seq_kv=seq_kv, **case.dims, indices=indices, sm_scale=sm_scale, topk_length=topk_length,
        attn_sink=sink, with_d_lse=with_d_lse,
    )  # fmt: skip
    return case, kind, problem


@pytest.mark.cpu_kernel
@given(data=cpu_problems(SMALL_CASES, max_seq=4, max_seq_kv=48))
def test_cpu_matches_reference(data: tuple[StaticCase, str, Problem]) -> None:
    """C-target backward vs float32 autograd over index patterns, topk_length, sinks and padded head blocks."""
    case, _kind, problem = data
    run_and_check(problem, case.config)


# k between two and three alignment blocks: every k pads to 3 * 64 index columns (one more compile per case), which the
# kernel walks in three 64-index blocks (h20_len_sink) or six 32-index blocks (h5_plain), so the loop over blocks,
# topk_length cuts inside later blocks and partial last blocks are fuzzed too.
MULTI_BLOCK_TOPK = (2 * kernels.TOPK_ALIGN + 1, 3 * kernels.TOPK_ALIGN)


@pytest.mark.cpu_kernel
@strategies.examples(0.3)
@given(data=cpu_problems(SMALL_CASES, max_seq=3, max_seq_kv=220, topk_range=MULTI_BLOCK_TOPK))
def test_cpu_matches_reference_over_three_index_blocks(data: tuple[StaticCase, str, Problem]) -> None:
    """C-target backward vs float32 autograd with k of 129..192 entries: three or more index blocks per row."""
    case, _kind, problem = data
    assert problem.indices.shape[-1] > 2 * kernels.TOPK_ALIGN
    run_and_check(problem, case.config)


@pytest.mark.cpu_kernel
@strategies.examples(0.04)
@given(data=cpu_problems((WIDE_CASE,), max_seq=2, max_seq_kv=80))
def test_cpu_v32_width(data: tuple[StaticCase, str, Problem]) -> None:
    """The Hopper default schedule at d_qk=576, d_v=512 (3 heads padded to a 64-head block) on the C target."""
    case, _kind, problem = data
    run_and_check(problem, case.config)


def _fixed_problem(case: StaticCase, indices: torch.Tensor, seq_kv: int, *, topk_length=None, seed: int = 0) -> Problem:
    batch, seq, _ = indices.shape
    sink = _sink(seed + 2, case.heads, "normal") if case.has_sink else None
    if case.has_topk_length and topk_length is None:
        topk_length = torch.full((batch, seq), indices.shape[-1], dtype=torch.int32)
    return make_problem(
        seed=seed, seq_kv=seq_kv, **case.dims, indices=indices, sm_scale=case.d_qk**-0.5, topk_length=topk_length,
        attn_sink=sink,
    )  # fmt: skip


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.name)
def test_cpu_duplicates_accumulate(case: StaticCase) -> None:
    """Every query and every slot uses the same two kv rows: dkv must sum all of them (atomics, not stores)."""
    batch, seq, seq_kv, k = 2, 3, 5, 40
    indices = torch.tensor([1, 3] * (k // 2), dtype=torch.int32).expand(batch, seq, k).contiguous()
    problem = _fixed_problem(case, indices, seq_kv)
    run_and_check(problem, case.config)
    untouched = torch.ones(seq_kv, dtype=torch.bool)
    untouched[[1, 3]] = False
    assert (problem.dkv_ref[:, untouched] == 0).all()


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.name)
def test_cpu_empty_rows_are_zero(case: StaticCase) -> None:
    """Rows with no valid index (lse = -inf) give dq = 0 exactly and add nothing to dkv; no NaN anywhere."""
    batch, seq, seq_kv, k = 1, 3, 7, 33
    g = strategies.generator(5)
    indices = torch.randint(0, seq_kv, (batch, seq, k), generator=g, dtype=torch.int32)
    indices[0, 1] = -1  # all invalid
    indices[0, 2, : k // 2] = seq_kv  # out of range ...
    indices[0, 2, k // 2 :] = -7  # ... and negative
    problem = _fixed_problem(case, indices, seq_kv)
    assert torch.isneginf(problem.lse[0, 1:]).all()
    dq, dkv = launch.sparse_mla_bwd(
        problem.q, problem.kv, problem.out, problem.lse, problem.d_out, problem.indices,
        sm_scale=problem.sm_scale, d_v=problem.d_v, topk_length=problem.topk_length, attn_sink=problem.attn_sink,
        config=case.config,
    )
    assert (dq[0, 1:] == 0).all(), "empty rows must have dq == 0"
    check_grad(dq, problem.dq_ref, "dq")
    check_grad(dkv, problem.dkv_ref, "dkv")


@pytest.mark.cpu_kernel
def test_cpu_single_index_row() -> None:
    """k = 1, S_kv = 1: dq is exactly 0 (softmax over one entry); found by Hypothesis (cosine of a zero vector)."""
    case = SMALL_CASES[0]
    problem = _fixed_problem(case, torch.zeros((1, 1, 1), dtype=torch.int32), 1)
    run_and_check(problem, case.config)


@pytest.mark.cpu_kernel
@pytest.mark.parametrize(
    ("k", "lengths"),
    [
        (48, [0, 1, 17, 53]),  # one index block
        (150, [-3, 64, 65, 129, 157]),  # three blocks: the kernel runs ceil(length / 64) of them (none below 1)
    ],
)
def test_cpu_topk_length_cuts_rows(k: int, lengths: list[int]) -> None:
    """Entries at positions >= topk_length are ignored even when they hold valid indices; negative lengths count
    as 0 and lengths above k as k."""
    case = SMALL_CASES[1]
    assert case.has_topk_length and case.config.block_topk == 64
    batch, seq, seq_kv = 1, len(lengths), 30
    g = strategies.generator(11)
    indices = torch.randint(0, seq_kv, (batch, seq, k), generator=g, dtype=torch.int32)
    topk_length = torch.tensor([lengths], dtype=torch.int32)
    problem = _fixed_problem(case, indices, seq_kv, topk_length=topk_length)
    run_and_check(problem, case.config)


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.name)
def test_cpu_gradient_through_lse(case: StaticCase) -> None:
    """A loss on ``out`` and ``lse``: the kernel's d_lse term, with sinks of +inf (p = 0, only the lse path is left),
    -inf and finite values across the heads, and an empty row."""
    batch, seq, seq_kv, k = 2, 3, 30, 37
    indices = strategies.make_indices("mixed_rows", 4, batch, seq, seq_kv, k)
    indices[1, 2] = -1  # an empty row: lse = -inf, nothing to differentiate
    sink = None
    if case.has_sink:
        sink = torch.randn((case.heads,), generator=strategies.generator(6))
        sink[0::3] = float("inf")
        sink[1::3] = float("-inf")
    problem = make_problem(
        seed=8, seq_kv=seq_kv, **case.dims, indices=indices, sm_scale=case.d_qk**-0.5,
        topk_length=strategies.make_topk_length(9, batch, seq, k) if case.has_topk_length else None,
        attn_sink=sink, with_d_lse=True,
    )
    assert problem.d_lse is not None and problem.d_lse.abs().min() > 0
    run_and_check(problem, case.config)


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.name)
def test_cpu_non_finite_rows_behind_invalid_entries_change_nothing(case: StaticCase) -> None:
    """Invalid entries (negative, out of range, past topk_length) naming rows that hold NaN/±inf: dq and dkv match
    the reference, which never reads them, and those rows get dkv = 0."""
    batch, seq, seq_kv, k = 2, 3, 70, 45
    indices = strategies.make_indices("mixed_rows", 12, batch, seq, seq_kv, k)
    junk = torch.randint(-2, seq_kv + 2, (batch, seq, 19), generator=strategies.generator(13)).to(indices.dtype)
    indices = torch.cat([indices, junk], dim=-1)
    # topk_length cuts every row before the junk (also for the case without topk_length support, through -1s).
    if case.has_topk_length:
        topk_length = strategies.make_topk_length(14, batch, seq, k)
    else:
        topk_length = None
        indices[..., k:] = torch.where(junk < 0, junk, -1 - junk.abs())
    problem = make_problem(
        seed=15, seq_kv=seq_kv, **case.dims, indices=indices, sm_scale=case.d_qk**-0.5, topk_length=topk_length,
        attn_sink=_sink(16, case.heads, "normal") if case.has_sink else None, poison_unreferenced=True,
    )
    assert not torch.isfinite(problem.kv.float()).all(), "the problem must hold non-finite rows"
    run_and_check(problem, case.config)


@pytest.mark.cpu_kernel
def test_cpu_sharp_single_entry_row_with_sink() -> None:
    """One valid entry, a sink and a sharp scale: dp - delta cancels, so the bf16 rounding of ``out`` dominates.

    Found by Hypothesis (dq off by 0.02 against plain autograd); the oracle now accounts for the kernel's bf16 ``out``
    (see ``make_problem``), and this pins that the kernel matches it.
    """
    case = SMALL_CASES[1]
    batch, seq, heads = 1, 1, case.heads
    problem = make_problem(
        seed=0, seq_kv=1, **case.dims,
        indices=torch.zeros((batch, seq, 1), dtype=torch.int32), sm_scale=0.3,
        topk_length=torch.ones((batch, seq), dtype=torch.int32), attn_sink=_sink(2, heads, "normal"),
    )
    run_and_check(problem, case.config)


@pytest.mark.cpu_kernel
def test_cpu_launcher_default_config() -> None:
    """Without an explicit config the launcher picks the C-target default and still matches the reference."""
    case = SMALL_CASES[0]
    indices = strategies.make_indices("irregular", 3, 1, 2, 20, 9)
    problem = _fixed_problem(case, indices, 20)
    run_and_check(problem)


# ------------------------------------------------------------------------------------------------- build tier


V32_STATIC = {**V32, "has_topk_length": True, "has_sink": True}
HOPPER_CONFIGS = support.hopper_configs(launch.KERNEL_NAME, V32_STATIC)


def test_tuning_space_is_small_and_valid() -> None:
    """CI compiles every config: keep it to 2-3, and the defaults must pass their own checks."""
    assert 1 <= len(HOPPER_CONFIGS) <= 3
    kernels.check_config({**V32_STATIC, "target": kernels.dsl.HOPPER_TARGET}, kernels.default_config(V32_STATIC))
    kernels.check_config({**V32_STATIC, "target": "c"}, kernels.default_config({**V32_STATIC, "target": "c"}))
    with pytest.raises(ValueError, match="block_h"):
        kernels.check_config({**V32_STATIC, "target": kernels.dsl.HOPPER_TARGET}, kernels.Config(block_h=16))
    with pytest.raises(ValueError, match="topk"):
        kernels.check_config({**V32_STATIC, "topk": 2048 + 32}, kernels.Config(block_topk=64))


HELPER_BUILDS: list[tuple[str, Any, dict[str, int]]] = [
    ("preprocess", kernels.build_preprocess, {"d_v": V32["d_v"]}),
    ("postprocess", kernels.build_postprocess, {"d_qk": V32["d_qk"]}),
]


hopper_prebuilt = support.prebuilt_fixture(
    lambda: [(kernels.build, {**V32_STATIC, **kernels.config_params(c)}) for c in HOPPER_CONFIGS]
    + [(builder, params) for _, builder, params in HELPER_BUILDS]
)


@pytest.mark.build
@pytest.mark.usefixtures("hopper_prebuilt")
@pytest.mark.parametrize(
    "config", HOPPER_CONFIGS, ids=lambda c: f"bh{c.block_h}_bk{c.block_topk}_c{c.dkv_chunk}_s{c.num_stages}"
)
def test_hopper_main_kernel_static(config: kernels.Config) -> None:
    """No spills, no serialised wgmma, shared memory within the limit, every MMA a wgmma, at V3.2 shapes; and one
    wgmma wait per MMA group (s with dp, dq with the first dkv chunk, each further dkv chunk), not one per 64-column
    MMA."""
    kernel, report = support.hopper_build(
        f"sparse_mla_bwd {config}", kernels.build, **V32_STATIC, **kernels.config_params(config)
    )
    assert report.problems(mma=tl_build.MMA_WGMMA) == [], report.ptxas_log
    source = kernel.get_kernel_source()
    groups = 1 + len(kernels.chunk_bounds(V32["d_qk"], V32["d_v"], config.dkv_chunk))
    assert source.count("wait_wgmma<0>") == groups, "expected one wgmma wait per MMA group in the step loop"
    assert "warpgroup_wait" not in source, "a T.gemm with its own implicit wait is back in the main kernel"
    support.assert_wide_addressing(source)
    # The gather's load is guarded by the bounds of a row number that is -1 for invalid slots (zero-fill, no read).
    assert re.search(r"if \(\(\(0 <= condval_\d+\) && \(condval_\d+ < seq_kv\)\)\)", source), (
        "the kv gather no longer zero-fills invalid slots behind a bounds guard"
    )


@pytest.mark.build
@pytest.mark.usefixtures("hopper_prebuilt")
@pytest.mark.parametrize(("name", "builder", "params"), HELPER_BUILDS)
def test_hopper_helper_kernels_static(name: str, builder: Any, params: dict[str, int]) -> None:
    """The delta preprocess and the dkv cast: no spills, shared memory within the limit, no GEMM."""
    _, report = support.hopper_build(f"sparse_mla_bwd {name}", builder, **params)
    assert report.problems() == [] and report.mma == {}, report.ptxas_log


# --------------------------------------------------------------------------------------------------- GPU tier


class GpuStatic(NamedTuple):
    """The static parameters a GPU problem varies besides the padded top-k (widths are V3.2's, 576/512)."""

    heads: int
    has_topk_length: bool
    has_sink: bool


# Every main kernel the GPU tier compiles comes from these few combos (times the padded top-k of GPU_TOPKS); each is an
# sm_90a compile of 5-30 s (see GPU_KERNELS below).
GPU_STATICS: tuple[GpuStatic, ...] = (
    GpuStatic(V32["heads"], False, False),  # plain V3.2 (heavy duplicates)
    GpuStatic(V32["heads"], True, True),  # everything on (every tuning config)
    GpuStatic(V32["heads"], True, False),  # topk_length alone (non-finite rows behind invalid entries)
    GpuStatic(72, True, True),  # padded heads: a second 64-head block with 8 real heads, the sink sliced to them
)
# The k of the fuzzed indices: the full top-k, one the launcher pads up to it, and a single entry (padded to
# TOPK_ALIGN, the second static topk).
GPU_TOPKS: tuple[int, ...] = (V32["topk"], V32["topk"] - 5, 1)


def gpu_kernel_static(static: GpuStatic, k: int) -> dict[str, Any]:
    """The main kernel's static parameters for a GPU problem of ``static`` with ``k`` indices per query, as
    ``dsa.launch.sparse_mla_bwd`` passes them to ``build`` (the pre/post kernels depend on d_v/d_qk alone)."""
    return {
        "heads": static.heads,
        "d_qk": V32["d_qk"],
        "d_v": V32["d_v"],
        "topk": launch.padded_topk(k),
        "has_topk_length": static.has_topk_length,
        "has_sink": static.has_sink,
    }


GPU_KERNEL_STATICS: tuple[dict[str, Any], ...] = tuple(
    gpu_kernel_static(static, topk)
    for topk in sorted({launch.padded_topk(k) for k in GPU_TOPKS}, reverse=True)
    for static in GPU_STATICS
)
"""Every static parameter set of the main kernel the GPU tests compile."""
GPU_CONFIGS: tuple[kernels.Config, ...] = tuple(HOPPER_CONFIGS)
"""The configs the GPU tests pass explicitly (the others run the launcher's choice, the default on a fresh host)."""
GPU_KERNELS: dict[str, tuple[dict[str, Any], ...]] = {launch.KERNEL_NAME: GPU_KERNEL_STATICS}
"""What the GPU tests compile, by kernel: the one-shot GPU check compiles these (every config of the whole tuning
space) in parallel before it runs the tests (``pytest --collect-only --dsa-gpu-kernels FILE``, tests/conftest.py)."""


@st.composite
def gpu_problems(draw: st.DrawFn, device: torch.device):
    batch = draw(st.integers(1, 2))
    seq = draw(st.integers(1, 4))
    seq_kv = draw(st.sampled_from((1, 100, 2048, 4096)))
    k = draw(st.sampled_from(GPU_TOPKS))
    kind, indices = draw(strategies.index_patterns(batch, seq, seq_kv, k))
    seed = draw(strategies.SEEDS)
    static = draw(st.sampled_from(GPU_STATICS))
    topk_length = strategies.make_topk_length(seed + 1, batch, seq, k) if static.has_topk_length else None
    sink_kind = draw(st.sampled_from(SINK_KINDS))
    sink = _sink(seed + 2, V32["heads"], sink_kind) if static.has_sink else None
    with_d_lse = draw(st.booleans())
    problem = make_problem(
        seed=seed, seq_kv=seq_kv, heads=static.heads, d_qk=V32["d_qk"], d_v=V32["d_v"], indices=indices,
        sm_scale=V32_SM_SCALE, topk_length=topk_length,
        attn_sink=None if sink is None else sink[: static.heads].contiguous(), with_d_lse=with_d_lse, device=device,
    )  # fmt: skip
    return kind, problem


@pytest.mark.gpu
@strategies.examples(0.2)
@given(data=st.data())
def test_gpu_matches_reference(data: st.DataObject) -> None:
    """CUDA backward (tuned or default config) vs float32 autograd at V3.2 widths."""
    kind, problem = data.draw(gpu_problems(torch.device("cuda")))
    run_and_check(problem, atol=GPU_ATOL, rtol=GPU_RTOL)


def _v32_gpu_problem(static: GpuStatic, kind: str, seed: int, seq: int, seq_kv: int, **options: Any) -> Problem:
    """A problem of ``static`` (k = 2048, V3.2 widths) on the GPU with indices of pattern ``kind``; ``options`` give
    exactly the topk_length and attn_sink that ``static`` says it has."""
    indices = strategies.make_indices(kind, seed, 1, seq, seq_kv, V32["topk"])
    options = {"topk_length": None, "attn_sink": None, **options}
    given_options = (options["topk_length"] is not None, options["attn_sink"] is not None)
    assert given_options == (static.has_topk_length, static.has_sink), "options must match a GPU_STATICS combo"
    return make_problem(
        seed=seed + 1, seq_kv=seq_kv, heads=static.heads, d_qk=V32["d_qk"], d_v=V32["d_v"],
        indices=indices, sm_scale=V32_SM_SCALE, device=torch.device("cuda"), **options,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda c: f"bh{c.block_h}_bk{c.block_topk}")
def test_gpu_every_config(config: kernels.Config) -> None:
    """Every tuning-space config gives the same gradients at the full V3.2 shape (128 heads, topk 2048)."""
    k = V32["topk"]
    problem = _v32_gpu_problem(
        GPU_STATICS[1], "irregular", 7, seq=3, seq_kv=4096,  # everything on: topk_length and sink
        topk_length=torch.full((1, 3), k - 100, dtype=torch.int32), attn_sink=_sink(3, V32["heads"], "normal"),
    )
    run_and_check(problem, config, atol=GPU_ATOL, rtol=GPU_RTOL)


@pytest.mark.gpu
def test_gpu_heavy_duplicates() -> None:
    """Many queries scattering into few kv rows stresses atomic accumulation under contention."""
    problem = _v32_gpu_problem(GPU_STATICS[0], "duplicates", 9, seq=16, seq_kv=64)
    run_and_check(problem, atol=GPU_ATOL, rtol=GPU_RTOL)


@pytest.mark.gpu
def test_gpu_non_finite_rows_behind_invalid_entries_change_nothing() -> None:
    """NaN/±inf in every kv row no valid entry selects (invalid entries name them or are clamped onto them)."""
    problem = _v32_gpu_problem(
        GPU_STATICS[2], "mixed_rows", 17, seq=4, seq_kv=3000,
        topk_length=strategies.make_topk_length(19, 1, 4, V32["topk"]), poison_unreferenced=True,
    )
    assert not torch.isfinite(problem.kv.float()).all(), "the problem must hold non-finite rows"
    run_and_check(problem, atol=GPU_ATOL, rtol=GPU_RTOL)


@pytest.mark.gpu
@pytest.mark.portable
@pytest.mark.usefixtures("portable_cuda_device")
@pytest.mark.parametrize("kind", ["irregular", "duplicates", "mixed_rows"])
def test_gpu_portable_matches_reference(kind: str) -> None:
    """The portable schedule (T.gemm as mma.sync, nothing left in flight) built for this GPU's portable architecture
    (sm_90 on Hopper) with its default config, at the full V3.2 shape with topk_length and sink."""
    k = V32["topk"]
    problem = _v32_gpu_problem(
        GPU_STATICS[1], kind, 23, seq=3, seq_kv=4096,
        topk_length=torch.full((1, 3), k - 100, dtype=torch.int32), attn_sink=_sink(5, V32["heads"], "normal"),
    )  # fmt: skip
    run_and_check(problem, atol=GPU_ATOL, rtol=GPU_RTOL)
