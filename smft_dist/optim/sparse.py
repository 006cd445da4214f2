"""Row-sparse optimizers for memory value tables (docs/design.md §1.3, §2.5).

Shape legend: U rows updated this step (of this shard), D value dim.

Each reads the table's row-sparse gradient (`table.sparse_grad()`: local ids + rows), updates only
those rows of the local shard in place, and reads and writes state only for those rows (row_state.py:
the masked optimizers keep it for the rows ever updated, `RowState`; those that train every touched
row allocate it once for every row, `DenseRowState`). Cost per step O(U x D), independent of the
table size.

bf16 storage: the update is computed in fp32 on an fp32 master copy of each row the optimizer has
updated (state "master", made from the bf16 row the first time), and the table gets its rounding.
Rounding the updated row straight into bf16 would drop every per-element change below half a
bf16 ulp: at the paper's lr 2 and values ~N(0, 1/32) that is any update under about 6e-5, i.e.
most of a fact's gradient. A master copy is exact, and costs 4 x D bytes per row ever updated:
O(rows touched) in sparse finetuning, which always keeps it. Where values train densely,
`optim.memory_stochastic_rounding` drops the master instead (rounding.py: right in expectation,
its bits a hash of seed, row, update count and element, so runs stay reproducible).

- `MaskedSGD`: sparse memory finetuning. V[rows] -= lr * G[rows] for the selected rows only.
- `MaskedAdamW`: the paper's ablation, same selection, lazy AdamW on the selected rows.
- `RowSparseAdamW`: pretraining / full finetuning of values: lazy AdamW on every touched row.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from smft_dist.memory.values import ValueTable
from smft_dist.optim.row_state import DenseRowState, RowState

Selected = Optional[Sequence[Optional[torch.Tensor]]]
CHUNK_ELEMENTS = 2**24  # elements of one lazy AdamW chunk: its fp32 temporaries are 64 MiB each


def selected_grad(table: ValueTable, selected: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (local rows_U, grad_UD fp32): this step's gradient rows, limited to `selected` global ids
    (unique, as `select_top_t` gives them; None: every row with a gradient). Usually `restrict_grad_to` already limited them; the
    intersection keeps the optimizer correct on its own."""
    rows_U, grad_UD = table.sparse_grad()
    if selected is not None and rows_U.numel():
        # Both lists are unique: isin then skips its `unique` of each (a host sync on a GPU). The
        # kept rows' positions are the one read: their number sizes every tensor after.
        keep_U = torch.isin(rows_U + table.row_start, selected.to(rows_U.device), assume_unique=True)
        kept = keep_U.nonzero().squeeze(1)
        rows_U, grad_UD = rows_U[kept], grad_UD[kept]
    return rows_U, grad_UD


class RowSparseOptimizer:
    """Base: a list of value tables, one row state per table, `lr` settable by a scheduler."""

    masked = False  # True: `step` requires the selected ids (sparse memory finetuning)
    # Trained densely, every row the batches touch is updated, over a run every row of the shard:
    # its state is allocated once for all of them. The masked optimizers set `RowState` (few rows).
    row_state_class: type = DenseRowState

    def __init__(self, tables: Sequence[ValueTable], lr: float):
        if not lr > 0:
            raise ValueError(f"memory learning rate {lr} must be > 0 (optim.memory_lr)")
        self.tables, self.lr = list(tables), float(lr)
        self.states = [self.row_state_class(t, self._all_specs(t)) for t in self.tables]

    def state_specs(self, table: ValueTable) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {}

    def _all_specs(self, table: ValueTable) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        master = {"master": ((table.dim,), torch.float32)} if table.weight.dtype != torch.float32 else {}
        return {**self.state_specs(table), **master}

    def update_rows(self, table: ValueTable, state: RowState, rows_U: torch.Tensor, w_UD: torch.Tensor,
                    grad_UD: torch.Tensor) -> torch.Tensor:
        """-> the new fp32 value of rows_U, given their current fp32 value w_UD (a copy the update
        may overwrite in place) and gradient."""
        raise NotImplementedError

    @staticmethod
    def _current(table: ValueTable, state: RowState, rows_U: torch.Tensor) -> torch.Tensor:
        """-> the fp32 value of rows_U: the master copy when the table is stored in lower precision
        (made from the stored row on a row's first update), else the row itself."""
        # index_select, not weight[rows_U]: a row gather is a copy of each row (aten::index
        # computes every element's offset: ~10x slower on CPU at D = 128)
        if "master" not in state.specs:
            return table.weight.index_select(0, rows_U).float()
        slots, new_N = state.claim(rows_U)
        master = state["master"]
        # the rows given state just now start from their stored value
        master.index_copy_(0, slots[new_N], table.weight.index_select(0, rows_U[new_N]).float())
        return master.index_select(0, slots)

    def _stored(self, table: ValueTable, state: RowState, rows_U: torch.Tensor, new_UD: torch.Tensor) -> torch.Tensor:
        """-> the updated fp32 rows new_UD in the table's dtype, rounded to nearest (the master copy
        keeps what rounding drops; rowwise.StochasticRounding rounds stochastically instead)."""
        return new_UD.to(table.weight.dtype)

    @torch.no_grad()
    def step(self, selected_ids_per_table: Selected = None) -> int:
        """Update the rows that have a gradient and are selected (None: all of them).
        -> the number of rows updated on this rank."""
        if selected_ids_per_table is None and self.masked:
            raise ValueError(f"{type(self).__name__}.step needs the selected ids of each table (from select_for_model)")
        if selected_ids_per_table is None:
            selected_ids_per_table = [None] * len(self.tables)
        if len(selected_ids_per_table) != len(self.tables):
            raise ValueError(f"{len(selected_ids_per_table)} selections for {len(self.tables)} memory tables")
        n = 0
        with torch.profiler.record_function("smft/optimizer"):
            for table, state, selected in zip(self.tables, self.states, selected_ids_per_table):
                rows_U, grad_UD = selected_grad(table, selected)
                if rows_U.numel():
                    new_UD = self.update_rows(table, state, rows_U, self._current(table, state, rows_U), grad_UD)
                    if "master" in state.specs:
                        state["master"].index_copy_(0, state.slots(rows_U), new_UD)
                    table.weight.index_copy_(0, rows_U, self._stored(table, state, rows_U, new_UD))
                    n += rows_U.numel()
        return n

    def state_dict(self) -> dict:
        """This shard's state, keyed by global row id (concatenate ranks' dicts to reshard)."""
        return {"lr": self.lr, "tables": [s.state_dict() for s in self.states]}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["tables"]) != len(self.states):
            raise ValueError(f"optimizer state has {len(sd['tables'])} memory tables, the model {len(self.states)}")
        self.lr = float(sd["lr"])
        for table, state, table_sd in zip(self.tables, self.states, sd["tables"]):
            if "master" in state.specs and "master" not in table_sd:  # saved from an fp32 table: start from the rows
                local = table_sd["ids"].long() - table.row_start
                mine = (local >= 0) & (local < table.row_end - table.row_start)
                master = torch.zeros(local.numel(), table.dim)
                master[mine] = table.weight[local[mine].to(table.weight.device)].float().cpu()
                table_sd = {**table_sd, "master": master}
            state.load_state_dict(table_sd)


class MaskedSGD(RowSparseOptimizer):
    """V[rows] -= lr * G[rows] on the selected rows (no weight decay). With momentum, a buffer
    (PyTorch SGD's, dampening 0) exists only for rows ever selected; unselected rows stay frozen."""

    masked = True
    row_state_class = RowState

    def __init__(self, tables: Sequence[ValueTable], lr: float, momentum: float = 0.0):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum {momentum} must be in [0, 1) (optim.momentum)")
        self.momentum = float(momentum)
        super().__init__(tables, lr)

    def state_specs(self, table):
        return {"momentum_buffer": ((table.dim,), torch.float32)} if self.momentum else {}

    def update_rows(self, table, state, rows_U, w_UD, grad_UD):
        if self.momentum:
            slots = state.slots(rows_U)
            buf = state["momentum_buffer"]
            grad_UD = buf[slots].mul_(self.momentum).add_(grad_UD)
            buf[slots] = grad_UD
        return w_UD.sub_(self.lr * grad_UD)


class RowSparseAdamW(RowSparseOptimizer):
    """Lazy AdamW: only rows with a gradient are updated, each with its own step count for the
    bias correction; state exists only for rows ever updated. torch.optim.AdamW's arithmetic on
    those rows, up to the last-bit rounding of the bias corrections (`update_rows`)."""

    def __init__(self, tables: Sequence[ValueTable], lr: float, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        super().__init__(tables, lr)

    def state_specs(self, table):
        return {"exp_avg": ((table.dim,), torch.float32), "exp_avg_sq": ((table.dim,), torch.float32),
                "step": ((), torch.int64)}

    def update_rows(self, table, state, rows_U, w_UD, grad_UD):
        """In place on w_UD, CHUNK_ELEMENTS at a time: each chunk's moments are gathered
        (`index_select`: a copy per row), updated in place in fp32 and written back (`index_copy_`),
        so the transient memory is a few chunks and no U x D op runs in float64. Elementwise, so the
        result is the same whatever the chunk size.

        The bias corrections are per row (lazy: each row has its own step count t). They are
        computed once per step for the U rows in float64 and rounded once to fp32 factors:
        1 - beta^t is in [1 - beta, 1] ([0.001, 1] at beta2 = 0.999), and computed in fp32 it would
        lose up to 2^-24 / 0.001 ~ 6e-5 relative to cancellation at t = 1; rounded from float64 each
        factor is within 2^-24 ~ 6e-8 relative of the exact one. torch.optim.AdamW itself applies
        its float64 scalars to fp32 tensors as fp32 scalars, so this is its arithmetic up to that
        last-bit rounding (and a multiplication by 1/sqrt(bc2) where it divides by sqrt(bc2))."""
        slots = state.slots(rows_U)
        step_U = state["step"].index_select(0, slots).add_(1)
        state["step"].index_copy_(0, slots, step_U)
        t_U = step_U.double()
        step_size_U1 = (self.lr / (1 - self.beta1 ** t_U)).float()[:, None]  # lr / bc1
        inv_bc2_sqrt_U1 = (1 - self.beta2 ** t_U).rsqrt().float()[:, None]  # 1 / sqrt(bc2)
        exp_avg_S, exp_avg_sq_S = state["exp_avg"], state["exp_avg_sq"]
        chunk = max(1, CHUNK_ELEMENTS // max(table.dim, 1))
        for start in range(0, rows_U.numel(), chunk):
            part = slice(start, start + chunk)
            slots_C, grad_CD, w_CD = slots[part], grad_UD[part], w_UD[part]
            m_CD = exp_avg_S.index_select(0, slots_C).lerp_(grad_CD, 1 - self.beta1)
            v_CD = exp_avg_sq_S.index_select(0, slots_C).mul_(self.beta2).addcmul_(grad_CD, grad_CD,
                                                                                    value=1 - self.beta2)
            exp_avg_S.index_copy_(0, slots_C, m_CD)
            exp_avg_sq_S.index_copy_(0, slots_C, v_CD)
            w_CD.mul_(1 - self.lr * self.weight_decay)
            denom_CD = v_CD.sqrt_().mul_(inv_bc2_sqrt_U1[part]).add_(self.eps)  # v_CD is written back above
            w_CD.sub_(m_CD.mul_(step_size_U1[part]).div_(denom_CD))
        return w_UD


class MaskedAdamW(RowSparseAdamW):
    """The paper's ablation: lazy AdamW on the selected rows only (default no weight decay)."""

    def __init__(self, tables, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay: float = 0.0):
        super().__init__(tables, lr, betas, eps, weight_decay)

    masked = True
    row_state_class = RowState


def merge_state_dicts(shard_sds: Sequence[dict]) -> dict:
    """One optimizer state dict from every shard's `state_dict()` (e.g. each rank's checkpoint
    file), loadable at any shard layout. Rows held twice (replicas) are kept once."""
    tables = []
    for i in range(len(shard_sds[0]["tables"])):
        parts = [sd["tables"][i] for sd in shard_sds]
        ids = torch.cat([p["ids"] for p in parts])
        uniq, inv = torch.unique(ids, return_inverse=True)
        first = torch.full_like(uniq, ids.numel()).scatter_reduce_(0, inv, torch.arange(ids.numel()), "amin")
        tables.append({k: torch.cat([p[k] for p in parts])[first] for k in parts[0]})
    return {"lr": shard_sds[0]["lr"], "tables": tables}


def build_memory_optimizer(tables: Sequence[ValueTable], optim_cfg) -> RowSparseOptimizer:
    """The sparse-memory-finetuning optimizer named by `optim.memory_optimizer` (sgd | adamw)."""
    if optim_cfg.memory_optimizer == "sgd":
        return MaskedSGD(tables, optim_cfg.memory_lr, optim_cfg.momentum)
    if optim_cfg.memory_optimizer == "adamw":
        return MaskedAdamW(tables, optim_cfg.memory_lr, optim_cfg.betas, optim_cfg.eps)
    raise ValueError(f"optim.memory_optimizer={optim_cfg.memory_optimizer!r} is not one of ['sgd', 'adamw']")
