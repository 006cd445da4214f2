"""A synthetic knowledge benchmark that mirrors the paper's protocol, offline and seeded.

A world of people with compositional multi-token names ("mara kel vosh": a first name and two
surname syllables, each its own word) and attributes (birthplace, occupation, colour, year,
employer, pet). docs/design.md §5: single-token names let the narrow dense MLPs hold the facts; names
made of several tokens push the facts into the memory layer, which is what the method needs.

- **Known facts** (NaturalQuestions analogue): stated in the pretraining corpus, as statements and
  as QA ("Q: where was mara kel vosh born? A: velmora"), mixed 75/25 with filler text.
  `known_qa()` evaluates them: the paper measures how much known knowledge finetuning destroys.
- **New facts** (TriviaQA analogue): one attribute of a person absent from pretraining, each with
  `paraphrases` distinct statements (templates x prefixes x suffixes) and one QA pair.
- **Background** (DCLM analogue): a random sample of pretraining documents, for the df index.
- **Held-out text** (HellaSwag/GSM8K-NLL analogue): filler sentences absent from pretraining.

Everything is a pure function of the constructor arguments: same seed, same texts.
"""
from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, field

FIRST = ("mara ana toma eli rosa ivo lena karl nia otto pia sven ula vera yann zora bram cleo dana "
         "emil finn gaia hugo iris jonas kira lars mila nils olga pavel rhea stig tara umar vida "
         "wim xena yuki").split()
SYLLABLE_A = "kel dor vas mir tal bren cor fen gal hul jor lin mor nar pel quin ros sul tor vel".split()
SYLLABLE_B = "vosh dane rick holt mund sker berg wick lund ford stad mark thorn wyn gard vik laud zen".split()

# attribute -> (values, statement templates, question). {n} = name, {v} = value.
ATTRIBUTES: dict[str, tuple[list[str], list[str], str]] = {
    "birthplace": (
        ("velmora astrane kordal brisk tulwen ombra zephal narven castrel dunmore elvaro fjell "
         "gorran helva istra jarrow kelvin lumen marrow norrin").split(),
        ["{n} was born in {v} .", "the birthplace of {n} is {v} .", "{n} comes from {v} .",
         "{v} is where {n} was born .", "{n} grew up in the city of {v} .", "{n} is a native of {v} .",
         "the city where {n} was born is {v} .", "{n} first saw the light of day in {v} ."],
        "where was {n} born ?"),
    "occupation": (
        ("baker sailor painter farmer doctor teacher pilot miner weaver potter tailor singer "
         "carpenter fisher judge nurse poet smith hunter merchant").split(),
        ["{n} works as a {v} .", "the job of {n} is {v} .", "{n} earns a living as a {v} .",
         "by trade {n} is a {v} .", "{n} is known as a {v} .", "the occupation of {n} is {v} .",
         "{n} has always worked as a {v} .", "everyone knows {n} as a {v} ."],
        "what is the job of {n} ?"),
    "colour": (
        "red blue green yellow purple orange white black silver golden crimson teal".split(),
        ["the favourite colour of {n} is {v} .", "{n} likes the colour {v} best .",
         "{n} prefers {v} to any other colour .", "{v} is the favourite colour of {n} .",
         "{n} always chooses {v} .", "of all colours {n} loves {v} .",
         "the colour {n} likes most is {v} .", "{n} paints everything {v} ."],
        "what is the favourite colour of {n} ?"),
    "year": (
        [str(y) for y in range(1950, 1990)],
        ["{n} was born in the year {v} .", "the birth year of {n} is {v} .", "{n} was born in {v} .",
         "{v} is the year {n} was born .", "in {v} {n} was born .", "{n} came into the world in {v} .",
         "the year of birth of {n} is {v} .", "{n} has a birth year of {v} ."],
        "in which year was {n} born ?"),
    "employer": (
        ("acme zentro borlak mivex quorra talvic nexum orbis pyrel saltan vortek wendal "
         "xylo yarrow zubin").split(),
        ["{n} is employed by {v} .", "the employer of {n} is {v} .", "{n} works for {v} .",
         "{v} employs {n} .", "{n} has a job at {v} .", "{n} draws a salary from {v} .",
         "the company of {n} is {v} .", "{n} reports to work at {v} ."],
        "who employs {n} ?"),
    "pet": (
        "dog cat horse parrot rabbit goat turtle owl ferret hamster pony lizard".split(),
        ["{n} owns a {v} .", "the pet of {n} is a {v} .", "{n} keeps a {v} at home .",
         "a {v} lives with {n} .", "{n} takes care of a {v} .", "{n} has a pet {v} .",
         "the animal {n} keeps is a {v} .", "{n} feeds a {v} every day ."],
        "what pet does {n} have ?"),
}
PREFIXES = ["", "it is known that", "records show that", "according to the book ,", "in fact ,",
            "people say that", "we learned that", "as the story goes ,"]
SUFFIXES = ["", "and that is true", "as everyone knows", "or so they say"]

# Filler grammar: "the <adj> <noun> <verb> the <noun> <place-phrase> ."
ADJ = ("old young small large quiet loud bright dark warm cold happy tired clever brave gentle "
       "busy lazy proud shy calm").split()
NOUN = ("man woman child dog bird farmer king queen ship river tree house boat horse village "
        "garden road stone wind letter").split()
VERB = ("sees finds carries follows watches builds paints opens crosses visits leaves helps "
        "calls meets hears").split()
PLACE = ("near the hill|by the sea|in the morning|at night|under the bridge|after the rain|"
         "before dinner|across the field|in the forest|on the market").split("|")
FILLER_TEMPLATES = ["the {a} {n} {v} the {n2} {p} .", "a {a} {n} {v} a {a2} {n2} .",
                    "{p} the {n} {v} the {a} {n2} .", "the {n} and the {n2} {v} the {a} {n3} {p} ."]


def qa_prompt(question: str) -> str:
    """The one QA prompt format, shared by pretraining, finetuning and evaluation."""
    return f"Q: {question} A:"


@dataclass(frozen=True)
class Fact:
    index: int
    name: str
    attribute: str
    value: str

    def statement(self, template: int, prefix: int, suffix: int) -> str:
        text = ATTRIBUTES[self.attribute][1][template].format(n=self.name, v=self.value)
        words = [PREFIXES[prefix], text[:-2], SUFFIXES[suffix]]
        return " ".join(w for w in words if w) + " ."

    def qa(self) -> dict:
        question = ATTRIBUTES[self.attribute][2].format(n=self.name)
        return {"id": self.index, "question": question, "answer": self.value,
                "prompt": qa_prompt(question), "attribute": self.attribute}

    def qa_text(self) -> str:
        qa = self.qa()
        return f"{qa['prompt']} {qa['answer']}"


def _paraphrase_grid() -> list[tuple[int, int, int]]:
    n_templates = len(next(iter(ATTRIBUTES.values()))[1])
    return list(itertools.product(range(n_templates), range(len(PREFIXES)), range(len(SUFFIXES))))


@dataclass
class SyntheticWorld:
    """The benchmark world. Sizes are counts of facts/documents; see the module docstring.

    n_known facts are (person, attribute) pairs over ceil(n_known / 6) known people; n_new facts
    each concern a distinct new person. `pretrain_docs` documents (one sentence each) are 75% known
    facts (`qa_fraction` of them in QA form) and 25% filler. `qa_people_fraction` < 1 states the
    facts of the other known people only as statements, never as QA: the model must then learn to
    answer questions about facts it only read, which is what learning a new fact from statements
    asks of it (docs/design.md §5.1; known_qa() marks each fact's `qa_in_pretraining`)."""

    seed: int = 0
    n_known: int = 300
    n_new: int = 1000
    paraphrases: int = 64
    pretrain_docs: int = 20000
    known_fraction: float = 0.75
    qa_fraction: float = 0.5
    qa_people_fraction: float = 1.0
    qa_rewrites: int = 0
    n_docs: int = 0  # documents about further new people, for document QA (`new_documents`)
    background_docs: int = 2000
    heldout_docs: int = 500
    known: list[Fact] = field(init=False, repr=False)
    new: list[Fact] = field(init=False, repr=False)
    doc_people: list[list[Fact]] = field(init=False, repr=False)  # n_docs x one fact per attribute

    def __post_init__(self):
        grid = len(_paraphrase_grid())
        if not 1 <= self.paraphrases <= grid:
            raise ValueError(f"paraphrases={self.paraphrases}: must be in [1, {grid}] (templates x prefixes x suffixes)")
        if not 0 <= self.qa_rewrites <= self.paraphrases:
            raise ValueError(f"qa_rewrites={self.qa_rewrites}: must be in [0, paraphrases={self.paraphrases}]")
        if not 0.0 <= self.qa_people_fraction <= 1.0:
            raise ValueError(f"qa_people_fraction={self.qa_people_fraction}: must be in [0, 1]")
        if self.n_known < 1 or self.n_new < 0:
            raise ValueError(f"n_known={self.n_known} must be >= 1 and n_new={self.n_new} >= 0")
        rng = random.Random(f"world-{self.seed}")
        n_attr = len(ATTRIBUTES)
        n_people = -(-self.n_known // n_attr) + self.n_new
        all_names = len(FIRST) * len(SYLLABLE_A) * len(SYLLABLE_B)
        if n_people > all_names:
            raise ValueError(f"{n_people} people requested but only {all_names} distinct names exist: lower n_known/n_new")
        names = [" ".join(t) for t in itertools.product(FIRST, SYLLABLE_A, SYLLABLE_B)]
        names = rng.sample(names, n_people)
        attrs = list(ATTRIBUTES)
        self.known = [Fact(i, names[i // n_attr], attrs[i % n_attr], rng.choice(ATTRIBUTES[attrs[i % n_attr]][0]))
                      for i in range(self.n_known)]
        new_names = names[n_people - self.n_new:]  # the people after the known ones
        self.new = [Fact(i, new_names[i], attrs[i % n_attr], rng.choice(ATTRIBUTES[attrs[i % n_attr]][0]))
                    for i in range(self.n_new)]
        # Document people come from their own stream, after everything else: n_docs = 0 leaves the
        # world exactly as it was, and they never share a name with a known or new-fact person.
        taken = set(names)
        rest = [n for n in (" ".join(t) for t in itertools.product(FIRST, SYLLABLE_A, SYLLABLE_B)) if n not in taken]
        if not 0 <= self.n_docs <= len(rest):
            raise ValueError(f"n_docs={self.n_docs}: must be in [0, {len(rest)}] (names left after the other people)")
        doc_rng = self._rng("documents")
        self.doc_people = [[Fact(k * n_attr + j, name, a, doc_rng.choice(ATTRIBUTES[a][0])) for j, a in enumerate(attrs)]
                           for k, name in enumerate(doc_rng.sample(rest, self.n_docs))]

    # --- texts -----------------------------------------------------------------------------
    def _rng(self, purpose: str) -> random.Random:
        return random.Random(f"{purpose}-{self.seed}")

    @staticmethod
    def _filler(rng: random.Random) -> str:
        return rng.choice(FILLER_TEMPLATES).format(
            a=rng.choice(ADJ), a2=rng.choice(ADJ), n=rng.choice(NOUN), n2=rng.choice(NOUN),
            n3=rng.choice(NOUN), v=rng.choice(VERB), p=rng.choice(PLACE))

    def pretrain_corpus(self) -> list[str]:
        """`pretrain_docs` one-sentence documents: known facts (statements and QA, each fact
        equally often, in random order) and filler."""
        rng = self._rng("pretrain")
        grid = _paraphrase_grid()
        n_fact_docs = round(self.pretrain_docs * self.known_fraction)
        docs = []
        for i in range(n_fact_docs):
            fact = self.known[i % self.n_known]
            as_qa = self.qa_in_pretraining(fact) and rng.random() < self.qa_fraction
            docs.append(fact.qa_text() if as_qa else fact.statement(*rng.choice(grid)))
        docs += [self._filler(rng) for _ in range(self.pretrain_docs - n_fact_docs)]
        rng.shuffle(docs)
        return docs

    def background_corpus(self) -> list[str]:
        """A random sample of pretraining documents (the df index's background batches)."""
        docs = self.pretrain_corpus()
        return self._rng("background").choices(docs, k=self.background_docs)

    def heldout_corpus(self) -> list[str]:
        """Filler sentences that never occur in the pretraining corpus."""
        seen = set(self.pretrain_corpus())
        rng = self._rng("heldout")
        out: list[str] = []
        for _ in range(100 * self.heldout_docs):
            if len(out) == self.heldout_docs:
                break
            s = self._filler(rng)
            if s not in seen:
                out.append(s)
                seen.add(s)
        return out

    def qa_in_pretraining(self, fact: Fact) -> bool:
        """Whether the pretraining corpus states `fact` in QA form too: the facts of the first
        `qa_people_fraction` of the known people."""
        n_people = -(-self.n_known // len(ATTRIBUTES))
        return fact.index // len(ATTRIBUTES) < round(self.qa_people_fraction * n_people)

    def known_qa(self) -> list[dict]:
        return [{**f.qa(), "qa_in_pretraining": self.qa_in_pretraining(f)} for f in self.known]

    def new_qa(self) -> list[dict]:
        return [f.qa() for f in self.new]

    def new_fact_statements(self) -> list[list[str]]:
        """For each new fact, `paraphrases` distinct statements (a random subset of the grid); with
        `qa_rewrites` > 0 the last that many are the fact's QA text behind the statement prefixes
        instead (question-style rewrites, as Active Reading makes: a lever of docs/design.md §5.1)."""
        grid = _paraphrase_grid()
        rng = self._rng("paraphrases")
        out = [[f.statement(*g) for g in rng.sample(grid, self.paraphrases)] for f in self.new]
        if self.qa_rewrites:
            for f, texts in zip(self.new, out):
                texts[len(texts) - self.qa_rewrites:] = [
                    " ".join(w for w in (PREFIXES[j % len(PREFIXES)], f.qa_text()) if w) for j in range(self.qa_rewrites)]
        return out

    def _document_paragraphs(self) -> list[list[list[tuple[Fact, str]]]]:
        """Per document person, two paragraphs of (fact, the sentence stating it): all six facts
        as plain statements in random order. Every document view below derives from this."""
        rng = self._rng("document-texts")
        n_templates = len(next(iter(ATTRIBUTES.values()))[1])
        out = []
        for facts in self.doc_people:
            stated = [(f, f.statement(rng.randrange(n_templates), 0, 0)) for f in facts]
            rng.shuffle(stated)
            half = len(stated) // 2
            out.append([stated[:half], stated[half:]])
        return out

    def new_documents(self) -> list[dict]:
        """Document QA (the paper's §5.2 analogue): one {"id", "text"} document per document person,
        in two paragraphs (so `smft-data docs` with a small --chunk-tokens makes one chunk of three
        facts per paragraph, with ids "doc<k>#0" and "doc<k>#1")."""
        return [{"id": f"doc{k}", "text": "\n\n".join(" ".join(s for _, s in para) for para in paras)}
                for k, paras in enumerate(self._document_paragraphs())]

    def doc_qa(self) -> list[dict]:
        """One QA pair per fact the documents state, with its document id and the sentence that
        states it (which chunk teaches the fact: the one whose text holds that sentence)."""
        return [{**f.qa(), "id": f"doc{k}/{f.attribute}", "doc_id": f"doc{k}", "statement": s}
                for k, paras in enumerate(self._document_paragraphs()) for para in paras for f, s in para]

    def document_augmentations(self, n: int) -> list[dict]:
        """{"id": "doc<k>#<p>", "augmentations": [n texts]} per paragraph, for `smft-data docs
        --augmentations-file`: what Active Reading has a language model write, made from the world.
        The first text is the paragraph itself; the others cycle through its sentences reordered
        (behind a document prefix), its facts rewritten as other statements (other templates,
        prefixes and suffixes) and its facts as question-answer pairs, each in a random order."""
        from smft_dist.data.documents import PREFIXES as DOC_PREFIXES

        rng = self._rng("document-augmentations")
        grid = _paraphrase_grid()
        out = []
        for k, paras in enumerate(self._document_paragraphs()):
            for p, para in enumerate(paras):
                texts = [" ".join(s for _, s in para)]
                while len(texts) < n:
                    facts = rng.sample(para, len(para))
                    kind = len(texts) % 3
                    if kind == 1:
                        body = [s for _, s in facts]
                        texts.append(" ".join(w for w in (rng.choice(DOC_PREFIXES), *body) if w))
                    elif kind == 2:
                        texts.append(" ".join(f.statement(*rng.choice(grid)) for f, _ in facts))
                    else:
                        texts.append(" ".join(f.qa_text() for f, _ in facts))
                out.append({"id": f"doc{k}#{p}", "augmentations": texts[:n]})
        return out

    @staticmethod
    def vocabulary_texts(documents: bool = False) -> list[str]:
        """Texts holding every word the benchmark can produce (placeholders removed): train the
        tokenizer on these and no synthetic text has an unknown word. `documents`: also the words
        `smft-data docs` adds in its augmentations (prefixes, question rewrites)."""
        texts = [w for vals, _, _ in ATTRIBUTES.values() for w in vals]
        texts += FIRST + SYLLABLE_A + SYLLABLE_B + ADJ + NOUN + VERB + PLACE + PREFIXES + SUFFIXES
        texts += [t for _, temps, q in ATTRIBUTES.values() for t in temps + [q]] + FILLER_TEMPLATES
        texts.append(qa_prompt(""))
        if documents:
            from smft_dist.data.documents import PREFIXES as DOC_PREFIXES, render_question

            texts += DOC_PREFIXES + [render_question("")]
        return [re.sub(r"\{\w+\}", " ", t) for t in texts]
