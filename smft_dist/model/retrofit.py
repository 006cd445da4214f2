"""`smft-retrofit`: turn a dense Llama-architecture Hugging Face model into an `SmftForCausalLM`.

    smft-retrofit --model HF_DIR --layers 12 --n-keys 1024 --mode add --out DIR

Every weight outside the new memory layers is copied exactly (same dtype, same values). In add
mode the FFN at each memory layer is kept and the memory's output is gated by a zero-initialised
gate, so the new model's logits equal the dense model's bitwise until training moves the gate; in
replace mode (the paper's architecture) that FFN is dropped and the model needs continued
pretraining to recover. The memory (keys, queries, W1/W2, values) is freshly initialised from
`seed`. DIR also gets the tokenizer and `model.yaml`, the run config's `model:` section for
training it (`launchers/train.py --config DIR/model.yaml --config configs/retrofit/continue_pretrain.yaml`).
An existing DIR is refused unless `--overwrite` (then the new folder replaces it once complete).

A model this package cannot represent exactly is refused with an error naming the field.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, LlamaForCausalLM

from smft_dist.data.tokenizer import TOKENIZER_FILES, open_tokenizer
from smft_dist.errors import READ_ERRORS, UserError, console_script, reason
from smft_dist.io import atomic_dir
from smft_dist.model.configuration import MEMORY_MODES, SmftConfig
from smft_dist.model.modeling import SmftForCausalLM
from smft_dist.model.standalone import write_remote_code


class RetrofitError(UserError, ValueError):
    """The source model cannot be represented; the message names the field and what differs."""


# LlamaConfig fields with the value SmftForCausalLM supports (anything else changes the computation).
_REQUIRED = {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1, "attention_dropout": 0.0}
# Fields of other architectures' configs that have no Llama counterpart: set, they change the model.
_FOREIGN = ("sliding_window", "use_sliding_window", "layer_types", "qk_norm", "attn_logit_softcapping",
            "final_logit_softcapping", "query_pre_attn_scalar", "partial_rotary_factor")


def check_representable(config) -> None:
    """Raise `RetrofitError` naming the first field of a HF config that `SmftForCausalLM` (a
    Llama) cannot reproduce."""
    d = config.to_dict()
    for key, ok in _REQUIRED.items():
        if key in d and d[key] not in (ok, None):
            raise RetrofitError(f"{key}={d[key]!r} is not supported (smft models use {key}={ok!r}): this model's "
                                "weights or computation have no place in a Llama decoder")
    for key in _FOREIGN:
        if d.get(key) not in (None, False):
            if key == "layer_types" and set(d[key]) <= {"full_attention"}:
                continue
            raise RetrofitError(f"{key}={d[key]!r} is not supported: smft models are Llama decoders with full "
                                "causal attention in every layer and no extra normalisation or soft-capping")
    if d.get("model_type") != "llama":
        raise RetrofitError(f"model_type={d.get('model_type')!r}: smft-retrofit converts Llama-architecture models "
                            "(model_type 'llama', loaded by LlamaForCausalLM: Llama 2/3, TinyLlama, SmolLM, ...)")
    rope = d.get("rope_parameters") or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise RetrofitError(f"rope_parameters={rope!r}: per-layer-type rope parameters are not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = rope.get("rope_type", "default")
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise RetrofitError(f"rope_parameters.rope_type={rope_type!r} is not one of "
                            f"{['default', *ROPE_INIT_FUNCTIONS]}")


def _check_ties(dense: LlamaForCausalLM, model_dir: Path) -> None:
    """tie_word_embeddings=true with a stored lm_head that differs from the embeddings (or false
    while the folder stores no lm_head) loads as a different model than the one saved."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    stored = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            if "lm_head.weight" in fh.keys():
                stored["lm_head.weight"] = fh.get_tensor("lm_head.weight")
    tie = dense.config.tie_word_embeddings
    emb = dense.model.embed_tokens.weight
    if tie and "lm_head.weight" in stored and not torch.equal(stored["lm_head.weight"].to(emb.dtype), emb):
        raise RetrofitError("tie_word_embeddings=True but the folder stores an lm_head.weight that differs from "
                            "model.embed_tokens.weight: the saved model is untied; fix tie_word_embeddings")
    if not tie and files and "lm_head.weight" not in stored:
        raise RetrofitError("tie_word_embeddings=False but the folder stores no lm_head.weight: the model is tied; "
                            "fix tie_word_embeddings")


def load_dense(model_dir: str | Path) -> LlamaForCausalLM:
    """The source model, checked: representable, every stored weight used, none missing."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json (expected a Hugging Face model folder)")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except READ_ERRORS as e:  # a damaged config.json
        raise RetrofitError(f"--model {model_dir}: config.json is unreadable ({reason(e)}): the folder is damaged; "
                            f"save the model again") from None
    if config.model_type == SmftConfig.model_type:
        raise RetrofitError(f"{model_dir} is already an smft model (model_type='smft'): nothing to retrofit")
    check_representable(config)
    try:
        dense, info = LlamaForCausalLM.from_pretrained(model_dir, dtype="auto", output_loading_info=True)
    except (*READ_ERRORS, SafetensorError) as e:  # damaged weight files, or weights of other shapes
        raise RetrofitError(f"--model {model_dir}: its weights do not load ({reason(e)}): a weight file is damaged "
                            f"or another model's; save the model again") from None
    unexpected = sorted(info.get("unexpected_keys") or [])
    missing = sorted(k for k in info.get("missing_keys") or [] if k != "lm_head.weight" or not config.tie_word_embeddings)
    if unexpected or missing:
        raise RetrofitError(f"{model_dir} holds weights a Llama decoder does not (unexpected {unexpected[:4]}) or "
                            f"lacks some (missing {missing[:4]}): e.g. projection biases; this architecture cannot "
                            "be represented")
    _check_ties(dense, model_dir)
    return dense


def check_memory_arguments(num_layers: int, layers: Sequence[int], **sizes: int) -> None:
    """The memory's shape, as smft-retrofit's options name it: layers within the model, no layer
    twice, every size >= 1, an even k_dim (split into two halves), knn <= n_keys (a head picks knn
    of the n_keys sub-keys of each half)."""
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise RetrofitError(f"--layers {','.join(map(str, layers))}: the model has decoder layers 0..{num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise RetrofitError(f"--layers {','.join(map(str, layers))} names a layer twice")
    for name, value in sizes.items():
        if value < 1:
            raise RetrofitError(f"--{name.replace('_', '-')} {value} must be >= 1")
    if sizes["k_dim"] % 2:
        raise RetrofitError(f"--k-dim {sizes['k_dim']} must be even (product keys split it into two halves)")
    if sizes["knn"] > sizes["n_keys"]:
        raise RetrofitError(f"--knn {sizes['knn']} > --n-keys {sizes['n_keys']}: a head picks knn of the n_keys "
                            f"sub-keys of each half")


def retrofit_model(dense: LlamaForCausalLM, layers: Sequence[int], *, mode: str = "add", n_keys: int = 1024,
                   heads: int = 4, knn: int = 32, k_dim: int = 512, value_dim: int = 1024, swilu: bool = True,
                   qk_norm: bool = False, value_dtype: str = "float32", seed: int = 0) -> SmftForCausalLM:
    """An `SmftForCausalLM` holding `dense`'s weights, with fresh memories at `layers`."""
    if mode not in MEMORY_MODES:
        raise RetrofitError(f"--mode {mode!r} is not one of {list(MEMORY_MODES)}")
    check_memory_arguments(dense.config.num_hidden_layers, layers, n_keys=n_keys, heads=heads, knn=knn,
                           k_dim=k_dim, value_dim=value_dim)
    check_representable(dense.config)
    src = {k: v for k, v in dense.config.to_dict().items()
           if k not in ("model_type", "architectures", "transformers_version", "auto_map", "dtype")}
    config = SmftConfig(**src, memory_layers=list(layers), memory_n_keys=n_keys, memory_heads=heads,
                        memory_knn=knn, memory_k_dim=k_dim, memory_value_dim=value_dim, memory_swilu=swilu,
                        memory_qk_norm=qk_norm, memory_value_dtype=value_dtype, memory_mode=mode)
    torch.manual_seed(seed)  # the memory's queries, keys, W1/W2 (everything else is overwritten below)
    model = SmftForCausalLM(config)
    for i, layer in enumerate(model.memory_layers()):
        layer.values.reset_parameters(torch.Generator().manual_seed(seed + i))  # as build_fresh_model draws
    value_dtypes = {id(layer.values.weight): layer.values.weight.dtype for layer in model.memory_layers()}
    dense_dtype = next(dense.parameters()).dtype
    for p in model.parameters():  # the dense dtype for everything but the value tables (memory_value_dtype)
        p.data = p.data.to(value_dtypes.get(id(p), dense_dtype))
    source = dense.state_dict()
    dropped = {f"model.layers.{i}.mlp." for i in layers} if mode == "replace" else set()
    own = model.state_dict()
    with torch.no_grad():
        for k, v in source.items():
            if any(k.startswith(d) for d in dropped):
                continue
            if k not in own or own[k].shape != v.shape:
                raise RetrofitError(f"weight {k} {tuple(v.shape)} has no counterpart in the smft model")
            own[k].copy_(v)
    memory = {f"model.layers.{i}.mlp." + ("memory." if mode == "add" else "") for i in layers}
    not_copied = [k for k in own if k not in source and not any(k.startswith(m) for m in memory)
                  and not k.endswith(".memory_gate")]
    if not_copied:
        raise RetrofitError(f"weights {not_copied[:4]} of the smft model have no source weight")
    return model


def write_model_section(model: SmftForCausalLM, folder: Path, out: Path) -> Path:
    """`folder/model.yaml`: the run config's `model:` section for the model folder `out`
    (init_from = out, absolute: a run may start from any folder; `folder` is where it is written
    before it becomes `out`)."""
    from omegaconf import OmegaConf

    section = {"init_from": str(Path(out).resolve()), **model.config.to_model_section()}
    path = folder / "model.yaml"
    OmegaConf.save(OmegaConf.create({"model": section}), path)
    return path


def retrofit(model_dir: str | Path, out: str | Path, layers: Sequence[int], *, tokenizer: Optional[str] = None,
             overwrite: bool = False, **memory) -> Path:
    """Convert the HF folder `model_dir` into an smft folder `out`, written atomically; an existing
    `out` is refused unless `overwrite` (smft_dist.io.atomic_dir). `memory`: the keyword arguments
    of `retrofit_model`. -> out"""
    model_dir, out = Path(model_dir), Path(out)
    with atomic_dir(out, overwrite) as tmp:
        model = retrofit_model(load_dense(model_dir), layers, **memory)
        model.save_pretrained(tmp)
        tok_dir = Path(tokenizer) if tokenizer else model_dir
        if any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
            open_tokenizer(tok_dir).save_pretrained(tmp)
        elif tokenizer:
            raise FileNotFoundError(f"--tokenizer {tok_dir}: no tokenizer files")
        write_remote_code(tmp)
        write_model_section(model, tmp, out)
    return out


@console_script
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Hugging Face folder LlamaForCausalLM loads")
    p.add_argument("--out", required=True, help="the smft folder to write (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (the old folder stays "
                   "until the new one is complete)")
    p.add_argument("--layers", required=True, type=lambda s: [int(x) for x in s.split(",")],
                   help="comma-separated decoder layers that get a memory, e.g. 12 or 4,12,20")
    p.add_argument("--mode", choices=MEMORY_MODES, default="add",
                   help="add: memory beside the FFN, zero-init gate, logits unchanged (default); replace: drop the FFN")
    p.add_argument("--n-keys", type=int, default=1024, help="sub-keys per half (slots = n_keys^2)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--knn", type=int, default=32)
    p.add_argument("--k-dim", type=int, default=512)
    p.add_argument("--value-dim", type=int, default=1024)
    p.add_argument("--no-swilu", dest="swilu", action="store_false")
    p.add_argument("--qk-norm", action="store_true")
    p.add_argument("--value-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0, help="seed of the new memory's initialisation")
    p.add_argument("--tokenizer", help="tokenizer folder to copy in (default: the --model folder's)")
    args = p.parse_args(argv)
    out = retrofit(args.model, args.out, args.layers, tokenizer=args.tokenizer, overwrite=args.overwrite,
                   mode=args.mode, n_keys=args.n_keys, heads=args.heads, knn=args.knn, k_dim=args.k_dim,
                   value_dim=args.value_dim, swilu=args.swilu, qk_norm=args.qk_norm, value_dtype=args.value_dtype,
                   seed=args.seed)
    print(json.dumps({"out": str(out), "model_yaml": str(out / "model.yaml"), "mode": args.mode,
                      "memory_layers": args.layers, "slots": args.n_keys**2}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
