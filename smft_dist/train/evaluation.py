"""Evaluation inside a run: QA F1/EM on QA JSONL files and held-out NLL on an MDS folder, before
the first step, every `eval.every` steps and at the end, into metrics.jsonl and TensorBoard, so a
finetune run yields its own learning and forgetting curves.

    evaluator = Evaluator(cfg, trainer.model)   # loads the tokenizer and QA rows once
    metrics.update(evaluator(step))             # {} unless due; collective (every rank calls it)

Keys: `eval/qa_f1/<name>`, `eval/qa_em/<name>`, `eval/nll/<folder name>`; a QA file's name is the
shortest end of its path that no other eval.qa file shares, without `.jsonl` (`known_qa`), and
at least `<folder>/qa` for the `qa.jsonl` every `smft-data facts` output holds (`tq-part00/qa`).
"""
from __future__ import annotations

from pathlib import Path

from smft_dist.config import ConfigError, RunConfig
from smft_dist.data.sources import JSONL_SUFFIXES
from smft_dist.eval.nll import mds_heldout_nll
from smft_dist.eval.qa import evaluate_qa, load_qa_jsonl


def _tokenizer_folder(cfg: RunConfig) -> Path:
    from smft_dist.config import data_source
    from smft_dist.data.tokenizer import run_tokenizer_folder

    folder = run_tokenizer_folder(cfg.model.tokenizer, data_source(cfg)[1])
    if folder is None:
        raise ConfigError("eval.qa needs a tokenizer: set model.tokenizer to a Hugging Face tokenizer folder")
    return folder


def qa_names(files: list[str]) -> dict[str, str]:
    """{name: file} for eval.qa: each name the shortest end of the file's absolute path, extension
    dropped, that no other file's name shares (the generic `qa.jsonl` keeps its folder); the same
    file given twice is evaluated once."""
    paths = list(dict.fromkeys(Path(f).resolve() for f in files))
    parts = []
    for p in paths:
        ext = next((x for x in JSONL_SUFFIXES if p.name.endswith(x)), p.suffix)
        parts.append((*p.parent.parts[1:], p.name[:len(p.name) - len(ext)]))
    depth = [2 if ps[-1] == "qa" else 1 for ps in parts]
    while True:
        names = ["/".join(ps[-d:]) if d <= len(ps) else str(p) for p, ps, d in zip(paths, parts, depth)]
        clash = [i for i, n in enumerate(names) if names.count(n) > 1]
        if not clash:
            return {n: str(p) for n, p in zip(names, paths)}
        for i in clash:  # past the whole path (a.json beside a.jsonl) the name is the path itself
            depth[i] += 1


class Evaluator:
    def __init__(self, cfg: RunConfig, model):
        self.cfg, self.model = cfg.eval, model
        self.qa = {}
        self.tokenizer = None
        if self.cfg.qa:
            from smft_dist.data.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(str(_tokenizer_folder(cfg)))
            self.qa = {name: load_qa_jsonl(f) for name, f in qa_names(self.cfg.qa).items()}
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
