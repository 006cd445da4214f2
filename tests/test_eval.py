"""QA metrics, lockstep greedy generation over ranks, held-out NLL."""
import pytest
import torch

from smft_dist.data.synthetic import SyntheticWorld
from smft_dist.data.tokenizer import train_word_tokenizer
from smft_dist.eval.nll import heldout_nll
from smft_dist.eval.qa import evaluate_qa, exact_match, f1_score, greedy_generate, normalize_answer
from tests.dist.helpers import run_ranks


@pytest.mark.parametrize("pred, gold, f1, em", [
    ("tulwen", "tulwen", 1.0, 1.0),
    ("The Tulwen!", "tulwen", 1.0, 1.0),                # case, article, punctuation
    ("new york city", "New York", 0.8, 0.0),            # p 2/3, r 1 -> 0.8
    ("york new", "new york", 1.0, 0.0),                 # bag of words
    ("paris", "london", 0.0, 0.0),
    ("", "london", 0.0, 0.0),
    ("a", "the", 1.0, 1.0),                             # both normalise to empty
    ("mars planet", ["Red Planet", "Mars"], 2 / 3, 0.0),  # best over gold answers: p 1/2, r 1
    ("Planet  Mars.", ["Red Planet", "planet mars"], 1.0, 1.0),
])
def test_f1_and_exact_match(pred, gold, f1, em):
    assert f1_score(pred, gold) == pytest.approx(f1)
    assert exact_match(pred, gold) == em


def test_normalize_answer():
    assert normalize_answer("  The  Cat, an   apple & A dog. ") == "cat apple dog"


def _tiny(vocab):
    from smft_dist.model import SmftConfig, SmftForCausalLM

    torch.manual_seed(0)
    cfg = SmftConfig(vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=64, memory_layers=[1], memory_n_keys=8,
                     memory_heads=2, memory_knn=4, memory_k_dim=16, memory_value_dim=32,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return SmftForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    world = SyntheticWorld(seed=0, n_known=7, n_new=2, pretrain_docs=50, background_docs=5, heldout_docs=20)
    folder = tmp_path_factory.mktemp("tok")
    train_word_tokenizer(world.vocabulary_texts(), folder)
    from smft_dist.data.tokenizer import load_tokenizer

    return world, str(folder), load_tokenizer(folder)


def test_greedy_loop_matches_generate(setup):
    world, _, tok = setup
    model = _tiny(len(tok))
    enc = tok([q["prompt"] for q in world.known_qa()[:3]], return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any(), "the prompts must exercise left padding"
    ours = greedy_generate(model, enc["input_ids"], enc["attention_mask"], 5, tok.eos_token_id, tok.pad_token_id)
    ref = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=2)
    ref = ref[:, enc["input_ids"].shape[1]:]
    assert torch.equal(ours[:, :ref.shape[1]], ref)


def test_evaluate_qa_runs_and_is_in_range(setup):
    world, _, tok = setup
    model = _tiny(len(tok)).train()
    qa = world.known_qa()
    res = evaluate_qa(model, tok, qa, batch_size=3, max_new_tokens=3, device="cpu")
    assert res["n"] == 7 and 0.0 <= res["exact_match"] <= res["f1"] <= 1.0
    assert sorted(p["index"] for p in res["predictions"]) == list(range(7))
    assert model.training, "the model's mode is restored"
    # A prediction equal to the gold answer scores 1 (what a model that knows the fact gets).
    assert f1_score(qa[0]["answer"], qa[0]["answer"]) == 1.0


def test_heldout_nll_near_uniform_for_random_weights(setup):
    world, _, tok = setup
    model = _tiny(len(tok))
    enc = tok(world.heldout_corpus(), return_tensors="pt", padding=True, padding_side="right")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    batches = [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}]
    res = heldout_nll(model, batches)
    assert res["tokens"] == int((labels[:, 1:] != -100).sum())
    assert abs(res["nll"] - torch.log(torch.tensor(float(len(tok)))).item()) < 0.5


def _eval_rank(rank, world_size, tok_dir):
    from smft_dist.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    world = SyntheticWorld(seed=0, n_known=7, n_new=2, pretrain_docs=50, background_docs=5, heldout_docs=20)
    model = _tiny(len(tok))
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    res = evaluate_qa(model, tok, world.known_qa(), batch_size=1, max_new_tokens=3, device="cpu")
    return dict(res, forwards=len(forwards))


@pytest.mark.slow
def test_evaluate_qa_sharded_over_two_ranks_matches_one(setup):
    world, tok_dir, tok = setup
    single = evaluate_qa(_tiny(len(tok)), tok, world.known_qa(), batch_size=1, max_new_tokens=3, device="cpu")
    r0, r1 = run_ranks(_eval_rank, 2, tok_dir)  # 7 questions: 4 + 3, the short rank runs a dummy batch
    assert [p["index"] for p in r0["predictions"]] == [0, 2, 4, 6]
    assert [p["index"] for p in r1["predictions"]] == [1, 3, 5]
    assert r0["forwards"] == r1["forwards"] == 4 * 3, "every rank runs the same forwards (sharded memory)"
    for r in (r0, r1):
        assert r["n"] == 7 and r["f1"] == pytest.approx(single["f1"]) and r["exact_match"] == pytest.approx(single["exact_match"])
    by_index = {p["index"]: p["prediction"] for p in r0["predictions"] + r1["predictions"]}
    assert by_index == {p["index"]: p["prediction"] for p in single["predictions"]}
