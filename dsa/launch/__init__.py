"""Launchers: take validated tensors, pick a config, compile through the cache, allocate outputs, run kernels."""
