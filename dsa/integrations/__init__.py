"""Integrations of the DSA ops into outside frameworks, one module per framework, each an optional extra.

- ``dsa.integrations.transformers``: ``apply_dsa(model)`` serves transformers' DeepSeek-V3.2 and GLM-5 models
  (``DeepseekV32ForCausalLM``, ``GlmMoeDsaForCausalLM`` and their base models) with ``dsa.ops`` in the latent form;
  needs ``pip install 'dsa-tilelang[hf]'``.

This package imports no outside framework itself (``import dsa.integrations`` is free); a framework is imported only
by its own module, when a user imports that module. Nothing else in the project imports one.
"""
