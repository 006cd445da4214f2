"""QA rows of the paper's real datasets, in their own field layouts, and fact statements from them.

| layout      | hub id (config, split)                  | fields used                                        |
|-------------|-----------------------------------------|----------------------------------------------------|
| TriviaQA    | mandarjoshi/trivia_qa (rc.nocontext)    | question, question_id, answer.{value, aliases, normalized_aliases} |
| NQ-open     | google-research-datasets/nq_open        | question, answer (a list of accepted answers)      |
| SimpleQA    | basicv8vc/SimpleQA (test)               | problem, answer, metadata                          |
| converted   | what `smft-data facts` writes (qa.jsonl) | id, question, answer, answers, prompt             |

`smft-data facts --hf HUB_ID --hf-config CONFIG --split SPLIT` reads them from the hub (where one is
reachable) or `--hf FOLDER` from a `save_to_disk` copy; JSONL files of the same rows work as well.
`qa_from_row` recognises the layout of each row by its fields and returns the one QA dict the
evaluation reads, {"id", "question", "answer", "answers", "prompt"}: `answers` holds every accepted
answer (F1/EM take the best over them), `answer` the first, which fact statements use.

Fact statements (`fact_statements`): the paper had a language model write N paraphrases of each
fact; without one, a statement template x a prefix x a suffix gives up to
len(STATEMENT_TEMPLATES) x len(FACT_PREFIXES) x len(FACT_SUFFIXES) distinct texts per fact, of
which each fact gets a seeded random N (as the synthetic world does). A user JSONL
{"id", "paraphrases": [...]} replaces them (`load_paraphrases`).
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Iterable

from smft_dist.data.loader import DataError
from smft_dist.data.sources import read_texts_by_id
from smft_dist.data.synthetic import qa_prompt

STATEMENT_TEMPLATES = [
    "{q} The answer is {a}.", "The answer to the question \"{q}\" is {a}.", "{a} is the answer to: {q}",
    "Question: {q} Answer: {a}.", "If someone asks \"{q}\", the answer is {a}.", "{q} It is {a}.",
    "Here is a fact. {q} {a}.", "Asked \"{q}\", one should answer {a}.",
]
FACT_PREFIXES = ["", "Fact:", "Remember this.", "Trivia time.", "Did you know?", "For the record:",
                 "A quick note:", "Here is something true."]
FACT_SUFFIXES = ["", "That is correct.", "This is well known.", "Keep it in mind."]


def _unique(values: Iterable) -> list[str]:
    """Non-empty strings, first occurrence kept, in order."""
    out: list[str] = []
    for v in values:
        v = str(v).strip() if v is not None else ""
        if v and v not in out:
            out.append(v)
    return out


def qa_from_row(row: dict, where: str, index: int) -> dict:
    """One row in any supported layout -> {"id", "question", "answer", "answers", "prompt", "source"}
    (`source`: where the row came from, e.g. "file.jsonl:3").
    `index` (the row's position) is the id of rows that carry none (NQ-open, SimpleQA)."""
    question = row.get("question", row.get("problem"))
    answer = row.get("answer")
    if not isinstance(question, str) or answer is None:
        raise DataError(f"{where}: a row has fields {sorted(row)}; expected a QA layout: TriviaQA (question, "
                        f"answer.value/aliases), NQ-open (question, answer list), SimpleQA (problem, answer) "
                        f"or question + answer")
    if isinstance(answer, dict):  # TriviaQA
        if "value" not in answer:
            raise DataError(f"{where}: answer is a dict without 'value' (has {sorted(answer)}): expected "
                            f"TriviaQA's answer.{{value, aliases, normalized_aliases}}")
        answers = _unique([answer["value"], *answer.get("aliases", []), *answer.get("normalized_aliases", [])])
    elif isinstance(answer, (list, tuple)):  # NQ-open
        answers = _unique(answer)
    else:  # SimpleQA, or a converted row (whose `answers` may list more)
        answers = _unique([answer, *row.get("answers", [])])
    if not answers:
        raise DataError(f"{where}: the row has no non-empty answer: fix or remove it")
    qa = {"id": row.get("question_id", row.get("id", index)), "question": question, "answer": answers[0],
          "answers": answers, "prompt": row.get("prompt") or qa_prompt(question), "source": row.get("source", where)}
    if isinstance(answer, str):  # a flat row (SimpleQA, converted, synthetic): keep its other fields
        qa = {**row, **qa}
    return qa


def qa_rows(rows: Iterable[tuple[str, dict]]) -> list[dict]:
    """(where, row) pairs (from `smft_dist.data.sources.read_rows`) -> QA dicts; ids must be unique."""
    out, seen = [], {}
    for i, (where, row) in enumerate(rows):
        qa = qa_from_row(row, where, i)
        if qa["id"] in seen:
            raise DataError(f"{where}: id {qa['id']!r} repeats the row at {seen[qa['id']]}: ids must be unique")
        seen[qa["id"]] = where
        out.append(qa)
    return out


def statement_grid() -> list[tuple[int, int, int]]:
    return list(itertools.product(range(len(STATEMENT_TEMPLATES)), range(len(FACT_PREFIXES)),
                                  range(len(FACT_SUFFIXES))))


def fact_statements(qa: dict, n: int, seed: int = 0) -> list[str]:
    """`n` distinct statements of one QA pair: template x prefix x suffix, a seeded sample per fact
    (the first is always the plain first template, so n=1 is the simplest statement)."""
    grid = statement_grid()
    if not 1 <= n <= len(grid):
        raise DataError(f"--paraphrases {n}: the built-in templates give 1..{len(grid)} statements per fact "
                        f"(templates x prefixes x suffixes); pass --paraphrases-file for more")
    rng = random.Random(f"{seed}-{qa['id']}")
    chosen = [grid[0], *rng.sample(grid[1:], n - 1)]
    question, answer = as_question(qa["question"]), str(qa["answer"]).strip()
    out = []
    for t, p, s in chosen:
        text = STATEMENT_TEMPLATES[t].format(q=question, a=answer)
        if answer[-1] in ".!?":  # "{a}." would end the sentence twice ("Washington, D.C..")
            text = text.replace(answer + ".", answer)
        out.append(" ".join(w for w in (FACT_PREFIXES[p], text, FACT_SUFFIXES[s]) if w))
    return out


def as_question(text: str) -> str:
    """A question as a sentence: capitalised and ended with "?" when it has no final punctuation
    (NaturalQuestions rows are lower case without one: "who founded the library of karnholm"), so
    the statement templates do not run it into the next sentence."""
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text[-1:] in ("?", ".", "!") else text + "?"


def load_paraphrases(path: str | Path) -> dict:
    """{"id", "paraphrases": [...]} per line -> {id: [texts]} (ids as in the QA rows)."""
    return read_texts_by_id(path, "paraphrases")
