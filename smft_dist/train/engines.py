"""Engines for the dense weights: plain torch, DeepSpeed (ZeRO 0/1/2) and FSDP2.

Every engine exposes the same small interface to the train loop:

    out = engine(**batch)          # forward (the memory tables are reached through the model)
    engine.backward(loss)
    engine.step()                  # clip, optimizer step, lr schedule, zero grads
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
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn


def _memory_value_keys(model: nn.Module) -> set[str]:
    return {k for k in model.state_dict() if k.endswith(".values.weight")}  # replace and add (mlp.memory.) modes


class PlainEngine:
    """torch optimizer; with world > 1 the dense gradients are averaged with all_reduce (DDP-like)."""

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 scheduler=None, grad_clip: float = 0.0, world_size: int = 1):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_clip, self.world_size = grad_clip, world_size
        self._params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer else []

    def __call__(self, **batch):
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

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


class DeepSpeedEngine(PlainEngine):
    """`deepspeed.initialize` over the model; our config section becomes the DeepSpeed dict and a
    user DeepSpeed JSON (dist.deepspeed_config) is merged over it."""

    def __init__(self, model, optimizer, scheduler, grad_clip, world_size, zero_stage: int,
                 micro_batch: int, user_config: Optional[str] = None):
        import deepspeed

        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "train_batch_size": micro_batch * world_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if user_config:
            ds_config.update(json.loads(Path(user_config).read_text()))
        engine, ds_opt, _, ds_sched = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            model_parameters=[p for g in optimizer.param_groups for p in g["params"]], dist_init_required=False,
        )
        super().__init__(model, ds_opt, ds_sched, grad_clip, world_size)
        self.engine = engine

    def __call__(self, **batch):
        return self.engine(**batch)

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self):
        self.engine.step()  # clip, reduce(-scatter), step, zero grads, scheduler

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path / "deepspeed"), tag="dense", save_latest=False)

    def load(self, path: Path, with_optimizer: bool = True) -> None:
        if with_optimizer and (path / "deepspeed").exists():
            self.engine.load_checkpoint(str(path / "deepspeed"), tag="dense", load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=True)


class FSDP2Engine(PlainEngine):
    """`fully_shard` on each decoder layer and the root over a 1-D mesh of the whole world."""

    def __init__(self, model, make_optimizer: Callable, grad_clip, world_size, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device_type, (world_size,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer, scheduler = make_optimizer(model)  # over the sharded (DTensor) parameters
        # FSDP2 reduce-scatters gradients itself: no all_reduce here (world_size=1 below).
        super().__init__(model, optimizer, scheduler, grad_clip, world_size=1)

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
