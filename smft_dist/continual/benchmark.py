"""The continual-learning benchmark (paper §5, docs/design.md §1.4) at a scale that runs on a CPU.

    python launchers/continual.py --config configs/demo/cpu.yaml --out runs/demo [key=value ...]

Two tasks, as in the paper: **facts** (one step per new fact on a batch of its paraphrases) and, with
`benchmark.n_docs` > 0, **documents** (one step per chunk of a document about a new person, on a
batch of its augmentations; learned F1 over every fact the chunks seen so far state).

Stages, each reused when OUT already holds it:
  1. the synthetic benchmark -> OUT/data (`smft-data synthetic`'s writer) and the document chunks
     -> OUT/doc_chunks (`smft-data docs`'s writer);
  2. for every pretraining seed (`pretrain_seeds`), in OUT/seed<s>/: pretraining (the real loop,
     `smft_dist.train.loop.train`) -> pretrain, the background df index -> background_index, and,
     when a method starts from it (`init: dense`), the dense twin -> dense_pretrain: the same model
     with the memory layer's dense MLP back in its place, pretrained on the same data;
  3. for every task, method, sweep setting, seed and order of the stream (`fact_orders`): learn the
     stream in that order, ONE step per item, from the pretrained weights; evaluate learned F1,
     known-fact F1 and held-out NLL before, every `every` steps and at the end. Each run's result
     is kept in OUT/results (a rerun skips it); `workers` > 1 runs them in that many processes;
  4. OUT/report.json, OUT/report.md, OUT/headline.md and PNG plots (`smft_dist.continual.report`).

With `retrofit.enabled` (configs/demo/retrofit_cpu.yaml) stage 2 is the retrofit path instead: pretrain
the dense model -> dense_pretrain, save it as a LlamaForCausalLM folder (dense_hf), `smft-retrofit` it
(retrofit_model), continue pretraining the memory alone -> continue_pretrain; the df index is built on
that. Methods with `init: dense` then start from the dense model, `init: memory` from the retrofitted one.
"""
from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

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
    paraphrases: int = 64  # = the finetuning batch: one step per fact (and per document chunk)
    n_docs: int = 0  # documents about further new people: > 0 adds the document task
    pretrain_docs: int = 20000
    background_docs: int = 2000
    heldout_docs: int = 500
    seq_len: int = 32
    qa_people_fraction: float = 1.0  # < 1: the other known people's facts only as statements (docs/design.md §5.1)
    qa_rewrites: int = 0  # of each new fact's paraphrases, this many are QA texts instead (docs/design.md §5.1)


@dataclass
class PretrainConfig:
    steps: int = 1000
    overrides: List[str] = field(default_factory=list)  # key=value on `run` for pretraining (lr, batch...)
    background_batches: int = 300
    background_batch_size: int = 32


@dataclass
class MethodSweep:
    """One row of the report: a method and the settings it is swept over. Every setting starts from
    the same pretrained weights and sees the same stream in the same orders."""

    name: str = "sparse"
    method: str = "sparse_memory"  # full | lora | sparse_memory
    overrides: List[str] = field(default_factory=list)  # key=value for every setting
    sweep: List[str] = field(default_factory=list)  # one setting each: "optim.lr=1e-4 optim.memory_lr=1e-4"
    ablation: bool = False  # run only when `ablations=true`
    init: str = "memory"  # memory: the memory model; dense: the dense twin (or, retrofitting, the dense model)


@dataclass
class DocumentTaskConfig:
    """The document task (paper §5.2): one step per chunk (`smft-data docs --chunk-tokens`) on a batch
    of its `benchmark.paraphrases` augmentations, sequences of `seq_len` tokens."""

    chunk_tokens: int = 40  # one paragraph of the synthetic documents (three facts) per chunk
    seq_len: int = 64
    every: int = 10  # steps between evaluations
    methods: List[MethodSweep] = field(default_factory=list)


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
    every: int = 25  # steps between evaluations (fact task)
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
    methods: List[MethodSweep] = field(default_factory=list)  # the fact task's
    documents: DocumentTaskConfig = field(default_factory=DocumentTaskConfig)  # with benchmark.n_docs > 0
    # Matched learning (smft_dist.continual.report): the target is the best learned F1 of `target_method`;
    # the claims checked in the report are about `reference_method`. Both name methods of every task.
    reference_method: str = "sparse"
    target_method: str = "full"
    ablations: bool = False
    # Every setting is run from every pretraining seed over this many orders of the stream (order 0:
    # the benchmark's own, the others seeded permutations): with 100 facts one fact is 0.01 F1.
    fact_orders: int = 1
    pretrain_seeds: List[int] = field(default_factory=lambda: [0])  # `seed` of the pretraining stages
    workers: int = 1  # processes running the finetuning runs (1 thread each when > 1)


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
    if not c.pretrain_seeds or len(set(c.pretrain_seeds)) != len(c.pretrain_seeds):
        raise ConfigError(f"{path}: pretrain_seeds={c.pretrain_seeds} must be a non-empty list of distinct seeds")
    if c.workers < 1:
        raise ConfigError(f"{path}: workers={c.workers} must be >= 1")
    if c.benchmark.n_docs < 0 or (c.benchmark.n_docs > 0) != bool(c.documents.methods):
        raise ConfigError(f"{path}: benchmark.n_docs={c.benchmark.n_docs} with {len(c.documents.methods)} "
                          f"documents.methods: the document task needs both n_docs > 0 and its methods, or neither")
    for task, methods in task_methods(c).items():
        names = [m.name for m in methods]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"{path}: {task} methods {names} must be a non-empty list of distinct names")
        for key in ("reference_method", "target_method"):
            if getattr(c, key) not in names:
                raise ConfigError(f"{path}: {key}={getattr(c, key)!r} is not one of the {task} methods {names}")
        for m in methods:
            if m.init not in ("memory", "dense"):
                raise ConfigError(f"{path}: {task} method {m.name!r} init={m.init!r}: memory or dense")
            for s in m.sweep or [""]:
                finetune_config(c, task, m, s, Path("."), where=f"{path}: {task} method {m.name!r} setting {s!r}")
    return c


def task_methods(c: ContinualConfig) -> Dict[str, List[MethodSweep]]:
    """The tasks this config runs -> their methods."""
    return {"facts": c.methods, **({"documents": c.documents.methods} if c.benchmark.n_docs else {})}


def model_overrides(c: ContinualConfig, init: str) -> List[str]:
    """key=value that make `run.model` the dense model (no memory layers: each memory layer's dense
    MLP is back) or the memory model (in the retrofit path: the retrofitted one, with its memory mode)."""
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


def seed_dir(out: Path, seed: int) -> Path:
    """Where pretraining seed `seed` keeps its stages."""
    return out / f"seed{seed}"


def stream_shape(c: ContinualConfig, task: str) -> tuple[int, int]:
    """(steps, seq_len) of a task's stream: a fact per step, or a chunk (a document paragraph) per step."""
    if task == "facts":
        return c.benchmark.n_new, c.benchmark.seq_len
    return 2 * c.benchmark.n_docs, c.documents.seq_len


def finetune_config(c: ContinualConfig, task: str, m: MethodSweep, setting: str, root: Path,
                    where: str = "") -> RunConfig:
    """The RunConfig of one setting of method `m` on `task`, starting from pretraining folder `root`."""
    steps, seq_len = stream_shape(c, task)
    init = root / ("dense_pretrain" if m.init == "dense" else "background_index") / "checkpoints"
    fixed = [*model_overrides(c, m.init), "mode=finetune", f"method={m.method}", f"model.init_from={init}",
             f"data.batch_size={c.benchmark.paraphrases}", "data.shuffle=false", f"steps={steps}",
             f"data.seq_len={seq_len}", "optim.warmup_steps=0", "optim.schedule=constant"]
    return derive(c.run, fixed + list(m.overrides) + setting.split(), where or f"{task} method {m.name!r}")


# --- stages -------------------------------------------------------------------------------------
def prepare_data(c: ContinualConfig, out: Path) -> Path:
    from smft_dist.data.cli import write_synthetic
    from smft_dist.data.synthetic import SyntheticWorld

    data = out / "data"
    b = c.benchmark
    want = {"seed": b.seed, "n_known": b.n_known, "n_new": b.n_new, "paraphrases": b.paraphrases, "seq_len": b.seq_len,
            "pretrain_docs": b.pretrain_docs, "background_docs": b.background_docs, "heldout_docs": b.heldout_docs,
            "qa_people_fraction": b.qa_people_fraction, "qa_rewrites": b.qa_rewrites, "n_docs": b.n_docs}
    if (data / "meta.json").is_file():
        meta = json.loads((data / "meta.json").read_text())
        have = {**meta, **{f"{k}_docs": meta.get(k, {}).get("documents") for k in ("pretrain", "background", "heldout")}}
        if any(have.get(k) != v for k, v in want.items()):
            raise ConfigError(f"{data} holds a benchmark with {({k: have.get(k) for k in want})}, the config asks "
                              f"for {want}: use another --out or delete {data}")
        log.info("reusing the benchmark in %s", data)
    else:
        log.info("writing the synthetic benchmark to %s", data)
        world = SyntheticWorld(seed=b.seed, n_known=b.n_known, n_new=b.n_new, paraphrases=b.paraphrases,
                               pretrain_docs=b.pretrain_docs, background_docs=b.background_docs,
                               heldout_docs=b.heldout_docs, qa_people_fraction=b.qa_people_fraction,
                               qa_rewrites=b.qa_rewrites, n_docs=b.n_docs)
        write_synthetic(data, world, b.seq_len)
    if b.n_docs and not (out / "doc_chunks" / "chunks.jsonl").is_file():
        from smft_dist.data.cli import docs, parser

        log.info("chunking and augmenting the documents into %s", out / "doc_chunks")
        docs(parser().parse_args([
            "docs", str(data / "documents" / "new_documents.jsonl"), "--tokenizer", str(data / "tokenizer"),
            "--out", str(out / "doc_chunks"), "--chunk-tokens", str(c.documents.chunk_tokens),
            "--augmentations", str(b.paraphrases), "--seq-len", str(c.documents.seq_len),
            "--augmentations-file", str(data / "documents" / "augmentations.jsonl")]))
    return data


def pretrain_and_index(c: ContinualConfig, out: Path, data: Path, seed: int) -> dict:
    """Pretraining seed `seed`'s stages (each unless reusable), with the real training loop -> timings."""
    from smft_dist.checkpoint import layout as ckpt

    root, times = seed_dir(out, seed), {}
    common = [f"data.seq_len={c.benchmark.seq_len}", f"seed={seed}"]
    wants_dense = any(m.init == "dense" for ms in task_methods(c).values() for m in ms)
    if c.retrofit.enabled or wants_dense:
        _pretrain_dense(c, root, data, common, times)
    if c.retrofit.enabled:
        times.update(retrofit_and_continue(c, root, data, common))
        common += model_overrides(c, "memory")
        pre_root, steps = root / "continue_pretrain" / "checkpoints", c.retrofit.continue_steps
    else:
        pre_root, steps = root / "pretrain" / "checkpoints", c.pretrain.steps
    latest = ckpt.latest_checkpoint(pre_root)
    fresh = latest is None or ckpt.read_meta(latest)["step"] < steps
    if fresh and not c.retrofit.enabled:
        _train_stage(c, "pretrain", common + list(c.pretrain.overrides) + [
            "mode=pretrain", f"steps={c.pretrain.steps}", f"data.train={data / 'pretrain'}",
            f"out_dir={root / 'pretrain'}", "checkpoint.keep=1"], times)
    if fresh or ckpt.latest_checkpoint(root / "background_index" / "checkpoints") is None:
        _train_stage(c, "background_index", common + [
            "mode=background_index", f"model.init_from={pre_root}", f"data.background={data / 'background'}",
            f"data.batch_size={c.pretrain.background_batch_size}", "data.shuffle=true",
            f"selection.background_batches={c.pretrain.background_batches}", f"out_dir={root / 'background_index'}",
            "checkpoint.resume=none"], times)
    return times


def _pretrain_dense(c: ContinualConfig, root: Path, data: Path, common: List[str], times: dict) -> None:
    """The dense model (the dense twin, or the model the retrofit path starts from): the memory
    model's config without memory layers, pretrained on the same data with the same settings."""
    from smft_dist.checkpoint import layout as ckpt

    latest = ckpt.latest_checkpoint(root / "dense_pretrain" / "checkpoints")
    if latest is None or ckpt.read_meta(latest)["step"] < c.pretrain.steps:
        _train_stage(c, "dense_pretrain", common + model_overrides(c, "dense") + list(c.pretrain.overrides) + [
            "mode=pretrain", f"steps={c.pretrain.steps}", f"data.train={data / 'pretrain'}",
            f"out_dir={root / 'dense_pretrain'}", "checkpoint.keep=1"], times)


def _train_stage(c: ContinualConfig, name: str, overrides: List[str], times: dict) -> None:
    from smft_dist.train.loop import train

    cfg = derive(c.run, overrides, name)
    t0 = time.time()
    code = train(cfg)
    if code != 0:  # preempted (SIGUSR1/SIGTERM): the stage saved; a rerun of the benchmark resumes it
        raise SystemExit(code)
    times[f"{name}_s"] = times.get(f"{name}_s", 0.0) + time.time() - t0


def retrofit_and_continue(c: ContinualConfig, root: Path, data: Path, common: List[str]) -> dict:
    """The retrofit path after dense pretraining, each stage reused when present: the dense model as a
    LlamaForCausalLM folder, `smft-retrofit`, continued pretraining of the memory alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from smft_dist.model.retrofit import retrofit
    from smft_dist.checkpoint import layout as ckpt
    from smft_dist.checkpoint.model import load_checkpoint_model

    times, m = {}, c.run.model
    hf, smft = root / "dense_hf", root / "retrofit_model"
    if not (smft / "model.yaml").is_file():
        dense, _ = load_checkpoint_model(root / "dense_pretrain" / "checkpoints")  # no memory layers = a Llama
        llama_cfg = {k: v for k, v in dense.config.to_dict().items() if not k.startswith("memory_")
                     and k not in ("model_type", "architectures", "auto_map", "transformers_version")}
        llama = LlamaForCausalLM(LlamaConfig(**llama_cfg))
        llama.load_state_dict(dense.state_dict())
        llama.save_pretrained(hf)
        retrofit(hf, smft, list(m.memory_layers), tokenizer=str(data / "tokenizer"), mode=c.retrofit.mode,
                 n_keys=m.memory_n_keys, heads=m.memory_heads, knn=m.memory_knn, k_dim=m.memory_k_dim,
                 value_dim=m.memory_value_dim, swilu=m.memory_swilu, qk_norm=m.memory_qk_norm,
                 value_dtype=m.memory_value_dtype, seed=c.run.seed)
    latest = ckpt.latest_checkpoint(root / "continue_pretrain" / "checkpoints")
    if latest is None or ckpt.read_meta(latest)["step"] < c.retrofit.continue_steps:
        _train_stage(c, "continue_pretrain", common + model_overrides(c, "memory") + list(c.retrofit.continue_overrides)
                     + ["mode=pretrain", f"data.train={data / 'pretrain'}", "checkpoint.keep=1",
                        "optim.train_dense=false", f"steps={c.retrofit.continue_steps}", f"model.init_from={smft}",
                        f"out_dir={root / 'continue_pretrain'}"], times)
    return times


@dataclass
class Task:
    """One stream: step i trains on `batches[i]` (one group: a fact's paraphrases or a chunk's
    augmentations); after k steps the learned F1 is over the QA pairs of `qa_per_step[:k]`."""

    name: str
    batches: list
    qa_per_step: List[list]
    every: int  # steps between evaluations

    def learned_qa(self, k: Optional[int] = None) -> list:
        return [q for step in self.qa_per_step[:k] for q in step]

    def reordered(self, perm: List[int]) -> "Task":
        """The same stream with its items (batches and QA pairs alike) in order `perm`."""
        return dataclasses.replace(self, batches=[self.batches[i] for i in perm],
                                   qa_per_step=[self.qa_per_step[i] for i in perm])


@dataclass
class Bench:
    """What every evaluation needs, loaded once."""

    tokenizer: object
    known_qa: list
    heldout_batches: list
    tasks: Dict[str, Task]
    ev: EvalConfig

    def qa_f1(self, model, pairs: list) -> float:
        from smft_dist.eval.qa import evaluate_qa

        return evaluate_qa(model, self.tokenizer, pairs, self.ev.qa_batch_size, self.ev.max_new_tokens)["f1"] \
            if pairs else 0.0

    def heldout_nll(self, model) -> float:
        from smft_dist.eval.nll import heldout_nll

        return heldout_nll(model, self.heldout_batches)["nll"]

    def evaluate(self, model, task: Task, n_learned: Optional[int] = None) -> dict:
        """known-fact F1, F1 on the QA pairs of the first `n_learned` steps (all if None), held-out NLL."""
        return {"learned_f1": self.qa_f1(model, task.learned_qa(n_learned)), "known_f1": self.qa_f1(model, self.known_qa),
                "heldout_nll": self.heldout_nll(model)}


def fact_order(n: int, order: int, seed: int) -> List[int]:
    """Order 0 is the benchmark's own (comparable with single-order runs); order k > 0 a permutation
    seeded by (benchmark seed, k), so every method and setting sees the same k-th order."""
    perm = list(range(n))
    if order:
        random.Random(f"fact-order-{seed}-{order}").shuffle(perm)
    return perm


def _grouped_batches(folder: Path, batch_size: int, what: str) -> list:
    from smft_dist.data.loader import build_dataloader

    batches = list(build_dataloader(folder, batch_size, shuffle=False, seed=0, rank=0, world_size=1))
    for i, batch in enumerate(batches):  # the protocol: batch i = the texts of item i, nothing else
        if not bool((batch["group"] == i).all()):
            raise RuntimeError(f"{folder}: batch {i} mixes {what}s {batch['group'].unique().tolist()}: "
                               f"benchmark.paraphrases must equal the texts written per {what}")
    return batches


def load_bench(c: ContinualConfig, data: Path) -> Bench:
    from transformers import AutoTokenizer

    from smft_dist.data.loader import build_dataloader
    from smft_dist.eval.qa import load_qa_jsonl

    b = c.benchmark
    tasks = {"facts": Task("facts", _grouped_batches(data / "new_facts", b.paraphrases, "fact"),
                           [[q] for q in load_qa_jsonl(data / "eval" / "new_qa.jsonl")], c.eval.every)}
    if b.n_docs:
        chunks_dir = data.parent / "doc_chunks"
        chunks = [json.loads(line) for line in (chunks_dir / "chunks.jsonl").read_text().splitlines()]
        doc_qa = [json.loads(line) for line in (data / "eval" / "doc_qa.jsonl").read_text().splitlines()]
        qa_per_chunk = [[q for q in doc_qa if q["doc_id"] == ch["doc_id"] and q["statement"] in ch["text"]]
                        for ch in chunks]
        if sorted(q["id"] for qs in qa_per_chunk for q in qs) != sorted(q["id"] for q in doc_qa) or \
                len(chunks) != stream_shape(c, "documents")[0]:
            raise RuntimeError(f"{chunks_dir}: {len(chunks)} chunks do not state each of the {len(doc_qa)} document "
                               f"facts exactly once in {stream_shape(c, 'documents')[0]} paragraphs: "
                               f"documents.chunk_tokens={c.documents.chunk_tokens} must hold one paragraph, not two")
        tasks["documents"] = Task("documents", _grouped_batches(chunks_dir / "train", b.paraphrases, "chunk"),
                                  qa_per_chunk, c.documents.every)
    held = build_dataloader(data / "heldout", c.eval.heldout_batch_size, shuffle=False, seed=0, rank=0,
                            world_size=1, drop_last=False)
    held = [batch for _, batch in zip(range(c.eval.heldout_batches), held)]
    return Bench(AutoTokenizer.from_pretrained(str(data / "tokenizer")), load_qa_jsonl(data / "eval" / "known_qa.jsonl"),
                 held, tasks, c.eval)


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


def run_setting(cfg: RunConfig, ctx, bench: Bench, task: Task, before: dict, desc: str, progress: bool = True) -> dict:
    """Learn the stream in order, one step per item; -> final metrics and the curve."""
    from tqdm import tqdm

    from smft_dist.train.trainer import build_run

    trainer = build_run(cfg, ctx)
    model = trainer.wrapped if trainer.wrapped is not None else trainer.model
    curve = [{"step": 0, **before}]
    n, t0, rows = len(task.batches), time.time(), []
    for step, batch in enumerate(tqdm(task.batches, desc=desc, dynamic_ncols=True, leave=False,
                                      disable=not progress), 1):
        metrics = trainer.train_step(batch)
        rows.append(metrics.get("rows_selected", 0))
        if step % task.every == 0 or step == n:
            curve.append({"step": step, **bench.evaluate(model, task, step)})
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


def evaluate_pretrained(c: ContinualConfig, out: Path, bench: Bench, seed: int) -> dict:
    """Seed `seed`'s pretrained models before finetuning: known-fact F1 and held-out NLL (with the
    memory zeroed too), and each task's F1 before learning (`before[init][task]`: a run's step 0)."""
    from smft_dist.checkpoint.model import load_checkpoint_model

    root = seed_dir(out, seed)
    inits = {"memory": root / "background_index" / "checkpoints"}
    if any(m.init == "dense" for ms in task_methods(c).values() for m in ms):
        inits["dense"] = root / "dense_pretrain" / "checkpoints"
    summary, before = {}, {}
    for init, path in inits.items():
        model, _ = load_checkpoint_model(path)
        base = {"known_f1": bench.qa_f1(model, bench.known_qa), "heldout_nll": bench.heldout_nll(model)}
        before[init] = {name: {**base, "learned_f1": bench.qa_f1(model, t.learned_qa())} for name, t in bench.tasks.items()}
        summary[init] = {**base, **{f"{name}_f1": before[init][name]["learned_f1"] for name in bench.tasks}}
        if init == "memory":
            with memory_zeroed(model):
                summary[init]["known_f1_memory_zeroed"] = bench.qa_f1(model, bench.known_qa)
                summary[init]["heldout_nll_memory_zeroed"] = bench.heldout_nll(model)
        if c.retrofit.enabled and init == "memory":
            summary[init]["mean_abs_gate"] = [p.detach().abs().mean().item() for n, p in model.named_parameters()
                                              if n.endswith("memory_gate")]
        log.info("seed %d, %s model: %s", seed, init, {k: v for k, v in summary[init].items()})
        del model
    return {"summary": summary, "before": before}


# --- the finetuning runs --------------------------------------------------------------------------
@dataclass
class Job:
    """One finetuning run: a setting of a method on a task, from one pretraining seed, in one order."""

    task: str
    method: MethodSweep
    setting_index: int
    seed: int
    order: int
    perm: List[int]
    cfg: RunConfig
    before: dict

    @property
    def desc(self) -> str:
        return (f"{self.task}: {self.method.name} [{self.method.sweep[self.setting_index] if self.method.sweep else 'default'}]"
                f" seed {self.seed} order {self.order}")

    def key(self, out: Path) -> str:
        """What the result depends on (the run folder's path aside, so a copied folder keeps its
        results): a rerun with the same key reuses the stored result."""
        cfg = OmegaConf.to_yaml(OmegaConf.structured(self.cfg)).replace(str(out), "<out>")
        blob = json.dumps([self.task, cfg, self.perm, self.before], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_WORKER: dict = {}


def _init_worker(bench: Bench, dist_cfg, threads: int) -> None:
    from smft_dist.distributed import init_distributed

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _WORKER.update(bench=bench, ctx=init_distributed(dist_cfg))


def _run_job(job: Job, progress: bool = False) -> dict:
    bench = _WORKER["bench"]
    torch.manual_seed(job.cfg.seed)  # the same init (LoRA) and sampling in every order
    return run_setting(job.cfg, _WORKER["ctx"], bench, bench.tasks[job.task].reordered(job.perm), job.before,
                       job.desc, progress)


def run_jobs(c: ContinualConfig, out: Path, bench: Bench, jobs: List[Job]) -> List[dict]:
    """Every job's result, in order: stored ones from OUT/results, the others run (in `workers`
    processes) and stored as they finish."""
    from tqdm import tqdm

    store = out / "results"
    store.mkdir(parents=True, exist_ok=True)
    paths = [store / f"{job.task}.{job.method.name}.{job.setting_index}.seed{job.seed}.order{job.order}.{job.key(out)}.json"
             for job in jobs]
    results = [json.loads(p.read_text()) if p.is_file() else None for p in paths]
    todo = [i for i, r in enumerate(results) if r is None]
    log.info("%d finetuning runs: %d stored in %s, %d to run in %d process(es)", len(jobs), len(jobs) - len(todo),
             store, len(todo), min(c.workers, max(1, len(todo))))

    def done(i: int, result: dict) -> None:
        results[i] = result
        tmp = paths[i].with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, paths[i])

    if c.workers == 1 or len(todo) <= 1:
        _init_worker(bench, c.run.dist, torch.get_num_threads())
        for i in todo:
            done(i, _run_job(jobs[i], progress=sys.stderr.isatty()))
        return results
    threads = max(1, (os.cpu_count() or 1) // c.workers)
    with futures.ProcessPoolExecutor(c.workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_init_worker, initargs=(bench, c.run.dist, threads)) as pool:
        running = {pool.submit(_run_job, jobs[i]): i for i in todo}
        bar = tqdm(total=len(todo), desc="finetuning runs", dynamic_ncols=True, disable=not sys.stderr.isatty())
        for fut in futures.as_completed(running):
            done(running[fut], fut.result())
            bar.update()
        bar.close()
    return results


def run(c: ContinualConfig, out: Path) -> dict:
    from smft_dist.continual.report import aggregate_runs, write_report

    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(c), out / "continual_config.yaml")
    data = prepare_data(c, out)
    times: dict = {}
    for seed in c.pretrain_seeds:
        for k, v in pretrain_and_index(c, out, data, seed).items():
            times[k] = times.get(k, 0.0) + v
    bench = load_bench(c, data)
    pretrained = {seed: evaluate_pretrained(c, out, bench, seed) for seed in c.pretrain_seeds}

    jobs, perms = [], {}
    for task, methods in task_methods(c).items():
        n = len(bench.tasks[task].batches)
        perms[task] = [fact_order(n, k, c.benchmark.seed) for k in range(c.fact_orders)]
        for m in methods:
            if m.ablation and not c.ablations:
                continue
            for i, setting in enumerate(m.sweep or [""]):
                for seed in c.pretrain_seeds:
                    cfg = finetune_config(c, task, m, setting, seed_dir(out, seed))
                    for k, perm in enumerate(perms[task]):
                        jobs.append(Job(task, m, i, seed, k, perm, cfg, pretrained[seed]["before"][m.init][task]))
    t0 = time.time()
    results = run_jobs(c, out, bench, jobs)
    times["finetuning_s"] = time.time() - t0

    tasks: dict = {}
    for task, methods in task_methods(c).items():
        sweeps = {}
        for m in methods:
            if m.ablation and not c.ablations:
                continue
            sweeps[m.name] = {"method": m.method, "init": m.init, "overrides": m.overrides, "ablation": m.ablation,
                              "sweep": []}
            for i, setting in enumerate(m.sweep or [""]):
                runs = [{"seed": j.seed, "order": j.order, **r} for j, r in zip(jobs, results)
                        if j.task == task and j.method.name == m.name and j.setting_index == i]
                sweeps[m.name]["sweep"].append({"setting": setting, **aggregate_runs(runs)})
        tasks[task] = {"steps": stream_shape(c, task)[0], "permutations": perms[task], "sweeps": sweeps}
    report = {"config": OmegaConf.to_container(OmegaConf.structured(c)),
              "pretrained": {str(s): p["summary"] for s, p in pretrained.items()}, "tasks": tasks,
              "times": {**times, "total_s": time.time() - t_start}}
    if c.retrofit.native_report:  # the natively pretrained memory model's run, to compare with
        native = json.loads(Path(c.retrofit.native_report).read_text())
        report["native"] = {"path": c.retrofit.native_report, "pretrained": native["pretrained"],
                            "methods": native["tasks"]["facts"]["methods"]}
    write_report(out, report, c.reference_method, c.target_method)
    return report


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Continual-learning benchmark: sparse memory vs full vs LoRA finetuning")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="run folder (reused: data, pretraining, df index and finished runs)")
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
