"""Integrations of the DSA ops into outside frameworks, one module per framework, each an optional extra.

- ``dsa.integrations.transformers``: ``apply_dsa(model)`` serves transformers' DeepSeek-V3.2, GLM-5 and DeepSeek-V4
  models (``DeepseekV32ForCausalLM``, ``GlmMoeDsaForCausalLM``, ``DeepseekV4ForCausalLM`` and their base models)
  with ``dsa.ops`` (``latent_attention`` for the first two, ``deepseek_v4`` for V4); needs
  ``pip install 'dsa-tilelang[hf]'``.

This package imports no outside framework itself (``import dsa.integrations`` is free); a framework is imported only
by its own module, when a user imports that module. Nothing else in the project imports one.
"""
