"""transformers' DeepSeek-V3.2, GLM-5 and DeepSeek-V4 models served by the DSA ops, in one line: ``apply_dsa(model)``.

```python
from transformers import AutoModelForCausalLM
from dsa.integrations.transformers import apply_dsa

model = apply_dsa(AutoModelForCausalLM.from_pretrained(path))   # DeepseekV32/GlmMoeDsa/DeepseekV4ForCausalLM
out = model.generate(ids, attention_mask=mask, max_new_tokens=64)
```

``apply_dsa`` changes forwards only, in place (instance attributes; the classes are untouched): every attention layer
runs ``dsa.integrations.latent_attention.latent_attention_forward`` (selection with ``dsa.ops.index_topk`` from the
layer's own indexer weights, sparse MLA in the latent form, transformers' own caches), and the base model's forward
passes each layer one key range per query instead of the dense ``[B, 1, S, T]`` mask (``KeyRanges``, computed from
the 2D padding mask, the cache length and packed position ids in O(B S)). Parameters, their names and
``state_dict()`` are untouched; ``remove_dsa`` restores the original forwards.

DeepSeek-V4 (``DeepseekV4ForCausalLM``/``DeepseekV4Model``): every attention layer (sliding, CSA, HCA) runs
``dsa.integrations.deepseek_v4.v4_attention_forward`` instead (``dsa.ops.compress_kv`` for the compressors,
``dsa.ops.index_topk`` for CSA's indexer, ``dsa.ops.sparse_mla`` over the window and the compressed entries with the
sink), with transformers' V4 cache layers; the same model wrapper passes the key ranges.

Why not just swap transformers' top-k for ours: transformers' indexer takes ``min(index_topk, T)`` positions over
``-inf``-masked scores, so a query that sees fewer than ``index_topk`` keys gets masked future positions in its
selection (harmless there, because its dense mask hides them again; attending to them with ``sparse_mla``, which
trusts every in-range index, would attend to the future). Here the selection is made with the visibility itself,
and positions a query cannot see come back as ``-1``.

Precision: a float32 model selects exactly what transformers selects, except among exactly equal index scores: the
ops' tie rule keeps the smaller position (``torch.topk`` breaks ties arbitrarily), e.g. scores ``[0.0, 0.5, 0.0]``
with ``topk = 2`` give ``{0, 1}`` here and either ``{0, 1}`` or ``{1, 2}`` there (exact ties are mostly keys whose
every indexer head has a negative dot product: their score is exactly 0). bfloat16 models run the kernels (a
supported GPU, or the C-target kernels on the CPU with ``DSA_BACKEND=tilelang``).

Decoding: transformers' caches hold contiguous ``[B, 1, T, *]`` tensors per layer, not pages; steps of a few tokens
attend with ``dsa.ops.sparse_mla_decode`` over those rows viewed as one page per sequence (see
``latent_attention``), longer ones with ``dsa.ops.sparse_mla``. ``generate`` works unchanged with ``DynamicCache``
(the default) and ``StaticCache`` (``cache_implementation="static"``), greedy or sampling.

Training: gradients flow through ``sparse_mla`` to every parameter but the indexer's (transformers' indexer runs
under ``no_grad``, and so does the selection here). To train the indexer with the V3.2 recipe, call
``set_indexer_training(model, "dense" | "sparse")`` and add ``indexer_loss(model)`` (the sum of the layers'
``dsa.training`` KL losses of the last forward, differentiable in the indexer weights only) to the loss.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from typing import Any

import torch
from torch import nn

try:
    import transformers
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as _v32
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as _v4
    from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as _glm
except ImportError as exc:  # the extra is optional: say how to get it
    raise ImportError(
        "dsa.integrations.transformers needs transformers with DeepSeek-V3.2, GLM-5 and DeepSeek-V4 (>= 5.23): "
        "pip install 'dsa-tilelang[hf]'"
    ) from exc

from dsa.integrations import deepseek_v4, latent_attention
from dsa.integrations.latent_attention import INDEXER_STAGES, LayerSpec
from dsa.integrations.visibility import KeyRanges, from_padding_mask, from_packed_positions

__all__ = [
    "SUPPORTED_MODELS",
    "apply_dsa",
    "indexer_loss",
    "is_dsa_applied",
    "remove_dsa",
    "set_indexer_training",
    "tiny_config",
]

logger = logging.getLogger(__name__)

_MASK_KEY = "indexed_attention"
"""The key under which both models' forwards read their attention mask from a prepared mask dict."""

_FAMILIES: dict[type, tuple[str, bool]] = {
    _v32.DeepseekV32ForCausalLM: ("deepseek_v32", False),
    _v32.DeepseekV32Model: ("deepseek_v32", False),
    _glm.GlmMoeDsaForCausalLM: ("glm_moe_dsa", True),
    _glm.GlmMoeDsaModel: ("glm_moe_dsa", True),
    _v4.DeepseekV4ForCausalLM: ("deepseek_v4", False),
    _v4.DeepseekV4Model: ("deepseek_v4", False),
}
"""Supported class -> (family, GLM-5 layout: interleaved indexer RoPE, shared layers, indices returned)."""

SUPPORTED_MODELS: tuple[str, ...] = tuple(cls.__name__ for cls in _FAMILIES)
"""The transformers classes ``apply_dsa`` takes."""


def _family(model: nn.Module) -> tuple[str, bool]:
    for cls, family in _FAMILIES.items():
        if isinstance(model, cls):
            return family
    raise TypeError(
        f"apply_dsa: model must be one of {', '.join(SUPPORTED_MODELS)} (transformers {transformers.__version__}), "
        f"got {type(model).__name__}"
    )


def _base_model(model: nn.Module) -> nn.Module:
    """The ``*Model`` holding the layers (the model itself, or a causal LM's ``.model``)."""
    return model.model if hasattr(model, "lm_head") else model


def is_dsa_applied(model: nn.Module) -> bool:
    """Whether ``apply_dsa`` has been applied to ``model`` (and not removed)."""
    return bool(getattr(_base_model(model), "_dsa_applied", False))


_CACHE_NAMES = ("cache", "past_key_values")
"""The cache argument's names: transformers renamed ``past_key_values`` to ``cache`` (5.25 takes both)."""


def _cache_of(arguments: dict[str, Any]) -> Any:
    """The cache among a forward's bound arguments, under either name, named or in ``**kwargs``."""
    for source in (arguments, arguments.get("kwargs", {})):
        for name in _CACHE_NAMES:
            if source.get(name) is not None:
                return source[name]
    return None


def _key_ranges(
    config: Any,
    padding_mask: torch.Tensor | None,
    cache: Any,
    position_ids: torch.Tensor | None,
    use_cache: bool | None,
    batch: int,
    seq: int,
    device: torch.device,
) -> KeyRanges:
    """Each query's visible key range, as transformers' ``create_causal_mask`` would mask it densely: causal over
    cache positions, padding hidden, sequences packed along a row kept apart (no mask and no cache only)."""
    past = int(cache.get_seq_length()) if cache is not None else 0
    will_cache = cache is not None or (use_cache if use_cache is not None else bool(config.use_cache))
    if padding_mask is None and not will_cache and position_ids is not None:
        packed = from_packed_positions(position_ids.to(device), batch=batch)
        if packed is not None:
            return packed
    return from_padding_mask(padding_mask, batch=batch, seq=seq, past=past, device=device)


def _wrap_base_forward(base: nn.Module) -> None:
    """Install the base model's forward wrapper: a 2D (or absent) ``attention_mask`` becomes ``{"indexed_attention":
    KeyRanges}``, which the original forward passes to every layer unchanged (it skips its own mask building for a
    prepared dict). A 4D mask is passed as it is (each layer reads its ranges from it)."""
    original = base.forward
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs)
        arguments = bound.arguments
        mask = arguments.get("attention_mask")
        if not isinstance(mask, dict) and not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
            embeds = arguments.get("inputs_embeds")
            ids = arguments.get("input_ids")
            batch, seq = (embeds.shape[:2] if embeds is not None else ids.shape[:2])
            device = (embeds if embeds is not None else ids).device
            extra = arguments.get("kwargs", {})
            ranges = _key_ranges(
                base.config, mask, _cache_of(arguments), arguments.get("position_ids"),
                arguments.get("use_cache", extra.get("use_cache")), batch, seq, device,
            )  # fmt: skip
            arguments["attention_mask"] = {_MASK_KEY: ranges}
        # Keywords only: transformers' decorators read some arguments (use_cache) from the keywords.
        call = dict(arguments.pop("kwargs", {}))
        call.update(arguments)
        return original(**call)

    base.forward = forward


def _masks_for_generate(
    config: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> dict[str, KeyRanges]:
    """``generate``'s mask hook for compilable caches (``StaticCache``): the key ranges instead of a dense mask."""
    batch, seq = inputs_embeds.shape[:2]
    cache = _cache_of(kwargs)
    ranges = _key_ranges(config, attention_mask, cache, position_ids, True, batch, seq, inputs_embeds.device)
    return {_MASK_KEY: ranges}


def apply_dsa(model: nn.Module) -> nn.Module:
    """Serve a transformers DeepSeek-V3.2, GLM-5 or DeepSeek-V4 model with the DSA ops, in place (see the module
    docstring).

    Idempotent (a second call changes nothing) and reversible (``remove_dsa``). Parameters, their names and
    ``state_dict()`` are unchanged, so checkpoints load and save as before.

    Args:
        model (nn.Module): ``DeepseekV32ForCausalLM``, ``DeepseekV32Model``, ``GlmMoeDsaForCausalLM``,
            ``GlmMoeDsaModel``, ``DeepseekV4ForCausalLM`` or ``DeepseekV4Model``.

    Returns:
        The same ``model``.

    Raises:
        TypeError: any other model (the message names the supported classes).
    """
    family, glm = _family(model)
    base = _base_model(model)
    if getattr(base, "_dsa_applied", False):
        return model
    indexer_types = getattr(base.config, "indexer_types", None)
    for layer in base.layers:
        attn = layer.self_attn
        if family == "deepseek_v4":
            attn.forward = types.MethodType(deepseek_v4.v4_attention_forward, attn)
            continue
        shared = bool(glm and indexer_types is not None and indexer_types[attn.layer_idx] == "shared")
        attn._dsa_spec = LayerSpec(interleaved_index_rope=glm, returns_indices=glm, shared=shared)
        attn.forward = types.MethodType(latent_attention.latent_attention_forward, attn)
    _wrap_base_forward(base)
    model.create_masks_for_generate = _masks_for_generate
    base._dsa_applied = True
    logger.info("apply_dsa: %s (%s), %d attention layers on the DSA ops", type(model).__name__, family,
                len(base.layers))  # fmt: skip
    return model


def remove_dsa(model: nn.Module) -> nn.Module:
    """Undo ``apply_dsa``: the original forwards (transformers' own indexer and attention) again. A model without
    DSA is returned unchanged.

    Args:
        model (nn.Module): a model ``apply_dsa`` accepts.

    Returns:
        The same ``model``.
    """
    _family(model)
    base = _base_model(model)
    if not getattr(base, "_dsa_applied", False):
        return model
    for layer in base.layers:
        attn = layer.self_attn
        for name in ("forward", "_dsa_spec", "_dsa_indexer_stage", "dsa_indexer_loss"):
            attn.__dict__.pop(name, None)
    base.__dict__.pop("forward", None)
    model.__dict__.pop("create_masks_for_generate", None)
    del base._dsa_applied
    return model


def set_indexer_training(model: nn.Module, stage: str | None) -> nn.Module:
    """Make every full DSA layer compute its indexer loss in forwards with gradients enabled (V3.2's recipe).

    ``"dense"``: the warm-up; each layer attends to every visible key (dense attention, as the recipe's warm-up
    does) and its loss is ``KL(p_t || softmax(I_t))`` over those keys (``[B, S, T]`` scores: quadratic, for
    warm-up lengths). ``"sparse"``: the layer attends to its top-k and the loss is the same KL over the selected
    keys. ``None`` stops it. The losses' gradients reach the indexer's weights only.

    Args:
        model (nn.Module): a model ``apply_dsa`` has been applied to.
        stage (str | None): ``"dense"``, ``"sparse"`` or None.

    Returns:
        The same ``model``.

    Raises:
        ValueError: an unknown stage, or a model without ``apply_dsa``.
    """
    if stage is not None and stage not in INDEXER_STAGES:
        raise ValueError(f"set_indexer_training: stage must be one of {INDEXER_STAGES} or None, got {stage!r}")
    if not is_dsa_applied(model):
        raise ValueError("set_indexer_training: call apply_dsa(model) first")
    if _family(model)[0] == "deepseek_v4":
        raise ValueError("set_indexer_training: DeepSeek-V4's indexer training is not supported (V3.2 and GLM-5 only)")
    for layer in _base_model(model).layers:
        layer.self_attn._dsa_indexer_stage = stage
        layer.self_attn.__dict__.pop("dsa_indexer_loss", None)
    return model


def indexer_loss(model: nn.Module) -> torch.Tensor:
    """The sum over layers of the indexer losses of the last forward (``set_indexer_training``).

    Returns:
        A float32 scalar, differentiable in the indexers' weights.

    Raises:
        ValueError: no layer computed a loss (training not set, or the forward ran without gradients).
    """
    losses = [
        layer.self_attn.dsa_indexer_loss
        for layer in _base_model(model).layers
        if getattr(layer.self_attn, "dsa_indexer_loss", None) is not None
    ]
    if not losses:
        raise ValueError(
            "indexer_loss: no layer has an indexer loss; call set_indexer_training(model, stage) and run a forward "
            "with gradients enabled"
        )
    return torch.stack(losses).sum()


def tiny_config(family: str, **overrides: Any) -> Any:
    """A small random-weight configuration of ``family`` for tests, examples and benchmarks (nothing is
    downloaded): 3 layers (one dense MLP, then 4 experts with 2 active), hidden 64, 4 heads, latent 32 + RoPE 8,
    an indexer of 16 heads x 32 (exact zero-score ties are rare) with top-k 16, YaRN on (so ``scaling`` carries
    mscale), eager attention for the reference model. GLM-5 gets ``indexer_types`` full, shared, full.

    Args:
        family (str): ``"deepseek_v32"``, ``"glm_moe_dsa"`` or ``"deepseek_v4"`` (see ``_tiny_v4_config``).
        **overrides: config fields to change.

    Returns:
        ``DeepseekV32Config``, ``GlmMoeDsaConfig`` or ``DeepseekV4Config``.
    """
    values: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        n_group=1, topk_group=1, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
        qk_nope_head_dim=16, index_topk=16, index_head_dim=32, index_n_heads=16, first_k_dense_replace=1,
        max_position_embeddings=4096, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    # YaRN with factor 4 over a quarter of the context (transformers warns when the two disagree).
    context = int(overrides.get("max_position_embeddings", values["max_position_embeddings"]))
    values["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": context // 4, "mscale": 1.0,
                                 "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}  # fmt: skip
    if family == "deepseek_v4":
        return _tiny_v4_config(context, **overrides)
    if family == "deepseek_v32":
        config_class = transformers.DeepseekV32Config
    elif family == "glm_moe_dsa":
        config_class = transformers.GlmMoeDsaConfig
        layers = int(overrides.get("num_hidden_layers", values["num_hidden_layers"]))
        values["indexer_types"] = ["shared" if i % 2 else "full" for i in range(layers)]
    else:
        raise ValueError(f"tiny_config: family must be 'deepseek_v32', 'glm_moe_dsa' or 'deepseek_v4', got {family!r}")
    values.update(overrides)
    config = config_class(**values)
    config._attn_implementation = "eager"
    return config


def _tiny_v4_config(context: int, **overrides: Any) -> Any:
    """``tiny_config("deepseek_v4")``: 3 layers (CSA, HCA, sliding), hidden 64, 4 heads of 32 (RoPE 8), a window of
    8, CSA rate 2 with an indexer of 16 heads x 32 keeping the top 16 entries (the V3.2/GLM-5 tiny indexer's
    widths: one compiled selection kernel serves all three), HCA rate 4, 4 experts with 2 active, 2 hyper-connection
    streams, YaRN on the compressed layers' RoPE, eager attention. Sequences of more than 32 tokens outgrow the
    window and the top-k, so both really drop keys."""
    values: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        head_dim=32, q_lora_rank=32, partial_rotary_factor=0.25, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, layer_types=[deepseek_v4.CSA, deepseek_v4.HCA, deepseek_v4.SLIDING],
        mlp_layer_types=["moe"] * 3, compress_rates={deepseek_v4.CSA: 2, deepseek_v4.HCA: 4}, sliding_window=8,
        o_groups=2, o_lora_rank=16, index_n_heads=16, index_head_dim=32, index_topk=16, hc_mult=2,
        max_position_embeddings=context, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": context // 4,
                         "beta_fast": 32.0, "beta_slow": 1.0},
    )  # fmt: skip
    values.update(overrides)
    config = transformers.DeepseekV4Config(**values)
    config._attn_implementation = "eager"
    return config
