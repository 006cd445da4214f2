"""Row-sparse optimizers and freezing for sparse memory finetuning (single process)."""
import pytest
import torch

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
    assert len(opt.states[0]) == 3 and opt.states[0]["step"].tolist() == [4, 4, 4]


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
