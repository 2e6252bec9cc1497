"""The persistent per-SKU config cache.

Layout: ``<cache_dir>/<sku>/<kernel>.json`` (the caller passes ``cache_dir``: the launchers and the tuner pass
``dsa.env.cache_dir()``, i.e. ``DSA_CACHE_DIR``; this module reads no environment and imports nothing from ``dsa``),
plus shipped defaults in ``autotune/configs/<sku>/<kernel>.json`` (package data), both in this format::

    {
      "format": 1,
      "metadata": {"package": "0.1.0", "tilelang": "0.1.15", "torch": "2.13.0", "cuda": "12.8",
                   "sku": "h100-sxm", "kernel": "sparse_mla_fwd", "date": "2026-11-28T14:00:00+00:00"},
      "entries": {
        "<canonical key>": {"kernel": ..., "static": {...}, "bucket": {"seq_len": 4096, ...},
                            "sizes": {...}, "config": {...}, "metrics": {...} | null, "date": ...}
      }
    }

An entry is keyed by kernel + static parameters + shape bucket (every size rounded up to a power of two); keys are
sorted, compact JSON, never ``str()`` of objects, so they are stable across processes and Python versions.

Lookup order (:func:`lookup`): the user's tuned file, exact bucket; the user's file, nearest tuned bucket for the same
static parameters; the shipped file (exact, then nearest); else ``None`` (the caller uses the kernel's default
config). Each file is read once per process and indexed, and each answer is remembered, so a repeated lookup is one
tuple hash (about a microsecond); a :func:`store` from this process invalidates both.

Robustness: writes go to a temporary file in the same directory and are renamed into place (readers never see half
a file); concurrent tuners (processes) serialise their read-merge-write through an ``fcntl.flock`` on a lock file
next to the data, so entries from both survive. A corrupt file, or one written by another TileLang version or cache
format, is reported once through ``logging`` and ignored, never fatal.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import importlib.metadata
import json
import logging
import math
import numbers
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from autotune.lookup import sku as _sku

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "configs"
_PACKAGE = "dsa-tilelang"


# ----------------------------------------------------------------------------------------------------------------------
# Keys and buckets
# ----------------------------------------------------------------------------------------------------------------------
def _json_default(obj: Any) -> Any:
    # numpy / torch integer scalars are common in shape dicts; anything else must already be JSON.
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    raise TypeError(
        f"cache keys take JSON values (str, int, float, bool, None, lists, dicts); got {type(obj).__name__}"
    )


def canonical(obj: Any) -> str:
    """Sorted, compact JSON of ``obj``: the stable text form used in every cache key."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default)


def bucket_size(n: int) -> int:
    """Round a size up to a power of two (``0`` and ``1`` -> ``1``)."""
    n = int(n)
    if n < 0:
        raise ValueError(f"sizes must be >= 0, got {n}")
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def bucket_sizes(sizes: dict[str, int]) -> dict[str, int]:
    """Every size of ``sizes`` rounded up to a power of two."""
    return {name: bucket_size(value) for name, value in sizes.items()}


def entry_key(kernel: str, static: dict[str, Any], sizes: dict[str, int]) -> str:
    """The canonical key of the entry for ``kernel`` at ``static`` and the bucket of ``sizes``."""
    return canonical({"kernel": kernel, "static": static, "bucket": bucket_sizes(sizes)})


# ----------------------------------------------------------------------------------------------------------------------
# Paths and metadata
# ----------------------------------------------------------------------------------------------------------------------
def _check_names(kernel: str, sku: str) -> None:
    if not _sku.is_valid_sku(sku):
        raise ValueError(f"invalid SKU id {sku!r} (lower-case letters, digits and dashes)")
    if not kernel or not kernel.replace("_", "").isalnum():
        raise ValueError(f"invalid kernel name {kernel!r}")


def user_path(kernel: str, *, sku: str, cache_dir: Path) -> Path:
    """Where tuned configs of ``kernel`` for ``sku`` are written: ``<cache_dir>/<sku>/<kernel>.json``."""
    _check_names(kernel, sku)
    return Path(cache_dir) / sku / f"{kernel}.json"


def shipped_path(kernel: str, *, sku: str) -> Path:
    """The shipped defaults of ``kernel`` for ``sku``: ``autotune/configs/<sku>/<kernel>.json``."""
    _check_names(kernel, sku)
    return SHIPPED_DIR / sku / f"{kernel}.json"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    """Versions recorded in every file: this package, TileLang, torch and the CUDA torch was built with."""
    import torch  # local: keep `import autotune.lookup.cache` light

    return {
        "package": _version(_PACKAGE),
        "tilelang": _version("tilelang"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------------------------
# Loading (once per process per file)
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class _Candidate:
    log2: dict[str, float]
    config: dict[str, Any]


@dataclass
class _LoadedFile:
    """An indexed cache file: exact (static, bucket) probes and per-static lists for nearest-bucket search."""

    exact: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    by_static: dict[str, list[_Candidate]] = field(default_factory=dict)
    nearest_memo: dict[tuple[str, str], dict[str, Any] | None] = field(default_factory=dict)

    def find(self, static_key: str, bucket: dict[str, int], bucket_key: str) -> dict[str, Any] | None:
        hit = self.exact.get((static_key, bucket_key))
        if hit is not None:
            return hit
        memo_key = (static_key, bucket_key)
        if memo_key in self.nearest_memo:
            return self.nearest_memo[memo_key]
        best = _nearest(self.by_static.get(static_key, ()), bucket)
        self.nearest_memo[memo_key] = best
        return best


def _nearest(candidates: Any, bucket: dict[str, int]) -> dict[str, Any] | None:
    """The config whose bucket is closest to ``bucket`` in log2 distance (ties: the larger bucket)."""
    want = {name: math.log2(value) for name, value in bucket.items()}
    best: tuple[float, float] | None = None
    best_config: dict[str, Any] | None = None
    for cand in candidates:
        if cand.log2.keys() != want.keys():
            continue
        distance = sum(abs(cand.log2[name] - want[name]) for name in want)
        rank = (distance, -sum(cand.log2.values()))
        if best is None or rank < best:
            best, best_config = rank, cand.config
    return best_config


_files: dict[Path, _LoadedFile | None] = {}
_reported: set[tuple[Path, str]] = set()
_state_lock = threading.Lock()
# Answers already given: (kernel, sku, cache dir, static items, bucketed size items) -> config or None. Building paths and
# canonical JSON costs tens of microseconds; a hit here is a tuple hash. Cleared by store() and clear_memory_cache().
_answers: dict[tuple[Any, ...], dict[str, Any] | None] = {}
_MISS = object()
# Bumped whenever the answers above are dropped (see generation()).
_generation: list[int] = [0]


def _report_once(path: Path, kind: str, message: str) -> None:
    with _state_lock:
        if (path, kind) in _reported:
            return
        _reported.add((path, kind))
    logger.warning("ignoring config cache file %s: %s", path, message)


def _read_valid(path: Path, *, kernel: str, sku: str) -> dict[str, Any] | None:
    """Parse ``path`` and return its document, or ``None`` when it is missing, corrupt or foreign (reported once)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        _report_once(path, "unreadable", f"cannot read it ({exc})")
        return None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        _report_once(path, "corrupt", f"not valid JSON ({exc})")
        return None
    shaped = isinstance(doc, dict) and isinstance(doc.get("metadata"), dict) and isinstance(doc.get("entries"), dict)
    if not shaped:
        _report_once(path, "corrupt", "not a config cache file (needs 'metadata' and 'entries' objects)")
        return None
    if doc.get("format") != FORMAT_VERSION:
        _report_once(path, "format", f"cache format {doc.get('format')!r}, this version reads {FORMAT_VERSION}")
        return None
    meta = doc["metadata"]
    current = versions()["tilelang"]
    if meta.get("tilelang") != current:
        _report_once(path, "tilelang", f"written with TileLang {meta.get('tilelang')!r}, this process runs {current!r}")
        return None
    if meta.get("sku") != sku or meta.get("kernel") != kernel:
        _report_once(
            path,
            "identity",
            f"holds kernel {meta.get('kernel')!r} for SKU {meta.get('sku')!r}, expected {kernel!r} for {sku!r}",
        )
        return None
    return doc


def _index(path: Path, doc: dict[str, Any], *, kernel: str) -> _LoadedFile:
    loaded = _LoadedFile()
    for key, entry in doc["entries"].items():
        try:
            static, bucket, config = entry["static"], entry["bucket"], entry["config"]
            if entry.get("kernel") != kernel or not isinstance(config, dict) or not isinstance(static, dict):
                raise ValueError("wrong kernel or non-object static/config")
            if not isinstance(bucket, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in bucket.values()
            ):
                raise ValueError("bucket sizes must be positive integers")
            static_key, bucket_key = canonical(static), canonical(bucket)
        except (KeyError, TypeError, ValueError) as exc:
            _report_once(path, f"entry:{key}", f"skipping malformed entry {key!r} ({exc})")
            continue
        loaded.exact[(static_key, bucket_key)] = config
        loaded.by_static.setdefault(static_key, []).append(
            _Candidate({name: math.log2(v) for name, v in bucket.items()}, config)
        )
    return loaded


def _load(path: Path, *, kernel: str, sku: str) -> _LoadedFile | None:
    try:
        return _files[path]
    except KeyError:
        pass
    doc = _read_valid(path, kernel=kernel, sku=sku)
    loaded = _index(path, doc, kernel=kernel) if doc is not None else None
    _files[path] = loaded
    return loaded


def generation() -> int:
    """How many times this process changed what :func:`lookup` can answer (a :func:`store`, a
    :func:`clear_memory_cache`). Launch plans key on it, so a config tuned by this same process is used by the next
    call without clearing any plan by hand."""
    return _generation[0]


def clear_memory_cache() -> None:
    """Forget every file read by this process (the next lookup re-reads them) and which problems were reported."""
    with _state_lock:
        _files.clear()
        _reported.clear()
        _answers.clear()
        _generation[0] += 1


# ----------------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------------
def lookup(
    kernel: str, static: dict[str, Any], sizes: dict[str, int], *, sku: str, cache_dir: Path
) -> dict[str, Any] | None:
    """The tuned config of ``kernel`` for ``static`` parameters and ``sizes`` on ``sku``, or ``None``.

    Args:
        kernel: kernel name (``indexer``, ``topk``, ``sparse_mla_fwd``, ``sparse_mla_bwd``).
        static: the kernel's compile-time parameters (JSON values), as passed to its ``build``.
        sizes: runtime sizes (e.g. ``{"batch": 1, "seq_len": 4096, "seq_len_kv": 4096}``); rounded to buckets.
        sku: canonical SKU id (:func:`autotune.lookup.sku.current_sku`).
        cache_dir: the user cache folder (``dsa.env.cache_dir()``).

    Returns:
        A fresh dict of the config's fields, or ``None`` when neither the user's cache nor the shipped defaults
        have an entry for these static parameters.

    Raises:
        TypeError / ValueError: for non-JSON ``static`` values, negative sizes or an invalid kernel/SKU name.
    """
    bucket = bucket_sizes(sizes)
    fast_key = _answer_key(kernel, sku, cache_dir, static, bucket)
    hit = _answers.get(fast_key, _MISS) if fast_key is not None else _MISS
    if hit is _MISS:
        hit = _find(kernel, static, bucket, sku=sku, cache_dir=cache_dir)
        if fast_key is not None:
            _answers[fast_key] = hit
    return None if hit is None else dict(hit)


def _answer_key(
    kernel: str, sku: str, cache_dir: Path, static: dict[str, Any], bucket: dict[str, int]
) -> tuple[Any, ...] | None:
    """A hashable key for the answer memo, or ``None`` when ``static`` holds unhashable values (lists, dicts).

    Types are part of the key because ``True == 1 == 1.0`` in Python but not in the canonical JSON keys.
    """
    key = (
        kernel,
        sku,
        cache_dir,
        tuple(sorted((name, type(value), value) for name, value in static.items())),
        tuple(sorted(bucket.items())),
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _find(
    kernel: str, static: dict[str, Any], bucket: dict[str, int], *, sku: str, cache_dir: Path
) -> dict[str, Any] | None:
    static_key = canonical(static)
    bucket_key = canonical(bucket)
    for path in (user_path(kernel, sku=sku, cache_dir=cache_dir), shipped_path(kernel, sku=sku)):
        loaded = _load(path, kernel=kernel, sku=sku)
        if loaded is None:
            continue
        config = loaded.find(static_key, bucket, bucket_key)
        if config is not None:
            return config
    return None


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    # flock serialises processes (two tuners on one host); it is released when the descriptor closes.
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _atomic_write_json(path: Path, doc: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(doc, handle, indent=1, sort_keys=True, allow_nan=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def store(
    kernel: str,
    static: dict[str, Any],
    sizes: dict[str, int],
    config: dict[str, Any],
    *,
    sku: str,
    cache_dir: Path,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Record ``config`` as the tuned config of ``kernel`` for ``static`` and the bucket of ``sizes`` on ``sku``, in
    the user cache folder ``cache_dir``.

    Read-merge-write under an exclusive lock, written atomically; entries of other keys (also from other processes)
    are kept. A corrupt or foreign-version file in the way is reported and replaced.

    Returns:
        The path of the user cache file written.
    """
    path = user_path(kernel, sku=sku, cache_dir=cache_dir)
    key = entry_key(kernel, static, sizes)  # validates that everything is JSON before touching the disk
    entry = {
        "kernel": kernel,
        "static": json.loads(canonical(static)),
        "bucket": bucket_sizes(sizes),
        "sizes": {name: int(value) for name, value in sizes.items()},
        "config": json.loads(canonical(config)),
        "metrics": json.loads(canonical(metrics)) if metrics is not None else None,
        "date": _now(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent / f".{path.name}.lock"):
        doc = _read_valid(path, kernel=kernel, sku=sku)
        entries = dict(doc["entries"]) if doc is not None else {}
        entries[key] = entry
        new_doc = {
            "format": FORMAT_VERSION,
            "metadata": {**versions(), "sku": sku, "kernel": kernel, "date": _now()},
            "entries": entries,
        }
        _atomic_write_json(path, new_doc)
    with _state_lock:
        _files.pop(path, None)
        _answers.clear()
        _generation[0] += 1
    return path
