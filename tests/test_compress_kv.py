"""``compress_kv`` (DeepSeek-V4's gated pooling) against a loop written the obvious way, piecewise use with carried
state against one call, gradients, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dsa
from dsa import reference
from dsa.testing import assert_close, generator
from tests.strategies import SEEDS, sizes

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
TOLERANCES = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    # The weights are rounded to bfloat16 before the product, and the product and sum are bfloat16 (transformers'
    # numerics): a few bfloat16 ulps of the entry's magnitude.
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2, max_diff=1e-4),
}


def _inputs(
    seed: int, batch: int, windows: int, rate: int, width: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``kv``, ``gate`` (logits spread over a few units, so the softmax is far from uniform) and
    ``position_bias``."""
    g = generator(seed)
    kv = torch.randn((batch, windows * rate, width), generator=g).to(dtype)
    gate = (torch.randn((batch, windows * rate, width), generator=g) * 3).to(dtype)
    bias_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    bias = (torch.randn((rate, width), generator=g) * 2).to(bias_dtype)
    return kv, gate, bias


def _pooled_by_loop(
    kv: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, rate: int, overlap: bool,
    prev: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:  # fmt: skip
    """The pooling one window and one channel at a time, in float64: the list of (row, logit) slots an entry pools,
    then ``sum(softmax(logits) * rows)``."""
    batch, length, width = kv.shape
    dim = width // 2 if overlap else width
    windows = length // rate
    kv, gate, bias = kv.double(), gate.double(), bias.double()
    out = torch.zeros((batch, windows, dim), dtype=torch.float64)
    for b in range(batch):
        for w in range(windows):
            for c in range(dim):
                slots: list[tuple[float, float]] = []
                if overlap:
                    for j in range(rate):  # the previous window's Ca series
                        if w > 0:
                            row = (w - 1) * rate + j
                            slots.append((float(kv[b, row, c]), float(gate[b, row, c] + bias[j, c])))
                        elif prev is not None:
                            slots.append((float(prev[0][b, j, c]), float(prev[1][b, j, c].double() + bias[j, c])))
                    column = dim + c  # this window's Cb series
                else:
                    column = c
                for j in range(rate):
                    row = w * rate + j
                    slots.append((float(kv[b, row, column]), float(gate[b, row, column] + bias[j, column])))
                top = max(logit for _, logit in slots)
                weights = [math.exp(logit - top) for _, logit in slots]
                total = sum(weights)
                out[b, w, c] = sum(weight / total * value for weight, (value, _) in zip(weights, slots))
    return out


@given(
    seed=SEEDS, **sizes(batch=2, windows=4, rate=5, dim=6), overlap=st.booleans(), carried=st.booleans(),
    dtype=st.sampled_from(DTYPES),
)  # fmt: skip
def test_compress_kv_matches_per_window_per_channel_loop(seed, batch, windows, rate, dim, overlap, carried, dtype):
    width = 2 * dim if overlap else dim
    kv, gate, bias = _inputs(seed, batch, windows, rate, width, dtype)
    prev = None
    if overlap and carried:
        prev_kv, prev_gate, _ = _inputs(seed + 1, batch, 1, rate, dim, dtype)
        prev = (prev_kv, prev_gate)
    out = dsa.compress_kv(kv, gate, bias, rate=rate, overlap=overlap, prev_kv=prev and prev[0],
                          prev_gate=prev and prev[1])  # fmt: skip
    assert out.dtype == dtype and out.shape == (batch, windows, dim)
    expected = _pooled_by_loop(kv, gate, bias, rate, overlap, prev)
    assert_close(out, expected, **TOLERANCES[dtype])


@given(seed=SEEDS, **sizes(batch=2, rate=4, dim=5), pieces=st.lists(st.integers(0, 3), min_size=1, max_size=4),
       overlap=st.booleans())  # fmt: skip
def test_compress_kv_in_pieces_with_carried_state_equals_one_call(seed, batch, rate, dim, pieces, overlap):
    """A decoder compresses each piece of whole windows as it completes, carrying the last window's ``Ca`` rows and raw
    gates (``[..., :d]``) into the next call: the entries equal one call over the whole sequence, bit for bit."""
    width = 2 * dim if overlap else dim
    kv, gate, bias = _inputs(seed, batch, sum(pieces), rate, width, torch.float32)
    whole = dsa.compress_kv(kv, gate, bias, rate=rate, overlap=overlap)
    parts, start, prev_kv, prev_gate = [], 0, None, None
    for windows in pieces:
        end = start + windows * rate
        parts.append(dsa.compress_kv(kv[:, start:end], gate[:, start:end], bias, rate=rate, overlap=overlap,
                                     prev_kv=prev_kv, prev_gate=prev_gate))  # fmt: skip
        if overlap and windows:
            prev_kv, prev_gate = kv[:, end - rate : end, :dim], gate[:, end - rate : end, :dim]
        start = end
    assert torch.equal(torch.cat(parts, dim=1), whole)


def test_compress_kv_without_a_whole_window_gives_no_entries():
    kv, gate, bias = _inputs(3, 2, 0, 4, 6, torch.bfloat16)
    assert dsa.compress_kv(kv, gate, bias, rate=4, overlap=True).shape == (2, 0, 3)


@pytest.mark.parametrize("overlap", [False, True])
def test_compress_kv_gradients_match_finite_differences(overlap):
    kv, gate, bias = (t.requires_grad_() for t in _inputs(5, 1, 2, 3, 4, torch.float64))
    prev = [t.requires_grad_() for t in _inputs(6, 1, 1, 3, 2, torch.float64)[:2]] if overlap else [None, None]

    def pooled(kv, gate, bias, *carried):
        carried = carried or (None, None)
        return dsa.compress_kv(kv, gate, bias, rate=3, overlap=overlap, prev_kv=carried[0], prev_gate=carried[1])

    assert torch.autograd.gradcheck(pooled, (kv, gate, bias, *(t for t in prev if t is not None)))


def _bad(**changes):
    kv, gate, bias = _inputs(7, 2, 2, 4, 6, torch.float32)
    args = dict(kv=kv, gate=gate, position_bias=bias, rate=4, overlap=True, prev_kv=None, prev_gate=None)
    args.update(changes)
    return args


BAD_INPUTS = [
    (_bad(kv=torch.zeros(2, 8, 6, dtype=torch.int32)), TypeError, "compress_kv: kv must have dtype"),
    (_bad(kv=torch.zeros(2, 8)), ValueError, "compress_kv: kv must be a 3-D tensor"),
    (_bad(kv=torch.zeros(2, 7, 6)), ValueError, "compress_kv: kv must hold whole windows"),
    (_bad(kv=torch.zeros(2, 8, 5), gate=torch.zeros(2, 8, 5)), ValueError, "even W = 2 d"),
    (_bad(gate=torch.zeros(2, 8, 4)), ValueError, "compress_kv: gate must have shape"),
    (_bad(position_bias=torch.zeros(4, 6, dtype=torch.bfloat16)), TypeError, "position_bias must have dtype float32"),
    (_bad(position_bias=torch.zeros(2, 6)), ValueError, "position_bias must have shape [rate, W]"),
    (_bad(rate=0), ValueError, "compress_kv: rate must be >= 1"),
    (_bad(overlap=1), TypeError, "compress_kv: overlap must be a bool"),
    (_bad(prev_kv=torch.zeros(2, 4, 3)), ValueError, "prev_kv and prev_gate must be given together"),
    (_bad(prev_kv=torch.zeros(2, 4, 3), prev_gate=torch.zeros(2, 3, 3)), ValueError, "prev_gate must have shape"),
    (_bad(prev_kv=torch.zeros(2, 4, 3, dtype=torch.float64), prev_gate=torch.zeros(2, 4, 3)), TypeError,
     "prev_kv must have kv's dtype"),  # fmt: skip
    (_bad(kv=torch.zeros(2, 8, 3), gate=torch.zeros(2, 8, 3), position_bias=torch.zeros(4, 3), overlap=False,
          prev_kv=torch.zeros(2, 4, 1), prev_gate=torch.zeros(2, 4, 1)), ValueError, "with overlap=True"),  # fmt: skip
]


@pytest.mark.parametrize("args, error, message", BAD_INPUTS)
def test_compress_kv_rejects_bad_input_naming_the_argument(args, error, message):
    args = dict(args)
    kv, gate, bias = args.pop("kv"), args.pop("gate"), args.pop("position_bias")
    for op in (dsa.compress_kv, reference.compress_kv):
        with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
            op(kv, gate, bias, **args)
