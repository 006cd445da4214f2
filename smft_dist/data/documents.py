"""Document QA data (the paper's SimpleQA-documents experiment): chunks and their augmentations.

A document {"id", "text"} is split into chunks: paragraphs (blank-line separated), consecutive
paragraphs merged while the chunk stays within `max_tokens`, a longer paragraph split at sentence
ends. Chunk ids are "<doc id>#<k>".

Each chunk is learned as one group of N texts. The paper's Active Reading had a language model
write them; `load_augmentations` reads such texts ({"id": chunk id, "augmentations": [...]}).
Without them `augment` makes N cheap ones, seeded per chunk, in that spirit: the chunk itself, the
chunk behind a prefix, its sentences reordered, and its sentences rewritten as question-answer
pairs ("Q: What does the text say about <opening words>? A: <sentence>").
"""
from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

from smft_dist.data.sources import read_texts_by_id

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
PREFIXES = ["", "Here is a passage.", "From the article:", "Read this carefully.", "A note to remember:",
            "The following is true.", "Excerpt:", "Study this text."]
KINDS = ("verbatim", "reordered", "questions")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def split_chunks(doc_id, text: str, count_tokens, max_tokens: int) -> list[dict]:
    """-> [{"id", "doc_id", "text"}]: paragraphs merged up to `max_tokens` (as `count_tokens(text)`
    measures), longer paragraphs split at sentence ends. A single sentence longer than
    `max_tokens` stays whole (the writer then reports it)."""
    pieces: list[str] = []
    for para in (" ".join(p.split()) for p in re.split(r"\n\s*\n", text)):
        if para:
            pieces += [para] if count_tokens(para) <= max_tokens else _greedy_join(sentences(para), " ",
                                                                                   count_tokens, max_tokens)
    chunks = _greedy_join(pieces, "\n\n", count_tokens, max_tokens)
    return [{"id": f"{doc_id}#{k}", "doc_id": doc_id, "text": c} for k, c in enumerate(chunks)]


def _greedy_join(parts: list[str], sep: str, count_tokens, max_tokens: int) -> list[str]:
    """Consecutive `parts` joined with `sep` while the join stays within `max_tokens`."""
    out, current = [], ""
    for part in parts:
        joined = f"{current}{sep}{part}" if current else part
        if current and count_tokens(joined) > max_tokens:
            out.append(current)
            current = part
        else:
            current = joined
    return out + [current] if current else out


def render_question(sentence: str) -> str:
    """A sentence rewritten as a question-answer pair about its opening words."""
    return f"Q: What does the text say about {' '.join(sentence.split()[:4]).rstrip('.,;:!?')}? A: {sentence}"


def _render(kind: str, prefix: str, sents: list[str], rng: random.Random) -> str:
    if kind == "reordered":
        sents = rng.sample(sents, len(sents))
    elif kind == "questions":
        sents = [render_question(s) for s in sents]
    return " ".join(w for w in (prefix, " ".join(sents)) if w)


def augment(chunk: dict, n: int, seed: int = 0) -> list[str]:
    """`n` texts for one chunk; the first is the chunk itself. Distinct where the chunk allows it
    (a one-sentence chunk has no reorderings, so its texts may repeat)."""
    rng = random.Random(f"{seed}-{chunk['id']}")
    sents = sentences(chunk["text"]) or [chunk["text"]]
    grid = [g for g in itertools.product(KINDS, PREFIXES) if g != ("verbatim", "")]
    rng.shuffle(grid)
    out = [chunk["text"]]
    for kind, prefix in itertools.islice(itertools.cycle(grid), 8 * n):  # reorderings differ per round
        if len(out) == n:
            break
        text = _render(kind, prefix, sents, rng)
        if text not in out:
            out.append(text)
    distinct = len(out)
    while len(out) < n:  # fewer distinct texts than asked: repeat them
        out.append(out[len(out) % distinct])
    return out


def load_augmentations(path: str | Path) -> dict:
    """{"id": chunk id, "augmentations": [...]} per line -> {chunk id: [texts]}."""
    return read_texts_by_id(path, "augmentations")
