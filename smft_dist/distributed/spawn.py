"""Run a plain per-rank function on `world_size` local processes (TorchRec's test shape).

    def body(rank, world_size, *args): ...   # module-level, so it pickles
    results = run_ranks(body, 2, *args)

Each rank gets the default process group on a free localhost port (gloo unless told otherwise)
and the launcher environment (RANK, WORLD_SIZE, LOCAL_RANK, ...), so `init_distributed` reuses
the group. `run_ranks` joins the ranks, raises with the failing rank's traceback, and returns
what each rank returned, in rank order. Used by the multi-rank tests and the benchmarks.
"""
from __future__ import annotations

import io
import os
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, timeout_s, threads, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        dist.barrier()
        buf = io.BytesIO()
        torch.save(result, buf)  # plain bytes: tensors must outlive this process (no shared-memory fds)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report, then exit non-zero
        queue.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0, backend: str = "gloo",
              pg_timeout_s: float = 120.0, threads: int = 1):
    """-> [fn(rank, world_size, *args) for each rank]; `timeout` bounds the wait for each result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, pg_timeout_s, threads, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    assert not bad, f"ranks exited non-zero: {bad}"
    return [results[r] for r in range(world_size)]
