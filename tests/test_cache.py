"""The per-SKU config cache (``autotune.lookup.cache``): keys and buckets, the lookup order, robustness against
corrupt or foreign files, concurrent writers, and the cost of a lookup."""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from autotune.lookup import cache


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
    assert cache.lookup("sparse_mla_fwd", static, {"seq_len": 4096}, sku="h100-sxm", cache_dir=user) is None
    path = cache.store("sparse_mla_fwd", static, {"seq_len": 3000}, config, sku="h100-sxm", cache_dir=user, metrics={"latency_ms": 1.5})
    assert path == user / "h100-sxm" / "sparse_mla_fwd.json"
    assert cache.lookup("sparse_mla_fwd", static, {"seq_len": 4096}, sku="h100-sxm", cache_dir=user) == config
    assert cache.lookup("sparse_mla_fwd", static, {"seq_len": 4096}, sku="h200", cache_dir=user) is None  # per SKU
    assert cache.lookup("sparse_mla_fwd", {**static, "heads": 64}, {"seq_len": 4096}, sku="h100-sxm", cache_dir=user) is None
    # The returned dict is a copy: mutating it does not change the cache.
    got = cache.lookup("sparse_mla_fwd", static, {"seq_len": 4096}, sku="h100-sxm", cache_dir=user)
    got["block_h"] = -1
    assert cache.lookup("sparse_mla_fwd", static, {"seq_len": 4096}, sku="h100-sxm", cache_dir=user) == config
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
    assert cache.lookup("sparse_mla_fwd", static, {"seq_len": 4096}, sku="h100-sxm", cache_dir=user) == config
    assert not list(path.parent.glob("*.tmp")), "temporary files left behind"


def test_store_invalidates_and_keeps_other_entries(cache_dirs: tuple[Path, Path]) -> None:
    user, _ = cache_dirs
    static = {"heads": 64}
    cache.store("indexer", static, {"seq_len": 4096}, {"tile": 1}, sku="h20", cache_dir=user)
    assert cache.lookup("indexer", static, {"seq_len": 4096}, sku="h20", cache_dir=user) == {"tile": 1}
    cache.store("indexer", static, {"seq_len": 8192}, {"tile": 2}, sku="h20", cache_dir=user)
    cache.store("indexer", static, {"seq_len": 4096}, {"tile": 3}, sku="h20", cache_dir=user)  # overwrite, seen at once
    assert cache.lookup("indexer", static, {"seq_len": 4096}, sku="h20", cache_dir=user) == {"tile": 3}
    assert cache.lookup("indexer", static, {"seq_len": 8192}, sku="h20", cache_dir=user) == {"tile": 2}


def test_lookup_order_exact_nearest_shipped(cache_dirs: tuple[Path, Path]) -> None:
    user, shipped = cache_dirs
    kernel, static, other = "sparse_mla_bwd", {"heads": 128}, {"heads": 16}
    sizes = lambda n: {"batch": 1, "seq_len": n, "seq_len_kv": n}  # noqa: E731
    # Shipped defaults: written with store() into the shipped folder's layout.
    cache.store(kernel, static, sizes(4096), {"src": "shipped-4k"}, sku="h800", cache_dir=shipped)
    cache.store(kernel, other, sizes(4096), {"src": "shipped-other"}, sku="h800", cache_dir=shipped)
    cache.clear_memory_cache()
    # Only shipped: its exact and nearest buckets are used.
    assert cache.lookup(kernel, static, sizes(4096), sku="h800", cache_dir=user) == {"src": "shipped-4k"}
    assert cache.lookup(kernel, static, sizes(65536), sku="h800", cache_dir=user) == {"src": "shipped-4k"}
    # The user's file wins for the static parameters it has, exact first, then the nearest bucket.
    cache.store(kernel, static, sizes(8192), {"src": "user-8k"}, sku="h800", cache_dir=user)
    cache.store(kernel, static, sizes(65536), {"src": "user-64k"}, sku="h800", cache_dir=user)
    assert cache.lookup(kernel, static, sizes(8192), sku="h800", cache_dir=user) == {"src": "user-8k"}
    assert cache.lookup(kernel, static, sizes(4096), sku="h800", cache_dir=user) == {"src": "user-8k"}  # nearest user beats shipped
    assert cache.lookup(kernel, static, sizes(40000), sku="h800", cache_dir=user) == {"src": "user-64k"}
    assert cache.lookup(kernel, static, sizes(16384), sku="h800", cache_dir=user) == {"src": "user-8k"}  # log2 distance 1 vs 2
    assert cache.lookup(kernel, static, sizes(2**14 * 3), sku="h800", cache_dir=user) == {"src": "user-64k"}  # 64K: exact bucket
    # Equidistant buckets (2K and 8K are both one step from 4K): the larger one wins.
    cache.store(kernel, static, sizes(2048), {"src": "user-2k"}, sku="h800", cache_dir=user)
    assert cache.lookup(kernel, static, sizes(4096), sku="h800", cache_dir=user) == {"src": "user-8k"}  # tie 2K/8K -> larger
    # Other static parameters fall through to the shipped file; unknown ones to None.
    assert cache.lookup(kernel, other, sizes(4096), sku="h800", cache_dir=user) == {"src": "shipped-other"}
    assert cache.lookup(kernel, {"heads": 1}, sizes(4096), sku="h800", cache_dir=user) is None
    # A bucket with other size names never matches by distance.
    assert cache.lookup(kernel, static, {"seq_len": 4096}, sku="h800", cache_dir=user) is None


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name == "autotune.lookup.cache"
    ]


def test_corrupt_file_reported_once_and_ignored(
    cache_dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    user, shipped = cache_dirs
    cache.store("topk", {"topk": 2048}, {"seq_len": 4096}, {"src": "shipped"}, sku="h100-sxm", cache_dir=shipped)
    cache.clear_memory_cache()
    path = cache.user_path("topk", sku="h100-sxm", cache_dir=user)
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "metadata": {"tilelang": ')  # truncated
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert cache.lookup("topk", {"topk": 2048}, {"seq_len": 4096}, sku="h100-sxm", cache_dir=user) == {"src": "shipped"}
    assert len(_warnings(caplog)) == 1 and "not valid JSON" in _warnings(caplog)[0]
    # Storing over a corrupt file replaces it (never fatal).
    cache.store("topk", {"topk": 2048}, {"seq_len": 4096}, {"src": "user"}, sku="h100-sxm", cache_dir=user)
    assert cache.lookup("topk", {"topk": 2048}, {"seq_len": 4096}, sku="h100-sxm", cache_dir=user) == {"src": "user"}
    # Valid JSON that is not a cache file, and a malformed entry in an otherwise good file.
    cache.clear_memory_cache()
    path.write_text("[1, 2, 3]")
    with caplog.at_level(logging.WARNING):
        assert cache.lookup("topk", {"topk": 2048}, {"seq_len": 4096}, sku="h100-sxm", cache_dir=user) == {"src": "shipped"}
    assert any("not a config cache file" in w for w in _warnings(caplog))


def test_malformed_entry_skipped(cache_dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    user, _ = cache_dirs
    path = cache.store("indexer", {"heads": 64}, {"seq_len": 4096}, {"tile": 1}, sku="h20", cache_dir=user)
    doc = json.loads(path.read_text())
    bogus = {"kernel": "indexer", "static": {"heads": 64}, "bucket": {"seq_len": -3}, "config": {}}
    doc["entries"]["bogus"] = bogus
    path.write_text(json.dumps(doc))
    cache.clear_memory_cache()
    with caplog.at_level(logging.WARNING):
        assert cache.lookup("indexer", {"heads": 64}, {"seq_len": 4096}, sku="h20", cache_dir=user) == {"tile": 1}
        assert cache.lookup("indexer", {"heads": 64}, {"seq_len": 4096}, sku="h20", cache_dir=user) == {"tile": 1}
    assert len(_warnings(caplog)) == 1 and "bogus" in _warnings(caplog)[0]


@pytest.mark.parametrize("field", ["tilelang", "format", "sku"])
def test_foreign_file_reported_once_and_ignored(
    cache_dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture, field: str
) -> None:
    user, _ = cache_dirs
    path = cache.store("sparse_mla_fwd", {"heads": 128}, {"seq_len": 4096}, {"x": 1}, sku="h200", cache_dir=user)
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
            assert cache.lookup("sparse_mla_fwd", {"heads": 128}, {"seq_len": 4096}, sku="h200", cache_dir=user) is None
    assert len(_warnings(caplog)) == 1, _warnings(caplog)


def _writer(cache_root: str, worker: int, count: int, start: Any) -> None:
    start.wait()
    for i in range(count):
        static = {"heads": 64, "worker": worker}
        cache.store("indexer", static, {"seq_len": 2**i}, {"i": i}, sku="h100-sxm", cache_dir=Path(cache_root))


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
            got = cache.lookup("indexer", {"heads": 64, "worker": w}, {"seq_len": 2**i}, sku="h100-sxm", cache_dir=user)
            assert got == {"i": i}, (w, i)
    doc = json.loads(cache.user_path("indexer", sku="h100-sxm", cache_dir=user).read_text())
    assert len(doc["entries"]) == 2 * count
    assert not list((user / "h100-sxm").glob("*.tmp"))


def test_lookup_takes_microseconds(cache_dirs: tuple[Path, Path]) -> None:
    user, _ = cache_dirs
    static = {"heads": 128, "d_qk": 576, "d_v": 512, "has_topk_length": False, "has_sink": False}
    for n in (4096, 8192, 16384, 32768, 65536):
        point = {"batch": 1, "seq_len": n, "seq_len_kv": n, "topk": 2048}
        cache.store("sparse_mla_fwd", static, point, {"b": n}, sku="h200", cache_dir=user)
    sizes = {"batch": 2, "seq_len": 5000, "seq_len_kv": 5000, "topk": 2048}  # nearest-bucket path
    assert cache.lookup("sparse_mla_fwd", static, sizes, sku="h200", cache_dir=user) == {"b": 8192}  # warm (reads the file once)
    calls = 1000
    best = float("inf")
    for _ in range(5):  # best of five: the CI machine is shared
        t0 = time.perf_counter()
        for _ in range(calls):
            cache.lookup("sparse_mla_fwd", static, sizes, sku="h200", cache_dir=user)
        best = min(best, (time.perf_counter() - t0) / calls)
    assert best < 50e-6, f"lookup takes {best * 1e6:.1f} us"
