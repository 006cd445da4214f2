"""The continual-learning benchmark (paper §5, docs/design.md §1.4) at a scale that runs on a CPU.

    python launchers/continual.py --config configs/demo/cpu.yaml --out runs/demo [key=value ...]

Stages, each reused when OUT already holds it:
  1. the synthetic benchmark -> OUT/data (`smft-data synthetic`'s writer);
  2. pretraining -> OUT/pretrain (the real loop, `smft_dist.train.loop.train`);
  3. the background df index -> OUT/background_index (same loop, mode=background_index);
  4. for every method, every setting of its sweep and every one of `fact_orders` orders of the new
     facts: learn the facts in that order, ONE step per fact on a batch of its paraphrases, from the
     same pretrained weights; evaluate learned-fact F1 (new facts seen so far), known-fact F1 and
     held-out NLL before, every `eval.every` steps and at the end; average over the orders;
  5. OUT/report.json, OUT/report.md and PNG plots (`smft_dist.continual.report`).

With `retrofit.enabled` (configs/demo/retrofit_cpu.yaml) stage 2 is the retrofit path instead: pretrain
a DENSE model (no memory layers) -> OUT/dense_pretrain, save it as a LlamaForCausalLM folder
(OUT/dense_hf), `smft-retrofit` it (OUT/retrofit_model), continue pretraining the memory alone ->
OUT/continue_pretrain; the df index is built on that. Methods with `init: dense` (full finetuning,
LoRA) then start from the dense model, `init: memory` (sparse) from the retrofitted one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from smft_dist.config import ConfigError, RunConfig, _load_yaml, _merge_into, validate

log = logging.getLogger("smft_dist.continual")
SCHEMA = "smft_dist.continual.benchmark.ContinualConfig"


@dataclass
class BenchmarkConfig:
    """The synthetic world (smft_dist.data.synthetic.SyntheticWorld) and its sequence length."""

    seed: int = 0
    n_known: int = 300
    n_new: int = 100
    paraphrases: int = 64  # = the finetuning batch: one step per fact
    pretrain_docs: int = 20000
    background_docs: int = 2000
    heldout_docs: int = 500
    seq_len: int = 32
    qa_people_fraction: float = 1.0  # < 1: the other known people's facts only as statements (docs/design.md §5.1)
    qa_rewrites: int = 0  # of each new fact's paraphrases, this many are QA texts instead (docs/design.md §5.1)


@dataclass
class PretrainConfig:
    steps: int = 1000
    from_checkpoint: Optional[str] = None  # reuse a pretrain run's checkpoints dir instead of training
    overrides: List[str] = field(default_factory=list)  # key=value on `run` for pretraining (lr, batch...)
    background_batches: int = 300
    background_batch_size: int = 32


@dataclass
class MethodSweep:
    """One row of the report: a method and the settings it is swept over. Every setting starts from
    the same pretrained weights and sees the same facts in the same order."""

    name: str = "sparse"
    method: str = "sparse_memory"  # full | lora | sparse_memory
    overrides: List[str] = field(default_factory=list)  # key=value for every setting
    sweep: List[str] = field(default_factory=list)  # one setting each: "optim.lr=1e-4 optim.memory_lr=1e-4"
    ablation: bool = False  # run only when `ablations=true`
    init: str = "memory"  # memory: the memory model; dense: the dense model (retrofit.enabled only)


@dataclass
class RetrofitDemoConfig:
    """The retrofit path (module docstring): the memory's shape comes from `run.model`."""

    enabled: bool = False
    mode: str = "add"  # add | replace (smft-retrofit --mode)
    continue_steps: int = 300  # continued pretraining of the memory (dense frozen)
    continue_overrides: List[str] = field(default_factory=list)  # key=value on `run` for that stage
    native_report: Optional[str] = None  # a report.json of the native demo to compare sparse finetuning with


@dataclass
class EvalConfig:
    every: int = 25  # steps between evaluations
    qa_batch_size: int = 64
    max_new_tokens: int = 4
    heldout_batches: int = 8
    heldout_batch_size: int = 32


@dataclass
class ContinualConfig:
    run: RunConfig = field(default_factory=RunConfig)  # model/optim defaults shared by every stage
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    retrofit: RetrofitDemoConfig = field(default_factory=RetrofitDemoConfig)
    methods: List[MethodSweep] = field(default_factory=list)
    # Matched learning (smft_dist.continual.report): the target is the best learned F1 of `target_method`;
    # the claims checked in the report are about `reference_method`.
    reference_method: str = "sparse"
    target_method: str = "full"
    ablations: bool = False
    # Every setting is run over this many orders of the new facts (order 0: the benchmark's own, the
    # others seeded permutations) and reported as mean and spread: with 100 facts one fact is 0.01 F1.
    fact_orders: int = 1


def load_continual_config(path: str | Path, overrides: Optional[List[str]] = None) -> ContinualConfig:
    """structured(ContinualConfig) <- yaml (with `base:` includes) <- key=value overrides; every
    derived RunConfig is validated here, so a bad sweep entry fails before any training."""
    cfg = _merge_into(OmegaConf.structured(ContinualConfig), _load_yaml(Path(path)), str(path), SCHEMA)
    for o in overrides or []:
        # OmegaConf.update, not a dotlist merge: it reaches list elements (methods.0.sweep=[...]).
        key, sep, value = o.partition("=")
        if not sep:
            raise ConfigError(f"override {o!r} is not of the form key=value (e.g. pretrain.steps=500)")
        try:
            OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=True)
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise ConfigError(f"command-line override {o!r}: bad config key '{key}': {str(e).splitlines()[0]}. "
                              f"Valid keys are the fields of {SCHEMA}") from None
    c: ContinualConfig = OmegaConf.to_object(cfg)
    if c.fact_orders < 1:
        raise ConfigError(f"{path}: fact_orders={c.fact_orders} must be >= 1 (1 = the benchmark's order only)")
    names = [m.name for m in c.methods]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"{path}: methods {names} must be a non-empty list of distinct names")
    for key in ("reference_method", "target_method"):
        if getattr(c, key) not in names:
            raise ConfigError(f"{path}: {key}={getattr(c, key)!r} is not one of the methods {names}")
    for m in c.methods:
        if m.init not in ("memory", "dense") or (m.init == "dense" and not c.retrofit.enabled):
            raise ConfigError(f"{path}: method {m.name!r} init={m.init!r}: memory, or dense with retrofit.enabled")
        for s in m.sweep or [""]:
            finetune_config(c, m, s, Path("."), where=f"{path}: method {m.name!r} setting {s!r}")
    return c


def model_overrides(c: ContinualConfig, init: str) -> List[str]:
    """key=value that make `run.model` the dense model (no memory layers) or the memory model (in
    the retrofit path: the retrofitted one, with its memory mode)."""
    if init == "dense":
        return ["model.memory_layers=[]"]
    return [f"model.memory_mode={c.retrofit.mode}"] if c.retrofit.enabled else []


def derive(base: RunConfig, overrides: List[str], where: str) -> RunConfig:
    """`base` with key=value overrides, validated (errors name `where` and the key)."""
    node = OmegaConf.structured(base)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"{where}: {bad[0]!r} is not of the form key=value")
        node = _merge_into(node, OmegaConf.from_dotlist(list(overrides)), where)
    run: RunConfig = OmegaConf.to_object(node)
    try:
        validate(run)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return run


def finetune_config(c: ContinualConfig, m: MethodSweep, setting: str, out: Path, where: str = "") -> RunConfig:
    b = c.benchmark
    init = out / ("dense_pretrain" if m.init == "dense" else "background_index") / "checkpoints"
    fixed = [*model_overrides(c, m.init), "mode=finetune", f"method={m.method}", f"model.init_from={init}",
             f"data.batch_size={b.paraphrases}", "data.shuffle=false", f"steps={b.n_new}",
             f"data.seq_len={b.seq_len}", "optim.warmup_steps=0", "optim.schedule=constant"]
    return derive(c.run, fixed + list(m.overrides) + setting.split(), where or f"method {m.name!r}")


# --- stages -------------------------------------------------------------------------------------
def prepare_data(c: ContinualConfig, out: Path) -> Path:
    from smft_dist.data.cli import write_synthetic
    from smft_dist.data.synthetic import SyntheticWorld

    data = out / "data"
    b = c.benchmark
    want = {"seed": b.seed, "n_known": b.n_known, "n_new": b.n_new, "paraphrases": b.paraphrases, "seq_len": b.seq_len,
            "pretrain_docs": b.pretrain_docs, "background_docs": b.background_docs, "heldout_docs": b.heldout_docs,
            "qa_people_fraction": b.qa_people_fraction, "qa_rewrites": b.qa_rewrites}
    if (data / "meta.json").is_file():
        meta = json.loads((data / "meta.json").read_text())
        have = {"qa_people_fraction": 1.0, "qa_rewrites": 0, **meta,  # folders written before those levers
                **{f"{k}_docs": meta.get(k, {}).get("documents") for k in ("pretrain", "background", "heldout")}}
        if any(have.get(k) != v for k, v in want.items()):
            raise ConfigError(f"{data} holds a benchmark with {({k: have.get(k) for k in want})}, the config asks "
                              f"for {want}: use another --out or delete {data}")
        log.info("reusing the benchmark in %s", data)
        return data
    log.info("writing the synthetic benchmark to %s", data)
    world = SyntheticWorld(seed=b.seed, n_known=b.n_known, n_new=b.n_new, paraphrases=b.paraphrases,
                           pretrain_docs=b.pretrain_docs, background_docs=b.background_docs,
                           heldout_docs=b.heldout_docs, qa_people_fraction=b.qa_people_fraction, qa_rewrites=b.qa_rewrites)
    write_synthetic(data, world, b.seq_len)
    return data


def pretrain_and_index(c: ContinualConfig, out: Path, data: Path) -> dict:
    """Pretrain (unless reusable) and build the df index with the real training loop -> timings."""
    from smft_dist.train import checkpoint as ckpt

    times = {}
    common = [f"data.seq_len={c.benchmark.seq_len}"]
    if c.retrofit.enabled:
        times.update(retrofit_and_continue(c, out, data))
        common += model_overrides(c, "memory")
    pre_root = Path(c.pretrain.from_checkpoint) if c.pretrain.from_checkpoint else out / "pretrain" / "checkpoints"
    if c.retrofit.enabled:
        pre_root = out / "continue_pretrain" / "checkpoints"
    latest = ckpt.latest_checkpoint(pre_root)
    fresh = latest is None or ckpt.read_meta(latest)["step"] < (c.retrofit.continue_steps if c.retrofit.enabled
                                                                 else c.pretrain.steps)
    if fresh and c.pretrain.from_checkpoint and not c.retrofit.enabled:
        raise ConfigError(f"pretrain.from_checkpoint={pre_root} holds no checkpoint of >= {c.pretrain.steps} steps")
    stages = []
    if fresh and not c.retrofit.enabled:
        stages.append(("pretrain", common + list(c.pretrain.overrides) + [
            "mode=pretrain", f"steps={c.pretrain.steps}", f"data.train={data / 'pretrain'}",
            f"out_dir={out / 'pretrain'}", "checkpoint.keep=1"]))
    if fresh or ckpt.latest_checkpoint(out / "background_index" / "checkpoints") is None:
        stages.append(("background_index", common + [
            "mode=background_index", f"model.init_from={pre_root}", f"data.background={data / 'background'}",
            f"data.batch_size={c.pretrain.background_batch_size}", "data.shuffle=true",
            f"selection.background_batches={c.pretrain.background_batches}", f"out_dir={out / 'background_index'}",
            "checkpoint.resume=none"]))
    for name, overrides in stages:
        _train_stage(c, name, overrides, times)
    return times


def _train_stage(c: ContinualConfig, name: str, overrides: List[str], times: dict) -> None:
    from smft_dist.train.loop import train

    cfg = derive(c.run, overrides, name)
    t0 = time.time()
    code = train(cfg)
    if code != 0:  # preempted (SIGUSR1/SIGTERM): the stage saved; a rerun of the benchmark resumes it
        raise SystemExit(code)
    times[f"{name}_s"] = time.time() - t0


def retrofit_and_continue(c: ContinualConfig, out: Path, data: Path) -> dict:
    """The retrofit path's first stages, each reused when present: dense pretraining, the dense
    model as a LlamaForCausalLM folder, `smft-retrofit`, continued pretraining of the memory alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from smft_dist.model.retrofit import retrofit
    from smft_dist.train import checkpoint as ckpt
    from smft_dist.train.export import load_checkpoint_model

    times, m = {}, c.run.model
    common = [f"data.seq_len={c.benchmark.seq_len}", f"data.train={data / 'pretrain'}", "checkpoint.keep=1",
              "mode=pretrain"]
    dense_root = out / "dense_pretrain" / "checkpoints"
    latest = ckpt.latest_checkpoint(dense_root)
    if latest is None or ckpt.read_meta(latest)["step"] < c.pretrain.steps:
        _train_stage(c, "dense_pretrain", common + model_overrides(c, "dense") + list(c.pretrain.overrides) + [
            f"steps={c.pretrain.steps}", f"out_dir={out / 'dense_pretrain'}"], times)
    hf, smft = out / "dense_hf", out / "retrofit_model"
    if not (smft / "model.yaml").is_file():
        dense, _ = load_checkpoint_model(dense_root)  # an SmftForCausalLM without memory layers = a Llama
        llama_cfg = {k: v for k, v in dense.config.to_dict().items() if not k.startswith("memory_")
                     and k not in ("model_type", "architectures", "auto_map", "transformers_version")}
        llama = LlamaForCausalLM(LlamaConfig(**llama_cfg))
        llama.load_state_dict(dense.state_dict())
        llama.save_pretrained(hf)
        retrofit(hf, smft, list(m.memory_layers), tokenizer=str(data / "tokenizer"), mode=c.retrofit.mode,
                 n_keys=m.memory_n_keys, heads=m.memory_heads, knn=m.memory_knn, k_dim=m.memory_k_dim,
                 value_dim=m.memory_value_dim, swilu=m.memory_swilu, qk_norm=m.memory_qk_norm,
                 value_dtype=m.memory_value_dtype, seed=c.run.seed)
    latest = ckpt.latest_checkpoint(out / "continue_pretrain" / "checkpoints")
    if latest is None or ckpt.read_meta(latest)["step"] < c.retrofit.continue_steps:
        _train_stage(c, "continue_pretrain", common + model_overrides(c, "memory") + list(c.retrofit.continue_overrides)
                     + ["optim.train_dense=false", f"steps={c.retrofit.continue_steps}", f"model.init_from={smft}",
                        f"out_dir={out / 'continue_pretrain'}"], times)
    return times


@dataclass
class Bench:
    """What every evaluation needs, loaded once."""

    tokenizer: object
    known_qa: list
    new_qa: list
    fact_batches: list  # one batch of `paraphrases` statements per new fact, in fact order
    heldout_batches: list
    ev: EvalConfig

    def evaluate(self, model, n_learned: Optional[int] = None) -> dict:
        """known-fact F1, F1 on the first `n_learned` new facts (all if None), held-out NLL."""
        from smft_dist.eval.nll import heldout_nll
        from smft_dist.eval.qa import evaluate_qa

        qa = lambda pairs: evaluate_qa(model, self.tokenizer, pairs, self.ev.qa_batch_size,  # noqa: E731
                                       self.ev.max_new_tokens)["f1"] if pairs else 0.0
        new = self.new_qa if n_learned is None else self.new_qa[:n_learned]
        return {"learned_f1": qa(new), "known_f1": qa(self.known_qa),
                "heldout_nll": heldout_nll(model, self.heldout_batches)["nll"]}

    def reordered(self, perm: List[int]) -> "Bench":
        """The same benchmark with the new facts (their batches and QA pairs alike) in order `perm`."""
        return dataclasses.replace(self, new_qa=[self.new_qa[i] for i in perm],
                                   fact_batches=[self.fact_batches[i] for i in perm])


def fact_order(n: int, order: int, seed: int) -> List[int]:
    """Order 0 is the benchmark's own (comparable with single-order runs); order k > 0 a permutation
    seeded by (benchmark seed, k), so every method and setting sees the same k-th order."""
    perm = list(range(n))
    if order:
        random.Random(f"fact-order-{seed}-{order}").shuffle(perm)
    return perm


def load_bench(c: ContinualConfig, data: Path) -> Bench:
    from transformers import AutoTokenizer

    from smft_dist.data.loader import build_dataloader
    from smft_dist.eval.qa import load_qa_jsonl

    b = c.benchmark
    facts = list(build_dataloader(data / "new_facts", b.paraphrases, shuffle=False, seed=0, rank=0, world_size=1))
    for i, batch in enumerate(facts):  # the protocol: batch i = the paraphrases of fact i, nothing else
        if not bool((batch["group"] == i).all()):
            raise RuntimeError(f"{data}/new_facts: batch {i} mixes facts {batch['group'].unique().tolist()}: "
                               f"benchmark.paraphrases must equal the paraphrases written per fact")
    held = build_dataloader(data / "heldout", c.eval.heldout_batch_size, shuffle=False, seed=0, rank=0,
                            world_size=1, drop_last=False)
    held = [batch for _, batch in zip(range(c.eval.heldout_batches), held)]
    return Bench(AutoTokenizer.from_pretrained(str(data / "tokenizer")), load_qa_jsonl(data / "eval" / "known_qa.jsonl"),
                 load_qa_jsonl(data / "eval" / "new_qa.jsonl"), facts, held, c.eval)


@contextmanager
def memory_zeroed(model):
    """Every memory layer outputs zeros: does the memory (not the dense layers) hold the facts?"""
    hooks = [layer.register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
             for layer in model.memory_layers()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def run_setting(cfg: RunConfig, ctx, bench: Bench, before: dict, desc: str) -> dict:
    """Learn the facts in order, one step each; -> final metrics and the curve."""
    from tqdm import tqdm

    from smft_dist.train.trainer import build_run

    trainer = build_run(cfg, ctx)
    model = trainer.wrapped if trainer.wrapped is not None else trainer.model
    curve = [{"step": 0, **before}]
    n, t0, rows = len(bench.fact_batches), time.time(), []
    for step, batch in enumerate(tqdm(bench.fact_batches, desc=desc, dynamic_ncols=True, leave=False), 1):
        metrics = trainer.train_step(batch)
        rows.append(metrics.get("rows_selected", 0))
        if step % bench.ev.every == 0 or step == n:
            curve.append({"step": step, **bench.evaluate(model, step)})
    train_s = time.time() - t0
    final = curve[-1]
    drop = 100.0 * (before["known_f1"] - final["known_f1"]) / before["known_f1"] if before["known_f1"] > 0 else 0.0
    result = {"learned_f1": final["learned_f1"], "known_f1_before": before["known_f1"],
              "known_f1_after": final["known_f1"], "known_f1_drop_pct": drop,
              "heldout_nll_before": before["heldout_nll"], "heldout_nll_after": final["heldout_nll"],
              "steps": n, "wall_s": round(train_s, 1), "curve": curve}
    if trainer.sparse:
        result["mean_rows_selected"] = sum(rows) / max(1, len(rows))
    log.info("%s: learned F1 %.3f, known F1 %.3f -> %.3f (%.1f%% drop), NLL %.3f -> %.3f, %.0f s", desc,
             result["learned_f1"], before["known_f1"], final["known_f1"], drop, before["heldout_nll"],
             final["heldout_nll"], train_s)
    return result


def run(c: ContinualConfig, out: Path) -> dict:
    from smft_dist.distributed import init_distributed
    from smft_dist.continual.report import aggregate_orders, write_report
    from smft_dist.train.export import load_checkpoint_model

    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(c), out / "continual_config.yaml")
    data = prepare_data(c, out)
    times = pretrain_and_index(c, out, data)
    bench = load_bench(c, data)

    model, _ = load_checkpoint_model(out / "background_index" / "checkpoints")
    before = bench.evaluate(model)
    with memory_zeroed(model):
        zeroed = bench.evaluate(model)
    pretrained = {"known_f1": before["known_f1"], "known_f1_memory_zeroed": zeroed["known_f1"],
                  "new_f1": before["learned_f1"], "heldout_nll": before["heldout_nll"],
                  "heldout_nll_memory_zeroed": zeroed["heldout_nll"]}
    log.info("pretrained: known F1 %.3f (memory zeroed: %.3f), new-fact F1 %.3f, held-out NLL %.3f",
             before["known_f1"], zeroed["known_f1"], before["learned_f1"], before["heldout_nll"])
    del model
    before_by_init = {"memory": before}
    if c.retrofit.enabled:
        dense, _ = load_checkpoint_model(out / "dense_pretrain" / "checkpoints")
        before_by_init["dense"] = bench.evaluate(dense)
        pretrained["dense"] = {"known_f1": before_by_init["dense"]["known_f1"],
                               "heldout_nll": before_by_init["dense"]["heldout_nll"]}
        gates = [p.detach().abs().mean().item() for n, p in load_checkpoint_model(
            out / "background_index" / "checkpoints")[0].named_parameters() if n.endswith("memory_gate")]
        pretrained["retrofit"] = {"mode": c.retrofit.mode, "continue_steps": c.retrofit.continue_steps,
                                  "mean_abs_gate": gates}
        log.info("dense model: known F1 %.3f, held-out NLL %.3f; retrofitted memory's mean |gate| %s",
                 pretrained["dense"]["known_f1"], pretrained["dense"]["heldout_nll"], gates)
        del dense

    ctx = init_distributed(c.run.dist)
    orders = [fact_order(len(bench.fact_batches), k, c.benchmark.seed) for k in range(c.fact_orders)]
    results = {}
    for m in c.methods:
        if m.ablation and not c.ablations:
            continue
        results[m.name] = {"method": m.method, "overrides": m.overrides, "ablation": m.ablation, "sweep": []}
        for i, setting in enumerate(m.sweep or [""]):
            cfg = finetune_config(c, m, setting, out)
            runs = []
            for k, perm in enumerate(orders):
                torch.manual_seed(c.run.seed)  # the same init (LoRA) and sampling in every order
                runs.append(run_setting(cfg, ctx, bench.reordered(perm), before_by_init[m.init],
                                        f"{m.name} [{setting or 'default'}] order {k}"))
            results[m.name]["sweep"].append({"setting": setting, **aggregate_orders(runs)})
    report = {"config": OmegaConf.to_container(OmegaConf.structured(c)), "pretrained": pretrained,
              "fact_order_permutations": orders, "sweeps": results,
              "times": {**times, "total_s": time.time() - t_start}}
    if c.retrofit.native_report:  # the natively pretrained memory model's run, to compare with
        native = json.loads(Path(c.retrofit.native_report).read_text())
        report["native"] = {"path": c.retrofit.native_report, "pretrained": native["pretrained"],
                            "methods": native["methods"]}
    write_report(out, report, c.reference_method, c.target_method)
    return report


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Continual-learning benchmark: sparse memory vs full vs LoRA finetuning")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="run folder (reused: data, pretraining and df index are kept)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. pretrain.steps=500 ablations=true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        c = load_continual_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    report = run(c, Path(args.out))
    print(f"report: {Path(args.out) / 'report.md'} ({report['times']['total_s']:.0f} s)", flush=True)
    return 0
