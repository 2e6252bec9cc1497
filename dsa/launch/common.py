"""What every launcher shares: the compile target of a device, the choice of a kernel config, compiling through the
kernel cache, the plan cache, and allocating outputs.

Plan once, run per call (FlashMLA's scheduler metadata, flashinfer's ``plan()``/``run()``): each launcher's
``plan(...)`` decides everything that depends only on shapes, dtypes, the device and static parameters (the target,
the config, the compiled kernels, split counts, placeholder tensors), or returns ``None`` where its kernels cannot
take the problem; its ``run(plan, ...)`` allocates the outputs and launches. Plans live in a :class:`PlanCache` per
launcher, keyed by those cheap facts, so every layer of a decode step (and every step after the first) reuses one
plan: no target or config is chosen twice. A key also holds what the environment contributes (``DSA_PORTABLE`` and
``DSA_CACHE_DIR`` on CUDA, ``DSA_CPU_COMPILE_FLAGS`` on the CPU), :func:`dsa.hardware.cache_epoch` and, on CUDA, the
tuned-config cache's :func:`autotune.lookup.cache.generation`: a config that this same process tunes and stores later
is used by the next call of that shape (its plan is made again), with no plan cleared by hand.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Hashable
from types import ModuleType
from typing import Any, Generic, TypeVar

import torch

from autotune.lookup import cache as tuned_cache
from autotune.lookup import select
from dsa import env, hardware
from tl_kernels import build as tl_build
from tl_kernels import dsl

logger = logging.getLogger(__name__)

_TILELANG_LOGGER = "tilelang"
# The DSA_LOG level last applied to TileLang's logger (None: not yet in this process).
_applied_log_level: list[int | None] = [None]


def target_for(device: torch.device) -> dsl.Target:
    """The C target for CPU tensors (CPU tier); for CUDA tensors the architecture
    :func:`dsa.hardware.target_for_capability` names for the device (sm_90a on Hopper, never on anything else).

    Raises:
        RuntimeError: a CUDA device without kernels (the dispatcher sends none here; a direct launcher call might).
    """
    if device.type == "cpu":
        return dsl.CPU_TARGET
    target = hardware.device_target(device)
    if target is None:
        major, minor = hardware.cuda_capability(device)
        raise RuntimeError(f"no TileLang kernels are built for {device} (compute capability {major}.{minor})")
    return target


PLAN_CACHE_SIZE = 256
"""Plans kept per launcher (least recently used dropped first): a prefill sees a few shapes, a decode step one."""

_Plan = TypeVar("_Plan")


def plan_settings(device: torch.device) -> tuple[Hashable, ...]:
    """What the environment adds to a plan's key on ``device`` (cheap reads; see the module docstring)."""
    if device.type == "cpu":
        return (hardware.cache_epoch(), env.cpu_compile_flags())
    return (hardware.cache_epoch(), tuned_cache.generation(), env.portable(), env.cache_dir())


class PlanCache(Generic[_Plan]):
    """One launcher's plans by key. ``made`` counts the plans built (each one a target and config choice)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.made = 0
        self._plans: collections.OrderedDict[Hashable, _Plan | None] = collections.OrderedDict()
        # Serving threads may share a launcher: the dict changes under the lock, plans are built outside it (two
        # threads may both build a new shape's plan once; either result is the same).
        self._lock = threading.Lock()
        _PLAN_CACHES.append(self)

    def get(self, device: torch.device, key: tuple[Hashable, ...], make: Callable[[], _Plan | None]) -> _Plan | None:
        """The plan of ``key`` on ``device`` (``None`` included: "the kernels cannot take it" is remembered too),
        built by ``make()`` on first use."""
        full = (device, key, plan_settings(device))
        try:
            with self._lock:
                plan = self._plans[full]
                self._plans.move_to_end(full)
            return plan
        except KeyError:
            pass
        except TypeError:  # an unhashable part (a caller's config with list fields): plan without remembering
            self.made += 1
            return make()
        plan = make()
        with self._lock:
            self.made += 1
            self._plans[full] = plan
            if len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return plan

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()


_PLAN_CACHES: list[PlanCache[Any]] = []


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """The plan of a one-kernel launcher: the target, the config and the kernel compiled for them."""

    target: dsl.Target
    config: Any
    kernel: Any


def clear_plans() -> None:
    """Forget every launcher's plans (the next call of each shape plans again)."""
    for plan_cache in _PLAN_CACHES:
        plan_cache.clear()


def placeholder(dtype: torch.dtype, device: torch.device, shape: tuple[int, ...] = (1,)) -> torch.Tensor:
    """A zero tensor a kernel takes for an absent optional input and never reads (made once per plan)."""
    return torch.zeros(shape, dtype=dtype, device=device)


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor a kernel fully overwrites, uninitialised (the tests replace this one function to poison every
    launcher's outputs with NaN, so that an element a kernel forgot to write fails)."""
    return torch.empty(shape, dtype=dtype, device=device)


def select_config(
    kernel_name: str | None,
    kernels: ModuleType,
    static: dict[str, Any],
    sizes: dict[str, int],
    device: torch.device,
    target: dsl.Target | None = None,
    default: Any = None,
    config: Any = None,
) -> Any:
    """The config a plan of ``kernels`` (a ``tl_kernels`` module) runs: the caller's ``config`` after the module's
    ``check_config`` for ``target``; else the tuned config for this launch; else ``default`` (the launcher's rule for
    this shape); else the module's default config.

    ``static`` holds the kernel's static parameters (without the target); ``sizes`` the runtime sizes (``batch``,
    ``seq_len``, ``seq_len_kv``, ...). ``kernel_name=None`` (an untuned kernel) and CPU launches are never tuned.
    :func:`autotune.lookup.select.config_for` returns a config already checked for this target, or ``None``. The
    portable schedule on Hopper (``DSA_PORTABLE=1``) always runs its default. ``target``: the plan's (default
    :func:`target_for`).

    Raises:
        ValueError: the caller's config does not suit ``target``, or (no config given) no config fits at all.
    """
    target = target_for(device) if target is None else target
    if config is not None:
        kernels.check_config({**static, "target": target}, config)
        return config
    # Tuned configs are stored per SKU for its own schedule: the portable schedule that DSA_PORTABLE=1 builds on
    # Hopper (a check of the kernels other GPUs run) runs its default, never a config tuned for sm_90a.
    if kernel_name is not None and device.type == "cuda" and not (env.portable() and hardware.is_hopper(device)):
        tuned = select.config_for(kernel_name, static, sizes, device, target=target, cache_dir=env.cache_dir())
        if tuned is not None:
            return tuned
    return default if default is not None else kernels.default_config({**static, "target": target})


def compile_plan(
    kernel_name: str,
    kernels: ModuleType,
    static: dict[str, Any],
    sizes: dict[str, int],
    device: torch.device,
    config: Any = None,
) -> KernelPlan:
    """What a one-kernel plan holds: the target of ``device``, the config (:func:`select_config`) and ``kernels.build``
    compiled for them (the static parameters plus every field of the config)."""
    target = target_for(device)
    chosen = select_config(kernel_name, kernels, static, sizes, device, target, config=config)
    return KernelPlan(target, chosen, get_kernel(kernels.build, target, **static, **dataclasses.asdict(chosen)))


def get_kernel(builder: Callable[..., Any], target: dsl.Target, **params: Hashable) -> Any:
    """``tl_kernels.build.get_kernel`` with the settings of ``dsa.env``: the g++ flags of C-target kernels, and
    TileLang's log level (``DSA_LOG``; its per-compile INFO lines stay off a user's stderr unless asked for)."""
    level = env.log_level()
    if _applied_log_level[0] != level:
        logging.getLogger(_TILELANG_LOGGER).setLevel(level)
        _applied_log_level[0] = level
    if dsl.is_cpu(target):
        return tl_build.get_kernel(builder, target=target, cpu_flags=env.cpu_compile_flags(), **params)
    return tl_build.get_kernel(builder, target=target, **params)
