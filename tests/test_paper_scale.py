"""The paper-scale paths on one process: bf16 (loss, sub-ulp memory updates), activation
checkpointing, gradient accumulation, the DeepSpeed config we generate, train mode after an HF
load, and no access counting outside training."""
import json

import pytest
import torch

from smft_dist.config import ConfigError, load_config
from smft_dist.distributed import context_from_group, init_distributed
from smft_dist.memory.values import LocalValueTable, counting_accesses
from smft_dist.optim import MaskedSGD
from smft_dist.selection import select_for_model
from smft_dist.train.engines import deepspeed_config
from smft_dist.train.trainer import build_run, enable_activation_checkpointing
from tests.conftest import ROOT

SMALL = ["model.memory_n_keys=16", "model.memory_knn=4", "model.memory_value_dim=32", "model.hidden_size=64",
         "model.num_attention_heads=4", "model.intermediate_size=32", "data.batch_size=4", "optim.lr=1e-2",
         "optim.memory_lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant", "logging.progress=false"]
SPARSE = ["mode=finetune", "method=sparse_memory", "selection.mode=tf", "selection.top_t=12", "optim.memory_lr=1.0"]


def trainer(*overrides):
    """A tiny run's Trainer on this process (or on the process group that run_ranks made)."""
    cfg = load_config(ROOT / "configs/tiny/pretrain.yaml", SMALL + list(overrides))
    ctx = context_from_group(cfg.dist) if torch.distributed.is_initialized() else init_distributed(cfg.dist)
    return build_run(cfg, ctx)


def batch(seed, n=4, seq=12, pad_last=0):
    """n rows of random tokens; the last row's final `pad_last` positions are padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 500, (n, seq), generator=g)
    mask = torch.ones_like(x)
    if pad_last:
        mask[-1, -pad_last:] = 0
    return {"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100)}


def rows(b, lo, hi):
    return {k: v[lo:hi] for k, v in b.items()}


# ----- precision -----
def test_bf16_loss_stays_within_2_percent_of_fp32():
    # Same init, 8 pretraining steps on one batch (dense AdamW + row-sparse AdamW on the memory):
    # the paper's setting (autocast bf16, bf16 memory values) must track an all-fp32 run to within
    # 2% of the loss at every step.
    losses = {}
    for precision, values in (("fp32", "float32"), ("bf16", "bfloat16")):
        tr = trainer(f"precision={precision}", f"model.memory_value_dtype={values}")
        losses[precision] = [tr.train_step(batch(0))["loss"] for s in range(8)]
    assert losses["fp32"][-1] < losses["fp32"][0]  # it learns, so the comparison covers updates
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert abs(a - b) / a < 0.02, (losses["fp32"], losses["bf16"])


def test_sub_ulp_sgd_updates_reach_a_bf16_row():
    # A value near 0.2 has a bf16 ulp of 2^-10 ~ 9.8e-4: an SGD step of 1e-4 is under half an ulp.
    w0 = torch.full((4, 8), 0.2).to(torch.bfloat16)
    assert torch.equal((w0.float() - 1e-4).to(torch.bfloat16), w0)  # rounding the row in place loses it
    tables = {dt: LocalValueTable(4, 8, dtype=dt) for dt in (torch.bfloat16, torch.float32)}
    for t in tables.values():
        t.weight.data.copy_(w0)
    opts = {dt: MaskedSGD([t], lr=1e-4) for dt, t in tables.items()}
    ids = torch.tensor([1, 3])
    for _ in range(12):
        for dt, t in tables.items():
            t.zero_step()
            t.push_grad(ids, torch.ones(2, 8))
            opts[dt].step([ids])
    ref = tables[torch.float32].weight  # the fp32 table's exact arithmetic
    bf16 = tables[torch.bfloat16].weight
    assert torch.equal(bf16, ref.to(torch.bfloat16))  # the stored row is the rounding of the exact value
    assert (bf16[ids] < w0[ids]).all() and torch.equal(bf16[[0, 2]], w0[[0, 2]])  # 12e-4 moved it one ulp
    master = opts[torch.bfloat16].states[0]["master"]
    torch.testing.assert_close(master, ref[ids], rtol=0, atol=0)


def test_fp16_and_conflicting_deepspeed_json_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="precision=fp16 is not supported.*use precision=bf16"):
        load_config(ROOT / "configs/model/tiny.yaml", ["precision=fp16"])
    ours = deepspeed_config(1, 4, 8, 2, 1.0, "bf16")
    assert ours["bf16"] == {"enabled": True} and ours["train_batch_size"] == 64
    assert ours["gradient_accumulation_steps"] == 2
    for user, match in (({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4, the run has 2 \\(optim.grad_accum\\)"),
                        ({"fp16": {"enabled": True}}, "enables fp16"),
                        ({"bf16": {"enabled": False}}, "bf16.enabled=False but precision=bf16")):
        (tmp_path / "ds.json").write_text(json.dumps(user))
        with pytest.raises(ConfigError, match=match):
            deepspeed_config(1, 4, 8, 2, 1.0, "bf16", str(tmp_path / "ds.json"))
    (tmp_path / "ds.json").write_text(json.dumps({"gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2}}))
    assert deepspeed_config(1, 4, 8, 2, 1.0, "bf16", str(tmp_path / "ds.json"))["zero_optimization"] == {"stage": 2}


# ----- activation checkpointing -----
def one_sparse_step(ckpt: bool, b: dict):
    """forward -> selection -> backward on batch `b`; -> (counts, selected, row grads, dense grads,
    {attention calls, fetches}) of the step (this rank's shard under run_ranks)."""
    tr = trainer(*SPARSE, "selection.top_t=40")
    for p in tr.model.parameters():
        p.requires_grad_(True)  # dense grads too: checkpointing must reproduce them as well
    if ckpt:
        enable_activation_checkpointing(tr.model)
    calls = {"attn": 0, "fetch": 0}
    tr.model.model.layers[3].self_attn.register_forward_hook(lambda *a: calls.__setitem__("attn", calls["attn"] + 1))
    table = tr.tables[0]
    lookup = table.embedding_bag  # either exchange (dist.memory_exchange) enters here once per lookup
    table.embedding_bag = lambda *a, **k: (calls.__setitem__("fetch", calls["fetch"] + 1), lookup(*a, **k))[1]
    table.zero_step()
    out = tr.model(**b)
    (selected,), _ = select_for_model(tr.tables, None, tr.cfg.selection)
    out.loss.backward()
    counts = table.access_counts()
    grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    return counts, selected, table.sparse_grad(), grads, calls


def test_activation_checkpointing_recomputes_blocks_but_not_the_lookup():
    plain, ckpt = one_sparse_step(False, batch(0, pad_last=5)), one_sparse_step(True, batch(0, pad_last=5))
    assert_same_step(plain, ckpt)


def assert_same_step(plain, ckpt):
    assert plain[4] == {"attn": 1, "fetch": 1}
    assert ckpt[4] == {"attn": 2, "fetch": 1}  # block 3 ran again in backward; the memory block did not
    for a, b in zip(plain[0] + (plain[1],) + plain[2], ckpt[0] + (ckpt[1],) + ckpt[2]):
        assert torch.equal(a, b)  # counts (padding excluded), selection, row ids and row grads
    assert plain[3].keys() == ckpt[3].keys() and len(plain[3]) > 10
    for k in plain[3]:
        torch.testing.assert_close(plain[3][k], ckpt[3][k], rtol=1e-5, atol=1e-7, msg=k)


# ----- gradient accumulation -----
@pytest.mark.parametrize("mode", [SPARSE, ["mode=pretrain"]], ids=["sparse", "pretrain"])
def test_k_micro_batches_train_as_one_batch_of_k_times_b(mode):
    # Adam's eps 1e-3, not 1e-8: the update lr x g / (|g| + eps) moves by up to lr / eps per unit of
    # gradient rounding (at g = 0). At eps 1e-8 that is 1e6: a 1e-12 rounding of a gradient near 0
    # moves a weight by 1e-6 (an AMD EPYC showed 1.7e-6). At 1e-3 the update is ~lr x g / eps, linear in g.
    mode = [*mode, "optim.eps=1e-3"]
    whole, accum = trainer(*mode, "data.batch_size=6"), trainer(*mode, "data.batch_size=2", "optim.grad_accum=3")
    start = {"table": whole.tables[0].weight.clone(), **{k: v.clone() for k, v in whole.model.state_dict().items()}}
    cfg, steps = whole.cfg.model, 2
    # The two runs differ only in the order fp32 sums are taken (micro-batch GEMMs, 3 accumulations).
    # A sum of n terms rounds by at most ~n x eps32 of its terms' scale, and every value here passes
    # through sums over the batch's tokens, the vocabulary (logits, their backward), and per layer the
    # hidden, MLP and sequence widths: relative error <= reduction_len x eps32 of the value's scale.
    reduction_len = 6 * 12 + cfg.vocab_size + cfg.num_hidden_layers * (cfg.hidden_size + cfg.intermediate_size + 12)
    rel = reduction_len * torch.finfo(torch.float32).eps  # 1016 x 1.19e-7 = 1.2e-4
    for s in range(steps):
        b = batch(s, n=6, pad_last=4)  # unequal label counts: the loss weights must be per token
        m1 = whole.train_step(b)
        m2 = accum.train_step([rows(b, 0, 2), rows(b, 2, 4), rows(b, 4, 6)])
        assert m1["rows_updated"] == m2["rows_updated"] and m1["rows_updated"] > 0
        assert abs(m1["loss"] - m2["loss"]) <= rel * m1["loss"], (m1["loss"], m2["loss"])
    # Each step's update is linear in the gradient (SGD; Adam at this eps), so its rounding is rel x the
    # update's scale, and storing w + update rounds by eps32 x |w|; `steps` of each add up. Measured on
    # a 2-core x86 machine: every difference is below 1/15 of its tolerance, and a wrong accumulation
    # exceeds it over 150x in every trained tensor (an unweighted mean of the 3 micro-batch losses), or
    # over 1,000x (a micro-batch dropped).
    ends = {"table": (accum.tables[0].weight, whole.tables[0].weight)}
    ends.update({k: (a, b) for (k, a), b in zip(accum.model.state_dict().items(), whole.model.state_dict().values())})
    for k, (a, b) in ends.items():
        update, size = float((b - start[k]).abs().max()), float(b.abs().max())
        atol = steps * (rel * update + torch.finfo(torch.float32).eps * size) if update else 0.0  # frozen: equal
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=k)


def test_per_token_memory_lr_is_the_mean_lr_divided_by_the_label_tokens():
    # docs/design.md §5.2: optim.memory_lr_scale=per_token steps on the token-summed loss, so lr x T
    # under the mean scale makes the same SGD step; both runs start from the same seed.
    b = batch(3, n=4, seq=12, pad_last=5)
    labels = int((b["labels"][:, 1:] != -100).sum())  # 4 x 11 - 5 = 39
    mean = trainer(*SPARSE, "optim.memory_lr_scale=mean", "optim.memory_lr=39.0")
    per_token = trainer(*SPARSE, "optim.memory_lr_scale=per_token", "optim.memory_lr=1.0")
    before = mean.tables[0].weight.clone()
    assert labels == 39 and torch.equal(before, per_token.tables[0].weight)
    for tr in (mean, per_token):
        assert tr.train_step(b)["rows_updated"] == 12
    torch.testing.assert_close(per_token.tables[0].weight, mean.tables[0].weight, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(mean.tables[0].weight, before)


def test_sparse_accumulation_selects_over_every_micro_batch():
    # The top-t of K micro-batches is the top-t of their summed counts, not of the last one.
    ref, accum = trainer(*SPARSE, "data.batch_size=6"), trainer(*SPARSE, "data.batch_size=2", "optim.grad_accum=3")
    b = batch(7, n=6)
    ref.tables[0].zero_step()
    with torch.no_grad(), counting_accesses(ref.tables):
        ref.model(**b)
    (want,), _ = select_for_model(ref.tables, None, ref.cfg.selection)
    before = accum.tables[0].weight.clone()
    accum.train_step([rows(b, 0, 2), rows(b, 2, 4), rows(b, 4, 6)])
    changed = (accum.tables[0].weight != before).any(1).nonzero().squeeze(1)
    assert torch.equal(changed, want)


def test_df_index_counts_a_background_batch_of_k_micro_batches_once():
    from smft_dist.selection import build_background_index

    tr = trainer(*SPARSE)
    whole = [batch(s, n=4) for s in range(3)]
    micro = [rows(b, lo, lo + 2) for b in whole for lo in (0, 2)]
    (want,) = build_background_index(tr.model, whole, 3)
    (got,) = build_background_index(tr.model, micro, 3, micro_batches=2)
    assert torch.equal(got.df, want.df) and got.num_batches == 3 and int(want.df.max()) > 1
    (per_micro,) = build_background_index(tr.model, micro, 6)
    assert int(per_micro.df.sum()) > int(want.df.sum())  # counted per micro-batch, a row seen in both halves twice


# ----- train mode and counting -----
def test_hf_folder_trains_in_train_mode_with_lora_dropout(tmp_path):
    tr = trainer()
    tr.model.save_pretrained(tmp_path / "hf")
    lora = trainer("mode=finetune", "method=lora", "lora.dropout=0.5", f"model.init_from={tmp_path / 'hf'}",
                   "model.activation_checkpointing=true")
    assert lora.wrapped.training
    dropouts = [m for n, m in lora.wrapped.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(m.training for m in dropouts)
    assert (dropouts[0](torch.ones(1000)) == 0).any()  # it drops (in eval mode it is the identity)


def test_inference_and_generation_record_no_accesses():
    tr = trainer(*SPARSE)
    table = tr.tables[0]
    table.zero_step()
    with torch.no_grad():
        tr.model(**batch(0))
        tr.model.generate(batch(0)["input_ids"][:, :4], max_new_tokens=3, do_sample=False)
    assert table.access_counts()[0].numel() == 0 and not table._counts
    tr.model(**batch(0))  # a forward that may train does count
    assert table.access_counts()[0].numel() > 0


# ----- one fact per global batch: the start-up check -----
def test_a_global_batch_that_is_not_one_group_is_refused(tmp_path):
    import numpy as np

    from smft_dist.data.loader import DataError, build_dataloader, check_one_group_per_batch
    from smft_dist.data.mds import write_mds

    samples = [{"input_ids": np.arange(8, dtype=np.int32), "attention_mask": np.ones(8, np.uint8),
                "loss_mask": np.ones(8, np.uint8), "group": i // 8} for i in range(32)]
    write_mds(tmp_path, samples, grouped=True)
    loader = build_dataloader(str(tmp_path), 4, shuffle=False, seed=0, rank=0, world_size=1)
    check_one_group_per_batch(loader.dataset, 4, 1, 2)  # 4 x 1 x 2 = 8: one fact per step
    with pytest.raises(DataError, match="first group holds 8 samples .* data.batch_size 4 x world 1 x optim.grad_accum "
                                        "1 = 4: .* or set data.one_group_per_batch=false"):
        check_one_group_per_batch(loader.dataset, 4, 1, 1)
    with pytest.raises(DataError, match="holds 8 samples .* = 2: "):
        check_one_group_per_batch(loader.dataset, 2, 1, 1)
