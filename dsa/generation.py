"""The model cache under its first name (``dsa.generation.*``): a re-export of ``dsa.serving.model_cache``, where
``LayerCache``, ``ModelCache``, ``select_from_cache`` and the packed/padded batch helpers live."""

from __future__ import annotations

from dsa.serving import model_cache as _home
from dsa.serving.model_cache import *  # noqa: F403 - the shim re-exports its home's public names
from dsa.serving.model_cache import CacheDtype  # noqa: F401

__all__ = [*_home.__all__, "CacheDtype"]
