"""Closed-book QA: SQuAD-style F1 / exact match, and batched greedy generation over ranks.

Shape legend: B batch, S prompt length (left-padded), N new tokens.

With a row-sharded memory every forward is a collective (the all-to-all lookup), so every rank
must run the same number of forwards: generation is a fixed loop of `max_new_tokens` steps with
no early exit, and the QA list is split over ranks into slices padded to the same batch count.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from smft_dist.data.synthetic import qa_prompt

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def f1_score(prediction: str, gold: str | list[str]) -> float:
    """Token-overlap F1 of the normalised strings; the best over several gold answers."""
    if isinstance(gold, (list, tuple)):
        return max((f1_score(prediction, g) for g in gold), default=0.0)
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str | list[str]) -> float:
    if isinstance(gold, (list, tuple)):
        return max((exact_match(prediction, g) for g in gold), default=0.0)
    return float(normalize_answer(prediction) == normalize_answer(gold))


@torch.no_grad()
def greedy_generate(model, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor, max_new_tokens: int,
                    eos_id: int, pad_id: int) -> torch.Tensor:
    """Exactly `max_new_tokens` forwards (one over the prompt, then one per token) with a KV cache.
    Returns the new tokens (B, N); after a row's eos it holds pad."""
    B = input_ids_BS.shape[0]
    done_B = torch.zeros(B, dtype=torch.bool, device=input_ids_BS.device)
    mask_BS = attention_mask_BS
    # Left padding: positions count real tokens only (what `generate` does).
    pos_BS = (mask_BS.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids_BS, attention_mask=mask_BS, position_ids=pos_BS, use_cache=True)
    new = []
    for step in range(max_new_tokens):
        if step > 0:
            mask_BS = torch.cat([mask_BS, torch.ones_like(mask_BS[:, :1])], dim=1)
            pos_BS = pos_BS[:, -1:] + 1
            out = model(input_ids=new[-1][:, None], attention_mask=mask_BS, position_ids=pos_BS,
                        cache=out.cache, use_cache=True)
        tok_B = out.logits[:, -1].argmax(-1).masked_fill(done_B, pad_id)
        done_B |= tok_B == eos_id
        new.append(tok_B)
    return torch.stack(new, dim=1)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_qa(model, tokenizer, qa_pairs: list[dict], batch_size: int = 32, max_new_tokens: int = 8,
                device: str | torch.device | None = None) -> dict:
    """F1 / exact match of greedy answers to `qa_pairs` ({"prompt" or "question", "answer" or
    "answers"}). Under torch.distributed each rank answers a strided slice and the sums are
    all-reduced (every rank must call this). Returns {"f1", "exact_match", "n", "predictions"}, where
    predictions are this rank's [{"index", "prediction", "answers", "f1", "exact_match"}] (`answers`:
    the gold answers the scores took the best over)."""
    rank, world = _world()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    mine = list(range(rank, len(qa_pairs), world))
    per_rank = -(-len(qa_pairs) // world)
    n_batches = -(-per_rank // batch_size)  # the same on every rank
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    predictions, f1_sum, em_sum = [], 0.0, 0.0
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        # A rank out of questions still runs the forwards (on a dummy prompt) to keep the lockstep.
        prompts = [_prompt(qa_pairs[i]) for i in idx] or [_prompt(qa_pairs[0])]
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        new_BN = greedy_generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens,
                                 tokenizer.eos_token_id, tokenizer.pad_token_id)
        for i, tokens in zip(idx, new_BN.tolist()):
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            gold = qa_pairs[i].get("answers") or qa_pairs[i]["answer"]
            f1, em = f1_score(text, gold), exact_match(text, gold)
            f1_sum, em_sum = f1_sum + f1, em_sum + em
            predictions.append({"index": i, "prediction": text, "answers": gold if isinstance(gold, list) else [gold],
                                "f1": f1, "exact_match": em})
    model.train(was_training)
    sums = torch.tensor([f1_sum, em_sum, float(len(mine))], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(sums)
    n = int(sums[2].item())
    return {"f1": sums[0].item() / max(n, 1), "exact_match": sums[1].item() / max(n, 1), "n": n,
            "predictions": predictions}


def load_qa_jsonl(path: str | Path) -> list[dict]:
    """QA rows of a JSONL file in any layout smft_dist.data.real reads (TriviaQA, NQ-open, SimpleQA,
    the qa.jsonl of `smft-data facts`, the eval/*.jsonl of `smft-data synthetic`), each with
    `answers` = every accepted answer. Raises DataError naming the file on a missing file or row,
    and on a file without rows (its scores would be those of nothing)."""
    from smft_dist.data.loader import DataError
    from smft_dist.data.real import qa_rows
    from smft_dist.data.sources import read_rows

    rows = qa_rows(read_rows([str(path)]))
    if not rows:
        raise DataError(f"{path} holds no QA rows: pass a JSONL with one question per line")
    return rows


def _prompt(qa: dict) -> str:
    return qa["prompt"] if "prompt" in qa else qa_prompt(qa["question"])
