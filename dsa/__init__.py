"""DeepSeek Sparse Attention: PyTorch ops, autograd, modules and the normative reference."""
