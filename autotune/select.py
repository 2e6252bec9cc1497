"""Config selection for the launchers: the tuned config of a kernel on the device at hand, or ``None``.

Launchers call :func:`config_for` on every launch and fall back to the kernel's ``default_config`` on ``None``.
Tuning is optional, so nothing here may break a launch: every failure is logged once and turns into ``None``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from autotune import cache, sku, space

logger = logging.getLogger(__name__)

_reported: set[str] = set()
_reported_lock = threading.Lock()


def _report_once(what: str, exc: BaseException) -> None:
    with _reported_lock:
        if what in _reported:
            return
        _reported.add(what)
    logger.warning("tuned config lookup failed (%s: %s: %s); using the default config", what, type(exc).__name__, exc)


def config_for(
    kernel: str, static: dict[str, Any], sizes: dict[str, int], device: torch.device
) -> dict[str, Any] | None:
    """The tuned config of ``kernel`` for a launch on ``device``, or ``None`` (use the kernel's default config).

    Args:
        kernel: ``index_scores``, ``topk_indices``, ``sparse_mla_fwd`` or ``sparse_mla_bwd``.
        static: the kernel's compile-time parameters (the non-config keyword arguments of its ``build``).
        sizes: the runtime sizes the kernel's tuning preset names (see :mod:`autotune.space`), e.g.
            ``{"batch": B, "seq_len": S, "seq_len_kv": S_kv}``.
        device: where the kernel runs; CPU (the C target) is never tuned and always gets ``None``.

    Returns:
        A dict of the config's fields (pass as ``Config(**config)``), checked against the kernel module's ``Config``
        and ``check_config``, or ``None``. Never raises.
    """
    try:
        if torch.device(device).type != "cuda":
            return None
        config = cache.lookup(kernel, static, sizes, sku=sku.current_sku(device))
        if config is not None and not _usable(kernel, static, config):
            return None
        return config
    except Exception as exc:  # noqa: BLE001 - tuning is optional: any failure means "use the default"
        _report_once(kernel, exc)
        return None


# (kernel, static items, config items) -> whether the kernel module accepts the config. A cached config can be stale
# (the module's Config gained or lost a field, or its constraints changed since tuning with the same TileLang).
_validated: dict[tuple[Any, ...], bool] = {}


def _usable(kernel: str, static: dict[str, Any], config: dict[str, Any]) -> bool:
    key = (
        kernel,
        tuple(sorted((k, type(v), v) for k, v in static.items())),
        tuple(sorted((k, type(v), v) for k, v in config.items())),
    )
    try:
        return _validated[key]
    except KeyError:
        pass
    except TypeError:  # unhashable values: validate without remembering
        key = None
    try:
        space.make_config(kernel, static, config)
        ok = True
    except (TypeError, ValueError) as exc:
        _report_once(f"{kernel}: stale config {config}", exc)
        ok = False
    if key is not None:
        _validated[key] = ok
    return ok
