"""Test configuration: Hypothesis profiles and the hardware markers, decided in one place.

Profiles (``HYPOTHESIS_PROFILE`` selects one explicitly):
- ``ci``: selected when ``CI`` is set; bounded example counts, no deadline, derandomised so CI is repeatable.
- ``dev``: the default on a workstation; fewer examples, fast feedback.
- ``gpu``: for the GPU tier on a CUDA host; more examples.
- ``long``: for ``scripts/fuzz.py``; many examples, database kept on disk.

Markers: ``gpu`` tests are skipped cleanly when no CUDA device is present; ``build`` tests need ``nvcc`` on PATH.
Tests size their own example counts relative to the profile through ``examples(n)``.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, settings

from dsa import hardware

_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]

settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, suppress_health_check=_SUPPRESSED, print_blob=True)
settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=_SUPPRESSED)
settings.register_profile("gpu", max_examples=200, deadline=None, suppress_health_check=_SUPPRESSED, print_blob=True)
settings.register_profile("long", max_examples=100_000, deadline=None, suppress_health_check=_SUPPRESSED, print_blob=True)

_profile = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
settings.load_profile(_profile)

def cuda_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="GPU tier: no CUDA device on this machine")
    not_hopper = pytest.mark.skip(reason="GPU tier: needs a Hopper GPU (compute capability >= 9.0)")
    no_nvcc = pytest.mark.skip(reason="build tier: nvcc is not on PATH")
    has_cuda = cuda_available()
    hopper = has_cuda and hardware.is_hopper(torch.device("cuda"))  # the one Hopper rule, shared with dispatch
    has_nvcc = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    for item in items:
        if "gpu" in item.keywords:
            if not has_cuda:
                item.add_marker(no_gpu)
            elif not hopper:
                item.add_marker(not_hopper)
        if "build" in item.keywords and not has_nvcc:
            item.add_marker(no_nvcc)


@pytest.fixture
def cuda_device() -> torch.device:
    """The CUDA device for ``gpu``-marked tests."""
    return torch.device("cuda")
