"""The DSA modules and indexer training, checked against DeepSeek-V3.2's formulation written out independently."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from dsa import training
from dsa.modules import (
    DSAConfig,
    DSAttention,
    LightningIndexer,
    TinyDSAModel,
    apply_rope,
    hadamard_transform,
    quantize_fp8_blockwise,
    rope_cos_sin,
    rope_inv_freq,
)
from dsa.testing import assert_close, assert_topk_valid

SEQ = 24  # > tiny index_topk (16): later queries are genuinely sparse
FP8_SCORE_MAX_DIFF = 1.5e-3


# The tensors are tiny: on a 2-core machine a second thread makes every op ~30x slower (contention), not faster.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(**overrides: object) -> DSAConfig:
    return DSAConfig.tiny(init_std=0.2, **overrides)


def _attention(dtype: torch.dtype = torch.float64, **overrides: object) -> DSAttention:
    torch.manual_seed(0)
    attn = DSAttention(_tiny(**overrides))
    for p in attn.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    return attn.to(dtype)


# --------------------------------------------------------------------------------------------------------------------
# An independent V3.2 formulation (complex-number RoPE, explicit Hadamard matrix, unabsorbed MHA with index mask)
# --------------------------------------------------------------------------------------------------------------------


def _freqs_cis(config: DSAConfig, seq: int) -> torch.Tensor:
    angles = torch.outer(torch.arange(seq).float(), rope_inv_freq(config))
    return torch.polar(torch.ones_like(angles), angles)


def _rope_complex(x: torch.Tensor, freqs_cis: torch.Tensor, *, interleaved: bool) -> torch.Tensor:
    """V3.2's apply_rotary_emb (with the later ``interleaved`` switch): x ``[B, S, H, r]``."""
    dtype, shape = x.dtype, x.shape
    xf = x.double()
    if not interleaved:
        xf = xf.view(*shape[:-1], 2, -1).transpose(-1, -2).contiguous()
    xc = torch.view_as_complex(xf.reshape(*shape[:-1], -1, 2))
    y = torch.view_as_real(xc * freqs_cis.view(1, shape[1], 1, -1).to(torch.complex128)).flatten(3)
    if not interleaved:
        y = torch.cat([y[..., 0::2], y[..., 1::2]], dim=-1)
    return y.to(dtype)


def _hadamard_matrix(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _v32_indexer_scores(indexer: LightningIndexer, x: torch.Tensor, q_lora: torch.Tensor) -> torch.Tensor:
    config = indexer.config
    b, s, _ = x.shape
    h, d, r = config.index_n_heads, config.index_head_dim, config.qk_rope_head_dim
    freqs = _freqs_cis(config, s)
    q = indexer.wq_b(q_lora).view(b, s, h, d)
    q = torch.cat([_rope_complex(q[..., :r], freqs, interleaved=False), q[..., r:]], -1)
    k = indexer.k_norm(indexer.wk(x))
    k = torch.cat([_rope_complex(k[..., :r].unsqueeze(2), freqs, interleaved=False).squeeze(2), k[..., r:]], -1)
    hadamard = _hadamard_matrix(d).to(q.dtype) * d**-0.5
    q, k = q @ hadamard, k @ hadamard
    weights = indexer.weights_proj(x) * h**-0.5 * d**-0.5
    scores = torch.einsum("bshd,btd->bsht", q, k).relu().mul(weights.unsqueeze(-1)).sum(2)
    causal = torch.full((s, s), float("-inf"), dtype=scores.dtype).triu(1)
    return scores + causal


def _v32_attention(attn: DSAttention, x: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
    """V3.2's MHA prefill: unabsorbed per-head keys/values, scores + index mask (+ causal), softmax, wo."""
    c = attn.config
    b, s, _ = x.shape
    h = c.n_heads
    freqs = _freqs_cis(c, s)
    q = attn.wq_b(attn.q_norm(attn.wq_a(x))).view(b, s, h, c.qk_head_dim)
    q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], -1)
    q = torch.cat([q_nope, _rope_complex(q_pe, freqs, interleaved=True)], -1)
    kv, k_pe = attn.wkv_a(x).split([c.kv_lora_rank, c.qk_rope_head_dim], -1)
    k_pe = _rope_complex(k_pe.unsqueeze(2), freqs, interleaved=True)
    kv = attn.wkv_b(attn.kv_norm(kv)).view(b, s, h, c.qk_nope_head_dim + c.v_head_dim)
    k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], -1)
    k = torch.cat([k_nope, k_pe.expand(-1, -1, h, -1)], -1)
    scores = torch.einsum("bshd,bthd->bsht", q, k) * c.sm_scale
    mask = torch.full((b, s, s), float("-inf"), dtype=scores.dtype).triu(1)
    if indices is not None:
        index_mask = torch.full((b, s, s + 1), float("-inf"), dtype=scores.dtype)
        index_mask.scatter_(-1, torch.where(indices >= 0, indices.long(), s), 0.0)
        mask = mask + index_mask[..., :s]
    probs = (scores + mask.unsqueeze(2)).softmax(-1)
    return attn.wo(torch.einsum("bsht,bthd->bshd", probs, v).flatten(2))


def _inputs(attn: DSAttention, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, SEQ, attn.config.dim, generator=g).to(attn.wq_a.weight.dtype)


def _indexer_output(attn: DSAttention, x: torch.Tensor):  # noqa: ANN202
    cos, sin = rope_cos_sin(attn.inv_freq, x.shape[1], x.device)
    _, _, q_lora = attn.latent_qkv(x, cos, sin)
    return attn.indexer(x, q_lora, cos, sin, scores="dense"), q_lora


# --------------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 8, 128])
def test_hadamard_transform_is_the_orthonormal_sylvester_matrix(n: int) -> None:
    x = torch.randn(3, 5, n, dtype=torch.float64)
    expected = x @ (_hadamard_matrix(n) * n**-0.5)
    assert_close(hadamard_transform(x), expected, atol=1e-6, rtol=1e-6)
    assert_close(hadamard_transform(hadamard_transform(x)), x, atol=1e-6, rtol=1e-6, name="involution")
    assert hadamard_transform(x.bfloat16()).dtype == torch.bfloat16


def test_hadamard_transform_rejects_other_sizes() -> None:
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_transform(torch.randn(4, 12))


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_layouts_match_v32_complex_formulation(interleaved: bool) -> None:
    config = _tiny()
    x = torch.randn(2, 10, 3, config.qk_rope_head_dim, dtype=torch.float64)
    cos, sin = rope_cos_sin(rope_inv_freq(config), 10, x.device)
    expected = _rope_complex(x, _freqs_cis(config, 10), interleaved=interleaved)
    assert_close(apply_rope(x, cos, sin, interleaved=interleaved), expected, atol=1e-6, rtol=1e-6)
    other = apply_rope(x, cos, sin, interleaved=not interleaved)
    assert not torch.allclose(other, expected, atol=1e-3), "the two layouts must differ"


def test_rope_frequencies_and_softmax_scale_follow_v32() -> None:
    config = DSAConfig()
    assert config.latent_dim == 576 and config.qk_head_dim == 192
    mscale = 0.1 * math.log(40) + 1
    assert config.sm_scale == pytest.approx(192**-0.5 * mscale**2)
    base = 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    yarn = rope_inv_freq(config)
    # YaRN keeps the fastest-rotating dims and divides the slowest by rope_factor.
    assert_close(yarn[:4], base[:4], atol=0, rtol=1e-6, name="high frequencies")
    assert_close(yarn[-4:], base[-4:] / 40, atol=0, rtol=1e-6, name="low frequencies")
    short = DSAConfig(max_seq_len=4096)
    assert short.sm_scale == pytest.approx(192**-0.5)
    assert_close(rope_inv_freq(short), base, atol=0, rtol=1e-6, name="no YaRN")


@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_blockwise_quantisation(pow2: bool) -> None:
    x = torch.randn(4, 3, 256) * torch.logspace(-3, 2, 256)
    q, scale = quantize_fp8_blockwise(x, block=128, pow2_scale=pow2)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (4, 3, 2)
    restored = (q.float().view(4, 3, 2, 128) * scale.unsqueeze(-1)).view_as(x)
    # e4m3 keeps 3 mantissa bits: a relative error <= 2**-4 for values far above the block's subnormal range.
    big = x.abs() > scale.repeat_interleave(128, -1) * 2**-6 * 8
    rel = ((restored - x).abs() / x.abs())[big]
    assert rel.max() <= 2**-4 + 1e-6
    assert q.float().abs().max() <= 448
    if pow2:
        assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)


def test_config_rejects_fp8_with_wide_index_heads() -> None:
    with pytest.raises(ValueError, match="index_fp8"):
        DSAConfig(index_head_dim=256)


# --------------------------------------------------------------------------------------------------------------------
# Modules against the V3.2 formulation
# --------------------------------------------------------------------------------------------------------------------


def test_indexer_matches_v32_formulation() -> None:
    attn = _attention()
    x = _inputs(attn)
    selection, q_lora = _indexer_output(attn, x)
    expected = _v32_indexer_scores(attn.indexer, x, q_lora)
    # 1e-6, not float64 round-off: both sides build RoPE from float32 angles, through different trig routines.
    assert_close(selection.scores, expected, atol=1e-6, rtol=1e-6, name="index scores")
    assert_topk_valid(expected, selection.indices, attn.config.index_topk)


def test_indexer_interleaved_rope_would_be_caught() -> None:
    """The early public bug (interleaved RoPE in the indexer) changes the scores: the oracle above detects it."""
    attn = _attention()
    x = _inputs(attn)
    selection, q_lora = _indexer_output(attn, x)
    config = attn.config
    b, s, _ = x.shape
    freqs = _freqs_cis(config, s)
    r, d = config.qk_rope_head_dim, config.index_head_dim
    q = attn.indexer.wq_b(q_lora).view(b, s, config.index_n_heads, d)
    q_bug = torch.cat([_rope_complex(q[..., :r], freqs, interleaved=True), q[..., r:]], -1)
    q_ok = torch.cat([_rope_complex(q[..., :r], freqs, interleaved=False), q[..., r:]], -1)
    assert not torch.allclose(q_bug, q_ok, atol=1e-3)


def test_sparse_attention_matches_v32_dense_plus_index_mask() -> None:
    attn = _attention()
    x = _inputs(attn)
    selection, _ = _indexer_output(attn, x)
    assert (selection.indices[:, -1] >= 0).all(), "late queries select a full top-k"
    assert_close(attn(x), _v32_attention(attn, x, selection.indices), atol=1e-6, rtol=1e-6)


def test_dense_mode_matches_v32_causal_attention() -> None:
    attn = _attention()
    attn.mode = "dense"
    x = _inputs(attn)
    expected = _v32_attention(attn, x, None)
    assert_close(attn(x), expected, atol=1e-6, rtol=1e-6)
    # Sparse and dense differ once a query sees more than top-k keys (the test above is not vacuous).
    attn.mode = "sparse"
    assert not torch.allclose(attn(x)[:, -1], expected[:, -1], atol=1e-6)


def test_fp8_indexer_tracks_the_float_indexer() -> None:
    attn = _attention(torch.float32)
    x = _inputs(attn)
    reference_selection, _ = _indexer_output(attn, x)
    attn.indexer.config = attn.config.replace(index_fp8=True, index_scale_pow2=True)
    fp8_selection, _ = _indexer_output(attn, x)
    # FP8 (3 mantissa bits) against float scores: elementwise errors up to ~4 % of the largest score, scale-sensitive
    # difference ~7e-4 here; a global scale error of 4 % or more (2e-3 at 5 %, 1.7e-2 at 20 %) exceeds 1.5e-3.
    assert_close(
        fp8_selection.scores, reference_selection.scores, atol=0.3, rtol=0.1, max_diff=FP8_SCORE_MAX_DIFF,
        name="fp8 scores",
    )
    valid = fp8_selection.indices >= 0
    overlap = (fp8_selection.indices.unsqueeze(-1) == reference_selection.indices.unsqueeze(-2)).any(-1) & valid
    assert overlap.sum() / valid.sum() > 0.8


def test_tiny_model_forward_shapes_and_input_check() -> None:
    torch.manual_seed(0)
    model = TinyDSAModel(_tiny())
    tokens = torch.randint(0, model.config.vocab_size, (2, SEQ))
    logits, auxes = model(tokens, return_aux=True)
    assert logits.shape == (2, SEQ, model.config.vocab_size) and logits.dtype == torch.float32
    assert len(auxes) == model.config.n_layers
    assert auxes[0].attn_target.shape == (2, SEQ, model.config.index_topk)
    with pytest.raises(ValueError, match="int64"):
        model(tokens.int())


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        (torch.zeros(0, 5, dtype=torch.int64), ValueError, r"input_ids must not be empty, got shape \(0, 5\)"),
        (torch.zeros(2, 0, dtype=torch.int64), ValueError, r"input_ids must not be empty, got shape \(2, 0\)"),
        (torch.tensor([[1, 256, 3]]), ValueError, r"input_ids must lie in \[0, vocab_size = 256\), got values from 1"),
        (torch.tensor([[4, -1]]), ValueError, r"input_ids must lie in \[0, vocab_size = 256\), got values from -1"),
        (torch.tensor([1, 2, 3]), ValueError, r"input_ids must be \[B, S\] int64, got \(3,\) torch.int64"),
        (torch.ones(2, 3), ValueError, r"input_ids must be \[B, S\] int64, got \(2, 3\) torch.float32"),
        ([[1, 2, 3]], TypeError, r"input_ids must be a torch.Tensor \[B, S\] int64, got list"),
    ],
    ids=["empty_batch", "empty_sequence", "id_equal_to_vocab", "negative_id", "rank_1", "float", "list"],
)
def test_tiny_model_input_errors_name_the_model(ids: object, error: type[Exception], message: str) -> None:
    """Bad token ids are reported by the model (forward and generate) before any layer runs. Before the fix an empty
    batch was reported by ``index_topk: q must not be empty``, an id >= vocab raised a bare IndexError from the
    embedding, and the other errors did not name the method."""
    model = TinyDSAModel(_tiny())
    with pytest.raises(error, match=f"^TinyDSAModel.forward: {message}"):
        model(ids)
    with pytest.raises(error, match=f"^TinyDSAModel.generate: {message}"):
        model.generate(ids, 2)
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.numel():
        with pytest.raises(error, match=f"^TinyDSAModel.forward: {message}"):
            model(ids, cache=model.new_cache(ids.shape[0], 8, dtype=torch.float32))


# --------------------------------------------------------------------------------------------------------------------
# Gradients reach exactly the parameters that should train
# --------------------------------------------------------------------------------------------------------------------


def _grad_state(params: list[torch.nn.Parameter]) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params]


def test_sparse_stage_gradients_are_separated() -> None:
    torch.manual_seed(0)
    model = TinyDSAModel(_tiny())
    tokens = torch.randint(0, model.config.vocab_size, (2, SEQ))
    logits, auxes = model(tokens, return_aux=True)
    lm_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    lm_loss.backward(retain_graph=True)
    assert all(_grad_state(model.main_parameters())), "the LM loss must reach every main parameter"
    assert all(p.grad is None for p in model.indexer_parameters()), "the LM loss must not reach the indexer"
    model.zero_grad(set_to_none=True)
    index_loss = sum(training.sparse_stage_loss(a.attn_target, a.index_scores) for a in auxes)
    index_loss.backward()
    assert all(_grad_state(model.indexer_parameters())), "the indexer loss must reach every indexer parameter"
    assert all(p.grad is None for p in model.main_parameters()), "the indexer input is detached from the model"


def test_dense_warmup_gradients_reach_only_the_indexer() -> None:
    torch.manual_seed(0)
    model = TinyDSAModel(_tiny())
    model.set_attention_mode("dense")
    tokens = torch.randint(0, model.config.vocab_size, (2, SEQ))
    _, auxes = model(tokens, return_aux=True)
    loss = sum(training.dense_warmup_loss(a.attn_target, a.index_scores) for a in auxes)
    loss.backward()
    assert all(_grad_state(model.indexer_parameters()))
    assert all(p.grad is None for p in model.main_parameters())


# --------------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------------


def test_losses_are_kl_divergences() -> None:
    g = torch.Generator().manual_seed(0)
    mass = torch.rand(2, 5, 7, generator=g).tril()  # causal: rows see t+1 keys (S_kv = S + 2 here)
    scores = torch.randn(2, 5, 7, generator=g).masked_fill(mass == 0, float("-inf"))
    p = mass / mass.sum(-1, keepdim=True)
    log_q = torch.log_softmax(scores, -1)
    expected = torch.where(p > 0, p * (p.log() - log_q), 0.0).sum(-1).mean()
    assert training.dense_warmup_loss(mass, scores).item() == pytest.approx(expected.item(), rel=1e-5)
    assert training.dense_warmup_loss(mass, torch.log(mass)).item() == pytest.approx(0.0, abs=1e-6)
    indices = torch.tensor([[[0, 2, -1]] * 5] * 2, dtype=torch.int32)
    selected_mass = training.gather_scores(mass, indices).masked_fill(indices < 0, 0.0)
    sparse = training.sparse_stage_loss(selected_mass, training.gather_scores(scores, indices))
    ps = selected_mass[..., :2] / selected_mass[..., :2].sum(-1, keepdim=True)
    rows = selected_mass[..., :2].sum(-1) > 0
    lq = torch.log_softmax(scores.gather(-1, indices[..., :2].long()), -1)
    per_row = torch.where(ps > 0, ps * (ps.log() - lq), 0.0).sum(-1)
    assert sparse.item() == pytest.approx(per_row[rows].mean().item(), rel=1e-5)


def test_attention_mass_on_indices_matches_dense_probabilities() -> None:
    attn = _attention()
    attn.mode = "dense"
    x = _inputs(attn)
    _, aux = attn(x, return_aux=True)
    cos, sin = rope_cos_sin(attn.inv_freq, SEQ, x.device)
    q, kv, _ = attn.latent_qkv(x, cos, sin)
    from dsa import ops

    _, lse = ops.sparse_mla(q, kv, aux.indices, sm_scale=attn.config.sm_scale, d_v=attn.config.kv_lora_rank)
    mass = training.attention_mass_on_indices(q, kv, aux.indices, lse, attn.config.sm_scale)
    # lse is over the selection: mass on it sums to the head count; relative to dense probabilities it is rescaled.
    heads = torch.full((2, SEQ), float(attn.config.n_heads), dtype=torch.float32)
    assert_close(mass.sum(-1), heads, atol=1e-5, rtol=1e-5, name="mass per query")
    dense_selected = training.gather_scores(aux.attn_target, aux.indices).masked_fill(aux.indices < 0, 0.0)
    early = slice(0, attn.config.index_topk)  # queries that see <= k keys select everything: identical there
    assert_close(mass[:, early].double(), dense_selected[:, early], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# torch.compile and training
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_on_dsa_attention(backend: str) -> None:
    """``torch.compile(fullgraph=True)`` of the float32 attention module matches eager, values and gradients, with
    the default Inductor backend (C++ code generated for the CPU) and with aot_eager."""
    attn = _attention(torch.float32)
    x = _inputs(attn).requires_grad_(True)

    def run(fn) -> list[torch.Tensor]:  # noqa: ANN001
        attn.zero_grad(set_to_none=True)
        x.grad = None
        out = fn(x)
        out.square().mean().backward()
        return [out.detach(), x.grad.clone()] + [p.grad.clone() for p in attn.parameters() if p.grad is not None]

    eager = run(attn)
    torch._dynamo.reset()
    compiled = run(torch.compile(attn, fullgraph=True, backend=backend))
    assert len(compiled) == len(eager)
    for i, (a, b) in enumerate(zip(compiled, eager)):
        assert_close(a, b, atol=1e-4, rtol=1e-4, name=f"tensor {i}")


def test_train_tiny_script_reduces_kl_and_raises_recall(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """scripts/train_tiny.py, shortened: the stated margins are a 30% lower dense KL and +0.05 top-k recall."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny.py"
    spec = importlib.util.spec_from_file_location("train_tiny", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = "--warmup-steps 60 --sparse-steps 10 --batch 2 --seq 64 --log-every 30 --threads 1"
    monkeypatch.setattr(sys, "argv", ["train_tiny.py", *args.split()])
    script.main()
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in lines if line.startswith(("warmup", "sparse"))]
    assert [r[0] for r in rows] == ["warmup", "warmup", "warmup", "sparse"], lines
    kl = [float(r[2]) for r in rows]
    recall = [float(r[3]) for r in rows]
    assert kl[2] < 0.7 * kl[0], lines
    assert recall[2] > recall[0] + 0.05, lines
    assert math.isfinite(float(rows[-1][4])) and kl[-1] < kl[0], lines


def test_bfloat16_module_runs_the_c_target_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 activations under ``DSA_BACKEND=tilelang`` on the CPU run the real C-target kernels (the fused selection,
    sparse MLA forward and backward: each launcher counted, none replaced; the unfused indexer and top-k are not on
    the module's path), and the bf16 module tracks the float32 one."""
    from tests.test_ops import count_launches

    launches = count_launches(monkeypatch)
    monkeypatch.setenv("DSA_BACKEND", "tilelang")
    attn32 = _attention(torch.float32)
    attn16 = _attention(torch.bfloat16)
    assert attn16.inv_freq.dtype == torch.float32, "RoPE frequencies must not be rounded to bf16"
    x = _inputs(attn32)
    out16 = attn16(x.bfloat16().requires_grad_(True))
    out16.float().square().mean().backward()
    unfused = {"index_scores": 0, "topk_indices": 0}
    assert {name: count > 0 for name, count in launches.items()} == {
        **dict.fromkeys(launches, True), **dict.fromkeys(unfused, False)
    }, launches
    indexer = {id(p) for p in attn16.indexer.parameters()}  # detached from the loss by design
    main = [p for p in attn16.parameters() if id(p) not in indexer]
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in main)
    # bf16 rounding can flip near-tied top-k choices: compare the queries whose selections agree.
    with torch.no_grad():
        sel32 = _indexer_output(attn32, x)[0].indices.sort(-1).values
        sel16 = _indexer_output(attn16, x.bfloat16())[0].indices.sort(-1).values
    same = (sel32 == sel16).all(-1)
    assert same.float().mean() > 0.5
    monkeypatch.setenv("DSA_BACKEND", "reference")
    assert_close(out16.float()[same], attn32(x)[same], atol=5e-2, rtol=5e-2, name="bf16 kernels vs float32")
