"""Evaluation inside a run: QA F1/EM on QA JSONL files and held-out NLL on an MDS folder, before
the first step, every `eval.every` steps and at the end, into metrics.jsonl and TensorBoard, so a
finetune run yields its own learning and forgetting curves.

    evaluator = Evaluator(cfg, trainer.model)   # loads the tokenizer and QA rows once
    metrics.update(evaluator(step))             # {} unless due; collective (every rank calls it)

Keys: `eval/qa_f1/<file stem>`, `eval/qa_em/<file stem>`, `eval/nll/<folder name>`.
"""
from __future__ import annotations

from pathlib import Path

from smft_dist.config import ConfigError, RunConfig
from smft_dist.eval.nll import mds_heldout_nll
from smft_dist.eval.qa import evaluate_qa, load_qa_jsonl


def _tokenizer_folder(cfg: RunConfig) -> Path:
    """model.tokenizer, else the tokenizer the training data was written with (its smft_data.json,
    or the `tokenizer/` folder of `smft-data synthetic`)."""
    from smft_dist.config import data_source
    from smft_dist.data.mds import read_info

    data = Path(data_source(cfg)[1])
    info = read_info(data) if data.is_dir() else None
    for cand in (cfg.model.tokenizer, info and info.get("tokenizer"), data.parent / "tokenizer"):
        if cand and (Path(cand) / "tokenizer_config.json").is_file():
            return Path(cand)
    raise ConfigError("eval.qa needs a tokenizer: set model.tokenizer to a Hugging Face tokenizer folder")


class Evaluator:
    def __init__(self, cfg: RunConfig, model):
        self.cfg, self.model = cfg.eval, model
        self.qa = {}
        self.tokenizer = None
        if self.cfg.qa:
            from smft_dist.data.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(str(_tokenizer_folder(cfg)))
            self.qa = {Path(f).stem: load_qa_jsonl(f) for f in self.cfg.qa}
        self.total_steps = cfg.steps

    @property
    def enabled(self) -> bool:
        return self.cfg.every > 0 and bool(self.qa or self.cfg.nll)

    def __call__(self, step: int) -> dict:
        """The evaluation metrics at `step` when due (step 0, every `eval.every`, the last step), else {}."""
        if not self.enabled or not (step == 0 or step % self.cfg.every == 0 or step == self.total_steps):
            return {}
        out = {}
        for name, rows in self.qa.items():
            r = evaluate_qa(self.model, self.tokenizer, rows, batch_size=self.cfg.batch_size,
                            max_new_tokens=self.cfg.max_new_tokens)
            out[f"eval/qa_f1/{name}"], out[f"eval/qa_em/{name}"] = round(r["f1"], 5), round(r["exact_match"], 5)
        if self.cfg.nll:
            r = mds_heldout_nll(self.model, self.cfg.nll, batch_size=self.cfg.batch_size,
                                max_batches=self.cfg.nll_batches)
            out[f"eval/nll/{Path(self.cfg.nll).name}"] = round(r["nll"], 5)
        return out
