"""med3d_ext benchmark suite: ``python -m benchmarks --help``."""
