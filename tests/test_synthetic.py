"""The synthetic knowledge benchmark and its tokenizer (the real layouts: tests/test_real_data.py)."""

import pytest

from smft_dist.data.synthetic import SyntheticWorld
from smft_dist.data.tokenizer import load_tokenizer, train_word_tokenizer

SMALL = dict(n_known=30, n_new=20, paraphrases=64, pretrain_docs=400, background_docs=50, heldout_docs=40)


def _snapshot(world):
    return (world.pretrain_corpus(), world.background_corpus(), world.heldout_corpus(),
            world.new_fact_statements(), world.known_qa(), world.new_qa())


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = SyntheticWorld(seed=1, **SMALL), SyntheticWorld(seed=1, **SMALL), SyntheticWorld(seed=2, **SMALL)
    assert _snapshot(a) == _snapshot(b)
    for x, y in zip(_snapshot(a), _snapshot(c)):
        assert x != y


def test_new_facts_have_distinct_paraphrases_and_one_qa():
    world = SyntheticWorld(seed=0, **SMALL)
    statements, qa = world.new_fact_statements(), world.new_qa()
    assert len(statements) == len(qa) == 20
    for fact, paras, pair in zip(world.new, statements, qa):
        assert len(set(paras)) == len(paras) >= 64
        assert all(fact.name in s and fact.value in s.split() for s in paras)
        assert pair["answer"] == fact.value and fact.name in pair["prompt"] and pair["prompt"].endswith("A:")
    known_names = {f.name for f in world.known}
    assert not known_names & {f.name for f in world.new}, "new facts must be about people absent from pretraining"
    assert all(len(f.name.split()) == 3 for f in world.known + world.new), "names are multi-token"


def test_pretraining_mix_and_heldout():
    world = SyntheticWorld(seed=0, **SMALL)
    corpus = world.pretrain_corpus()
    known = world.known
    fact_docs = [d for d in corpus if any(f.name in d for f in known)]
    assert len(fact_docs) == 300  # 75% of 400
    assert sum(d.startswith("Q:") for d in fact_docs) > 50  # QA form is in pretraining
    for qa in world.known_qa():  # every known fact's QA appears verbatim
        assert f"{qa['prompt']} {qa['answer']}" in corpus
    assert not set(world.heldout_corpus()) & set(corpus)
    assert set(world.background_corpus()) <= set(corpus)


def test_qa_people_fraction_keeps_the_other_peoples_facts_to_statements():
    # docs/design.md §5.1: half the known people are never asked about in pretraining.
    world = SyntheticWorld(seed=0, qa_people_fraction=0.5, **SMALL)
    corpus = set(world.pretrain_corpus())
    flags = [qa["qa_in_pretraining"] for qa in world.known_qa()]
    assert flags == [f.index // 6 < 2 for f in world.known]  # 5 people, round(2.5) = 2 of them asked
    for fact, asked in zip(world.known, flags):
        assert (fact.qa_text() in corpus) == asked
        assert any(fact.name in d and not d.startswith("Q:") for d in corpus)  # stated either way
    default = SyntheticWorld(seed=0, **SMALL)  # 1.0: the corpus is unchanged
    assert default.pretrain_corpus() == SyntheticWorld(seed=0, qa_people_fraction=1.0, **SMALL).pretrain_corpus()
    assert all(qa["qa_in_pretraining"] for qa in default.known_qa())


def test_qa_rewrites_replace_the_last_paraphrases_with_the_qa_text():
    plain, rewritten = SyntheticWorld(seed=0, **SMALL), SyntheticWorld(seed=0, qa_rewrites=4, **SMALL)
    for fact, a, b in zip(plain.new, plain.new_fact_statements(), rewritten.new_fact_statements()):
        assert a[:60] == b[:60] and len(b) == 64
        assert b[60] == fact.qa_text() and all(t.endswith(fact.qa_text()) for t in b[60:])
    with pytest.raises(ValueError, match="qa_rewrites"):
        SyntheticWorld(qa_rewrites=65, paraphrases=64)


def test_documents_state_every_doc_fact_and_leave_the_rest_of_the_world_alone(tmp_path):
    # Document QA data for `smft-data docs`: facts about people nobody else in the world has.
    plain, world = SyntheticWorld(seed=0, **SMALL), SyntheticWorld(seed=0, n_docs=5, **SMALL)
    assert _snapshot(plain) == _snapshot(world) and plain.doc_people == []
    docs, qa = world.new_documents(), world.doc_qa()
    assert len(docs) == 5 and len(qa) == 30 and len({q["id"] for q in qa}) == 30
    others = {f.name for f in world.known + world.new}
    for doc, facts in zip(docs, world.doc_people):
        assert len(doc["text"].split("\n\n")) == 2 and facts[0].name not in others
        assert all(f.value in doc["text"].split() and f.name in doc["text"] for f in facts)
    from smft_dist.data.documents import augment, split_chunks

    tok = train_word_tokenizer(world.vocabulary_texts(documents=True), tmp_path / "tok")
    chunks = split_chunks(docs[0]["id"], docs[0]["text"], lambda t: len(t.split()), 40)
    texts = [t for c in chunks for t in augment(c, 16)]
    assert len(chunks) == 2 and any(t.startswith("Q:") for t in texts)
    assert not any(tok.unk_token_id in tok(t)["input_ids"] for t in texts)  # the augmentations' words are known
    # The world's own augmentations (what Active Reading writes): one entry per chunk, the chunk
    # first, then reorderings, rewritten statements and QA pairs of exactly that chunk's facts.
    augs = {a["id"]: a["augmentations"] for a in world.document_augmentations(12)}
    assert [augs[c["id"]][0] for c in chunks] == [c["text"] for c in chunks]
    for c in chunks:
        facts = [q for q in qa if q["doc_id"] == "doc0" and q["statement"] in c["text"]]
        assert len(facts) == 3 and len(augs[c["id"]]) == 12
        assert all(t.count("Q:") == 3 for t in augs[c["id"]][3::3])
        assert all(all(q["answer"] in t.split() for q in facts) for t in augs[c["id"]])
        assert not any(tok.unk_token_id in tok(t)["input_ids"] for t in augs[c["id"]])
    assert sum(len(c["text"].split("\n\n")) for c in docs) == len(augs) == 10


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="paraphrases"):
        SyntheticWorld(paraphrases=10_000)
    with pytest.raises(ValueError, match="n_known"):
        SyntheticWorld(n_known=0)


def test_word_tokenizer_covers_the_world(tmp_path):
    world = SyntheticWorld(seed=0, **SMALL)
    train_word_tokenizer(world.vocabulary_texts(), tmp_path / "tok")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert 300 < len(tok) < 600  # a word-level vocabulary of a few hundred words (docs/design.md §5)
    texts = world.pretrain_corpus() + world.heldout_corpus() + sum(world.new_fact_statements(), [])
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    assert all(3 not in x for x in ids), "no unknown words"
    enc = tok(world.known_qa()[0]["prompt"])["input_ids"]
    assert enc[0] == 1  # <s> first, as for Llama tokenizers
    # Words come back joined by single spaces (punctuation is its own word).
    assert tok.decode(enc, skip_special_tokens=True).replace(" :", ":") == world.known_qa()[0]["prompt"].lower()
    assert load_tokenizer(tmp_path / "tok").padding_side == "left"
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        load_tokenizer(tmp_path / "missing")
