"""Arch-exact dispatch (``dsa.hardware``): which backend a CUDA device gets and which architecture the kernels are
built for, on faked compute capabilities (this machine has no GPU; ``torch.cuda.get_device_capability`` is replaced).

The promise under test: ``target_for_capability`` is the one place that maps a capability to a target, sm_90a only
for 9.0, and every launch on any other GPU is built for that GPU's own architecture with a config that fits it.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import torch

from dsa import hardware
from dsa.launch import common
from tl_kernels import dsl
from tl_kernels import indexer as indexer_kernels
from tl_kernels import sparse_mla_bwd as bwd_kernels
from tl_kernels import sparse_mla_fwd as fwd_kernels
from tl_kernels import topk as topk_kernels

CUDA0 = torch.device("cuda", 0)
ROOT = Path(__file__).resolve().parent.parent

# (capability, the architecture the kernels are built for; None: no kernels, the reference runs)
TARGETS = [
    ((7, 5), None),
    ((8, 0), "sm_80"),
    ((8, 6), "sm_86"),
    ((8, 7), "sm_86"),
    ((8, 9), "sm_89"),
    ((9, 0), "sm_90a"),
    ((10, 0), "sm_100a"),
    ((10, 3), "sm_103a"),
    ((11, 0), None),
    ((12, 0), "sm_120"),
    ((12, 1), "sm_120"),
]
NOT_HOPPER = [(cap, arch) for cap, arch in TARGETS if arch not in (None, "sm_90a")]

# One static parameter set per kernel at V3.2 widths (what a DeepSeek-V3.2 layer launches).
V32_STATICS = {
    "indexer": (indexer_kernels, {"heads": 64, "dim": 128, "dtype": "float8_e4m3fn", "mode": "causal"}),
    "topk": (topk_kernels, {"k": 2048}),
    "sparse_mla_fwd": (fwd_kernels, {"heads": 128, "d_qk": 576, "d_v": 512, "has_topk_length": True, "has_sink": True}),
    "sparse_mla_bwd": (
        bwd_kernels,
        {"heads": 128, "d_qk": 576, "d_v": 512, "topk": 2048, "has_topk_length": True, "has_sink": True},
    ),
}


@pytest.fixture(autouse=True)
def _fresh_hardware_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSA_BACKEND", raising=False)
    monkeypatch.delenv("DSA_PORTABLE", raising=False)
    hardware.reset_caches()
    yield
    hardware.reset_caches()


def _fake_capability(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)


@pytest.mark.parametrize(("capability", "arch"), TARGETS)
def test_target_for_capability(capability: tuple[int, int], arch: str | None) -> None:
    target = hardware.target_for_capability(capability)
    assert (None if target is None else target["arch"]) == arch
    if target is not None:
        assert target == dsl.cuda_target(arch)
        assert dsl.is_hopper(target) == (capability == hardware.HOPPER_CAPABILITY)
    # The portable schedule on Hopper is plain sm_90; nothing else changes.
    portable = hardware.target_for_capability(capability, portable=True)
    expected = "sm_90" if arch == "sm_90a" else arch
    assert (None if portable is None else portable["arch"]) == expected


def test_every_dispatched_architecture_has_kernels() -> None:
    """Every architecture dispatch names is one the kernel modules know (limits, MMA), and only 9.0 is Hopper."""
    for capability, arch in hardware.ARCH_BY_CAPABILITY.items():
        assert arch in dsl.ARCHS, arch
        assert dsl.ARCHS[arch].hopper == (capability == hardware.HOPPER_CAPABILITY)


@pytest.mark.parametrize(("capability", "arch"), TARGETS)
def test_cuda_dispatch_by_capability(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], arch: str) -> None:
    _fake_capability(monkeypatch, capability)
    expected = "reference" if arch is None else "tilelang"
    assert hardware.select_backend(CUDA0, True) == expected
    assert hardware.select_backend(CUDA0, False) == "reference"


@pytest.mark.parametrize(("capability", "arch"), NOT_HOPPER)
def test_launch_target_off_hopper_is_the_devices_own_architecture(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], arch: str
) -> None:
    """On a 10.0, 12.0, 8.9 (...) device the launchers build for that architecture, never sm_90a, and every kernel's
    default config there fits its shared memory and schedule (no wgmma pipeline, head blocks of mma.sync rows)."""
    _fake_capability(monkeypatch, capability)
    target = common.target_for(CUDA0)
    assert target["arch"] == arch != "sm_90a"
    for name, (kernels, static) in V32_STATICS.items():
        config = kernels.default_config({**static, "target": target})
        kernels.check_config({**static, "target": target}, config)
        if name == "sparse_mla_fwd":
            assert config.pipeline == fwd_kernels.PIPELINE_NONE


def test_dsa_portable_builds_the_portable_schedule_on_hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_capability(monkeypatch, (9, 0))
    assert common.target_for(CUDA0) == dsl.HOPPER_TARGET
    monkeypatch.setenv("DSA_PORTABLE", "1")
    assert common.target_for(CUDA0) == dsl.cuda_target("sm_90")
    monkeypatch.setenv("DSA_PORTABLE", "maybe")
    with pytest.raises(ValueError, match="DSA_PORTABLE"):
        common.target_for(CUDA0)


def test_launch_target_without_kernels_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_capability(monkeypatch, (7, 5))
    with pytest.raises(RuntimeError, match=r"compute capability 7\.5"):
        common.target_for(CUDA0)


def test_launchers_ask_target_for_and_name_no_architecture() -> None:
    """Every launcher gets its CUDA target from ``common.target_for`` (hence ``target_for_capability``): no launcher
    module names a target or an architecture itself."""
    for path in sorted((ROOT / "dsa" / "launch").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        assert not names & {"HOPPER_TARGET", "cuda_target", "ARCHS"}, path.name
        strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        assert not [s for s in strings if s.startswith("sm_")], path.name


def test_no_kernels_warns_once_per_device(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    queried: list[int | None] = []

    def capability(index: int | None = None) -> tuple[int, int]:
        queried.append(index)
        return (7, 5)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    with caplog.at_level(logging.WARNING, logger="dsa.hardware"):
        for _ in range(3):
            assert hardware.select_backend(CUDA0, True) == "reference"
        hardware.select_backend(torch.device("cuda", 1), True)
    warnings = [r for r in caplog.records if r.name == "dsa.hardware" and r.levelno == logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]
    assert "7.5" in warnings[0].getMessage() and "8.0" in warnings[0].getMessage()  # names what is supported
    assert queried == [0, 1], "the capability is queried once per device"


def test_forced_tilelang_without_kernels_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_capability(monkeypatch, (7, 5))
    monkeypatch.setenv("DSA_BACKEND", "tilelang")
    with pytest.raises(RuntimeError, match=r"7\.5.*no TileLang kernels"):
        hardware.select_backend(CUDA0, True)
    monkeypatch.setenv("DSA_BACKEND", "reference")
    assert hardware.select_backend(CUDA0, True) == "reference"
