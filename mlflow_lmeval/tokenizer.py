"""The tokenizer protocol the evaluator relies on, and SentencePiece (and Hugging Face ``tokenizers``)
behind it: train, load, encode, decode, and the special ids."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece as spm
from tokenizers import Tokenizer as HFBackend

from .chat_template import read_templates
from .errors import UserError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# Byte fallback needs 256 byte pieces plus the four specials, and a few real pieces on top.
MIN_VOCAB_SIZE = 300
# The named special tokens of transformers' special_tokens_map (chat templates see them by name).
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@runtime_checkable
class TokenizerProtocol(Protocol):
    """What the evaluator asks of a tokenizer; ``Tokenizer`` and ``HFTokenizer`` are two.

    ``encode`` adds no special tokens: the evaluator puts ``bos_id`` (else ``eos_id``) before an
    empty context itself, as lm-eval's ``hf`` backend does, and ``eos_id`` ends generation. An
    optional ``name`` names the tokenizer in lm-eval's request-cache key (else its class does).
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


TOKENIZER_MEMBERS = ("vocab_size", "bos_id", "eos_id", "encode", "decode")
_METHODS = ("encode", "decode")


def check_tokenizer(tokenizer) -> None:
    """One UserError naming every member of ``TokenizerProtocol`` that ``tokenizer`` lacks."""
    missing = [m for m in TOKENIZER_MEMBERS if not hasattr(tokenizer, m)]
    missing += [f"{m} (not callable)" for m in _METHODS if m not in missing and not callable(getattr(tokenizer, m))]
    if missing:
        raise UserError(f"the tokenizer ({type(tokenizer).__name__}) lacks {', '.join(missing)}: a tokenizer needs "
                        "vocab_size, bos_id, eos_id, encode(str) -> list[int] and decode(list[int]) -> str")


class Tokenizer:
    """A loaded SentencePiece model. ``model_bytes`` is the serialized model, for copying."""

    def __init__(self, model_bytes: bytes):
        self.model_bytes = model_bytes
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
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

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The pieces of the special ids the model has (a chat template sees ``bos_token``, ...)."""
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id, "pad_token": self.pad_id}
        return {key: self._sp.id_to_piece(i) for key, i in ids.items() if i >= 0}

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


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer.json behind the same interface as ``Tokenizer``.

    It follows lm-eval's ``hf`` backend: ``encode`` adds no special tokens (the evaluator adds the
    prefix token itself), ``decode`` drops them. BOS, EOS and PAD come from tokenizer_config.json,
    as ``transformers.AutoTokenizer`` reads them; a token that is not set there is None. Its chat
    templates (``chat_templates``) come from the directory as transformers finds them
    (chat_template.py). Nothing is ever fetched from a hub.
    """

    def __init__(self, tokenizer_json: bytes, special_tokens: dict | None = None, chat_templates: dict | None = None):
        self.tokenizer_json = tokenizer_json
        self._tokenizer = HFBackend.from_str(tokenizer_json.decode("utf-8"))
        self._special = special_tokens or {}
        # name -> chat_template.ChatTemplate: the directory's own chat templates (none: {})
        self.chat_templates = chat_templates or {}

    @classmethod
    def load(cls, directory: str | os.PathLike) -> HFTokenizer:
        """Read ``directory/tokenizer.json`` and, when present, ``directory/tokenizer_config.json``."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"tokenizer not found: {path}")
        config_path = directory / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        except ValueError as error:
            raise UserError(f"not valid JSON: {config_path} ({error})") from None
        templates = read_templates(directory, config)
        try:
            return cls(path.read_bytes(), config, templates)
        except Exception as error:  # tokenizers raises its own exception types
            raise UserError(f"not a Hugging Face tokenizer.json: {path} ({error})") from None

    def _special_token(self, key: str) -> str | None:
        token = self._special.get(key)
        if isinstance(token, dict):  # the older AddedToken form: {"content": "<s>", ...}
            token = token.get("content")
        return token if isinstance(token, str) and token else None

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The special tokens tokenizer_config.json names, as strings (what a chat template sees as
        ``bos_token``, ``eos_token``, ...), as transformers' ``special_tokens_map``."""
        return {key: token for key in _SPECIAL_TOKEN_KEYS if (token := self._special_token(key))}

    def _special_id(self, key: str) -> int | None:
        token = self._special_token(key)
        if not token:
            return None
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise UserError(f"tokenizer_config.json: {key} {token!r} is not in the vocabulary")
        return token_id

    @property
    def name(self) -> str:
        """An identity of the tokenizer's behaviour: a digest of tokenizer.json and its specials."""
        digest = hashlib.sha256(self.tokenizer_json)
        digest.update(repr([self.bos_id, self.eos_id, self.pad_id]).encode())
        return "hf-tokenizers:" + digest.hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_id(self) -> int | None:
        return self._special_id("unk_token")

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
