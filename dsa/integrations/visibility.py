"""Which cached keys each query may see, as the ``starts``/``ends`` ranges ``dsa.ops.index_topk`` takes.

Frameworks describe visibility with a padding mask (``[B, T]``, 1 at real tokens) and the causal rule, or with a
dense ``[B, 1, S, T]`` mask. The DSA ops take one contiguous key range per query instead (``starts[b, t] <= s <
ends[b, t]``), which costs O(B S) memory where the dense mask costs O(B S T). Left and right padding, a KV cache in
front of the queries and packed sequences all give one range per query; a mask with holes in a query's visible keys
does not, and is refused with a ``ValueError`` (silently attending across a hole would be wrong).

Coordinates are cache positions: the keys are the cache's rows ``0 .. T-1`` and the queries of one forward are the
``S`` newest tokens, at cache positions ``past .. past + S - 1``. Everything here is plain PyTorch (no framework is
imported) and runs on the masks' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KeyRanges", "from_dense_mask", "from_layer_mask", "from_packed_positions", "from_padding_mask"]


@dataclass(frozen=True)
class KeyRanges:
    """One contiguous range of visible key positions per query.

    Attributes:
        starts (torch.Tensor): ``[B, S]`` int32, the first visible cache position of each query.
        ends (torch.Tensor): ``[B, S]`` int32, one past the last; ``starts == ends`` for a query that sees nothing
            (a padding token in front of a left-padded prompt).
    """

    starts: torch.Tensor
    ends: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """``[B, S]``, the queries the ranges describe."""
        return self.starts.shape

    def contiguous(self) -> KeyRanges:
        """The ranges with contiguous tensors (they are built so): frameworks that pass prepared masks on call
        ``.contiguous()`` on each (transformers 5.23's ``generate`` does)."""
        if self.starts.is_contiguous() and self.ends.is_contiguous():
            return self
        return KeyRanges(starts=self.starts.contiguous(), ends=self.ends.contiguous())


def _ranges_without_holes(
    visible_count: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, what: str
) -> KeyRanges:
    """``KeyRanges(starts, ends)`` after checking that every query sees every key of its range (``visible_count``
    ``[B, S]`` keys in all): a hole would make the range claim keys the mask hides."""
    if bool((visible_count != (ends - starts)).any()):
        raise ValueError(
            f"{what}: a query's visible keys are not one contiguous range (the mask has a hole); DSA selects from "
            "one key range per query, which covers left or right padding, a KV cache and packed sequences"
        )
    return KeyRanges(starts=starts.to(torch.int32).contiguous(), ends=ends.to(torch.int32).contiguous())


def from_padding_mask(
    padding_mask: torch.Tensor | None, *, batch: int, seq: int, past: int, device: torch.device
) -> KeyRanges:
    """Causal visibility under a padding mask: the query at cache position ``p = past + t`` sees every ``s <= p``
    whose ``padding_mask[b, s]`` is set (as transformers' ``create_causal_mask`` builds it, densely).

    Args:
        padding_mask (torch.Tensor | None): ``[B, L]``, any dtype (nonzero = a real token), usually ``L = past +
            seq``; a shorter mask counts the missing tail positions as padding (transformers pads it with zeros),
            a longer one's extra positions are beyond every query anyway. None: nothing is padded.
        batch (int): ``B``.
        seq (int): ``S``, the queries of this forward.
        past (int): tokens already in the cache before this forward.
        device (torch.device): where the ranges live (the model's).

    Returns:
        KeyRanges ``[B, S]``.

    Raises:
        ValueError: the mask hides a key between two keys a query sees (a hole).
    """
    positions = torch.arange(seq, device=device, dtype=torch.int64) + past
    if padding_mask is None:
        starts = torch.zeros((batch, seq), dtype=torch.int64, device=device)
        return KeyRanges(starts=starts.to(torch.int32), ends=(positions + 1).expand(batch, seq).to(torch.int32))
    if padding_mask.dim() != 2 or padding_mask.shape[0] != batch:
        raise ValueError(
            f"from_padding_mask: padding_mask must be [B={batch}, L], got shape {tuple(padding_mask.shape)}"
        )
    real = padding_mask.to(device=device) != 0
    needed = past + seq
    if real.shape[1] < needed:
        real = torch.nn.functional.pad(real, (0, needed - real.shape[1]), value=False)
    length = real.shape[1]
    index = torch.arange(length, device=device, dtype=torch.int64)
    # The last real key at or before each cache position (-1 where there is none), then read at each query.
    last_real = torch.cummax(torch.where(real, index, -1), dim=1).values
    ends = last_real[:, positions] + 1
    first_real = torch.where(real.any(dim=1), real.to(torch.int8).argmax(dim=1), length)
    starts = torch.minimum(first_real.unsqueeze(1).expand(batch, seq), ends)
    prefix = torch.nn.functional.pad(real.to(torch.int64).cumsum(dim=1), (1, 0))
    count = prefix.gather(1, ends) - prefix.gather(1, starts)
    return _ranges_without_holes(count, starts, ends, "from_padding_mask")


def from_packed_positions(position_ids: torch.Tensor, *, batch: int) -> KeyRanges | None:
    """Visibility of sequences packed along one row (no padding mask, no cache): a new sequence starts wherever a
    position id does not continue the previous one by 1 (transformers' ``find_packed_sequence_indices`` rule); each
    query sees its own sequence up to itself.

    Args:
        position_ids (torch.Tensor): ``[B, S]`` or ``[1, S]`` integer positions of the queries.
        batch (int): ``B``.

    Returns:
        KeyRanges ``[B, S]``, or None when no row is packed (plain causal attention).
    """
    positions = position_ids.expand(batch, -1).to(torch.int64)
    seq = positions.shape[1]
    starts_new = torch.ones_like(positions, dtype=torch.bool)
    starts_new[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    if not bool(starts_new[:, 1:].any()):
        return None
    index = torch.arange(seq, device=positions.device, dtype=torch.int64)
    starts = torch.cummax(torch.where(starts_new, index, 0), dim=1).values
    ends = (index + 1).expand(batch, seq)
    return KeyRanges(starts=starts.to(torch.int32).contiguous(), ends=ends.to(torch.int32).contiguous())


def from_dense_mask(mask: torch.Tensor) -> KeyRanges:
    """The ranges a dense mask describes (a mask someone built already: this costs what the mask costs).

    Args:
        mask (torch.Tensor): ``[B, 1, S, T]`` or ``[B, S, T]``: bool (True = visible), or additive float (0 =
            visible, ``-inf`` or at most half the dtype's minimum = hidden, as transformers' eager masks are).

    Returns:
        KeyRanges ``[B, S]``.

    Raises:
        ValueError: a float mask with values other than 0 and "hidden" (a soft bias), or a hole.
    """
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"from_dense_mask: mask must be [B, 1, S, T], got shape {tuple(mask.shape)}")
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise ValueError(f"from_dense_mask: mask must be [B, 1, S, T] or [B, S, T], got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        visible = mask
    else:
        visible = mask == 0
        hidden = mask <= torch.finfo(mask.dtype).min / 2
        if not bool((visible | hidden).all()):
            raise ValueError("from_dense_mask: an additive mask must hold only 0 (visible) and -inf/min (hidden)")
    length = visible.shape[-1]
    any_visible = visible.any(dim=-1)
    as_int = visible.to(torch.int8)
    starts = torch.where(any_visible, as_int.argmax(dim=-1), 0)
    ends = torch.where(any_visible, length - as_int.flip(-1).argmax(dim=-1), 0)
    return _ranges_without_holes(visible.sum(dim=-1), starts, ends, "from_dense_mask")


def from_layer_mask(
    attention_mask: object, *, batch: int, seq: int, past: int, offset: int, device: torch.device, op: str
) -> KeyRanges:
    """A layer's visibility from what its decoder layer passed: ``apply_dsa``'s model wrapper's ``KeyRanges`` (the
    usual case), a dense mask someone built (read once), or None (causal behind the cache).

    Args:
        attention_mask (object): ``KeyRanges`` ``[B, S]``, a dense ``[B, 1, S, L]`` mask whose column ``j`` is cache
            position ``offset + j``, or None.
        batch (int): ``B``.
        seq (int): ``S``, the queries of this forward.
        past (int): tokens in the cache before this forward (used when the mask is None).
        offset (int): the dense mask's first column's cache position (0 when its columns are the whole cache).
        device (torch.device): where the ranges live.
        op (str): the layer forward's name, for messages.

    Returns:
        KeyRanges ``[B, S]`` in cache positions.

    Raises:
        ValueError: ranges of another shape, or a dense mask with a hole.
        TypeError: anything else.
    """
    if isinstance(attention_mask, KeyRanges):
        if tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(
                f"{op}: attention_mask ranges are {tuple(attention_mask.shape)}, expected [B={batch}, S={seq}]"
            )
        return attention_mask
    if isinstance(attention_mask, torch.Tensor):
        ranges = from_dense_mask(attention_mask)
        return ranges if offset == 0 else KeyRanges(starts=ranges.starts + offset, ends=ranges.ends + offset)
    if attention_mask is None:
        return from_padding_mask(None, batch=batch, seq=seq, past=past, device=device)
    raise TypeError(
        f"{op}: attention_mask must be the KeyRanges apply_dsa's model wrapper passes, a dense [B, 1, S, T] mask or "
        f"None, got {type(attention_mask).__name__}"
    )
