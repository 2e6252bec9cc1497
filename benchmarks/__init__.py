"""Benchmark cases (``benchmarks.cases``, plain data) and the results folder of the one-shot GPU check."""
