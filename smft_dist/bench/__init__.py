"""Benchmarks that write JSON figures (``python -m smft_dist.bench.<name> --json OUT``)."""
