"""Compiling builders once per process, passing torch tensors to kernels, and static resource reports for sm_90a.

``get_kernel(builder, target=..., **params)`` is the one way launchers compile: an in-process dict keyed by
(builder module + qualname, sorted params, canonical target, C compile flags) sits on top of TileLang's own disk
cache (``$TILELANG_CACHE_DIR``), so a repeated lookup costs about a microsecond and a new process reloads a compiled
kernel from disk in milliseconds.

This module is the bottom layer: it reads no environment variable and imports nothing from ``dsa`` or ``autotune``.
What the layers above configure (g++ flags of C-target kernels, where ptxas reports are cached) is passed in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tl_kernels import dsl

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CPU_COMPILE_FLAGS",
    "MMA_MMA_SYNC",
    "MMA_WGMMA",
    "PASS_CONFIGS_ATTR",
    "StaticReport",
    "clear_cache",
    "compile_cuda",
    "compile_hopper",
    "get_kernel",
    "mma_call_sites",
    "static_report",
    "to_kernel_arg",
    "with_pass_configs",
]

DEFAULT_CPU_COMPILE_FLAGS: tuple[str, ...] = ("-O2",)
"""g++ flags of C-target kernels when the caller passes none: TileLang compiles without ``-O`` otherwise, about 10x
slower kernels."""

PASS_CONFIGS_ATTR = dsl.PASS_CONFIGS_ATTR
with_pass_configs = dsl.with_pass_configs

# The C target compiles with the cython adapter; tvm_ffi cannot run "c" in TileLang 0.1.15.
_CPU_EXECUTION_BACKEND = "cython"

_KernelKey = tuple[str, str, tuple[tuple[str, Hashable], ...], Hashable, tuple[str, ...]]
_KERNELS: dict[_KernelKey, Any] = {}
_FAST_KERNELS: dict[Hashable, Any] = {}
_KEY_LOCKS: dict[_KernelKey, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def _target_key(target: dsl.Target) -> Hashable:
    """A canonical, order-independent, hashable key for a target (``"c"``, a dict, or a ``tvm.target.Target``).

    Cheap on purpose: it runs on every :func:`get_kernel` lookup.
    """
    if isinstance(target, str):
        return target.strip()
    if isinstance(target, Mapping):
        try:
            return tuple(sorted(target.items()))
        except TypeError:  # unhashable or unorderable values (lists): fall back to canonical JSON
            return json.dumps(dict(target), sort_keys=True, default=str)
    export = getattr(target, "export", None)
    if callable(export):  # tvm.target.Target: its exported config is a plain dict
        return json.dumps(dict(export()), sort_keys=True, default=str)
    raise TypeError(f"unsupported target {target!r}")


def _compile_target(target: dsl.Target) -> dsl.Target:
    """The target in the form ``tilelang.compile`` accepts (dicts are copied so callers cannot mutate cache keys)."""
    if isinstance(target, Mapping):
        return dict(target)
    return target


def _requested_pass_configs(func: Any) -> dict[str, Any] | None:
    """The pass configs a prim_func requested through :func:`with_pass_configs`, as plain Python values."""
    attrs = getattr(func, "attrs", None)
    if attrs is None or PASS_CONFIGS_ATTR not in attrs:
        return None
    configs: dict[str, Any] = {}
    for key, value in attrs[PASS_CONFIGS_ATTR].items():
        configs[str(key)] = _to_python(value)
    return configs


def _to_python(value: Any) -> Any:
    """A TVM attribute value (IntImm, String, ...) as a Python scalar."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "value"):  # IntImm / FloatImm / Bool
        raw = value.value
        dtype = str(getattr(value, "dtype", ""))
        return bool(raw) if dtype == "bool" else raw
    return str(value)


def _compile(
    builder: Callable[..., Any], target: dsl.Target, params: Mapping[str, Any], cpu_flags: tuple[str, ...]
) -> Any:
    """Build the prim_func and compile it for ``target`` (TileLang's disk cache makes repeats cheap)."""
    import tilelang  # imported lazily: importing TileLang loads TVM (about a second)

    func = builder(**params, target=target)
    pass_configs = _requested_pass_configs(func)
    if dsl.is_cpu(target):
        return tilelang.compile(
            func,
            target=_compile_target(target),
            execution_backend=_CPU_EXECUTION_BACKEND,
            compile_flags=list(cpu_flags),
            pass_configs=pass_configs,
            verbose=_PTXAS_CAPTURE.user_verbose(),
        )
    return tilelang.compile(
        func, target=_compile_target(target), pass_configs=pass_configs, verbose=_PTXAS_CAPTURE.user_verbose()
    )


def get_kernel(
    builder: Callable[..., Any],
    *,
    target: dsl.Target,
    cpu_flags: Sequence[str] | None = None,
    **params: Hashable,
) -> Any:
    """The ``JITKernel`` for ``builder(**params, target=target)``, compiled at most once per process.

    ``params`` must be hashable (ints, floats, strings, bools, tuples). ``cpu_flags`` are the g++ flags of a C-target
    build (default :data:`DEFAULT_CPU_COMPILE_FLAGS`; ignored for CUDA targets); pass configs come from the
    prim_func (:func:`tl_kernels.dsl.with_pass_configs`).
    """
    # Fast path: the caller's own keyword and target-dict order (one call site always passes the same order), so a
    # hit costs no sorting. The canonical (sorted) key decides what is compiled; both keys map to the same kernel.
    raw_target = tuple(target.items()) if type(target) is dict else target  # exact type: cheaper than an ABC check
    fast_key = (builder, tuple(params.items()), raw_target, cpu_flags)
    try:
        return _FAST_KERNELS[fast_key]
    except (KeyError, TypeError):  # TypeError: an unhashable value somewhere; the canonical key will say which
        pass
    flags = tuple(DEFAULT_CPU_COMPILE_FLAGS if cpu_flags is None else cpu_flags) if dsl.is_cpu(target) else ()
    key: _KernelKey = (
        builder.__module__, builder.__qualname__, tuple(sorted(params.items())), _target_key(target), flags
    )
    with _LOCKS_LOCK:
        key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with key_lock:  # two threads asking for the same kernel compile it once; different kernels compile concurrently
        kernel = _KERNELS.get(key)
        if kernel is None:
            logger.info("compiling %s.%s with %s for %s", key[0], key[1], params, target)
            kernel = _compile(builder, target, params, flags)
            _KERNELS[key] = kernel
    try:
        _FAST_KERNELS[fast_key] = kernel
    except TypeError:
        pass
    return kernel


def clear_cache() -> None:
    """Forget every in-process kernel (TileLang's disk cache is untouched)."""
    with _LOCKS_LOCK:
        _KERNELS.clear()
        _FAST_KERNELS.clear()
        _KEY_LOCKS.clear()


_CPU_VIEWS: dict[torch.dtype, torch.dtype] = {
    torch.bfloat16: torch.uint16,
    torch.float8_e4m3fn: torch.uint8,
}


def to_kernel_arg(t: torch.Tensor, target: dsl.Target) -> torch.Tensor:
    """``t`` as the kernel expects it: on the C target bf16 is viewed as uint16 and float8_e4m3fn as uint8 (no copy,
    matching :func:`tl_kernels.dsl.storage_dtype`); unchanged otherwise."""
    if dsl.is_cpu(target):
        view = _CPU_VIEWS.get(t.dtype)
        if view is not None:
            return t.view(view)
    return t


MMA_WGMMA = dsl.MMA_WGMMA
MMA_MMA_SYNC = dsl.MMA_MMA_SYNC
# Every GEMM TileLang 0.1.15 lowers for CUDA becomes calls of one of these device functions (checked by lowering a
# GEMM for sm_90a with 64 and 16 rows, and for sm_80, sm_89, sm_100a and sm_120).
_MMA_CALLS: dict[str, re.Pattern[str]] = {
    MMA_WGMMA: re.compile(r"\btl::wgmma_(?:ss|rs)\b"),
    MMA_MMA_SYNC: re.compile(r"\btl::mma_sync\b"),
}


def mma_call_sites(device_source: str) -> dict[str, int]:
    """How many call sites of each matrix instruction (:data:`MMA_WGMMA`, :data:`MMA_MMA_SYNC`) a kernel's CUDA
    source holds; instructions with no call site are left out. One ``T.gemm`` may expand into several call sites
    (one per unrolled K step), so these are counts of calls in the source, not of GEMMs."""
    found = {name: len(pattern.findall(device_source)) for name, pattern in _MMA_CALLS.items()}
    return {name: count for name, count in found.items() if count}


@dataclasses.dataclass(frozen=True)
class StaticReport:
    """What ``ptxas -v`` and the generated sources say about a compiled kernel (max over its entries).

    Attributes:
        registers: registers per thread at launch (a warp-specialised kernel's ``setmaxnreg`` split is not visible).
        spill_bytes: spill stores plus spill loads, in bytes.
        smem_bytes: static shared memory (from ptxas) plus the dynamic shared memory the host launches it with.
        mma: call sites per matrix instruction in the CUDA source (:func:`mma_call_sites`); empty without GEMMs.
        ptxas_log: the full ptxas output, for humans.
    """

    registers: int
    spill_bytes: int
    smem_bytes: int
    mma: Mapping[str, int]
    ptxas_log: str

    @property
    def mma_text(self) -> str:
        """The matrix instructions used, e.g. ``wgmma`` or ``mma_sync+wgmma`` (``-`` for none)."""
        return "+".join(sorted(self.mma)) or "-"

    def problems(self, smem_limit_bytes: int = dsl.HOPPER_SMEM_BYTES, *, mma: str | None = None) -> list[str]:
        """Human-readable reasons this kernel should not be used (empty when it looks fine): any register spill,
        shared memory over ``smem_limit_bytes``, wgmma instructions that ptxas had to serialise, and, with ``mma``
        (the instruction every GEMM must use), a kernel with no such call or any call of another matrix instruction
        (one GEMM that fell back from wgmma to mma_sync is enough)."""
        found: list[str] = []
        if mma is not None:
            if not self.mma.get(mma):
                found.append(f"no {mma} call in the CUDA source (its GEMMs use {self.mma_text})")
            others = {name: count for name, count in self.mma.items() if name != mma}
            for name, count in sorted(others.items()):
                found.append(f"{count} GEMM call site(s) use {name} instead of {mma}")
        serialized = [line.strip() for line in self.ptxas_log.splitlines() if _PTXAS_WGMMA_SERIALIZED in line]
        if serialized:
            # ptxas inserts a wait after every wgmma when it cannot prove the accumulators untouched while in
            # flight: the kernel stays correct but loses the asynchrony it was written for.
            found.append(f"ptxas serialised wgmma: {serialized[0]}")
        if self.spill_bytes > 0:
            found.append(f"register spills: {self.spill_bytes} bytes of spill stores+loads")
        if self.smem_bytes > smem_limit_bytes:
            found.append(f"shared memory {self.smem_bytes} bytes exceeds the limit of {smem_limit_bytes} bytes")
        return found


@dataclasses.dataclass
class _EntryUsage:
    """ptxas figures for one entry function."""

    registers: int = 0
    spill_bytes: int = 0
    static_smem_bytes: int = 0


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_PROPERTIES = re.compile(r"Function properties for (\S+)")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_CUDA_ENTRY = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(")
_HOST_INT_LITERAL = re.compile(r"^\(*(?:\(int64_t\))?\(*(\d+)\)*$")
_PTXAS_WGMMA_SERIALIZED = "wgmma.mma_async instructions are serialized"
"""ptxas's performance warning (``Potential Performance Loss: wgmma.mma_async instructions are serialized due
to ...``)."""


def _find_ptxas() -> str:
    """The ptxas of the toolkit TileLang compiles with (its ``CUDA_HOME``, which it reads from the environment or
    derives from nvcc), else the one on ``PATH``."""
    from tilelang.env import (
        CUDA_HOME,  # no environment reads of our own: TileLang already resolved the toolkit
    )

    if CUDA_HOME:
        candidate = Path(CUDA_HOME) / "bin" / "ptxas"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("ptxas")
    if found is None:
        raise FileNotFoundError("ptxas not found (set CUDA_HOME or put the CUDA toolkit's bin on PATH)")
    return found


def _parse_ptxas(log: str) -> dict[str, _EntryUsage]:
    """Per-entry registers, spills and static shared memory from ``ptxas -v`` output."""
    usage: dict[str, _EntryUsage] = {}
    current: _EntryUsage | None = None
    for line in log.splitlines():
        if (match := _PTXAS_ENTRY.search(line)) or (match := _PTXAS_PROPERTIES.search(line)):
            current = usage.setdefault(match.group(1), _EntryUsage())
            continue
        if current is None:
            continue
        if match := _PTXAS_SPILLS.search(line):
            current.spill_bytes = int(match.group(1)) + int(match.group(2))
        if match := _PTXAS_USED.search(line):
            current.registers = int(match.group(1))
            if smem := _PTXAS_SMEM.search(line):
                current.static_smem_bytes = int(smem.group(1))
    return usage


def _entry_body(device_source: str, entry: str) -> str:
    """The CUDA source of ``entry``: every stretch from a declaration or definition of it to the next kernel's (the
    generated source declares each kernel before defining it); all of the source if ``entry`` is not found."""
    marks = list(_CUDA_ENTRY.finditer(device_source))
    ends = [mark.start() for mark in marks[1:]] + [len(device_source)]
    parts = [device_source[mark.start() : end] for mark, end in zip(marks, ends) if mark.group(1) == entry]
    return "".join(parts) if parts else device_source


def _dynamic_smem_bytes(host_source: str, entry: str, device_source: str) -> int:
    """The dynamic shared memory ``entry`` is launched with, read from TileLang's generated host code.

    TVM's host code (tvm_ffi backend) calls each device kernel through ``TVMFFIFunctionCall(<entry>_packed,
    stack_ffi_any, N, ...)``; its launch arguments end with the grid/block extents and, when the kernel declares
    ``extern __shared__`` memory, the dynamic shared memory size in bytes as the last argument
    (``stack_ffi_any[N-1].v_int64``). It is a literal for static tile shapes, which every builder here uses.
    """
    if "extern __shared__" not in _entry_body(device_source, entry):
        return 0
    launch = rf"TVMFFIFunctionCall\({re.escape(entry)}_packed,\s*\(TVMFFIAny\*\)\s*(\w+),\s*(\d+),"
    call = re.search(launch, host_source)
    if call is None:
        raise RuntimeError(f"no launch of {entry!r} found in the host source; cannot read its dynamic shared memory")
    stack, n_args = call.group(1), int(call.group(2))
    assignment = re.compile(rf"\b{re.escape(stack)}\)\[{n_args - 1}\]\.v_int64\) = ([^;]+);")
    values = assignment.findall(host_source[: call.start()])
    if not values:
        raise RuntimeError(f"launch of {entry!r}: no value for its last launch argument in the host source")
    literal = _HOST_INT_LITERAL.match(values[-1].replace(" ", ""))
    if literal is None:
        raise RuntimeError(f"launch of {entry!r}: dynamic shared memory is not a constant ({values[-1]!r})")
    return int(literal.group(1))


def _kernel_ptx(kernel: Any) -> str:
    """The PTX of a CUDA-compiled JITKernel (TileLang reruns nvcc on its source; ``export_ptx`` only logs errors)."""
    return kernel._get_ptx()  # noqa: SLF001 - private, but the public export_ptx swallows failures


def _run_ptxas(ptx: str, arch: str) -> str:
    """``ptxas -arch=<arch> -v`` on ``ptx`` in a temporary directory; returns its log."""
    with tempfile.TemporaryDirectory(prefix="dsa-ptxas-") as tmp:
        ptx_path = Path(tmp) / "kernel.ptx"
        ptx_path.write_text(ptx)
        result = subprocess.run(
            [_find_ptxas(), f"-arch={arch}", "-v", str(ptx_path), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
            check=False,
            cwd=tmp,
        )
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed ({result.returncode}):\n{log}")
    return log


def _ptxas_log(
    kernel: Any, device_source: str, arch: str, cache_dir: Path | None, captured: str | None = None
) -> str:
    """The ptxas report of ``kernel``, cached in ``cache_dir`` (when given) by the hash of its CUDA source and the
    ptxas binary.

    ``captured`` is ptxas's verbose output of the kernel's own nvcc compile (see :class:`_PtxasCapture`): when given
    it is the report, and it is written to the cache for later calls. Otherwise getting the PTX reruns nvcc (TileLang
    keeps only the cubin), which costs as much as the compile itself; the log depends only on the source and the
    toolchain, so a warm build tier (or a second tuning run) skips both.
    """
    ptxas = _find_ptxas()
    path: Path | None = None
    if cache_dir is not None:
        stamp = f"{ptxas}\0{Path(ptxas).stat().st_mtime_ns}\0{arch}\0{device_source}"
        path = Path(cache_dir) / f"{hashlib.sha256(stamp.encode()).hexdigest()}.log"
        if captured is None:
            try:
                return path.read_text()
            except OSError:
                pass
    log = _run_ptxas(_kernel_ptx(kernel), arch) if captured is None else captured
    if path is None:
        return log
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            tmp.write(log)
        os.replace(tmp.name, path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError as error:  # a read-only cache only costs time
        logger.debug("could not cache the ptxas report in %s: %s", path.parent, error)
    return log


class _PtxasCapture(logging.Filter):
    """Captures ptxas's verbose output of TileLang's own nvcc runs, per compiling thread.

    With TileLang's verbose flag on, its CUDA backend passes ``--ptxas-options=--verbose`` to nvcc and
    ``tilelang.contrib.nvcc`` logs the output on the package logger ``tilelang`` itself (``from tilelang import
    logger``; TileLang gives it its own console handler and turns propagation off). The flag is process-wide (read at
    each nvcc call), so it is switched on while any capture runs (a reference count under a lock; the old value comes
    back when the last capture ends) and this object, a filter on that logger, takes the ``PTXAS verbose output``
    record of each capturing thread. Compiles in other threads meanwhile also run nvcc verbose: their records are
    dropped like ours, so nothing reaches the console unless the user had asked for verbose output themselves; the
    ``-w`` TileLang adds with it changes no binary. :func:`get_kernel` passes the user's own verbose value to
    ``tilelang.compile`` (:meth:`user_verbose`) so the cache's chatter stays as the user set it. When TileLang's
    logger drops INFO records (e.g. the tuner's WARNING), its level goes to INFO during captures and its handlers get
    a filter that keeps the old threshold; a logger that propagates to other handlers is left alone and nothing is
    captured. A compile that captures nothing (a disk-cache hit) just takes the slow path.

    Side effects while a capture is open, on every thread's compiles: nvcc runs with ``-w`` (its warnings are not
    shown), and TileLang's CUDA binary cache stores such cubins under another key (its options differ; TileLang's
    kernel cache, whose key does not hold them, normally answers first). With the logger lowered to INFO, the
    handlers' filter also holds back INFO records of child loggers that set their own lower level.
    """

    _MESSAGES = ("NVCC compilation command: %s", "PTXAS verbose output:\n%s")  # tilelang.contrib.nvcc.compile_cuda
    _PTXAS_MESSAGE = _MESSAGES[1]

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._users = 0
        self._logs: dict[int, list[str]] = {}  # thread id -> its capture's logs; read unlocked by filter (GIL-atomic)
        self._undo: list[Callable[[], None]] = []
        self._user_verbose = False  # TileLang's verbose flag before the first capture
        self._pass_on = False  # whether nvcc's verbose records still reach TileLang's handlers (the user wants them)

    def user_verbose(self) -> bool:
        """TileLang's verbose flag as the user set it (not as a running capture forces it)."""
        from tilelang.env import env

        with self._lock:
            return self._user_verbose if self._users else env.get_default_verbose()

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[str]]:
        """Collects the ptxas logs of this thread's nvcc runs inside the block (into the yielded list)."""
        logs: list[str] = []
        me = threading.get_ident()
        with self._lock:
            if not self._users:
                try:
                    self._start()
                except Exception as error:  # noqa: BLE001 - TileLang's internals moved: capture nothing, never fail
                    logger.debug("cannot capture ptxas output from TileLang's compiles: %s", error)
                    self._stop()
            self._users += 1
            outer = self._logs.get(me)
            self._logs[me] = logs
        try:
            yield logs
        finally:
            with self._lock:
                if outer is None:
                    del self._logs[me]
                else:
                    self._logs[me] = outer
                self._users -= 1
                if not self._users:
                    self._stop()

    def _stop(self) -> None:
        """Undo what :meth:`_start` changed, last change first (under the lock)."""
        while self._undo:
            self._undo.pop()()

    def _start(self) -> None:
        """Turn the verbose flag on and route nvcc's records here (the first capture; under the lock)."""
        import tilelang  # noqa: F401 - importing it installs the "tilelang" logger's handler
        from tilelang.env import env

        tl_logger = logging.getLogger("tilelang")
        self._user_verbose = env.get_default_verbose()
        self._pass_on = self._user_verbose and tl_logger.isEnabledFor(logging.INFO)
        if not tl_logger.isEnabledFor(logging.INFO):
            if tl_logger.propagate or not tl_logger.handlers:
                return  # records below the old level would reach handlers we cannot filter: capture nothing
            old_level = tl_logger.getEffectiveLevel()

            def keeps_old_level(record: logging.LogRecord) -> bool:
                return record.levelno >= old_level

            for handler in list(tl_logger.handlers):
                handler.addFilter(keeps_old_level)
                self._undo.append(lambda handler=handler: handler.removeFilter(keeps_old_level))
            level = tl_logger.level
            tl_logger.setLevel(logging.INFO)
            self._undo.append(lambda: tl_logger.setLevel(level))
        tl_logger.addFilter(self)
        self._undo.append(lambda: tl_logger.removeFilter(self))
        if not self._user_verbose:
            # The descriptor's forced value (not os.environ): nvcc subprocesses and other readers keep their env.
            forced = vars(type(env))["TILELANG_DEFAULT_VERBOSE"]._forced_value  # None unless someone forced it
            env.TILELANG_DEFAULT_VERBOSE = "1"
            self._undo.append(lambda: setattr(env, "TILELANG_DEFAULT_VERBOSE", forced))

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep ``record`` from TileLang's handlers if it is nvcc verbose output the user did not ask for; take a
        capturing thread's ptxas log."""
        if record.msg not in self._MESSAGES:
            return True
        logs = self._logs.get(threading.get_ident())
        if logs is not None and record.msg == self._PTXAS_MESSAGE and record.args:
            logs.append(str(record.args[0]))
        return self._pass_on


_PTXAS_CAPTURE = _PtxasCapture()


def static_report(kernel: Any, *, arch: str = "sm_90a", cache_dir: Path | None = None) -> StaticReport:
    """Registers, spills, shared memory and matrix instructions of a kernel compiled for ``arch`` (max over entries).

    Exports the PTX, runs ``ptxas -arch=<arch> -v`` on it in a temporary directory (its log cached in ``cache_dir``
    when given), adds each entry's dynamic shared memory (from the generated host code, see ``_dynamic_smem_bytes``)
    to ptxas's static figure, and counts the matrix-instruction call sites of the CUDA source.
    """
    return _static_report(kernel, arch, cache_dir, ())


def _static_report(kernel: Any, arch: str, cache_dir: Path | None, captured: Sequence[str]) -> StaticReport:
    """:func:`static_report`, using the ``captured`` ptxas log when there is exactly one and it covers every entry of
    the kernel's CUDA source."""
    device_source = kernel.get_kernel_source()
    host_source = kernel.get_host_source() or ""
    wanted = set(_CUDA_ENTRY.findall(device_source))
    # Only a lone log is this kernel's for sure: kernels of one builder share their entry names, so a capture that
    # ever held two nvcc runs could not tell them apart (then the PTX is regenerated).
    ours = captured[0] if len(captured) == 1 and wanted and wanted <= _parse_ptxas(captured[0]).keys() else None
    log = _ptxas_log(kernel, device_source, arch, cache_dir, ours)
    usage = _parse_ptxas(log)
    if not usage:
        raise RuntimeError(f"no entry functions in the ptxas output:\n{log}")
    entries = set(_CUDA_ENTRY.findall(device_source)) or set(usage)
    smem = 0
    for name, entry in usage.items():
        dynamic = _dynamic_smem_bytes(host_source, name, device_source) if name in entries else 0
        smem = max(smem, entry.static_smem_bytes + dynamic)
    return StaticReport(
        registers=max(entry.registers for entry in usage.values()),
        spill_bytes=max(entry.spill_bytes for entry in usage.values()),
        smem_bytes=smem,
        mma=mma_call_sites(device_source),
        ptxas_log=log,
    )


def compile_cuda(
    builder: Callable[..., Any],
    *,
    target: dsl.Target = dsl.HOPPER_TARGET,
    report_cache_dir: Path | None = None,
    **params: Hashable,
) -> tuple[Any, StaticReport]:
    """Compile ``builder(**params)`` for a CUDA ``target`` (through :func:`get_kernel`) and return it with its static
    report (ptxas for the target's architecture; logs cached in ``report_cache_dir`` when given).

    When this call runs nvcc, the report comes from ptxas's verbose output of that run (:class:`_PtxasCapture`), the
    same figures :func:`static_report` gets by regenerating the PTX, about 2 s sooner per kernel."""
    # ptxas's verbose output of TileLang's own nvcc run (when this call compiles) spares static_report a second nvcc
    # run for the PTX; a kernel from TileLang's disk cache, or from this process, captures nothing and takes that path.
    with _PTXAS_CAPTURE.capture() as captured:
        kernel = get_kernel(builder, target=target, **params)
    return kernel, _static_report(kernel, dsl.arch_of(target).name, report_cache_dir, captured)


def compile_hopper(
    builder: Callable[..., Any], *, report_cache_dir: Path | None = None, **params: Hashable
) -> tuple[Any, StaticReport]:
    """:func:`compile_cuda` for sm_90a."""
    return compile_cuda(builder, target=dsl.HOPPER_TARGET, report_cache_dir=report_cache_dir, **params)
