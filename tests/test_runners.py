"""The tuner's runners (``benchmarks.runners``): inputs, the launcher call with ``config=``, the reference and the
comparison of every kernel, run on the C target with each module's CPU default config (marker ``cpu_kernel``).

This is the tuner's correctness gate: it must accept the kernels as they are and reject a candidate that is off by a
small constant factor (2 %), that writes another row's indices, or that leaves an output unwritten.
"""

from __future__ import annotations

import pytest
import torch

from autotune.lookup import space
from benchmarks import runners
from dsa import testing

SCALE_ERROR = 1.02


def _check_case(kernel: str, **sizes: int) -> tuple[space.Case, runners.Runner, dict, object]:
    (case,) = space.preset_cases("tiny", (kernel,))
    runner = runners.runner_for(kernel)
    inputs = runner.make_inputs(case.static, {**case.check_sizes, **sizes}, torch.device("cpu"), runners.SEED)
    config = space.kernel_module(kernel).default_config({**case.static, "target": "c"})
    return case, runner, inputs, config


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("kernel", space.KERNEL_NAMES)
def test_runner_accepts_the_kernel_and_rejects_planted_errors(kernel: str) -> None:
    case, runner, inputs, config = _check_case(kernel)
    out = runner.launch(config, case.static, inputs)
    expected = runner.reference(case.static, inputs)
    assert runner.compare(out, expected) is None
    broken = list(out)
    if broken[0].dtype == torch.int32:
        broken[0] = broken[0].roll(1, dims=1)  # other rows' indices
    else:
        broken[0] = broken[0] * SCALE_ERROR  # a constant factor that loose elementwise bounds would forgive
    assert runner.compare(tuple(broken), expected) is not None, "a planted error passed the tuner's gate"
    unwritten = list(out)
    unwritten[0] = testing.poison(unwritten[0].clone())
    assert runner.compare(tuple(unwritten), expected) is not None, "an unwritten output passed the tuner's gate"


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("kernel", space.KERNEL_NAMES)
def test_narrowed_check_matches_the_full_problem(kernel: str) -> None:
    """The benchmark's check narrows a large problem to a slice of queries: the slice of the kernel's outputs matches
    the reference on the slice (the slice keeps each query's visibility)."""
    # More batch rows and queries than the slice keeps, so that narrowing really cuts.
    case, runner, inputs, config = _check_case(kernel, batch=runners.CHECK_BATCHES + 1, seq_len=runners.CHECK_ROWS + 9)
    out = runner.launch(config, case.static, inputs)
    narrowed, narrowed_out = runner.narrow(inputs, out)
    if narrowed_out is None:
        narrowed_out = runner.launch(config, case.static, narrowed)
    assert runner.compare(narrowed_out, runner.reference(case.static, narrowed)) is None


def test_every_kernel_has_a_runner() -> None:
    for kernel in space.KERNEL_NAMES:
        assert runners.runner_for(kernel) is not None
    with pytest.raises(KeyError, match="no runner"):
        runners.runner_for("no_such_kernel")
