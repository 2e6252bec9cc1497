"""The GPU phase's worker process (``autotune.gpu_worker``) and its bookkeeping (``autotune.gpu_phase.Progress``),
exercised on the CPU with fake runners whose candidates segfault or hang the worker."""

from __future__ import annotations

import json
import os
import signal
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from autotune import cli, gpu_phase, gpu_worker, tuner
from autotune.lookup import cache, space
from tests import fake_kernel as fake
from tests.test_tuner import FakeRunner


def test_worker_survives_candidates_that_crash_or_hang(
    fake_kernel: types.ModuleType, cache_dirs: tuple[Path, Path]
) -> None:
    """A segfault while checking and a hang while timing each fail only their candidate, with the reason; the other
    candidates' results are kept and the winners stored. Then one fresh worker serves two clean cases, one that dies
    while idle is replaced, and the last ends cleanly when the timer is closed. Four workers in all."""
    (case,) = space.preset_cases(fake.PRESET, (fake.KERNEL,))
    configs = [fake.WORKER_GOOD[0], fake.WORKER_SEGFAULT, fake.WORKER_GOOD[1], fake.WORKER_HANG]
    user, _ = cache_dirs
    options = fake.options(user, candidate_timeout_s=3)
    started = time.monotonic()
    timer = gpu_worker.GpuTimer(sku="h100-sxm", device=torch.device("cpu"), runner=fake.WORKER_RUNNER, measure=fake.worker_measure)
    records, written, ok = timer(case, fake.candidates(configs), options)
    assert timer._worker is None, "the hung worker must be gone"
    assert ok and written == [cache.user_path(fake.KERNEL, sku="h100-sxm", cache_dir=user)]
    found = {(json.dumps(r.config, sort_keys=True), r.params["seq_len"]): r for r in records}
    assert len(found) == len(configs) * len(fake.SIZES)

    def record(config: dict[str, Any], point: int) -> tuner.Record:
        return found[(json.dumps(config, sort_keys=True), fake.SIZES[point]["seq_len"])]

    for point in range(len(fake.SIZES)):
        crashed = record(fake.WORKER_SEGFAULT, point)
        assert not crashed.ok and "died with signal 11 (SIGSEGV) while checking candidate" in crashed.error
        assert '{"block":32,"stages":1}' in crashed.error
        for good in fake.WORKER_GOOD:
            assert record(good, point).ok and record(good, point).latency_ms == pytest.approx(1.28)
    fast = record(fake.WORKER_HANG, 0)
    assert fast.ok and fast.latency_ms == pytest.approx(0.64) and fast.chosen
    hung = record(fake.WORKER_HANG, 1)
    assert not hung.ok and "no result after 3 s while timing candidate" in hung.error and "killed" in hung.error
    assert record(fake.WORKER_GOOD[0], 1).chosen  # a tie with fake.WORKER_GOOD[1]: the lower position wins
    assert cache.lookup(fake.KERNEL, fake.STATIC, fake.SIZES[0], sku="h100-sxm", cache_dir=user) == fake.WORKER_HANG
    assert cache.lookup(fake.KERNEL, fake.STATIC, fake.SIZES[1], sku="h100-sxm", cache_dir=user) == fake.WORKER_GOOD[0]

    processes = []
    with timer:
        for _ in range(2):
            assert timer(case, fake.candidates(list(fake.WORKER_GOOD)), options)[2]
            assert timer._worker is not None and timer._worker.process.is_alive()
            processes.append(timer._worker.process)
        assert processes[0] is processes[1], "one worker for both cases"
        # A worker that dies while idle is replaced without failing the next case.
        os.kill(processes[0].pid, signal.SIGKILL)
        processes[0].join(timeout=30)
        records, _, ok = timer(case, fake.candidates(list(fake.WORKER_GOOD)), options)
        assert ok and all(r.ok for r in records)
        processes.append(timer._worker.process)
    assert processes[2] is not processes[0] and processes[2].exitcode == 0, "close() ends the worker cleanly"
    assert time.monotonic() - started < 60


def test_progress_failures_are_attributed() -> None:
    """Which results a dead or hung worker's step takes with it."""
    progress = gpu_phase.Progress(candidates=3, points=3)
    for i in range(3):
        progress.add(gpu_phase.Result(i, None, None, None))
    progress.add(gpu_phase.Result(0, 0, 1.0, None))
    progress.fail(gpu_phase.Step("time", point=0, candidate=1), "hung")
    # A candidate that hung while timed is not timed at the later points either; the others still are.
    assert [progress.times[(p, 1)] for p in range(3)] == [(None, "hung")] * 3
    assert progress.untimed(0) == [2] and progress.untimed(1) == [0, 2]
    progress.fail(gpu_phase.Step("inputs", point=1), "no inputs")
    assert progress.untimed(1) == [] and progress.times[(1, 0)] == (None, "no inputs")
    progress.fail(None, "worker dead at start-up")
    assert progress.finished() and progress.times[(0, 2)] == (None, "worker dead at start-up")
    assert progress.times[(0, 0)] == (1.0, None), "a result already reported is kept"
    unchecked = gpu_phase.Progress(candidates=2, points=1)
    unchecked.add(gpu_phase.Result(0, None, None, "wrong result"))
    unchecked.fail(gpu_phase.Step("reference"), "reference died")
    assert unchecked.checks == {0: "wrong result", 1: "reference died"} and unchecked.finished()
    assert gpu_worker._exit_text(-11) == "GPU worker process died with signal 11 (SIGSEGV)"
    assert gpu_worker._exit_text(139) == "GPU worker process exited with code 139"


def test_timer_in_process_mode(fake_kernel: types.ModuleType, cache_dirs: tuple[Path, Path]) -> None:
    """``isolate=False`` runs the same steps in this process (closures allowed) and starts no worker."""
    timer = gpu_worker.GpuTimer(
        sku="h100-sxm", device=torch.device("cpu"), runner=FakeRunner().runner(),
        measure=lambda call, sets, warmup, reps: 1.0,
    )  # fmt: skip
    user, _ = cache_dirs
    result = tuner.tune(fake.options(user, isolate=False), timer=timer)
    assert not result.failed_cases and timer._worker is None
    assert cache.lookup(fake.KERNEL, fake.STATIC, fake.SIZES[0], sku="h100-sxm", cache_dir=user) == {"block": 64, "stages": 2}


def test_candidate_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsa import env

    monkeypatch.delenv("DSA_TUNE_CANDIDATE_TIMEOUT_S", raising=False)
    assert env.tune_candidate_timeout_s() == 120.0
    monkeypatch.setenv("DSA_TUNE_CANDIDATE_TIMEOUT_S", "7.5")
    assert env.tune_candidate_timeout_s() == 7.5
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv("DSA_TUNE_CANDIDATE_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="DSA_TUNE_CANDIDATE_TIMEOUT_S"):
            env.tune_candidate_timeout_s()
    assert cli.main([]) == cli.EXIT_USAGE  # a bad value is a usage error before anything compiles
    args = cli.build_parser().parse_args(["--candidate-timeout", "30", "--in-process"])
    assert args.candidate_timeout == 30.0 and args.in_process


def test_make_timer_gives_the_isolated_timer_the_cli_uses() -> None:
    """``dsa-autotune`` on a GPU host times through ``make_timer``: it must exist and start no worker until used."""
    timer = gpu_worker.make_timer(sku="h200", device=torch.device("cpu"))
    assert isinstance(timer, gpu_worker.GpuTimer) and timer.sku == "h200" and timer._worker is None
    timer.close()
