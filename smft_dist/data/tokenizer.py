"""Word-level tokenizer for the synthetic benchmark, saved as a Hugging Face tokenizer folder.

Ids 0-3 are `<pad>` 0, `<s>` 1, `</s>` 2, `<unk>` 3. Nothing else assumes them: data writing and
evaluation take pad/bos/eos from whatever tokenizer folder they are given (`special_token_ids`).
Text is lowercased and split on whitespace and punctuation; `tokenizer(text)` prepends `<s>`, as
Llama tokenizers do, and `decode` joins words with spaces.

Tokenizer identity: `tokenizer_fingerprint` hashes what decides the ids a text gets. `smft-data`
writes it into smft_data.json, a run's checkpoints record the one their weights were trained for,
and a run (`check_same_tokenizer`), smft-eval and smft-export refuse a tokenizer that differs.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Optional

from smft_dist.errors import UserError

log = logging.getLogger("smft_dist")

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

    if model_tokenizer and Path(model_tokenizer).is_dir() and not (Path(model_tokenizer) / "tokenizer_config.json").is_file():
        from smft_dist.data.loader import DataError  # the user's choice: never silently another one

        raise DataError(f"model.tokenizer={model_tokenizer} holds no tokenizer_config.json: set it to a Hugging "
                        f"Face tokenizer folder")
    info = read_info(data) if data and Path(data).is_dir() else None
    for cand in (model_tokenizer, info and info.get("tokenizer"), data and Path(data).parent / "tokenizer"):
        if cand and (Path(cand) / "tokenizer_config.json").is_file():
            return Path(cand)
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def open_tokenizer(path: str | Path):
    """`AutoTokenizer.from_pretrained(path)` as saved; a missing folder, one without tokenizer
    files, or a damaged or foreign file in it raises a `DataError` naming the folder."""
    from transformers import AutoTokenizer

    from smft_dist.data.loader import DataError
    from smft_dist.errors import READ_ERRORS, reason

    fix = "pass a Hugging Face tokenizer folder, e.g. the tokenizer/ written by `smft-data synthetic --out DIR`"
    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist: {fix}")
    if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise DataError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): {fix}")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except READ_ERRORS as e:
        raise DataError(f"tokenizer folder {path} is unreadable ({reason(e)}): a file in it is damaged or not a "
                        f"tokenizer's; save the tokenizer again, or {fix}") from None


def load_tokenizer(path: str | Path):
    """Load any Hugging Face tokenizer folder (`open_tokenizer`); left padding (what batched
    generation needs) and a pad token (eos if the tokenizer has none) are set."""
    tok = open_tokenizer(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


FINGERPRINT_KEY = "tokenizer_fingerprint"  # in smft_data.json and a checkpoint's meta.json
# Text whose ids pin down what the vocabulary alone does not: normalisation (case, Unicode forms,
# ligatures, accents), pre-tokenisation (runs of spaces, tabs, newlines, punctuation, digits,
# apostrophes), a BPE/unigram model's merges or scores, byte fallback (emoji, CJK), and whether the
# special tokens' text is parsed as those tokens.
FINGERPRINT_PROBE = ("The Quick  brown fox's 12,345.67 km\tin 2024-01-31 \u2014 \u00dcn\u00efcode caf\u00e9 "
                     "\ufb01 na\u00efve; \u65e5\u672c\u8a9e \U0001f600 <s> </s> <unk>\n  end.")


class TokenizerMismatchError(UserError, ValueError):
    """Data, weights or a tokenizer folder of different tokenizers (token ids differ between them)."""


def tokenizer_fingerprint(tokenizer) -> str:
    """16 hex digits (SHA-256) of what decides the ids a text gets from `tokenizer`:

    - the vocabulary mapping, token -> id, added and special tokens included (`get_vocab()`): any
      change of an id changes the hash;
    - the bos/eos/unk ids: the data writer adds bos and eos itself, and unknown text becomes unk;
    - the ids of `FINGERPRINT_PROBE`, encoded plain (what the data writer does) and with the
      tokenizer's own special tokens (what evaluation does): this catches what the mapping leaves
      out, e.g. a tokenizer that no longer lowercases, or BPE merges in another order, with the
      same vocabulary.

    Not hashed: the files' bytes or serialised JSON (a re-save, or a newer tokenizers release
    writing new default fields, would change them while every id stays), the pad id (padding is
    masked out of attention and loss; `load_tokenizer` sets pad = eos when there is none),
    padding side, model_max_length and the tokenizer class name. A re-saved tokenizer keeps its
    fingerprint; one whose ids differ on the probe or anywhere in the vocabulary gets another.
    """
    identity = {
        "vocab": sorted((i, t) for t, i in tokenizer.get_vocab().items()),
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id],
        "probe": tokenizer(FINGERPRINT_PROBE, add_special_tokens=False)["input_ids"],
        "probe_with_special_tokens": tokenizer(FINGERPRINT_PROBE)["input_ids"],
    }
    blob = json.dumps(identity, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_same_tokenizer(have: Optional[str], have_what: str, want: Optional[str], want_what: str, fix: str,
                         allow: Optional[str] = None) -> None:
    """Refuse `have` (a fingerprint, e.g. the data's) where `want` (the weights') differs; each
    `*_what` names where it comes from, `fix` how to put it right. Either one None (written before
    fingerprints were recorded): a warning, nothing is refused. `allow`: the opt-in in force (e.g.
    "checkpoint.allow_tokenizer_change"): a mismatch is then a warning naming it."""
    if have is None or want is None:
        missing = have_what if have is None else want_what
        log.warning("tokenizer identity not checked: %s records no tokenizer fingerprint (written before "
                    "fingerprints were recorded); make sure it belongs to the same tokenizer as %s",
                    missing, want_what if have is None else have_what)
        return
    if have == want:
        return
    what = (f"{have_what} has tokenizer fingerprint {have} but {want_what} has {want}: the two tokenizers give "
            f"different token ids")
    if allow:
        log.warning("%s; continuing (%s)", what, allow)
        return
    raise TokenizerMismatchError(f"{what}; {fix}")


def check_tokenizer_of_checkpoint(tokenizer, what: str, meta: dict, step_dir) -> None:
    """`tokenizer` (named `what`; smft-eval's or smft-export's --tokenizer) against the fingerprint
    a checkpoint's meta.json records: the tokenizer of the data its weights were trained on."""
    trained = meta.get("tokenizer_folder") or "the tokenizer the model was trained with"
    check_same_tokenizer(tokenizer_fingerprint(tokenizer), what, meta.get(FINGERPRINT_KEY),
                         f"checkpoint {step_dir} (its meta.json)", fix=f"pass --tokenizer {trained}")
