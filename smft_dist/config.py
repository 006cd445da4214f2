"""Run configuration: one dataclass per component, composed into `RunConfig`.

Loading follows Meta Lingua: ``structured(RunConfig) <- yaml files <- dotlist overrides``.
OmegaConf's merge rejects unknown keys and wrong types; we re-raise its error naming the key and
the file it came from. Cross-field checks live in `validate()` and name the key and the fix.

A YAML file may start with ``base: [other.yaml, ...]`` (paths relative to the file): those are
merged first, so a run config can reuse ``configs/model/tiny.yaml``.

omegaconf is imported only where YAML is read or written: the dataclasses, `validate()` and
everything built from a `RunConfig` work without it (benchmarks/gpu_check.py builds one directly).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from smft_dist.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key (and file) and how to fix it."""


@dataclass
class ModelConfig:
    """Llama-style decoder with product-key memory layers in place of some FFNs."""

    init_from: Optional[str] = None  # HF folder (or checkpoint dir) to start from
    tokenizer: Optional[str] = None  # HF tokenizer folder; None: the run's data folder
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None  # HF rope_parameters besides rope_theta, e.g. {rope_type: llama3, ...}
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = 0
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2  # an id or a list of ids (Llama 3)
    memory_layers: List[int] = field(default_factory=lambda: [2])
    memory_n_keys: int = 128  # slots = n_keys ** 2
    memory_heads: int = 4
    memory_knn: int = 16
    memory_k_dim: int = 64
    memory_value_dim: int = 128
    memory_swilu: bool = True
    memory_qk_norm: bool = False
    memory_value_dtype: str = "float32"  # float32 | bfloat16
    memory_mode: str = "replace"  # replace (the FFN) | add (beside the FFN, zero-init gate: smft-retrofit)
    activation_checkpointing: bool = False  # recompute decoder blocks in backward (not the memory blocks)
    # where the memory shard and its optimizer row state live: none (the device) | host (host
    # memory, pinned where CUDA exists; each lookup copies in only the rows it reads: docs/offload.md)
    memory_offload: str = "none"


@dataclass
class DataConfig:
    train: Optional[str] = None  # MDS folder (local path or remote URI)
    background: Optional[str] = None  # MDS folder for the df index (default: train)
    local_cache: Optional[str] = None  # where remote shards are cached
    seq_len: int = 64
    batch_size: int = 8  # per rank
    shuffle: bool = True
    seed: int = 0
    num_workers: int = 0
    # finetune on an unshuffled grouped set (a fact's paraphrases): refuse to start unless
    # batch_size x world x optim.grad_accum equals the group size (false: batches may split facts)
    one_group_per_batch: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-3  # dense weights (AdamW) or LoRA weights
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    grad_clip: float = 1.0
    memory_lr: float = 1e-3  # memory values: row-sparse AdamW (pretrain/full) or MaskedSGD lr
    # per_token: memory_lr applies to the gradient of the loss summed over the global batch's label
    # tokens, the units of the paper's SGD lr 2-5: an lr does not shrink with batch x sequence length;
    # mean: of the loss averaged over them (as for the dense weights), lr x label tokens for the same
    # SGD step, under which lr 2 moves a 64 x 64-token batch's rows by ~1e-4 of their norm (docs/design.md §5.2)
    memory_lr_scale: str = "per_token"
    train_dense: bool = True  # pretrain/full: False trains only the memory layers (and add-mode gates)
    memory_optimizer: str = "sgd"  # sparse-memory finetuning: sgd | adamw (ablation)
    # memory values trained densely (pretrain, method=full): adamw (2 fp32 moments per value) |
    # rowwise_adagrad (1 fp32 per row) | adam_rowwise (per-row second moment; per-value momentum
    # unless memory_row_momentum is false). Sparse memory finetuning refuses a non-default value.
    memory_row_optimizer: str = "adamw"
    memory_row_momentum: bool = True  # adam_rowwise only: keep its per-value first moment
    # bf16 memory values trained densely: no fp32 master rows; each updated row is written back by
    # stochastic rounding seeded by the run's seed (docs/configuration.md, optim/rounding.py)
    memory_stochastic_rounding: bool = False
    momentum: float = 0.0
    max_nonfinite_steps: int = 3  # stop after this many non-finite losses in a row
    grad_accum: int = 1  # micro-batches per optimizer step (the global batch is batch_size x world x grad_accum)


@dataclass
class SelectionConfig:
    # rows one step trains: an int, or auto: per step, the fewest top-ranked rows that hold auto_mass of
    # the step's total score mass, at most top_t_max (docs/design.md §1.2)
    top_t: Union[int, str] = 500
    auto_mass: float = 0.5  # top_t=auto only
    top_t_max: Optional[int] = None  # top_t=auto only, and required there: it bounds the rows a step trains
    mode: str = "tfidf"  # tfidf | tf | all (every touched row: an ablation)
    background_batches: int = 1000
    df_path: Optional[str] = None  # background df index (default: from the checkpoint)

    @property
    def max_rows(self) -> int:
        """The most rows one step selects (mode tfidf or tf): top_t, or top_t_max under auto."""
        return self.top_t_max if self.top_t == "auto" else self.top_t


@dataclass
class LoraSettings:
    r: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    targets: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class DistConfig:
    engine: str = "none"  # none | deepspeed | fsdp2
    zero_stage: int = 0
    deepspeed_config: Optional[str] = None  # a user DeepSpeed JSON merged over ours
    mp: int = 0  # memory-parallel group size; 0 = the whole world
    dp_replicate: int = 1
    backend: str = "auto"  # auto | nccl | gloo
    device: str = "auto"  # auto | cpu | cuda
    timeout_s: float = 300.0
    # how a sharded memory lookup crosses ranks (docs/memory_exchange.md): pooled partial sums,
    # unique rows, or auto (per step, whichever its shape-based byte estimate says moves less)
    memory_exchange: str = "auto"  # auto | pooled | rows


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <out_dir>/checkpoints
    every: int = 0  # 0: only at the end
    resume: str = "auto"  # auto | none | <path>
    keep: int = 2
    fallback: bool = False  # resume=auto: when the latest step is damaged, resume from the newest intact one
    # resume a checkpoint whose run was trained under different training keys (train.loop.TRAINING_SECTIONS)
    allow_config_change: bool = False
    # start from weights (model.init_from) trained on data of another tokenizer than data.train's
    # (their tokenizer fingerprints differ): only where the new tokenizer keeps every id the weights
    # learned, e.g. tokens appended to the old vocabulary (docs/data.md "Tokenizer identity")
    allow_tokenizer_change: bool = False


@dataclass
class LedgerConfig:
    """The knowledge-patch ledger of sparse memory finetuning (smft_dist.patch): every step's
    selected rows, before and after, per rank under `dir` (default <out_dir>/ledger)."""

    enabled: bool = True
    dir: Optional[str] = None
    # when records are made durable (docs/patches.md): "checkpoint" = before each checkpoint and at the
    # end of the run; "step" = also each record as the background writer appends it
    fsync: str = "checkpoint"  # checkpoint | step


@dataclass
class EvalConfig:
    """Evaluation inside the run (smft_dist.train.evaluation): before the first step, every
    `every` steps and at the end; 0 turns it off."""
    every: int = 0
    qa: List[str] = field(default_factory=list)  # QA JSONL files (any layout load_qa_jsonl reads)
    nll: Optional[str] = None  # MDS folder for held-out NLL
    nll_batches: Optional[int] = None  # at most this many batches per rank (None: the whole folder)
    batch_size: int = 32
    max_new_tokens: int = 16


@dataclass
class LoggingConfig:
    every: int = 1
    tensorboard: bool = False
    progress: bool = True  # tqdm bar on a terminal; a log line every progress_every_s otherwise
    progress_every_s: float = 30.0


@dataclass
class RunConfig:
    name: str = "run"
    mode: str = "pretrain"  # pretrain | background_index | finetune
    method: str = "sparse_memory"  # full | lora | sparse_memory
    seed: int = 0
    steps: int = 100
    out_dir: str = "runs/run"
    precision: str = "fp32"  # fp32 | bf16 (autocast forward; FSDP2/DeepSpeed bf16 dense weights)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


_CHOICES = {
    "mode": ("pretrain", "background_index", "finetune"),
    "method": ("full", "lora", "sparse_memory"),
    "selection.mode": ("tfidf", "tf", "all"),
    "optim.schedule": ("constant", "cosine"),
    "optim.memory_optimizer": ("sgd", "adamw"),
    "optim.memory_row_optimizer": ("adamw", "rowwise_adagrad", "adam_rowwise"),
    "optim.memory_lr_scale": ("mean", "per_token"),
    "dist.engine": ("none", "deepspeed", "fsdp2"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "dist.device": ("auto", "cpu", "cuda"),
    "ledger.fsync": ("checkpoint", "step"),
    "dist.memory_exchange": ("auto", "pooled", "rows"),
    "model.memory_value_dtype": ("float32", "bfloat16"),
    "model.memory_offload": ("none", "host"),
    "model.memory_mode": ("replace", "add"),
    "precision": ("fp32", "bf16"),
}


def _load_yaml(path: Path, seen: tuple = ()) -> Any:
    """Load one YAML file, merging its ``base:`` files first. Returns a plain DictConfig."""
    from omegaconf import OmegaConf

    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: check the --config path")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' includes itself in a cycle: {' -> '.join(map(str, seen))}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not OmegaConf.is_dict(node) or not node:  # an empty file loads as {}, a list or a scalar as such
        raise ConfigError(f"{path}: holds no config (an empty file, or not a mapping of keys): pass a run config "
                          f"YAML such as configs/tiny/pretrain.yaml")
    bases = node.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create({})
    for b in bases:
        merged = _merge_into(merged, _load_yaml(path.parent / str(b), seen + (path.resolve(),)), str(path))
    return _merge_into(merged, node, str(path))


def _merge_into(schema, node, source: str, schema_name: str = "smft_dist.config.RunConfig"):
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(schema, node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(
            f"{source}: bad config key '{key}': {msg}. "
            f"Valid keys are the fields of {schema_name} (see docs/configuration.md)."
        ) from None


def load_config(path: Optional[str | os.PathLike | List[str | os.PathLike]] = None,
                overrides: Optional[List[str]] = None) -> RunConfig:
    """Build a validated `RunConfig` from YAML files (merged in order: a later file's keys win)
    and ``key=value`` overrides."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(RunConfig)
    for one in [path] if isinstance(path, (str, os.PathLike)) else path or []:
        cfg = _merge_into(cfg, _load_yaml(Path(one)), str(one))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value (e.g. optim.lr=2)")
        cfg = _merge_into(cfg, _lists_from_bare_values(cfg, OmegaConf.from_dotlist(list(overrides))),
                          "command-line override")
    run: RunConfig = OmegaConf.to_object(cfg)
    validate(run)
    return run


def _lists_from_bare_values(schema, node):
    """Overrides of list keys without brackets: `eval.qa=a.jsonl` means [a.jsonl], `eval.qa=` the
    empty list; any other bare value (`model.memory_layers=2`) fails saying how to write a list."""
    from omegaconf import OmegaConf

    def leaves(n, prefix=""):
        for k, v in n.items():
            yield from leaves(v, f"{prefix}{k}.") if OmegaConf.is_dict(v) else [(f"{prefix}{k}", v)]

    for key, value in list(leaves(node)):
        if not OmegaConf.is_list(OmegaConf.select(schema, key, default=None)) or OmegaConf.is_list(value):
            continue
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"command-line override {key}={value}: {key} is a list: write {key}=[{value}] "
                              f"(several values: {key}=[a,b])")
        OmegaConf.update(node, key, [value] if value else [], merge=False)
    return node


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.structured(cfg), path)


def _get(cfg: RunConfig, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def memory_trains_densely(cfg: RunConfig) -> bool:
    """Whether every memory row a batch touches trains (pretraining, full finetuning), as opposed to
    the selected rows of sparse memory finetuning or none (LoRA, the df pass)."""
    return cfg.mode == "pretrain" or (cfg.mode == "finetune" and cfg.method == "full")


def _validate_top_t(sel: SelectionConfig) -> None:
    """selection.top_t is an int >= 1, or auto with its share in (0, 1] and its cap; the auto keys
    are refused beside an int t (they would do nothing)."""
    if sel.top_t != "auto":
        if isinstance(sel.top_t, str) or sel.top_t < 1:
            raise ConfigError(f"selection.top_t={sel.top_t!r} must be an integer >= 1 or auto")
        for key, value, default in (("auto_mass", sel.auto_mass, 0.5), ("top_t_max", sel.top_t_max, None)):
            if value != default:
                raise ConfigError(f"selection.{key}={value} applies to selection.top_t=auto only, not "
                                  f"selection.top_t={sel.top_t}: remove it, or set selection.top_t=auto")
        return
    if sel.mode == "all":
        raise ConfigError("selection.top_t=auto picks a number of top-scored rows, but selection.mode=all selects "
                          "every touched row: use selection.mode=tfidf (or tf), or a fixed selection.top_t")
    if sel.top_t_max is None or sel.top_t_max < 1:
        raise ConfigError(f"selection.top_t=auto needs selection.top_t_max >= 1 (got {sel.top_t_max}), the most rows "
                          "one step may train: it bounds the step's row gradients and the optimizer's row state "
                          "(e.g. selection.top_t_max=500, the paper's fixed t for facts)")
    if not 0 < sel.auto_mass <= 1:
        raise ConfigError(f"selection.auto_mass={sel.auto_mass} must be in (0, 1]: the share of the step's score "
                          "mass the selected rows must hold (0.5: the fewest rows holding half of it)")


def validate(cfg: RunConfig, world_size: Optional[int] = None) -> None:
    """Cross-field checks; each error names the key and the fix. `world_size` adds the
    parallel-size arithmetic, done at start-up once the world is known."""
    if cfg.precision == "fp16":
        raise ConfigError("precision=fp16 is not supported: fp16 needs a loss scale, and the memory rows' "
                          "row-sparse gradients bypass the engines' unscaling (they would be applied scaled); "
                          "use precision=bf16")
    for key, choices in _CHOICES.items():
        v = _get(cfg, key)
        if v not in choices:
            raise ConfigError(f"{key}={v!r} is not one of {list(choices)}")
    m = cfg.model
    if m.memory_n_keys < 1:
        raise ConfigError(f"model.memory_n_keys={m.memory_n_keys} must be >= 1 (slots = n_keys^2)")
    if not 1 <= m.memory_knn <= m.memory_n_keys:
        raise ConfigError(
            f"model.memory_knn={m.memory_knn} must be in [1, memory_n_keys={m.memory_n_keys}]: "
            "top-k per half cannot exceed the number of sub-keys"
        )
    if m.memory_k_dim % 2:
        raise ConfigError(f"model.memory_k_dim={m.memory_k_dim} must be even (it is split into two halves)")
    for name in ("memory_heads", "memory_value_dim", "memory_k_dim", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if getattr(m, name) < 1:
            raise ConfigError(f"model.{name}={getattr(m, name)} must be >= 1")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}"
        )
    kv = m.num_key_value_heads
    if kv is not None and (kv < 1 or m.num_attention_heads % kv):
        raise ConfigError(f"model.num_key_value_heads={kv} must be >= 1 and divide "
                          f"model.num_attention_heads={m.num_attention_heads} (or be null: = num_attention_heads)")
    for i in m.memory_layers:
        if not 0 <= i < m.num_hidden_layers:
            raise ConfigError(
                f"model.memory_layers contains {i}, outside [0, {m.num_hidden_layers}) "
                f"(model.num_hidden_layers={m.num_hidden_layers})"
            )
    if len(set(m.memory_layers)) != len(m.memory_layers):
        raise ConfigError(f"model.memory_layers={m.memory_layers} has duplicates")
    for key in ("data.seq_len", "data.batch_size", "steps", "selection.background_batches",
                "optim.max_nonfinite_steps", "optim.grad_accum", "logging.every"):
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 1")
    for key in ("data.num_workers", "checkpoint.every", "checkpoint.keep", "optim.warmup_steps",
                "logging.progress_every_s"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 0")
    _validate_top_t(cfg.selection)
    if cfg.data.seq_len > m.max_position_embeddings:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_position_embeddings="
                          f"{m.max_position_embeddings}: shorten the sequences or raise the limit")
    if not (cfg.dist.timeout_s > 0 and math.isfinite(cfg.dist.timeout_s)):
        raise ConfigError(f"dist.timeout_s={cfg.dist.timeout_s} must be finite and > 0 (seconds a collective may "
                          "wait for a peer before the run fails)")
    if not (cfg.optim.lr > 0 and cfg.optim.memory_lr > 0 and math.isfinite(cfg.optim.lr)):
        raise ConfigError("optim.lr and optim.memory_lr must be finite and > 0")
    o = cfg.optim
    trains_densely = memory_trains_densely(cfg)
    if o.memory_row_optimizer != "adamw" and not trains_densely:
        raise ConfigError(f"optim.memory_row_optimizer={o.memory_row_optimizer} applies where the memory values train "
                          f"densely (mode=pretrain, or mode=finetune with method=full), not mode={cfg.mode} "
                          f"method={cfg.method}: remove it (sparse memory finetuning's optimizer is "
                          f"optim.memory_optimizer)")
    if not o.memory_row_momentum and o.memory_row_optimizer != "adam_rowwise":
        raise ConfigError(f"optim.memory_row_momentum=false applies to optim.memory_row_optimizer=adam_rowwise only, "
                          f"not {o.memory_row_optimizer}: remove it, or set optim.memory_row_optimizer=adam_rowwise")
    if o.memory_stochastic_rounding and not (trains_densely and m.memory_value_dtype == "bfloat16"):
        raise ConfigError(f"optim.memory_stochastic_rounding=true applies where bf16 memory values train densely "
                          f"(model.memory_value_dtype=bfloat16 with mode=pretrain, or mode=finetune method=full), not "
                          f"mode={cfg.mode} method={cfg.method} model.memory_value_dtype={m.memory_value_dtype}: "
                          f"remove it (sparse memory finetuning keeps its deterministic fp32 master rows)")
    d = cfg.dist
    if d.dp_replicate < 1 or d.mp < 0:
        raise ConfigError(f"dist.dp_replicate={d.dp_replicate} must be >= 1 and dist.mp={d.mp} >= 0")
    if d.engine == "deepspeed" and d.zero_stage not in (0, 1, 2):
        raise ConfigError(
            f"dist.zero_stage={d.zero_stage}: only ZeRO 0/1/2 are supported (stage 3 would gather the memory table)"
        )
    # Runs whose dense weights train hand them to DeepSpeed (sparse memory finetuning runs the plain engine).
    deepspeed_trains = d.engine == "deepspeed" and (cfg.mode == "pretrain" or
                                                    (cfg.mode == "finetune" and cfg.method != "sparse_memory"))
    if deepspeed_trains and d.zero_stage == 0 and cfg.precision == "bf16":
        raise ConfigError(
            "dist.engine=deepspeed with dist.zero_stage=0 and precision=bf16 is not supported (on any device): "
            "DeepSpeed wraps the optimizer in its FP16_UnfusedOptimizer there, which takes one AdamW step with zero "
            "gradients at start-up (every later update gets the wrong bias correction, the first is ~0.7x, and "
            "weight decay is applied once before training): use dist.zero_stage=1 or 2, or precision=fp32")
    slots = m.memory_n_keys**2
    if world_size is not None:
        mp = d.mp or world_size // d.dp_replicate
        if d.dp_replicate * mp != world_size:
            raise ConfigError(
                f"dist.dp_replicate {d.dp_replicate} x dist.mp {mp} = {d.dp_replicate * mp} != world size "
                f"{world_size}: set dist.mp=0 (derive it) or sizes whose product is the world size"
            )
        if mp > slots:
            raise ConfigError(
                f"dist.mp={mp} exceeds the slot count {slots} (model.memory_n_keys^2): "
                "use fewer memory-parallel ranks or more slots"
            )


def data_source(cfg: RunConfig) -> tuple[str, Optional[str]]:
    """-> (key, path) of the data the run's mode reads."""
    if cfg.mode == "background_index" and cfg.data.background:
        return "data.background", cfg.data.background
    return "data.train", cfg.data.train


def check_paths(cfg: RunConfig) -> None:
    """Fail at start-up, before any process group work, on a path the run needs that is missing;
    the error names the key. Remote URIs (``s3://...``) are left to the loader."""
    key, data = data_source(cfg)
    if not data:
        raise ConfigError(f"mode={cfg.mode} needs data: set {key} (an MDS folder, written by `smft-data`)")
    checks = [(key, data, "index.json", "an MDS folder written by `smft-data` (synthetic or convert)")]
    for k in ("model.init_from", "selection.df_path", "dist.deepspeed_config", "model.tokenizer"):
        checks.append((k, _get(cfg, k), None, "fix the path or unset the key"))
    checks += [(f"eval.qa[{i}]", f, None, "fix the path or drop it from eval.qa") for i, f in enumerate(cfg.eval.qa)]
    if cfg.eval.nll:
        checks.append(("eval.nll", cfg.eval.nll, "index.json", "an MDS folder (held-out data)"))
    if cfg.checkpoint.resume not in ("auto", "none"):
        checks.append(("checkpoint.resume", cfg.checkpoint.resume, None, "use auto, none or an existing checkpoint"))
    for k, path, must_hold, fix in checks:
        if not path or "://" in str(path):
            continue
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{k}={path} does not exist: {fix}")
        if must_hold and not (p / must_hold).is_file():
            raise ConfigError(f"{k}={path} has no {must_hold}: expected {fix}")
        if must_hold == "index.json":
            check_mds_folder(k, p)
        if k == key:
            _check_written_data(cfg, key, p)


def _check_written_data(cfg: RunConfig, key: str, folder: Path) -> None:
    """data.seq_len is the sample length the data was written at, and every token id the data may
    hold (below the vocab_size it was written for) is below model.vocab_size, where `smft-data`
    recorded them (`smft_data.json` beside index.json)."""
    try:
        info = json.loads((folder / "smft_data.json").read_text())
    except (OSError, ValueError):
        return
    vocab = info.get("vocab_size")
    if vocab is not None and vocab > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but {key}={folder} was written for a vocabulary "
                          f"of {vocab} tokens (its smft_data.json; tokenizer {info.get('tokenizer')}): set "
                          f"model.vocab_size={vocab} (or more), or rewrite the data with the model's tokenizer")
    written = info.get("seq_len")
    if written is not None and written != cfg.data.seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} but {key}={folder} holds samples of {written} tokens "
                          f"(its smft_data.json): set data.seq_len={written}, or rewrite the data with "
                          f"smft-data --seq-len {cfg.data.seq_len}")


def check_mds_folder(key: str, folder: Path) -> int:
    """-> the samples of the local MDS folder `folder` (`key` names it in errors), checked without
    reading a sample: index.json parses and lists shards; each shard exists with the byte size
    index.json records and a header that counts its samples and whose last offset is its size
    (a few bytes read per shard, so a truncated, emptied, overwritten or replaced shard fails here,
    before a run writes anything); smft_data.json, where present, is what `smft-data` writes."""
    from smft_dist.errors import reason

    fix = "write the folder again with `smft-data` (or restore it)"
    index = folder / "index.json"
    try:
        shards = json.loads(index.read_text())["shards"]
        listed = [(s["raw_data"]["basename"], int(s["raw_data"]["bytes"]), int(s["samples"]), s.get("zip_data"))
                  for s in shards]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{key}={folder}: {index} is not a readable MDS index ({reason(e)}): {fix}") from None
    if sum(n for _, _, n, _ in listed) == 0:
        raise ConfigError(f"{key}={folder} holds no samples: check what wrote it")
    for name, size, samples, zipped in listed:
        shard = folder / name
        if not shard.is_file():
            if zipped and (folder / zipped["basename"]).is_file():
                continue  # compressed: streaming unpacks it when first read
            raise ConfigError(f"{key}={folder}: shard {shard} is missing: {fix}")
        with open(shard, "rb") as f:  # MDS shard: uint32 sample count, then its n + 1 uint32 offsets
            count = int.from_bytes(f.read(4), "little")
            f.seek(4 + 4 * count)
            end = int.from_bytes(f.read(4), "little")
        have = shard.stat().st_size
        if have != size or count != samples or end != have:
            raise ConfigError(f"{key}={folder}: shard {shard} is damaged (it has {have} bytes and a header of {count} "
                              f"samples ending at byte {end}; index.json lists {size} bytes, {samples} samples): {fix}")
    info = folder / "smft_data.json"
    if info.is_file():
        try:
            written = json.loads(info.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}={folder}: {info} is unreadable ({reason(e)}): {fix}") from None
        if not isinstance(written, dict) or "seq_len" not in written:
            raise ConfigError(f"{key}={folder}: {info} is not what `smft-data` writes (no seq_len): {fix}")
    return sum(n for _, _, n, _ in listed)


def mds_samples(index: Path) -> Optional[int]:
    """Samples listed in an MDS index.json (None if unreadable: the loader then says why)."""
    try:
        return sum(int(s.get("samples", 0)) for s in json.loads(index.read_text()).get("shards", []))
    except (ValueError, OSError, AttributeError):
        return None
