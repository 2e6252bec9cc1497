"""The fused selection kernel (``tl_kernels.index_topk`` through ``dsa.launch.index_topk``): scores and top-k in one
kernel that keeps only candidate buffers, never the ``[B, S, S_kv]`` scores.

Every check is exact: integer-valued inputs make every score exact in float32 on every path, so the kernel's sets
must equal the reference's (``dsa.reference.index_topk``, tie rule included) and its scores must equal the exact
scores at them. Outputs are poisoned before every launch (``tests/conftest.py``).

Tiers:
- ``cpu_kernel``: the C-target build on rows ordered to stress the candidate buffer (increasing scores compact it
  after every key block, decreasing ones never refill it, random order, many exact ties, all scores equal), with
  several queries per block, causal and ranged, bf16 and FP8, the key tile double-buffered (``prefetch``, the
  default) and not (the older schedule); the op-level property tests live in ``tests/test_index_topk.py``.
- structure: the prim_func allocates nothing whose size depends on ``S`` or ``S_kv`` (on sm_90a at V3.2 shapes and
  on the C target), and its only outputs are ``[B, S, topk]``.
- ``build``: the Hopper tuning space of the V3.2 FP8 causal case (with the default ``prefetch``) and the bf16 ranged
  default compile for sm_90a without spills, with wgmma, shared memory within the estimate and the key tile read in
  16-byte vectors (twice with ``prefetch``: before the walk and inside it).
- ``gpu``: rows past 131,072 keys in every order, and every Hopper config, against the reference (the op-level GPU
  tests are in ``tests/test_index_topk.py``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import pytest
import tilelang  # noqa: F401 - provides the tvm package
import torch
import tvm
from hypothesis import example, given
from hypothesis import strategies as st
from tvm import tirx

from benchmarks import problems
from dsa import ops, reference, testing
from dsa.launch import index_topk as launch
from tests import strategies, support
from tl_kernels import dsl
from tl_kernels import index_topk as kernels

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CPU_TOPK = 16
CPU_HEADS, CPU_DIM = 4, 32
V32 = {"heads": 64, "dim": 128}
V32_TOPK = 2048
ORDERS = ("increasing", "decreasing", "random", "ties", "equal")
# 128K + a partial key block: rows longer than any V3.2 context.
LONG_SEQ_KV = 131_072 + 77
ONES_SCORE_SCALE = 1.0


def _ordered_inputs(order: str, batch: int, seq: int, seq_kv: int, heads: int, dim: int, device: Any = "cpu") -> dict:
    """FP8 inputs whose scores follow ``order`` along the keys: q, k and weights all ones make every raw score
    ``heads * dim``, and the per-key scale ``k_scale`` sets the order (increasing, decreasing, a random permutation,
    a few values with many exact ties, or one value everywhere). Every score is an exact float32."""
    g = torch.Generator().manual_seed(seq_kv + len(order))
    positions = torch.arange(seq_kv, dtype=torch.float32)
    scale = {
        "increasing": positions + 1,
        "decreasing": seq_kv - positions,
        "random": torch.randperm(seq_kv, generator=g).float() + 1,
        "ties": torch.randint(0, 3, (seq_kv,), generator=g).float(),
        "equal": torch.full((seq_kv,), 2.0),
    }[order]
    return {
        "q": torch.ones(batch, seq, heads, dim).to(torch.float8_e4m3fn).to(device),
        "k": torch.ones(batch, seq_kv, dim).to(torch.float8_e4m3fn).to(device),
        "weights": torch.full((batch, seq, heads), ONES_SCORE_SCALE, device=device),
        "k_scale": scale.expand(batch, seq_kv).contiguous().to(device),
        "starts": None,
        "ends": None,
    }


def _assert_exact(inputs: dict, topk: int, indices: torch.Tensor, scores: torch.Tensor) -> None:
    """``indices`` is the reference's set in every row and ``scores`` the exact scores at it (any order). The
    reference runs where the inputs are (on the GPU in the GPU tier: its bounded walk is plain PyTorch)."""
    args, kwargs = problems.IndexerProblem.args(inputs)
    expected = reference.index_topk(*args, topk, **kwargs, return_scores=True)
    error = testing.same_selection((indices, scores), expected)
    assert error is None, error


def _run(inputs: dict, topk: int, config: kernels.Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return launch.index_topk(
        inputs["q"], inputs["k"], inputs["weights"], topk, k_scale=inputs["k_scale"], starts=inputs["starts"],
        ends=inputs["ends"], config=config,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------ configs


def test_configs_bound_the_candidate_buffers() -> None:
    """Every query's buffer holds ``topk`` kept candidates plus a whole key block (a compaction always makes room
    for the next block); shared memory grows with ``topk``; a ``topk`` too large for any config is refused."""
    static = {**V32, "dtype": "float8_e4m3fn", "mode": "causal", "topk": V32_TOPK}
    config = kernels.default_config(static)
    assert kernels.cand_capacity(V32_TOPK, config) >= V32_TOPK + config.block_N
    assert kernels.cand_capacity(1, config) == 1 + config.block_N
    assert kernels.smem_bytes(static, config) <= dsl.smem_limit_bytes(dsl.HOPPER_TARGET)
    assert kernels.smem_bytes({**static, "topk": 2 * V32_TOPK}, config) > kernels.smem_bytes(static, config)
    big = kernels.default_config({**static, "topk": 8 * V32_TOPK})  # 16K still fits: one query, one slot per entry
    assert kernels.cand_capacity(8 * V32_TOPK, big) >= 8 * V32_TOPK + big.block_N
    with pytest.raises(ValueError, match="no fused index_topk config fits"):
        kernels.default_config({**static, "topk": 64 * V32_TOPK})
    with pytest.raises(ValueError, match="topk must be a positive int"):
        kernels.check_config({**static, "topk": 0}, config)
    with pytest.raises(ValueError, match="cand_factor must be >= 1"):
        kernels.check_config(static, dataclasses.replace(config, cand_factor=0))
    for name in ("heads", "dim", "dtype", "mode"):
        assert name in launch.static_params(torch.empty(1, 1, 64, 128, dtype=torch.bfloat16), 8, ranged=False)


def test_default_prefetch_rule() -> None:
    """The key tile is double-buffered by default where the rule says (``kernels.prefetch_by_default``): contiguous
    keys and FP8 key pages on sm_90a and on the C target; not on the portable schedule, nor for paged key rows. The
    double buffer lives in registers: it adds no shared memory."""
    static = {**V32, "dtype": "float8_e4m3fn", "mode": "causal", "topk": V32_TOPK}
    paged = {**static, "mode": "range", "page_size": 64}
    for target, case, expected in [
        (dsl.HOPPER_TARGET, static, True), (dsl.CPU_TARGET, static, True), (dsl.cuda_target("sm_80"), static, False),
        (dsl.HOPPER_TARGET, {**paged, "key_layout": "paged"}, True), (dsl.HOPPER_TARGET, paged, False),
        (dsl.CPU_TARGET, paged, False),
    ]:  # fmt: skip
        config = kernels.default_config({**case, "target": target})
        assert config.prefetch is expected, (target, case)
        other = dataclasses.replace(config, prefetch=not expected)
        assert kernels.smem_bytes(case, other) == kernels.smem_bytes(case, config)


# -------------------------------------------------------------------------------------------------- structure


def _allocations(func: Any) -> list[tuple[str, list[Any], str]]:
    found: list[tuple[str, list[Any], str]] = []

    def visit(node: Any) -> None:
        if isinstance(node, tirx.SBlock):
            found.extend((b.scope(), list(b.shape), str(b.dtype)) for b in node.alloc_buffers)
        elif isinstance(node, tirx.AllocBuffer):
            found.append((node.buffer.scope(), list(node.buffer.shape), str(node.buffer.dtype)))

    tirx.stmt_functor.post_order_visit(func.body, visit)
    return found


@pytest.mark.parametrize("target", [dsl.HOPPER_TARGET, dsl.CPU_TARGET], ids=["sm_90a", "c"])
@pytest.mark.parametrize("mode", ["causal", "range"])
def test_kernel_allocates_nothing_that_grows_with_the_sequence(target: Any, mode: str) -> None:
    """Every buffer the fused kernel allocates has a constant size (so at ``S = S_kv = 131,072`` no ``S x S_kv`` or
    ``S_kv``-sized buffer exists: only the grid's shared memory and registers), the shared ones add up to at most
    the estimate the config check uses, and the only writable arguments are ``indices`` and ``scores`` ``[B, S,
    topk]``."""
    static = {**V32, "dtype": "float8_e4m3fn", "mode": mode, "topk": V32_TOPK, "target": target}
    config = kernels.default_config(static)
    func = kernels.build(**static, **dataclasses.asdict(config))
    allocations = _allocations(func)
    assert allocations, "the walk found no allocation at all"
    for scope, shape, dtype in allocations:
        assert all(isinstance(extent, tvm.tirx.IntImm) for extent in shape), (scope, shape, dtype)
    if not dsl.is_cpu(target):
        shared = sum(
            tvm.runtime.DataType(dtype).bits // 8 * math.prod(int(extent) for extent in shape)
            for scope, shape, dtype in allocations
            if scope.startswith("shared")
        )
        assert shared <= kernels.smem_bytes(static, config), shared
    buffers = {param.name: func.buffer_map[param] for param in func.params}
    batch, seq = buffers["Q_handle"].shape[:2]
    seq_kv = buffers["K_handle"].shape[1]
    assert not any(seq.same_as(extent) for extent in [batch, seq_kv]), "the sizes must be distinct variables"
    for name in ("Indices_handle", "Scores_handle"):
        shape = list(buffers.pop(name).shape)
        assert shape[0].same_as(batch) and shape[1].same_as(seq) and int(shape[2]) == V32_TOPK, (name, shape)
    for name, buffer in buffers.items():  # the inputs: nothing is [.., S, S_kv]
        extents = list(buffer.shape)
        assert not (any(e.same_as(seq) for e in extents) and any(e.same_as(seq_kv) for e in extents)), name


# --------------------------------------------------------------------------------------- TileLang-on-CPU tier


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("order", ORDERS)
def test_cpu_fused_kernel_on_long_ordered_rows(order: str) -> None:
    """Three queries (one block of several queries) over 3,000 keys, FP8 causal, ``topk`` 16 and the C-target
    default (64-key blocks): increasing scores compact the candidate buffer after every block, decreasing ones fill
    it once, and ties and equal scores must keep exactly the smallest positions."""
    inputs = _ordered_inputs(order, 1, 3, 3000, CPU_HEADS, CPU_DIM)
    _assert_exact(inputs, CPU_TOPK, *_run(inputs, CPU_TOPK))


@pytest.mark.cpu_kernel
def test_cpu_fused_kernel_with_one_query_per_block_and_ranges() -> None:
    """A config with one query per block (``q_rows`` = heads), no spare buffer (``cand_factor`` 1: exactly ``topk`` +
    one key block) and the older schedule (no ``prefetch``: each key block loaded at the start of its step), ranged
    rows of random extent and position, some empty, two batches."""
    g = torch.Generator().manual_seed(5)
    inputs = _ordered_inputs("ties", 2, 20, 700, CPU_HEADS, CPU_DIM)
    starts = torch.randint(0, 700, (2, 20), generator=g, dtype=torch.int32)
    inputs["starts"] = starts
    inputs["ends"] = (starts + torch.randint(-5, 500, (2, 20), generator=g, dtype=torch.int32)).clamp(0, 700)
    config = dataclasses.replace(kernels.CPU_DEFAULT, q_rows=CPU_HEADS, cand_factor=1, prefetch=False)
    _assert_exact(inputs, CPU_TOPK, *_run(inputs, CPU_TOPK, config))


# NaN and +-inf inputs, on both kernel paths of ops.index_topk (the fused kernel, and the indexer and top-k kernels
# chunked: DSA_SELECTION=unfused). The static parameters (4 heads x 32, topk 16, the C-target default configs) are
# those of tests/test_index_topk.py, so the compiled kernels are shared.
SELECTIONS = ("fused", "unfused")
CHUNK_ROWS = 3  # the unfused path's budget in query rows: several chunks per call


def _run_op(monkeypatch: pytest.MonkeyPatch, inputs: dict, topk: int, selection: str) -> tuple[torch.Tensor, ...]:
    """``ops.index_topk(..., return_scores=True)`` on the kernel backend through ``selection``'s path."""
    monkeypatch.setenv("DSA_BACKEND", "tilelang")
    monkeypatch.setenv("DSA_SELECTION", selection)
    batch, seq_kv = inputs["k"].shape[:2]
    monkeypatch.setenv("DSA_INDEXER_MEMORY_BYTES", str(batch * seq_kv * 4 * CHUNK_ROWS))
    return ops.index_topk(
        inputs["q"], inputs["k"], inputs["weights"], topk, k_scale=inputs["k_scale"], starts=inputs["starts"],
        ends=inputs["ends"], return_scores=True,
    )  # fmt: skip


def _assert_finite_selection(indices: torch.Tensor, scores: torch.Tensor) -> None:
    """Every selected score is finite, every ``-1`` pads with ``-inf``: a NaN or infinite score is never selected."""
    assert torch.isfinite(scores[indices >= 0]).all(), "a non-finite score was selected"
    assert torch.isneginf(scores[indices < 0]).all()


@st.composite
def _spoiled_inputs(draw: st.DrawFn, dtype: str, inputs: dict) -> dict:
    """``inputs`` with NaN (bf16 also ``+-inf``) sprinkled into a non-empty subset of q, k, weights and k_scale (FP8
    q/k: NaN only, e4m3fn has no infinity)."""
    names = [name for name in ("q", "k", "weights", "k_scale") if inputs[name] is not None]
    spoiled = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    seed = draw(strategies.SEEDS)
    for n, name in enumerate(spoiled):
        fp8_values = dtype == "float8_e4m3fn" and name in ("q", "k")
        how = draw(strategies.sprinkles((strategies.NAN,) if fp8_values else strategies.NON_FINITE))
        inputs[name] = strategies.sprinkle(inputs[name], how, seed + n)
    return inputs


@pytest.mark.cpu_kernel
@strategies.examples(0.3)
@given(
    dtype=st.sampled_from(["bfloat16", "float8_e4m3fn"]),
    **strategies.sizes(batch=2, seq=12, seq_kv=200),
    ranged=st.booleans(),
    selection=st.sampled_from(SELECTIONS),
    seed=strategies.SEEDS,
    data=st.data(),
)
@example(dtype="bfloat16", batch=1, seq=12, seq_kv=150, ranged=False, selection="fused", seed=18, data=None)
@example(dtype="float8_e4m3fn", batch=2, seq=7, seq_kv=130, ranged=True, selection="unfused", seed=19, data=None)
def test_cpu_non_finite_inputs_select_the_reference_sets(
    monkeypatch: pytest.MonkeyPatch, dtype: str, batch: int, seq: int, seq_kv: int, ranged: bool, selection: str,
    seed: int, data: st.DataObject | None,
) -> None:  # fmt: skip
    """NaN and ``+-inf`` sprinkled into keys, queries, weights and FP8 key scales (single entries or whole rows):
    both kernel paths select exactly the reference's sets (integer-valued inputs: every finite score is exact, ties
    included) with its scores, never a NaN or infinite score. The ``@example`` rows spoil every key row 5."""
    mode = "range" if ranged else "causal"
    problem = problems.IndexTopkProblem(batch, seq, seq_kv, CPU_HEADS, CPU_DIM, dtype, mode, "random", topk=CPU_TOPK)
    inputs = problem.inputs("cpu", seed)
    if data is None:
        inputs["k"][:, 5] = float("nan")
    else:
        inputs = data.draw(_spoiled_inputs(dtype, inputs))
    indices, scores = _run_op(monkeypatch, inputs, CPU_TOPK, selection)
    _assert_exact(inputs, CPU_TOPK, indices, scores)
    _assert_finite_selection(indices, scores)


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("selection", SELECTIONS)
def test_cpu_nan_key_is_never_selected(monkeypatch: pytest.MonkeyPatch, selection: str) -> None:
    """Issue 18's reproduction: one key row NaN (``k[0, 5] = nan``), normal q, k and weights of either sign, 64 query
    rows, bf16 causal. The kernels scored key 5 ``0.0`` (a ``max(x, 0)`` ReLU turns NaN into 0) and selected it,
    reporting the score 0.0 (in 34 of the 64 rows of this draw, 29 in the issue's); now every row is the
    reference's set and key 5 is never selected."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, CPU_HEADS, CPU_DIM, generator=g).to(torch.bfloat16)
    k = torch.randn(1, 64, CPU_DIM, generator=g).to(torch.bfloat16)
    weights = torch.randn(1, 64, CPU_HEADS, generator=g)
    k[0, 5] = float("nan")
    inputs = {"q": q, "k": k, "weights": weights, "k_scale": None, "starts": None, "ends": None}
    indices, scores = _run_op(monkeypatch, inputs, CPU_TOPK, selection)
    expected = reference.index_topk(q, k, weights, CPU_TOPK)
    assert not (indices == 5).any(), f"the NaN key was selected in {int((indices == 5).any(-1).sum())} rows"
    assert torch.equal(indices.sort(-1).values, expected.sort(-1).values)
    _assert_finite_selection(indices, scores)


# ----------------------------------------------------------------------------------------------------- build tier

HOPPER_STATICS: tuple[dict[str, Any], ...] = (
    {**V32, "dtype": "float8_e4m3fn", "mode": "causal", "topk": V32_TOPK},
    {**V32, "dtype": "bfloat16", "mode": "range", "topk": V32_TOPK},
)
_FP8_DEFAULT = kernels.default_config(HOPPER_STATICS[0])
# The V3.2 FP8 case's tuning space with the default's prefetch: every sm_90a build here costs CI 20-40 s on 2 cores.
# The older schedule (no prefetch) is the tuner's on sm_90a (it lowers to the same TIR as the default before prefetch,
# which compiled clean here: 72 and 110 registers at q_rows 64 and 128, 0 spills); the C tier runs it, and the portable
# default build (tests/test_arch_builds.py) is it.
HOPPER_BUILDS: list[tuple[dict[str, Any], kernels.Config]] = [
    (HOPPER_STATICS[0], config)
    for config in support.hopper_configs("index_topk", HOPPER_STATICS[0])
    if config.prefetch == _FP8_DEFAULT.prefetch
] + [(HOPPER_STATICS[1], kernels.default_config(HOPPER_STATICS[1]))]


def _build_id(item: tuple[dict[str, Any], kernels.Config]) -> str:
    static, config = item
    return (f"{static['dtype']}_{static['mode']}_q{config.q_rows}_n{config.block_N}_f{config.cand_factor}"
            f"_p{int(config.prefetch)}")  # fmt: skip


hopper_prebuilt = support.prebuilt_fixture(lambda: support.config_builds(kernels.build, HOPPER_BUILDS))

# A 16-byte vector read from the keys K (TileLang's CUDA: `*(fp8_e4_16_t*)(K + ...)` for FP8, `*(uint4*)(K + ...)`
# for bf16; both are `ld.global.nc.v4` in the PTX), and an element read.
_K_VECTOR_LOAD = re.compile(r"\*\((?:fp8_e4_16_t|uint4)\*\)\(K \+")
_K_ELEMENT_LOAD = re.compile(r"= K\[")


@pytest.mark.build
@pytest.mark.usefixtures("hopper_prebuilt")
@pytest.mark.parametrize("item", HOPPER_BUILDS, ids=_build_id)
def test_hopper_build_is_clean(item: tuple[dict[str, Any], kernels.Config]) -> None:
    """No spills, every GEMM a wgmma, shared memory within the estimate, int64 addressing, the selection's counters
    bound from atomics that return the previous value, and the keys read as 16-byte vectors only: once per step, or
    with ``prefetch`` twice (the first key block before the walk, each next one inside it)."""
    static, config = item
    kernel, report = support.hopper_build_case(_build_id(item), kernels.build, item)
    assert report.problems() == [] and set(report.mma) == {"wgmma"}, report.ptxas_log
    assert report.smem_bytes <= kernels.smem_bytes(static, config) + 1024, (report.smem_bytes, config)
    source = kernel.get_kernel_source()
    assert "AtomicAddRet" in source
    assert f"__launch_bounds__({config.threads}" in source
    vector_loads = len(_K_VECTOR_LOAD.findall(source))
    assert vector_loads == (2 if config.prefetch else 1) and not _K_ELEMENT_LOAD.search(source), vector_loads
    support.assert_wide_addressing(source)


def test_hopper_builds_include_the_defaults() -> None:
    for static in HOPPER_STATICS:
        assert (static, kernels.default_config(static)) in HOPPER_BUILDS


# ------------------------------------------------------------------------------------------------------- GPU tier

GPU_KERNELS: dict[str, tuple[dict[str, Any], ...]] = {
    "index_topk": ({**V32, "dtype": "float8_e4m3fn", "mode": "causal", "topk": V32_TOPK},),
}
"""What this module's GPU tests compile (the GPU check's compile stage builds them, every Hopper config)."""
GPU_CONFIGS: tuple[kernels.Config, ...] = tuple(support.hopper_configs("index_topk", HOPPER_STATICS[0]))
"""The configs the GPU tests pass explicitly: the whole Hopper tuning space (with and without ``prefetch``)."""


@pytest.mark.gpu
@pytest.mark.parametrize("order", ORDERS)
def test_gpu_fused_kernel_on_rows_past_128k(order: str, cuda_device: torch.device) -> None:
    """V3.2 indexer shapes (64 heads x 128, FP8), top-k 2048, four queries over 131,149 keys in every order: the
    CUDA kernel's sets and scores equal the reference's exactly."""
    inputs = _ordered_inputs(order, 1, 4, LONG_SEQ_KV, V32["heads"], V32["dim"], device=cuda_device)
    indices, scores = _run(inputs, V32_TOPK)
    torch.cuda.synchronize()
    _assert_exact(inputs, V32_TOPK, indices, scores)


@pytest.mark.gpu
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda c: _build_id((HOPPER_STATICS[0], c)))
def test_gpu_every_hopper_config(config: kernels.Config, cuda_device: torch.device) -> None:
    """Every Hopper config on 300 queries x 6,000 keys with many ties (two queries per block where ``q_rows`` is
    128: several buffers per block)."""
    inputs = _ordered_inputs("ties", 2, 300, 6000, V32["heads"], V32["dim"], device=cuda_device)
    g = torch.Generator().manual_seed(1)
    inputs["weights"] = torch.randint(-1, 3, inputs["weights"].shape, generator=g).float().to(cuda_device)
    indices, scores = _run(inputs, V32_TOPK, config)
    torch.cuda.synchronize()
    _assert_exact(inputs, V32_TOPK, indices, scores)
