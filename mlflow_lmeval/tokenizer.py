"""SentencePiece behind a tiny interface: train, load, encode, decode, and the special ids."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import sentencepiece as spm

from .errors import UserError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# Byte fallback needs 256 byte pieces plus the four specials, and a few real pieces on top.
MIN_VOCAB_SIZE = 300


class Tokenizer:
    """A loaded SentencePiece model. ``model_bytes`` is the serialized model, for copying."""

    def __init__(self, model_bytes: bytes):
        self.model_bytes = model_bytes
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer not found: {path}")
        try:
            return cls(path.read_bytes())
        except (RuntimeError, OSError) as error:
            raise UserError(f"not a SentencePiece model: {path} ({error})") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def name(self) -> str:
        """An identity that changes with the model's pieces: ``sentencepiece:<sha256 prefix>``."""
        return "sentencepiece:" + hashlib.sha256(self.model_bytes).hexdigest()[:16]

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


def train_tokenizer(input_path: str | os.PathLike, vocab_size: int, output_path: str | os.PathLike) -> Tokenizer:
    """Train a unigram SentencePiece model on a text file and write it to ``output_path``.

    Training is deterministic: one thread, no sampling or shuffling of the input. Normalisation is
    off and whitespace is kept, so decoding gives back the text, which generation needs.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise UserError(f"corpus not found: {input_path}")
    if not input_path.read_text(encoding="utf-8", errors="replace").strip():
        raise UserError(f"corpus is empty: {input_path}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            input=str(input_path),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="unigram",
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            hard_vocab_limit=False,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise UserError(f"tokenizer training failed on {input_path}: {error}") from None
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_bytes(model.getvalue())
    return Tokenizer(model.getvalue())
