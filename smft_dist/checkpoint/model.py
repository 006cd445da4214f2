"""A checkpoint as one whole Hugging Face model: what smft-export writes and smft-eval scores;
and reading a Hugging Face model folder (what smft-eval, smft-patch and model.init_from take)."""
from __future__ import annotations

import json
from pathlib import Path

from smft_dist.checkpoint import layout as ckpt
from smft_dist.config import ModelConfig
from smft_dist.model import SmftConfig, SmftForCausalLM


def load_checkpoint_model(path: str | Path) -> tuple[SmftForCausalLM, Path]:
    """A whole (unsharded) model from a checkpoint written at any mp size."""
    step_dir = ckpt.resolve_checkpoint(path)
    ckpt.check_intact(step_dir)
    meta = ckpt.read_meta(step_dir)
    model = SmftForCausalLM(SmftConfig.from_model_config(ModelConfig(**meta["model"])))
    target = model
    if meta.get("method") == "lora" and meta.get("mode") == "finetune":
        from peft import LoraConfig, get_peft_model

        lora = meta["lora"]
        target = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                                  target_modules=list(lora["targets"]), bias="none"))
    ckpt.load_dense(target, step_dir)
    ckpt.load_memory([layer.values for layer in model.memory_layers()], ckpt.layer_names(model), step_dir)
    if target is not model:
        model = target.merge_and_unload()
    return model, step_dir


def read_hf_config(folder: str | Path) -> dict:
    """A Hugging Face folder's config.json (a mapping with a model_type), else a CheckpointError."""
    from smft_dist.errors import reason

    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
        raise ckpt.CheckpointError(f"{path} is unreadable ({reason(e)}): the model folder is damaged; export or "
                                   f"save it again") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ckpt.CheckpointError(f"{path} is not a Hugging Face model config (no model_type): the model folder "
                                   f"is damaged, or the file is another one's")
    return config


def load_hf_model(folder: str | Path, model_class=None):
    """`model_class.from_pretrained(folder)` (default: AutoModelForCausalLM) with every weight of
    the model read from the folder: a damaged config or weights file, or weights of another model
    (which from_pretrained would fill with a random initialisation), raise a CheckpointError."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from smft_dist.errors import READ_ERRORS, reason

    read_hf_config(folder)
    try:
        model, info = (model_class or AutoModelForCausalLM).from_pretrained(str(folder), output_loading_info=True)
    except (*READ_ERRORS, SafetensorError) as e:
        raise ckpt.CheckpointError(f"{folder} is not a loadable Hugging Face model ({reason(e)}): a file in it is "
                                   f"damaged or another model's; export or save it again") from None
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = sorted(k for k in info.get("missing_keys") or [] if not (tied and k == "lm_head.weight"))
    if missing:
        raise ckpt.CheckpointError(f"{folder}: its weight files lack {len(missing)} weights of the model (e.g. "
                                   f"{missing[:3]}): they are damaged or another model's; export or save it again")
    return model
