"""Row-wise optimizer state for memory values trained densely (`optim.memory_row_optimizer`): the
optimizers against a float64 reference of their formulas, laziness, the config key's validation
and its effect on a real pretraining, and `smft-inspect --plan`'s bytes against real row state.
(tests/dist/test_rowwise_optim_dist.py: 2 gloo ranks, checkpoint reshard.)"""
import json
import math

import pytest
import torch
from safetensors import safe_open

from smft_dist.config import ConfigError, load_config
from smft_dist.memory.plan import RowShardPlan
from smft_dist.memory.values import DTYPES, LocalValueTable, ValueTable
from smft_dist.model.inspect import main as inspect_main
from smft_dist.model.memory_plan import memory_plan
from smft_dist.optim import AdamRowwise, RowwiseAdagrad, build_memory_row_optimizer
from smft_dist.optim.row_state import DenseRowState
from tests.conftest import PY, ROOT, data_overrides, latest_dir, run_cli
from tests.test_row_state import dense_state_bytes

U = 2.0**-24  # fp32 unit roundoff
N, D, LR, BETAS = 40, 8, 0.03, (0.9, 0.95)
EPS = 1e-3  # large enough that where eps enters the formula shows (it moves updates by ~1e-3 relative)
# ids of each step: overlapping sets, so rows have different step counts and some rest a step
STEP_IDS = [[0, 3, 7, 19], [3, 4, 19, 39], [0, 4, 25], [3, 7, 25, 39]]
OPTIMIZERS = {"rowwise_adagrad": lambda t: RowwiseAdagrad([t], LR, EPS),
              "adam_rowwise": lambda t: AdamRowwise([t], LR, BETAS, EPS, momentum=True),
              "adam_rowwise_no_momentum": lambda t: AdamRowwise([t], LR, BETAS, EPS, momentum=False)}


class Reference:
    """The formulas, straightforwardly: float64, one row at a time, over the whole N x D table.
    rowwise_adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD): G_r += sum_d g_d^2 / D; w_r -= lr g / (sqrt(G_r) + eps).
    adam_rowwise (FBGEMM's PARTIAL_ROWWISE_ADAM, with per-row step counts): v_r = b2 v_r + (1 - b2)
    sum_d g_d^2 / D; m = b1 m + (1 - b1) g per element (or m = g without momentum); t_r += 1;
    w_r -= lr (m / (1 - b1^t_r)) / (sqrt(v_r / (1 - b2^t_r)) + eps)."""

    def __init__(self, weight_ND: torch.Tensor, name: str, lr=LR, betas=BETAS, eps=EPS):
        self.w = weight_ND.double().clone()
        self.name, self.lr, self.eps, (self.b1, self.b2) = name, lr, eps, betas
        self.row_sq = torch.zeros(len(self.w), dtype=torch.float64)  # G (adagrad) or v (adam)
        self.m = torch.zeros_like(self.w)
        self.t = [0] * len(self.w)
        self.largest_update = 0.0  # max |w change| of any element in any step: sizes the tolerance

    def step(self, ids, grad_UD: torch.Tensor) -> None:
        for r, g in zip(ids, grad_UD.double()):
            mean_sq = float((g * g).sum()) / len(g)
            if self.name == "rowwise_adagrad":
                self.row_sq[r] += mean_sq
                update = self.lr * g / (math.sqrt(self.row_sq[r]) + self.eps)
            else:
                self.t[r] += 1
                self.row_sq[r] = self.b2 * self.row_sq[r] + (1 - self.b2) * mean_sq
                v_hat = self.row_sq[r] / (1 - self.b2 ** self.t[r])
                if self.name == "adam_rowwise":
                    self.m[r] = self.b1 * self.m[r] + (1 - self.b1) * g
                    g = self.m[r] / (1 - self.b1 ** self.t[r])
                update = self.lr * g / (math.sqrt(v_hat) + self.eps)
            self.w[r] -= update
            self.largest_update = max(self.largest_update, float(update.abs().max()))

    def tolerance(self, steps: int) -> float:
        """Bound on |fp32 optimizer - this reference| per element after `steps` steps. Per step the
        fp32 path rounds: the D-term mean square (<= (D + 1) u relative), the state update and the
        sqrt, the float64 bias corrections cast to fp32, the division and the product (<= ~(D/2 + 6) u
        relative on the update, under 16 u for D = 8), and the new w (u |w|). Errors in the state
        carry into later steps at most linearly in the step count, hence steps x 16 u x (update + |w|)."""
        return steps * 16 * U * (self.largest_update + float(self.w.abs().max()))


def make_table(dtype=torch.float32) -> LocalValueTable:
    table = LocalValueTable(N, D, dtype=dtype)
    table.reset_parameters(torch.Generator().manual_seed(0))
    return table


def step_grads(step: int, n: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(100 + step))


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_row_optimizer_matches_the_reference_and_is_lazy(name, value_dtype):
    table = make_table(value_dtype)
    opt = OPTIMIZERS[name](table)
    state = opt.states[0]
    ref = Reference(table.weight.detach(), name)
    for step, ids in enumerate(STEP_IDS):
        before_w = table.weight.detach().clone()
        before_state = opt.state_dict()["tables"][0]
        grad = step_grads(step, len(ids))
        table.zero_step()
        table.push_grad(torch.tensor(ids), grad)
        assert opt.step() == len(ids)
        ref.step(ids, grad)
        # lazy: a row without a gradient keeps its value and its state, bit for bit
        rest = torch.ones(N, dtype=torch.bool)
        rest[ids] = False
        assert torch.equal(table.weight[rest], before_w[rest])
        after_state = opt.state_dict()["tables"][0]
        old = ~torch.isin(before_state["ids"], torch.tensor(ids))
        kept = torch.isin(after_state["ids"], before_state["ids"][old])
        for k in before_state:
            assert torch.equal(after_state[k][kept], before_state[k][old]), k
    # the fp32 value of the touched rows: their master copy when the table is bf16 (which then
    # holds its rounding)
    touched = sorted({r for ids in STEP_IDS for r in ids})
    fp32 = table.weight.detach()[touched]
    if value_dtype == torch.bfloat16:
        sd = opt.state_dict()["tables"][0]
        fp32 = sd["master"][torch.argsort(sd["ids"])]
        assert torch.equal(table.weight[touched], fp32.to(torch.bfloat16))
    torch.testing.assert_close(fp32, ref.w[touched].float(), rtol=0, atol=ref.tolerance(len(STEP_IDS)))
    # state only for the rows ever updated, one number per row for the second moment
    sd = state.state_dict()
    assert sorted(sd["ids"].tolist()) == touched
    assert sd["sum_sq" if name == "rowwise_adagrad" else "exp_avg_sq"].shape == (len(touched),)
    assert ("exp_avg" in state.specs) == (name == "adam_rowwise")


def test_config_key_picks_the_optimizer_and_is_refused_where_values_do_not_train_densely():
    def opt_for(*overrides):
        cfg = load_config(ROOT / "configs/tiny/pretrain.yaml", list(overrides))
        return build_memory_row_optimizer([LocalValueTable(4, 2)], cfg.optim)

    assert type(opt_for()).__name__ == "RowSparseAdamW"  # the default: today's behaviour
    assert isinstance(opt_for("optim.memory_row_optimizer=rowwise_adagrad"), RowwiseAdagrad)
    no_momentum = opt_for("optim.memory_row_optimizer=adam_rowwise", "optim.memory_row_momentum=false")
    assert isinstance(no_momentum, AdamRowwise) and "exp_avg" not in no_momentum.states[0].specs
    with pytest.raises(ConfigError, match="memory_row_optimizer=rowwise_adagrad applies where the memory values "
                                          "train densely"):
        load_config(ROOT / "configs/tiny/finetune_sparse.yaml", ["optim.memory_row_optimizer=rowwise_adagrad"])
    with pytest.raises(ConfigError, match="memory_row_momentum=false applies to optim.memory_row_optimizer=adam_"):
        load_config(ROOT / "configs/tiny/pretrain.yaml", ["optim.memory_row_momentum=false"])
    load_config(ROOT / "configs/tiny/finetune_full.yaml", ["optim.memory_row_optimizer=adam_rowwise"])


def test_train_cli_refuses_the_key_in_sparse_finetuning_with_one_error_line(capsys):
    from smft_dist.train.loop import main as train_main  # launchers/train.py's entry point

    code = train_main(["--config", str(ROOT / "configs/tiny/finetune_sparse.yaml"),
                       "optim.memory_row_optimizer=adam_rowwise"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "optim.memory_row_optimizer=adam_rowwise applies where" in errors[0], err


@pytest.mark.slow
def test_pretraining_with_rowwise_adagrad_checkpoints_one_accumulator_per_row(tiny_data, tmp_path):
    """The key's effect on a real run: 2 pretraining steps save row-wise Adagrad's state."""
    run_cli([PY, "launchers/train.py", "--config", "configs/tiny/pretrain.yaml", f"out_dir={tmp_path}", "steps=2",
             "optim.memory_row_optimizer=rowwise_adagrad", *data_overrides(tiny_data)])
    (rows_file,) = (latest_dir(tmp_path / "checkpoints") / "memory_optim").glob("rows_*.safetensors")
    with safe_open(str(rows_file), framework="pt") as fh:
        shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
    S = shapes["0.ids"][0]
    assert S > 0 and shapes == {"0.ids": [S], "0.sum_sq": [S]}


def planned_and_real_row_state(overrides) -> tuple[int, int]:
    """-> (the plan's memory_optimizer + growth bytes, the bytes of every tensor of the real row
    state of rank 0's shard, built on the meta device: pretraining allocates every row's state at
    once, `DenseRowState`, and it never grows: `test_dense_state_allocates_nothing_beyond_its_construction`)."""
    cfg = load_config(ROOT / "configs/model/tiny.yaml", ["mode=pretrain", *overrides])
    plan = memory_plan(cfg, 4, 4)["parts"]
    rows_total = cfg.model.memory_n_keys ** 2
    table = ValueTable(rows_total, cfg.model.memory_value_dim, *RowShardPlan(rows_total, 4).bounds(0),
                       dtype=DTYPES[cfg.model.memory_value_dtype], device="meta")
    state = build_memory_row_optimizer([table], cfg.optim).states[0]
    assert isinstance(state, DenseRowState)
    return (plan["memory_optimizer"] + plan["memory_optimizer_growth"],
            len(cfg.model.memory_layers) * dense_state_bytes(state))


@pytest.mark.parametrize("overrides", [
    ["optim.memory_row_optimizer=rowwise_adagrad"],
    ["optim.memory_row_optimizer=rowwise_adagrad", "model.memory_value_dtype=bfloat16"],
    ["optim.memory_row_optimizer=adam_rowwise"],
    ["optim.memory_row_optimizer=adam_rowwise", "optim.memory_row_momentum=false"],
], ids=["adagrad", "adagrad-bf16", "adam_rowwise", "adam_rowwise-no-momentum"])
def test_plan_counts_the_row_state_the_optimizer_allocates(overrides):
    planned, real = planned_and_real_row_state(overrides)
    assert planned == real
    cfg = load_config(ROOT / "configs/model/tiny.yaml", ["mode=pretrain", *overrides])
    assert memory_plan(cfg, 4, 4)["parts"]["memory_optimizer_growth"] == 0


def test_inspect_memory_optimizer_flag_sets_the_plans_state_bytes(capsys):
    def plan_state(*args) -> int:
        inspect_main(["--config", "configs/paper/pretrain_1p3b.yaml", "--plan", "--mp", "8", "--json", *args])
        return json.loads(capsys.readouterr().out)["plan"]["parts"]["memory_optimizer"]

    adamw, adagrad = plan_state(), plan_state("--memory-optimizer", "rowwise_adagrad")
    assert plan_state("optim.memory_row_optimizer=rowwise_adagrad") == adagrad
    # bf16 values at D = 1024 with 8 memory-parallel ranks: AdamW keeps master + 2 moments (12 x D
    # bytes per row) + step, row-wise Adagrad master + one fp32 (4 x D + 4) + a bool marking the
    # rows updated (AdamW's step count marks them)
    model = load_config(ROOT / "configs/paper/pretrain_1p3b.yaml").model
    assert model.memory_value_dim == 1024 and model.memory_value_dtype == "bfloat16"
    rows = math.ceil(model.memory_n_keys ** 2 / 8)
    assert adamw - adagrad == len(model.memory_layers) * rows * (8 * 1024 + 8 - 4 - 1)
