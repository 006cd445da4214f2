"""Row-sparse optimizers and freezing for sparse memory finetuning (single process)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from smft_dist.memory.values import LocalValueTable, ValueTable
from smft_dist.optim import MaskedAdamW, MaskedSGD, RowSparseAdamW, freeze_dense, merge_state_dicts
from smft_dist.selection import select_for_model
from tests.test_selection import tiny_model

SEL = type("Sel", (), {"top_t": 6, "mode": "tf"})()


def sparse_step(model, x, opt=None, lr=1.0):
    """One sparse-memory step; -> (loss, selected ids, grad rows, grad values before the update)."""
    table = model.memory_layers()[0].values
    table.zero_step()
    loss = model(input_ids=x, labels=x).loss
    (sel,), _ = select_for_model([table], None, SEL)
    loss.backward()
    rows, grad = table.sparse_grad()
    (opt or MaskedSGD([table], lr)).step([sel])
    return loss.item(), sel, rows, grad


def test_masked_sgd_moves_only_selected_rows_by_lr_times_grad():
    model = tiny_model()
    freeze_dense(model)
    table = model.memory_layers()[0].values
    before = table.weight.detach().clone()
    _, sel, rows, grad = sparse_step(model, torch.randint(1, 64, (2, 8)), lr=0.5)
    assert rows.numel() == sel.numel() == SEL.top_t and torch.equal(rows, sel)  # LocalValueTable: local == global
    after = table.weight.detach()
    untouched = torch.ones(table.num_rows, dtype=torch.bool)
    untouched[sel] = False
    assert torch.equal(after[untouched], before[untouched])
    assert torch.equal(after[rows], before[rows] - 0.5 * grad)
    assert (after[rows] != before[rows]).any(dim=1).all()


def test_dense_weights_keys_and_lower_layers_get_no_gradient():
    model = tiny_model()
    frozen = freeze_dense(model)
    assert "model.layers.1.mlp.keys.keys" in frozen and "model.layers.1.mlp.keys.query.weight" in frozen
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    requires = {}

    def record(name):
        def hook(module, inputs, out):
            requires[name] = (out[0] if isinstance(out, tuple) else out).requires_grad
        return hook

    model.model.embed_tokens.register_forward_hook(record("embed"))
    model.model.layers[0].register_forward_hook(record("layer0"))
    model.model.layers[1].register_forward_hook(record("layer1"))
    sparse_step(model, torch.randint(1, 64, (2, 8)))
    # no backward below the memory layer (layer 1); above it the graph exists through the rows
    assert requires == {"embed": False, "layer0": False, "layer1": True}
    for n, p in model.named_parameters():
        assert p.grad is None, n
        assert torch.equal(p, snapshot[n]) or n.endswith("values.weight"), n


def test_freeze_dense_undoes_input_require_grads():
    model = tiny_model()
    model.enable_input_require_grads()
    freeze_dense(model)
    out = model.model.embed_tokens(torch.tensor([[1, 2]]))
    assert not out.requires_grad


def test_a_sparse_step_lowers_the_loss_on_its_batch():
    model = tiny_model()
    freeze_dense(model)
    x = torch.randint(1, 64, (4, 8))
    loss0, *_ = sparse_step(model, x, lr=20.0)
    with torch.no_grad():
        loss1 = model(input_ids=x, labels=x).loss.item()
    assert loss1 < loss0


def test_bf16_storage_updates_in_fp32():
    model = tiny_model(value_dtype="bfloat16")
    freeze_dense(model)
    table = model.memory_layers()[0].values
    before = table.weight.detach().clone()
    _, sel, rows, grad = sparse_step(model, torch.randint(1, 64, (2, 8)), lr=0.5)
    assert table.weight.dtype == torch.bfloat16
    assert torch.equal(table.weight[rows], (before[rows].float() - 0.5 * grad).bfloat16())


def make_table(rows, dim):
    table = LocalValueTable(rows, dim)
    table.reset_parameters(torch.Generator().manual_seed(rows))
    return table


def push(table, ids, grad):
    table.zero_step()
    table.push_grad(torch.tensor(ids), grad)


def test_masked_sgd_momentum_keeps_state_only_for_selected_rows():
    table = make_table(100, 3)
    opt = MaskedSGD([table], lr=0.1, momentum=0.9)
    ref = torch.nn.Parameter(table.weight.detach()[[4, 9]].clone())
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    for step in range(3):
        g = torch.randn(3, 3)
        push(table, [4, 9, 50], g)
        opt.step([torch.tensor([4, 9])])
        ref.grad = g[:2].clone()
        ref_opt.step()
    assert len(opt.states[0]) == 2 and opt.state_dict()["tables"][0]["ids"].tolist() == [4, 9]
    torch.testing.assert_close(table.weight[[4, 9]], ref.detach(), rtol=1e-6, atol=1e-7)


def test_row_sparse_adamw_matches_torch_adamw_on_its_rows():
    table = make_table(1000, 8)
    untouched = table.weight.detach().clone()
    ids = [3, 500, 999]
    opt = RowSparseAdamW([table], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.nn.Parameter(table.weight.detach()[ids].clone())
    ref_opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(4):
        g = torch.randn(3, 8)
        push(table, ids, g)
        assert opt.step() == 3
        ref.grad = g.clone()
        ref_opt.step()
    torch.testing.assert_close(table.weight[ids], ref.detach(), rtol=1e-6, atol=1e-7)
    others = torch.ones(1000, dtype=torch.bool)
    others[ids] = False
    assert torch.equal(table.weight[others], untouched[others])
    assert len(opt.states[0]) == 3 and opt.state_dict()["tables"][0]["step"].tolist() == [4, 4, 4]


def test_masked_adamw_touches_only_selected_rows_with_per_row_steps():
    table = make_table(50, 4)
    before = table.weight.detach().clone()
    opt = MaskedAdamW([table], lr=0.01)
    push(table, [1, 2, 3], torch.randn(3, 4))
    opt.step([torch.tensor([1, 2])])
    push(table, [2, 3, 7], torch.randn(3, 4))
    opt.step([torch.tensor([2, 7])])
    sd = opt.state_dict()["tables"][0]
    assert sd["ids"].tolist() == [1, 2, 7] and sd["step"].tolist() == [1, 2, 1]
    changed = (table.weight != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [1, 2, 7]
    with pytest.raises(ValueError, match="needs the selected ids"):
        opt.step(None)


class _Shard(ValueTable):
    """Rows [row_start, row_end) with a local push_grad (enough for optimizer state tests)."""

    def push_grad(self, ids_U, grad_UD):
        self._grad.add(ids_U - self.row_start, grad_UD)


def test_optimizer_state_reshards_by_global_row_id():
    full = make_table(10, 2)
    opt = RowSparseAdamW([full], lr=0.1)
    push(full, [1, 6, 8], torch.randn(3, 2))
    opt.step()
    sd = opt.state_dict()
    halves = [_Shard(10, 2, 0, 5), _Shard(10, 2, 5, 10)]
    for h in halves:
        h.reset_parameters()
    loaded = [RowSparseAdamW([h], lr=0.5) for h in halves]
    for o in loaded:
        o.load_state_dict(sd)
    assert loaded[0].lr == 0.1
    assert [o.state_dict()["tables"][0]["ids"].tolist() for o in loaded] == [[1], [6, 8]]
    merged = merge_state_dicts([o.state_dict() for o in loaded] + [loaded[1].state_dict()])  # + a replica
    for k, v in sd["tables"][0].items():
        assert torch.equal(merged["tables"][0][k], v), k
    # a later step continues each row's own step count
    halves[1].zero_step()
    halves[1].push_grad(torch.tensor([6]), torch.ones(1, 2))
    loaded[1].step()
    assert loaded[1].state_dict()["tables"][0]["step"].tolist() == [2, 1]


def _lazy_adamw_run(value_dtype, chunk_elements, monkeypatch):
    """5 steps of RowSparseAdamW (weight decay on) on a 40 x 5 table, CHUNK_ELEMENTS =
    chunk_elements; each step touches 7 + 2 x step random rows (so rows join at different steps and
    their step counts differ) with gradients of scale 10^(step - 2).
    -> (table, optimizer, initial weights, [(ids, grad) per step])."""
    import smft_dist.optim.sparse as sparse

    monkeypatch.setattr(sparse, "CHUNK_ELEMENTS", chunk_elements)
    table = LocalValueTable(40, 5, dtype=value_dtype)
    table.reset_parameters(torch.Generator().manual_seed(0))
    init = table.weight.detach().float().clone()
    opt = RowSparseAdamW([table], lr=0.03, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    g, pushes = torch.Generator().manual_seed(1), []
    for step in range(5):
        ids = sorted(torch.randperm(40, generator=g)[:7 + 2 * step].tolist())
        grad = torch.randn(len(ids), 5, generator=g) * 10 ** float(step - 2)
        push(table, ids, grad)
        opt.step()
        pushes.append((ids, grad))
    return table, opt, init, pushes


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_lazy_adamw_is_torch_adamw_on_each_row_when_touched(monkeypatch, value_dtype):
    """Reference: every row its own torch.optim.AdamW (single-tensor, foreach=False), stepped only
    on the steps whose gradient touches the row (its own step count), from the row's fp32 value.
    The moments see the same gradients through the same ops (lerp_, mul_, addcmul_): bitwise equal.
    The weights may differ in the last bits: each update lr / bc1 x m / (sqrt(v) / sqrt(bc2) + eps)
    is formed here with the bias corrections rounded to fp32 factors and 1/sqrt(bc2) multiplied
    where torch divides, about 10 roundings of 2^-24 on either side, so the updates differ by at
    most 10 x 2^-24 of the largest update |u|; the weight's own rounding (w - u) adds an ulp of w,
    at most 2^-23 |w|. The moments do not depend on the weights and the decay contracts, so these
    add up over the steps without growing: per step at most 2^-20.7 |u| + 2^-23 |w|."""
    table, opt, init, pushes = _lazy_adamw_run(value_dtype, 16, monkeypatch)  # chunks of 3 rows
    refs = {i: torch.nn.Parameter(init[i].clone()) for ids, _ in pushes for i in ids}
    ref_opts = {i: torch.optim.AdamW([p], lr=0.03, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
                for i, p in refs.items()}
    largest_update = 0.0
    for ids, grad in pushes:
        for i, g in zip(ids, grad):
            before = refs[i].detach().clone()
            refs[i].grad = g.clone()
            ref_opts[i].step()
            largest_update = max(largest_update, (refs[i].detach() - before * (1 - 0.03 * 0.1)).abs().max().item())
    ids = sorted(refs)
    want = torch.stack([refs[i].detach() for i in ids])
    state = opt.states[0]
    slots = state.slots(torch.tensor(ids))
    got = state["master"][slots] if value_dtype == torch.bfloat16 else table.weight.detach()[ids]
    bound = len(pushes) * (10 * 2**-24 * largest_update + 2**-23 * want.abs().max().item())
    assert largest_update > 1e-2  # the steps moved the rows (~lr)
    torch.testing.assert_close(got, want, rtol=0, atol=bound)
    if value_dtype == torch.bfloat16:  # the table holds the master's rounding
        assert torch.equal(table.weight.detach()[ids], got.bfloat16())
    for name in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(state[name][slots], torch.stack([ref_opts[i].state[refs[i]][name] for i in ids])
                           .to(state[name].dtype)), name
    others = torch.ones(40, dtype=torch.bool)
    others[ids] = False
    assert torch.equal(table.weight.detach().float()[others], init[others])


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_chunking_does_not_change_lazy_adamw(monkeypatch, value_dtype):
    """Chunks of 3 rows (16 elements over dim 5) against one chunk: every weight, moment and step
    count bitwise equal (the update is elementwise and the per-row factors are made once per step)."""
    chunked, chunked_opt, *_ = _lazy_adamw_run(value_dtype, 16, monkeypatch)
    whole, whole_opt, *_ = _lazy_adamw_run(value_dtype, 2**24, monkeypatch)
    assert torch.equal(chunked.weight, whole.weight)
    for k, v in whole_opt.state_dict()["tables"][0].items():
        assert torch.equal(chunked_opt.state_dict()["tables"][0][k], v), k


class _FullSizeAllocations(TorchDispatchMode):
    """Counts the new tensors of at least `numel` elements that ops allocate (not in-place results
    or views: those share an input's storage)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        self.count += sum(o.numel() >= self.numel and o.untyped_storage().data_ptr() not in inputs
                          for o in tree_leaves(out) if isinstance(o, torch.Tensor))
        return out


def test_adamw_update_makes_no_full_size_temporary(monkeypatch):
    """100 rows x 16 updated in chunks of 10 rows: no op inside the update makes a new 100 x 16
    tensor (the whole-tensor formula made 10: the two gathered moments, then 8 temporaries)."""
    import smft_dist.optim.sparse as sparse

    monkeypatch.setattr(sparse, "CHUNK_ELEMENTS", 160)
    table = make_table(200, 16)
    opt = RowSparseAdamW([table], lr=0.01, weight_decay=0.1)
    rows_U = torch.arange(0, 200, 2)
    w_UD, grad_UD = table.weight[rows_U].float(), torch.randn(100, 16)
    opt.update_rows(table, opt.states[0], rows_U, w_UD.clone(), grad_UD)  # the state exists: no growth
    w = w_UD.clone()
    with _FullSizeAllocations(100 * 16) as allocations:
        opt.update_rows(table, opt.states[0], rows_U, w, grad_UD)
    assert allocations.count == 0


class _OpsOnRows(TorchDispatchMode):
    """Records (op, dtypes of its tensor operands and results) for every op that reads or writes rows:
    a 2-d tensor of at least `numel` elements (not the per-row ids, slots and step counts)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.dim() == 2 and t.numel() >= self.numel for t in tensors):
            self.ops.append((func.overloadpacket.__name__, {t.dtype for t in tensors}))
        return out


def test_lazy_adamw_step_gathers_rows_by_copy_and_computes_in_fp32(monkeypatch):
    """A whole step (weights, moments, per-row step counts; 100 of 200 rows in chunks of 10) on the
    rows' scale: rows are gathered by `index_select` and written by `index_copy_` (aten::index and
    index_put compute an offset per element: ~10x slower on CPU at D = 128), and no op on a chunk
    takes a float64 operand (the per-row bias corrections are rounded to fp32 once per step, not
    applied in float64 to every element and copied back)."""
    import smft_dist.optim.sparse as sparse

    monkeypatch.setattr(sparse, "CHUNK_ELEMENTS", 160)
    table = make_table(200, 16)
    opt = RowSparseAdamW([table], lr=0.01, weight_decay=0.1)
    rows = torch.arange(0, 200, 2)
    for _ in range(2):  # the second step finds every row's state
        push(table, rows.tolist(), torch.randn(100, 16))
        coalesced = table.sparse_grad()  # outside the record: the table's gradient, not the optimizer's ops
        monkeypatch.setattr(table, "sparse_grad", lambda: coalesced)
        with _OpsOnRows(160) as recorded:
            opt.step()
    names = {name for name, _ in recorded.ops}
    assert {"index_select", "index_copy_"} <= names and not names & {"index", "index_put_", "_index_put_impl_"}
    assert [name for name, dtypes in recorded.ops if torch.float64 in dtypes] == []
