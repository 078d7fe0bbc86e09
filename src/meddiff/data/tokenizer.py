"""The note tokenizer: a Hugging Face ``tokenizers`` WordLevel model fitted on training notes only.

Normalisation: NFKC + lower case; pre-tokenisation: words and punctuation runs (``\\w+|[^\\w\\s]+``).
Special tokens, in id order: ``[PAD]`` = 0, ``[UNK]``, ``[CLS]`` (first token of every sequence),
``[SEP]`` (last real token). Sequences are truncated and padded to ``max_note_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP)
#: Special tokens take ids 0 .. N_SPECIAL_TOKENS - 1; every id from here on is a word of the notes.
N_SPECIAL_TOKENS = len(SPECIAL_TOKENS)


def train_note_tokenizer(train_notes: Iterable[str], vocab_size: int, max_tokens: int) -> Tokenizer:
    """Fit a WordLevel vocabulary (at most ``vocab_size`` entries) on ``train_notes``."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=1,
                                        special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(list(train_notes), trainer=trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}, expected {expected_id}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", special_tokens=[(CLS, SPECIAL_TOKENS.index(CLS)), (SEP, SPECIAL_TOKENS.index(SEP))]
    )
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.enable_padding(pad_id=0, pad_token=PAD, length=max_tokens)
    return tokenizer


def encode_notes(tokenizer: Tokenizer, notes: Sequence[str | None], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``(N, L)`` int32 and mask ``(N, L)`` bool; a missing note is all padding."""
    ids = np.zeros((len(notes), max_tokens), dtype=np.int32)
    mask = np.zeros((len(notes), max_tokens), dtype=bool)
    present = [i for i, note in enumerate(notes) if note]
    for i, encoding in zip(present, tokenizer.encode_batch([notes[i] for i in present]), strict=True):
        ids[i] = encoding.ids
        mask[i] = np.asarray(encoding.attention_mask, dtype=bool)
    return ids, mask


def load_pretrained_tokenizer(path: str | Path, max_tokens: int) -> Tokenizer:
    """A pretrained ``tokenizer.json`` (e.g. a clinical WordPiece vocabulary) prepared like a fitted one.

    The processed contract and the model need the four special tokens at ids 0..3 in the order of
    :data:`SPECIAL_TOKENS` (``[PAD]`` = 0 pads); a tokenizer that puts them elsewhere is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preprocess.pretrained_tokenizer: {path} not found (a tokenizers tokenizer.json)")
    tokenizer = Tokenizer.from_file(str(path))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    if [ids[token] for token in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise ValueError(f"preprocess.pretrained_tokenizer {path}: special tokens must have ids "
                         f"{dict(zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS)), strict=True))}, got {ids}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", special_tokens=[(CLS, ids[CLS]), (SEP, ids[SEP])]
    )
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.enable_padding(pad_id=0, pad_token=PAD, length=max_tokens)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` written by ``preprocess``."""
    return Tokenizer.from_file(str(path))
