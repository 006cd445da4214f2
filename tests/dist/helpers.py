"""The multi-rank test harness lives in the package (the benchmarks use it too)."""
from smft_dist.distributed.spawn import free_port, run_ranks

__all__ = ["free_port", "run_ranks"]
