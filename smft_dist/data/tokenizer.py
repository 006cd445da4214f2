"""Word-level tokenizer for the synthetic benchmark, saved as a Hugging Face tokenizer folder.

Ids 0-3 are `<pad>` 0, `<s>` 1, `</s>` 2, `<unk>` 3. Nothing else assumes them: data writing and
evaluation take pad/bos/eos from whatever tokenizer folder they are given (`special_token_ids`).
Text is lowercased and split on whitespace and punctuation; `tokenizer(text)` prepends `<s>`, as
Llama tokenizers do, and `decode` joins words with spaces.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_word_tokenizer(texts: Iterable[str], out_dir: str | Path, max_vocab: int = 50_000):
    """Train a word-level vocabulary on `texts`, save it to `out_dir` (loadable with
    `AutoTokenizer.from_pretrained(out_dir)`) and return the `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(unk_token=SPECIALS["unk_token"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    trainer = WordLevelTrainer(vocab_size=max_vocab, min_frequency=1, special_tokens=list(SPECIALS.values()))
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIALS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)
    for i, name in enumerate(SPECIALS.values()):
        assert hf.convert_tokens_to_ids(name) == i, f"special token {name} must have id {i}"
    hf.save_pretrained(str(out_dir))
    return hf


def special_token_ids(tokenizer) -> dict:
    """{"pad_token_id", "bos_token_id", "eos_token_id"} of a tokenizer: what a model config carries
    (smft-export writes them into config.json) and what the MDS samples were written with."""
    return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}


def run_tokenizer_folder(model_tokenizer: str | None, data: str | None) -> Path | None:
    """The tokenizer folder of a run: its model.tokenizer, else the one its data (an MDS folder) was
    written with: the folder's smft_data.json names it, `smft-data synthetic` keeps it in a
    `tokenizer/` beside the data. None when there is none. In-run evaluation and `smft-eval` both
    look here."""
    from smft_dist.data.mds import read_info

    info = read_info(data) if data and Path(data).is_dir() else None
    for cand in (model_tokenizer, info and info.get("tokenizer"), data and Path(data).parent / "tokenizer"):
        if cand and (Path(cand) / "tokenizer_config.json").is_file():
            return Path(cand)
    return None


def load_tokenizer(path: str | Path):
    """Load any Hugging Face tokenizer folder; left padding (what batched generation needs) and a
    pad token (eos if the tokenizer has none) are set."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist: pass a Hugging Face tokenizer "
                                f"folder, e.g. the tokenizer/ written by `smft-data synthetic --out DIR`")
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok
