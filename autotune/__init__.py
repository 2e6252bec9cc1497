"""Per-SKU tuning of the DSA kernels and the persistent config cache."""
