"""``dsa.integrations.transformers.apply_dsa`` on transformers' DeepSeek-V4 (``dsa.integrations.deepseek_v4``).

Every model is ``tiny_config("deepseek_v4")`` built in code (a CSA layer of rate 2 with top-16 selection, an HCA
layer of rate 4, a sliding-only layer, window 8), with every parameter random: transformers initialises the sinks and
position biases to zero and the pad token's embedding row to zero, which would hide a sink or bias that is dropped
and make the pad token's indexer scores exactly tied. Sequences of 48 tokens outgrow the window and the top-k (24 CSA
entries, 12 HCA entries), so both sources really drop keys. The reference is transformers' own eager model with the
same weights (float32, the CPU reference backend of the ops).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from dsa import ops  # noqa: E402
from dsa.integrations import transformers as hf  # noqa: E402
from dsa.testing import assert_close  # noqa: E402
from tests.test_transformers_integration import _left_padded  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V4 = transformers.models.deepseek_v4.modeling_deepseek_v4
FLOAT32_TOLERANCE = 1e-4
"""Logits must equal eager's within this share of the logit scale (the largest |logit|) in float32."""
SEQ = 48


def _model(seed: int = 0, base: bool = False, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = (V4.DeepseekV4Model if base else V4.DeepseekV4ForCausalLM)(hf.tiny_config("deepseek_v4", **overrides)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("sinks", "position_bias")):
                parameter.normal_(0.0, 1.0)
        embeddings = model.get_input_embeddings().weight
        embeddings[0].normal_(0.0, float(embeddings[1:].std()))
    return model


def _served(model: torch.nn.Module) -> torch.nn.Module:
    return hf.apply_dsa(copy.deepcopy(model))


def _ids(seed: int, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    scale = float(expected.abs().max())
    assert_close(actual, expected, atol=FLOAT32_TOLERANCE * scale, rtol=0.0, name=name)


@pytest.fixture
def op_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter]:
    """Counts the calls of the public ops the V4 layers use (wrapped, not replaced), and records whether any
    selection dropped visible entries (``topk`` below the entries' count); from here on transformers' own
    compressors, indexer, eager attention and sliding mask builder raise if anything calls them."""
    calls: Counter = Counter()
    for name in ("compress_kv", "index_topk", "sparse_mla", "sparse_mla_decode"):
        real = getattr(ops, name)

        def counted(*args, _real=real, _name=name, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[_name] += 1
            if _name == "index_topk" and args[3] < args[1].shape[1]:
                calls["selections that drop entries"] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    yield calls


def _forbid_transformers_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("transformers' own V4 compressor, indexer, attention or mask ran under apply_dsa")

    for cls in (V4.DeepseekV4HCACompressor, V4.DeepseekV4CSACompressor, V4.DeepseekV4Indexer):
        monkeypatch.setattr(cls, "forward", forbidden)
    monkeypatch.setattr(V4, "eager_attention_forward", forbidden)
    monkeypatch.setattr(V4, "create_sliding_window_causal_mask", forbidden)


@pytest.mark.parametrize("use_cache", [True, False])
def test_float32_logits_equal_eager_through_the_ops_only(monkeypatch, op_calls, use_cache):
    model, ids = _model(1), _ids(2)
    with torch.no_grad():
        expected = model(ids, use_cache=use_cache).logits
        served = _served(model)
        _forbid_transformers_attention(monkeypatch)
        actual = served(ids, use_cache=use_cache).logits
    _assert_logits_close(actual, expected, "logits")
    # Two compressors (CSA, HCA) and CSA's indexer pool; one selection; three attention layers.
    assert op_calls["compress_kv"] == 3 and op_calls["index_topk"] == 1 and op_calls["sparse_mla"] == 3, op_calls
    assert op_calls["selections that drop entries"] == 1, op_calls


def test_base_model_hidden_states_equal_eager():
    model, ids = _model(3, base=True), _ids(4)
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        actual = _served(model)(ids).last_hidden_state
    assert_close(actual, expected, atol=FLOAT32_TOLERANCE * float(expected.abs().max()), rtol=0.0)


def test_left_padded_batch_equals_eager_at_real_positions():
    model = _model(5)
    ids, mask = _left_padded(_ids(6), [7, 0])
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        actual = _served(model)(ids, attention_mask=mask).logits
    _assert_logits_close(actual[0, 7:], expected[0, 7:], "padded row")
    _assert_logits_close(actual[1], expected[1], "unpadded row")


def test_packed_sequences_equal_eager():
    """Two sequences packed along one row (position ids restart, no mask, no cache): the window keeps them apart;
    the compressed entries follow eager (raw rows pooled across the seam, visibility read from the position ids)."""
    model, ids = _model(31), _ids(32, batch=1, seq=40)
    positions = torch.cat([torch.arange(17), torch.arange(23)]).unsqueeze(0)
    with torch.no_grad():
        expected = model(ids, position_ids=positions, use_cache=False).logits
        actual = _served(model)(ids, position_ids=positions, use_cache=False).logits
    _assert_logits_close(actual, expected, "packed logits")


def test_prefill_then_decode_in_pieces_equals_eager_step_by_step():
    """A prefill of 37 tokens, then steps of 1, 3 and 2 tokens (partial compression windows carried in the cache
    across steps, CSA's overlap state included): every step's logits equal eager's on its own cache."""
    model, ids = _model(7), _ids(8, seq=37 + 1 + 3 + 2 + 1 + 3)
    served = _served(model)
    caches = {}
    with torch.no_grad():
        start = 0
        for length in (37, 1, 3, 2, 1, 3):
            piece = ids[:, start : start + length]
            results = {}
            for name, m in (("eager", model), ("served", served)):
                out = m(piece, cache=caches.get(name), use_cache=True)
                caches[name], results[name] = out.cache, out.logits
            _assert_logits_close(results["served"], results["eager"], f"logits of tokens {start}..{start + length}")
            start += length


@pytest.mark.parametrize("prompt, pads", [(24, [5, 0]), (1, [0])])
def test_greedy_generate_gives_eager_tokens_with_left_padding(op_calls, prompt, pads):
    """A left-padded batch, and a one-token prompt (no compressed entry until the second token: the first steps
    attend to the window alone)."""
    model = _model(9)
    ids, mask = _left_padded(_ids(10, batch=len(pads), seq=prompt), pads)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
        actual = _served(model).generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    assert torch.equal(actual, expected)
    # A prefill of more than 4 tokens attends with sparse_mla, every shorter step with the decode op.
    steps = op_calls["sparse_mla"] + op_calls["sparse_mla_decode"]
    assert steps == 3 * 24 and op_calls["sparse_mla_decode"] >= 3 * 23, op_calls


def test_training_step_loss_and_gradients_equal_eager():
    """Gradients flow through ``compress_kv`` and the two-source ``sparse_mla`` to the same parameters as eager's
    (the indexer's get none in either: selection is not differentiable), with the same values."""
    model, ids = _model(21).train(), _ids(22)
    served = _served(model).train()
    expected, actual = (m(ids, labels=ids, use_cache=False).loss for m in (model, served))
    expected.backward()
    actual.backward()
    assert_close(actual.detach(), expected.detach(), atol=1e-5, rtol=1e-5, name="loss")
    for (name, p), (_, p_served) in zip(model.named_parameters(), served.named_parameters()):
        assert (p.grad is None) == (p_served.grad is None), name
        if p.grad is not None:
            assert_close(p_served.grad, p.grad, atol=1e-4 * float(p.grad.abs().max()), rtol=0.0, name=name)


def test_state_dict_is_unchanged_apply_is_idempotent_and_remove_restores():
    model, ids = _model(11), _ids(12)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with torch.no_grad():
        eager = model(ids).logits
        assert hf.apply_dsa(hf.apply_dsa(model)) is model and hf.is_dsa_applied(model)
        after = model.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[name], t) for name, t in before.items())
        attention = model.model.layers[1].self_attn
        assert attention.forward.__func__.__name__ == "v4_attention_forward"
        hf.remove_dsa(model)
        assert not hf.is_dsa_applied(model) and "forward" not in attention.__dict__
        assert torch.equal(model(ids).logits, eager)
    with pytest.raises(ValueError, match="DeepSeek-V4"):
        hf.set_indexer_training(hf.apply_dsa(model), "dense")


def test_bfloat16_c_target_kernels_track_eager_bfloat16(monkeypatch):
    """A bf16 model under ``DSA_BACKEND=tilelang`` runs the C-target kernels (the fused selection, the two-source
    sparse MLA forward) and its logits are within twice the error of transformers' own bf16 eager against its float32
    eager (the largest and the RMS error). One new kernel compiles cold (sparse MLA, 4 heads, d_qk = d_v = 32); the
    selection kernel is the V3.2/GLM-5 tiny indexer's. Every expert is active (top-4 of 4): bf16 flips discrete MoE
    routing, which would dominate both errors. Not the real widths (d_qk = 512)."""
    from tests.test_ops import count_launches

    launches = count_launches(monkeypatch)
    model32, ids = _model(13, num_experts_per_tok=4), _ids(14)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    with torch.no_grad():
        reference = model32(ids).logits
        eager16 = model16(ids).logits.float()
        monkeypatch.setenv("DSA_BACKEND", "tilelang")
        served16 = hf.apply_dsa(model16)(ids).logits.float()

    def errors(x: torch.Tensor) -> tuple[float, float]:
        diff = x - reference
        scale = float(reference.abs().max())
        return float(diff.abs().max()) / scale, float(diff.pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())

    (eager_max, eager_rms), (served_max, served_rms) = errors(eager16), errors(served16)
    assert served_max <= 2 * eager_max and served_rms <= 2 * eager_rms, (served_max, eager_max, served_rms, eager_rms)
    assert launches["index_topk"] > 0 and launches["sparse_mla_fwd"] > 0, launches


@pytest.mark.parametrize("layer_type", ["compressed_sparse_attention", "heavily_compressed_attention"])
def test_compressed_entries_equal_transformers_bit_for_bit_in_bfloat16(layer_type):
    """The compressor's entries through ``dsa.ops.compress_kv`` (then ``kv_norm`` and RoPE) equal transformers'
    compressor's bit for bit in bf16 (position_bias and kv_norm kept float32, as ``from_pretrained`` keeps them),
    fed in pieces of 5, 3 and 4 tokens through each side's own V4 cache (partial windows and CSA's overlap rows
    carried)."""
    from dsa.integrations import deepseek_v4

    config = hf.tiny_config("deepseek_v4")
    layer_idx = config.layer_types.index(layer_type)
    torch.manual_seed(15)
    compressor = (V4.DeepseekV4CSACompressor if layer_type == deepseek_v4.CSA else V4.DeepseekV4HCACompressor)(config)
    with torch.no_grad():
        for parameter in compressor.parameters():
            parameter.normal_(0.0, 0.5)
    compressor.to(torch.bfloat16).position_bias.data = compressor.position_bias.data.float()
    compressor.kv_norm.float()
    hidden = torch.randn((2, 12, config.hidden_size), generator=torch.Generator().manual_seed(16)).bfloat16()
    q_residual = torch.randn((2, 12, config.q_lora_rank), generator=torch.Generator().manual_seed(17)).bfloat16()
    caches = {side: transformers.DynamicCache(config=config) for side in ("eager", "ops")}
    overlap = layer_type == deepseek_v4.CSA
    start = 0
    with torch.no_grad():
        for length in (5, 3, 4):
            piece = slice(start, start + length)
            positions = torch.arange(start, start + length).unsqueeze(0)
            expected = compressor(hidden[:, piece], q_residual[:, piece], positions, caches["eager"], layer_idx)[0][:, 0]
            actual = deepseek_v4._compressed_entries(
                compressor, hidden[:, piece], caches["ops"].layers[layer_idx], "compressor",
                compressor.compress_rate, overlap, config.head_dim,
            )  # fmt: skip
            assert actual.dtype == torch.bfloat16 and torch.equal(actual, expected), (start, length)
            start += length


def test_a_short_step_that_trains_only_the_sinks_gets_their_gradient() -> None:
    """A decode-sized step (2 queries) with grad on where only the per-head sinks are trainable runs ``sparse_mla``
    (the decode op is forward only), so the sinks get a gradient; without grad the same step takes the decode path
    and gives the same output."""
    from dsa.integrations import deepseek_v4 as v4

    torch.manual_seed(0)
    batch, seq, heads, d, rows, entries, k = 2, 2, 3, 16, 6, 4, 2
    q, window = torch.randn(batch, seq, heads, d), torch.randn(batch, rows, d)
    kv_entries = torch.randn(batch, entries, d)
    ends = torch.tensor([[rows - 1, rows]] * batch, dtype=torch.int32)
    starts = (ends - 4).clamp_min(0)
    selected = torch.randint(0, entries, (batch, seq, k), dtype=torch.int32)
    sinks = torch.randn(heads, requires_grad=True)
    args = (q, window, starts, ends, kv_entries, selected, None)
    out = v4.attend(*args, sinks, d**-0.5)
    out.square().sum().backward()
    assert sinks.grad is not None and bool(sinks.grad.abs().sum() > 0)
    with torch.no_grad():
        assert_close(v4.attend(*args, sinks, d**-0.5), out.detach(), name="out", atol=1e-5, rtol=1e-5)
