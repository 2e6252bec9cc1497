"""Config selection for the launchers: the tuned, checked config of a kernel on the device at hand, or ``None``.

Launchers call :func:`config_for` on every CUDA launch and use the kernel's ``default_config`` on ``None``. The
answer is the kernel module's ``Config``, checked against the module's ``check_config`` for the launch's target once
per (kernel, static parameters, config): the launcher passes it on unchanged.

Tuning is optional, so a lookup that fails at run time (no driver to ask for the SKU, an unreadable cache file, a
stale entry whose fields the module no longer has) is logged once and turns into ``None``. This module imports
nothing from ``dsa``: the caller passes the cache folder.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch

from autotune.lookup import cache, sku, space

logger = logging.getLogger(__name__)

_reported: set[str] = set()
_reported_lock = threading.Lock()
# (kernel, static items, config items, target key) -> the checked Config, or None when the module rejects it. A cached
# config can be stale (the module's Config gained or lost a field, or its constraints changed since tuning).
_checked: dict[tuple[Any, ...], Any] = {}


def _report_once(what: str, exc: BaseException) -> None:
    with _reported_lock:
        if what in _reported:
            return
        _reported.add(what)
    logger.warning("tuned config lookup failed (%s: %s: %s); using the default config", what, type(exc).__name__, exc)


def config_for(
    kernel: str,
    static: dict[str, Any],
    sizes: dict[str, int],
    device: torch.device,
    *,
    target: Any,
    cache_dir: Path,
) -> Any | None:
    """The tuned config of ``kernel`` for a launch on ``device``, or ``None`` (use the kernel's default config).

    Args:
        kernel: a kernel name of :data:`autotune.lookup.space.KERNEL_NAMES`.
        static: the kernel's compile-time parameters (the non-config keyword arguments of its ``build``).
        sizes: the runtime sizes the kernel's tuning preset names (:func:`autotune.lookup.space.size_names`), e.g.
            ``{"batch": B, "seq_len": S, "seq_len_kv": S_kv}``.
        device: where the kernel runs; only CUDA devices are tuned (anything else gets ``None``).
        target: the compile target of the launch; the config is checked against it.
        cache_dir: the user cache folder (``dsa.env.cache_dir()``).

    Returns:
        The kernel module's ``Config``, accepted by its ``check_config`` for ``target``, or ``None``. Never raises for
        a runtime lookup failure (see the module docstring).
    """
    if device.type != "cuda":
        return None
    try:
        found = cache.lookup(kernel, static, sizes, sku=sku.current_sku(device), cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - tuning is optional: a failed lookup means "use the default"
        _report_once(kernel, exc)
        return None
    if found is None:
        return None
    return _checked_config(kernel, static, found, target)


def _checked_config(kernel: str, static: dict[str, Any], config: dict[str, Any], target: Any) -> Any | None:
    """``config`` as the module's checked ``Config`` for ``target``, or ``None`` (reported once) when it is stale."""
    try:
        key: tuple[Any, ...] | None = (
            kernel,
            tuple(sorted((name, type(value), value) for name, value in static.items())),
            tuple(sorted((name, type(value), value) for name, value in config.items())),
            cache.canonical(target) if isinstance(target, dict) else str(target),
        )
        return _checked[key]
    except KeyError:
        pass
    except TypeError:  # unhashable values: check without remembering
        key = None
    try:
        checked = space.make_config(kernel, static, config, target=target)
    except (TypeError, ValueError) as exc:
        _report_once(f"{kernel}: stale config {config}", exc)
        checked = None
    if key is not None:
        _checked[key] = checked
    return checked
