"""Engines for the dense weights: plain torch, DeepSpeed (ZeRO 0/1/2) and FSDP2.

Every engine exposes the same small interface to the train loop:

    out = engine(**batch)          # forward (the memory tables are reached through the model)
    engine.backward(loss, sync)    # once per micro-batch; sync=True on the last of the step
    engine.step()                  # once per optimizer step: clip, step, lr schedule, zero grads
    engine.zero_grad()             # drop accumulated gradients (a skipped step)
    engine.save(dir) / engine.load(dir, with_optimizer)   # optimizer state (collective)
    engine.dense_state_dict()      # full dense weights on every rank (for checkpoints/export)

The memory value tables are not parameters of the module handed to the engine
(`ProductKeyMemory.set_value_table(register=False)`), so no engine broadcasts, all-reduces,
reduce-scatters or gathers them; their row-sparse gradients and optimizers live beside.
With no trainable dense parameter (sparse memory finetuning) the plain engine runs whatever
`dist.engine` says: DeepSpeed refuses a backward without an optimizer, and with every dense
weight frozen there is nothing for ZeRO or FSDP to reduce, shard or step.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from smft_dist.config import ConfigError


def _memory_value_keys(model: nn.Module) -> set[str]:
    return {k for k in model.state_dict() if k.endswith(".values.weight")}  # replace and add (mlp.memory.) modes


def cast_frozen_linears_bf16(model: nn.Module) -> None:
    """Give every frozen nn.Linear (weight and bias not requiring grad) a bf16 copy of its weight and
    bias, made once here, that its forward uses under bf16 autocast.

    bf16 autocast casts an fp32 linear weight to bf16 on every forward (about 9 GB of reads and
    writes per step for a 1.5B frozen model); with the copy it finds the weight already bf16 and
    casts nothing. The results are bitwise autocast's: its cast is the same round-to-nearest
    `Tensor.to(bfloat16)` of the same fp32 weight, and F.linear then runs the same bf16 kernel on
    the same operands. Outside bf16 autocast (evaluation, fp32 runs) the fp32 weight is used, and
    checkpoints and exports keep the fp32 weights: the copies are plain attributes, not in the
    state dict (+2 bytes per frozen linear weight). A copy is remade if its weight was changed in
    place (a checkpoint's load_state_dict after the build). Trainable linears (LoRA's adapters,
    the memory layers in pretraining) and the value tables are left alone."""
    linears = [m for m in model.modules() if type(m) is nn.Linear
               and not any(p.requires_grad for p in m.parameters(recurse=False))]
    for m in linears:
        m.forward = _bf16_copy_linear_forward.__get__(m)
        m._bf16_of = None
        _refresh_bf16_copy(m)


def _bf16_copy_key(m: nn.Linear) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in m.parameters(recurse=False))


def _refresh_bf16_copy(m: nn.Linear) -> None:
    if m._bf16_of != _bf16_copy_key(m):
        m._bf16_weight = m.weight.detach().to(torch.bfloat16)
        m._bf16_bias = None if m.bias is None else m.bias.detach().to(torch.bfloat16)
        m._bf16_of = _bf16_copy_key(m)


def _bf16_copy_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    device = self.weight.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16:
        _refresh_bf16_copy(self)
        return nn.functional.linear(x, self._bf16_weight, self._bf16_bias)
    return nn.functional.linear(x, self.weight, self.bias)


class PlainEngine:
    """torch optimizer; with world > 1 the dense gradients are averaged with all_reduce (DDP-like)."""

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 scheduler=None, grad_clip: float = 0.0, world_size: int = 1):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_clip, self.world_size = grad_clip, world_size
        self._params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer else []

    def __call__(self, **batch):
        return self.module(**batch)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Accumulate this micro-batch's gradients (`loss` already weighted for accumulation).
        `sync`: the last micro-batch of the step (engines that reduce in backward reduce then)."""
        loss.backward()

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        if self.optimizer is None:
            return
        if self.world_size > 1:
            for p in self._params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.world_size)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    def load_dense_state_dict(self, state: dict) -> None:
        """Full dense weights (as `dense_state_dict` returns them) into the wrapped model."""
        self.module.load_state_dict(state, strict=False)

    def fast_forward_schedule(self, step: int) -> None:
        """Put the LR schedule at `step` (a resume whose schedule state could not be loaded)."""
        if self.scheduler is not None:
            self.scheduler.last_epoch = step - 1
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()

    def dense_state_dict(self) -> dict:
        skip = _memory_value_keys(self.module)
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items() if k not in skip}

    def save(self, path: Path) -> None:
        if self.optimizer is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            torch.save({"optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict() if self.scheduler else None}, path / "dense_optim.pt")

    def load(self, path: Path, with_optimizer: bool = True) -> None:
        f = path / "dense_optim.pt"
        if with_optimizer and self.optimizer is not None and f.exists():
            state = torch.load(f, map_location="cpu", weights_only=False)
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state["scheduler"]:
                self.scheduler.load_state_dict(state["scheduler"])


def deepspeed_config(zero_stage: int, micro_batch: int, world_size: int, grad_accum: int, grad_clip: float,
                     precision: str, user_config: Optional[str] = None) -> dict:
    """The DeepSpeed config dict from our settings, with a user DeepSpeed JSON merged over it.

    The keys our run decides (batch sizes, accumulation, precision) may appear in the user JSON only
    with the same values: a conflict is refused (ConfigError naming our key) instead of letting the
    two sides silently disagree about how many micro-batches make a step or what dtype trains."""
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world_size * grad_accum,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": precision == "bf16"},
    }
    if not user_config:
        return ds
    user = json.loads(Path(user_config).read_text())
    ours = {"train_micro_batch_size_per_gpu": "data.batch_size", "train_batch_size":
            "data.batch_size x world x optim.grad_accum", "gradient_accumulation_steps": "optim.grad_accum"}
    for key, our_key in ours.items():
        if key in user and user[key] != ds[key]:
            raise ConfigError(f"dist.deepspeed_config={user_config} sets {key}={user[key]}, the run has {ds[key]} "
                              f"({our_key}): remove it from the JSON and set {our_key} instead")
    if (user.get("fp16") or {}).get("enabled"):
        raise ConfigError(f"dist.deepspeed_config={user_config} enables fp16: not supported (the memory rows' "
                          "gradients bypass its loss scaling); remove the fp16 section and set precision=bf16")
    if "bf16" in user and bool(user["bf16"].get("enabled")) != ds["bf16"]["enabled"]:
        raise ConfigError(f"dist.deepspeed_config={user_config} sets bf16.enabled={user['bf16'].get('enabled')} but "
                          f"precision={precision}: remove the bf16 section and set precision instead")
    ds.update(user)
    return ds


class DeepSpeedEngine(PlainEngine):
    """`deepspeed.initialize` over the model with the dict of `deepspeed_config`.

    Accumulation: DeepSpeed's own micro-step counter decides when it reduces and steps; we set the
    boundary explicitly from `sync` and pass already weighted losses (scale_wrt_gas=False), so
    `backward` x K + `step` is one optimizer step, as for the other engines."""

    def __init__(self, model, optimizer, scheduler, world_size, ds_config: dict):
        import deepspeed

        engine, ds_opt, _, ds_sched = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            model_parameters=[p for g in optimizer.param_groups for p in g["params"]], dist_init_required=False,
        )
        super().__init__(model, ds_opt, ds_sched, ds_config["gradient_clipping"], world_size)
        self.engine = engine

    def __call__(self, **batch):
        return self.engine(**batch)

    def backward(self, loss, sync: bool = True):
        self.engine.set_gradient_accumulation_boundary(sync)
        self.engine.backward(loss, scale_wrt_gas=False)
        if not sync:
            self.engine.step()  # advances DeepSpeed's micro-step count; no optimizer step off the boundary

    def step(self):
        self.engine.step()  # at the boundary: clip, reduce(-scatter), step, zero grads, scheduler

    def zero_grad(self):
        """Drop every gradient accumulated since the last step (a skipped step): the module's (ZeRO
        0/1 accumulate there until the boundary) and the optimizer's. ZeRO-2 reduces each micro-batch
        into its partition (`all_grad_tensors`, `averaged_gradients`) and counts micro-steps: both are
        reset as its own step does when it drops an overflowed step."""
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer

        self.engine.zero_grad()
        zero = self.engine.optimizer
        zero.zero_grad(set_to_none=True)  # the bf16 optimizer's fp32 gradients too
        if isinstance(zero, DeepSpeedZeroOptimizer):
            zero._release_preflattened_grad_buffers()
            for group in list(zero.averaged_gradients):
                zero.averaged_gradients[group] = None
            for group in list(zero.all_grad_tensors):
                zero.all_grad_tensors[group] = None
            zero.micro_step_id = INITIAL_MICRO_STEP_ID

    def load_dense_state_dict(self, state: dict) -> None:
        super().load_dense_state_dict(state)
        if hasattr(self.engine.optimizer, "refresh_fp32_params"):  # ZeRO keeps fp32 master copies
            self.engine.optimizer.refresh_fp32_params()

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path / "deepspeed"), tag="dense", save_latest=False)

    def load(self, path: Path, with_optimizer: bool = True) -> None:
        if with_optimizer and (path / "deepspeed").exists():
            self.engine.load_checkpoint(str(path / "deepspeed"), tag="dense", load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=True)


class FSDP2Engine(PlainEngine):
    """`fully_shard` on each decoder layer and the root over a 1-D mesh of the whole world.
    precision bf16: a `MixedPrecisionPolicy` computes in bf16 parameters (gathered per layer from
    the fp32 shards, which the optimizer updates) and reduce-scatters gradients in fp32."""

    def __init__(self, model, make_optimizer: Callable, grad_clip, world_size, device_type: str,
                 precision: str = "fp32"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device_type, (world_size,))
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if precision == "bf16" else MixedPrecisionPolicy()
        # The decoder layers of the HF model; under LoRA `model` is the PEFT wrapper around it.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for layer in base.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
        fully_shard(model, mesh=mesh, mp_policy=mp_policy)
        optimizer, scheduler = make_optimizer(model)  # over the sharded (DTensor) parameters
        # FSDP2 reduce-scatters gradients itself: no all_reduce here (world_size=1 below).
        super().__init__(model, optimizer, scheduler, grad_clip, world_size=1)

    def backward(self, loss, sync: bool = True):
        # Off the last micro-batch, keep accumulating unsharded gradients: one reduce-scatter a step.
        self.module.set_requires_gradient_sync(sync)
        loss.backward()

    def zero_grad(self) -> None:
        """Drop every gradient accumulated since the last step (a skipped step). Off the last
        micro-batch FSDP2 keeps them unsharded on its own parameter records, out of the optimizer's
        reach: on the unsharded parameter, or (bf16 parameters, fp32 reduction) as a separate fp32
        `unsharded_accumulated_grad`, both added into the next reduce-scatter unless dropped here."""
        from torch.distributed.fsdp import FSDPModule

        super().zero_grad()
        for module in self.module.modules():
            if not isinstance(module, FSDPModule):
                continue
            for group in module._get_fsdp_state()._fsdp_param_groups:  # torch of the lock (constraints.txt)
                for param in group.fsdp_params:
                    param.unsharded_accumulated_grad = None
                    if hasattr(param, "_unsharded_param"):  # created lazily, at the first all-gather
                        param._unsharded_param.grad = None

    def load_dense_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def dense_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                          broadcast_from_rank0=False))
        skip = _memory_value_keys(self.module)
        return {k: v for k, v in full.items() if k not in skip}

    def save(self, path: Path) -> None:
        if self.optimizer is None:
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optim": get_optimizer_state_dict(self.module, self.optimizer)}, checkpoint_id=str(path / "fsdp_optim"))
        if dist.get_rank() == 0 and self.scheduler is not None:
            torch.save(self.scheduler.state_dict(), path / "fsdp_sched.pt")

    def load(self, path: Path, with_optimizer: bool = True) -> None:
        if self.optimizer is None or not with_optimizer or not (path / "fsdp_optim").exists():
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        state = {"optim": get_optimizer_state_dict(self.module, self.optimizer)}
        dcp.load(state, checkpoint_id=str(path / "fsdp_optim"))
        set_optimizer_state_dict(self.module, self.optimizer, state["optim"])
        if self.scheduler is not None and (path / "fsdp_sched.pt").exists():
            self.scheduler.load_state_dict(torch.load(path / "fsdp_sched.pt", weights_only=False))
