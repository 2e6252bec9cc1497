"""Paged KV caches for decoding: bf16 (or float32) latent rows, or FlashMLA's FP8 layouts, behind a block table.

A cache holds ``num_pages`` pages of ``page_size`` token rows; slots follow ``dsa.kv_format.positions_to_slots``
(FlashMLA's ``indices_in_kvcache``) and FP8 rows ``dsa.kv_format.FP8Layout`` (656 bytes for V3.2's 576-wide row, one
row per token; 584 for MODEL1's 512-wide row, whose pages keep every token's values first and the scales after them).
"""

from __future__ import annotations

import torch

from dsa.kv_format import (
    INVALID_SLOT,
    FP8Layout,
    dequantize_kv_fp8,
    kv_page_sections,
    positions_to_slots,
    quantize_kv_fp8,
)

__all__ = ["PagedKVCache"]


class PagedKVCache:
    """A paged cache of latent rows for ``batch_size`` sequences of up to ``max_seq_len`` tokens.

    Each sequence gets ``ceil(max_seq_len / page_size)`` whole pages, so it can hold :attr:`capacity` tokens
    (``max_seq_len`` rounded up to whole pages; ``append`` refuses rows past it, not past ``max_seq_len``): a cache
    asked for 10 tokens in pages of 4 holds 12.

    Attributes:
        max_seq_len (int): the length asked for; :attr:`capacity` is what a sequence can hold.
        pages (torch.Tensor): ``[num_pages, page_size, width]`` in ``dtype`` (bf16 or float32), or ``[num_pages,
            page_size, layout.bytes_per_token]`` uint8 for ``dtype="fp8"`` with a row-per-token layout (FlashMLA's
            ``k_cache`` is ``pages.unsqueeze(2)``), or ``[num_pages, layout.page_bytes(page_size)]`` uint8 with a
            split layout such as ``MODEL1_FP8_LAYOUT`` (``dsa.kv_format.quantize_kv_pages_fp8``'s pages; FlashMLA's
            ``k_cache`` is ``dsa.kv_format.flash_mla_kv_view(pages, layout, page_size)``).
        block_table (torch.Tensor): ``[batch_size, pages_per_sequence]`` int32: the pages of each sequence in order.
        seq_lens (torch.Tensor): ``[batch_size]`` int32: tokens written per sequence.
        layout (FP8Layout | None): the FP8 layout, None for bf16/float32 caches.
        row_bytes (int): the size of one stored row (``stored_rows``, ``append_rows``): ``pages.shape[-1]``, or
            ``layout.bytes_per_token`` for a split layout.

    ``layout`` (``dtype="fp8"`` only) picks the FP8 layout; by default ``FP8Layout.for_width(width, d_rope)`` (V3.2's
    for 576 + 64). ``MODEL1_FP8_LAYOUT`` needs ``width`` 512 (its ``d_rope``, 64, is the layout's own).

    FP8 indexer keys (``width = D_i``, ``d_rope=0``, rows from ``pack_index_keys_fp8`` written with
    :meth:`append_rows`): ``layout=index_key_layout(D_i)`` stores one ``D_i + 4``-byte row per key,
    ``layout=index_key_layout(D_i, "paged")`` DeepGEMM's and vLLM's per-page layout (a page's values, then its
    scales); either way ``pages.view(num_pages, page_size, D_i + 4)`` is the ``k_cache`` of ``index_topk_decode``
    (with ``key_layout`` ``"rows"`` or ``"paged"``).
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        width: int,
        *,
        page_size: int = 64,
        dtype: torch.dtype | str = torch.bfloat16,
        d_rope: int = 64,
        device: torch.device | str = "cpu",
        layout: FP8Layout | None = None,
    ) -> None:
        if batch_size < 1 or max_seq_len < 1 or page_size < 1 or width < 1:
            raise ValueError(
                f"PagedKVCache: batch_size, max_seq_len, page_size and width must be >= 1, got "
                f"{batch_size}, {max_seq_len}, {page_size}, {width}"
            )
        self.page_size = page_size
        self.width = width
        self.max_seq_len = max_seq_len
        pages_per_sequence = -(-max_seq_len // page_size)
        num_pages = batch_size * pages_per_sequence
        if layout is not None and dtype != "fp8":
            raise ValueError(f"PagedKVCache: layout is for dtype='fp8' caches, got dtype {dtype!r}")
        if dtype == "fp8":
            self.layout: FP8Layout | None = FP8Layout.for_width(width, d_rope) if layout is None else layout
            if self.layout.width != width:
                raise ValueError(
                    f"PagedKVCache: layout {self.layout} holds {self.layout.width}-wide rows, got width {width}"
                )
            if self.layout.scales_after_values:
                shape: tuple[int, ...] = (num_pages, self.layout.page_bytes(page_size))
            else:
                shape = (num_pages, page_size, self.layout.bytes_per_token)
            self.pages = torch.zeros(shape, dtype=torch.uint8, device=device)
        elif dtype in (torch.bfloat16, torch.float32):
            self.layout = None
            self.pages = torch.zeros((num_pages, page_size, width), dtype=dtype, device=device)
        else:
            raise ValueError(f"PagedKVCache: dtype must be torch.bfloat16, torch.float32 or 'fp8', got {dtype!r}")
        # Each sequence gets its own run of pages; any permutation of pages would serve (a serving stack's allocator).
        self.block_table = torch.arange(num_pages, dtype=torch.int32, device=device).view(batch_size, pages_per_sequence)
        self.seq_lens = torch.zeros(batch_size, dtype=torch.int32, device=device)

    @property
    def capacity(self) -> int:
        """Tokens one sequence can hold: ``max_seq_len`` rounded up to whole pages (``>= max_seq_len``)."""
        return self.block_table.shape[1] * self.page_size

    @property
    def num_slots(self) -> int:
        return self.pages.shape[0] * self.page_size

    @property
    def row_bytes(self) -> int:
        """The last dim of a stored row: ``pages.shape[-1]``, or ``layout.bytes_per_token`` for split pages."""
        split = self.layout is not None and self.layout.scales_after_values
        return self.layout.bytes_per_token if split else self.pages.shape[-1]

    def slots(self, positions: torch.Tensor, *, written_only: bool = False) -> torch.Tensor:
        """The slots of token ``positions`` (``[B, n]`` integers, one row per sequence): ``INVALID_SLOT`` where a
        position is negative or beyond the sequence's pages.

        A position on the sequence's pages that it has not written yet (``>= seq_lens[b]``) still maps to its slot,
        whose row holds zeros (or whatever was written there before); with ``written_only=True`` it is
        ``INVALID_SLOT`` instead, so no op reads it (the serving path, ``dsa.serving.model_cache``, asks for that; a
        tensor op, no host sync)."""
        slots = positions_to_slots(self.block_table, self.page_size, positions, num_slots=self.num_slots)
        if written_only:
            written = positions.to(self.seq_lens.device) < self.seq_lens.view(-1, 1)
            slots = torch.where(written.to(slots.device), slots, INVALID_SLOT)
        return slots

    def append(self, kv: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Write the next tokens of every sequence in one call.

        Args:
            kv (torch.Tensor): ``[B, n, width]``: row ``i`` of sequence ``b`` goes to position ``seq_lens[b] + i``
                (quantised for an FP8 cache; cast to the cache dtype otherwise).
            lengths (torch.Tensor | None): ``[B]``: how many of the ``n`` rows of each sequence are real (a ragged
                chunk); default all ``n``.

        Returns:
            torch.Tensor: ``[B, n]`` int32, the slot of each written row (``INVALID_SLOT`` for rows past ``lengths``).

        Raises:
            ValueError: a shape mismatch, or a sequence would grow past its pages.
        """
        batch = self.block_table.shape[0]
        if kv.dim() != 3 or kv.shape[0] != batch or kv.shape[2] != self.width:
            raise ValueError(f"PagedKVCache.append: kv must be [{batch}, n, {self.width}], got {tuple(kv.shape)}")
        slots, new_lens = self._reserve(kv.shape[1], lengths, kv.device, "PagedKVCache.append")
        rows = quantize_kv_fp8(kv.to(torch.bfloat16), self.layout) if self.layout is not None else kv.to(self.pages.dtype)
        self._write(rows, slots, new_lens)
        return slots

    def append_rows(self, rows: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Write the next rows of every sequence **as stored**: no quantisation, no cast (``append`` encodes first).

        For rows a caller encoded itself, e.g. the indexer's own FP8 keys and scales packed by
        :func:`pack_index_keys_fp8` into an FP8 cache with ``d_rope=0`` (re-quantising them with this module's recipe
        would change the keys the indexer selects with).

        Args:
            rows (torch.Tensor): ``[B, n, pages.shape[-1]]`` in ``pages.dtype`` (uint8 bytes for an FP8 cache).
            lengths (torch.Tensor | None): ``[B]``, as in :meth:`append`.

        Returns:
            torch.Tensor: ``[B, n]`` int32 slots, as in :meth:`append`.
        """
        batch, row = self.block_table.shape[0], self.row_bytes
        if rows.dim() != 3 or rows.shape[0] != batch or rows.shape[2] != row or rows.dtype != self.pages.dtype:
            raise ValueError(
                f"PagedKVCache.append_rows: rows must be [{batch}, n, {row}] {self.pages.dtype}, got "
                f"{tuple(rows.shape)} {rows.dtype}"
            )
        slots, new_lens = self._reserve(rows.shape[1], lengths, rows.device, "PagedKVCache.append_rows")
        self._write(rows, slots, new_lens)
        return slots

    def _reserve(
        self, n: int, lengths: torch.Tensor | None, device: torch.device, caller: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots ``[B, n]`` int32 of the next ``n`` rows (``INVALID_SLOT`` past ``lengths``) and the new lengths.

        One host sync per append, the one the lengths require: both checks (``lengths`` in ``[0, n]``, the new lengths
        within the capacity) are reduced to one flag read together; the error path alone reads more."""
        batch = self.block_table.shape[0]
        given = lengths is not None
        if lengths is None:
            lengths = torch.full((batch,), n, dtype=torch.int64, device=device)
        lengths = lengths.to(device=self.seq_lens.device, dtype=torch.int64)
        new_lens = self.seq_lens.to(torch.int64) + lengths
        bad_lengths = ((lengths < 0) | (lengths > n)).any() if given else None
        over = (new_lens > self.capacity).any()
        if bool(over if bad_lengths is None else over | bad_lengths):
            if bad_lengths is not None and bool(bad_lengths):
                raise ValueError(f"{caller}: lengths must lie in [0, {n}], got {lengths.tolist()}")
            raise ValueError(
                f"{caller}: sequences would hold {new_lens.tolist()} tokens, over the capacity "
                f"{self.capacity} (max_seq_len {self.max_seq_len} rounded up to pages of {self.page_size})"
            )
        offsets = torch.arange(n, device=self.seq_lens.device).view(1, n)
        positions = torch.where(offsets < lengths.view(-1, 1), self.seq_lens.view(-1, 1).to(torch.int64) + offsets, -1)
        return self.slots(positions), new_lens

    def _sections(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Split pages' values and scale groups as ``[num_pages, page_size, *]`` views (None for row-per-token)."""
        if self.layout is None or not self.layout.scales_after_values:
            return None
        return kv_page_sections(self.pages, self.layout, self.page_size)

    def _write(self, rows: torch.Tensor, slots: torch.Tensor, new_lens: torch.Tensor) -> None:
        valid = slots >= 0
        picked = slots[valid].to(device=self.pages.device, dtype=torch.int64)
        written = rows.to(self.pages.device)[valid.to(rows.device)]
        sections = self._sections()
        if sections is None:
            flat = self.pages.view(self.num_slots, self.pages.shape[-1])
            flat[picked] = written
        else:
            # A token's row is split between the page's two sections: its values, then its scale group.
            values, scales = sections
            page, offset = picked // self.page_size, picked % self.page_size
            split = self.layout.value_bytes
            values[page, offset] = written[:, :split]
            scales[page, offset] = written[:, split:]
        self.seq_lens = new_lens.to(torch.int32)

    def _read(self, slots: torch.Tensor) -> torch.Tensor:
        """The stored rows at in-range ``slots`` (int64, any shape): ``[..., row_bytes]``."""
        sections = self._sections()
        if sections is None:
            return self.pages.view(self.num_slots, self.pages.shape[-1])[slots]
        page, offset = slots // self.page_size, slots % self.page_size
        return torch.cat([sections[0][page, offset], sections[1][page, offset]], dim=-1)

    def stored_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """The rows at ``slots`` (any shape of integers) **as stored** (``[..., row_bytes]``, ``pages.dtype``: FP8
        bytes are not dequantised; a split layout's token row is its values then its scale group); zero at invalid
        slots."""
        slots = slots.to(torch.int64)
        valid = (slots >= 0) & (slots < self.num_slots)
        rows = self._read(torch.where(valid, slots, 0))
        return torch.where(valid.unsqueeze(-1), rows, torch.zeros((), dtype=rows.dtype, device=rows.device))

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """The rows at ``slots`` (any shape of integers) as ``[..., width]``: dequantised (bf16) for an FP8 cache, in
        the cache dtype otherwise; zero at invalid slots (``-1`` or out of range)."""
        slots = slots.to(torch.int64)
        valid = (slots >= 0) & (slots < self.num_slots)
        rows = self._read(torch.where(valid, slots, 0))
        if self.layout is not None:
            rows = dequantize_kv_fp8(rows, self.layout)
        return torch.where(valid.unsqueeze(-1), rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
