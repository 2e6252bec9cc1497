"""The portable schedule's configs (pure Python, no compiler): what each kernel module's ``check_config`` rejects off
sm_90a and why, what ``default_config`` picks per architecture, and the tuning spaces the tuner searches there.

The builds themselves are ``tests/test_arch_builds.py`` (build tier) and the GPU tier's ``portable`` tests.
"""

from __future__ import annotations

from typing import Any

import pytest

from autotune.lookup import space
from tl_kernels import dsl
from tl_kernels import indexer as indexer_kernels
from tl_kernels import sparse_mla_bwd as bwd_kernels
from tl_kernels import sparse_mla_fwd as fwd_kernels
from tl_kernels import topk as topk_kernels

SM80, SM86, SM90 = dsl.cuda_target("sm_80"), dsl.cuda_target("sm_86"), dsl.cuda_target("sm_90")
PORTABLE_ARCHS = tuple(name for name, arch in dsl.ARCHS.items() if not arch.hopper)
FWD_V32 = {"heads": 128, "d_qk": 576, "d_v": 512, "has_topk_length": True, "has_sink": True}
BWD_V32 = {"heads": 128, "d_qk": 576, "d_v": 512, "topk": 2048, "has_topk_length": True, "has_sink": True}
FP8_INDEXER = {"heads": 64, "dim": 128, "dtype": "float8_e4m3fn", "mode": "causal"}


@pytest.mark.parametrize(
    ("module", "static", "config", "reason"),
    [
        (fwd_kernels, {**FWD_V32, "target": SM80},
         fwd_kernels.Config(block_k=64, threads=384, pipeline="ws"), "needs sm_90a"),
        (fwd_kernels, {**FWD_V32, "target": SM86}, fwd_kernels.Config(), r"more than 101376 B on sm_86"),
        (fwd_kernels, {**FWD_V32, "target": SM80},
         fwd_kernels.Config(block_h=32, block_k=16, threads=256), "cannot be split over 8 warps"),
        (fwd_kernels, {**FWD_V32, "target": SM80}, fwd_kernels.Config(block_h=8), "multiple of 16"),
        (fwd_kernels, {**FWD_V32, "target": SM80}, fwd_kernels.Config(threads=512), "threads must be one of"),
        (bwd_kernels, {**BWD_V32, "target": SM86}, bwd_kernels.Config(block_h=32, block_topk=32),
         r"more than 101376 B on sm_86"),
        (bwd_kernels, {**BWD_V32, "target": SM80}, bwd_kernels.Config(block_h=16, block_topk=32, threads=256),
         "cannot be split over 8 warps"),
        (bwd_kernels, {**BWD_V32, "target": SM80}, bwd_kernels.Config(block_h=8), "multiple of 16 on sm_80"),
        (indexer_kernels, {**FP8_INDEXER, "target": SM86},
         indexer_kernels.Config(q_rows=128, block_N=256, num_stages=2, threads=512), "exceeds 101376 B"),
        (topk_kernels, {"k": 2048, "target": SM86}, topk_kernels.Config(threads=1024, cand_capacity=16384),
         "exceeds 101376 B"),
    ],
    ids=["fwd-ws", "fwd-smem", "fwd-warps", "fwd-block_h", "fwd-threads", "bwd-smem", "bwd-warps", "bwd-block_h",
         "indexer-smem", "topk-smem"],
)  # fmt: skip
def test_portable_check_config_rejects(module: Any, static: dict[str, Any], config: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        module.check_config(static, config)


def test_fp8_indexer_tiles_are_bf16_where_the_gpu_has_no_fp8_mma() -> None:
    """sm_80/sm_86 convert FP8 keys to bf16 in the kernel: the tiles, hence shared memory, double."""
    config = indexer_kernels.Config(q_rows=64, block_N=128, num_stages=2, threads=256)
    bf16 = indexer_kernels.smem_bytes({**FP8_INDEXER, "target": SM80}, config)
    fp8 = indexer_kernels.smem_bytes({**FP8_INDEXER, "target": dsl.cuda_target("sm_89")}, config)
    assert indexer_kernels.tile_dtype_for("float8_e4m3fn", SM80) == "bfloat16"
    assert indexer_kernels.tile_dtype_for("float8_e4m3fn", SM90) == "float8_e4m3fn"
    assert bf16 > fp8


@pytest.mark.parametrize("arch", PORTABLE_ARCHS)
def test_portable_defaults_fit_every_architecture(arch: str) -> None:
    """Each kernel has a default config at V3.2 shapes on every portable architecture, within its shared memory and
    never the Hopper-only schedule; the 99 KB parts get the smaller tiles."""
    target = dsl.cuda_target(arch)
    limit = dsl.ARCHS[arch].smem_bytes
    fwd = fwd_kernels.default_config({**FWD_V32, "target": target})
    bwd = bwd_kernels.default_config({**BWD_V32, "target": target})
    idx = indexer_kernels.default_config({**FP8_INDEXER, "target": target})
    assert fwd.pipeline == fwd_kernels.PIPELINE_NONE
    assert fwd_kernels.smem_bytes(FWD_V32, fwd) <= limit
    assert bwd_kernels.shared_memory_bytes(BWD_V32, bwd) <= limit
    assert indexer_kernels.smem_bytes({**FP8_INDEXER, "target": target}, idx) <= limit
    small = limit < 128 * 1024
    assert (fwd.block_h, bwd.block_h) == ((32, 16) if small else (32, 32)), (fwd, bwd)


@pytest.mark.parametrize("kernel", space.KERNEL_NAMES)
def test_portable_tuning_space_is_checked_for_its_target(kernel: str) -> None:
    """The tuner's candidates on a portable architecture come from the module's portable space (the Hopper-only ws
    schedule never appears) and each passes ``check_config`` for that target; the default comes first."""
    static = {
        "indexer": FP8_INDEXER, "topk": {"k": 2048}, "index_topk": {**FP8_INDEXER, "topk": 2048},
        "sparse_mla_fwd": FWD_V32, "sparse_mla_bwd": BWD_V32,
    }[kernel]  # fmt: skip
    module = space.kernel_module(kernel)
    for target in (SM80, SM86):
        full = space.full_space(kernel, static, target=target)
        assert full[0] == space.default_config(kernel, static, target=target)
        assert space.candidates(kernel, static, defaults_only=True, target=target) == full[:1]
        for config in full + space.pruned_space(kernel, static, target=target):
            module.check_config({**static, "target": target}, module.Config(**config))
            assert config.get("pipeline", fwd_kernels.PIPELINE_NONE) == fwd_kernels.PIPELINE_NONE
