"""Test configuration, decided in one place: Hypothesis profiles, hardware and network markers, poisoned outputs.

Profiles (``HYPOTHESIS_PROFILE`` selects one explicitly):
- ``ci``: selected when ``CI`` is set; 100 examples per property, no deadline, derandomised so CI is repeatable.
- ``dev``: the default on a workstation; 30 examples, fast feedback.
- ``gpu``: for the GPU tier on a CUDA host; 200 examples.
- ``long``: for ``scripts/fuzz.py``; many examples, database kept on disk.

A property test that is expensive per example asks for a share of the profile's count with
``tests.strategies.examples(share)``, never for a fixed number, so ``gpu`` and ``long`` scale it up too.

Markers: ``gpu`` tests are skipped cleanly when no Hopper GPU is present; ``build`` tests need ``nvcc``; ``network``
tests (they download packages) run only with ``--network``, which CI never passes.

Every launcher allocates its outputs through ``dsa.launch.common.new_output``; an autouse fixture replaces it with a
NaN-poisoned allocator for every test, so an element a kernel forgot to write fails whatever test ran it.

``--dsa-gpu-kernels FILE`` (used with ``--collect-only -m gpu`` by the one-shot GPU check) writes every kernel the
collected GPU tests compile, from their modules' ``GPU_KERNELS`` (kernel name -> static parameter sets), as a tuner
shapes file: the GPU check compiles exactly that list, read from the tests at run time.

The session's build pool (``tests/build_pool.py``) compiles in the background the selected tests' sm_90a builds and
the C-target kernels listed in ``tests/cpu_kernels.json``; ``--dsa-record-cpu-kernels FILE`` writes that list from
the C-target kernels this session compiles (run the whole suite with ``CI=1`` to refresh it after adding kernels).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from dsa import env, hardware, testing
from tests import build_pool

_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]

settings.register_profile(
    "ci", max_examples=100, deadline=None, derandomize=True, suppress_health_check=_SUPPRESSED, print_blob=True
)
settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=_SUPPRESSED)
settings.register_profile("gpu", max_examples=200, deadline=None, suppress_health_check=_SUPPRESSED, print_blob=True)
settings.register_profile(
    "long", max_examples=100_000, deadline=None, suppress_health_check=_SUPPRESSED, print_blob=True
)

_profile = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
settings.load_profile(_profile)

NETWORK_OPTION = "--network"
GPU_KERNELS_OPTION = "--dsa-gpu-kernels"
RECORD_CPU_KERNELS_OPTION = "--dsa-record-cpu-kernels"

_CURRENT_TEST = [""]  # the node id of the running test, for the C-target kernel recorder
_RECORDED: list[tuple[str, build_pool.CpuJob]] = []
_POOL_SUMMARY: list[str] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        NETWORK_OPTION, action="store_true", default=False, help="also run the tests marked network (downloads)"
    )
    parser.addoption(
        GPU_KERNELS_OPTION,
        default=None,
        metavar="FILE",
        help="write the kernels the collected tests' modules list in GPU_KERNELS as a tuner shapes file",
    )
    parser.addoption(
        RECORD_CPU_KERNELS_OPTION,
        default=None,
        metavar="FILE",
        help="write the C-target kernels this session compiles, in order, as the build pool's list "
        "(tests/cpu_kernels.json)",
    )


def gpu_kernel_shapes(modules: list[object]) -> dict[str, list[dict[str, object]]]:
    """A tuner shapes file (``dsa-autotune --shapes``) of every static parameter set the ``GPU_KERNELS`` of
    ``modules`` list, each once, with one nominal size point (the compile stage only compiles)."""
    from autotune.lookup import space

    shapes: dict[str, list[dict[str, object]]] = {}
    seen: set[tuple[str, str]] = set()
    for module in modules:
        for kernel, statics in getattr(module, "GPU_KERNELS", {}).items():
            for static in statics:
                key = (kernel, json.dumps(static, sort_keys=True))
                if key in seen:
                    continue
                seen.add(key)
                sizes = {name: 1 for name in space.size_names(kernel)}
                shapes.setdefault(kernel, []).append({"static": dict(static), "sizes": [sizes]})
    return shapes


def pytest_collection_finish(session: pytest.Session) -> None:
    target = session.config.getoption(GPU_KERNELS_OPTION)
    if not target:
        if not session.config.option.collectonly:
            # The C-target list is read (and TileLang imported) only for a pool that will build it.
            cpu = _session_cpu_jobs(session.items) if build_pool.enabled() else []
            pool = build_pool.start(cpu + _session_build_jobs(session.items),
                                    Path(tempfile.mkdtemp(prefix="dsa-build-pool-")))  # fmt: skip
            recording = session.config.getoption(RECORD_CPU_KERNELS_OPTION) is not None
            if recording or (pool is not None and cpu):
                build_pool.install_cpu_hook(_record_cpu_kernel if recording else None)
        return
    modules = list({id(item.module): item.module for item in session.items if hasattr(item, "module")}.values())
    Path(target).write_text(json.dumps(gpu_kernel_shapes(modules), indent=1) + "\n", encoding="utf-8")


def cuda_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="GPU tier: no CUDA device on this machine")
    not_hopper = pytest.mark.skip(reason="GPU tier: needs a Hopper GPU (compute capability 9.0)")
    no_kernels = pytest.mark.skip(reason="GPU tier: no kernels are built for this GPU's architecture")
    no_nvcc = pytest.mark.skip(reason="build tier: nvcc is not on PATH")
    no_network = pytest.mark.skip(reason=f"downloads packages: run with {NETWORK_OPTION}")
    has_cuda = cuda_available()
    hopper = has_cuda and hardware.is_hopper(torch.device("cuda"))  # the one Hopper rule, shared with dispatch
    has_kernels = has_cuda and hardware.has_kernels(torch.device("cuda"))
    has_nvcc = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    network = config.getoption(NETWORK_OPTION)
    for item in items:
        if "gpu" in item.keywords:
            if not has_cuda:
                item.add_marker(no_gpu)
            elif "portable" in item.keywords:
                if not has_kernels:
                    item.add_marker(no_kernels)
            elif not hopper:
                item.add_marker(not_hopper)
        if "build" in item.keywords and not has_nvcc:
            item.add_marker(no_nvcc)
        if "network" in item.keywords and not network:
            item.add_marker(no_network)
    if has_nvcc and build_pool.enabled():
        # The build tier last: the session's build pool compiles its kernels in the background meanwhile.
        items[:] = [i for i in items if "build" not in i.keywords] + [i for i in items if "build" in i.keywords]


def _session_cpu_jobs(items: list[pytest.Item]) -> list[object]:
    """The recorded C-target kernels (``tests/cpu_kernels.json``) that the selected, runnable tests compile first,
    in the order they will ask for them, at this session's g++ flags."""
    from tl_kernels import build as tl_build  # imports TileLang's parts only when a session starts

    flags = env.cpu_compile_flags()
    flags = tl_build.DEFAULT_CPU_COMPILE_FLAGS if flags is None else flags
    runnable = [item.nodeid for item in items if item.get_closest_marker("skip") is None]
    return list(build_pool.cpu_jobs(build_pool.read_cpu_kernels(), runnable, flags))


def _record_cpu_kernel(job: build_pool.CpuJob) -> None:
    _RECORDED.append((_CURRENT_TEST[0], job))


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _CURRENT_TEST[0] = nodeid


def _session_build_jobs(items: list[pytest.Item]) -> list[object]:
    """Every build that the selected, runnable build-tier tests' fixtures declare: sm_90a builds through
    ``support.prebuilt_fixture`` (the fixture's ``dsa_builds``), tuner compile jobs through a fixture's
    ``dsa_compile_jobs``. Only fixtures a build test uses count (a module's GPU-tier builds stay out)."""
    jobs: list[object] = []
    seen: set[tuple[int, str]] = set()
    for item in items:
        if "build" not in item.keywords or item.get_closest_marker("skip") is not None or not hasattr(item, "module"):
            continue
        for name in getattr(item, "fixturenames", ()):
            fixture = vars(item.module).get(name)  # a fixture defined in the test's module, or None
            if fixture is None or (id(item.module), name) in seen:
                continue
            seen.add((id(item.module), name))
            builds = getattr(fixture, "dsa_builds", None)
            if callable(builds):
                jobs += [build_pool.HopperJob.of(builder, params) for builder, params in builds()]
            compile_jobs = getattr(fixture, "dsa_compile_jobs", None)
            if callable(compile_jobs):
                jobs += list(compile_jobs())
    return jobs


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    record = session.config.getoption(RECORD_CPU_KERNELS_OPTION)
    if record is not None:
        build_pool.write_cpu_kernels(Path(record), _RECORDED)
    build_pool.uninstall_cpu_hook()
    pool = build_pool.active()
    _POOL_SUMMARY[:] = [line for line in [build_pool.summary()] if line]
    build_pool.stop()
    if pool is not None:
        shutil.rmtree(pool.folder, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The build pool's line (how long it ran and how long the tests waited for it): what CI time is made of."""
    for line in _POOL_SUMMARY:
        terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _poisoned_launcher_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every output a launcher allocates starts as NaN (integers: ``dsa.testing.INT_POISON``)."""
    from dsa.launch import common

    monkeypatch.setattr(common, "new_output", testing.poisoned_empty)


@pytest.fixture()
def fake_kernel() -> Iterator[types.ModuleType]:
    """The tuner's fake kernel (``tests.fake_kernel``), registered as module ``fake_dsa_kernel`` and kernel ``fake``
    with the preset ``fake-preset`` for the duration of a test."""
    from tests import fake_kernel as fake

    with fake.registered() as module:
        yield module


@pytest.fixture()
def cache_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """A fresh user cache folder and a fresh shipped-configs folder; the in-process config cache forgotten."""
    from autotune.lookup import cache

    user, shipped = tmp_path / "user", tmp_path / "shipped"
    monkeypatch.setenv("DSA_CACHE_DIR", str(user))
    monkeypatch.setattr(cache, "SHIPPED_DIR", shipped)
    cache.clear_memory_cache()
    yield user, shipped
    cache.clear_memory_cache()


@pytest.fixture
def cuda_device() -> torch.device:
    """The CUDA device for ``gpu``-marked tests."""
    return torch.device("cuda")


@pytest.fixture
def portable_cuda_device(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """The CUDA device for ``gpu``- and ``portable``-marked tests, with ``DSA_PORTABLE=1``: the launchers build the
    portable schedule for it (sm_90 on Hopper; every other GPU's own architecture, which is portable anyway)."""
    monkeypatch.setenv("DSA_PORTABLE", "1")
    device = torch.device("cuda")
    target = hardware.device_target(device)
    assert target is not None and target["arch"] != hardware.HOPPER_ARCH, target
    return device


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One PyTorch thread for a module of tiny-tensor tests: on a shared 2-core machine a second thread only
    contends (the model tests ran ~30x slower with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
