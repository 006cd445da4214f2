"""Row-wise optimizer state for memory value rows trained densely (pretraining, full finetuning).

Shape legend: U rows updated this step (of this shard), C rows of one chunk, D value dim.

`RowSparseAdamW` keeps two fp32 moments per value (8 x D bytes per row next to the 2 x D of a
bf16 row). The optimizers here keep the second moment per ROW instead, the mean over the row of
the squared gradient, as FBGEMM's EXACT_ROWWISE_ADAGRAD / PARTIAL_ROWWISE_ADAM (TorchRec's
embedding optimizers) do:

- `RowwiseAdagrad` (`optim.memory_row_optimizer: rowwise_adagrad`): one fp32 accumulator per row,
  G += mean_d(g_d^2); w -= lr * g / (sqrt(G) + eps). 4 bytes per row, + 1 (a bool per row marks
  the rows updated: no step count does).
- `AdamRowwise` (`adam_rowwise`): a per-row EMA of mean_d(g_d^2) and a per-row step count (the
  bias corrections, per row as in `RowSparseAdamW`: rows are updated lazily), with an optional
  per-element first moment (`optim.memory_row_momentum`). 12 bytes per row, + 4 x D with momentum.

Both are lazy: only rows with a gradient this step are updated, and a row's state is zero until
its first update (`DenseRowState`, allocated once for every row of the shard; bf16 tables add its
fp32 "master" rows, as for every row optimizer).

`optim.memory_stochastic_rounding` (bf16 values; `with_stochastic_rounding`): any of these, or
`RowSparseAdamW`, keeps no master rows and writes each updated row back to bf16 by stochastic
rounding (rounding.py): 2 bytes per value plus the row state above.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from smft_dist.memory.values import ValueTable
from smft_dist.optim.rounding import stochastic_round_bf16
from smft_dist.optim.row_state import RowState
from smft_dist.optim.sparse import CHUNK_ELEMENTS, RowSparseAdamW, RowSparseOptimizer


def row_chunks(rows: int, dim: int) -> Iterator[slice]:
    """Slices of at most CHUNK_ELEMENTS elements of a (rows, dim) tensor: the update's C x D
    temporaries stay a few chunks, not U x D. The arithmetic is per row, so chunks change no bit."""
    chunk = max(1, CHUNK_ELEMENTS // max(dim, 1))
    for start in range(0, rows, chunk):
        yield slice(start, start + chunk)


def mean_square(grad_UD: torch.Tensor) -> torch.Tensor:
    """-> mean over each row of its squared gradient, (U,) fp32 (FBGEMM's sum / D)."""
    out_U = grad_UD.new_empty(grad_UD.shape[0])
    for part in row_chunks(grad_UD.shape[0], grad_UD.shape[1]):
        out_U[part] = grad_UD[part].square().mean(1)
    return out_U


class RowwiseAdagrad(RowSparseOptimizer):
    """Row-wise Adagrad: state "sum_sq" (S,) fp32 per row, no weight decay."""

    def __init__(self, tables: Sequence[ValueTable], lr: float, eps: float = 1e-8):
        self.eps = float(eps)
        super().__init__(tables, lr)

    def state_specs(self, table):
        return {"sum_sq": ((), torch.float32)}

    def update_rows(self, table, state, rows_U, w_UD, grad_UD):
        slots_U = state.slots(rows_U)
        sum_sq_U = state["sum_sq"][slots_U] + mean_square(grad_UD)
        state["sum_sq"][slots_U] = sum_sq_U
        step_U1 = (self.lr / (sum_sq_U.sqrt() + self.eps))[:, None]  # FBGEMM's per-row multiplier
        for part in row_chunks(*w_UD.shape):
            w_UD[part].sub_(grad_UD[part] * step_U1[part])
        return w_UD


class AdamRowwise(RowSparseOptimizer):
    """Adam with a per-row second moment: state "exp_avg_sq" (S,) fp32, "step" (S,) int64 and, with
    momentum, "exp_avg" (S, D) fp32. No weight decay. Bias corrections in float64, as in
    `RowSparseAdamW`; without momentum the update is lr * g / (sqrt(v_hat) + eps)."""

    def __init__(self, tables: Sequence[ValueTable], lr: float, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, momentum: bool = True):
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps, self.momentum = float(eps), bool(momentum)
        super().__init__(tables, lr)

    def state_specs(self, table):
        first = {"exp_avg": ((table.dim,), torch.float32)} if self.momentum else {}
        return {**first, "exp_avg_sq": ((), torch.float32), "step": ((), torch.int64)}

    def update_rows(self, table, state, rows_U, w_UD, grad_UD):
        slots_U = state.slots(rows_U)
        step_U = state["step"][slots_U] + 1
        state["step"][slots_U] = step_U
        v_U = state["exp_avg_sq"][slots_U].mul_(self.beta2).add_(mean_square(grad_UD), alpha=1 - self.beta2)
        state["exp_avg_sq"][slots_U] = v_U
        step_U1 = step_U[:, None].double()
        # fp32 / float64 computes in float64 and rounds to fp32, as RowSparseAdamW's denominator
        denom_U1 = (v_U[:, None].sqrt() / (1 - self.beta2 ** step_U1).sqrt() + self.eps).float()
        if not self.momentum:
            for part in row_chunks(*w_UD.shape):
                w_UD[part].sub_(grad_UD[part] * (self.lr / denom_U1[part]))
            return w_UD
        lr_U1 = (self.lr / (1 - self.beta1 ** step_U1)).float()
        exp_avg_S = state["exp_avg"]
        for part in row_chunks(*w_UD.shape):
            m_CD = exp_avg_S[slots_U[part]].lerp_(grad_UD[part], 1 - self.beta1)
            exp_avg_S[slots_U[part]] = m_CD
            w_UD[part].sub_(m_CD.mul_(lr_U1[part]).div_(denom_U1[part]))
        return w_UD


class StochasticRounding:
    """Mixed in before a row optimizer (`with_stochastic_rounding`): a bf16 table keeps no fp32
    "master" rows; each update starts from the stored bf16 row (read as fp32) and writes the new
    fp32 row back by `stochastic_round_bf16`, its bits keyed by (seed, the row's update count, global
    row id, element). The count is the optimizer's per-row "step" state, which this mixin adds and
    counts for an optimizer that keeps none (row-wise Adagrad: an int64 per row)."""

    def __init__(self, *args, seed: int, **kwargs):
        self.seed = int(seed)
        super().__init__(*args, **kwargs)

    def _all_specs(self, table: ValueTable) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if table.weight.dtype != torch.bfloat16:
            raise ValueError(f"stochastic rounding writes bf16 rows, and this table holds {table.weight.dtype}: "
                             "set model.memory_value_dtype=bfloat16")
        return {"step": ((), torch.int64), **self.state_specs(table)}  # no "master"

    def _stored(self, table: ValueTable, state: RowState, rows_U: torch.Tensor, new_UD: torch.Tensor) -> torch.Tensor:
        slots_U = state.slots(rows_U)
        if "step" not in self.state_specs(table):  # the optimizer counts no updates itself
            state["step"][slots_U] += 1
        return stochastic_round_bf16(new_UD, self.seed, state["step"][slots_U], rows_U + table.row_start)


def with_stochastic_rounding(optimizer_class: type) -> type:
    """-> `optimizer_class` with `StochasticRounding` mixed in (its constructor takes seed=)."""
    return type(f"StochasticRounding{optimizer_class.__name__}", (StochasticRounding, optimizer_class), {})


def build_memory_row_optimizer(tables: Sequence[ValueTable], optim_cfg, seed: int = 0) -> RowSparseOptimizer:
    """The optimizer of memory values trained densely (pretraining, full finetuning), named by
    `optim.memory_row_optimizer` (adamw | rowwise_adagrad | adam_rowwise); no weight decay. With
    `optim.memory_stochastic_rounding`, without master rows, rounding with the run's `seed`."""
    name = optim_cfg.memory_row_optimizer
    if name == "adamw":
        cls, args = RowSparseAdamW, (optim_cfg.memory_lr, optim_cfg.betas, optim_cfg.eps, 0.0)
    elif name == "rowwise_adagrad":
        cls, args = RowwiseAdagrad, (optim_cfg.memory_lr, optim_cfg.eps)
    elif name == "adam_rowwise":
        cls, args = AdamRowwise, (optim_cfg.memory_lr, optim_cfg.betas, optim_cfg.eps, optim_cfg.memory_row_momentum)
    else:
        raise ValueError(f"optim.memory_row_optimizer={name!r} is not one of ['adamw', 'rowwise_adagrad', "
                         "'adam_rowwise']")
    if optim_cfg.memory_stochastic_rounding:
        return with_stochastic_rounding(cls)(tables, *args, seed=seed)
    return cls(tables, *args)
