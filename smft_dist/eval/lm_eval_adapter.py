"""lm-evaluation-harness tasks (HellaSwag, GSM8K, ... or a task YAML of your own) on an smft model.

`lm-eval` is an optional extra (`pip install -e ".[lmeval]"`). `run_lm_eval` hands the in-memory
model to lm-eval's "hf" backend (`HFLM(pretrained=<model instance>)`), so a checkpoint folder works
as well as an exported one and the "smft" model type needs no registration in lm-eval's process.
`smft-eval MODEL --lm-eval hellaswag,gsm8k` is the command line; a local task is a folder of task
YAML files passed as `--lm-eval-include DIR`.
"""
from __future__ import annotations

import math

from smft_dist.data.loader import DataError
from smft_dist.errors import UserError


class LmEvalMissing(UserError, ImportError):
    """The optional lm-eval extra is not installed."""


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def run_lm_eval(model, tokenizer, tasks: list[str], *, include_path: str | None = None, limit: int | None = None,
                batch_size: int = 8, num_fewshot: int | None = None, device: str | None = None) -> dict:
    """-> {task: {metric: value}} (lm-eval's "metric,filter" keys, stderr entries left out).
    Raises LmEvalMissing naming the extra when lm-eval is not installed, and DataError naming a task
    lm-eval does not know (both user errors)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LmEvalMissing("lm-eval is not installed: pip install -e \".[lmeval]\" (or pip install lm-eval)") from None
    manager = None
    if include_path is not None:  # only local tasks: skip indexing lm-eval's thousands of task files
        manager = TaskManager(include_path=include_path, include_defaults=False)
        manager = manager if all(t in manager.all_tasks for t in tasks) else None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else " (pass --lm-eval-include DIR for your own task YAML)"
        raise DataError(f"lm-eval task(s) {unknown} not found in lm-eval's task list{where}")
    device = device or str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          log_samples=False, bootstrap_iters=0)
    return {task: {k: v for k, v in metrics.items() if "stderr" not in k and k != "alias"
                   and isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))}
            for task, metrics in out["results"].items()}
