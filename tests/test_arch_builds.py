"""Build tier of the portable schedule: every kernel's default config at DeepSeek-V3.2 shapes, compiled for each
CUDA architecture other than sm_90a (nvcc and ptxas for that architecture; no GPU).

What a clean build proves per architecture: TileLang lowers every GEMM to mma.sync (never wgmma: on sm_90 TileLang
would emit wgmma without ``tl.disable_wgmma``), no register spills, shared memory within the architecture's limit,
none of Hopper's TMA or register reallocation, FP8 indexer inputs multiplied as bf16 where the architecture has no FP8
matrix instructions (sm_80, sm_86) and as FP8 where it has them, and the sparse-attention gather still asynchronous.
The math of the same builders is the C-target tier's job; running these kernels is the GPU tier's (the portable stage
of ``scripts/gpu_check.py`` runs the sm_90 build on a Hopper GPU).

Default configs only (the tuning spaces are compiled for Hopper alone), and each distinct build once: a 2-core CI
machine compiles the V3.2 backward in about 130 s per architecture. Every architecture builds the FP8 indexer (its
tile dtype differs: bf16 where there is no FP8 MMA); the backward, whose default config follows the shared-memory
class, builds once per class that has its own config (sm_80: the 163/227 KB config, sm_89: the 99 KB one); the
forward (one default everywhere) builds on sm_80, on sm_90 (what the GPU tier runs) and on sm_120 (where a 64-head
block once spilled); top-k (no GEMM, no arch feature) on sm_80; the fused selection on sm_86 (bf16 tiles from FP8
inputs and 99 KB: its tightest fit). ``dsa-autotune --compile-only --sku <id>`` builds
every kernel for any one architecture. The builds are compiled up front in parallel (``autotune.tuner.compile_all``,
as the tuner does; in a full run the session's build pool has compiled them in the background already), then each
test reads its result.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from autotune import tuner
from autotune.lookup import cache, space
from dsa import env
from tests import build_pool, support
from tl_kernels import build as tl_build
from tl_kernels import dsl

ARCH_NAMES: tuple[str, ...] = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100a", "sm_120")
"""The architectures of the issue's build tier, plus sm_90: the portable build the GPU tier runs on Hopper."""

V32_FLAGS = {"has_topk_length": True, "has_sink": True}
CASES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("indexer", {"heads": 64, "dim": 128, "dtype": "float8_e4m3fn", "mode": "causal"}),
    ("topk", {"k": 2048}),
    ("index_topk", {"heads": 64, "dim": 128, "dtype": "float8_e4m3fn", "mode": "causal", "topk": 2048}),
    ("sparse_mla_fwd", {"heads": 128, "d_qk": 576, "d_v": 512, **V32_FLAGS}),
    ("sparse_mla_bwd", {"heads": 128, "d_qk": 576, "d_v": 512, "topk": 2048, **V32_FLAGS}),
)
BF16_INDEXER = ("indexer", {"heads": 64, "dim": 128, "dtype": "bfloat16", "mode": "causal"})
"""The bf16 indexer needs twice the FP8 tiles' shared memory: built where that is tightest (99 KB)."""
ARCHS_BY_KERNEL: dict[str, tuple[str, ...]] = {
    "indexer": ARCH_NAMES,
    "topk": ("sm_80",),
    "index_topk": ("sm_86",),
    "sparse_mla_fwd": ("sm_80", "sm_90", "sm_120"),
    "sparse_mla_bwd": ("sm_80", "sm_89"),
}
"""Where each kernel's default config is built (see the module docstring for why)."""
BUILDS: tuple[tuple[str, str, dict[str, Any]], ...] = tuple(
    (arch, kernel, static) for kernel, static in CASES for arch in ARCHS_BY_KERNEL[kernel]
) + (("sm_86", *BF16_INDEXER),)

# Hopper-only device code: wgmma, TMA copies and barriers, setmaxnreg (TileLang's warpgroup register reallocation).
HOPPER_FEATURES = re.compile(r"wgmma|tma_load|tma_store|fence_proxy_async|warpgroup_reg_(?:alloc|dealloc)")
MMA_SYNC_CALL = re.compile(r"tl::mma_sync<tl::DataType::(\w+),")


def _build_id(build: tuple[str, str, dict[str, Any]]) -> str:
    arch, kernel, static = build
    return f"{arch}-{kernel}" + (f"-{static['dtype']}" if "dtype" in static else "")


def _job(arch: str, kernel: str, static: dict[str, Any]) -> tuner.CompileJob:
    target = dsl.cuda_target(arch)
    kernel_spec = space.spec(kernel)
    return tuner.CompileJob(
        kernel=kernel,
        module=kernel_spec.module,
        compile_fn=kernel_spec.compile_fn,
        static_json=cache.canonical(static),
        config_json=cache.canonical(space.default_config(kernel, static, target=target)),
        target_json=cache.canonical(target),
        mma=dsl.ARCHS[arch].mma if kernel_spec.has_gemm else None,
        report_cache_dir=str(env.static_report_dir()),
    )


def _jobs() -> dict[str, tuner.CompileJob]:
    return {_build_id(build): _job(*build) for build in BUILDS}


@pytest.fixture(scope="module")
def compiled() -> dict[str, tuple[tuner.CompileJob, tuner.CompileResult]]:
    """Every build of :data:`BUILDS` by test id: from the session's build pool (``tests.build_pool``), else compiled
    here in parallel on the usable CPUs."""
    jobs = _jobs()
    pooled = build_pool.wait(list(jobs.values()))
    if pooled is not None and all(done for done, _ in pooled.values()):
        results = {job: result for job, (_, result) in pooled.items()}
    else:
        results = tuner.compile_all(list(jobs.values()), workers=tuner.default_jobs(), progress=False)
    return {name: (job, results[job]) for name, job in jobs.items()}


compiled.dsa_compile_jobs = lambda: list(_jobs().values())  # for the session's build pool, read at collection


@pytest.mark.build
@pytest.mark.arch_build
@pytest.mark.parametrize("build", BUILDS, ids=_build_id)
def test_portable_default_config_builds_clean(
    build: tuple[str, str, dict[str, Any]], compiled: dict[str, tuple[tuner.CompileJob, tuner.CompileResult]]
) -> None:
    arch_name, kernel, static = build
    arch = dsl.ARCHS[arch_name]
    job, result = compiled[_build_id(build)]
    assert result.ok, result.error
    assert result.spill_bytes == 0
    assert result.smem_bytes is not None and result.smem_bytes <= arch.smem_bytes
    if space.spec(kernel).has_gemm:
        assert result.mma == dsl.MMA_MMA_SYNC, result.mma
    # The source, from TileLang's disk cache (the parallel compile above filled it).
    module = space.kernel_module(kernel)
    source = tl_build.get_kernel(module.build, target=job.target, **job.static, **job.config).get_kernel_source()
    assert not HOPPER_FEATURES.findall(source), sorted(set(HOPPER_FEATURES.findall(source)))
    support.assert_wide_addressing(source)
    operand_types = set(MMA_SYNC_CALL.findall(source))
    if kernel == "indexer" and static["dtype"] == "float8_e4m3fn":
        # FP8 MMA where the architecture has it; converted to bf16 in the kernel where it does not (CUTLASS's FP8
        # mma.sync compiles for sm_80/sm_86 but would trap there).
        assert operand_types == ({"kFloat8_e4m3"} if arch.fp8_mma else {"kBFloat16"}), operand_types
    elif kernel != "topk":
        assert operand_types == {"kBFloat16"}, operand_types
    if kernel == "sparse_mla_fwd":
        assert "cp_async" in source, "the KV gather is not asynchronous on the portable schedule"
