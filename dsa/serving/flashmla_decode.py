"""FlashMLA-compatible entry points for sparse MLA decoding: ``get_mla_metadata`` and ``flash_mla_with_kvcache``.

Code written against FlashMLA's sparse decode path (the one taken when ``indices`` is given) runs here unchanged, on
top of ``dsa.ops.sparse_mla_decode``. The argument names, order, defaults, shapes and outputs follow
``flash_mla/flash_mla_interface.py`` and ``csrc/api/sparse_decode.h`` of deepseek-ai/FlashMLA at commit
``9241ae3ef9bac614dd25e45e507e089f888280e0`` (April 2026; the interface dates from the January 2026 refactor), with
``tests/ref.py`` as the definition of the outputs. The conventions read there:

- ``k_cache`` is ``[num_blocks, page_block_size, h_k = 1, row]``. FlashMLA's sparse path takes FP8 caches only
  (``is_fp8_kvcache=True``; uint8, int8 or float8_e4m3fn bytes) in one of two layouts, chosen by q's head_dim:
  V3.2's for 576-wide rows (656 bytes per token, one row per token: 512 e4m3 values, 4 float32 tile scales, 64 bf16
  RoPE values) and MODEL1's (DeepSeek-V4) for 512-wide rows (584 bytes per token: 448 e4m3 values in 7 tiles of 64,
  64 bf16 RoPE values, 7 UE8M0 scale bytes and a pad byte, ``dsa.kv_format.MODEL1_FP8_LAYOUT``). A MODEL1 block is
  not its tokens' rows side by side: it holds every token's 576 value bytes, then every token's 8 scale bytes (and
  is padded to a multiple of 576 bytes, so ``stride(0)`` exceeds ``page_block_size * 584``); block ``p``'s bytes
  are ``k_cache[p]`` in row-major order (``dsa.kv_format.flash_mla_kv_view`` of ``quantize_kv_pages_fp8``'s pages,
  or ``PagedKVCache(..., layout=MODEL1_FP8_LAYOUT)``'s). Here ``is_fp8_kvcache=False`` with a cache in q's dtype
  also works (an extension); the flag must agree with the cache's dtype.
- ``indices`` (FlashMLA's ``indices_in_kvcache``) is ``[B, s_q, topk]`` int32 slots, ``page * page_block_size +
  offset``; ``-1`` (or out of range) is invalid. ``extra_k_cache``/``extra_indices_in_kvcache`` add a second source
  in the same softmax. ``topk_length``/``extra_topk_length`` are ``[B]`` int32 (one length per sequence, for all its
  queries): only the leading entries count.
- ``softmax_scale`` defaults to ``q.shape[-1] ** -0.5`` (the full ``d_qk``, 576 for V3.2; V3.2 itself passes
  ``192**-0.5 * mscale**2``).
- The result is ``(out [B, s_q, H, head_dim_v], softmax_lse [B, H, s_q])``; ``softmax_lse`` is float32, natural log,
  the sink excluded, and (like FlashMLA's) a transposed view of a ``[B, s_q, H]`` buffer, so not contiguous. A query
  with no valid index gets ``out = 0`` and ``softmax_lse = +inf`` (``dsa.ops.sparse_mla_decode`` says ``-inf``).
- ``attn_sink [H]`` float32 scales ``out`` by ``exp(lse) / (exp(lse) + exp(sink))``.
- ``get_mla_metadata`` takes any arguments (the pre-2026 signature included) and returns ``(FlashMLASchedMeta(),
  None)``; the first element goes in as ``tile_scheduler_metadata``, the second (or nothing) as ``num_splits``, which
  must be None. Our kernels need no scheduling plan: the object only records the call's configuration on first use,
  and a later call with a different configuration is rejected as FlashMLA rejects it (its stored schedule would be
  stale). FlashMLA also forbids changing the *values* of ``topk_length``/``extra_topk_length`` under one metadata
  object; nothing here depends on them, so that is not checked.
- ``block_table`` and ``cache_seqlens`` are not read on the sparse path (the slots already name the pages); any value,
  None included, is accepted. ``causal`` must be False.

Where FlashMLA would reject an input, a ``ValueError``/``TypeError`` names ``flash_mla_with_kvcache`` and the
argument. Relaxed here: ``q`` may be float32/float64/float16 (the reference runs; FlashMLA takes bf16 only), any head
count (FlashMLA: 64 or 128), any ``head_dim_v <= d_qk`` (FlashMLA: 512) and any width whose FP8 row has 64 RoPE values
(``dsa.kv_format.FP8Layout.for_width(d_qk, 64)``; for 512-wide rows both it, 604 bytes, and MODEL1's 584 are
accepted, told apart by the row size), and any strides on every tensor (FlashMLA wants each FP8 block's tokens
packed). Not supported: FlashMLA's dense decode path (``indices=None``). Tensors go to ``dsa.ops.sparse_mla_decode``
as they arrive: on the kernel backend the op copies any that the kernels cannot read in place (e.g. a cache whose
blocks are not adjacent in memory, as FlashMLA's own test helper lays it out: one copy of the cache per call), the
reference reads them as they are. MODEL1 FP8 caches run the reference on every backend (the decode kernel reads
row-per-token FP8 rows only), reading only the bytes of the tokens the valid slots name; bf16 caches of 512-wide
rows run the kernels. Forward only, as in FlashMLA.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch

from dsa import kv_format, ops, validation

__all__ = ["FlashMLASchedMeta", "flash_mla_with_kvcache", "get_mla_metadata"]

_OP = "flash_mla_with_kvcache"
# FlashMLA's FP8 rows keep 64 RoPE values in bf16 in both of its layouts.
_D_ROPE = 64


@dataclasses.dataclass
class FlashMLASchedMeta:
    """The object ``get_mla_metadata`` returns and ``flash_mla_with_kvcache`` takes as ``tile_scheduler_metadata``.

    FlashMLA fills ``tile_scheduler_metadata``/``num_splits`` with its split-KV plan on first use; here they stay None
    (no plan is needed) and only ``config`` is recorded, so that reuse with other shapes is caught as FlashMLA does.
    """

    @dataclasses.dataclass(frozen=True)
    class Config:
        """The shapes and flags of the first call that used the metadata object."""

        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: int | None
        extra_page_block_size: int | None
        extra_topk: int | None

    have_initialized: bool = False
    config: Config | None = None
    tile_scheduler_metadata: torch.Tensor | None = None
    num_splits: torch.Tensor | None = None


def get_mla_metadata(*args: Any, **kwargs: Any) -> tuple[FlashMLASchedMeta, None]:
    """A fresh, empty ``FlashMLASchedMeta`` and None, whatever the arguments.

    FlashMLA's current ``get_mla_metadata`` also ignores its arguments (they are kept so that callers of the older
    ``get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q, is_fp8_kvcache, topk)`` keep
    working) and returns this pair; pass the first element as ``tile_scheduler_metadata`` and the second, or nothing,
    as ``num_splits``.
    """
    del args, kwargs  # accepted for signature compatibility only
    return FlashMLASchedMeta(), None


def _fail(argument: str, message: str, error: type[Exception] = ValueError) -> Exception:
    return error(f"{_OP}: {argument} {message}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _require_tensor(name: str, t: object, rank: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise _fail(name, f"must be a torch.Tensor {layout}, got {type(t).__name__}", TypeError)
    if t.dim() != rank:
        raise _fail(name, f"must be a {rank}-D tensor {layout}, got shape {list(t.shape)}")
    return t


def _require_int32(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.int32:
        raise _fail(name, f"must be int32, got {_dtype_name(t.dtype)}", TypeError)


def _check_cache(name: str, k_cache: object, q: torch.Tensor, is_fp8_kvcache: bool) -> torch.Tensor:
    """Validate one ``[num_blocks, page_block_size, 1, row]`` cache; return it as a ``[num_blocks, page_block_size,
    row]`` view (any strides: ``dsa.ops.sparse_mla_decode`` lays it out for the kernels)."""
    k_cache = _require_tensor(name, k_cache, 4, "[num_blocks, page_block_size, h_k, head_dim]")
    if k_cache.shape[2] != 1:
        raise _fail(name, f"must have h_k = 1 (MLA's single latent head), got shape {list(k_cache.shape)}")
    if min(k_cache.shape) < 1:
        raise _fail(name, f"must not be empty, got shape {list(k_cache.shape)}")
    d_qk = q.shape[-1]
    row = k_cache.shape[-1]
    holds_fp8 = k_cache.dtype in validation.FP8_CACHE_DTYPES
    if is_fp8_kvcache:
        if not holds_fp8:
            raise _fail(
                name,
                f"must hold FP8 bytes (uint8, int8 or float8_e4m3fn) when is_fp8_kvcache=True, got "
                f"{_dtype_name(k_cache.dtype)}",
                TypeError,
            )
        layouts = validation.fp8_cache_layouts(d_qk, _D_ROPE)
        if not layouts:
            raise _fail(name, f"has no FP8 layout for {d_qk}-wide rows with {_D_ROPE} RoPE values (q's head_dim)")
        if validation.fp8_cache_layout(d_qk, _D_ROPE, row) is None:
            sizes = " or ".join(str(layout.bytes_per_token) for layout in layouts)
            raise _fail(name, f"must have {sizes} bytes per token for {d_qk}-wide FP8 rows, got {row}")
    else:
        if holds_fp8:
            raise _fail(name, f"holds FP8 bytes ({_dtype_name(k_cache.dtype)}) but is_fp8_kvcache=False", TypeError)
        if k_cache.dtype != q.dtype:
            raise _fail(
                name,
                f"must have q's dtype ({_dtype_name(q.dtype)}) when is_fp8_kvcache=False, got "
                f"{_dtype_name(k_cache.dtype)}",
                TypeError,
            )
        if row != d_qk:
            raise _fail(name, f"rows must be head_dim = {d_qk} wide like q, got shape {list(k_cache.shape)}")
    return k_cache.squeeze(2)


def _check_indices(name: str, indices: object, q: torch.Tensor) -> torch.Tensor:
    """Validate ``[B, s_q, topk]`` int32 slots; return them as they are."""
    indices = _require_tensor(name, indices, 3, "[batch_size, seq_len_q, topk]")
    _require_int32(name, indices)
    batch, s_q = q.shape[:2]
    if tuple(indices.shape[:2]) != (batch, s_q) or indices.shape[2] < 1:
        raise _fail(name, f"must have shape [{batch}, {s_q}, topk >= 1] like q, got {list(indices.shape)}")
    return indices


def _check_length(name: str, length: object, batch: int) -> torch.Tensor | None:
    """Validate an optional ``[B]`` int32 length tensor."""
    if length is None:
        return None
    length = _require_tensor(name, length, 1, "[batch_size]")
    _require_int32(name, length)
    if length.shape[0] != batch:
        raise _fail(name, f"must have shape [batch_size] = [{batch}], got {list(length.shape)}")
    return length


def _check_sched_meta(meta: FlashMLASchedMeta, config: FlashMLASchedMeta.Config) -> None:
    """Record ``config`` on first use; reject a later call whose configuration differs (FlashMLA's reuse rule)."""
    if not meta.have_initialized or meta.config is None:
        return
    for field in dataclasses.fields(config):
        before, now = getattr(meta.config, field.name), getattr(config, field.name)
        if before != now:
            raise _fail(
                "tile_scheduler_metadata",
                f"was first used with {field.name} = {before}, now {now}: call get_mla_metadata() again for a "
                f"different configuration",
            )


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: FlashMLASchedMeta,
    num_splits: None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices_in_kvcache: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's ``flash_mla_with_kvcache`` (sparse path) on top of ``dsa.ops.sparse_mla_decode``.

    Args:
        q (torch.Tensor): ``[B, s_q, H, d_qk]``, bfloat16 (float16/float32/float64 run the reference).
        k_cache (torch.Tensor): ``[num_blocks, page_block_size, 1, row]``: FP8 bytes (uint8/int8/float8_e4m3fn,
            ``row`` = 656 for ``d_qk`` = 576, 584 for MODEL1's 512) with ``is_fp8_kvcache=True``, or q's dtype
            (``row = d_qk``) with False.
        block_table (torch.Tensor | None): ``[B, max_blocks]`` int32; not read (the slots name the pages).
        cache_seqlens (torch.Tensor | None): ``[B]`` int32; not read.
        head_dim_v (int): value width, the first ``head_dim_v`` columns of a row (512 for V3.2 and MODEL1).
        tile_scheduler_metadata (FlashMLASchedMeta): the first element of :func:`get_mla_metadata`'s result.
        num_splits (None): must be None (FlashMLA's placeholder for its old interface).
        softmax_scale (float | None): default ``d_qk ** -0.5``.
        causal (bool): must be False on the sparse path.
        is_fp8_kvcache (bool): whether ``k_cache``/``extra_k_cache`` hold FP8 bytes.
        indices (torch.Tensor): ``[B, s_q, topk]`` int32 slots ``page * page_block_size + offset``; ``-1`` or out of
            range is invalid. Required (None selects FlashMLA's dense path, not provided here).
        attn_sink (torch.Tensor | None): ``[H]`` float32 (DeepSeek-V4's learned sink per head).
        extra_k_cache (torch.Tensor | None): ``[extra_num_blocks, extra_page_block_size, 1, row]``, like k_cache
            (DeepSeek-V4: the compressed entries, with ``k_cache`` the sliding window).
        extra_indices_in_kvcache (torch.Tensor | None): ``[B, s_q, extra_topk]`` int32 slots of ``extra_k_cache``.
        topk_length, extra_topk_length (torch.Tensor | None): ``[B]`` int32: leading entries counted per sequence.

    Returns:
        out ``[B, s_q, H, head_dim_v]`` in q's dtype (0 for a query with no valid index) and softmax_lse
        ``[B, H, s_q]`` float32 (natural log, sink excluded, ``+inf`` for a query with no valid index), a
        non-contiguous view as in FlashMLA.
    """
    if not isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        raise _fail(
            "tile_scheduler_metadata",
            f"must be the FlashMLASchedMeta returned by dsa.compat.get_mla_metadata(), got "
            f"{type(tile_scheduler_metadata).__name__}",
            TypeError,
        )
    if num_splits is not None:
        raise _fail("num_splits", "must be None (pass get_mla_metadata()'s second element, or nothing)")
    if indices is None:
        raise NotImplementedError(
            f"{_OP}: indices is None, which selects FlashMLA's dense decode path; only the sparse path (indices "
            "[batch_size, seq_len_q, topk] int32 slots) is provided"
        )
    if causal:
        raise _fail("causal", "must be False when indices is given (sparse attention)")
    q = _require_tensor("q", q, 4, "[batch_size, seq_len_q, num_heads_q, head_dim]")
    if q.dtype not in validation.ATTENTION_REFERENCE_DTYPES:
        raise _fail("q", f"must be bfloat16 (or float16/float32/float64), got {_dtype_name(q.dtype)}", TypeError)
    if min(q.shape) < 1:
        raise _fail("q", f"must not be empty, got shape {list(q.shape)}")
    batch, s_q, heads, d_qk = q.shape
    try:
        # Any integer type (Python or NumPy), as FlashMLA's binding accepts; floats are rejected.
        d_v = operator.index(head_dim_v)
    except TypeError:
        d_v = None
    if d_v is None or isinstance(head_dim_v, bool) or not 1 <= d_v <= d_qk:
        raise _fail("head_dim_v", f"must be an int in [1, {d_qk}] (q's head_dim), got {head_dim_v!r}")
    kv_pages = _check_cache("k_cache", k_cache, q, is_fp8_kvcache)
    slots = _check_indices("indices", indices, q)
    lengths = _check_length("topk_length", topk_length, batch)
    extra_pages = extra_slots = None
    if extra_k_cache is None:
        if extra_indices_in_kvcache is not None:
            raise _fail("extra_indices_in_kvcache", "must be None when extra_k_cache is None")
        if extra_topk_length is not None:
            raise _fail("extra_topk_length", "must be None when extra_k_cache is None")
    else:
        if extra_indices_in_kvcache is None:
            raise _fail("extra_indices_in_kvcache", "must be given with extra_k_cache")
        extra_pages = _check_cache("extra_k_cache", extra_k_cache, q, is_fp8_kvcache)
        extra_slots = _check_indices("extra_indices_in_kvcache", extra_indices_in_kvcache, q)
    extra_lengths = _check_length("extra_topk_length", extra_topk_length, batch)
    if attn_sink is not None:
        attn_sink = _require_tensor("attn_sink", attn_sink, 1, "[num_heads_q]")
        if attn_sink.dtype != torch.float32:
            raise _fail("attn_sink", f"must be float32, got {_dtype_name(attn_sink.dtype)}", TypeError)
        if attn_sink.shape[0] != heads:
            raise _fail("attn_sink", f"must have shape [num_heads_q] = [{heads}], got {list(attn_sink.shape)}")
    config = FlashMLASchedMeta.Config(
        b=batch,
        s_q=s_q,
        h_q=heads,
        page_block_size=k_cache.shape[1],
        h_k=k_cache.shape[2],
        causal=bool(causal),
        is_fp8_kvcache=bool(is_fp8_kvcache),
        topk=slots.shape[-1],
        extra_page_block_size=None if extra_k_cache is None else extra_k_cache.shape[1],
        extra_topk=None if extra_slots is None else extra_slots.shape[-1],
    )
    _check_sched_meta(tile_scheduler_metadata, config)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out, lse = ops.sparse_mla_decode(
        q,
        kv_pages,
        slots,
        sm_scale=scale,
        d_v=d_v,
        topk_length=lengths,
        attn_sink=attn_sink,
        extra_kv_cache=extra_pages,
        extra_indices=extra_slots,
        extra_topk_length=extra_lengths,
        d_rope=_D_ROPE,
    )
    # Record only after a successful call, so that a rejected first call leaves the object reusable.
    if not tile_scheduler_metadata.have_initialized:
        tile_scheduler_metadata.config = config
        tile_scheduler_metadata.have_initialized = True
    # FlashMLA: +inf (not -inf) for a query with nothing to attend to, and [B, H, s_q] as a view of [B, s_q, H].
    lse = lse.float().masked_fill(torch.isneginf(lse), float("inf"))
    return out, lse.transpose(1, 2)
