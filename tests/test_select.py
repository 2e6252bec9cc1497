"""Config selection for the launchers (``autotune.lookup.select``): a checked ``Config`` from the cache, or ``None``."""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from autotune.lookup import cache, select, sku, space
from tests import fake_kernel as fake

CUDA = torch.device("cuda", 0)


def _select_warnings(caplog: pytest.LogCaptureFixture) -> int:
    return len([r for r in caplog.records if r.name == "autotune.lookup.select"])


def test_config_for_returns_the_checked_config_or_none(
    fake_kernel: types.ModuleType,
    cache_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user, _ = cache_dirs
    static, sizes = dict(fake.STATIC), {"batch": 1, "seq_len": 4096, "seq_len_kv": 4096}
    kwargs = {"target": space.HOPPER_TARGET, "cache_dir": user}
    cache.store(fake.KERNEL, static, sizes, {"block": 32, "stages": 1}, sku="h20", cache_dir=user)
    assert select.config_for(fake.KERNEL, static, sizes, torch.device("cpu"), **kwargs) is None  # CPU: never tuned
    monkeypatch.setattr(sku, "current_sku", lambda device=None: "h20")
    monkeypatch.setattr(select, "_reported", set())
    monkeypatch.setattr(select, "_checked", {})
    tuned = select.config_for(fake.KERNEL, static, sizes, CUDA, **kwargs)
    assert tuned == fake.FakeConfig(block=32, stages=1) and isinstance(tuned, fake.FakeConfig)
    assert select.config_for(fake.KERNEL, {**static, "limit": 8}, sizes, CUDA, **kwargs) is None
    # A stale entry (a field the module no longer has, or a combination check_config now rejects) is not returned.
    with caplog.at_level(logging.WARNING):
        cache.store(fake.KERNEL, static, sizes, {"block": 32, "stages": 1, "gone": 3}, sku="h20", cache_dir=user)
        assert select.config_for(fake.KERNEL, static, sizes, CUDA, **kwargs) is None
        cache.store(fake.KERNEL, static, sizes, {"block": 128, "stages": 3}, sku="h20", cache_dir=user)
        assert select.config_for(fake.KERNEL, static, sizes, CUDA, **kwargs) is None
    assert _select_warnings(caplog) == 2
    caplog.clear()

    def broken(device: Any = None) -> str:
        raise RuntimeError("no driver")

    monkeypatch.setattr(sku, "current_sku", broken)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert select.config_for(fake.KERNEL, static, sizes, CUDA, **kwargs) is None
    assert _select_warnings(caplog) == 1, "a failing lookup is reported once"


def test_launcher_uses_the_tuned_config_without_checking_it_again(
    fake_kernel: types.ModuleType, cache_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dsa.launch.common.select_config`` takes select's checked config as it is (the module's check_config runs
    once per config, not per launch), and falls back to the default without a tuned one."""
    from dsa import hardware
    from dsa.launch import common

    user, _ = cache_dirs
    static, sizes = dict(fake.STATIC), {"batch": 1, "seq_len": 64, "seq_len_kv": 64}
    monkeypatch.setattr(sku, "current_sku", lambda device=None: "h200")
    monkeypatch.setattr(hardware, "cuda_capability", lambda device: hardware.HOPPER_CAPABILITY)
    monkeypatch.setattr(select, "_checked", {})
    checks: list[Any] = []
    original = fake_kernel.check_config
    monkeypatch.setattr(fake_kernel, "check_config", lambda s, c: (checks.append(c), original(s, c)))
    assert common.select_config(fake.KERNEL, fake_kernel, static, sizes, CUDA) == fake.FakeConfig()
    cache.store(fake.KERNEL, static, sizes, {"block": 128, "stages": 1}, sku="h200", cache_dir=user)
    for _ in range(3):
        assert common.select_config(fake.KERNEL, fake_kernel, static, sizes, CUDA) == fake.FakeConfig(128, 1)
    assert checks == [fake.FakeConfig(128, 1)]
