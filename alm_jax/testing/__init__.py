"""PyTorch reference implementations for parity tests and benchmarks (torch, a `test` extra, imported only here)."""
