"""Lightning indexer kernel (``tl_kernels.indexer`` through ``dsa.launch.indexer``).

Tiers:
- ``cpu_kernel``: the C-target build against ``dsa.reference.index_scores`` for bf16 and FP8, causal and range
  visibility, ``S != S_kv`` both ways, rows that see nothing, weights of both signs; outputs NaN-poisoned, invisible
  positions exactly ``-inf``. A few fixed static cases (each one compile); B, S, S_kv and the inputs vary freely.
- ``build``: the default config and every config of the tuning space, for both dtypes and both modes, compile for
  sm_90a at DeepSeek-V3.2 indexer shapes (64 heads x 128 dims) with no spills, shared memory within the limit and
  wgmma in the source.
- ``gpu``: the same properties against the CUDA kernels, every tuning-space config at V3.2 shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import problems
from dsa import reference, testing
from dsa.launch import common
from dsa.launch import indexer as launch
from dsa.testing import assert_close
from tests import strategies, support
from tl_kernels import build as tl_build
from tl_kernels import dsl
from tl_kernels import indexer as kernels

RANGE_PATTERNS = testing.RANGE_PATTERNS
# Tolerances are relative to the largest |term sum| of a row, ``k_scale * sum_j |w_j| relu(q_j . k)`` (what the
# reference returns for |weights|): with weights of both signs a score can cancel to far below its terms, and float32
# rounding scales with the terms, not with the result.
CPU_TOL = 2e-5  # float32 sums of exact bf16/e4m3 products: ~(H + D) ulps of the terms at most
GPU_TOL = 2e-3  # wgmma accumulation (FP8 tensor cores keep fewer accumulator bits) and a different summation order
# Largest scale-sensitive difference (dsa.testing.compare): float32 sums give ~1e-10 on the C target; wgmma FP8
# accumulation ~1e-6 on CUDA. A 1 % scale error gives 5e-5: both bounds reject it.
CPU_MAX_DIFF = 1e-8
GPU_MAX_DIFF = 1e-5
V32 = {"heads": 64, "dim": 128}
FP8 = "float8_e4m3fn"
# (S, S_kv): more queries than keys, one key, S_kv just past two 64-key tiles, a square prefill.
EDGE_SHAPES = [(9, 3), (1, 1), (5, 130), (70, 70)]


@dataclasses.dataclass(frozen=True)
class StaticCase:
    """One compiled kernel: static parameters plus the config it runs with."""

    name: str
    heads: int
    dim: int
    dtype: str
    mode: str
    config: kernels.Config

    @property
    def static(self) -> dict[str, Any]:
        return {"heads": self.heads, "dim": self.dim, "dtype": self.dtype, "mode": self.mode}


# Few static cases (each one C-target compile of a few seconds); runtime sizes and inputs vary freely.
CPU_CASES = tuple(
    StaticCase(f"h4_d32_{dtype}_{mode}", 4, 32, dtype, mode, kernels.CPU_DEFAULT)
    for dtype in kernels.DTYPES
    for mode in kernels.MODES
) + (
    # 5 heads padded to 8 rows per query, 2 queries per block, 32-key tiles: the padding path.
    StaticCase(
        "h5_pad_fp8_range", 5, 32, "float8_e4m3fn", "range",
        kernels.Config(q_rows=16, block_N=32, num_stages=1, threads=128),
    ),
)
# bf16 keys with padded heads (5 heads padded to 8 rows per query): an infinite key element times a padded head's
# zero q row is NaN, which must not reach the score (the non-finite tests; FP8 keys have no infinity).
PADDED_BF16_CASE = StaticCase(
    "h5_pad_bf16_causal", 5, 32, "bfloat16", "causal", kernels.Config(q_rows=16, block_N=32, num_stages=1, threads=128)
)
# The exact Hopper default schedule (2 queries x 64 heads x 256 keys) at V3.2 widths, on the C target.
V32_CPU_CASES = (
    StaticCase("v32_fp8_causal", 64, 128, "float8_e4m3fn", "causal", kernels.Config()),
    StaticCase("v32_bf16_range", 64, 128, "bfloat16", "range", kernels.Config()),
)



# ------------------------------------------------------------------------------------------------- problems

Problem = dict[str, Any]
"""The arguments of one indexer call (``benchmarks.problems.IndexerProblem``'s inputs), on the CPU."""


def make_problem(
    case: StaticCase, seed: int, batch: int, seq: int, seq_kv: int, range_kind: str = "random", spread: float = 1.0
) -> Problem:
    """Random inputs of ``case``'s dtype and mode: normal q/k times ``spread`` (FP8: many exponents, subnormals
    included), weights of both signs, positive per-key scales (FP8 only) and, in range mode, ``starts``/``ends``."""
    problem = problems.IndexerProblem(batch, seq, seq_kv, case.heads, case.dim, case.dtype, case.mode, range_kind,
                                      weight_scale=1.0, spread=spread)  # fmt: skip
    return problem.inputs("cpu", seed)


def run_and_check(
    problem: Problem,
    config: kernels.Config | None,
    *,
    device: torch.device | str = "cpu",
    tol: float = CPU_TOL,
    max_diff: float = CPU_MAX_DIFF,
) -> torch.Tensor:
    """Run the launcher on ``problem`` and compare with the reference (computed on the CPU)."""
    p = {name: None if t is None else t.to(device) for name, t in problem.items()}
    scores = launch.index_scores(
        p["q"], p["k"], p["weights"], k_scale=p["k_scale"], starts=p["starts"], ends=p["ends"], config=config
    )
    assert scores.dtype == torch.float32 and scores.device.type == torch.device(device).type
    (expected,) = problems.IndexerProblem.reference(problem)
    kwargs = {"k_scale": problem["k_scale"], "starts": problem["starts"], "ends": problem["ends"]}
    magnitude = reference.index_scores(problem["q"], problem["k"], problem["weights"].abs(), **kwargs)
    finite = torch.isfinite(magnitude)
    scale = float(magnitude[finite].max()) if finite.any() else 0.0
    scores = scores.cpu()
    # NaN exactly where the reference has it: an unwritten (NaN-poisoned) score, a NaN the kernel lost (a max(x, 0)
    # ReLU turns a NaN logit into 0) or one it made (a padded head's 0 * inf) all fail here.
    assert torch.equal(torch.isnan(scores), torch.isnan(expected)), "NaN positions differ from the reference's"
    assert_close(scores, expected, atol=tol * scale + 1e-30, rtol=tol, max_diff=max_diff, name="scores")
    # Exactly -inf where invisible (assert_close already matched the -inf positions; this also rules out an infinity
    # the reference does not have).
    assert torch.equal(torch.isinf(scores), torch.isinf(expected))
    return scores


# --------------------------------------------------------------------------------------------------- CPU tier


@st.composite
def cpu_problems(draw: st.DrawFn, cases: tuple[StaticCase, ...], max_batch: int, max_seq: int, max_seq_kv: int):
    case = draw(st.sampled_from(cases))
    batch = draw(st.integers(1, max_batch))
    seq = draw(st.integers(1, max_seq))
    seq_kv = draw(st.integers(1, max_seq_kv))
    range_kind = draw(st.sampled_from(RANGE_PATTERNS))
    spread = draw(st.sampled_from((1.0, 0.02, 8.0)))  # FP8: normal range, many subnormals, large exponents
    seed = draw(strategies.SEEDS)
    return case, make_problem(case, seed, batch, seq, seq_kv, range_kind, spread)


@pytest.mark.cpu_kernel
@given(data=cpu_problems(CPU_CASES, max_batch=3, max_seq=40, max_seq_kv=150))
def test_cpu_matches_reference(data: tuple[StaticCase, Problem]) -> None:
    """C-target indexer vs the reference: bf16/FP8, causal/range, any B, S, S_kv (both S < S_kv and S > S_kv)."""
    case, problem = data
    run_and_check(problem, case.config)


@pytest.mark.cpu_kernel
@strategies.examples(0.06)
@given(data=cpu_problems(V32_CPU_CASES, max_batch=2, max_seq=5, max_seq_kv=600))
def test_cpu_v32_width(data: tuple[StaticCase, Problem]) -> None:
    """The Hopper default schedule at V3.2 widths (64 heads x 128 dims, 256-key tiles) on the C target."""
    case, problem = data
    run_and_check(problem, case.config)


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("case", CPU_CASES[:4], ids=lambda c: c.name)
@pytest.mark.parametrize(("seq", "seq_kv"), EDGE_SHAPES)
def test_cpu_edge_shapes(case: StaticCase, seq: int, seq_kv: int) -> None:
    """S > S_kv (causal: the first S - S_kv queries see nothing), a single key, S_kv past two key tiles, S == S_kv."""
    problem = make_problem(case, 7, 2, seq, seq_kv, "random")
    scores = run_and_check(problem, case.config)
    if case.mode == "causal" and seq > seq_kv:
        assert torch.isneginf(scores[:, : seq - seq_kv]).all()


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("kind", ["empty", "extreme", "packed"])
def test_cpu_range_patterns(kind: str) -> None:
    """Every row empty (all -inf), bounds at the int32 limits, packed variable-length segments."""
    case = next(c for c in CPU_CASES if c.mode == "range" and c.dtype == "bfloat16")
    problem = make_problem(case, 3, 2, 33, 97, kind)
    scores = run_and_check(problem, case.config)
    if kind == "empty":
        assert torch.isneginf(scores).all()


@pytest.mark.cpu_kernel
def test_cpu_launcher_default_config() -> None:
    """Without an explicit config the launcher picks the C-target default and still matches the reference."""
    case = CPU_CASES[0]
    sizes = {"batch": 1, "seq_len": 3, "seq_len_kv": 5}
    assert common.select_config(launch.KERNEL_NAME, kernels, case.static, sizes, torch.device("cpu")) == (
        kernels.CPU_DEFAULT
    )
    run_and_check(make_problem(case, 11, 1, 3, 5), None)


@st.composite
def non_finite_problems(draw: st.DrawFn) -> tuple[StaticCase, Problem]:
    """A CPU problem with NaN (and, for bf16, ``+-inf``) sprinkled into a non-empty subset of q, k, weights and (FP8)
    k_scale: single elements or whole rows (``k[b, s] = nan``), rarely or densely. FP8 q and k take NaN only (e4m3fn
    has no infinity); weights and k_scale are float32 and take every kind."""
    case, problem = draw(cpu_problems((*CPU_CASES, PADDED_BF16_CASE), max_batch=2, max_seq=24, max_seq_kv=100))
    names = [name for name in ("q", "k", "weights", "k_scale") if problem[name] is not None]
    spoiled = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    seed = draw(strategies.SEEDS)
    for n, name in enumerate(spoiled):
        fp8_values = case.dtype == FP8 and name in ("q", "k")
        how = draw(strategies.sprinkles((strategies.NAN,) if fp8_values else strategies.NON_FINITE))
        problem[name] = strategies.sprinkle(problem[name], how, seed + n)
    return case, problem



@pytest.mark.cpu_kernel
@strategies.examples(0.3)
@given(data=non_finite_problems())
def test_cpu_non_finite_inputs_give_the_reference_scores(data: tuple[StaticCase, Problem]) -> None:
    """NaN and ``+-inf`` in keys, queries, weights and FP8 key scales: the C-target indexer puts NaN, ``+inf`` and
    ``-inf`` exactly where the reference does (``relu(NaN)`` is NaN, ``inf * 0`` is NaN, padded heads add nothing)
    and the finite scores within tolerance; invisible positions stay ``-inf`` whatever the key holds."""
    case, problem = data
    run_and_check(problem, case.config)


@pytest.mark.cpu_kernel
def test_cpu_nan_key_scores_nan_not_zero() -> None:
    """Issue 18's reproduction: one key row NaN (``k[0, 5] = nan``), normal weights of either sign, 64 query rows.
    Every query that sees key 5 scores it NaN, as the reference does (the kernel's ``max(x, 0)`` ReLU scored it 0.0,
    so the selection kernels picked it)."""
    case = CPU_CASES[0]  # bf16, causal
    assert (case.dtype, case.mode) == ("bfloat16", "causal")
    problem = make_problem(case, 18, 1, 64, 64)
    problem["k"][0, 5] = float("nan")
    scores = run_and_check(problem, case.config)
    assert torch.isnan(scores[0, 5:, 5]).all() and torch.isneginf(scores[0, :5, 5]).all()


@pytest.mark.cpu_kernel
def test_cpu_infinite_key_with_padded_heads_scores_like_the_reference() -> None:
    """An infinite bf16 key element with 5 heads padded to 8: the padded heads' zero q rows give ``0 * inf = NaN``
    logits, which must contribute exactly 0 (a select, not a zero weight: NaN * 0 is NaN), so the score is the
    reference's ``+-inf`` (or NaN only where the real heads make one)."""
    problem = make_problem(PADDED_BF16_CASE, 21, 1, 20, 20)
    problem["k"][0, 3, 7] = float("inf")
    problem["k"][0, 11, 0] = float("-inf")
    scores = run_and_check(problem, PADDED_BF16_CASE.config)
    assert torch.isinf(scores[0, 11:, 11]).any(), "the case should produce an infinite score"


# ------------------------------------------------------------------------------------------ config checks


def _hopper_configs(static: dict[str, Any]) -> list[kernels.Config]:
    return support.hopper_configs(launch.KERNEL_NAME, static)


V32_STATICS = tuple({**V32, "dtype": dtype, "mode": mode} for dtype in kernels.DTYPES for mode in kernels.MODES)
HOPPER_BUILDS = tuple((static, config) for static in V32_STATICS for config in _hopper_configs(static))


def _build_id(item: tuple[dict[str, Any], kernels.Config]) -> str:
    static, c = item
    dtype = "fp8" if static["dtype"] == "float8_e4m3fn" else "bf16"
    return f"{dtype}_{static['mode']}_r{c.q_rows}_n{c.block_N}_s{c.num_stages}_t{c.threads}"


def test_tuning_space_is_small_and_valid() -> None:
    """CI compiles every config: 2-4 per dtype and mode; the defaults pass their own checks; bad combos raise."""
    for static in V32_STATICS:
        configs = _hopper_configs(static)
        assert 2 <= len(configs) <= 4, configs
        assert configs[0] == kernels.Config()
    hopper = {**V32_STATICS[0], "target": dsl.HOPPER_TARGET}
    with pytest.raises(ValueError, match="warpgroups"):
        kernels.check_config(hopper, kernels.Config(block_N=128, threads=512))
    with pytest.raises(ValueError, match="shared memory"):
        kernels.check_config({**hopper, "dtype": "bfloat16"}, kernels.Config(num_stages=4))
    with pytest.raises(ValueError, match="wgmma K step"):
        kernels.check_config({**hopper, "dtype": "float8_e4m3fn", "dim": 48}, kernels.Config())
    with pytest.raises(ValueError, match="wgmma N limit"):
        kernels.check_config({**hopper, "heads": 300}, kernels.Config())
    with pytest.raises(ValueError, match="mode"):
        kernels.check_config({**hopper, "mode": "sliding"}, kernels.Config())
    # The C target accepts sizes the Hopper schedule cannot.
    kernels.check_config({**hopper, "heads": 300, "dim": 48, "target": dsl.CPU_TARGET}, kernels.Config(block_N=16))


@pytest.mark.parametrize("heads", [1, 3, 5, 16, 64, 100, 128, 256])
@pytest.mark.parametrize("dim", [32, 64, 128, 256, 512])
@pytest.mark.parametrize("dtype", kernels.DTYPES)
def test_default_config_fits_hopper(heads: int, dim: int, dtype: str) -> None:
    """The default config passes check_config for any head count up to 256 and any aligned head dim whose q tile
    fits in shared memory next to one 64-key tile; otherwise default_config says why."""
    static = {"heads": heads, "dim": dim, "dtype": dtype, "mode": "causal", "target": dsl.HOPPER_TARGET}
    smallest = kernels.Config(block_N=64, num_stages=1, threads=128)
    if kernels.smem_bytes(static, smallest) > dsl.HOPPER_SMEM_BYTES:
        with pytest.raises(ValueError, match="shared memory"):
            kernels.default_config(static)
        return
    config = kernels.default_config(static)
    kernels.check_config(static, config)
    rows = kernels.tile_rows(heads, config.q_rows)
    assert rows % kernels.ROW_ALIGN == 0 and rows <= kernels.MAX_ROWS


# ------------------------------------------------------------------------------------------------- build tier

def hopper_build(item: tuple[dict[str, Any], kernels.Config]) -> tuple[Any, tl_build.StaticReport]:
    """One V3.2 indexer config compiled for sm_90a (once per session)."""
    return support.hopper_build_case(_build_id(item), kernels.build, item)


hopper_prebuilt = support.prebuilt_fixture(lambda: support.config_builds(kernels.build, HOPPER_BUILDS))


@pytest.mark.build
@pytest.mark.usefixtures("hopper_prebuilt")
@pytest.mark.parametrize("item", HOPPER_BUILDS, ids=_build_id)
def test_hopper_build_is_clean(item: tuple[dict[str, Any], kernels.Config]) -> None:
    """No register spills, shared memory within 227 KB, every GEMM a wgmma, at V3.2 indexer shapes."""
    kernel, report = hopper_build(item)
    assert report.problems(mma=tl_build.MMA_WGMMA) == [], report.ptxas_log
    static, config = item
    # The kernel's own shared-memory estimate (used by check_config) must not undercount what was allocated.
    assert report.smem_bytes <= kernels.smem_bytes(static, config) + 2048, (report.smem_bytes, config)
    assert "tma_load" in kernel.get_kernel_source(), "the key tiles should arrive by TMA"
    support.assert_wide_addressing(kernel.get_kernel_source())


# --------------------------------------------------------------------------------------------------- GPU tier

# The small-head cases the GPU tier runs with the launcher's default config (4 heads x 32 dims, both dtypes and modes).
GPU_SMALL_CASES: tuple[StaticCase, ...] = CPU_CASES[:4]
# Every kernel the GPU tier compiles has one of these static parameter sets: the V3.2 ones with every config of
# HOPPER_BUILDS, the small ones with their default (each pair is an sm_90a compile of 5-30 s).
GPU_KERNEL_STATICS: tuple[dict[str, Any], ...] = V32_STATICS + tuple(case.static for case in GPU_SMALL_CASES)
GPU_CONFIGS: tuple[kernels.Config, ...] = tuple(dict.fromkeys(config for _, config in HOPPER_BUILDS))
"""The configs the GPU tests pass explicitly (the others run the launcher's choice, the default on a fresh host)."""
GPU_KERNELS: dict[str, tuple[dict[str, Any], ...]] = {launch.KERNEL_NAME: GPU_KERNEL_STATICS}
"""What the GPU tests compile, by kernel: the one-shot GPU check compiles these (every config of the whole tuning
space) in parallel before it runs the tests (``pytest --collect-only --dsa-gpu-kernels FILE``, tests/conftest.py)."""


@st.composite
def gpu_problems(draw: st.DrawFn):
    static, config = draw(st.sampled_from(HOPPER_BUILDS))
    case = StaticCase(_build_id((static, config)), config=config, **static)
    batch = draw(st.integers(1, 2))
    seq = draw(st.integers(1, 300))
    seq_kv = draw(st.integers(1, 700))
    range_kind = draw(st.sampled_from(RANGE_PATTERNS))
    spread = draw(st.sampled_from((1.0, 0.02, 8.0)))
    seed = draw(strategies.SEEDS)
    return case, make_problem(case, seed, batch, seq, seq_kv, range_kind, spread)


@pytest.mark.gpu
@given(data=gpu_problems())
def test_gpu_matches_reference(data: tuple[StaticCase, Problem], cuda_device: torch.device) -> None:
    """CUDA indexer vs the reference, every tuning-space config at V3.2 shapes, random sizes and visibility."""
    case, problem = data
    run_and_check(problem, case.config, device=cuda_device, tol=GPU_TOL, max_diff=GPU_MAX_DIFF)


@pytest.mark.gpu
@pytest.mark.parametrize("static", V32_STATICS, ids=lambda s: f"{s['dtype']}_{s['mode']}")
@pytest.mark.parametrize(("seq", "seq_kv"), EDGE_SHAPES)
def test_gpu_edge_shapes(static: dict[str, Any], seq: int, seq_kv: int, cuda_device: torch.device) -> None:
    """The CPU edge shapes at V3.2 widths on CUDA (S > S_kv, one key, partial last key tile, S == S_kv)."""
    case = StaticCase("edge", config=kernels.Config(), **static)
    scores = run_and_check(make_problem(case, 7, 2, seq, seq_kv), None, device=cuda_device, tol=GPU_TOL, max_diff=GPU_MAX_DIFF)
    if case.mode == "causal" and seq > seq_kv:
        assert torch.isneginf(scores[:, : seq - seq_kv]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("static", V32_STATICS, ids=lambda s: f"{s['dtype']}_{s['mode']}")
def test_gpu_long_sequence(static: dict[str, Any], cuda_device: torch.device) -> None:
    """A prefill-sized call (1K queries x 2K keys) with the launcher's own config choice."""
    case = StaticCase("long", config=kernels.Config(), **static)
    problem = make_problem(case, 5, 1, 1024, 2048, "packed")
    run_and_check(problem, None, device=cuda_device, tol=GPU_TOL, max_diff=GPU_MAX_DIFF)


@pytest.mark.gpu
@strategies.examples(0.1)
@given(data=cpu_problems(GPU_SMALL_CASES, max_batch=3, max_seq=40, max_seq_kv=150))
def test_gpu_small_heads(data: tuple[StaticCase, Problem], cuda_device: torch.device) -> None:
    """4 heads x 32 dims on CUDA (32 queries per block, one wgmma K step) with the launcher's default config."""
    _case, problem = data
    run_and_check(problem, None, device=cuda_device, tol=GPU_TOL, max_diff=GPU_MAX_DIFF)


@pytest.mark.gpu
@pytest.mark.portable
@pytest.mark.parametrize("static", V32_STATICS, ids=lambda s: f"{s['dtype']}_{s['mode']}")
@pytest.mark.parametrize(("seq", "seq_kv"), [*EDGE_SHAPES, (300, 700)])
def test_gpu_portable_matches_reference(
    static: dict[str, Any], seq: int, seq_kv: int, portable_cuda_device: torch.device
) -> None:
    """The portable schedule (mma.sync, element-wise key loads; FP8 converted to bf16 where the GPU has no FP8 MMA),
    built for this GPU's portable architecture (sm_90 on Hopper) with its default config, at V3.2 widths."""
    case = StaticCase("portable", config=kernels.Config(), **static)
    problem = make_problem(case, 13, 2, seq, seq_kv)
    run_and_check(problem, None, device=portable_cuda_device, tol=GPU_TOL, max_diff=GPU_MAX_DIFF)
