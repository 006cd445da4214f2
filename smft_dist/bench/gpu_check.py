"""GPU check: the paper's 1.3B model in bf16 on one GPU, a few steps each of pretraining, full
finetuning and sparse memory finetuning, through the real `build_run` / `Trainer.train_step`.

    python -m smft_dist.bench.gpu_check --json benchmarks/results/gpu_check.json

Writes JSON: per phase the median step time, tokens/s and peak memory; the memory lookup's
effective bandwidth as a fraction of the device's copy bandwidth (measured in the same run: a
device-to-device copy of a 1 GiB tensor, which is what a gather-bound kernel can at best reach);
and the sparse/full finetuning step-time ratio. Without CUDA it writes `{"skipped": reason}` and
exits 0 (`--allow-cpu` runs it on the CPU anyway, with `--model configs/model/tiny.yaml`, for the
test of the code path).

Runs offline with torch, transformers, peft and safetensors only: no omegaconf (the model YAML is
read with PyYAML, which transformers already needs), no DeepSpeed (the plain engine: one GPU has
nothing to shard) and no mosaicml-streaming (synthetic token batches).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from smft_dist.config import DataConfig, DistConfig, ModelConfig, OptimConfig, RunConfig, SelectionConfig, validate

ROOT = Path(__file__).resolve().parents[2]
PHASES = {"pretrain": ("pretrain", "full"), "full_finetune": ("finetune", "full"),
          "sparse_finetune": ("finetune", "sparse_memory")}


def model_config(path: Path, activation_checkpointing: bool) -> ModelConfig:
    import yaml

    model = dict(yaml.safe_load(path.read_text())["model"])
    return ModelConfig(**{**model, "activation_checkpointing": activation_checkpointing})


def run_config(args, phase: str, df_path: str | None) -> RunConfig:
    mode, method = PHASES[phase]
    cfg = RunConfig(
        mode=mode, method=method, precision="bf16", steps=args.warmup + args.steps, seed=0, out_dir=args.tmp,
        model=model_config(Path(args.model), args.activation_checkpointing),
        data=DataConfig(seq_len=args.seq_len, batch_size=args.batch),
        optim=OptimConfig(lr=1e-5, memory_lr=2.0 if method == "sparse_memory" else 1e-3, warmup_steps=0),
        selection=SelectionConfig(top_t=args.top_t, mode="tfidf", df_path=df_path),
        dist=DistConfig(device=args.device),
    )
    validate(cfg, 1)
    return cfg


def synthetic_batch(g: torch.Generator, batch: int, seq_len: int, vocab: int) -> dict:
    ids = torch.randint(3, vocab, (batch, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 5) -> float:
    """Bytes/s of a device-to-device copy (read + write), the practical peak for a gather."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def lookup_bandwidth(trainer, batch: dict, iters: int = 5) -> dict:
    """Effective bandwidth of the memory lookup (fetch the unique rows, then the weighted bag) on
    the slot ids the model's product keys pick for `batch`."""
    device = trainer.ctx.device
    layer = trainer.model.memory_layers()[0]
    table = layer.values
    captured = {}
    hook = layer.keys.register_forward_hook(lambda m, i, out: captured.update(slots=out[0], scores=out[1]))
    with torch.no_grad(), trainer.autocast():
        trainer.model(input_ids=batch["input_ids"].to(device))
    hook.remove()
    idx_TK = captured["slots"].flatten(1)
    w_TK = torch.softmax(captured["scores"].float(), -1).flatten(1).to(table.weight.dtype)
    times = []
    with torch.no_grad():
        for _ in range(iters + 1):
            sync(device)
            t0 = time.perf_counter()
            table.embedding_bag(idx_TK, w_TK)
            sync(device)
            times.append(time.perf_counter() - t0)
    T, K = idx_TK.shape
    U = int(torch.unique(idx_TK).numel())
    e = table.weight.element_size()
    # The least traffic the lookup needs: each touched row read once, the ids and weights read,
    # the output written (what it moves beyond that, e.g. the gathered copy, counts against it).
    moved = U * table.dim * e + T * K * (8 + e) + T * table.dim * e
    seconds = statistics.median(times[1:])
    return {"tokens": T, "ids_per_token": K, "unique_rows": U, "bytes_moved": moved, "seconds": seconds,
            "bytes_per_s": moved / seconds,
            "bytes_moved_formula": "unique rows x D x elem + tokens x ids x (8 + elem) + tokens x D x elem"}


def run_phase(args, phase: str, df_path: str | None) -> tuple[dict, object]:
    from smft_dist.distributed import init_distributed
    from smft_dist.train.metrics import peak_memory_mb
    from smft_dist.train.trainer import build_run

    cfg = run_config(args, phase, df_path)
    ctx = init_distributed(cfg.dist)
    reset_peak(ctx.device)
    trainer = build_run(cfg, ctx)
    g = torch.Generator().manual_seed(1)
    times, tokens = [], 0
    for i in range(args.warmup + args.steps):
        b = synthetic_batch(g, args.batch, args.seq_len, cfg.model.vocab_size)
        sync(ctx.device)
        t0 = time.perf_counter()
        metrics = trainer.train_step(b)
        sync(ctx.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens = metrics["tokens"]
        print(f"{phase} step {i + 1}/{args.warmup + args.steps}: {time.perf_counter() - t0:.3f} s, "
              f"loss {metrics['loss']:.3f}", flush=True)
    step_s = statistics.median(times)
    out = {"step_s": step_s, "step_s_all": times, "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
           "peak_memory_mb": round(peak_memory_mb(ctx.device), 1), "loss_last": metrics["loss"]}
    if "rows_updated" in metrics:
        out["rows_updated_last"] = metrics["rows_updated"]
    return out, trainer


def build_df(trainer, args, out_dir: Path) -> str:
    """A df index over a few synthetic batches (a forward-only pass), saved where selection.df_path reads it."""
    from smft_dist.selection import build_background_index
    from smft_dist.train.checkpoint import layer_names

    g = torch.Generator().manual_seed(2)
    vocab = trainer.model.config.vocab_size
    batches = [synthetic_batch(g, args.batch, args.seq_len, vocab) for _ in range(args.df_batches)]
    with trainer.autocast():
        indexes = build_background_index(trainer.model, batches, len(batches), trainer.tables, corpus="synthetic")
    for name, index in zip(layer_names(trainer.model), indexes):
        index.save(out_dir / f"{name}.safetensors")
    return str(out_dir)


def free_memory(device: torch.device) -> None:
    """Return a dropped trainer's memory (call after the last reference is gone): the next phase's
    1.3B model must not share the GPU with this one's."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "configs/model/smft_1p3b.yaml"), help="YAML with a model: section")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4, help="rows per step")
    p.add_argument("--steps", type=int, default=4, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top-t", type=int, default=500)
    p.add_argument("--df-batches", type=int, default=4, help="synthetic batches of the df index")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU (tests)")
    p.add_argument("--json", default=None, help="where to write the result")
    args = p.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and not args.allow_cpu:
        out = {"skipped": "no CUDA device (torch.cuda.is_available() is False): the GPU check needs one GPU; "
                          "--allow-cpu runs the code path on the CPU"}
    else:
        out = check(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return out


def check(args) -> dict:
    device = torch.device(args.device)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "model": Path(args.model).name, "precision": "bf16",
           "seq_len": args.seq_len, "batch": args.batch, "activation_checkpointing": args.activation_checkpointing,
           "phases": {}}
    copy_bps = copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 26))
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        out["phases"]["pretrain"], trainer = run_phase(args, "pretrain", None)
        df_path = build_df(trainer, args, Path(tmp) / "df")
        del trainer
        free_memory(device)
        out["phases"]["full_finetune"], trainer = run_phase(args, "full_finetune", None)
        del trainer
        free_memory(device)
        out["phases"]["sparse_finetune"], trainer = run_phase(args, "sparse_finetune", df_path)
        lookup = lookup_bandwidth(trainer, synthetic_batch(torch.Generator().manual_seed(3), args.batch, args.seq_len,
                                                           trainer.model.config.vocab_size))
        del trainer
        free_memory(device)
    lookup["copy_bytes_per_s"] = copy_bps
    lookup["fraction_of_copy_bandwidth"] = lookup["bytes_per_s"] / copy_bps
    out["lookup"] = lookup
    out["sparse_over_full_step_time"] = out["phases"]["sparse_finetune"]["step_s"] / out["phases"]["full_finetune"]["step_s"]
    return out


if __name__ == "__main__":
    main()
