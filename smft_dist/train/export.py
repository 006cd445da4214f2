"""`smft-export`: a checkpoint (any mp size) -> one Hugging Face folder.

    smft-export runs/tiny/finetune_sparse/checkpoints --out runs/tiny/hf

The folder loads with `AutoModelForCausalLM.from_pretrained` (after `import smft_dist.model`), or
with `trust_remote_code=True` where smft_dist is not installed (the model's code is written into
the folder as `modeling_smft.py`, with an `auto_map` in config.json: smft_dist.model.standalone),
generates, and carries the background df in `background_df/<layer>.safetensors` so a later
sparse-memory finetune can start from it. LoRA checkpoints are merged into the dense weights. With
`--tokenizer`, the config takes the tokenizer's pad/bos/eos ids.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from smft_dist.config import ModelConfig
from smft_dist.errors import console_script
from smft_dist.io import atomic_dir
from smft_dist.model import SmftConfig, SmftForCausalLM
from smft_dist.model.standalone import write_remote_code
from smft_dist.train import checkpoint as ckpt


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


def export(path: str | Path, out: str | Path, tokenizer: str | None = None, overwrite: bool = False) -> Path:
    """Write the checkpoint `path` as the Hugging Face folder `out`, atomically; an existing `out`
    is refused unless `overwrite` (smft_dist.io.atomic_dir). -> out"""
    with atomic_dir(out, overwrite) as tmp:
        _write_export(path, tmp, tokenizer)
    return Path(out)


def _write_export(path: str | Path, folder: Path, tokenizer: str | None) -> None:
    """The exported model, its remote code, background df and tokenizer into the empty `folder`."""
    model, step_dir = load_checkpoint_model(path)
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # generate() reads them from the config
            setattr(model.config, key, getattr(tok, key))
            setattr(model.generation_config, key, getattr(tok, key))
    model.save_pretrained(folder)
    write_remote_code(folder)
    if (step_dir / "df").is_dir():
        shutil.copytree(step_dir / "df", folder / "background_df")
    if tok is not None:
        tok.save_pretrained(folder)


@console_script
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a checkpoint folder (<out_dir>/checkpoints) or one step_<N> folder")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write (refused if it exists, unless "
                   "--overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (the old folder stays "
                   "until the new one is complete)")
    p.add_argument("--tokenizer", help="a tokenizer folder to copy in (e.g. runs/data/tiny/tokenizer)")
    args = p.parse_args(argv)
    print(export(args.checkpoint, args.out, args.tokenizer, args.overwrite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
