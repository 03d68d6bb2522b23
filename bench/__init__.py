"""Benchmarks (figures, not asserts): python -m bench.<name>."""
