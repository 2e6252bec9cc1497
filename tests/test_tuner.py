"""The tuner (``autotune.tuner`` with ``autotune.gpu_phase.time_case``) on the fake kernel: compile-only runs, the
static-report gate, and the choice of winners by fake runners and clocks (no nvcc, no GPU)."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from autotune import gpu_phase, tuner
from autotune.lookup import cache, space
from benchmarks import runners
from dsa import testing
from tests import fake_kernel as fake


def test_tune_compile_only_fake(fake_kernel: types.ModuleType, tmp_path: Path) -> None:
    result = tuner.tune(fake.options(tmp_path, full=True))
    by_config = {(r.config["block"], r.config["stages"]): r for r in result.records}
    assert set(by_config) == {(c["block"], c["stages"]) for c in space.candidates(fake.KERNEL, fake.STATIC, full=True)}
    assert not by_config[(32, 3)].ok and "fake compile error" in by_config[(32, 3)].error
    assert not by_config[(128, 2)].ok and "spills" in by_config[(128, 2)].error
    # A GEMM that fell back from wgmma to mma_sync rejects the candidate: every GEMM of the kernel must be a wgmma.
    assert not by_config[(64, 3)].ok and "mma_sync" in by_config[(64, 3)].error
    assert by_config[(64, 2)].ok and by_config[(64, 2)].registers == 64 and by_config[(64, 2)].error is None
    assert all(r.latency_ms is None and r.tflops is None and not r.chosen for r in result.records)
    assert all(r.params == fake.STATIC for r in result.records)
    assert not result.failed_cases and not result.written


class FakeRunner:
    """CPU 'kernel' runs: output = x * config.block; candidates with block == 32 compute garbage."""

    def __init__(self) -> None:
        self.launches = 0

    def runner(self) -> runners.Runner:
        def make_inputs(static, sizes, device, seed):
            gen = torch.Generator().manual_seed(seed)
            return {"x": torch.rand(sizes["seq_len"], generator=gen) + 0.5}

        def launch(kernel, static, inputs):
            self.launches += 1
            block = kernel[3]
            factor = 1.0 if block != 32 else 1.5  # the block=32 build is "wrong"
            return (inputs["x"] * factor,)

        def reference(static, inputs):
            return (inputs["x"],)

        def compare(out, ref):
            return testing.compare(out[0], ref[0], atol=1e-6, rtol=1e-6, name="x")

        def get_kernel(kernel, static, config):
            return fake.build(**static, **config)

        return runners.Runner(make_inputs, launch, reference, compare, get_kernel=get_kernel)


def test_time_case_selection_fake(fake_kernel: types.ModuleType, cache_dirs: tuple[Path, Path]) -> None:
    fake_runner = FakeRunner()
    # Latency by config: block=32 would be fastest but is wrong; among correct ones (64, 1) is fastest.
    latency = {(32, 1): 0.1, (32, 2): 0.1, (64, 1): 0.5, (64, 2): 1.0, (64, 3): 0.9, (128, 1): 0.7}

    def measure(call, input_sets, *, warmup, reps):
        call(input_sets[0])  # the launch records which candidate it ran
        return latency[current["config"]]

    current: dict[str, Any] = {}
    real_launch = fake_runner.runner().launch

    def runner_with_tracking() -> runners.Runner:
        base = fake_runner.runner()

        def get_kernel(kernel, static, config):
            return ("k", static, config)

        def launch(kernel, static, inputs):
            current["config"] = (kernel[2]["block"], kernel[2]["stages"])
            return real_launch(fake.build(**static, **kernel[2]), static, inputs)

        return dataclasses.replace(base, get_kernel=get_kernel, launch=launch)

    def timer(case, candidates, options):
        return gpu_phase.time_case(
            case, candidates, options, sku="h100-sxm", device=torch.device("cpu"),
            runner=runner_with_tracking(), measure=measure,
        )

    user, _ = cache_dirs
    result = tuner.tune(fake.options(user, full=True), timer=timer)
    assert result.timed and not result.failed_cases
    for sizes in fake.SIZES:
        point = [r for r in result.records if r.params == {**fake.STATIC, **sizes}]
        chosen = [r for r in point if r.chosen]
        assert len(chosen) == 1 and chosen[0].config == {"block": 64, "stages": 1}
        wrong = [r for r in point if r.config["block"] == 32 and r.config["stages"] != 3]
        assert wrong and all(not r.ok and "wrong result" in r.error for r in wrong)
        ok = [r for r in point if r.ok]
        assert {(r.config["block"], r.config["stages"]) for r in ok} == {(64, 1), (64, 2), (128, 1)}
        assert all(r.latency_ms is not None and r.tflops is not None for r in ok)
        assert chosen[0].tflops == pytest.approx(fake.fake_flops(fake.STATIC, sizes) / 0.5e-3 / 1e12, rel=1e-3)
        # The winner is in the cache for this SKU and bucket, and nothing else is.
        assert cache.lookup(fake.KERNEL, fake.STATIC, sizes, sku="h100-sxm", cache_dir=user) == {"block": 64, "stages": 1}
    # Compile failures appear once per case, without sizes.
    compile_failed = [r for r in result.records if r.params == fake.STATIC]
    assert {(r.config["block"], r.config["stages"]) for r in compile_failed} == {(32, 3), (64, 3), (128, 2)}
    assert result.written == [str(cache.user_path(fake.KERNEL, sku="h100-sxm", cache_dir=user))]
    entries = json.loads(cache.user_path(fake.KERNEL, sku="h100-sxm", cache_dir=user).read_text())["entries"]
    assert len(entries) == len(fake.SIZES)
    (metrics,) = {json.dumps(e["metrics"]["latency_ms"]) for e in entries.values()}
    assert json.loads(metrics) == 0.5


def test_time_case_no_valid_candidate(fake_kernel: types.ModuleType, cache_dirs: tuple[Path, Path]) -> None:
    base = FakeRunner().runner()

    def wrong_launch(kernel, static, inputs):
        return (inputs["x"] + 1.0,)

    def timer(case, candidates, options):
        runner = dataclasses.replace(base, launch=wrong_launch)
        return gpu_phase.time_case(
            case, candidates, options, sku="h100-sxm", device=torch.device("cpu"), runner=runner,
            measure=lambda call, sets, warmup, reps: 1.0,
        )

    user, _ = cache_dirs
    result = tuner.tune(fake.options(user), timer=timer)
    assert result.failed_cases == [(fake.KERNEL, fake.STATIC)]
    assert not any(r.chosen for r in result.records)
    assert cache.lookup(fake.KERNEL, fake.STATIC, fake.SIZES[0], sku="h100-sxm", cache_dir=user) is None


def test_pick_winner_prefers_the_fastest_and_the_default_on_ties() -> None:
    assert tuner.pick_winner({0: 1.0, 1: 0.5, 2: None, 3: 0.5}) == 1
    assert tuner.pick_winner({0: None, 1: float("nan")}) is None


def test_tune_reports_a_kernel_module_that_does_not_import(fake_kernel: types.ModuleType, tmp_path: Path) -> None:
    space.register_kernel(dataclasses.replace(space.spec(fake.KERNEL), module="no_such_kernel_module"))
    result = tuner.tune(fake.options(tmp_path))
    (record,) = result.records
    assert not record.ok and "no_such_kernel_module" in record.error and record.config == {}
    assert result.failed_cases == [(fake.KERNEL, fake.STATIC)]


def test_time_case_reference_failure_rejects_all(fake_kernel: types.ModuleType, cache_dirs: tuple[Path, Path]) -> None:
    def broken_reference(static, inputs):
        raise RuntimeError("out of memory")

    runner = dataclasses.replace(FakeRunner().runner(), reference=broken_reference)
    timer = lambda case, candidates, options: gpu_phase.time_case(  # noqa: E731
        case, candidates, options, sku="h100-sxm", device=torch.device("cpu"), runner=runner,
        measure=lambda call, sets, warmup, reps: 1.0,
    )
    result = tuner.tune(fake.options(cache_dirs[0]), timer=timer)
    assert result.failed_cases == [(fake.KERNEL, fake.STATIC)]
    timed = [r for r in result.records if "seq_len" in r.params]
    assert timed and all(not r.ok and "reference failed" in r.error for r in timed)
