"""Tests of the autotune package (CPU only, plus one sm_90a compile-only run of the script: marker ``build``).

Most tests use a fake kernel module (``fake_dsa_kernel``, registered in ``sys.modules`` and in
:mod:`autotune.space`) that follows the kernel module convention, with a fake compile function, so the tuner's logic
is exercised without nvcc. The real kernel modules are checked for their presets and search spaces, and the
``build`` test runs ``scripts/autotune.py`` compile-only on the ``tiny`` preset with nvcc. The GPU phase's worker
process is exercised on the CPU with fake runners whose candidates segfault or hang it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from autotune import cache, cli, gpu, select, sku, space, tuner

REPO = Path(__file__).resolve().parents[1]
FAKE = "fake_dsa_kernel"
FAKE_PRESET = "fake-preset"
GIB = 1 << 30


# ----------------------------------------------------------------------------------------------------------------------
# A fake kernel module following the convention (build, Config, TUNING_SPACE, check_config, default_config)
# ----------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FakeConfig:
    block: int = 64
    stages: int = 2


FAKE_SPACE: dict[str, tuple[Any, ...]] = {"block": (32, 64, 128), "stages": (1, 2, 3)}


def fake_check_config(static: dict[str, Any], config: FakeConfig) -> None:
    # "shared memory": block * stages must fit the static limit.
    if config.block * config.stages > static["limit"]:
        raise ValueError(f"block * stages = {config.block * config.stages} > limit {static['limit']}")


def fake_default_config(static: dict[str, Any]) -> FakeConfig:
    return FakeConfig()


def fake_build(*, width: int, limit: int, block: int, stages: int, target: Any = None) -> tuple[Any, ...]:
    return ("prim_func", width, limit, block, stages)


@dataclasses.dataclass
class FakeReport:
    registers: int
    spill_bytes: int
    smem_bytes: int
    has_wgmma: bool
    ptxas_log: str = ""

    def problems(self) -> list[str]:
        return [f"{self.spill_bytes} B of register spills"] if self.spill_bytes else []


def fake_compile(builder: Any, **params: Any) -> tuple[Any, FakeReport]:
    """Compile failures, spills and clean builds, decided by the config."""
    if params["block"] == 32 and params["stages"] == 3:
        raise RuntimeError("nvcc: fake compile error")
    prim = builder(**params, target=space.HOPPER_TARGET)
    spills = 64 if (params["block"] == 128 and params["stages"] >= 2) else 0
    block = params["block"]
    report = FakeReport(registers=block, spill_bytes=spills, smem_bytes=block * 1024, has_wgmma=True)
    return prim, report


def _fake_flops(static: dict[str, Any], sizes: dict[str, int]) -> float:
    return 2.0 * static["width"] * sizes["seq_len"] * sizes["seq_len_kv"] * sizes["batch"]


FAKE_STATIC = {"width": 8, "limit": 256}
FAKE_SIZES = ({"batch": 1, "seq_len": 64, "seq_len_kv": 64}, {"batch": 1, "seq_len": 256, "seq_len_kv": 256})
FAKE_CHECK = {"batch": 1, "seq_len": 16, "seq_len_kv": 16}


@pytest.fixture()
def fake_kernel():
    """Register ``fake_dsa_kernel`` as a module and as kernel ``fake`` with the preset ``fake-preset``."""
    module = types.ModuleType(FAKE)
    module.Config = FakeConfig
    module.TUNING_SPACE = FAKE_SPACE
    module.check_config = fake_check_config
    module.default_config = fake_default_config
    module.build = fake_build
    module.compile = fake_compile
    sys.modules[FAKE] = module
    spec = space.KernelSpec("fake", FAKE, _fake_flops, compile_fn=f"{FAKE}:compile")
    space.register_kernel(spec, {FAKE_PRESET: [space.Case("fake", dict(FAKE_STATIC), FAKE_SIZES, FAKE_CHECK)]})
    yield module
    space.unregister_kernel("fake")
    sys.modules.pop(FAKE, None)


@pytest.fixture()
def cache_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A fresh user cache (``DSA_CACHE_DIR``) and a fresh shipped-configs folder; the in-process cache forgotten."""
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    monkeypatch.setenv("DSA_CACHE_DIR", str(user))
    monkeypatch.setattr(cache, "SHIPPED_DIR", shipped)
    cache.clear_memory_cache()
    yield user, shipped
    cache.clear_memory_cache()


# ----------------------------------------------------------------------------------------------------------------------
# SKU
# ----------------------------------------------------------------------------------------------------------------------
SKU_CASES = [
    (sku.DeviceProps("NVIDIA H100 80GB HBM3", 9, 0, 132, 79 * GIB), "h100-sxm"),
    (sku.DeviceProps("NVIDIA H100 SXM5 80GB", 9, 0, 132, 80 * GIB), "h100-sxm"),
    (sku.DeviceProps("NVIDIA H100 PCIe", 9, 0, 114, 80 * GIB), "h100-pcie"),
    (sku.DeviceProps("NVIDIA H800", 9, 0, 132, 80 * GIB), "h800"),
    (sku.DeviceProps("NVIDIA H200", 9, 0, 132, 140 * GIB), "h200"),
    (sku.DeviceProps("NVIDIA H20", 9, 0, 78, 95 * GIB), "h20"),
    (sku.DeviceProps("NVIDIA GH200 480GB", 9, 0, 132, 95 * GIB), "gh200"),
    # Not in the table: fall back to sm<cc>-<sanitised name>.
    (sku.DeviceProps("NVIDIA Foo", 9, 0, 100, 80 * GIB), "sm90-nvidia-foo"),
    (sku.DeviceProps("NVIDIA H100 NVL", 9, 0, 132, 94 * GIB), "sm90-nvidia-h100-nvl"),
    (sku.DeviceProps("NVIDIA H200 NVL", 9, 0, 132, 140 * GIB), "sm90-nvidia-h200-nvl"),
    # A MIG slice of an H100 has the name stem but fewer SMs and less memory: never the full card's configs.
    (
        sku.DeviceProps("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 9, 0, 16, 10 * GIB),
        "sm90-nvidia-h100-80gb-hbm3-mig-1g-10gb",
    ),
    (sku.DeviceProps("NVIDIA A100-SXM4-80GB", 8, 0, 108, 80 * GIB), "sm80-nvidia-a100-sxm4-80gb"),
    (sku.DeviceProps("NVIDIA B200", 10, 0, 148, 180 * GIB), "sm100-nvidia-b200"),
    (sku.DeviceProps("NVIDIA GeForce RTX 4090", 8, 9, 128, 24 * GIB), "sm89-nvidia-geforce-rtx-4090"),
]


@pytest.mark.parametrize(("props", "expected"), SKU_CASES, ids=[c[1] + ":" + c[0].name for c in SKU_CASES])
def test_sku_table(props: sku.DeviceProps, expected: str) -> None:
    assert sku.sku_from_props(props) == expected
    assert sku.is_valid_sku(expected)


def test_sku_rules_are_mutually_exclusive() -> None:
    for props, expected in SKU_CASES:
        matching = [rule.sku for rule in sku.SKU_TABLE if rule.matches(props)]
        assert matching == ([expected] if expected in sku.KNOWN_SKUS else []), props


def test_arch_for_sku() -> None:
    for known in sku.KNOWN_SKUS:
        assert sku.arch_for_sku(known) == "sm_90a"
    assert sku.arch_for_sku("sm90-nvidia-foo") == "sm_90a"
    assert sku.arch_for_sku("sm80-nvidia-a100") == "sm_80"
    assert sku.arch_for_sku("sm100-nvidia-b200") == "sm_100a"
    with pytest.raises(ValueError):
        sku.arch_for_sku("not-a-sku")
    assert not sku.is_valid_sku("../etc")
    assert not sku.is_valid_sku("H100")


def test_current_sku_is_cached_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_props(index: int) -> sku.DeviceProps:
        calls.append(index)
        return SKU_CASES[0][0] if index == 0 else SKU_CASES[4][0]

    monkeypatch.setattr(sku, "props_of", fake_props)
    monkeypatch.setattr(sku, "_cache", {})
    for _ in range(3):
        assert sku.current_sku(torch.device("cuda", 0)) == "h100-sxm"
        assert sku.current_sku(1) == "h200"
    assert calls == [0, 1]
    with pytest.raises(ValueError):
        sku.current_sku(torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------------------
def test_buckets_and_canonical_keys() -> None:
    sizes = (0, 1, 2, 3, 4, 5, 4096, 4097, 65536)
    assert [cache.bucket_size(n) for n in sizes] == [1, 1, 2, 4, 4, 8, 4096, 8192, 65536]
    with pytest.raises(ValueError):
        cache.bucket_size(-1)
    a = cache.entry_key("k", {"heads": 64, "dtype": "bfloat16"}, {"seq_len": 3000, "batch": 1})
    b = cache.entry_key("k", {"dtype": "bfloat16", "heads": 64}, {"batch": 1, "seq_len": 4096})
    assert a == b  # order-independent and bucketed
    assert cache.entry_key("k", {"flag": True}, {}) != cache.entry_key("k", {"flag": 1}, {})
    with pytest.raises(TypeError):
        cache.canonical({"dtype": torch.bfloat16})  # str() of objects never becomes a key


def test_cache_round_trip(cache_dirs: tuple[Path, Path]) -> None:
    user, _ = cache_dirs
    static = {"heads": 128, "d_qk": 576}
    config = {"block_h": 64, "num_stages": 2}
    assert cache.lookup("sparse_mla_fwd", static, {"seq_len": 4096}, sku="h100-sxm") is None
    path = cache.store("sparse_mla_fwd", static, {"seq_len": 3000}, config, sku="h100-sxm", metrics={"latency_ms": 1.5})
    assert path == user / "h100-sxm" / "sparse_mla_fwd.json"
    assert cache.lookup("sparse_mla_fwd", static, {"seq_len": 4096}, sku="h100-sxm") == config
    assert cache.lookup("sparse_mla_fwd", static, {"seq_len": 4096}, sku="h200") is None  # per SKU
    assert cache.lookup("sparse_mla_fwd", {**static, "heads": 64}, {"seq_len": 4096}, sku="h100-sxm") is None
    # The returned dict is a copy: mutating it does not change the cache.
    got = cache.lookup("sparse_mla_fwd", static, {"seq_len": 4096}, sku="h100-sxm")
    got["block_h"] = -1
    assert cache.lookup("sparse_mla_fwd", static, {"seq_len": 4096}, sku="h100-sxm") == config
    doc = json.loads(path.read_text())
    meta = doc["metadata"]
    assert {"package", "tilelang", "torch", "cuda", "sku", "kernel", "date"} <= set(meta)
    assert meta["sku"] == "h100-sxm" and meta["kernel"] == "sparse_mla_fwd"
    assert meta["tilelang"] == cache.versions()["tilelang"] is not None
    (entry,) = doc["entries"].values()
    assert entry["bucket"] == {"seq_len": 4096} and entry["sizes"] == {"seq_len": 3000}
    assert entry["metrics"] == {"latency_ms": 1.5}
    # A new process (simulated by forgetting the in-memory copy) reads the same answer from disk.
    cache.clear_memory_cache()
    assert cache.lookup("sparse_mla_fwd", static, {"seq_len": 4096}, sku="h100-sxm") == config
    assert not list(path.parent.glob("*.tmp")), "temporary files left behind"


def test_store_invalidates_and_keeps_other_entries(cache_dirs: tuple[Path, Path]) -> None:
    static = {"heads": 64}
    cache.store("index_scores", static, {"seq_len": 4096}, {"tile": 1}, sku="h20")
    assert cache.lookup("index_scores", static, {"seq_len": 4096}, sku="h20") == {"tile": 1}
    cache.store("index_scores", static, {"seq_len": 8192}, {"tile": 2}, sku="h20")
    cache.store("index_scores", static, {"seq_len": 4096}, {"tile": 3}, sku="h20")  # overwrite, seen at once
    assert cache.lookup("index_scores", static, {"seq_len": 4096}, sku="h20") == {"tile": 3}
    assert cache.lookup("index_scores", static, {"seq_len": 8192}, sku="h20") == {"tile": 2}


def test_lookup_order_exact_nearest_shipped(cache_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    user, shipped = cache_dirs
    kernel, static, other = "sparse_mla_bwd", {"heads": 128}, {"heads": 16}
    sizes = lambda n: {"batch": 1, "seq_len": n, "seq_len_kv": n}  # noqa: E731
    # Shipped defaults: written with store() into the shipped folder's layout.
    monkeypatch.setenv("DSA_CACHE_DIR", str(shipped))
    cache.store(kernel, static, sizes(4096), {"src": "shipped-4k"}, sku="h800")
    cache.store(kernel, other, sizes(4096), {"src": "shipped-other"}, sku="h800")
    monkeypatch.setenv("DSA_CACHE_DIR", str(user))
    cache.clear_memory_cache()
    # Only shipped: its exact and nearest buckets are used.
    assert cache.lookup(kernel, static, sizes(4096), sku="h800") == {"src": "shipped-4k"}
    assert cache.lookup(kernel, static, sizes(65536), sku="h800") == {"src": "shipped-4k"}
    # The user's file wins for the static parameters it has, exact first, then the nearest bucket.
    cache.store(kernel, static, sizes(8192), {"src": "user-8k"}, sku="h800")
    cache.store(kernel, static, sizes(65536), {"src": "user-64k"}, sku="h800")
    assert cache.lookup(kernel, static, sizes(8192), sku="h800") == {"src": "user-8k"}
    assert cache.lookup(kernel, static, sizes(4096), sku="h800") == {"src": "user-8k"}  # nearest user beats shipped
    assert cache.lookup(kernel, static, sizes(40000), sku="h800") == {"src": "user-64k"}
    assert cache.lookup(kernel, static, sizes(16384), sku="h800") == {"src": "user-8k"}  # log2 distance 1 vs 2
    assert cache.lookup(kernel, static, sizes(2**14 * 3), sku="h800") == {"src": "user-64k"}  # 64K: exact bucket
    # Equidistant buckets (2K and 8K are both one step from 4K): the larger one wins.
    cache.store(kernel, static, sizes(2048), {"src": "user-2k"}, sku="h800")
    assert cache.lookup(kernel, static, sizes(4096), sku="h800") == {"src": "user-8k"}  # tie 2K/8K -> larger
    # Other static parameters fall through to the shipped file; unknown ones to None.
    assert cache.lookup(kernel, other, sizes(4096), sku="h800") == {"src": "shipped-other"}
    assert cache.lookup(kernel, {"heads": 1}, sizes(4096), sku="h800") is None
    # A bucket with other size names never matches by distance.
    assert cache.lookup(kernel, static, {"seq_len": 4096}, sku="h800") is None


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "autotune.cache"]


def test_corrupt_file_reported_once_and_ignored(
    cache_dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, shipped = cache_dirs
    monkeypatch.setenv("DSA_CACHE_DIR", str(shipped))
    cache.store("topk_indices", {"topk": 2048}, {"seq_len": 4096}, {"src": "shipped"}, sku="h100-sxm")
    monkeypatch.setenv("DSA_CACHE_DIR", str(user))
    cache.clear_memory_cache()
    path = cache.user_path("topk_indices", sku="h100-sxm")
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "metadata": {"tilelang": ')  # truncated
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert cache.lookup("topk_indices", {"topk": 2048}, {"seq_len": 4096}, sku="h100-sxm") == {"src": "shipped"}
    assert len(_warnings(caplog)) == 1 and "not valid JSON" in _warnings(caplog)[0]
    # Storing over a corrupt file replaces it (never fatal).
    cache.store("topk_indices", {"topk": 2048}, {"seq_len": 4096}, {"src": "user"}, sku="h100-sxm")
    assert cache.lookup("topk_indices", {"topk": 2048}, {"seq_len": 4096}, sku="h100-sxm") == {"src": "user"}
    # Valid JSON that is not a cache file, and a malformed entry in an otherwise good file.
    cache.clear_memory_cache()
    path.write_text("[1, 2, 3]")
    with caplog.at_level(logging.WARNING):
        assert cache.lookup("topk_indices", {"topk": 2048}, {"seq_len": 4096}, sku="h100-sxm") == {"src": "shipped"}
    assert any("not a config cache file" in w for w in _warnings(caplog))


def test_malformed_entry_skipped(cache_dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    path = cache.store("index_scores", {"heads": 64}, {"seq_len": 4096}, {"tile": 1}, sku="h20")
    doc = json.loads(path.read_text())
    bogus = {"kernel": "index_scores", "static": {"heads": 64}, "bucket": {"seq_len": -3}, "config": {}}
    doc["entries"]["bogus"] = bogus
    path.write_text(json.dumps(doc))
    cache.clear_memory_cache()
    with caplog.at_level(logging.WARNING):
        assert cache.lookup("index_scores", {"heads": 64}, {"seq_len": 4096}, sku="h20") == {"tile": 1}
        assert cache.lookup("index_scores", {"heads": 64}, {"seq_len": 4096}, sku="h20") == {"tile": 1}
    assert len(_warnings(caplog)) == 1 and "bogus" in _warnings(caplog)[0]


@pytest.mark.parametrize("field", ["tilelang", "format", "sku"])
def test_foreign_file_reported_once_and_ignored(
    cache_dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture, field: str
) -> None:
    path = cache.store("sparse_mla_fwd", {"heads": 128}, {"seq_len": 4096}, {"x": 1}, sku="h200")
    doc = json.loads(path.read_text())
    if field == "tilelang":
        doc["metadata"]["tilelang"] = "0.0.1"
    elif field == "format":
        doc["format"] = 999
    else:
        doc["metadata"]["sku"] = "h20"  # a file copied into the wrong SKU folder
    path.write_text(json.dumps(doc))
    cache.clear_memory_cache()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert cache.lookup("sparse_mla_fwd", {"heads": 128}, {"seq_len": 4096}, sku="h200") is None
    assert len(_warnings(caplog)) == 1, _warnings(caplog)


def _writer(cache_root: str, worker: int, count: int, start: Any) -> None:
    os.environ["DSA_CACHE_DIR"] = cache_root
    start.wait()
    for i in range(count):
        cache.store("index_scores", {"heads": 64, "worker": worker}, {"seq_len": 2**i}, {"i": i}, sku="h100-sxm")


def test_two_processes_writing_at_once(cache_dirs: tuple[Path, Path]) -> None:
    user, _ = cache_dirs
    count = 12
    # fork: the children start in milliseconds (spawn re-imports torch); flock serialises them all the same.
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(user), w, count, start)) for w in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    cache.clear_memory_cache()
    for w in range(2):
        for i in range(count):
            got = cache.lookup("index_scores", {"heads": 64, "worker": w}, {"seq_len": 2**i}, sku="h100-sxm")
            assert got == {"i": i}, (w, i)
    doc = json.loads(cache.user_path("index_scores", sku="h100-sxm").read_text())
    assert len(doc["entries"]) == 2 * count
    assert not list((user / "h100-sxm").glob("*.tmp"))


def test_lookup_takes_microseconds(cache_dirs: tuple[Path, Path]) -> None:
    static = {"heads": 128, "d_qk": 576, "d_v": 512, "has_topk_length": False, "has_sink": False}
    for n in (4096, 8192, 16384, 32768, 65536):
        point = {"batch": 1, "seq_len": n, "seq_len_kv": n, "topk": 2048}
        cache.store("sparse_mla_fwd", static, point, {"b": n}, sku="h200")
    sizes = {"batch": 2, "seq_len": 5000, "seq_len_kv": 5000, "topk": 2048}  # nearest-bucket path
    assert cache.lookup("sparse_mla_fwd", static, sizes, sku="h200") == {"b": 8192}  # warm (reads the file once)
    calls = 1000
    best = float("inf")
    for _ in range(5):  # best of five: the CI machine is shared
        t0 = time.perf_counter()
        for _ in range(calls):
            cache.lookup("sparse_mla_fwd", static, sizes, sku="h200")
        best = min(best, (time.perf_counter() - t0) / calls)
    assert best < 50e-6, f"lookup takes {best * 1e6:.1f} us"


# ----------------------------------------------------------------------------------------------------------------------
# select
# ----------------------------------------------------------------------------------------------------------------------
def test_config_for(
    fake_kernel: types.ModuleType,
    cache_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    static, sizes = dict(FAKE_STATIC), {"batch": 1, "seq_len": 4096, "seq_len_kv": 4096}
    cache.store("fake", static, sizes, {"block": 32, "stages": 1}, sku="h20")
    assert select.config_for("fake", static, sizes, torch.device("cpu")) is None  # CPU: never tuned
    monkeypatch.setattr(sku, "current_sku", lambda device=None: "h20")
    monkeypatch.setattr(select, "_reported", set())
    assert select.config_for("fake", static, sizes, torch.device("cuda", 0)) == {"block": 32, "stages": 1}
    assert select.config_for("fake", {**static, "limit": 8}, sizes, torch.device("cuda", 0)) is None
    # A stale entry (a field the module no longer has, or a combination check_config now rejects) is not returned.
    with caplog.at_level(logging.WARNING):
        cache.store("fake", static, sizes, {"block": 32, "stages": 1, "gone": 3}, sku="h20")
        assert select.config_for("fake", static, sizes, torch.device("cuda", 0)) is None
        cache.store("fake", static, sizes, {"block": 128, "stages": 3}, sku="h20")
        assert select.config_for("fake", static, sizes, torch.device("cuda", 0)) is None
    assert len([r for r in caplog.records if r.name == "autotune.select"]) == 2
    caplog.clear()

    def broken(device: Any = None) -> str:
        raise RuntimeError("no driver")

    monkeypatch.setattr(sku, "current_sku", broken)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert select.config_for("fake", static, sizes, torch.device("cuda", 0)) is None
    assert len([r for r in caplog.records if r.name == "autotune.select"]) == 1


# ----------------------------------------------------------------------------------------------------------------------
# space
# ----------------------------------------------------------------------------------------------------------------------
def test_causal_pairs_matches_brute_force() -> None:
    for s, s_kv in [(1, 1), (4, 4), (3, 7), (7, 3), (16, 16), (5, 0 + 5), (9, 20)]:
        brute = sum(1 for t in range(s) for k in range(s_kv) if k <= t + s_kv - s)
        assert space.causal_pairs(s, s_kv) == brute, (s, s_kv)


def test_fake_space(fake_kernel: types.ModuleType) -> None:
    full = space.candidates("fake", FAKE_STATIC, full=True)
    pruned = space.candidates("fake", FAKE_STATIC)
    default = {"block": 64, "stages": 2}
    assert full[0] == default and pruned[0] == default
    # Every candidate satisfies the constraint; the full space is exactly the valid product.
    expected = {(b, s) for b in FAKE_SPACE["block"] for s in FAKE_SPACE["stages"] if b * s <= FAKE_STATIC["limit"]}
    assert {(c["block"], c["stages"]) for c in full} == expected
    assert len(full) == len(expected)
    assert all(c in full for c in pruned)
    assert len(pruned) == 1 + space.PRUNED_NEIGHBOURS
    # One field changed per neighbour, round-robin over fields: block first, then stages.
    assert pruned[1:] == [{"block": 32, "stages": 2}, {"block": 64, "stages": 1}, {"block": 128, "stages": 2}]
    assert all(sum(c[k] != default[k] for k in c) == 1 for c in pruned[1:])
    # A tight limit removes the invalid ones.
    tight = {"width": 8, "limit": 64}
    assert all(c["block"] * c["stages"] <= 64 for c in space.candidates("fake", tight, full=True)[1:])
    space.check_static("fake", FAKE_STATIC)
    with pytest.raises(ValueError):
        space.check_static("fake", {**FAKE_STATIC, "bogus": 1})
    with pytest.raises(ValueError):
        space.check_static("fake", {**FAKE_STATIC, "block": 1})
    with pytest.raises(ValueError):
        space.make_config("fake", FAKE_STATIC, {"block": 128, "stages": 3})
    assert space.make_config("fake", FAKE_STATIC, default) == FakeConfig()


def test_pruned_space_includes_valid_presets(fake_kernel: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module's TUNING_PRESETS (schedules differing in several fields) join the pruned space when valid."""
    monkeypatch.setattr(fake_kernel, "TUNING_PRESETS", ({"block": 128, "stages": 1}, {"block": 128, "stages": 3}), raising=False)
    pruned = space.candidates("fake", FAKE_STATIC)
    assert pruned[0] == {"block": 64, "stages": 2}
    assert pruned[1] == {"block": 128, "stages": 1}
    assert {"block": 128, "stages": 3} not in pruned  # over the fake kernel's limit
    fwd = space.candidates("sparse_mla_fwd", {"heads": 128, "d_qk": 576, "d_v": 512, "has_topk_length": False, "has_sink": False})
    assert any(c["pipeline"] == "ws" for c in fwd)


def test_shapes_file(tmp_path: Path, fake_kernel: types.ModuleType) -> None:
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({"fake": [{"static": FAKE_STATIC, "sizes": list(FAKE_SIZES)}]}))
    (case,) = space.preset_cases(shapes, ("fake",))
    assert case.static == FAKE_STATIC and case.sizes == FAKE_SIZES and case.check_sizes == FAKE_SIZES[0]
    shapes.write_text(json.dumps({"fake": [{"static": FAKE_STATIC, "sizes": [{"seq_len": 4}]}]}))
    with pytest.raises(ValueError):
        space.preset_cases(shapes, ("fake",))
    shapes.write_text(json.dumps({"nonsense": []}))
    with pytest.raises(ValueError):
        space.preset_cases(shapes)


def _real_kernels() -> list[str]:
    found = []
    for name in space.KERNEL_NAMES:
        try:
            space.kernel_module(name)
        except ImportError:
            continue
        found.append(name)
    return found


@pytest.mark.parametrize("preset", space.PRESETS)
def test_real_kernel_presets_and_spaces(preset: str) -> None:
    kernels = tuple(_real_kernels())
    if not kernels:
        pytest.skip("no kernel module in tl_kernels yet")
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


# ----------------------------------------------------------------------------------------------------------------------
# tuner (fake kernel, no nvcc)
# ----------------------------------------------------------------------------------------------------------------------
def test_tune_compile_only_fake(fake_kernel: types.ModuleType) -> None:
    options = tuner.TuneOptions(kernels=("fake",), preset=FAKE_PRESET, full=True, jobs=1, progress=False)
    result = tuner.tune(options)
    by_config = {(r.config["block"], r.config["stages"]): r for r in result.records}
    assert set(by_config) == {(c["block"], c["stages"]) for c in space.candidates("fake", FAKE_STATIC, full=True)}
    assert not by_config[(32, 3)].ok and "fake compile error" in by_config[(32, 3)].error
    assert not by_config[(128, 2)].ok and "spills" in by_config[(128, 2)].error
    assert by_config[(64, 2)].ok and by_config[(64, 2)].registers == 64 and by_config[(64, 2)].error is None
    assert all(r.latency_ms is None and r.tflops is None and not r.chosen for r in result.records)
    assert all(r.params == FAKE_STATIC for r in result.records)
    assert not result.failed_cases and not result.written


class _FakeRunner:
    """CPU 'kernel' runs: output = x * config.block; candidates with block == 32 compute garbage."""

    def __init__(self) -> None:
        self.launches = 0

    def runner(self) -> gpu.Runner:
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
            return gpu.compare_tensor(out[0], ref[0], atol=1e-6, rtol=1e-6, name="x")

        def get_kernel(kernel, static, config):
            return fake_build(**static, **config)

        return gpu.Runner(make_inputs, launch, reference, compare, get_kernel)


def test_time_case_selection_fake(fake_kernel: types.ModuleType, cache_dirs: tuple[Path, Path]) -> None:
    fake = _FakeRunner()
    # Latency by config: block=32 would be fastest but is wrong; among correct ones (64, 1) is fastest.
    latency = {(32, 1): 0.1, (32, 2): 0.1, (64, 1): 0.5, (64, 2): 1.0, (64, 3): 0.9, (128, 1): 0.7}

    def measure(call, input_sets, *, warmup, reps):
        call(input_sets[0])  # the launch records which candidate it ran
        return latency[current["config"]]

    current: dict[str, Any] = {}
    real_launch = fake.runner().launch

    def runner_with_tracking() -> gpu.Runner:
        base = fake.runner()

        def get_kernel(kernel, static, config):
            return ("k", static, config)

        def launch(kernel, static, inputs):
            current["config"] = (kernel[2]["block"], kernel[2]["stages"])
            return real_launch(fake_build(**static, **kernel[2]), static, inputs)

        return dataclasses.replace(base, get_kernel=get_kernel, launch=launch)

    def timer(case, candidates, options):
        return gpu.time_case(
            case, candidates, options, sku="h100-sxm", device=torch.device("cpu"),
            runner=runner_with_tracking(), measure=measure,
        )

    options = tuner.TuneOptions(kernels=("fake",), preset=FAKE_PRESET, full=True, jobs=1, progress=False)
    result = tuner.tune(options, timer=timer)
    assert result.timed and not result.failed_cases
    for sizes in FAKE_SIZES:
        point = [r for r in result.records if r.params == {**FAKE_STATIC, **sizes}]
        chosen = [r for r in point if r.chosen]
        assert len(chosen) == 1 and chosen[0].config == {"block": 64, "stages": 1}
        wrong = [r for r in point if r.config["block"] == 32 and r.config["stages"] != 3]
        assert wrong and all(not r.ok and "wrong result" in r.error for r in wrong)
        ok = [r for r in point if r.ok]
        assert {(r.config["block"], r.config["stages"]) for r in ok} == {(64, 1), (64, 2), (64, 3), (128, 1)}
        assert all(r.latency_ms is not None and r.tflops is not None for r in ok)
        assert chosen[0].tflops == pytest.approx(_fake_flops(FAKE_STATIC, sizes) / 0.5e-3 / 1e12, rel=1e-3)
        # The winner is in the cache for this SKU and bucket, and nothing else is.
        assert cache.lookup("fake", FAKE_STATIC, sizes, sku="h100-sxm") == {"block": 64, "stages": 1}
    # Compile failures appear once per case, without sizes.
    compile_failed = [r for r in result.records if r.params == FAKE_STATIC]
    assert {(r.config["block"], r.config["stages"]) for r in compile_failed} == {(32, 3), (128, 2)}
    assert result.written == [str(cache.user_path("fake", sku="h100-sxm"))]
    entries = json.loads(cache.user_path("fake", sku="h100-sxm").read_text())["entries"]
    assert len(entries) == len(FAKE_SIZES)
    (metrics,) = {json.dumps(e["metrics"]["latency_ms"]) for e in entries.values()}
    assert json.loads(metrics) == 0.5


def test_time_case_no_valid_candidate(fake_kernel: types.ModuleType, cache_dirs: tuple[Path, Path]) -> None:
    base = _FakeRunner().runner()

    def wrong_launch(kernel, static, inputs):
        return (inputs["x"] + 1.0,)

    def timer(case, candidates, options):
        runner = dataclasses.replace(base, launch=wrong_launch)
        return gpu.time_case(
            case, candidates, options, sku="h100-sxm", device=torch.device("cpu"), runner=runner,
            measure=lambda call, sets, warmup, reps: 1.0,
        )

    options = tuner.TuneOptions(kernels=("fake",), preset=FAKE_PRESET, jobs=1, progress=False)
    result = tuner.tune(options, timer=timer)
    assert result.failed_cases == [("fake", FAKE_STATIC)]
    assert not any(r.chosen for r in result.records)
    assert cache.lookup("fake", FAKE_STATIC, FAKE_SIZES[0], sku="h100-sxm") is None


def test_input_set_count_and_winner() -> None:
    l2 = 50 << 20
    assert tuner.input_set_count(10 << 20, l2_bytes=l2, free_bytes=80 * GIB) == 10  # 2 x L2 / 10 MiB
    assert tuner.input_set_count(10 << 30, l2_bytes=l2, free_bytes=80 * GIB) == 1
    assert tuner.input_set_count(1 << 10, l2_bytes=l2, free_bytes=80 * GIB) == tuner.MAX_INPUT_SETS
    assert tuner.input_set_count(10 << 20, l2_bytes=l2, free_bytes=40 << 20) == 2  # memory-bound
    assert tuner.pick_winner({0: 1.0, 1: 0.5, 2: None, 3: 0.5}) == 1
    assert tuner.pick_winner({0: None, 1: float("nan")}) is None


def test_causal_random_indices() -> None:
    gen = torch.Generator().manual_seed(0)
    idx = gpu.causal_random_indices(2, 8, 12, 6, torch.device("cpu"), gen)
    assert idx.shape == (2, 8, 6) and idx.dtype == torch.int32
    for t in range(8):
        visible = t + 12 - 8 + 1
        row = idx[:, t]
        assert bool(((row >= 0) & (row < visible)).all()) if visible >= 6 else True
        assert bool((row[:, min(visible, 6):] == -1).all())
        assert bool((row[:, : min(visible, 6)] >= 0).all() and (row < visible).all())


def test_compare_tensor_catches_errors() -> None:
    e = torch.tensor([1.0, 2.0, float("-inf"), 4.0])
    assert gpu.compare_tensor(e.clone(), e, atol=1e-6, rtol=1e-6, name="x") is None
    with_nan = torch.tensor([1.0, float("nan"), float("-inf"), 4.0])
    assert "NaN" in gpu.compare_tensor(with_nan, e, atol=1, rtol=1, name="x")
    assert "-inf" in gpu.compare_tensor(torch.tensor([1.0, 2.0, 3.0, 4.0]), e, atol=1, rtol=1, name="x")
    assert "tolerance" in gpu.compare_tensor(e * 1.01, e, atol=1e-6, rtol=1e-6, name="x")
    assert "cosine" in gpu.compare_tensor(torch.tensor([1.0, -2.0, float("-inf"), 4.0]), e, atol=10, rtol=10, name="x")


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------
REPORT_KEYS = {
    "kernel", "params", "config", "ok", "error", "registers", "spill_bytes", "smem_bytes", "has_wgmma",
    "compile_s", "latency_ms", "tflops", "chosen",
}


def test_cli_fake_compile_only(
    fake_kernel: types.ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "_cuda_available", lambda: False)
    report = tmp_path / "report.json"
    argv = ["--kernels", "fake", "--shapes", FAKE_PRESET, "--jobs", "1", "--full", "--no-progress"]
    argv += ["--report", str(report)]
    assert cli.main(argv) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("No CUDA device")
    assert "fake  [width=8 limit=256]" in out and "rejected: 64 B of register spills" in out
    records = json.loads(report.read_text())
    assert records and all(set(r) == REPORT_KEYS for r in records)
    assert all(r["latency_ms"] is None and r["tflops"] is None and r["chosen"] is False for r in records)
    # With a limit that no config meets, the case has no valid config and the exit status says so.
    space.register_kernel(
        space.spec("fake"), {FAKE_PRESET: [space.Case("fake", {"width": 8, "limit": 1}, FAKE_SIZES, FAKE_CHECK)]}
    )
    assert cli.main(argv) == cli.EXIT_NO_VALID_CONFIG
    assert "NO VALID CONFIG: fake width=8 limit=1" in capsys.readouterr().out


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--kernels", "nope"], ["--shapes", "no-such-preset"], ["--sku", "H100!"], ["--sku", "sm80-a100"],
                 ["--jobs", "0"], ["--candidate-timeout", "0"]):
        assert cli.main(argv) == cli.EXIT_USAGE, argv
        assert "error" in capsys.readouterr().err


@pytest.mark.build
def test_script_compile_only_tiny(tmp_path: Path) -> None:
    """``scripts/autotune.py`` compile-only for sm_90a on the tiny preset: the report lists every candidate of the
    pruned space with its static report, no times, and TileLang leaves no ``autotuner.log`` in the working dir."""
    kernels = ("sparse_mla_fwd",)
    report = tmp_path / "report.json"
    env = {**os.environ, "DSA_CACHE_DIR": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "autotune.py"), "--shapes", "tiny", "--kernels", ",".join(kernels),
         "--jobs", "2", "--no-progress", "--report", str(report)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode in (cli.EXIT_OK, cli.EXIT_NO_VALID_CONFIG), proc.stderr[-3000:]
    assert proc.stdout.startswith("No CUDA device"), proc.stdout
    records = json.loads(report.read_text())
    assert all(set(r) == REPORT_KEYS for r in records)
    for case in space.preset_cases("tiny", kernels):
        expected = space.candidates(case.kernel, case.static)
        mine = [r for r in records if r["kernel"] == case.kernel and r["params"] == case.static]
        assert [r["config"] for r in mine] == expected
    for r in records:
        assert r["latency_ms"] is None and r["tflops"] is None and r["chosen"] is False
        assert r["compile_s"] is not None and r["compile_s"] > 0
        if r["ok"]:
            assert r["error"] is None and r["spill_bytes"] == 0 and r["has_wgmma"] is True
            assert 0 < r["registers"] <= 255 and 0 < r["smem_bytes"] <= 227 * 1024
        else:
            assert r["error"]
    any_ok = any(r["ok"] for r in records)
    assert proc.returncode == (cli.EXIT_OK if any_ok else cli.EXIT_NO_VALID_CONFIG)
    assert not (tmp_path / "autotuner.log").exists()
    assert not list((tmp_path / "cache").glob("**/*.json")), "compile-only must not write tuned configs"


def test_topk_set_comparison_and_causal_scores() -> None:
    gen = torch.Generator().manual_seed(1)
    scores = gpu.causal_scores(2, 6, 9, torch.device("cpu"), gen)
    t = torch.arange(6).view(-1, 1)
    hidden = torch.arange(9).view(1, -1) > t + 3
    assert bool(torch.isneginf(scores[:, hidden]).all()) and bool(torch.isfinite(scores[:, ~hidden]).all())
    from dsa import reference

    expected = reference.topk_indices(scores, 5)
    assert gpu.topk_set_error(expected.flip(-1), expected, scores) is None  # order within a row is free
    wrong = expected.clone()
    wrong[0, 5, 0] = (set(range(9)) - set(wrong[0, 5].tolist())).pop()  # a lower score swapped in
    assert "differ" in gpu.topk_set_error(wrong, expected, scores)
    dup = expected.clone()
    dup[1, 4, 1] = dup[1, 4, 0]
    assert "repeated" in gpu.topk_set_error(dup, expected, scores)
    bad = expected.clone()
    bad[0, 0, 0] = 9
    assert "range" in gpu.topk_set_error(bad, expected, scores)


_LAUNCHERS = {
    "index_scores": ("indexer", "index_scores"),
    "topk_indices": ("topk", "topk_indices"),
    "sparse_mla_fwd": ("sparse_mla_fwd", "sparse_mla_fwd"),
    "sparse_mla_bwd": ("sparse_mla_bwd", "sparse_mla_bwd"),
}


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("kernel", space.KERNEL_NAMES)
def test_gpu_runner_on_cpu(kernel: str) -> None:
    """The tuner's runner for ``kernel`` (inputs, launcher call with ``config=``, reference, comparison) run on the C
    target with the module's CPU default config: the tuner's call path agrees with the launcher and the reference,
    and a corrupted output is caught."""
    if gpu._launcher(*_LAUNCHERS[kernel]) is None:
        pytest.skip(f"dsa.launch has no {kernel} launcher yet")
    (case,) = space.preset_cases("tiny", (kernel,))
    runner = gpu.runner_for(kernel)
    inputs = runner.make_inputs(case.static, case.check_sizes, torch.device("cpu"), gpu.SEED)
    config = space.kernel_module(kernel).default_config({**case.static, "target": "c"})
    out = runner.launch(config, case.static, inputs)
    expected = runner.reference(case.static, inputs)
    assert runner.compare(out, expected) is None
    broken = list(out)
    if broken[0].dtype == torch.int32:
        broken[0] = broken[0].roll(1, dims=1)  # other rows' indices
    else:
        broken[0] = broken[0] * 1.5
    assert runner.compare(tuple(broken), expected) is not None


def test_tune_reports_a_kernel_module_that_does_not_import(fake_kernel: types.ModuleType) -> None:
    space.register_kernel(dataclasses.replace(space.spec("fake"), module="no_such_kernel_module"))
    options = tuner.TuneOptions(kernels=("fake",), preset=FAKE_PRESET, jobs=1, progress=False)
    result = tuner.tune(options)
    (record,) = result.records
    assert not record.ok and "no_such_kernel_module" in record.error and record.config == {}
    assert result.failed_cases == [("fake", FAKE_STATIC)]


def test_time_case_reference_failure_rejects_all(fake_kernel: types.ModuleType, cache_dirs: tuple[Path, Path]) -> None:
    def broken_reference(static, inputs):
        raise RuntimeError("out of memory")

    runner = dataclasses.replace(_FakeRunner().runner(), reference=broken_reference)
    timer = lambda case, candidates, options: gpu.time_case(  # noqa: E731
        case, candidates, options, sku="h100-sxm", device=torch.device("cpu"), runner=runner,
        measure=lambda call, sets, warmup, reps: 1.0,
    )
    result = tuner.tune(tuner.TuneOptions(kernels=("fake",), preset=FAKE_PRESET, jobs=1, progress=False), timer=timer)
    assert result.failed_cases == [("fake", FAKE_STATIC)]
    timed = [r for r in result.records if "seq_len" in r.params]
    assert timed and all(not r.ok and "reference failed" in r.error for r in timed)


# ----------------------------------------------------------------------------------------------------------------------
# The GPU worker process: candidates that crash or hang it (fakes on the CPU). The worker is spawned and unpickles its
# runner and measure function, so they live at module level, importable by name.
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
    if config == WORKER_HANG and inputs["x"].numel() == FAKE_SIZES[-1]["seq_len"]:
        time.sleep(600)
    return inputs["x"].clone(), config["block"] * config["stages"] / 100


def worker_reference(static: dict[str, Any], inputs: dict[str, Any]) -> tuple[Any, ...]:
    return (inputs["x"],)


def worker_compare(out: tuple[Any, ...], ref: tuple[Any, ...]) -> str | None:
    return gpu.compare_tensor(out[0], ref[0], atol=0.0, rtol=0.0, name="x")


def worker_measure(call: Any, input_sets: list[dict[str, Any]], *, warmup: int, reps: int) -> float:
    return call(input_sets[0])[1]


WORKER_RUNNER = gpu.Runner(worker_inputs, worker_launch, worker_reference, worker_compare, worker_kernel)


def _candidates(configs: list[dict[str, Any]]) -> list[Any]:
    """Compiled candidates of the fake kernel's case (what ``tuner.tune`` hands a timer)."""
    return [
        tuner._Candidate(
            tuner.CompileJob("fake", FAKE, f"{FAKE}:compile", cache.canonical(FAKE_STATIC), cache.canonical(config)),
            tuner.CompileResult(ok=True),
        )
        for config in configs
    ]


def test_worker_survives_candidates_that_crash_or_hang(
    fake_kernel: types.ModuleType, cache_dirs: tuple[Path, Path]
) -> None:
    """A segfault while checking and a hang while timing each fail only their candidate, with the reason; the other
    candidates' results are kept and the winners stored. Then one fresh worker serves two clean cases, one that dies
    while idle is replaced, and the last ends cleanly when the timer is closed. Four workers in all."""
    (case,) = space.preset_cases(FAKE_PRESET, ("fake",))
    configs = [WORKER_GOOD[0], WORKER_SEGFAULT, WORKER_GOOD[1], WORKER_HANG]
    options = tuner.TuneOptions(kernels=("fake",), preset=FAKE_PRESET, progress=False, candidate_timeout_s=3)
    started = time.monotonic()
    timer = gpu.GpuTimer(sku="h100-sxm", device=torch.device("cpu"), runner=WORKER_RUNNER, measure=worker_measure)
    records, written, ok = timer(case, _candidates(configs), options)
    assert timer._worker is None, "the hung worker must be gone"
    assert ok and written == [cache.user_path("fake", sku="h100-sxm")]
    found = {(json.dumps(r.config, sort_keys=True), r.params["seq_len"]): r for r in records}
    assert len(found) == len(configs) * len(FAKE_SIZES)

    def record(config: dict[str, Any], point: int) -> tuner.Record:
        return found[(json.dumps(config, sort_keys=True), FAKE_SIZES[point]["seq_len"])]

    for point in range(len(FAKE_SIZES)):
        crashed = record(WORKER_SEGFAULT, point)
        assert not crashed.ok and "died with signal 11 (SIGSEGV) while checking candidate" in crashed.error
        assert '{"block":32,"stages":1}' in crashed.error
        for good in WORKER_GOOD:
            assert record(good, point).ok and record(good, point).latency_ms == pytest.approx(1.28)
    fast = record(WORKER_HANG, 0)
    assert fast.ok and fast.latency_ms == pytest.approx(0.64) and fast.chosen
    hung = record(WORKER_HANG, 1)
    assert not hung.ok and "no result after 3 s while timing candidate" in hung.error and "killed" in hung.error
    assert record(WORKER_GOOD[0], 1).chosen  # a tie with WORKER_GOOD[1]: the lower position wins
    assert cache.lookup("fake", FAKE_STATIC, FAKE_SIZES[0], sku="h100-sxm") == WORKER_HANG
    assert cache.lookup("fake", FAKE_STATIC, FAKE_SIZES[1], sku="h100-sxm") == WORKER_GOOD[0]

    processes = []
    with timer:
        for _ in range(2):
            assert timer(case, _candidates(list(WORKER_GOOD)), options)[2]
            assert timer._worker is not None and timer._worker.process.is_alive()
            processes.append(timer._worker.process)
        assert processes[0] is processes[1], "one worker for both cases"
        # A worker that dies while idle is replaced without failing the next case.
        os.kill(processes[0].pid, signal.SIGKILL)
        processes[0].join(timeout=30)
        records, _, ok = timer(case, _candidates(list(WORKER_GOOD)), options)
        assert ok and all(r.ok for r in records)
        processes.append(timer._worker.process)
    assert processes[2] is not processes[0] and processes[2].exitcode == 0, "close() ends the worker cleanly"
    assert time.monotonic() - started < 60


def test_progress_failures_are_attributed() -> None:
    """Which results a dead or hung worker's step takes with it."""
    progress = gpu._Progress(candidates=3, points=3)
    for i in range(3):
        progress.add(gpu._Result(i, None, None, None))
    progress.add(gpu._Result(0, 0, 1.0, None))
    progress.fail(gpu._Step("time", point=0, candidate=1), "hung")
    # A candidate that hung while timed is not timed at the later points either; the others still are.
    assert [progress.times[(p, 1)] for p in range(3)] == [(None, "hung")] * 3
    assert progress.untimed(0) == [2] and progress.untimed(1) == [0, 2]
    progress.fail(gpu._Step("inputs", point=1), "no inputs")
    assert progress.untimed(1) == [] and progress.times[(1, 0)] == (None, "no inputs")
    progress.fail(None, "worker dead at start-up")
    assert progress.finished() and progress.times[(0, 2)] == (None, "worker dead at start-up")
    assert progress.times[(0, 0)] == (1.0, None), "a result already reported is kept"
    unchecked = gpu._Progress(candidates=2, points=1)
    unchecked.add(gpu._Result(0, None, None, "wrong result"))
    unchecked.fail(gpu._Step("reference"), "reference died")
    assert unchecked.checks == {0: "wrong result", 1: "reference died"} and unchecked.finished()
    assert gpu._exit_text(-11) == "GPU worker process died with signal 11 (SIGSEGV)"
    assert gpu._exit_text(139) == "GPU worker process exited with code 139"


def test_timer_in_process_mode(fake_kernel: types.ModuleType, cache_dirs: tuple[Path, Path]) -> None:
    """``isolate=False`` runs the same steps in this process (closures allowed) and starts no worker."""
    timer = gpu.GpuTimer(
        sku="h100-sxm", device=torch.device("cpu"), runner=_FakeRunner().runner(),
        measure=lambda call, sets, warmup, reps: 1.0,
    )  # fmt: skip
    options = tuner.TuneOptions(kernels=("fake",), preset=FAKE_PRESET, jobs=1, progress=False, isolate=False)
    result = tuner.tune(options, timer=timer)
    assert not result.failed_cases and timer._worker is None
    assert cache.lookup("fake", FAKE_STATIC, FAKE_SIZES[0], sku="h100-sxm") == {"block": 64, "stages": 2}


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
