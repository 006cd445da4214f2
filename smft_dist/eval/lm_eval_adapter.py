"""Evaluate an exported model (a Hugging Face folder from `smft-export`) with lm-evaluation-harness.

For users who have `lm-eval` installed (it is not a dependency). lm-eval's "hf" backend loads the
folder with `AutoModelForCausalLM`, which knows the "smft" model type only after
`import smft_dist.model` has registered it: run lm-eval through this module, not the `lm_eval`
command, so the registration happens in the same process:

    python -m smft_dist.eval.lm_eval_adapter EXPORT_DIR --tasks hellaswag --batch_size 8

Everything after EXPORT_DIR is passed to lm-eval's own command line.
"""
from __future__ import annotations

import sys


def hflm_model_args(export_dir: str, dtype: str = "float32") -> str:
    """The `--model_args` string of lm-eval's "hf" backend for an exported folder."""
    return f"pretrained={export_dir},tokenizer={export_dir},dtype={dtype}"


def lm_eval_argv(export_dir: str, extra: list[str]) -> list[str]:
    return ["lm_eval", "--model", "hf", "--model_args", hflm_model_args(export_dir), *extra]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python -m smft_dist.eval.lm_eval_adapter EXPORT_DIR [lm_eval options, e.g. --tasks hellaswag]")
    import smft_dist.model  # noqa: F401  (registers the "smft" model type with the Auto classes)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        sys.exit("lm-eval is not installed: `pip install lm-eval` (the project does not depend on it)")
    sys.argv = lm_eval_argv(argv[0], argv[1:])
    cli_evaluate()


if __name__ == "__main__":
    main()
