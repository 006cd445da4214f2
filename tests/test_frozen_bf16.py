"""precision=bf16 with frozen dense weights (sparse memory finetuning, the df pass): the frozen
linears are cast to bf16 once when the run is built, not by autocast on every forward, and every
result stays autocast's (docs/performance.md "Frozen dense linears in bf16")."""
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests.test_paper_scale import SPARSE, batch, trainer


class WeightCasts(TorchDispatchMode):
    """Counts the dtype conversions whose input is one of `weights` (by storage address)."""

    def __init__(self, weights):
        super().__init__()
        self.ptrs, self.count = {w.data_ptr() for w in weights}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype) and args[0].data_ptr() in self.ptrs:
            self.count += 1
        return func(*args, **(kwargs or {}))


def frozen_linears(model):
    return [m for m in model.modules() if type(m) is nn.Linear and not m.weight.requires_grad]


def uncast(model) -> None:
    """Back to what the run did before: nn.Linear.forward, autocast casting the fp32 weights."""
    for m in frozen_linears(model):
        vars(m).pop("forward", None)


def test_sparse_bf16_step_casts_no_frozen_weight_and_matches_autocast():
    cast, plain = (trainer(*SPARSE, "precision=bf16") for _ in range(2))
    uncast(plain.model)
    linears = frozen_linears(cast.model)
    # all frozen in sparse finetuning: per layer q/k/v/o and the MLP's 3 (the memory layer: its
    # query, W1 and W2), and the LM head
    assert len(linears) == 7 * cast.cfg.model.num_hidden_layers + 1
    weights = [m.weight for m in linears]
    x = batch(0)
    for tr, casts_expected in ((cast, 0), (plain, len(linears))):
        with WeightCasts(weights if tr is cast else [m.weight for m in frozen_linears(plain.model)]) as mode, \
                torch.no_grad(), tr.autocast():
            tr.model(**x)
        assert mode.count == casts_expected  # autocast casts each frozen weight once per forward; the copies, none
    # The logits are bitwise autocast's: its per-forward cast is the same rounding of the same weights.
    with torch.no_grad(), cast.autocast():
        logits_cast = cast.model(**x).logits
    with torch.no_grad(), plain.autocast():
        logits_plain = plain.model(**x).logits
    assert torch.equal(logits_cast, logits_plain)
    # One sparse step: the same selected rows and the same row updates, bitwise.
    before = cast.tables[0].weight.clone()
    assert torch.equal(before, plain.tables[0].weight)
    m_cast, m_plain = cast.train_step(x), plain.train_step(x)
    assert m_cast["loss"] == m_plain["loss"] and m_cast["rows_selected"] == m_plain["rows_selected"] > 0
    moved = (cast.tables[0].weight != before).any(1)
    assert moved.sum() == m_cast["rows_selected"]
    assert torch.equal(cast.tables[0].weight, plain.tables[0].weight)
    # The stored weights stay fp32 (checkpoints, exports); outside autocast (evaluation) the fp32
    # weights run, as before.
    assert {p.dtype for p in cast.model.parameters()} == {torch.float32}
    assert all(m._bf16_weight.dtype == torch.bfloat16 for m in linears)
    with torch.no_grad():
        assert torch.equal(cast.model(**x).logits, plain.model(**x).logits)


def test_weights_loaded_after_the_build_refresh_the_copy():
    """A checkpoint's load_state_dict copies into the weights in place after build_run: the copy
    follows (else the forward would run the init's weights)."""
    cast, plain = (trainer(*SPARSE, "precision=bf16") for _ in range(2))
    uncast(plain.model)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in plain.model.state_dict().items()
             if not k.endswith(".values.weight")}
    for tr in (cast, plain):
        tr.model.load_state_dict(state, strict=False)
    x = batch(1)
    with torch.no_grad(), cast.autocast():
        assert torch.equal(cast.model(**x).logits, plain.model(**x).logits)


def test_trainable_linears_keep_autocast():
    """Pretraining trains every linear: none gets a copy (autocast must cast the updated weights)."""
    tr = trainer("precision=bf16")
    assert not [m for m in tr.model.modules() if "forward" in vars(m)]
