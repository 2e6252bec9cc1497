"""Search spaces and tuning presets of the DSA kernels.

A kernel's name is the name of its builder module and of its launcher: kernel ``indexer`` is built by
``tl_kernels.indexer`` and launched by ``dsa.launch.indexer``; the tuner, the config cache, the benchmark and both
command lines use the same names. Each kernel module follows one convention:

* ``build(*, <static params>, <config fields>, target)`` returns a ``T.prim_func``;
* ``Config``: a frozen dataclass of the tunable fields with their defaults;
* ``TUNING_SPACE: dict[str, tuple]``: candidate values per ``Config`` field on sm_90a, and optionally
  ``PORTABLE_TUNING_SPACE`` for the portable schedule (every other CUDA architecture; :func:`tuning_space`);
* ``check_config(static: dict, config: Config) -> None`` raises ``ValueError`` for an invalid combination;
* ``default_config(static: dict) -> Config`` works for every shape.

This module maps kernel names to those modules (imported lazily), enumerates candidate configs, and holds the tuning
presets: for each kernel a list of :class:`Case` s, i.e. one set of static parameters (compiled once: runtime sizes
are symbolic) and the runtime size points at which it is timed and stored in the cache.

Size names (what launchers pass to :func:`autotune.lookup.select.config_for` as ``sizes``): every prefill/training
kernel uses ``batch``, ``seq_len`` (S, queries) and ``seq_len_kv`` (S_kv, keys); ``sparse_mla_fwd``, whose top-k is a
runtime size, also ``topk`` (the ``k`` of ``indices [B, S, k]``); the decode attention ``sparse_mla_decode`` uses
``batch``, ``s_q`` and ``topk`` (:mod:`autotune.lookup.decode`, which also holds the decode presets: the paged
selection's are ``index_topk`` cases). See :func:`size_names`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any


KERNEL_NAMES: tuple[str, ...] = ("indexer", "topk", "index_topk", "sparse_mla_fwd", "sparse_mla_bwd")
"""The prefill/training kernels (one problem shape: ``B x S`` queries over ``S_kv`` keys)."""
DECODE_KERNEL_NAMES: tuple[str, ...] = ("sparse_mla_decode",)
"""The decode attention over a paged cache (its own size names; the decode selection is ``index_topk``'s paged
variant, tuned as ``index_topk`` cases)."""
TUNED_KERNEL_NAMES: tuple[str, ...] = KERNEL_NAMES + DECODE_KERNEL_NAMES
"""Every built-in tuner kernel: what ``dsa-autotune --kernels all`` tunes."""
SIZE_NAMES: tuple[str, ...] = ("batch", "seq_len", "seq_len_kv")
# The default target candidates are checked for: kernel modules apply an architecture's constraints from
# ``static["target"]`` (the dict form of ``tl_kernels.dsl.HOPPER_TARGET``, repeated here to keep this import light).
HOPPER_TARGET: dict[str, str] = {"kind": "cuda", "arch": "sm_90a"}
_HOPPER_ARCH = HOPPER_TARGET["arch"]
PRESETS: tuple[str, ...] = ("deepseek-v3.2", "deepseek-v4", "tiny")
# The pruned ("default") space: the default config plus at most this many one-field neighbours per static case, so
# that the default run of all five kernels compiles in a few minutes on 2 cores.
PRUNED_NEIGHBOURS = 3
# Sequence lengths of the deepseek-v3.2 preset: 4K .. 64K tokens, prefill/training with S == S_kv.
DEEPSEEK_SEQ_LENS: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536)
TINY_SEQ_LENS: tuple[int, ...] = (256, 1024)
V4_CSA_RATE = 4
"""DeepSeek-V4's CSA layers select among one compressed entry per 4 tokens: the selection kernels and the sparse
attention over the entries see ``S_kv = S / 4``."""
V4_HCA_RATE = 128
"""DeepSeek-V4's HCA layers attend to every compressed entry, one per 128 tokens (no selection kernel)."""
V4_MODELS: tuple[tuple[int, int], ...] = ((64, 512), (128, 1024))
"""(query heads, top-k) of V4-Flash and V4-Pro."""

Static = dict[str, Any]
Sizes = dict[str, int]


@dataclass(frozen=True)
class KernelSpec:
    """How the tuner finds and measures one kernel.

    Attributes:
        name: the kernel's name in the cache, reports and ``--kernels``.
        module: dotted path of the builder module (imported on first use).
        flops: useful floating-point operations of one call at ``(static, sizes)`` for a kernel registered at run
            time (a test's fake kernel); ``None`` for the built-in kernels, whose counts the tuner takes from the
            measurement package (:func:`benchmarks.flops.call_flops`: this lookup room sits below it).
        has_gemm: whether the kernel does its math in matrix instructions, so that every GEMM must use the
            target's MMA (wgmma on sm_90a, mma.sync elsewhere) for a candidate to pass its static check.
        size_names: the runtime sizes that key the cache (what launchers pass as ``sizes``).
        compile_fn: ``"module:function"`` that compiles ``build`` for a CUDA ``target=`` and returns
            ``(kernel, StaticReport)`` (tests substitute a fake).
        screen: ``"module:function"`` taking ``(static, config dict, target or None)`` that raises ``ValueError`` for
            a candidate not worth compiling beyond what ``check_config`` rejects (a repeat of another, or one that
            cannot fit an SM by the kernel's own resource figures); ``None``: none.
        variants: extra static parameters each candidate is also compiled with (other kernels of the same builder
            that a launcher runs with the same config); its static report is the worst of all of them.
    """

    name: str
    module: str
    flops: Callable[[Static, Sizes], float | None] | None = None
    has_gemm: bool = True
    size_names: tuple[str, ...] = SIZE_NAMES
    compile_fn: str = "tl_kernels.build:compile_cuda"
    screen: str | None = None
    variants: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Case:
    """One compile-time parameter set of a kernel and the runtime sizes at which it is tuned.

    Attributes:
        kernel: kernel name.
        static: the compile-time (non-config) keyword arguments of the module's ``build``.
        sizes: size points (``batch``, ``seq_len``, ``seq_len_kv``) timed on a GPU and stored as cache buckets.
        check_sizes: the (small) size point at which every candidate is checked against ``dsa.reference``.
    """

    kernel: str
    static: Static
    sizes: tuple[Sizes, ...]
    check_sizes: Sizes = field(default_factory=dict)


_BUILTIN_SPECS: dict[str, KernelSpec] = {
    "indexer": KernelSpec("indexer", "tl_kernels.indexer"),
    "topk": KernelSpec("topk", "tl_kernels.topk", has_gemm=False),
    "index_topk": KernelSpec("index_topk", "tl_kernels.index_topk"),
    "sparse_mla_fwd": KernelSpec("sparse_mla_fwd", "tl_kernels.sparse_mla_fwd", size_names=(*SIZE_NAMES, "topk")),
    "sparse_mla_bwd": KernelSpec("sparse_mla_bwd", "tl_kernels.sparse_mla_bwd"),
    "sparse_mla_decode": KernelSpec(
        "sparse_mla_decode", "tl_kernels.sparse_mla_decode", size_names=("batch", "s_q", "topk"),
        screen="autotune.lookup.decode:screen", variants=({"direct": True},),
    ),
}
_specs: dict[str, KernelSpec] = dict(_BUILTIN_SPECS)
# Extra presets registered at run time (tests register a fake kernel's cases here): preset -> kernel -> cases.
_extra_cases: dict[str, dict[str, list[Case]]] = {}


def register_kernel(spec: KernelSpec, cases: Mapping[str, list[Case]] | None = None) -> None:
    """Add (or replace) a kernel, with optional cases per preset name. Used by tests to plug in a fake kernel."""
    _specs[spec.name] = spec
    for preset, kernel_cases in (cases or {}).items():
        _extra_cases.setdefault(preset, {})[spec.name] = list(kernel_cases)


def unregister_kernel(name: str) -> None:
    """Undo :func:`register_kernel` (built-in kernels revert to their built-in spec)."""
    _specs.pop(name, None)
    if name in _BUILTIN_SPECS:
        _specs[name] = _BUILTIN_SPECS[name]
    for per_preset in _extra_cases.values():
        per_preset.pop(name, None)


def spec(kernel: str) -> KernelSpec:
    """The :class:`KernelSpec` of ``kernel``; ``ValueError`` for an unknown name."""
    try:
        return _specs[kernel]
    except KeyError:
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(known_kernels())}") from None


def known_kernels() -> tuple[str, ...]:
    """Every kernel name: the built-in tuner kernels first (:data:`TUNED_KERNEL_NAMES`), then any registered ones."""
    return TUNED_KERNEL_NAMES + tuple(name for name in _specs if name not in TUNED_KERNEL_NAMES)


def kernel_module(kernel: str) -> ModuleType:
    """The builder module of ``kernel`` (imported on first use; ``ImportError`` while it does not exist)."""
    return importlib.import_module(spec(kernel).module)


# ----------------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------------
def size_names(kernel: str) -> tuple[str, ...]:
    """The runtime sizes that key ``kernel``'s cache entries (launchers pass exactly these to ``config_for``)."""
    return spec(kernel).size_names


def config_fields(kernel: str) -> tuple[str, ...]:
    """Names of the tunable fields of ``kernel`` (its ``Config`` dataclass)."""
    return tuple(f.name for f in dataclasses.fields(kernel_module(kernel).Config))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A ``Config`` instance as a plain dict of its fields."""
    return dataclasses.asdict(config)


def _checked_static(static: Static, target: Any) -> Static:
    # Kernel modules enable their CUDA-only constraints (MMA tile multiples, shared memory) from static["target"].
    return {**static, "target": target or HOPPER_TARGET}


def is_hopper_target(target: Mapping[str, Any] | None) -> bool:
    """Whether ``target`` (``None``: sm_90a) gets the Hopper schedule and its :data:`TUNING_SPACE`."""
    return target is None or target.get("arch") == _HOPPER_ARCH


def tuning_space(module: ModuleType, target: Mapping[str, Any] | None = None) -> Mapping[str, tuple[Any, ...]]:
    """The candidate values per field of a kernel module for ``target``: ``TUNING_SPACE`` on sm_90a,
    ``PORTABLE_TUNING_SPACE`` (when the module has one) on every other architecture."""
    if is_hopper_target(target):
        return module.TUNING_SPACE
    return getattr(module, "PORTABLE_TUNING_SPACE", module.TUNING_SPACE)


def make_config(kernel: str, static: Static, config: Mapping[str, Any], *, target: Any = None) -> Any:
    """Turn a config dict into the module's ``Config`` and check it for ``target`` (default: sm_90a).

    Raises:
        ValueError: when the keys are not exactly the ``Config`` fields or ``check_config`` rejects the combination.
    """
    return checked_config(kernel_module(kernel), static, config, target=target)


def checked_config(module: ModuleType, static: Static, config: Mapping[str, Any], *, target: Any = None) -> Any:
    """:func:`make_config` for a kernel module at hand (no registry lookup: usable in worker processes)."""
    fields = {f.name for f in dataclasses.fields(module.Config)}
    if set(config) != fields:
        raise ValueError(f"{module.__name__}: config keys {sorted(config)} do not match Config fields {sorted(fields)}")
    cfg = module.Config(**config)
    module.check_config(_checked_static(static, target), cfg)
    return cfg


def default_config(kernel: str, static: Static, *, target: Any = None) -> dict[str, Any]:
    """The module's ``default_config`` for ``static`` on ``target`` (default: sm_90a) as a dict."""
    return config_to_dict(kernel_module(kernel).default_config(_checked_static(static, target)))


def resolve(path: str) -> Callable[..., Any]:
    """The function ``"module:function"`` names (a spec's ``compile_fn`` or ``screen``), its module imported."""
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def screen_candidate(kernel: str, static: Static, config: Mapping[str, Any], *, target: Any = None) -> None:
    """Raise ``ValueError`` when ``config`` is not worth compiling for ``static`` on ``target`` (default: sm_90a):
    the kernel module's ``check_config`` rejects it, or the spec's ``screen`` does (:class:`KernelSpec`)."""
    module = kernel_module(kernel)
    module.check_config(_checked_static(static, target), module.Config(**config))
    screen = spec(kernel).screen
    if screen is not None:
        resolve(screen)(static, dict(config), target)


def _is_valid(kernel: str, static: Static, config: Mapping[str, Any], target: Any) -> bool:
    try:
        screen_candidate(kernel, static, config, target=target)
    except ValueError:
        return False
    return True


def full_space(kernel: str, static: Static, *, target: Any = None) -> list[dict[str, Any]]:
    """Every combination of :func:`tuning_space` that ``check_config`` accepts for ``target`` (default: sm_90a),
    the default config first."""
    module = kernel_module(kernel)
    space = tuning_space(module, target)
    default = config_to_dict(module.default_config(_checked_static(static, target)))
    names = list(space)
    out = [default]
    seen = {json.dumps(default, sort_keys=True)}
    for values in itertools.product(*(space[name] for name in names)):
        candidate = {**default, **dict(zip(names, values))}
        key = json.dumps(candidate, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        if _is_valid(kernel, static, candidate, target):
            out.append(candidate)
    return out


def pruned_space(
    kernel: str, static: Static, *, neighbours: int = PRUNED_NEIGHBOURS, target: Any = None
) -> list[dict[str, Any]]:
    """The default config, the module's ``TUNING_PRESETS`` (whole alternative schedules; ``PORTABLE_TUNING_PRESETS``
    off sm_90a), plus up to ``neighbours`` valid configs that differ from the default in one field, all for
    ``target`` (default: sm_90a).

    Neighbours are taken round-robin over the fields in :func:`tuning_space` order, the values nearest to the
    default's (by position in the candidate tuple) first, so every tunable dimension gets probed before any gets a
    second step. The default is always kept (even if ``check_config`` would reject it, the compile phase then reports
    why).
    """
    module = kernel_module(kernel)
    space = tuning_space(module, target)
    default = config_to_dict(module.default_config(_checked_static(static, target)))
    per_field: list[list[dict[str, Any]]] = []
    for name, values in space.items():
        values = tuple(values)
        anchor = values.index(default[name]) if default[name] in values else 0
        ordered = sorted(range(len(values)), key=lambda i: (abs(i - anchor), i))
        per_field.append([{**default, name: values[i]} for i in ordered if values[i] != default[name]])
    out = [default]
    seen = {json.dumps(default, sort_keys=True)}
    # Whole alternative schedules differ from the default in several coupled fields at once (e.g. a warp-specialised
    # forward needs its own block size and thread count), which one-field steps never reach: a module lists them.
    presets = getattr(module, "TUNING_PRESETS" if is_hopper_target(target) else "PORTABLE_TUNING_PRESETS", ())
    for preset in presets:
        candidate = {**default, **preset}
        key = json.dumps(candidate, sort_keys=True)
        if key not in seen and _is_valid(kernel, static, candidate, target):
            seen.add(key)
            out.append(candidate)
    for step in itertools.zip_longest(*per_field):
        for candidate in step:
            if candidate is None or len(out) > neighbours:
                continue
            key = json.dumps(candidate, sort_keys=True)
            if key not in seen and _is_valid(kernel, static, candidate, target):
                seen.add(key)
                out.append(candidate)
    return out


def candidates(
    kernel: str, static: Static, *, full: bool = False, defaults_only: bool = False, target: Any = None
) -> list[dict[str, Any]]:
    """Candidate configs of ``kernel`` at ``static`` for ``target`` (default: sm_90a): the pruned space, with
    ``full`` the whole valid space, with ``defaults_only`` the default config alone."""
    if defaults_only:
        return [default_config(kernel, static, target=target)]
    if full:
        return full_space(kernel, static, target=target)
    return pruned_space(kernel, static, target=target)


def check_static(kernel: str, static: Static) -> None:
    """Raise ``ValueError`` when ``static`` names a parameter ``build`` does not take, or a config field."""
    params = inspect.signature(kernel_module(kernel).build).parameters
    clash = sorted(set(static) & (set(config_fields(kernel)) | {"target"}))
    if clash:
        raise ValueError(f"{kernel}: static parameters {clash} are config fields or the target")
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted((set(static) | {name for variant in spec(kernel).variants for name in variant}) - set(params))
    if unknown:
        raise ValueError(f"{kernel}: build() takes no parameter(s) {unknown}")


# ----------------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------------
def _points(seq_lens: tuple[int, ...], *, batch: int = 1, **extra: int) -> tuple[Sizes, ...]:
    """Square (S == S_kv, prefill/training) size points, with extra sizes such as ``topk``."""
    return tuple({"batch": batch, "seq_len": n, "seq_len_kv": n, **extra} for n in seq_lens)


def _builtin_cases(preset: str) -> dict[str, list[Case]]:
    """The built-in presets.

    ``deepseek-v3.2``: 128 query heads, d_qk 576 (512 latent + 64 RoPE), d_v 512, top-k 2048; indexer 64 heads x 128
    dims in fp8 (with per-key scales) and bf16, causal; prefill/training shapes from 4K to 64K tokens. Candidates are
    checked against the reference at 512 queries x 4096 keys.
    ``deepseek-v4``: the CSA layers of V4-Flash (64 heads, top-k 512) and V4-Pro (128 heads, top-k 1024): sparse MLA
    with K = V (d_qk = d_v = 512: 448 NoPE + 64 RoPE) and a sink over ``S / 4`` compressed entries, the indexer (64
    heads x 128 dims, fp8, visibility by per-query ranges) over the same entries; 4K .. 64K tokens.
    ``tiny``: small heads and dims for CI that still meet every kernel's sm_90a constraints (dims multiples of 64 for
    the backward's column chunks, of 32 for the fp8 indexer).
    Each preset also holds its decode cases (:func:`autotune.lookup.decode.cases`).
    """
    from autotune.lookup import decode

    table = _deepseek_v4_cases() if preset == "deepseek-v4" else _prefill_cases(preset)
    for kernel, kernel_cases in decode.cases(preset).items():
        table[kernel] = table.get(kernel, []) + kernel_cases
    return table


def _prefill_cases(preset: str) -> dict[str, list[Case]]:
    """The prefill/training kernels' cases of the ``deepseek-v3.2`` and ``tiny`` presets (:func:`_builtin_cases`)."""
    if preset == "deepseek-v3.2":
        seqs, check_seq, check_kv = DEEPSEEK_SEQ_LENS, 512, 4096
        indexer = [
            {"heads": 64, "dim": 128, "dtype": dtype, "mode": "causal"} for dtype in ("float8_e4m3fn", "bfloat16")
        ]
        mla = {"heads": 128, "d_qk": 576, "d_v": 512}
        topk = 2048
    elif preset == "tiny":
        seqs, check_seq, check_kv = TINY_SEQ_LENS, 64, 256
        indexer = [{"heads": 4, "dim": 64, "dtype": "bfloat16", "mode": "causal"}]
        mla = {"heads": 16, "d_qk": 128, "d_v": 64}
        topk = 64
    else:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS} or a JSON file")
    plain = _points(seqs)
    check = {"batch": 1, "seq_len": check_seq, "seq_len_kv": check_kv}
    no_options = {"has_topk_length": False, "has_sink": False}
    return {
        "indexer": [Case("indexer", static, plain, check) for static in indexer],
        "topk": [Case("topk", {"k": topk}, plain, check)],
        "index_topk": [Case("index_topk", {**static, "topk": topk}, plain, check) for static in indexer],
        "sparse_mla_fwd": [
            Case("sparse_mla_fwd", {**mla, **no_options}, _points(seqs, topk=topk), {**check, "topk": topk})
        ],
        "sparse_mla_bwd": [Case("sparse_mla_bwd", {**mla, "topk": topk, **no_options}, plain, check)],
    }


def _deepseek_v4_cases() -> dict[str, list[Case]]:
    """The ``deepseek-v4`` preset (see :func:`_builtin_cases`). The sliding-window and HCA sources (per-query ranges,
    the kernels' ``ranged`` static parameter) are not tuned here: the measurement runners feed index lists."""
    seqs = DEEPSEEK_SEQ_LENS
    compressed = tuple({**point, "seq_len_kv": point["seq_len"] // V4_CSA_RATE} for point in _points(seqs))
    check = {"batch": 1, "seq_len": 512, "seq_len_kv": 4096 // V4_CSA_RATE}
    indexer = {"heads": 64, "dim": 128, "dtype": "float8_e4m3fn", "mode": "range"}
    mla = {"d_qk": 512, "d_v": 512, "has_topk_length": False, "has_sink": True}
    topks = sorted({topk for _, topk in V4_MODELS})
    return {
        "indexer": [Case("indexer", indexer, compressed, check)],
        "topk": [Case("topk", {"k": topk}, compressed, check) for topk in topks],
        "index_topk": [Case("index_topk", {**indexer, "topk": topk}, compressed, check) for topk in topks],
        "sparse_mla_fwd": [
            Case(
                "sparse_mla_fwd", {"heads": heads, **mla}, tuple({**point, "topk": topk} for point in compressed),
                {**check, "topk": topk},
            )
            for heads, topk in V4_MODELS
        ],
        "sparse_mla_bwd": [
            Case("sparse_mla_bwd", {"heads": heads, **mla, "topk": topk}, compressed, check)
            for heads, topk in V4_MODELS
        ],
    }


def _cases_from_file(path: Path) -> dict[str, list[Case]]:
    """Cases from a JSON file::

        {"<kernel>": [{"static": {...}, "sizes": [{"batch": 1, "seq_len": 4096, "seq_len_kv": 4096}, ...],
                       "check_sizes": {...}}]}

    ``check_sizes`` is optional (default: the smallest size point).
    """
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a shapes file maps kernel names to lists of cases")
    out: dict[str, list[Case]] = {}
    for kernel, items in doc.items():
        names = size_names(kernel)  # unknown kernel names are an error, not silently skipped
        if not isinstance(items, list):
            raise ValueError(f"{path}: {kernel} must map to a list of cases")
        cases = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("static"), dict):
                raise ValueError(f"{path}: every {kernel} case needs a 'static' object")
            sizes = tuple(_checked_sizes(s, names, path) for s in item.get("sizes", ()))
            if not sizes:
                raise ValueError(f"{path}: every {kernel} case needs at least one size point")
            if "check_sizes" in item:
                check = _checked_sizes(item["check_sizes"], names, path)
            else:
                check = min(sizes, key=lambda s: math.prod(s.values()))
            cases.append(Case(kernel, dict(item["static"]), sizes, check))
        out[kernel] = cases
    return out


def _checked_sizes(sizes: Any, names: tuple[str, ...], path: Path) -> Sizes:
    if not isinstance(sizes, dict) or set(sizes) != set(names):
        raise ValueError(f"{path}: size points need exactly the keys {names}, got {sizes!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes.values()):
        raise ValueError(f"{path}: sizes must be positive integers, got {sizes!r}")
    return dict(sizes)


def preset_names() -> tuple[str, ...]:
    """Built-in preset names, then any registered by :func:`register_kernel`."""
    return PRESETS + tuple(name for name in _extra_cases if name not in PRESETS)


def preset_cases(preset: str | Path, kernels: tuple[str, ...] | None = None) -> list[Case]:
    """The cases of ``preset`` (a built-in name or a JSON file) for ``kernels`` (default: all known kernels)."""
    wanted = kernels if kernels is not None else known_kernels()
    for name in wanted:
        spec(name)
    if isinstance(preset, str) and preset in preset_names():
        table = _builtin_cases(preset) if preset in PRESETS else {}
        table.update(_extra_cases.get(preset, {}))
    else:
        table = _cases_from_file(Path(preset))
    return [case for name in wanted for case in table.get(name, ())]
