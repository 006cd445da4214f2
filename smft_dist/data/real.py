"""Converters for the paper's real datasets into the shapes of the synthetic benchmark.

For users who have the datasets (a hub connection or a `save_to_disk` copy); nothing here
downloads by itself except `load_real`, which calls `datasets.load_dataset`. Each converter takes
an iterable of rows in the dataset's own field layout and returns QA dicts
{"id", "question", "answer", "answers", "prompt"} (`answers` = every accepted answer, for F1).

| name        | hub id (config, split)                  | fields used                                |
|-------------|-----------------------------------------|--------------------------------------------|
| triviaqa    | mandarjoshi/trivia_qa (rc.nocontext)    | question, question_id, answer.{value, aliases} |
| nq_open     | google-research-datasets/nq_open        | question, answer (list)                    |
| simpleqa    | basicv8vc/SimpleQA (test)               | problem, answer                            |

TriviaQA facts become statements for fact learning (the paper rewrote them with a language model;
here a few fixed templates, so `paraphrases` distinct statements need `paraphrases` <= 8).
"""
from __future__ import annotations

from typing import Iterable

from smft_dist.data.synthetic import qa_prompt

HUB = {
    "triviaqa": ("mandarjoshi/trivia_qa", "rc.nocontext"),
    "nq_open": ("google-research-datasets/nq_open", None),
    "simpleqa": ("basicv8vc/SimpleQA", None),
}
STATEMENT_TEMPLATES = [
    "{q} The answer is {a}.", "The answer to the question \"{q}\" is {a}.", "{a} is the answer to: {q}",
    "Question: {q} Answer: {a}.", "If someone asks \"{q}\", the answer is {a}.", "{q} It is {a}.",
    "Here is a fact. {q} {a}.", "Asked \"{q}\", one should answer {a}.",
]


def _qa(i, question: str, answers: list[str]) -> dict:
    answers = [a for a in answers if a] or [""]
    return {"id": i, "question": question, "answer": answers[0], "answers": answers, "prompt": qa_prompt(question)}


def triviaqa_to_qa(rows: Iterable[dict]) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        ans = r["answer"]
        out.append(_qa(r.get("question_id", i), r["question"], [ans["value"], *ans.get("aliases", [])]))
    return out


def nq_open_to_qa(rows: Iterable[dict]) -> list[dict]:
    return [_qa(i, r["question"], list(r["answer"])) for i, r in enumerate(rows)]


def simpleqa_to_qa(rows: Iterable[dict]) -> list[dict]:
    return [_qa(i, r["problem"], [r["answer"]]) for i, r in enumerate(rows)]


CONVERTERS = {"triviaqa": triviaqa_to_qa, "nq_open": nq_open_to_qa, "simpleqa": simpleqa_to_qa}


def qa_statements(qa: list[dict], paraphrases: int) -> list[list[str]]:
    """`paraphrases` distinct statements of each QA pair (fact learning's training texts)."""
    if not 1 <= paraphrases <= len(STATEMENT_TEMPLATES):
        raise ValueError(f"paraphrases={paraphrases}: the fixed templates give at most {len(STATEMENT_TEMPLATES)}")
    return [[t.format(q=p["question"], a=p["answer"]) for t in STATEMENT_TEMPLATES[:paraphrases]] for p in qa]


def load_real(name: str, split: str = "validation", path: str | None = None) -> list[dict]:
    """QA dicts of a real dataset: from `path` (a `save_to_disk` folder) or the hub."""
    import datasets

    if name not in CONVERTERS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {sorted(CONVERTERS)}")
    if path is not None:
        ds = datasets.load_from_disk(path)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        hub_id, config = HUB[name]
        ds = datasets.load_dataset(hub_id, config, split=split)
    return CONVERTERS[name](ds)
