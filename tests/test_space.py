"""Search spaces and presets (``autotune.lookup.space``): the fake kernel's spaces, presets, shapes files, and every
real kernel's presets and spaces; the FLOP counts (``benchmarks.flops``)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from autotune.lookup import space
from benchmarks import flops
from tests import fake_kernel as fake


def test_causal_pairs_matches_brute_force() -> None:
    for s, s_kv in [(1, 1), (4, 4), (3, 7), (7, 3), (16, 16), (9, 20), (300, 100), (100, 300)]:
        brute = sum(1 for t in range(s) for k in range(s_kv) if k <= t + s_kv - s)
        assert flops.causal_pairs(s, s_kv) == brute, (s, s_kv)


def test_kernel_names_are_module_and_launcher_names() -> None:
    """One name per kernel: its builder module, its launcher's KERNEL_NAME, the tuner's and the benchmark's name."""
    import importlib

    from benchmarks import cases

    for name in space.KERNEL_NAMES:
        assert space.spec(name).module == f"tl_kernels.{name}"
        assert importlib.import_module(f"dsa.launch.{name}").KERNEL_NAME == name
    assert set(space.KERNEL_NAMES) <= set(cases.KERNELS)


def test_fake_space(fake_kernel: types.ModuleType) -> None:
    full = space.candidates(fake.KERNEL, fake.STATIC, full=True)
    pruned = space.candidates(fake.KERNEL, fake.STATIC)
    default = {"block": 64, "stages": 2}
    assert full[0] == default and pruned[0] == default
    # Every candidate satisfies the constraint; the full space is exactly the valid product.
    expected = {(b, s) for b in fake.SPACE["block"] for s in fake.SPACE["stages"] if b * s <= fake.STATIC["limit"]}
    assert {(c["block"], c["stages"]) for c in full} == expected
    assert len(full) == len(expected)
    assert all(c in full for c in pruned)
    assert len(pruned) == 1 + space.PRUNED_NEIGHBOURS
    # One field changed per neighbour, round-robin over fields: block first, then stages.
    assert pruned[1:] == [{"block": 32, "stages": 2}, {"block": 64, "stages": 1}, {"block": 128, "stages": 2}]
    assert all(sum(c[k] != default[k] for k in c) == 1 for c in pruned[1:])
    # A tight limit removes the invalid ones.
    tight = {"width": 8, "limit": 64}
    assert all(c["block"] * c["stages"] <= 64 for c in space.candidates(fake.KERNEL, tight, full=True)[1:])
    space.check_static(fake.KERNEL, fake.STATIC)
    with pytest.raises(ValueError, match="takes no parameter"):
        space.check_static(fake.KERNEL, {**fake.STATIC, "bogus": 1})
    with pytest.raises(ValueError, match="are config fields"):
        space.check_static(fake.KERNEL, {**fake.STATIC, "block": 1})
    with pytest.raises(ValueError, match="> limit"):
        space.make_config(fake.KERNEL, fake.STATIC, {"block": 128, "stages": 3})
    assert space.make_config(fake.KERNEL, fake.STATIC, default) == fake.FakeConfig()


def test_pruned_space_includes_valid_presets(fake_kernel: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module's TUNING_PRESETS (schedules differing in several fields) join the pruned space when valid."""
    monkeypatch.setattr(fake_kernel, "TUNING_PRESETS", ({"block": 128, "stages": 1}, {"block": 128, "stages": 3}), raising=False)
    pruned = space.candidates(fake.KERNEL, fake.STATIC)
    assert pruned[0] == {"block": 64, "stages": 2}
    assert pruned[1] == {"block": 128, "stages": 1}
    assert {"block": 128, "stages": 3} not in pruned  # over the fake kernel's limit
    fwd = space.candidates("sparse_mla_fwd", {"heads": 128, "d_qk": 576, "d_v": 512, "has_topk_length": False, "has_sink": False})
    assert any(c["pipeline"] == "ws" for c in fwd)


def test_shapes_file(tmp_path: Path, fake_kernel: types.ModuleType) -> None:
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({fake.KERNEL: [{"static": fake.STATIC, "sizes": list(fake.SIZES)}]}))
    (case,) = space.preset_cases(shapes, (fake.KERNEL,))
    assert case.static == fake.STATIC and case.sizes == fake.SIZES and case.check_sizes == fake.SIZES[0]
    shapes.write_text(json.dumps({fake.KERNEL: [{"static": fake.STATIC, "sizes": [{"seq_len": 4}]}]}))
    with pytest.raises(ValueError, match="size points need exactly the keys"):
        space.preset_cases(shapes, (fake.KERNEL,))
    shapes.write_text(json.dumps({"nonsense": []}))
    with pytest.raises(ValueError, match="unknown kernel 'nonsense'"):
        space.preset_cases(shapes)


@pytest.mark.parametrize("preset", space.PRESETS)
def test_real_kernel_presets_and_spaces(preset: str) -> None:
    """Every kernel's module imports (a failure is a failure, not a skip) and its presets and spaces are valid."""
    kernels = space.KERNEL_NAMES
    cases = space.preset_cases(preset, kernels)
    assert {c.kernel for c in cases} == set(kernels)
    for case in cases:
        space.check_static(case.kernel, case.static)
        names = set(space.size_names(case.kernel))
        assert all(set(s) == names for s in case.sizes) and set(case.check_sizes) == names
        default = space.default_config(case.kernel, case.static)
        pruned = space.candidates(case.kernel, case.static)
        full = space.candidates(case.kernel, case.static, full=True)
        assert pruned[0] == default and full[0] == default
        assert len(pruned) <= 1 + space.PRUNED_NEIGHBOURS
        for config in full:  # every candidate is a valid sm_90a config with exactly the Config fields
            space.make_config(case.kernel, case.static, config)
        assert all(c in full for c in pruned)
