"""Serving the DSA modules: a per-model paged cache, selection over cached indexer keys, packed and padded batches.

One :class:`LayerCache` per layer holds two ``dsa.serving.cache.PagedKVCache``s with the same page geometry:

- the **latent KV** (``width = latent_dim``, ``d_rope = qk_rope_head_dim``) in bfloat16, float32 or FlashMLA's FP8
  layout, read by ``dsa.ops.sparse_mla_decode`` through cache slots;
- the **indexer keys** (``width = index_head_dim``). With ``index_fp8`` they are the model's own quantised keys: the
  FP8 values and the one float32 scale per token are packed byte for byte (``dsa.kv_format.pack_index_keys_fp8``, the
  ``FP8Layout(index_head_dim, 0, index_head_dim)`` layout), never re-quantised, so decode selects with exactly the
  keys prefill computed. Otherwise they are stored in float32 for a float32 cache and in bfloat16 for the bfloat16
  and FP8 caches.

Positions: token ``i`` of a call lands at position ``seq_lens[b] + i`` of its sequence; prefill (``s_q`` = prompt
length), chunked prefill and decode (``s_q = 1``) are the same call. What a step's tokens share across layers (their
positions, real-token mask, the indexer's visible ranges) is a :class:`Step`, computed once per step
(:meth:`ModelCache.begin_step`, or by the first layer that asks, :meth:`LayerCache.step`) and read by every layer.
Nothing here runs at import.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from dsa import kv_format, ops
from dsa.serving.cache import PagedKVCache

__all__ = [
    "LayerCache",
    "ModelCache",
    "Step",
    "compact_rows",
    "mask_runs",
    "packed_ranges",
    "padded_ranges",
    "restore_rows",
    "select_from_cache",
]

logger = logging.getLogger(__name__)

CacheDtype = torch.dtype | str


def _index_key_dtype(dtype: CacheDtype) -> torch.dtype:
    """The dtype of unquantised indexer keys in a cache of ``dtype``: float32 stays float32, the rest bfloat16."""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def select_from_cache(
    index_cache: PagedKVCache,
    q: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    *,
    starts: torch.Tensor,
    ends: torch.Tensor,
    fp8_dim: int | None = None,
) -> torch.Tensor:
    """The indexer's top-k over a sequence's cached keys, as **positions** (map them to slots with
    ``PagedKVCache.slots``), through ``dsa.ops.index_topk_decode``: on the kernel backend the fused selection kernel
    reads the keys through the block table (no gathered copy, no scores in memory).

    Args:
        index_cache (PagedKVCache): the indexer-key cache, already holding the new tokens' keys.
        q (torch.Tensor): ``[B, n, H_i, D_i]``: the new queries, float8_e4m3fn when ``fp8_dim`` is set, else a
            floating dtype (cast to the cached keys' dtype: a bfloat16 cache under a float32 model selects with
            bfloat16 queries, as a bfloat16 model would).
        weights (torch.Tensor): ``[B, n, H_i]`` float32 (the query scale folded in for FP8).
        topk (int): keys per query.
        starts, ends (torch.Tensor): ``[B, n]`` int32: query ``t`` sees positions ``[starts, ends)``, and never a
            position its sequence has not written yet: ``ends`` is clamped to ``index_cache.seq_lens`` here, so rows
            past the written ones are invisible on every backend (the op itself reads whatever rows ``ends`` names on
            allocated pages; a fresh cache's never-written rows are zero keys, which score 0 and would be selected
            over negatively scored real keys).
        fp8_dim (int | None): ``D_i`` when the cache holds packed FP8 keys (``pack_index_keys_fp8``).

    Returns:
        torch.Tensor: ``[B, n, topk]`` int32 positions, ``-1`` padding (``ops.index_topk_decode``'s contract).
    """
    pages = index_cache.pages
    if fp8_dim is None and q.dtype != pages.dtype:
        q = q.to(pages.dtype)
    # A tensor op (no host sync per layer and step): positions at or past the written length are out of every range.
    ends = torch.minimum(ends.to(torch.int32), index_cache.seq_lens.to(ends.device).view(-1, 1))
    return ops.index_topk_decode(
        q.contiguous(), pages, weights.contiguous(), topk, block_table=index_cache.block_table.to(q.device),
        ends=ends.contiguous(), starts=starts.to(torch.int32).contiguous(),
    )  # fmt: skip


@dataclass(frozen=True)
class Step:
    """What the ``n`` new tokens of one call share across every layer, computed once per step from ``seq_lens``
    before any layer appends.

    Attributes:
        n (int): new tokens per sequence (columns of the call).
        positions (torch.Tensor): ``[B, n]`` int64: token ``i`` of sequence ``b`` sits at ``seq_lens[b] + i``.
        lengths (torch.Tensor): ``[B]`` int64: real tokens per sequence (``n`` unless a right-padded chunk).
        starts (torch.Tensor): ``[B, n]`` int32 zeros, ends ``[B, n]`` int32 ``position + 1`` for a real token and 0
            for padding (a padding query sees nothing): the indexer's visible ranges.
        ends (torch.Tensor): see ``starts``.
        lengths_arg (object): the ``lengths`` the step was begun with (a later call with other lengths is another
            step).
        appends (int): how many appends each layer had made when the step began (host-side: a layer that has
            appended since is in a later step).
    """

    n: int
    positions: torch.Tensor
    lengths: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    lengths_arg: object
    appends: int

    @classmethod
    def begin(
        cls, seq_lens: torch.Tensor, n: int, lengths: torch.Tensor | None, device: torch.device, appends: int
    ) -> Step:
        """The step of ``n`` new tokens after ``seq_lens [B]`` (``lengths [B]`` real ones, default all): tensor ops on
        ``device`` only, no host sync."""
        batch = seq_lens.shape[0]
        real_lengths = torch.full((batch,), n, dtype=torch.int64, device=device) if lengths is None else lengths
        real_lengths = real_lengths.to(device=device, dtype=torch.int64)
        offsets = torch.arange(n, device=device).view(1, n)
        positions = seq_lens.to(device=device, dtype=torch.int64).view(batch, 1) + offsets
        real = offsets < real_lengths.view(batch, 1)
        ends = torch.where(real, positions + 1, 0).to(torch.int32)
        return cls(n, positions, real_lengths, torch.zeros_like(ends), ends, lengths, appends)


@dataclass
class _StepSlot:
    """The step the layers of one model share (one slot per ``ModelCache``; a lone ``LayerCache`` has its own)."""

    step: Step | None = None


@dataclass
class LayerCache:
    """One layer's caches (see the module docstring).

    Attributes:
        kv (PagedKVCache): latent rows ``[*, latent_dim]``.
        index (PagedKVCache): indexer keys ``[*, index_head_dim]`` (packed FP8 bytes when ``index_fp8``).
        index_fp8 (bool): whether ``index`` holds packed FP8 keys.
        index_dim (int): ``index_head_dim``.
        d_rope (int): the RoPE width of the latent rows (for the FP8 layout).
        appends (int): calls of :meth:`append` so far (host-side; which step this layer is at).
    """

    kv: PagedKVCache
    index: PagedKVCache
    index_fp8: bool
    index_dim: int
    d_rope: int
    appends: int = 0
    shared: _StepSlot = field(default_factory=_StepSlot, repr=False)

    def step(self, n: int, lengths: torch.Tensor | None, device: torch.device) -> Step:
        """The :class:`Step` of this layer's next ``n`` tokens: the one the model's layers share when it was begun
        (by :meth:`ModelCache.begin_step` or an earlier layer) at this layer's point with the same ``n`` and
        ``lengths``, else a new one, shared with the layers after it."""
        step = self.shared.step
        if (
            step is None or step.appends != self.appends or step.n != n or step.lengths_arg is not lengths
            or step.positions.device != device
        ):  # fmt: skip
            step = Step.begin(self.seq_lens, n, lengths, device, self.appends)
            self.shared.step = step
        return step

    @property
    def seq_lens(self) -> torch.Tensor:
        """``[B]`` int32: tokens held per sequence."""
        return self.kv.seq_lens

    def append(
        self, kv: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor | None, lengths: torch.Tensor | None
    ) -> None:
        """Write the new tokens' latent rows ``kv [B, n, latent_dim]`` and indexer keys ``k [B, n, D_i]`` (float8 with
        ``k_scale [B, n]`` float32 when ``index_fp8``, floating otherwise); ``lengths [B]``: real rows per sequence."""
        if self.index_fp8 != (k_scale is not None):
            raise ValueError(
                f"LayerCache.append: the cache was built with index_fp8={self.index_fp8} but k_scale is "
                f"{'missing' if k_scale is None else 'given'}"
            )
        self.kv.append(kv, lengths)
        self.appends += 1
        if k_scale is not None:
            self.index.append_rows(kv_format.pack_index_keys_fp8(k, k_scale), lengths)
        else:
            self.index.append(k, lengths)

    def select(
        self, q: torch.Tensor, weights: torch.Tensor, topk: int, starts: torch.Tensor, ends: torch.Tensor
    ) -> torch.Tensor:
        """``select_from_cache`` over this layer's keys: ``[B, n, topk]`` int32 positions."""
        fp8_dim = self.index_dim if self.index_fp8 else None
        return select_from_cache(self.index, q, weights, topk, starts=starts, ends=ends, fp8_dim=fp8_dim)

    def attend(self, q: torch.Tensor, positions: torch.Tensor, *, sm_scale: float, d_v: int) -> torch.Tensor:
        """Sparse MLA of the new queries over the cached latent rows at ``positions``.

        Every query runs as its own one-token decode problem (``[B * n, 1, H, d_qk]``): slots are global, so this is
        exact, and the decode kernels' limit on ``s_q`` does not bound a prefill.

        q is cast to a plain cache's dtype (the op needs them equal; a bfloat16 cache under a float32 model thus
        attends in bfloat16 inputs); FP8 caches take q as is (float32 runs the reference; the kernels want bf16).

        Args:
            q (torch.Tensor): ``[B, n, H, latent_dim]``.
            positions (torch.Tensor): ``[B, n, topk]`` int32 sequence positions, ``-1`` invalid; a position the
                sequence has not written is invalid too (``PagedKVCache.slots(..., written_only=True)``).

        Returns:
            torch.Tensor: ``[B, n, H, d_v]`` in q's dtype.
        """
        batch, n, heads, width = q.shape
        topk = positions.shape[-1]
        slots = self.kv.slots(positions.reshape(batch, n * topk), written_only=True).view(batch * n, 1, topk)
        q_op = q if self.kv.layout is not None else q.to(self.kv.pages.dtype)
        out, _ = ops.sparse_mla_decode(
            q_op.reshape(batch * n, 1, heads, width).contiguous(),
            self.kv.pages,
            slots.to(q.device),
            sm_scale=sm_scale,
            d_v=d_v,
            d_rope=self.d_rope,
        )
        return out.view(batch, n, heads, d_v).to(q.dtype)


class ModelCache:
    """The caches of every layer of a model for ``batch_size`` sequences of up to ``max_seq_len`` tokens.

    Like ``PagedKVCache``, each sequence gets whole pages: it holds :attr:`capacity` tokens, ``max_seq_len`` rounded
    up to a multiple of ``page_size``.

    Attributes:
        layers (list[LayerCache]): one per model layer.
        dtype (torch.dtype | str): the latent cache dtype: ``torch.bfloat16``, ``torch.float32`` or ``"fp8"``.
        max_seq_len (int): the length asked for.
    """

    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        max_seq_len: int,
        latent_dim: int,
        d_rope: int,
        index_dim: int,
        index_fp8: bool,
        dtype: CacheDtype = torch.bfloat16,
        page_size: int = 64,
        device: torch.device | str = "cpu",
    ) -> None:
        if n_layers < 1:
            raise ValueError(f"ModelCache: n_layers must be >= 1, got {n_layers}")
        if dtype not in (torch.bfloat16, torch.float32, "fp8"):
            raise ValueError(f"ModelCache: dtype must be torch.bfloat16, torch.float32 or 'fp8', got {dtype!r}")
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        index_dtype: CacheDtype = "fp8" if index_fp8 else _index_key_dtype(dtype)
        geometry = {"page_size": page_size, "device": device}
        shared = _StepSlot()  # every layer reads the step the first one begins
        self.layers = [
            LayerCache(
                kv=PagedKVCache(batch_size, max_seq_len, latent_dim, dtype=dtype, d_rope=d_rope, **geometry),
                # d_rope=0: an FP8 key row is D_i FP8 bytes and one scale (index_key_layout), no RoPE part.
                index=PagedKVCache(batch_size, max_seq_len, index_dim, dtype=index_dtype, d_rope=0, **geometry),
                index_fp8=index_fp8,
                index_dim=index_dim,
                d_rope=d_rope,
                shared=shared,
            )
            for _ in range(n_layers)
        ]
        logger.debug(
            "ModelCache: %d layers, batch %d, %d tokens, latent %s, indexer keys %s",
            n_layers, batch_size, max_seq_len, dtype, index_dtype,
        )  # fmt: skip

    @property
    def seq_lens(self) -> torch.Tensor:
        """``[B]`` int32: tokens held per sequence (every layer holds the same)."""
        return self.layers[0].seq_lens

    def begin_step(self, n: int, lengths: torch.Tensor | None = None, device: torch.device | None = None) -> Step:
        """Compute the positions, real-token mask and indexer ranges of the next ``n`` tokens once, for every layer
        (``lengths [B]``: real tokens per sequence, default ``n``; ``device``: the activations', default the
        cache's). A layer's ``forward_cached`` of the same ``n`` and ``lengths`` reads it; a layer that finds no step
        begun at its point begins one itself (:meth:`LayerCache.step`), so calling this is optional."""
        first = self.layers[0]
        step = Step.begin(first.seq_lens, n, lengths, device or first.seq_lens.device, first.appends)
        first.shared.step = step
        return step

    @property
    def batch_size(self) -> int:
        return self.layers[0].kv.block_table.shape[0]

    @property
    def capacity(self) -> int:
        """Tokens one sequence can hold: ``max_seq_len`` rounded up to whole pages."""
        return self.layers[0].kv.capacity


# --------------------------------------------------------------------------------------------------------------------
# Packed and padded batches
# --------------------------------------------------------------------------------------------------------------------


def packed_ranges(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions and indexer ranges of ``total`` packed tokens (one batch row holding several sequences).

    Args:
        cu_seqlens (torch.Tensor): ``[N + 1]`` int32/int64 offsets, ``0 = c_0 <= c_1 <= ... <= c_N = total``.
        total (int): the packed length.

    Returns:
        positions ``[1, total]`` int64 (restarting at 0 in each sequence), starts and ends ``[1, total]`` int32
        (token ``t`` of the sequence starting at ``c`` sees ``[c, t + 1)``).
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"TinyDSAModel.forward: cu_seqlens must be [N + 1] int32/int64 offsets, got {tuple(cu_seqlens.shape)} "
            f"{cu_seqlens.dtype}"
        )
    cu = cu_seqlens.to(torch.int64)
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"TinyDSAModel.forward: cu_seqlens must start at 0, never decrease and end at the packed length {total}, "
            f"got {cu.tolist()}"
        )
    t = torch.arange(total, device=cu.device)
    seq_start = cu[torch.searchsorted(cu, t, right=True) - 1]
    positions = (t - seq_start).view(1, total)
    return positions, seq_start.to(torch.int32).view(1, total), (t + 1).to(torch.int32).view(1, total)


def mask_runs(
    attention_mask: torch.Tensor, *, caller: str = "TinyDSAModel.forward"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's real tokens are.

    Args:
        attention_mask (torch.Tensor): ``[B, S]`` bool/integer/floating, 1 for a real token and 0 for padding; each
            row's real tokens must form one contiguous run (left or right padding).
        caller (str): the method the error messages name.

    Returns:
        offsets ``[B]`` int64 (the run's first column, 0 for an empty row) and lengths ``[B]`` int64.

    Raises:
        ValueError: a value other than 0/1, a wrong rank, or a row whose real tokens are not contiguous.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"{caller}: attention_mask must be [B, S], got {tuple(attention_mask.shape)}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError(f"{caller}: attention_mask must hold only 0 (padding) and 1 (real token)")
    mask = attention_mask.to(torch.int64)
    lengths = mask.sum(dim=1)
    offsets = torch.where(lengths > 0, mask.argmax(dim=1), 0)
    cols = torch.arange(mask.shape[1], device=mask.device).view(1, -1)
    run = (cols >= offsets.view(-1, 1)) & (cols < (offsets + lengths).view(-1, 1))
    if bool((run != mask.bool()).any()):
        bad = torch.nonzero((run != mask.bool()).any(dim=1)).flatten().tolist()
        raise ValueError(
            f"{caller}: attention_mask rows {bad} do not hold their real tokens (1s) as one contiguous "
            "run; only left or right padding is supported"
        )
    return offsets, lengths


def compact_rows(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x [B, S, ...]`` with each row rotated left by ``offsets [B]``: a row's real run then starts at column 0."""
    seq = x.shape[1]
    index = (torch.arange(seq, device=x.device).view(1, -1) + offsets.view(-1, 1).to(x.device)) % seq
    return x.gather(1, index.view(*index.shape, *(1,) * (x.dim() - 2)).expand(x.shape))


def restore_rows(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`compact_rows` (rotate each row right by ``offsets``)."""
    return compact_rows(x, -offsets)


def padded_ranges(lengths: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions and indexer ranges of a right-padded batch (``lengths [B]`` real tokens per row, ``seq`` columns).

    Returns:
        positions ``[B, S]`` int64 (the column), starts and ends ``[B, S]`` int32: a real token ``t`` sees ``[0, t +
        1)``, a padding query sees nothing (its output is unspecified but finite), and no query sees padding keys.
    """
    t = torch.arange(seq, device=lengths.device).view(1, -1).expand(lengths.shape[0], -1)
    ends = torch.where(t < lengths.view(-1, 1), t + 1, 0).to(torch.int32)
    return t, torch.zeros_like(ends), ends
