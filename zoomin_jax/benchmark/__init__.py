"""Benchmarks comparing models side by side: `python -m zoomin_jax.benchmark` (see __main__)."""
