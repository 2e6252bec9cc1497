"""Tests of the shared kernel infrastructure: ``tl_kernels.dsl`` conversions/allocators and ``tl_kernels.build``.

CPU tier (``cpu_kernel``): bit-exact bf16/e4m3 decoding and bf16 rounding against torch, allocator aliases, the
in-process kernel cache. Build tier (``build``): a 64x64x64 bf16 GEMM written with the dsl allocators compiles for
sm_90a with wgmma and a clean static report; a shared-memory-hungry kernel is flagged by ``StaticReport.problems``;
the report taken from ptxas's output of TileLang's own nvcc run equals the one from rerunning ptxas (plus a CPU test
of the per-thread capture).
The test session's build pool (``tests.build_pool``): its recorded list of C-target kernels still names builders
that take their parameters, it orders them as the tests ask for them, and one process compiles each (claims).
"""

# No ``from __future__ import annotations`` here: T.prim_func evaluates its parameter annotations, and as strings
# they cannot see the builder's local variables (NameError on e.g. a local dtype name).
import contextlib
import dataclasses
import inspect
import importlib
import logging
import os
import threading
from pathlib import Path

import pytest
import tilelang
import tilelang.language as T
import torch
import tvm
from hypothesis import example, given
from hypothesis import strategies as st

from tests import build_pool
from tl_kernels import build, dsl, split_ranges

# Output sentinels written before each kernel call. Bit-exact comparisons need sentinels that no correct result can
# equal: a float32 NaN whose low 16 bits are set (a bf16 decode always has them clear, an e4m3 NaN decodes to the
# canonical quiet NaN) and a bf16 code that is never produced by rounding from float32... which does not exist, so the
# bf16 outputs are checked twice with two different sentinels instead.
_F32_SENTINEL_BITS = 0x7FFFDEAD
_BF16_SENTINELS = (0xDEAD, 0x1234)
_N_FP8_CODES = 256
_N_BF16_CODES = 65536
_RANDOM_F32 = 200_000
_TILE = 8
# Static shared memory TileLang adds next to the tiles (mbarriers, alignment padding), bytes; seen: 1024.
_STATIC_SMEM_SLACK = 4096
# One dummy element for the conversion-kernel inputs a test does not exercise.
_NO_BF16 = torch.ones(1, dtype=torch.uint16)
_NO_E4M3 = torch.ones(1, dtype=torch.uint8)


def _f32_sentinel(n: int) -> torch.Tensor:
    return torch.full((n,), _F32_SENTINEL_BITS, dtype=torch.int32).view(torch.float32)


def convert_builder(*, target: dsl.Target) -> tvm.tirx.PrimFunc:
    """Decode bf16 and e4m3 elements to float32 and encode float32 as bf16, element by element.

    X: [N] bfloat16 (storage dtype), E: [M] float8_e4m3fn (storage dtype), W: [P] float32 ->
    Y: [N] float32, F: [M] float32, Z: [P] bfloat16 (storage dtype).
    """
    n, m, p = T.dynamic("N"), T.dynamic("M"), T.dynamic("P")
    bf16 = dsl.storage_dtype("bfloat16", target)
    e4m3 = dsl.storage_dtype("float8_e4m3fn", target)

    @T.prim_func
    def convert(
        X: T.Tensor((n,), bf16),
        E: T.Tensor((m,), e4m3),
        W: T.Tensor((p,), "float32"),
        Y: T.Tensor((n,), "float32"),
        F: T.Tensor((m,), "float32"),
        Z: T.Tensor((p,), bf16),
    ):
        with T.Kernel(1, threads=128):
            for i in T.serial(n):
                Y[i] = dsl.load_f32(X[i], "bfloat16", target)
            for i in T.serial(m):
                F[i] = dsl.load_f32(E[i], "float8_e4m3fn", target)
            for i in T.serial(p):
                Z[i] = dsl.store_bf16(W[i], target)

    return convert


def tile_builder(*, tile: int, target: dsl.Target) -> tvm.tirx.PrimFunc:
    """Y = 2 * X + 1 through a shared tile, a fragment and a parallel loop. X, Y: [R, tile] float32, R symbolic."""
    rows = T.dynamic("R")
    alloc = dsl.allocators(target)

    @T.prim_func
    def scale(X: T.Tensor((rows, tile), "float32"), Y: T.Tensor((rows, tile), "float32")):
        with T.Kernel(T.ceildiv(rows, tile), threads=128) as bx:
            staged = alloc.shared((tile, tile), "float32")
            acc = alloc.fragment((tile, tile), "float32")
            T.copy(X[bx * tile, 0], staged)
            for i, j in alloc.parallel(tile, tile):
                acc[i, j] = staged[i, j] * 2.0 + 1.0
            T.copy(acc, Y[bx * tile, 0])

    return dsl.with_pass_configs(scale, {"tirx.disable_vectorize": True})


def gemm_builder(*, m: int, n: int, k: int, block: int, stages: int, target: dsl.Target) -> tvm.tirx.PrimFunc:
    """C = A @ B^T. A: [m, k] bfloat16, B: [n, k] bfloat16, C: [m, n] float32."""
    alloc = dsl.allocators(target)
    dtype = dsl.storage_dtype("bfloat16", target)

    @T.prim_func
    def gemm(A: T.Tensor((m, k), dtype), B: T.Tensor((n, k), dtype), C: T.Tensor((m, n), "float32")):
        with T.Kernel(T.ceildiv(n, block), T.ceildiv(m, block), threads=128) as (bx, by):
            a_tile = alloc.shared((block, block), dtype)
            b_tile = alloc.shared((block, block), dtype)
            acc = alloc.fragment((block, block), "float32")
            T.clear(acc)
            for ko in T.Pipelined(T.ceildiv(k, block), num_stages=stages):
                T.copy(A[by * block, ko * block], a_tile)
                T.copy(B[bx * block, ko * block], b_tile)
                T.gemm(a_tile, b_tile, acc, transpose_B=True)
            T.copy(acc, C[by * block, bx * block])

    return gemm


def two_gemm_builder(*, rows_a: int, rows_b: int, target: dsl.Target) -> tvm.tirx.PrimFunc:
    """Two independent GEMMs in one kernel: C = A @ B^T ([rows_a, 64] x [64, 64]) and D = E @ B^T ([rows_b, 64]).
    On sm_90a a GEMM with 64 rows becomes a wgmma; one with 16 rows falls back to mma.sync."""
    dtype = "bfloat16"

    @T.prim_func
    def two(
        A: T.Tensor((rows_a, 64), dtype),
        B: T.Tensor((64, 64), dtype),
        E: T.Tensor((rows_b, 64), dtype),
        C: T.Tensor((rows_a, 64), "float32"),
        D: T.Tensor((rows_b, 64), "float32"),
    ):
        with T.Kernel(1, threads=128):
            a, b, e = T.alloc_shared((rows_a, 64), dtype), T.alloc_shared((64, 64), dtype), T.alloc_shared((rows_b, 64), dtype)
            c, d = T.alloc_fragment((rows_a, 64), "float32"), T.alloc_fragment((rows_b, 64), "float32")
            T.copy(A, a)
            T.copy(B, b)
            T.copy(E, e)
            T.clear(c)
            T.clear(d)
            T.gemm(a, b, c, transpose_B=True)
            T.gemm(e, b, d, transpose_B=True)
            T.copy(c, C)
            T.copy(d, D)

    return two


def smem_hog_builder(*, rows: int, cols: int, target: dsl.Target) -> tvm.tirx.PrimFunc:
    """Y = X through one shared tile of rows * cols float32 (sized to exceed the 227 KB limit)."""
    alloc = dsl.allocators(target)

    @T.prim_func
    def hog(X: T.Tensor((rows, cols), "float32"), Y: T.Tensor((rows, cols), "float32")):
        with T.Kernel(1, threads=128):
            tile = alloc.shared((rows, cols), "float32")
            T.copy(X, tile)
            T.copy(tile, Y)

    return hog


@pytest.fixture(scope="module")
def convert_kernel():
    return build.get_kernel(convert_builder, target=dsl.CPU_TARGET)


def _run_convert(
    kernel, x_bits: torch.Tensor, e_bits: torch.Tensor, w: torch.Tensor, bf16_sentinel: int = _BF16_SENTINELS[0]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the conversion kernel on bf16 codes x_bits [N] uint16, e4m3 codes e_bits [M] uint8, w [P] float32."""
    y = _f32_sentinel(x_bits.numel())
    f = _f32_sentinel(e_bits.numel())
    z = torch.full((w.numel(),), bf16_sentinel, dtype=torch.int32).to(torch.uint16)
    kernel(x_bits, e_bits, w, y, f, z)
    return y, f, z


def _assert_same_f32_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    bad = actual.view(torch.int32) != expected.view(torch.int32)
    assert not bad.any(), f"{what}: {int(bad.sum())} mismatches, first at {bad.nonzero()[:5].flatten().tolist()}"


def _assert_bf16_matches_torch(z_bits: torch.Tensor, w: torch.Tensor) -> None:
    """z_bits [P] uint16 must equal torch's round-to-nearest-even bf16 of w [P] float32 (NaN only as NaN)."""
    expected = w.to(torch.bfloat16)
    actual = z_bits.view(torch.bfloat16)
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), "NaN positions differ"
    bad = actual[~nan].view(torch.uint16) != expected[~nan].view(torch.uint16)
    assert not bad.any(), (
        f"{int(bad.sum())} bf16 mismatches, e.g. inputs {w[~nan][bad][:5].tolist()} -> "
        f"{actual[~nan][bad][:5].tolist()} expected {expected[~nan][bad][:5].tolist()}"
    )


def test_is_cpu_and_storage_dtype() -> None:
    assert dsl.is_cpu(dsl.CPU_TARGET) and dsl.is_cpu(tvm.target.Target("c"))
    assert not dsl.is_cpu(dsl.HOPPER_TARGET) and not dsl.is_cpu(tvm.target.Target(dsl.HOPPER_TARGET))
    assert dsl.storage_dtype("bfloat16", "c") == "uint16"
    assert dsl.storage_dtype("float8_e4m3fn", "c") == dsl.storage_dtype("float8_e4m3", "c") == "uint8"
    assert dsl.storage_dtype("float32", "c") == "float32"
    assert dsl.storage_dtype("int32", "c") == "int32"
    assert dsl.storage_dtype(torch.bfloat16, "c") == "uint16"
    for name in ("bfloat16", "float8_e4m3fn", "float32"):
        assert dsl.storage_dtype(name, dsl.HOPPER_TARGET) == name


def _optional_tensor_kernel(with_scale: bool) -> tvm.tirx.PrimFunc:
    """``Y = X * S`` with the scale tensor ``S`` a parameter only when ``with_scale`` (else ``Y = X``)."""
    n = T.dynamic("n")

    def scale_rows(X=None, S=None, Y=None):
        with T.Kernel(1, threads=1):
            for i in T.serial(n):
                Y[i] = X[i] * S[i] if S is not None else X[i]

    tensor = T.Tensor([n], "float32")
    return dsl.prim_func(scale_rows, "scaled" if with_scale else "plain", X=tensor, S=tensor if with_scale else None,
                         Y=tensor)  # fmt: skip


def test_prim_func_leaves_absent_parameters_out() -> None:
    """One def, two signatures: a None parameter is not in the kernel, the others keep the def's order and the
    kernel takes the given name."""
    with_scale = _optional_tensor_kernel(True)
    plain = _optional_tensor_kernel(False)
    assert [p.name for p in with_scale.params] == ["X_handle", "S_handle", "Y_handle"]
    assert [p.name for p in plain.params] == ["X_handle", "Y_handle"]
    assert "def scaled(" in with_scale.script() and "def plain(" in plain.script()


def test_prim_func_rejects_unknown_parameters() -> None:
    def kernel(X=None):
        pass

    with pytest.raises(ValueError, match=r"dsl.prim_func\(k\): params \['Z'\] are not parameters"):
        dsl.prim_func(kernel, "k", X=T.Tensor([4], "float32"), Z=T.Tensor([4], "float32"))


def test_to_kernel_arg() -> None:
    bf16 = torch.randn(3, 5).to(torch.bfloat16)
    fp8 = torch.randn(4).to(torch.float8_e4m3fn)
    f32 = torch.randn(2)
    as_bits = build.to_kernel_arg(bf16, dsl.CPU_TARGET)
    assert as_bits.dtype == torch.uint16 and as_bits.shape == bf16.shape
    assert as_bits.data_ptr() == bf16.data_ptr()  # a view, no copy
    assert build.to_kernel_arg(fp8, dsl.CPU_TARGET).dtype == torch.uint8
    assert build.to_kernel_arg(f32, dsl.CPU_TARGET) is f32
    for t in (bf16, fp8, f32):
        assert build.to_kernel_arg(t, dsl.HOPPER_TARGET) is t


def test_parse_ptxas_takes_max_over_entries() -> None:
    log = (
        "ptxas info    : 0 bytes gmem\n"
        "ptxas info    : Compiling entry function 'first_kernel' for 'sm_90a'\n"
        "ptxas info    : Function properties for first_kernel\n"
        "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 168 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]\n"
        "ptxas info    : Compiling entry function 'second_kernel' for 'sm_90a'\n"
        "ptxas info    : Function properties for second_kernel\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]\n"
    )
    usage = build._parse_ptxas(log)
    assert set(usage) == {"first_kernel", "second_kernel"}
    assert (usage["first_kernel"].registers, usage["first_kernel"].spill_bytes) == (168, 16)
    assert usage["second_kernel"].static_smem_bytes == 2048
    over = dsl.HOPPER_SMEM_BYTES + 1
    wgmma = {build.MMA_WGMMA: 4}
    report = build.StaticReport(registers=255, spill_bytes=16, smem_bytes=over, mma=wgmma, ptxas_log=log)
    assert len(report.problems()) == 2
    at_limit = dsl.HOPPER_SMEM_BYTES
    clean = build.StaticReport(registers=255, spill_bytes=0, smem_bytes=at_limit, mma=wgmma, ptxas_log=log)
    assert clean.problems() == [] and clean.problems(mma=build.MMA_WGMMA) == []
    no_wgmma = build.StaticReport(registers=32, spill_bytes=0, smem_bytes=0, mma={build.MMA_MMA_SYNC: 2}, ptxas_log=log)
    assert no_wgmma.problems() == [] and len(no_wgmma.problems(mma=build.MMA_WGMMA)) == 2
    # One GEMM that fell back is enough, even next to wgmma calls (what `"wgmma" in source` let pass).
    mixed = dataclasses.replace(clean, mma={build.MMA_WGMMA: 8, build.MMA_MMA_SYNC: 1})
    assert mixed.problems(mma=build.MMA_WGMMA) == ["1 GEMM call site(s) use mma_sync instead of wgmma"]
    assert mixed.mma_text == "mma_sync+wgmma"
    # ptxas's C7515 warning: correct code, but every wgmma waits for the previous one.
    serialized_log = log + (
        "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
        "insufficient register resources for the wgmma pipeline in the function 'second_kernel'\n"
    )
    serialized = dataclasses.replace(clean, ptxas_log=serialized_log)
    assert [p for p in serialized.problems() if "serialised wgmma" in p] != [], serialized.problems()


@pytest.mark.cpu_kernel
def test_load_f32_decodes_every_e4m3_code(convert_kernel) -> None:
    codes = torch.arange(_N_FP8_CODES, dtype=torch.int32).to(torch.uint8)
    _, decoded, _ = _run_convert(convert_kernel, _NO_BF16, codes, torch.ones(1))
    expected = codes.view(torch.float8_e4m3fn).float()
    nan = expected.isnan()
    assert nan.sum() == 2  # 0x7F and 0xFF: e4m3fn has no infinities
    assert torch.equal(decoded.isnan(), nan)
    assert not (decoded.view(torch.int32) == _F32_SENTINEL_BITS).any()
    _assert_same_f32_bits(decoded[~nan], expected[~nan], "e4m3 decode")  # also checks -0.0 and subnormals


@pytest.mark.cpu_kernel
def test_load_f32_decodes_every_bf16_code(convert_kernel) -> None:
    codes = torch.arange(_N_BF16_CODES, dtype=torch.int32).to(torch.uint16)
    decoded, _, _ = _run_convert(convert_kernel, codes, _NO_E4M3, torch.ones(1))
    # Bit-exact including NaN payloads and -0.0; the sentinel has low bits set, so it cannot match any expected value.
    _assert_same_f32_bits(decoded, codes.view(torch.bfloat16).float(), "bf16 decode")


def _special_f32() -> torch.Tensor:
    """Infinities, NaNs with payloads that overflow naive rounding, zeros, subnormals, halfway and overflow cases."""
    bits = [
        0x7F800000, 0xFF800000,  # +-inf
        0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FBFFFFF,  # NaNs (naive RNE: some -> inf/0)
        0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x00008000, 0x00018000,  # zeros, subnormals, subnormal ties
        0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,  # exact ties: to even (down), to even (up)
        0x3F808001, 0x3F807FFF,  # just above / below a tie
        0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0xFF7FFFFF,  # the largest floats round to inf or stay finite
    ]
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


@pytest.mark.cpu_kernel
def test_store_bf16_matches_torch_rounding(convert_kernel) -> None:
    generator = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31, (_RANDOM_F32,), dtype=torch.int64, generator=generator)
    # Every tie pattern (low half exactly 0x8000) across random high halves, both parities of the kept bit.
    ties = (torch.randint(0, 2**16, (_RANDOM_F32 // 10,), generator=generator) << 16) | 0x8000
    as_f32 = [bits.to(torch.int32).view(torch.float32) for bits in (random_bits, ties)]
    w = torch.cat([_special_f32(), *as_f32])
    w = torch.cat([w, torch.randn(1000, generator=generator)])
    for sentinel in _BF16_SENTINELS:  # two sentinels: a forgotten store cannot equal both
        _, _, z = _run_convert(convert_kernel, _NO_BF16, _NO_E4M3, w, sentinel)
        _assert_bf16_matches_torch(z, w)


@pytest.mark.cpu_kernel
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
@example([0xFFFFFFFF])  # bug pinned: NaN + rounding bias wraps to 0x0000 without the NaN branch
@example([0x7FFFFFFF])  # ... and to 0x8000 (-0.0)
@example([0xFFC00000])  # bug pinned: the sign of a NaN was computed from the whole upper half
def test_store_bf16_hypothesis(convert_kernel, bits: list[int]) -> None:
    w = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    _, _, z = _run_convert(convert_kernel, _NO_BF16, _NO_E4M3, w)
    _assert_bf16_matches_torch(z, w)
    nan = w.isnan()
    if nan.any():  # the NaN keeps its sign bit
        assert torch.equal(z[nan].to(torch.int32) >> 15, (w[nan].view(torch.int32) < 0).to(torch.int32))


@pytest.mark.cpu_kernel
def test_allocator_aliases_run_on_cpu() -> None:
    kernel = build.get_kernel(tile_builder, target=dsl.CPU_TARGET, tile=_TILE)
    assert kernel.pass_configs.get("tirx.disable_vectorize") is True  # requested by the prim_func
    for rows in (_TILE, 3 * _TILE):  # one compiled kernel, several symbolic lengths
        x = torch.randn(rows, _TILE)
        y = torch.full_like(x, float("nan"))
        kernel(x, y)
        torch.testing.assert_close(y, 2 * x + 1, rtol=0, atol=0)


@pytest.mark.cpu_kernel
def test_get_kernel_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # TileLang must not write into the working directory
    first = build.get_kernel(tile_builder, target=dsl.CPU_TARGET, tile=_TILE)
    assert build.get_kernel(tile_builder, target="c", tile=_TILE) is first
    assert build.get_kernel(tile_builder, tile=_TILE, target=dsl.CPU_TARGET) is first
    other = build.get_kernel(tile_builder, target=dsl.CPU_TARGET, tile=2 * _TILE)
    assert other is not first
    assert build.get_kernel(tile_builder, target=dsl.CPU_TARGET, tile=2 * _TILE) is other
    assert os.listdir(tmp_path) == []


@pytest.mark.build
def test_conversions_are_casts_on_hopper() -> None:
    target = dsl.HOPPER_TARGET
    func = convert_builder(target=target)
    with tvm.target.Target(target):
        source = tilelang.lower(func, target=target).kernel_source
    assert "uint16_t" not in source and "<<" not in source  # no bit tricks: plain conversions
    assert "bfloat16" in source and "fp8_e4" in source


@pytest.mark.build
def test_allocator_aliases_lower_on_hopper() -> None:
    target = dsl.HOPPER_TARGET
    with tvm.target.Target(target):
        source = tilelang.lower(tile_builder(tile=_TILE, target=target), target=target).kernel_source
    assert "__shared__" in source


@pytest.mark.build
def test_static_report_of_hopper_gemm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    block, stages = 64, 2
    kernel, report = build.compile_hopper(gemm_builder, m=64, n=64, k=64, block=block, stages=stages)
    assert report.registers > 0
    assert report.spill_bytes == 0
    assert report.mma.keys() == {build.MMA_WGMMA}
    # The two pipelined bf16 input tiles live in dynamic shared memory; ptxas adds a little static (mbarriers).
    tiles_bytes = stages * 2 * block * block * torch.bfloat16.itemsize
    assert tiles_bytes <= report.smem_bytes <= tiles_bytes + _STATIC_SMEM_SLACK, report.smem_bytes
    assert report.problems() == [], report.ptxas_log
    assert os.listdir(tmp_path) == []
    again = build.get_kernel(gemm_builder, target=dsl.HOPPER_TARGET, m=64, n=64, k=64, block=block, stages=stages)
    assert again is kernel


@pytest.mark.parametrize(("rows_b", "falls_back"), [(64, False), (16, True)])
def test_one_gemm_falling_back_from_wgmma_is_caught(rows_b: int, falls_back: bool) -> None:
    """Lowered for sm_90a (no nvcc): a kernel whose second GEMM has 16 rows issues wgmma for the first and mma.sync
    for the second; the per-call-site count names the fallback, so ``problems(mma="wgmma")`` rejects it."""
    target = dsl.HOPPER_TARGET
    with tvm.target.Target(target):
        source = tilelang.lower(two_gemm_builder(rows_a=64, rows_b=rows_b, target=target), target=target).kernel_source
    calls = build.mma_call_sites(source)
    assert calls.get(build.MMA_WGMMA, 0) > 0
    assert (build.MMA_MMA_SYNC in calls) == falls_back, calls
    report = build.StaticReport(registers=128, spill_bytes=0, smem_bytes=0, mma=calls, ptxas_log="")
    assert bool(report.problems(mma=build.MMA_WGMMA)) == falls_back


@pytest.mark.build
def test_static_report_flags_shared_memory_hog() -> None:
    rows, cols = 256, 256  # 256 KB of float32 > 227 KB
    _, report = build.compile_hopper(smem_hog_builder, rows=rows, cols=cols)
    tile_bytes = rows * cols * torch.float32.itemsize
    assert tile_bytes <= report.smem_bytes <= tile_bytes + _STATIC_SMEM_SLACK, report.smem_bytes
    problems = report.problems()
    assert any("shared memory" in p for p in problems), problems


def _report_figures(report: build.StaticReport) -> tuple[object, ...]:
    """What a static report says, less the ptxas log's timing line (``Compile time = ... ms``)."""
    lines = [line for line in report.ptxas_log.splitlines() if "Compile time" not in line]
    return report.registers, report.spill_bytes, report.smem_bytes, dict(report.mma), lines


@pytest.mark.build
def test_static_report_from_the_compiles_own_ptxas_output_equals_rerunning_ptxas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``compile_cuda`` of a kernel TileLang has not cached takes the report from ptxas's verbose output of TileLang's
    own nvcc run (no PTX regenerated) and caches it for ``static_report``; it equals the report of regenerating the
    PTX and running ptxas, which is what a compile that captured nothing (an in-process hit) does. TileLang's logger
    is at WARNING as in the tuner: nothing reaches the console and its level comes back.

    Not through the session's build pool on purpose: the point is an nvcc run in this process (a fresh TileLang cache
    and a ``block_N`` no other test builds, so neither TileLang's memory cache nor ``get_kernel``'s can answer)."""
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path / "tilelang"))
    ptx_runs: list[object] = []
    kernel_ptx = build._kernel_ptx
    monkeypatch.setattr(build, "_kernel_ptx", lambda kernel: ptx_runs.append(kernel) or kernel_ptx(kernel))
    tl_logger = logging.getLogger("tilelang")
    params = {"block_N": 96, "has_starts": True}
    reports = tmp_path / "reports"
    level = tl_logger.level
    tl_logger.setLevel(logging.WARNING)  # setLevel, not an attribute: it clears the loggers' cached isEnabledFor
    try:
        kernel, captured = build.compile_hopper(split_ranges.build, report_cache_dir=reports, **params)
        assert tl_logger.level == logging.WARNING and tl_logger.filters == []
        assert all(handler.filters == [] for handler in tl_logger.handlers)
    finally:
        tl_logger.setLevel(level)
    assert ptx_runs == [] and len(list(reports.iterdir())) == 1
    assert tilelang.env.get_default_verbose() is False
    assert build.static_report(kernel, cache_dir=reports).ptxas_log == captured.ptxas_log  # from the cache
    assert ptx_runs == []
    # An in-process hit captures nothing: the old path, PTX regenerated and run through ptxas (no cache given).
    again, rerun = build.compile_hopper(split_ranges.build, **params)
    assert again is kernel and ptx_runs == [kernel]
    assert captured.registers > 0 and _report_figures(captured) == _report_figures(rerun)
    out, err = capsys.readouterr()
    assert "PTXAS" not in out + err and "NVCC" not in out + err and "TileLang begins" not in out + err


def test_ptxas_capture_takes_each_threads_own_log_and_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """Two threads capture at once (records logged the way ``tilelang.contrib.nvcc`` logs them): each gets its own
    ptxas log, a third thread's is dropped, nothing is printed, and TileLang's verbose flag comes back when the last
    capture ends."""
    tl_logger = logging.getLogger("tilelang")
    assert not tilelang.env.get_default_verbose()
    capture = build._PtxasCapture()
    logs: dict[str, list[str]] = {}
    inside, done = threading.Barrier(3, timeout=30), threading.Barrier(3, timeout=30)

    def nvcc_run(name: str, captures: bool) -> None:
        with capture.capture() if captures else contextlib.nullcontext([]) as mine:
            inside.wait()
            assert tilelang.env.get_default_verbose() and not capture.user_verbose()
            tl_logger.info("NVCC compilation command: %s", f"nvcc {name}")
            tl_logger.info("PTXAS verbose output:\n%s", f"ptxas log of {name}")
            done.wait()
        logs[name] = mine

    threads = [threading.Thread(target=nvcc_run, args=(name, name != "c")) for name in "ab"]
    threads[0].start()
    threads[1].start()
    nvcc_run("c", False)
    for thread in threads:
        thread.join()
    assert logs == {"a": ["ptxas log of a"], "b": ["ptxas log of b"], "c": []}
    assert not tilelang.env.get_default_verbose() and tl_logger.filters == []
    out, err = capsys.readouterr()
    assert "ptxas log" not in out + err and "nvcc" not in out + err


# ----------------------------------------------------------------------------------------------------------------------
# The session's build pool: the recorded C-target kernels and the claims
# ----------------------------------------------------------------------------------------------------------------------
def test_recorded_cpu_kernels_name_builders_that_take_their_parameters() -> None:
    """Every entry of ``tests/cpu_kernels.json`` names a builder that accepts its parameters and a test that exists
    (a stale entry would cost the pool a compile nobody asks for; rerecord with ``--dsa-record-cpu-kernels``)."""
    entries = build_pool.read_cpu_kernels()
    assert entries, "tests/cpu_kernels.json is missing or empty"
    root = Path(__file__).resolve().parent.parent
    for entry in entries:
        module, qualname = entry["builder"].split(":")
        builder = getattr(importlib.import_module(module), qualname)
        inspect.signature(builder).bind(**entry["params"], target=dsl.CPU_TARGET)
        path, name = entry["test"].split("::")
        assert f"def {name}(" in (root / path).read_text(), entry["test"]


def _cpu_job(n: int) -> build_pool.CpuJob:
    return build_pool.CpuJob.of("tests.test_build_infra", "tile_builder", {"tile": n}, ["-O2"])


def test_cpu_kernels_round_trip_and_come_in_the_order_the_tests_ask(tmp_path: Path) -> None:
    """Recorded once per kernel (parameters stripped from the test id); the pool gets the kernels of the selected
    tests at this session's flags, ordered by the first test that asks for each."""
    path = tmp_path / "kernels.json"
    recorded = [("t.py::a[x]", _cpu_job(1)), ("t.py::b", _cpu_job(2)), ("t.py::c", _cpu_job(1))]
    recorded.append(("t.py::d", _cpu_job(3)))
    build_pool.write_cpu_kernels(path, recorded)
    entries = build_pool.read_cpu_kernels(path)
    assert [(e["test"], e["params"]) for e in entries] == [("t.py::a", {"tile": 1}), ("t.py::b", {"tile": 2}),
                                                            ("t.py::d", {"tile": 3})]  # fmt: skip
    order = ["t.py::d", "t.py::a[y]", "t.py::a[x]", "t.py::e"]  # b not selected
    assert build_pool.cpu_jobs(entries, order, ("-O2",)) == [_cpu_job(3), _cpu_job(1)]
    assert build_pool.cpu_jobs(entries, order, ("-O0",)) == []


def test_one_process_compiles_each_cpu_kernel_and_the_other_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first claim wins; a test asking for a kernel the pool claimed waits for the pool's marker (then loads it
    from the disk cache), and one it claimed itself is not waited for."""
    mine, pools = _cpu_job(5), _cpu_job(6)
    sleeper = build_pool.subprocess.Popen(["sleep", "30"])  # stands in for the pool process: alive
    pool = build_pool.Pool(sleeper, tmp_path, frozenset({build_pool.job_key(mine), build_pool.job_key(pools)}))
    monkeypatch.setattr(build_pool, "_ACTIVE", [pool])
    try:
        assert build_pool.claim(tmp_path, pools) and not build_pool.claim(tmp_path, pools)
        build_pool._before_cpu_compile(mine)  # claims it: no wait
        assert not build_pool.claim(tmp_path, mine) and pool.waited_s == 0
        assert build_pool.run_pooled(mine, tmp_path) == (True, build_pool.CLAIMED)
        timer = threading.Timer(0.5, build_pool._write_marker, (tmp_path, pools, (True, None)))
        timer.start()
        build_pool._before_cpu_compile(pools)
        assert pool.waited_s >= 0.4
        timer.join()
    finally:
        sleeper.kill()
        sleeper.wait()
