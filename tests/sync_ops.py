"""Count the ops of a piece of code that make the host wait for a CUDA device (a "host sync").

On a GPU the host queues kernels and runs ahead; an op whose result the host must read (a Python
number, an output size known only after the kernel ran, a device-to-host copy) stalls the host until
the device has caught up, and rules out CUDA graphs. On CPU nothing waits, so this counts the ops
that WOULD sync if the tensors lived on a CUDA device, each with the smft_dist line that called it:

    with SyncCounter() as syncs:
        trainer.train_step(batch)
    print(syncs.breakdown())    # "  3  smft_dist/memory/values.py:169 embedding_bag  aten._unique2"

Two levels are watched, because some reads never reach the dispatcher on a CPU tensor:
- aten ops (a `TorchDispatchMode`): `_local_scalar_dense` (`.item()`, `int(t)`, `bool(t)`, `float(t)`),
  `nonzero` (`torch.where(mask)`, `argwhere`), every `unique`, `masked_select`, `bincount`,
  `repeat_interleave` without `output_size`, `equal`, `is_nonzero`, indexing or index-assignment
  with a boolean mask (it runs `nonzero` for the output size), and `isin` without `assume_unique`
  where ATen takes its sorting path (which runs `unique` on both inputs);
- Python tensor methods (a `TorchFunctionMode`): `.tolist()`, `.cpu()`, `.numpy()` and
  `.to("cpu")` (device-to-host copies; a `.to(device)` counts only when the device is the string
  "cpu": on a CPU run the run's device cannot tell a copy from a no-op), and `torch.tensor` /
  `torch.as_tensor` of non-empty host data with a `device=` (a blocking host-to-device copy). The
  ops run inside one of these are not counted again.

Not counted: a torch.optim optimizer's reads of its step count (host tensors unless capturable),
collectives (NCCL runs them on a stream, the host does not wait; `collectives` lists them apart),
and `.to(device, non_blocking=True)` copies.
"""
from __future__ import annotations

import collections
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

PACKAGE = Path(__file__).resolve().parents[1] / "smft_dist"
aten = torch.ops.aten

# ops that sync whatever their arguments
ALWAYS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default, aten.bincount.default, aten.equal.default, aten.is_nonzero.default,
}
BOOL_INDEX = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
HOST_READS = {torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy}
FACTORIES = {torch.tensor, torch.as_tensor}


def _isin_sorts(args, kwargs) -> bool:
    """aten isin's choice (TensorCompare.cpp): brute force below 10 x |test|^0.145 elements, else
    sort, and without assume_unique the sort path first runs `unique` on both inputs."""
    elements, test = args[0], args[1]
    if kwargs.get("assume_unique", args[2] if len(args) > 2 else False):
        return False
    return elements.numel() >= 10.0 * test.numel() ** 0.145


def _syncs(func, args, kwargs) -> bool:
    if func in ALWAYS:
        return True
    if func in BOOL_INDEX:
        indices = args[1]
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func is aten.isin.Tensor_Tensor:
        return _isin_sorts(args, kwargs)
    return False


def _where(f: traceback.FrameSummary) -> str:
    path = Path(f.filename).resolve()
    name = f"smft_dist/{path.relative_to(PACKAGE)}" if path.is_relative_to(PACKAGE) else "/".join(path.parts[-2:])
    return f"{name}:{f.lineno} {f.name}"


def _host_step_count(func) -> bool:
    """A torch.optim optimizer reading its step count: a host tensor unless capturable/fused, so
    its `.item()` never waits for the device (on a CPU run every tensor is a host tensor)."""
    return func is aten._local_scalar_dense.default and any(
        "/torch/optim/" in f.filename for f in traceback.extract_stack())


def _call_site() -> str:
    """`smft_dist/<file>:<line> <function>` of the innermost smft_dist frame calling the op; when
    the op runs in a library it calls (transformers, ...), that library's line first."""
    frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
    ours = [i for i, f in enumerate(frames) if Path(f.filename).resolve().is_relative_to(PACKAGE)]
    if not ours:
        return _where(frames[-1]) if frames else "?"
    site = _where(frames[ours[-1]])
    return site if ours[-1] == len(frames) - 1 else f"{_where(frames[-1])} <- {site}"


class _Ops(TorchDispatchMode):
    def __init__(self, counter: "SyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            self.counter.collectives.append((str(func), _call_site()))
        if not self.counter._inside_read and _syncs(func, args, kwargs) and not _host_step_count(func):
            self.counter._record(str(func))
        return func(*args, **kwargs)


class _Reads(TorchFunctionMode):
    def __init__(self, counter: "SyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = None
        if func in HOST_READS:
            name = f".{func.__name__}()"
        elif func is torch.Tensor.to and "cpu" in (*args[1:2], kwargs.get("device")) and not kwargs.get("non_blocking"):
            name = '.to("cpu")'
        elif func in FACTORIES and kwargs.get("device") is not None and not isinstance(args[0], torch.Tensor):
            name = f"torch.{func.__name__}(host data, device=...)"
        if name is None or self.counter._inside_read:
            return func(*args, **kwargs)
        self.counter._inside_read = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.counter._inside_read = False
        if func not in FACTORIES or out.numel():  # an empty tensor copies nothing
            self.counter._record(name)
        return out


class SyncCounter:
    """Context manager: `events` lists (op, call site) of every sync-inducing op run inside it;
    `collectives` the same for torch.distributed's collectives (not syncs: counted apart)."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []
        self.collectives: list[tuple[str, str]] = []
        self._inside_read = False
        self._modes = (_Reads(self), _Ops(self))

    def _record(self, op: str) -> None:
        self.events.append((op, _call_site()))

    def __enter__(self) -> "SyncCounter":
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)

    def __len__(self) -> int:
        return len(self.events)

    def by_site(self) -> collections.Counter:
        """-> Counter {(call site, op): n}."""
        return collections.Counter((site, op) for op, site in self.events)

    def breakdown(self) -> str:
        """One line per call site and op, most frequent first, then the total."""
        lines = [f"{n:4d}  {site}  {op}" for (site, op), n in self.by_site().most_common()]
        return "\n".join(lines + [f"{len(self):4d}  total"])
