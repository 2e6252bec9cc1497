"""TileLang kernel builders for DeepSeek Sparse Attention (compile-time parameters only)."""
