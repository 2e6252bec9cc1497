"""Every bad input the contract lists (the README's "Bad input") raises ValueError/TypeError naming the op, the
argument and the expectation (``sparse_mla: q must ...``: two ops take a ``q``)."""

from __future__ import annotations

import pytest
import torch

from dsa import reference, validation

B, S, S_KV, H, D_QK, D_V, K = 2, 3, 7, 4, 16, 8, 5
H_I, D_I = 3, 8


def _mla(**overrides):
    args = dict(
        q=torch.randn(B, S, H, D_QK),
        kv=torch.randn(B, S_KV, D_QK),
        indices=torch.randint(-1, S_KV, (B, S, K), dtype=torch.int32),
        sm_scale=0.1,
        d_v=D_V,
        topk_length=None,
        attn_sink=None,
    )
    args.update(overrides)
    return args


def _idx(**overrides):
    args = dict(
        q=torch.randn(B, S, H_I, D_I).to(torch.bfloat16),
        k=torch.randn(B, S_KV, D_I).to(torch.bfloat16),
        weights=torch.randn(B, S, H_I),
        k_scale=None,
        starts=None,
        ends=None,
    )
    args.update(overrides)
    return args


MLA_CASES = [
    ("q as list", dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    ("q int", dict(q=torch.ones(B, S, H, D_QK, dtype=torch.int32)), TypeError, "q must have dtype"),
    ("q rank", dict(q=torch.randn(S, H, D_QK)), ValueError, "q must be a 4-D tensor [B, S, H, d_qk]"),
    ("kv rank", dict(kv=torch.randn(B, S_KV, 1, D_QK)), ValueError, "kv must be a 3-D tensor"),
    ("kv dtype", dict(kv=torch.randn(B, S_KV, D_QK, dtype=torch.float64)), TypeError, "kv must have the same dtype as q"),
    ("kv batch", dict(kv=torch.randn(B + 1, S_KV, D_QK)), ValueError, "kv must have batch size"),
    ("kv width", dict(kv=torch.randn(B, S_KV, D_QK + 1)), ValueError, "kv must have d_qk"),
    ("indices int64", dict(indices=torch.zeros(B, S, K, dtype=torch.int64)), TypeError, "indices must have dtype int32"),
    ("indices rank", dict(indices=torch.zeros(B, S, dtype=torch.int32)), ValueError, "indices must be a 3-D tensor"),
    ("indices rows", dict(indices=torch.zeros(B, S + 1, K, dtype=torch.int32)), ValueError, "indices must have shape [B, S, k]"),
    ("empty q", dict(q=torch.randn(B, 0, H, D_QK), indices=torch.zeros(B, 0, K, dtype=torch.int32)), ValueError, "q must not be empty"),
    ("empty kv", dict(kv=torch.randn(B, 0, D_QK)), ValueError, "kv must not be empty"),
    ("k = 0", dict(indices=torch.zeros(B, S, 0, dtype=torch.int32)), ValueError, "indices must not be empty"),
    ("sm_scale missing", dict(sm_scale=None), TypeError, "sm_scale must be a float"),
    ("sm_scale negative", dict(sm_scale=-1.0), ValueError, "sm_scale must be a finite positive"),
    ("sm_scale nan", dict(sm_scale=float("nan")), ValueError, "sm_scale must be a finite positive"),
    ("d_v > d_qk", dict(d_v=D_QK + 1), ValueError, "d_v must be <= d_qk"),
    ("d_v zero", dict(d_v=0), ValueError, "d_v must be >= 1"),
    ("d_v float", dict(d_v=8.0), TypeError, "d_v must be an int"),
    ("topk_length dtype", dict(topk_length=torch.zeros(B, S)), TypeError, "topk_length must have dtype int32"),
    ("topk_length shape", dict(topk_length=torch.zeros(B, S + 1, dtype=torch.int32)), ValueError, "topk_length must have shape [B, S]"),
    ("sink shape", dict(attn_sink=torch.zeros(H + 1)), ValueError, "attn_sink must have shape [H]"),
    ("sink dtype", dict(attn_sink=torch.zeros(H, dtype=torch.bfloat16)), TypeError, "attn_sink must have dtype float32"),
    ("device", dict(indices=torch.zeros(B, S, K, dtype=torch.int32, device="meta")), ValueError, "indices must be on the same device as q"),
]


def test_kernel_rules_are_stricter_in_dtype_only():
    """The kernel rules reject dtypes the kernels do not take; strides are never an error (the op lays inputs out)."""
    with pytest.raises(TypeError, match="q must have dtype bfloat16"):
        validation.check_sparse_mla(*_mla(q=torch.randn(B, S, H, D_QK)).values(), kernel=True)
    strided = _mla(
        q=torch.randn(B, H, S, D_QK).bfloat16().transpose(1, 2),
        kv=torch.randn(B, S_KV, 2 * D_QK).bfloat16()[..., ::2],
        indices=torch.randint(-1, S_KV, (B, 1, K), dtype=torch.int32).expand(B, S, K),
        topk_length=torch.randint(0, K, (S, B), dtype=torch.int32).t(),
        attn_sink=torch.randn(2 * H)[::2],
    )
    assert not any(t.is_contiguous() for t in strided.values() if isinstance(t, torch.Tensor))
    validation.check_sparse_mla(*strided.values(), kernel=True)
    scores = torch.randn(B, S_KV, S).transpose(1, 2)
    validation.check_topk_indices(scores, 2, kernel=True)
    index = _idx(q=torch.randn(B, S, D_I, H_I).bfloat16().transpose(2, 3), weights=torch.randn(B, H_I, S).mT)
    validation.check_index_scores(*index.values(), kernel=True)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` that starts one element past a 16-byte boundary (a view into a larger buffer)."""
    buffer = torch.empty(t.numel() + 16, dtype=t.dtype)
    start = next(i for i in range(1, 17) if (buffer.data_ptr() + i * t.element_size()) % 16)
    view = buffer[start : start + t.numel()].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),
        lambda t: torch.cat([t, t], dim=-1)[..., ::2],
        lambda t: t[:, :1].expand_as(t),
        _misaligned,
    ],
    ids=["transposed", "sliced", "expanded", "misaligned"],
)
def test_kernel_layout_copies_once_into_row_major_aligned_memory(make):
    """``kernel_layout`` returns an aligned row-major tensor holding the same values; a tensor already so laid out
    comes back as the same object (no copy)."""
    base = torch.randn(3, 4, 5).bfloat16()
    t = make(base)
    laid_out = validation.kernel_layout(t)
    assert laid_out.is_contiguous() and laid_out.data_ptr() % validation.KERNEL_ALIGNMENT_BYTES == 0
    assert torch.equal(laid_out, t) and laid_out.data_ptr() != t.data_ptr()
    assert validation.kernel_layout(laid_out) is laid_out
    assert validation.kernel_layout(None) is None


def test_kernel_layout_copy_passes_gradients_to_the_strided_original():
    leaf = torch.randn(4, 6, requires_grad=True)
    laid_out = validation.kernel_layout(leaf.t())
    assert laid_out.is_contiguous() and laid_out.requires_grad
    (laid_out * torch.arange(24.0).view(6, 4)).sum().backward()
    assert torch.equal(leaf.grad, torch.arange(24.0).view(6, 4).t())


INDEX_CASES = [
    ("q int32", dict(q=torch.randint(0, 3, (B, S, H_I, D_I), dtype=torch.int32)), TypeError, "q must have dtype"),
    ("q rank", dict(q=torch.randn(S, H_I, D_I).bfloat16()), ValueError, "q must be a 4-D tensor [B, S, H_i, D_i]"),
    ("k dtype", dict(k=torch.randn(B, S_KV, D_I)), TypeError, "k must have the same dtype as q"),
    ("k dim", dict(k=torch.randn(B, S_KV, D_I + 1).bfloat16()), ValueError, "k must have head dim D_i"),
    ("k batch", dict(k=torch.randn(B + 1, S_KV, D_I).bfloat16()), ValueError, "k must have batch size"),
    ("weights dtype", dict(weights=torch.randn(B, S, H_I).bfloat16()), TypeError, "weights must have dtype float32"),
    ("weights shape", dict(weights=torch.randn(B, S, H_I + 1)), ValueError, "weights must have shape [B, S, H_i]"),
    ("fp8 without scale", dict(q=torch.randn(B, S, H_I, D_I).to(torch.float8_e4m3fn),
                               k=torch.randn(B, S_KV, D_I).to(torch.float8_e4m3fn)), ValueError, "k_scale [B, S_kv] float32 is required"),
    ("bf16 with scale", dict(k_scale=torch.ones(B, S_KV)), ValueError, "k_scale must be None"),
    ("starts alone", dict(starts=torch.zeros(B, S, dtype=torch.int32)), ValueError, "starts and ends must be given together"),
    ("ends dtype", dict(starts=torch.zeros(B, S, dtype=torch.int32), ends=torch.zeros(B, S)), TypeError, "ends must have dtype int32"),
    ("starts shape", dict(starts=torch.zeros(B, S + 1, dtype=torch.int32), ends=torch.zeros(B, S, dtype=torch.int32)), ValueError, "starts must have shape [B, S]"),
    ("empty k", dict(k=torch.randn(B, 0, D_I).bfloat16()), ValueError, "k must not be empty"),
    ("device", dict(weights=torch.randn(B, S, H_I, device="meta")), ValueError, "weights must be on the same device as q"),
]


# (op, valid arguments maker, the op's positional arguments, its bad-input cases)
BAD_INPUT_OPS = (
    ("sparse_mla", _mla, ("q", "kv", "indices"), MLA_CASES),
    ("index_scores", _idx, ("q", "k", "weights"), INDEX_CASES),
)


@pytest.mark.parametrize(
    "op, make_args, positional, case",
    [(op, make, pos, case) for op, make, pos, cases in BAD_INPUT_OPS for case in cases],
    ids=[f"{op}: {case[0]}" for op, _, _, cases in BAD_INPUT_OPS for case in cases],
)
def test_reference_rejects_bad_input(op, make_args, positional, case):
    """Each case's override of valid arguments raises the case's error, its message naming the op and argument."""
    _, overrides, error, message = case
    args = make_args(**overrides)
    leading = [args.pop(name) for name in positional]
    with pytest.raises(error) as info:
        getattr(reference, op)(*leading, **args)
    assert str(info.value).startswith(f"{op}: {message}"), str(info.value)


@pytest.mark.parametrize(
    "scores, k, error, message",
    [
        (torch.randn(B, S, S_KV), 0, ValueError, "k must be >= 1"),
        (torch.randn(B, S, S_KV), 2.5, TypeError, "k must be an int"),
        (torch.randn(B, S, S_KV), True, TypeError, "k must be an int"),
        (torch.randn(B, S, S_KV).bfloat16(), 2, TypeError, "scores must have dtype float32"),
        (torch.randn(S, S_KV), 2, ValueError, "scores must be a 3-D tensor [B, S, S_kv]"),
        (torch.randn(B, S, 0), 2, ValueError, "scores must not be empty"),
        ("scores", 2, TypeError, "scores must be a torch.Tensor"),
    ],
    ids=["k zero", "k float", "k bool", "bf16 scores", "rank", "empty", "not a tensor"],
)
def test_topk_indices_rejects_bad_input(scores, k, error, message):
    with pytest.raises(error) as info:
        reference.topk_indices(scores, k)
    assert str(info.value).startswith(f"topk_indices: {message}"), str(info.value)
