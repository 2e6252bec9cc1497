"""Helpers that let one TileLang builder lower for both the C target (CPU tier) and sm_90a (build/GPU tiers).

The C target of TileLang 0.1.15 cannot hold ``alloc_shared``/``alloc_fragment`` buffers, cannot index local buffers
from ``T.Parallel`` loops and has no C type for ``bfloat16`` or ``float8``. Builders therefore

* allocate through :func:`allocators` (``shared``/``fragment``/``parallel`` map to ``alloc_local``/``alloc_local``/
  ``T.grid`` on the C target and to the real thing on CUDA),
* declare tensor dtypes through :func:`storage_dtype` (bf16 travels as ``uint16``, e4m3 as ``uint8`` on the C target;
  the launcher views torch tensors to match with :func:`tl_kernels.build.to_kernel_arg`),
* convert loaded elements with :func:`load_f32` and produce bf16 outputs with :func:`store_bf16`, which decode/encode
  the bits on the C target and are plain casts on CUDA.

Bit reinterpretation: ``T.reinterpret(value, dtype)`` (the 0.1.15 argument order; ``(dtype, value)`` is deprecated)
lowers on the C target to ``*(float *)(&v_)`` over a local temporary (checked bit-exactly against torch in
``tests/test_build_infra.py``: all 256 e4m3 codes, all 65536 bf16 codes, random and special float32 for rounding). The
codecs use integer shifts and ``T.reinterpret`` only; NaN is detected on the bits, not by float comparison, so they stay
correct under ``-ffast-math``.

Builder modules with ``from __future__ import annotations``: ``T.prim_func`` evaluates string annotations against the
kernel's globals plus the builder locals its *body* uses (its closure), so a local named only in an annotation (e.g. a
``dtype = dsl.storage_dtype(...)`` used only in ``T.Tensor(shape, dtype)``) raises ``NameError``. Avoid the future
import in builder modules, or make sure such names also appear in the body.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import tilelang.language as T
from tvm import tirx

__all__ = [
    "ARCHS",
    "CPU_TARGET",
    "HOPPER_SMEM_BYTES",
    "HOPPER_TARGET",
    "MMA_MMA_SYNC",
    "MMA_SYNC_WARP_M",
    "MMA_SYNC_WARP_N",
    "MMA_WGMMA",
    "PORTABLE_PASS_CONFIGS",
    "Allocators",
    "Arch",
    "Target",
    "allocators",
    "arch_of",
    "cuda_target",
    "first_valid_config",
    "is_cpu",
    "is_hopper",
    "mma_sync_warps_fit",
    "load_f32",
    "prim_func",
    "smem_limit_bytes",
    "static_target",
    "storage_dtype",
    "store_bf16",
    "with_pass_configs",
    "with_target_pass_configs",
]

CPU_TARGET: str = "c"
"""TileLang's C target: the grid becomes serial loops compiled by g++ (CPU tier)."""

HOPPER_TARGET: dict[str, str] = {"kind": "cuda", "arch": "sm_90a"}
"""sm_90a (not sm_90): nvcc rejects TileLang's ``warpgroup_reg_alloc`` without the ``a`` features."""

HOPPER_SMEM_BYTES: int = 227 * 1024
"""Most shared memory one H100/H200/H800/H20 thread block may use (static plus the dynamic opt-in)."""

MMA_WGMMA = "wgmma"
"""Hopper's asynchronous warpgroup MMA (``tl::wgmma_ss`` / ``tl::wgmma_rs`` in TileLang's CUDA source)."""
MMA_MMA_SYNC = "mma_sync"
"""The synchronous warp MMA of Ampere and later (``tl::mma_sync``): what every GEMM of a portable schedule becomes."""


@dataclass(frozen=True)
class Arch:
    """What the kernels need to know of one CUDA architecture they are built for.

    Attributes:
        name: the nvcc architecture, e.g. ``"sm_90a"``.
        smem_bytes: the most shared memory one thread block may use (static plus the dynamic opt-in).
        hopper: the Hopper schedule (wgmma, TMA, ``setmaxnreg``, warp specialisation; sm_90a only) rather than the
            portable one (``T.gemm`` lowered to mma.sync; cp.async gathers where TileLang pipelines them; none of
            those features).
        fp8_mma: whether the architecture has FP8 (e4m3) matrix instructions; without them FP8 inputs are converted
            to bf16 in the kernel before the MMA (CUTLASS's SM89 FP8 MMA compiles for sm_80/sm_86 but traps there).
    """

    name: str
    smem_bytes: int
    hopper: bool
    fp8_mma: bool

    @property
    def mma(self) -> str:
        """The matrix instruction every GEMM of the schedule must use."""
        return MMA_WGMMA if self.hopper else MMA_MMA_SYNC


ARCHS: dict[str, Arch] = {
    arch.name: arch
    for arch in (
        Arch("sm_90a", HOPPER_SMEM_BYTES, hopper=True, fp8_mma=True),
        # The portable schedule built for Hopper without the `a` features: how one H200 checks the portable kernels.
        Arch("sm_90", HOPPER_SMEM_BYTES, hopper=False, fp8_mma=True),
        Arch("sm_80", 163 * 1024, hopper=False, fp8_mma=False),
        Arch("sm_86", 99 * 1024, hopper=False, fp8_mma=False),
        Arch("sm_89", 99 * 1024, hopper=False, fp8_mma=True),
        Arch("sm_100a", 227 * 1024, hopper=False, fp8_mma=True),
        Arch("sm_103a", 227 * 1024, hopper=False, fp8_mma=True),
        Arch("sm_120", 99 * 1024, hopper=False, fp8_mma=True),
    )
}
"""Every CUDA architecture the kernels are built for, by nvcc name."""

PORTABLE_PASS_CONFIGS: dict[str, bool] = {
    # TileLang lowers a GEMM of 64 rows to wgmma on sm_90 as on sm_90a: the portable schedule asks for mma.sync.
    "tl.disable_wgmma": True,
    "tl.disable_tma_lower": True,
    "tl.disable_warp_specialized": True,
}
"""Pass configs of every portable-schedule kernel: no wgmma, no TMA, no automatic warp specialisation."""


MMA_SYNC_WARP_M = 16
"""Rows of the tile one warp's mma.sync computes (TileLang needs each warp to own a multiple of it)."""
MMA_SYNC_WARP_N = 8
"""Columns of the tile one warp's mma.sync computes."""
WARP_THREADS = 32


def mma_sync_warps_fit(m: int, n: int, threads: int) -> bool:
    """Whether TileLang can split an ``m x n`` GEMM over the ``threads / 32`` warps of a block on the portable
    schedule: some split into ``rows x cols`` warps gives each a multiple of 16 rows and 8 columns (otherwise its
    layout inference fails with "No valid warp partition for T.gemm")."""
    warps = threads // WARP_THREADS
    return any(
        warps % rows == 0 and m % (MMA_SYNC_WARP_M * rows) == 0 and n % (MMA_SYNC_WARP_N * (warps // rows)) == 0
        for rows in range(1, warps + 1)
    )


def cuda_target(arch: str) -> dict[str, str]:
    """The target dict of a CUDA architecture of :data:`ARCHS` (``ValueError`` names the known ones)."""
    if arch not in ARCHS:
        raise ValueError(f"no kernels are built for {arch!r}; known architectures: {', '.join(ARCHS)}")
    return {"kind": "cuda", "arch": arch}


PASS_CONFIGS_ATTR = "dsa.pass_configs"
"""PrimFunc attribute through which a builder asks ``tl_kernels.build.get_kernel`` for TileLang pass configs."""

Target = Any
"""``"c"``, a target dict such as :data:`HOPPER_TARGET`, or a ``tvm.target.Target``."""

# Target kinds that mean "runs on the host CPU". llvm is listed for completeness (the 0.1.15 wheel has no LLVM).
_CPU_KINDS = frozenset({"c", "llvm"})

_BF16_NAMES = frozenset({"bfloat16", "bf16"})
_E4M3_NAMES = frozenset({"float8_e4m3fn", "float8_e4m3"})
_BF16_STORAGE = "uint16"
_E4M3_STORAGE = "uint8"

# Bit layout constants of the formats decoded/encoded on the C target.
_F32_EXPONENT_BIAS = 127
_F32_MANTISSA_BITS = 23
_F32_SIGN_BIT = 31
_BF16_SHIFT = 16  # bf16 is the upper half of a float32
_BF16_QUIET_NAN = 0x7FC0
_BF16_SIGN_MASK = 0x8000
_BF16_ROUND_BIAS = 0x7FFF  # plus the lowest kept bit gives round-to-nearest-even
_F32_ABS_MASK = 0x7FFFFFFF
_F32_INF_BITS = 0x7F800000
_E4M3_EXPONENT_BIAS = 7
_E4M3_MANTISSA_BITS = 3
_E4M3_EXPONENT_MASK = 0xF
_E4M3_MANTISSA_MASK = 0x7
_E4M3_ABS_MASK = 0x7F
_E4M3_NAN_ABS = 0x7F  # e4m3fn has no infinities; S.1111.111 is its only NaN
_E4M3_SIGN_BIT = 7
# A subnormal e4m3 value is mantissa * 2^(1 - bias - mantissa_bits) = mantissa * 2^-9 (exact in float32).
_E4M3_SUBNORMAL_SCALE = 2.0 ** (1 - _E4M3_EXPONENT_BIAS - _E4M3_MANTISSA_BITS)


def _target_kind(target: Target) -> str:
    """The target's kind name (``"c"``, ``"cuda"``, ...)."""
    if isinstance(target, str):
        # "c" or a JSON-free kind name; CLI strings such as "cuda -arch=..." are rejected by TileLang anyway.
        return target.split()[0].strip().lower()
    if isinstance(target, Mapping):
        return str(target["kind"]).lower()
    kind = getattr(target, "kind", None)
    if kind is not None:  # tvm.target.Target
        return str(getattr(kind, "name", kind)).lower()
    raise TypeError(f"unsupported target {target!r}: expected 'c', a dict with 'kind', or a tvm.target.Target")


def is_cpu(target: Target) -> bool:
    """Whether ``target`` lowers to host C code (the CPU tier) rather than CUDA."""
    return _target_kind(target) in _CPU_KINDS


def arch_of(target: Target) -> Arch:
    """The :class:`Arch` of a CUDA target (a dict with ``arch``, or a ``tvm.target.Target``); ``ValueError`` for the
    C target or an architecture no kernel is built for."""
    if is_cpu(target):
        raise ValueError("the C target has no CUDA architecture")
    if isinstance(target, Mapping):
        name = str(target.get("arch", ""))
    else:
        name = str(getattr(target, "arch", "") or "")
    if name not in ARCHS:
        raise ValueError(f"no kernels are built for CUDA architecture {name!r}; known: {', '.join(ARCHS)}")
    return ARCHS[name]


def smem_limit_bytes(target: Target) -> int | None:
    """The most shared memory one thread block may use on a CUDA ``target``; ``None`` for the C target (no limit)."""
    return None if is_cpu(target) else arch_of(target).smem_bytes


def static_target(static: Mapping[str, Any]) -> Target:
    """The target a kernel module's ``check_config``/``default_config`` checks for: ``static["target"]``, sm_90a when
    absent (the tuning spaces are Hopper's)."""
    return static.get("target", HOPPER_TARGET)


def is_hopper(target: Target) -> bool:
    """Whether ``target`` gets the Hopper schedule (sm_90a): wgmma, TMA, ``setmaxnreg``. The C target and every other
    CUDA architecture get the plain loop / the portable schedule."""
    return not is_cpu(target) and arch_of(target).hopper


class Allocators:
    """Buffer allocation and parallel loops that lower on both targets.

    On CUDA: ``shared`` -> ``T.alloc_shared``, ``fragment`` -> ``T.alloc_fragment``, ``parallel`` -> ``T.Parallel``.
    On the C target: ``shared``/``fragment`` -> ``T.alloc_local`` (the C target supports one ``alloc_shared`` at most
    and no fragments) and ``parallel`` -> ``T.grid`` (``T.Parallel`` cannot index local buffers there).
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self.cpu = is_cpu(target)

    def shared(self, shape: Any, dtype: str, **kwargs: Any) -> tirx.Buffer:
        """A shared-memory tile on CUDA (``kwargs`` such as ``scope`` pass through there), a local array on CPU."""
        if self.cpu:
            return T.alloc_local(shape, dtype)
        return T.alloc_shared(shape, dtype, **kwargs)

    def fragment(self, shape: Any, dtype: str) -> tirx.Buffer:
        """A register fragment on CUDA, a local array on CPU."""
        if self.cpu:
            return T.alloc_local(shape, dtype)
        return T.alloc_fragment(shape, dtype)

    def local(self, shape: Any, dtype: str) -> tirx.Buffer:
        """A per-thread local array on both targets."""
        return T.alloc_local(shape, dtype)

    def parallel(self, *extents: Any, **kwargs: Any) -> Any:
        """A ``T.Parallel`` loop nest on CUDA (``kwargs`` such as ``coalesced_width`` pass through there), a serial
        ``T.grid`` nest on CPU (use as ``for i, j in ...``)."""
        if self.cpu:
            return T.grid(*extents)
        return T.Parallel(*extents, **kwargs)


def allocators(target: Target) -> Allocators:
    """The :class:`Allocators` for ``target``."""
    return Allocators(target)


def first_valid_config(
    check_config: Callable[[Mapping[str, Any], Any], None],
    static: Mapping[str, Any],
    candidates: Iterable[Any],
    *,
    kernel: str | None = None,
) -> Any:
    """The first of ``candidates`` that ``check_config(static, config)`` accepts (a kernel module's default-config
    ladder: later candidates need less shared memory); raises the last rejection's ``ValueError`` when none fits,
    with ``kernel`` given as ``"no <kernel> config fits <static>: <rejection>"``."""
    try:
        return _first_valid_config(check_config, static, candidates)
    except ValueError as exc:
        if kernel is None:
            raise
        raise ValueError(f"no {kernel} config fits {static}: {exc}") from None


def _first_valid_config(
    check_config: Callable[[Mapping[str, Any], Any], None], static: Mapping[str, Any], candidates: Iterable[Any]
) -> Any:
    error: ValueError | None = None
    for config in candidates:
        try:
            check_config(static, config)
        except ValueError as exc:
            error = exc
            continue
        return config
    raise error if error is not None else ValueError("no candidate configs")


def with_pass_configs(func: tirx.PrimFunc, pass_configs: Mapping[str, Any]) -> tirx.PrimFunc:
    """``func`` carrying ``pass_configs`` that ``tl_kernels.build.get_kernel`` passes to ``tilelang.compile``.

    Builders return ``dsl.with_pass_configs(main, {"tl.disable_warp_specialized": True})`` instead of ``main``.
    """
    return func.with_attr(PASS_CONFIGS_ATTR, {str(k): v for k, v in pass_configs.items()})


def prim_func(fn: Callable[..., None], name: str, **params: Any) -> tirx.PrimFunc:
    """``fn`` as the ``T.prim_func`` named ``name`` whose parameters are the ``params`` (parameter name -> its
    ``T.Tensor(...)`` annotation) that are not None, in ``fn``'s own parameter order; ``fn`` sees None for the others.

    One def then serves every signature of a kernel whose tensors are optional (k_scale for FP8 only, starts/ends in
    range mode only, a block table when paged): TileLang reads a prim_func's parameters from its def, so otherwise
    each signature needs a def of its own, all calling the same body. Every parameter of ``fn`` must default to None
    (the absent ones are never passed); ``name`` becomes the kernel's name in the generated source.
    """
    names = list(inspect.signature(fn).parameters)
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise ValueError(f"dsl.prim_func({name}): params {unknown} are not parameters of {fn.__name__}{names}")
    fn.__name__ = fn.__qualname__ = name
    fn.__annotations__ = {key: params[key] for key in names if params.get(key) is not None}
    return T.prim_func(fn)


def with_target_pass_configs(
    func: tirx.PrimFunc, target: Target, pass_configs: Mapping[str, Any] | None = None
) -> tirx.PrimFunc:
    """``func`` as a builder returns it for ``target``: unchanged on the C target; on CUDA carrying ``pass_configs``,
    plus :data:`PORTABLE_PASS_CONFIGS` on every architecture but sm_90a (the portable schedule)."""
    if is_cpu(target):
        return func
    configs = dict(pass_configs or {})
    if not is_hopper(target):
        configs.update(PORTABLE_PASS_CONFIGS)
    return with_pass_configs(func, configs)


def _canonical_dtype(dtype: Any) -> str:
    """A dtype name as a plain string (accepts ``str``, ``tvm.DataType`` or ``torch.dtype``)."""
    name = str(dtype)
    return name.removeprefix("torch.")


def storage_dtype(dtype: Any, target: Target) -> str:
    """How a tensor of logical ``dtype`` is declared in the kernel signature for ``target``.

    On the C target ``bfloat16 -> uint16`` and ``float8_e4m3fn``/``float8_e4m3 -> uint8`` (no C type exists for
    them); everything else, and every dtype on CUDA, is unchanged.
    """
    name = _canonical_dtype(dtype)
    if is_cpu(target):
        if name in _BF16_NAMES:
            return _BF16_STORAGE
        if name in _E4M3_NAMES:
            return _E4M3_STORAGE
    return name


def _decode_bf16_bits(bits: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 from the 16 bf16 bits in ``bits`` (a ``uint16`` expression): the bits are the float32's upper half."""
    widened = T.shift_left(T.Cast("uint32", bits), T.uint32(_BF16_SHIFT))
    return T.reinterpret(widened, "float32")


def _decode_e4m3_bits(bits: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 from the 8 float8_e4m3fn bits in ``bits`` (a ``uint8`` expression), exactly.

    Normal numbers rebias the 4-bit exponent (bias 7 -> 127) and widen the 3-bit mantissa; subnormals are
    ``mantissa * 2^-9``; ``S.1111.111`` is NaN (e4m3fn has no infinities). The sign is ORed in as a bit, so
    ``0x80`` decodes to ``-0.0``.
    """
    code = T.Cast("uint32", bits)
    exponent = T.bitwise_and(T.shift_right(code, T.uint32(_E4M3_MANTISSA_BITS)), T.uint32(_E4M3_EXPONENT_MASK))
    mantissa = T.bitwise_and(code, T.uint32(_E4M3_MANTISSA_MASK))
    sign = T.shift_left(T.shift_right(code, T.uint32(_E4M3_SIGN_BIT)), T.uint32(_F32_SIGN_BIT))
    normal_bits = T.bitwise_or(
        T.shift_left(exponent + T.uint32(_F32_EXPONENT_BIAS - _E4M3_EXPONENT_BIAS), T.uint32(_F32_MANTISSA_BITS)),
        T.shift_left(mantissa, T.uint32(_F32_MANTISSA_BITS - _E4M3_MANTISSA_BITS)),
    )
    subnormal = T.Cast("float32", mantissa) * T.float32(_E4M3_SUBNORMAL_SCALE)
    magnitude_bits = T.if_then_else(
        T.bitwise_and(code, T.uint32(_E4M3_ABS_MASK)) == T.uint32(_E4M3_NAN_ABS),
        T.uint32(_BF16_QUIET_NAN << _BF16_SHIFT),
        T.if_then_else(exponent == T.uint32(0), T.reinterpret(subnormal, "uint32"), normal_bits),
    )
    return T.reinterpret(T.bitwise_or(magnitude_bits, sign), "float32")


def load_f32(value: tirx.PrimExpr, dtype: Any, target: Target) -> tirx.PrimExpr:
    """float32 of one loaded element whose logical dtype is ``dtype``, carried in ``storage_dtype(dtype, target)``.

    On the C target bf16 (``uint16`` bits) and e4m3 (``uint8`` bits) are decoded bit-exactly; other dtypes, and every
    dtype on CUDA, are cast. ``value`` may appear more than once in the returned expression (the compiler CSEs the
    loads), so pass a load or a local, not an expression with side effects such as an atomic.
    """
    name = _canonical_dtype(dtype)
    if is_cpu(target):
        if name in _BF16_NAMES:
            return _decode_bf16_bits(value)
        if name in _E4M3_NAMES:
            return _decode_e4m3_bits(value)
    return T.Cast("float32", value)


def load_tile(value: tirx.PrimExpr, dtype: Any, target: Target) -> tirx.PrimExpr:
    """One loaded element as a shared/fragment tile holds it: decoded float32 on the C target (whose GEMM has no bf16 or
    FP8), the input dtype itself on CUDA (a plain global -> shared copy, which the pipeliner can turn into cp.async)."""
    return load_f32(value, dtype, target) if is_cpu(target) else value


def store_bf16(value_f32: tirx.PrimExpr, target: Target) -> tirx.PrimExpr:
    """The storage form of ``bfloat16(value_f32)``: ``uint16`` bits on the C target, a ``bfloat16`` cast on CUDA.

    Rounds to nearest even (ties to the even bf16), overflows to +-inf like torch, and keeps NaN a (quiet) NaN:
    without the NaN branch the rounding bias could carry a NaN payload into the exponent and produce inf.
    """
    if not is_cpu(target):
        return T.Cast("bfloat16", value_f32)
    bits = T.reinterpret(T.Cast("float32", value_f32), "uint32")
    is_nan = T.bitwise_and(bits, T.uint32(_F32_ABS_MASK)) > T.uint32(_F32_INF_BITS)
    lowest_kept = T.bitwise_and(T.shift_right(bits, T.uint32(_BF16_SHIFT)), T.uint32(1))
    rounded = T.shift_right(bits + T.uint32(_BF16_ROUND_BIAS) + lowest_kept, T.uint32(_BF16_SHIFT))
    sign = T.bitwise_and(T.shift_right(bits, T.uint32(_BF16_SHIFT)), T.uint32(_BF16_SIGN_MASK))
    nan_bits = T.bitwise_or(sign, T.uint32(_BF16_QUIET_NAN))
    return T.Cast(_BF16_STORAGE, T.if_then_else(is_nan, nan_bits, rounded))
