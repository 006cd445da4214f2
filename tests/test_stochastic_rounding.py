"""bf16 memory values without an fp32 master copy (`optim.memory_stochastic_rounding`,
smft_dist/optim/rounding.py): the rounding is unbiased and keyed by (seed, step, row, element) only,
so sharding, chunking, resharding and resuming round every element identically; the row
optimizers keep no "master" state and the plan drops its 4 x D bytes per row; in a real
pretraining at a small memory lr it keeps the updates that round-to-nearest without a master loses."""
import math

import pytest
import torch

import smft_dist.optim.rounding as rounding
import smft_dist.optim.rowwise as rowwise
import smft_dist.optim.sparse as sparse
from smft_dist.config import ConfigError, load_config
from smft_dist.distributed import init_distributed
from smft_dist.memory.values import LocalValueTable, ValueTable
from smft_dist.model.memory_plan import memory_plan
from smft_dist.optim import RowSparseAdamW, build_memory_row_optimizer, merge_state_dicts
from smft_dist.optim.rounding import rounding_bits, stochastic_round_bf16
from smft_dist.train.trainer import build_run
from tests.conftest import ROOT

ROW_OPTIMIZERS = ["adamw", "rowwise_adagrad", "adam_rowwise"]
SR = ["model.memory_value_dtype=bfloat16", "optim.memory_stochastic_rounding=true"]


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (lo, ulp): x's bf16 neighbour towards zero (its fp32 bits with the low 16 cleared) and the
    distance to the next one away from zero, both fp32."""
    lo = (x.view(torch.int32) & ~0xFFFF).view(torch.float32)
    hi = (lo.view(torch.int32) + 0x10000).view(torch.float32)  # magnitude + 1 bf16 ulp
    return lo, (hi - lo).abs()


def test_rounding_is_unbiased_within_the_binomial_spread():
    """Each of n draws (steps 1..n) of an element is lo or lo + ulp, up with probability p = the
    fractional distance |x - lo| / ulp: the mean of the draws is x up to ulp x (Binomial(n, p) / n - p),
    whose standard deviation is ulp sqrt(p (1 - p) / n). 6 of them (+ 3 ulp / n: at p n < 1 the
    binomial's tail is Poisson's, P(X >= pn + 3) < 1e-2 at most, and 6 sd covers it at p n > 1) for
    each of the 512 elements; and over all of them the mean of the standardised errors is N(0, 1/512)."""
    D, n = 512, 4096
    x = (torch.randn(D, generator=torch.Generator().manual_seed(0)) * 0.1).float()
    draws = stochastic_round_bf16(x.expand(n, D), seed=3, step_U=torch.arange(1, n + 1),
                                  ids_U=torch.full((n,), 17)).float()
    lo, ulp = bf16_neighbours(x)
    assert torch.all((draws == lo) | ((draws - lo).abs() == ulp))  # one of the two neighbours, always
    p = ((x - lo).abs() / ulp).double()
    err = (draws.double().mean(0) - x.double()) / ulp.double() * torch.sign(x.double())  # in ulps, towards +|x|
    sd = (p * (1 - p) / n).sqrt()
    assert torch.all(err.abs() <= 6 * sd + 3 / n), (err.abs() - 6 * sd).max()
    assert abs(float((err / sd.clamp_min(1 / n)).mean())) <= 6 / math.sqrt(D)
    # a value that is a bf16 already never moves
    exact = x.to(torch.bfloat16).float()
    assert torch.equal(stochastic_round_bf16(exact.expand(8, D), 3, torch.arange(8), torch.arange(8)).float(),
                       exact.expand(8, D))


def test_bits_are_a_function_of_seed_step_row_and_element_only():
    steps, ids = torch.tensor([1, 1, 5, 9]), torch.tensor([0, 7, 7, 123456789012])
    bits = rounding_bits(11, steps, ids, 64)
    assert torch.equal(bits, rounding_bits(11, steps, ids, 64))
    # the same (step, row) pair gives the same bits wherever it sits among other rows
    assert torch.equal(rounding_bits(11, steps[[2, 0]], ids[[2, 0]], 64), bits[[2, 0]])
    assert bits.min() >= 0 and bits.max() < 2**16
    # a different seed, step, row or element: different bits (16-bit words agree by chance 1 in 65,536)
    others = [rounding_bits(12, steps, ids, 64), rounding_bits(11, steps + 1, ids, 64),
              rounding_bits(11, steps, ids + 1, 64), bits[:, 1:]]
    for other in others:
        assert (other != bits[:, :other.shape[1]]).float().mean() > 0.99


class Shard(ValueTable):
    """Rows [row_start, row_end) of a table: what an owner holds once the exchange has delivered
    its rows' gradients (by global id) to it."""

    def push_grad(self, ids_U, grad_UD, sorted_ids=False):
        self._grad.add(ids_U - self.row_start, grad_UD)


N, D, STEPS = 40, 64, 4
STEP_IDS = [[0, 3, 7, 19, 20, 33], [3, 4, 19, 39], [0, 4, 25, 20], [3, 7, 25, 39, 21]]


def step_grads(step: int, ids) -> torch.Tensor:
    # small steps next to the ~0.1 values: most of an update is below a bf16 ulp, so its rounding decides
    return torch.randn(len(ids), D, generator=torch.Generator().manual_seed(100 + step))


def run_steps(shards, opts, steps) -> None:
    for step in steps:
        ids = torch.tensor(STEP_IDS[step])
        grad = step_grads(step, ids)
        for shard, opt in zip(shards, opts):
            shard.zero_step()
            mine = (ids >= shard.row_start) & (ids < shard.row_end)
            shard.push_grad(ids[mine].flip(0), grad[mine].flip(0))  # rows in another order than sorted
            opt.step()


@pytest.mark.parametrize("name", ROW_OPTIMIZERS)
def test_sharding_chunking_resharding_and_resume_give_bitwise_the_same_table(name, monkeypatch):
    """One table of 40 rows updated 4 steps, against: 2 shards from the start, with chunks of 3 rows;
    and 1 shard for 2 steps, its state saved, merged and loaded into 2 new shards (resharded and
    resumed), 2 more steps. Every element's bits are keyed by its global row, its row's update count
    (checkpointed with the row) and the seed, so all three tables are bitwise equal. A stateful
    generator would draw the 2-shard rows in another order (and restart at a resume): they differ."""
    cfg = load_config(ROOT / "configs/tiny/pretrain.yaml", [*SR, f"optim.memory_row_optimizer={name}",
                                                            "optim.memory_lr=1e-3"])
    init = LocalValueTable(N, D, dtype=torch.bfloat16)
    init.reset_parameters(torch.Generator().manual_seed(0))

    def shards(bounds):
        out = [Shard(N, D, lo, hi, dtype=torch.bfloat16) for lo, hi in bounds]
        for s in out:
            s.weight.data.copy_(init.weight[s.row_start:s.row_end])
        return out, [build_memory_row_optimizer([s], cfg.optim, seed=5) for s in out]

    def table(shards_):
        return torch.cat([s.weight.detach() for s in shards_])

    whole, whole_opt = shards([(0, N)])
    run_steps(whole, whole_opt, range(STEPS))
    assert "master" not in whole_opt[0].states[0].specs
    moved = table(whole) != init.weight
    assert 0 < moved.sum() < moved.numel()  # some elements moved, the untouched rows did not

    monkeypatch.setattr(sparse, "CHUNK_ELEMENTS", 3 * D)
    monkeypatch.setattr(rowwise, "CHUNK_ELEMENTS", 3 * D)
    monkeypatch.setattr(rounding, "CHUNK_ELEMENTS", 3 * D)
    halves, halves_opt = shards([(0, 20), (20, N)])
    run_steps(halves, halves_opt, range(STEPS))
    assert torch.equal(table(halves), table(whole))

    first, first_opt = shards([(0, N)])
    run_steps(first, first_opt, range(2))
    saved = merge_state_dicts([first_opt[0].state_dict()])
    resumed, resumed_opt = shards([(0, 20), (20, N)])
    for s, opt in zip(resumed, resumed_opt):
        s.weight.data.copy_(first[0].weight[s.row_start:s.row_end])  # the checkpoint's rows
        opt.load_state_dict(saved)
    run_steps(resumed, resumed_opt, range(2, STEPS))
    assert torch.equal(table(resumed), table(whole))
    merged = merge_state_dicts([o.state_dict() for o in resumed_opt])["tables"][0]
    for k, v in merge_state_dicts([whole_opt[0].state_dict()])["tables"][0].items():
        assert torch.equal(merged[k], v), k


def test_expected_table_equals_the_master_paths_on_the_same_gradients():
    """Lazy AdamW (no weight decay) on the same 32 gradient steps, from the same bf16 table: the
    fp32-master path, stochastic rounding, and round-to-nearest without a master. AdamW's step u_t
    depends on the gradients only, so the master is w0 - sum u_t (+ fp32 roundings, 2^-24 relative
    each), and the stochastic table is that plus sum e_t, e_t the rounding errors: each is 0 in
    expectation given the past, |e_t| <= 1 ulp, variance <= ulp^2 / 4, independent across elements.
    Their difference, signed along the master's move and in ulps, averages over E = 16,384 elements
    to N(0, <= T / (4 E)): |mean| <= 6 sqrt(T / (4 E)) = 0.13 ulp (+ T x 2^-16 ulp for the fp32
    roundings, with the ulp of the larger end: a path moving up a binade has a larger ulp). The master
    moves ~T x lr = 3.2e-3 here, several ulps of the ~0.06 values (2^-12 = 2.4e-4); round-to-nearest
    without a master keeps none of a step below half an ulp."""
    rows, dim, T, lr = 64, 256, 32, 1e-4
    init = LocalValueTable(rows, dim, dtype=torch.bfloat16)
    init.reset_parameters(torch.Generator().manual_seed(1))
    drift = torch.randn(rows, dim, generator=torch.Generator().manual_seed(2))  # a consistent direction per element

    class NearestNoMaster(RowSparseAdamW):
        def _all_specs(self, table):
            return self.state_specs(table)

    def train(make_opt) -> tuple[torch.Tensor, RowSparseAdamW]:
        table = LocalValueTable(rows, dim, dtype=torch.bfloat16)
        table.weight.data.copy_(init.weight)
        opt = make_opt(table)
        for t in range(T):
            noise = torch.randn(rows, dim, generator=torch.Generator().manual_seed(10 + t))
            table.zero_step()
            table.push_grad(torch.arange(rows), drift + noise)
            opt.step()
        return table.weight.detach().float(), opt

    _, master_opt = train(lambda t: RowSparseAdamW([t], lr, (0.9, 0.999), 1e-8, 0.0))
    sd = master_opt.state_dict()["tables"][0]
    master = sd["master"][torch.argsort(sd["ids"])]
    sr_cfg = load_config(ROOT / "configs/tiny/pretrain.yaml", [*SR, f"optim.memory_lr={lr}", "optim.betas=[0.9,0.999]"])
    stochastic, sr_opt = train(lambda t: build_memory_row_optimizer([t], sr_cfg.optim, seed=0))
    nearest, _ = train(lambda t: NearestNoMaster([t], lr, (0.9, 0.999), 1e-8, 0.0))
    assert "master" not in sr_opt.states[0].specs

    w0 = init.weight.float()
    _, ulp = bf16_neighbours(torch.maximum(w0.abs(), master.abs()))
    direction = torch.sign(master - w0)

    def trail(w):  # mean of (w - master) along the master's move, in ulps
        return float(((w - master) * direction / ulp).mean())

    E = rows * dim
    assert abs(trail(stochastic)) <= 6 * math.sqrt(T / (4 * E)) + T * 2**-16, trail(stochastic)
    assert float(((master - w0) * direction / ulp).mean()) > 3  # the master moved several ulps
    # Round-to-nearest keeps none of a step under half an ulp: at lr 1e-4 that is every step of a
    # value of magnitude >= 2^-5 (half an ulp >= 2^-13 = 1.2e-4), AdamW's |m_hat / sqrt(v_hat)| being
    # 1 at t = 1 and ~|drift| / sqrt(drift^2 + 1) < 1 after (measured: it keeps 0.0000 of their move,
    # stochastic rounding 0.994)
    big = (w0.abs() >= 2**-5) & (master.abs() >= 2**-5)

    def kept(w):  # the fraction of the master's move of those values that w made
        return float(((w - w0) * direction)[big].sum() / ((master - w0) * direction)[big].sum())

    assert big.float().mean() > 0.5 and abs(kept(nearest)) < 0.01, kept(nearest)


@pytest.mark.parametrize("name", ROW_OPTIMIZERS)
def test_no_master_state_and_the_plan_drops_4_x_d_bytes_per_row(name):
    """Pretraining gives every row of the shard state. With stochastic rounding the plan's state
    bytes (from the optimizer's own state specs) are those of the same optimizer on fp32 values, which
    keep no master either: the bf16 plan drops layers x rows x 4 D, the master's fp32 row, exactly
    for adamw and adam_rowwise, whose int64 step is the rounding's update count; row-wise Adagrad
    counts no updates itself, so stochastic rounding adds that int64 count (at most 8 bytes per row
    back: less whatever marks its updated rows without it)."""
    def plan_state(*overrides) -> tuple[int, dict]:
        cfg = load_config(ROOT / "configs/model/tiny.yaml", ["mode=pretrain", f"optim.memory_row_optimizer={name}",
                                                             *overrides])
        return memory_plan(cfg, 4, 4)["parts"]["memory_optimizer"], cfg

    master, cfg = plan_state("model.memory_value_dtype=bfloat16")
    stochastic, cfg_sr = plan_state(*SR)
    fp32_values, _ = plan_state()
    rows = math.ceil(cfg.model.memory_n_keys ** 2 / 4) * len(cfg.model.memory_layers)  # rows per rank, all layers
    count = stochastic - fp32_values
    assert master - stochastic == rows * 4 * cfg.model.memory_value_dim - count
    if name == "rowwise_adagrad":
        assert 0 < count <= rows * 8
    else:
        assert count == 0
    opt = build_memory_row_optimizer([LocalValueTable(4, 8, dtype=torch.bfloat16)], cfg_sr.optim, seed=0)
    assert "master" not in opt.states[0].specs and "master" not in opt.state_dict()["tables"][0]
    assert "step" in opt.states[0].specs


def test_config_key_is_refused_where_values_are_not_bf16_and_trained_densely(capsys):
    load_config(ROOT / "configs/tiny/pretrain.yaml", SR)
    load_config(ROOT / "configs/tiny/finetune_full.yaml", SR)
    with pytest.raises(ConfigError, match="memory_stochastic_rounding=true applies where bf16 memory values train "
                                          "densely .* keeps its deterministic fp32 master rows"):
        load_config(ROOT / "configs/tiny/finetune_sparse.yaml", SR)
    with pytest.raises(ConfigError, match="model.memory_value_dtype=float32"):
        load_config(ROOT / "configs/tiny/pretrain.yaml", ["optim.memory_stochastic_rounding=true"])
    from smft_dist.train.loop import main as train_main  # launchers/train.py's entry point

    code = train_main(["--config", str(ROOT / "configs/tiny/finetune_sparse.yaml"), *SR])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "memory_stochastic_rounding=true applies where" in errors[0], err


class NearestNoMaster(RowSparseAdamW):
    """Lazy AdamW on bf16 rows without a master: each update rounded to the nearest bf16."""

    def _all_specs(self, table):
        return self.state_specs(table)


def pretrain(variant: str, memory_lr: float, steps: int) -> tuple[list[float], torch.Tensor, torch.Tensor, dict]:
    """`steps` steps of the tiny pretraining with bf16 values (its dense weights train too) on 64
    fixed random sequences. -> (losses, the table before, its fp32 value after: the master rows
    where there are, the optimizer's row state)."""
    overrides = ["model.memory_value_dtype=bfloat16", "model.init_from=null", "model.tokenizer=null",
                 "dist.engine=none", f"optim.memory_lr={memory_lr}", "optim.warmup_steps=0",
                 "optim.schedule=constant", f"steps={steps}"]
    cfg = load_config(ROOT / "configs/tiny/pretrain.yaml", [*overrides, *(SR[1:] if variant == "stochastic" else [])])
    tr = build_run(cfg, init_distributed(cfg.dist))
    if variant == "nearest":
        tr.memory_optimizer = NearestNoMaster(tr.tables, memory_lr, cfg.optim.betas, cfg.optim.eps, 0.0)
    pool = torch.randint(3, cfg.model.vocab_size, (64, cfg.data.seq_len), generator=torch.Generator().manual_seed(1))
    before = tr.tables[0].weight.detach().float().clone()
    losses = []
    for step in range(steps):
        x = pool[(step * 16) % 64:][:16]
        losses.append(float(tr.train_step({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})["loss"]))
    after = tr.tables[0].weight.detach().float().clone()
    state = tr.memory_optimizer.state_dict()["tables"][0]
    if "master" in state:
        after[state["ids"]] = state["master"]
    return losses, before, after, state


@pytest.mark.slow
def test_pretraining_at_a_small_memory_lr_keeps_the_moves_that_nearest_rounding_loses():
    """30 steps of the tiny pretraining at memory lr 1e-4: the fp32-master path, stochastic
    rounding and round-to-nearest without a master. On the values of magnitude >= 2^-5 (60% of
    N(0, 1/128)), half a bf16 ulp (>= 1.2e-4) exceeds the lr, so nearest rounding keeps none of their
    move unless AdamW's |m_hat / sqrt(v_hat)| tops 1.2 (measured: it keeps 0.0000 of the master's
    move). Stochastic rounding keeps all of it in expectation on the same gradients (the test above,
    exact within the binomial spread); here each run computes its gradients from its own values, and
    where a value's gradient is mostly noise the runs' moves decorrelate, so it keeps less than 1
    (measured 0.89 of the master's move; 0.73-0.80 for either variant at lr 1e-3 and 3e-3, where
    rounding hardly matters and only that decorrelation remains). 0.5 sits far from both 0 and 0.89.
    The losses barely differ at this lr (measured, mean of the last 5 steps: master 4.97897,
    stochastic 4.97889, nearest 4.97910; docs/configuration.md)."""
    runs = {v: pretrain(v, 1e-4, 30) for v in ("master", "stochastic", "nearest")}
    _, w0, master, master_state = runs["master"]
    assert "master" in master_state and "master" not in runs["stochastic"][3]
    move = master - w0
    big = (w0.abs() >= 2**-5) & (master.abs() >= 2**-5) & (move != 0)
    direction = torch.sign(move)

    def kept(w):  # the fraction of the master's move of those values that w made
        return float(((w - w0) * direction)[big].sum() / (move * direction)[big].sum())

    figures = {v: {"loss_last5": sum(r[0][-5:]) / 5, "kept": kept(r[2])} for v, r in runs.items()}
    print("memory lr 1e-4, 30 steps:", figures)
    assert big.float().mean() > 0.5
    assert abs(figures["nearest"]["kept"]) < 0.05 and figures["stochastic"]["kept"] > 0.5, figures
    for losses, *_ in runs.values():  # every run trains
        assert sum(losses[-5:]) / 5 < losses[0] - 1


def train_on_ranks(rank: int, world: int, micro_batches: int = 1) -> list[torch.Tensor]:
    """tests/dist/test_world_invariance.py's pretraining with bf16 values and stochastic rounding:
    -> (the memory table before, the weights after its steps: dense, then the whole table)."""
    from smft_dist.distributed import context_from_group
    from tests.dist.test_world_invariance import SMALL, STEPS, global_batch, rank_rows, weights

    cfg = load_config(ROOT / "configs/tiny/pretrain.yaml", [*SMALL, *SR, "optim.lr=1e-2", "optim.memory_lr=1e-3",
                                                             "dist.memory_exchange=rows"])
    tr = build_run(cfg, context_from_group(cfg.dist) if world > 1 else init_distributed(cfg.dist))
    before = weights(tr, world)[-1]
    for s in range(STEPS):
        mine = rank_rows(global_batch(s), rank, world)
        tr.train_step([rank_rows(mine, k, micro_batches) for k in range(micro_batches)])
    return before, weights(tr, world)


@pytest.mark.slow
def test_two_gloo_ranks_round_the_table_bitwise_like_one_process():
    """The real sharded table (2 gloo ranks, each updating its half of the rows, row ids offset by
    its shard's start) against 1 process running the same rows as 2 micro-batches: bitwise, as the
    fp32-master path is (tests/dist/test_world_invariance.py), because each element's rounding bits
    depend on its global row, not on the rank or the order that updates it."""
    from tests.dist.helpers import run_ranks

    before, one = train_on_ranks(0, 1, 2)
    two = run_ranks(train_on_ranks, 2)[0][1]
    assert one[-1].dtype == torch.bfloat16 and not torch.equal(one[-1], before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
