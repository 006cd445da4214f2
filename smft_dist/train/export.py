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

from smft_dist.checkpoint.model import load_checkpoint_model
from smft_dist.errors import console_script
from smft_dist.io import atomic_dir
from smft_dist.model.standalone import write_remote_code


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
        from smft_dist.checkpoint.layout import read_meta
        from smft_dist.data.tokenizer import check_tokenizer_of_checkpoint, open_tokenizer

        tok = open_tokenizer(tokenizer)  # a damaged folder: one error naming it
        check_tokenizer_of_checkpoint(tok, f"--tokenizer {tokenizer}", read_meta(step_dir), step_dir)
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
