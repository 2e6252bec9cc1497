"""A fake kernel for the tuner's tests: a module following the kernel-module convention (``build``, ``Config``,
``TUNING_SPACE``, ``check_config``, ``default_config``) with a fake compile function, so that the tuner, the config
cache and the GPU phase are exercised without nvcc or a GPU (``tests/conftest.py``'s ``fake_kernel`` fixture registers
it with :func:`registered`).

The worker-process tests spawn a process that unpickles its runner and measure function by name, so those live here,
at module level.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from autotune import tuner
from autotune.lookup import cache, space
from benchmarks import runners
from dsa import testing

MODULE = "fake_dsa_kernel"
KERNEL = "fake"
PRESET = "fake-preset"


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    block: int = 64
    stages: int = 2


SPACE: dict[str, tuple[Any, ...]] = {"block": (32, 64, 128), "stages": (1, 2, 3)}
STATIC = {"width": 8, "limit": 256}
SIZES = ({"batch": 1, "seq_len": 64, "seq_len_kv": 64}, {"batch": 1, "seq_len": 256, "seq_len_kv": 256})
CHECK = {"batch": 1, "seq_len": 16, "seq_len_kv": 16}


def check_config(static: dict[str, Any], config: FakeConfig) -> None:
    # "shared memory": block * stages must fit the static limit.
    if config.block * config.stages > static["limit"]:
        raise ValueError(f"block * stages = {config.block * config.stages} > limit {static['limit']}")


def default_config(static: dict[str, Any]) -> FakeConfig:
    return FakeConfig()


def build(*, width: int, limit: int, block: int, stages: int, target: Any = None) -> tuple[Any, ...]:
    return ("prim_func", width, limit, block, stages)


@dataclasses.dataclass
class FakeReport:
    registers: int
    spill_bytes: int
    smem_bytes: int
    mma: dict[str, int]
    ptxas_log: str = ""

    @property
    def mma_text(self) -> str:
        return "+".join(sorted(self.mma)) or "-"

    def problems(self, *, mma: str | None = None) -> list[str]:
        found = [f"{self.spill_bytes} B of register spills"] if self.spill_bytes else []
        if mma is not None and set(self.mma) != {mma}:
            found.append(f"GEMMs use {self.mma_text} instead of {mma}")
        return found


def fake_compile(
    builder: Any, *, target: dict[str, str], report_cache_dir: Path | None = None, **params: Any
) -> tuple[Any, FakeReport]:
    """Compile failures, spills, a GEMM that fell back to mma_sync, and clean builds, decided by the config (the
    tuner's ``compile_fn`` contract: a CUDA ``target`` keyword, like ``tl_kernels.build.compile_cuda``)."""
    assert target == space.HOPPER_TARGET, f"the fake kernel is tuned for sm_90a only, got {target}"
    if params["block"] == 32 and params["stages"] == 3:
        raise RuntimeError("nvcc: fake compile error")
    prim = builder(**params, target=target)
    spills = 64 if (params["block"] == 128 and params["stages"] >= 2) else 0
    block = params["block"]
    mma = {"wgmma": 4, "mma_sync": 1} if (block == 64 and params["stages"] == 3) else {"wgmma": 4}
    return prim, FakeReport(registers=block, spill_bytes=spills, smem_bytes=block * 1024, mma=mma)


def fake_flops(static: dict[str, Any], sizes: dict[str, int]) -> float:
    return 2.0 * static["width"] * sizes["seq_len"] * sizes["seq_len_kv"] * sizes["batch"]


@contextlib.contextmanager
def registered() -> Iterator[types.ModuleType]:
    """Register ``fake_dsa_kernel`` as a module and as kernel ``fake`` with the preset ``fake-preset`` (the
    ``fake_kernel`` fixture of ``tests/conftest.py``)."""
    module = types.ModuleType(MODULE)
    module.Config = FakeConfig
    module.TUNING_SPACE = SPACE
    module.check_config = check_config
    module.default_config = default_config
    module.build = build
    module.compile = fake_compile
    sys.modules[MODULE] = module
    spec = space.KernelSpec(KERNEL, MODULE, fake_flops, compile_fn=f"{MODULE}:compile")
    space.register_kernel(spec, {PRESET: [space.Case(KERNEL, dict(STATIC), SIZES, CHECK)]})
    try:
        yield module
    finally:
        space.unregister_kernel(KERNEL)
        sys.modules.pop(MODULE, None)


def options(user: Path, **changes: Any) -> tuner.TuneOptions:
    """Tuning options for the fake kernel's preset, storing into ``user``."""
    return tuner.TuneOptions(
        **{"kernels": (KERNEL,), "preset": PRESET, "jobs": 1, "progress": False, "cache_dir": user, **changes}
    )


def candidates(configs: list[dict[str, Any]]) -> list[Any]:
    """Compiled candidates of the fake kernel's case (what ``tuner.tune`` hands a timer)."""
    return [
        tuner._Candidate(
            tuner.CompileJob(KERNEL, MODULE, f"{MODULE}:compile", cache.canonical(STATIC), cache.canonical(config)),
            tuner.CompileResult(ok=True),
        )
        for config in configs
    ]


# ----------------------------------------------------------------------------------------------------------------------
# A runner for the worker process: candidates that crash or hang it (importable by name for the spawned worker)
# ----------------------------------------------------------------------------------------------------------------------
WORKER_GOOD = ({"block": 64, "stages": 2}, {"block": 128, "stages": 1})
WORKER_SEGFAULT = {"block": 32, "stages": 1}  # kills its process with SIGSEGV while checked
WORKER_HANG = {"block": 64, "stages": 1}  # correct, timed at the first size point, hangs at the last one


def worker_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> dict[str, Any]:
    """``x [seq_len]`` float32: the fake kernels read the size point from its length."""
    return {"x": torch.arange(sizes["seq_len"], dtype=torch.float32) + seed}


def worker_kernel(kernel: str, static: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    return dict(config)


def worker_launch(config: dict[str, Any], static: dict[str, Any], inputs: dict[str, Any]) -> tuple[Any, float]:
    """``(x, latency in ms)``, the latency ``block * stages / 100``; the two bad configs misbehave as named."""
    if config == WORKER_SEGFAULT:
        os.kill(os.getpid(), signal.SIGSEGV)
    if config == WORKER_HANG and inputs["x"].numel() == SIZES[-1]["seq_len"]:
        time.sleep(600)
    return inputs["x"].clone(), config["block"] * config["stages"] / 100


def worker_reference(static: dict[str, Any], inputs: dict[str, Any]) -> tuple[Any, ...]:
    return (inputs["x"],)


def worker_compare(out: tuple[Any, ...], ref: tuple[Any, ...]) -> str | None:
    return testing.compare(out[0], ref[0], atol=0.0, rtol=0.0, name="x")


def worker_measure(call: Any, input_sets: list[dict[str, Any]], *, warmup: int, reps: int) -> float:
    return call(input_sets[0])[1]


WORKER_RUNNER = runners.Runner(
    worker_inputs, worker_launch, worker_reference, worker_compare, get_kernel=worker_kernel
)
