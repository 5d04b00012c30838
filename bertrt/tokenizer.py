"""BERT WordPiece tokenizer backed by the Hugging Face ``tokenizers`` library.

One tokenizer serves training and inference. Its pipeline is the reference BERT one:

1. ``BertNormalizer``: drop NUL, U+FFFD and control characters, map whitespace to spaces, put
   spaces around CJK ideographs, optionally strip accents (NFD, drop ``Mn``) and lower-case;
2. ``BertPreTokenizer``: split on whitespace and around every punctuation character;
3. ``WordPiece``: greedy longest-match-first pieces, ``##`` for continuations, ``[UNK]`` for a word
   with no decomposition or longer than 100 characters;
4. ``TemplateProcessing``: ``[CLS] A [SEP]`` (type ids 0) and ``[CLS] A [SEP] B [SEP]`` (B and its
   ``[SEP]`` get type id 1).

The five special tokens are registered as added tokens, so ``"[MASK]"`` written in a text is the
mask token, as in transformers' ``BertTokenizer``. The output is identical to transformers'
``BertTokenizer`` (``tests/tokenizer`` checks it); see ``docs/tokenizer.md``.

Example:
    >>> tok = Tokenizer.from_dir("model_dir")
    >>> enc = tok(["a text", "another"], ["a pair", "b"], max_length=128)
    >>> enc["input_ids"].shape  # (batch, seq), int64
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import WordPiece

from bertrt.errors import BertrtError, invalid_utf8_message
from bertrt.fileio import atomic_write_text
from bertrt.padding import length_mask, pad_rows

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "TokenizerError", "train_vocab"]

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
# The order train_vocab assigns: ids 0..4.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK)
MAX_INPUT_CHARS_PER_WORD = 100
DEFAULT_MODEL_MAX_LENGTH = 512
# transformers writes int(1e30) as model_max_length when a checkpoint states no limit.
_UNBOUNDED_MODEL_MAX_LENGTH = 2**31

VOCAB_FILE = "vocab.txt"
CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"

_PADDING_MODES = {"longest": "longest", True: "longest", "max_length": "max_length",
                  False: None, "do_not_pad": None}
_TRAIN_BATCH_LINES = 1000
#: Splits a whitespace-free chunk where BERT's pre-tokenizer would (punctuation, `_`), near
#: enough to find the words longer than `MAX_INPUT_CHARS_PER_WORD`.
_WORD_BREAKS = re.compile(r"[\W_]+")
# What pickling keeps: the constructor's arguments (each an attribute `_<name>`).
_STATE = ("tokens", "lowercase", "strip_accents", "tokenize_chinese_chars", "model_max_length")


class TokenizerError(BertrtError):
    """A tokenizer file or argument is unusable; one line naming what and why (a ValueError)."""


def _read_vocab_file(path: Path) -> list[str]:
    """Read a ``vocab.txt``: one token per line, the line number (from 0) is the id."""
    name = path.name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: vocabulary file not found") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read vocabulary file ({e.strerror})") from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":  # the newline that ends the last line
        lines.pop()
    tokens: list[str] = []
    for lineno, raw in enumerate(lines, start=1):
        try:
            token = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TokenizerError(f"{name}: line {lineno} is not valid UTF-8") from None
        token = token.removesuffix("\r")  # CRLF files: the \r is not part of the token
        if token == "":
            raise TokenizerError(f"{name}: line {lineno} is empty (expected one token per line)")
        tokens.append(token)
    if not tokens:
        raise TokenizerError(f"{name}: vocabulary file is empty")
    return tokens


def _vocab_to_list(vocab: Mapping[str, int] | Sequence[str], source: str) -> list[str]:
    """Check that ``vocab`` maps its tokens one-to-one onto ids 0..n-1; return tokens by id."""
    if isinstance(vocab, Mapping):
        tokens: list[str | None] = [None] * len(vocab)
        for token, i in vocab.items():
            if not isinstance(i, int) or not 0 <= i < len(vocab) or tokens[i] is not None:
                raise TokenizerError(
                    f"{source}: token ids must be 0..{len(vocab) - 1}, each used once "
                    f"(token {token!r} has id {i!r})"
                )
            tokens[i] = token
        out = [t for t in tokens if t is not None]
    else:
        out = list(vocab)
    seen: dict[str, int] = {}
    for i, token in enumerate(out):
        if not isinstance(token, str) or token == "":
            raise TokenizerError(f"{source}: token {i} is {token!r} (expected a non-empty str)")
        if token in seen:
            raise TokenizerError(f"{source}: line {i + 1} repeats token {token!r} of line "
                                 f"{seen[token] + 1}")
        seen[token] = i
    missing = [t for t in SPECIAL_TOKENS if t not in seen]
    if missing:
        raise TokenizerError(f"{source}: missing special token{'s' if len(missing) > 1 else ''} "
                             f"{' '.join(missing)}")
    return out


def _bert_pipeline(vocab: dict[str, int] | None, lowercase: bool, strip_accents: bool | None,
                   tokenize_chinese_chars: bool) -> tokenizers.Tokenizer:
    """A WordPiece model (``vocab``; None: empty, to be trained) behind BERT's normalizer and
    pre-tokenizer: the one place the encoder and the vocabulary trainer take them from."""
    tok = tokenizers.Tokenizer(
        WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD)
    )
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
        strip_accents=strip_accents, lowercase=lowercase,
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def _build_backend(vocab: dict[str, int], lowercase: bool, strip_accents: bool | None,
                   tokenize_chinese_chars: bool) -> tokenizers.Tokenizer:
    """The encoding backend: the BERT pipeline, the wordpiece decoder, specials, template."""
    tok = _bert_pipeline(vocab, lowercase, strip_accents, tokenize_chinese_chars)
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # As transformers' BertTokenizer: specials match verbatim in raw text (not normalized).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])],
    )
    return tok


def _check_bool(value: Any, what: str, allow_none: bool = False) -> bool | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise TokenizerError(f"{what} must be {'true, false or null' if allow_none else 'a bool'}"
                             f", got {value!r}")
    return value


def _check_max_length(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TokenizerError(f"{what} must be a positive int, got {value!r}")
    return value


class Tokenizer:
    """BERT WordPiece tokenizer with batch encoding to numpy.

    Instances are immutable and thread-safe: the ``tokenizers`` backend never has truncation or
    padding enabled (both are done here, per call), so no call changes shared state. They pickle
    (for data-loader workers).

    Args:
        vocab: tokens in id order, or a mapping token -> id covering ids 0..n-1 exactly once.
            Must contain ``[PAD] [UNK] [CLS] [SEP] [MASK]``.
        lowercase: lower-case the text (an uncased vocabulary).
        strip_accents: strip accents; ``None`` follows ``lowercase`` (as the original BERT).
        tokenize_chinese_chars: split every CJK ideograph into its own word.
        model_max_length: the default ``max_length`` of ``__call__`` (the model's positions).

    Raises:
        TokenizerError: the vocabulary is malformed or lacks a special token.
    """

    def __init__(self, vocab: Mapping[str, int] | Sequence[str], *, lowercase: bool = True,
                 strip_accents: bool | None = None, tokenize_chinese_chars: bool = True,
                 model_max_length: int = DEFAULT_MODEL_MAX_LENGTH, _source: str = "vocab"):
        self._tokens = _vocab_to_list(vocab, _source)
        self._lowercase = _check_bool(lowercase, "lowercase")
        self._strip_accents = _check_bool(strip_accents, "strip_accents", allow_none=True)
        self._tokenize_chinese_chars = _check_bool(tokenize_chinese_chars,
                                                   "tokenize_chinese_chars")
        self._model_max_length = _check_max_length(model_max_length, "model_max_length")
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._vocab = {t: i for i, t in enumerate(self._tokens)}
        self._backend = _build_backend(self._vocab, self._lowercase, self._strip_accents,
                                       self._tokenize_chinese_chars)
        self._special_ids = frozenset(self._vocab[t] for t in SPECIAL_TOKENS)

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, f"_{name}") for name in _STATE}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in _STATE:
            setattr(self, f"_{name}", state[name])
        self._init_runtime()

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], what: str = "vocab") -> Tokenizer:
        """A model dir's tokenizer (`from_dir`), or a `vocab.txt` (`from_vocab`, uncased);
        `what` names the option or argument in the error for a missing path."""
        p = Path(path)
        if not p.exists():
            raise TokenizerError(f"{what} {p}: no such file or directory")
        return cls.from_dir(p) if p.is_dir() else cls.from_vocab(p)

    @classmethod
    def from_vocab(cls, path: str | os.PathLike[str], lowercase: bool = True,
                   strip_accents: bool | None = None, tokenize_chinese_chars: bool = True,
                   model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> Tokenizer:
        """Load a ``vocab.txt`` (one token per line; the line index is the id).

        Args:
            path: the vocabulary file.
            lowercase: lower-case the text (uncased vocabulary).
            strip_accents: strip accents; ``None`` follows ``lowercase``.
            tokenize_chinese_chars: split CJK ideographs into single-character words.
            model_max_length: the default truncation length.

        Raises:
            TokenizerError: missing or unreadable file, empty line, invalid UTF-8, duplicate
                token, or a missing special token.
        """
        path = Path(path)
        return cls(_read_vocab_file(path), lowercase=lowercase, strip_accents=strip_accents,
                   tokenize_chinese_chars=tokenize_chinese_chars,
                   model_max_length=model_max_length, _source=path.name)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load the tokenizer of a Hugging Face-layout model directory.

        Reads ``vocab.txt`` with the settings of ``tokenizer_config.json`` (``do_lower_case``,
        ``strip_accents``, ``tokenize_chinese_chars``, ``model_max_length``; each optional). A
        directory without ``vocab.txt`` is read from ``tokenizer.json`` (a WordPiece model; its
        ``BertNormalizer`` gives the settings unless ``tokenizer_config.json`` states them). The
        truncation and padding stored in a ``tokenizer.json`` are ignored.

        Args:
            path: the directory.

        Raises:
            TokenizerError: the directory holds neither file, or one of them is malformed.
        """
        d = Path(path)
        if not d.is_dir():
            raise TokenizerError(f"{d}: not a directory")
        settings = _read_config(d / CONFIG_FILE) if (d / CONFIG_FILE).exists() else {}
        if (d / VOCAB_FILE).exists():
            return cls.from_vocab(d / VOCAB_FILE, **settings)
        if (d / TOKENIZER_FILE).exists():
            try:
                backend = tokenizers.Tokenizer.from_file(str(d / TOKENIZER_FILE))
            except Exception as e:  # the library raises a bare Exception on parse errors
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise TokenizerError(f"{d / TOKENIZER_FILE}: cannot load ({msg})") from None
            return cls.from_tokenizers(backend, _source=TOKENIZER_FILE, **settings)
        raise TokenizerError(f"{d}: neither {VOCAB_FILE} nor {TOKENIZER_FILE} found")

    @classmethod
    def from_tokenizers(cls, tok: tokenizers.Tokenizer, *, lowercase: bool | None = None,
                        strip_accents: bool | None = None,
                        tokenize_chinese_chars: bool | None = None,
                        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
                        _source: str = "tokenizers.Tokenizer") -> Tokenizer:
        """Build from a ``tokenizers.Tokenizer`` with a WordPiece model (e.g. a ``tokenizer.json``).

        Only the vocabulary and the ``BertNormalizer`` settings are taken; the pipeline is
        rebuilt, so truncation, padding or extra added tokens of ``tok`` do not carry over.

        Args:
            tok: the source tokenizer.
            lowercase: overrides the normalizer's ``lowercase`` (default: taken from ``tok``,
                else True).
            strip_accents: overrides the normalizer's ``strip_accents`` (only used when
                ``lowercase`` is given too or the normalizer is not a BertNormalizer).
            tokenize_chinese_chars: overrides the normalizer's ``handle_chinese_chars``.
            model_max_length: the default truncation length.

        Raises:
            TokenizerError: the model is not WordPiece, or its vocabulary is unusable.
        """
        if not isinstance(tok.model, WordPiece):
            raise TokenizerError(f"{_source}: expected a WordPiece model, got "
                                 f"{type(tok.model).__name__}")
        norm = tok.normalizer  # its settings, without serialising the whole tokenizer
        if isinstance(norm, normalizers.BertNormalizer):
            if lowercase is None:
                lowercase = bool(norm.lowercase)
                strip_accents = norm.strip_accents
            if tokenize_chinese_chars is None:
                tokenize_chinese_chars = bool(norm.handle_chinese_chars)
        vocab = tok.get_vocab(with_added_tokens=False)
        return cls(vocab, lowercase=True if lowercase is None else lowercase,
                   strip_accents=strip_accents,
                   tokenize_chinese_chars=(True if tokenize_chinese_chars is None
                                           else tokenize_chinese_chars),
                   model_max_length=model_max_length, _source=_source)

    # ------------------------------------------------------------------------------- properties

    @property
    def vocab(self) -> dict[str, int]:
        """A copy of the vocabulary, token -> id."""
        return dict(self._vocab)

    @property
    def vocab_size(self) -> int:
        """Number of tokens, specials included."""
        return len(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def pad_id(self) -> int:
        """Id of ``[PAD]``."""
        return self._vocab[PAD]

    @property
    def cls_id(self) -> int:
        """Id of ``[CLS]``."""
        return self._vocab[CLS]

    @property
    def sep_id(self) -> int:
        """Id of ``[SEP]``."""
        return self._vocab[SEP]

    @property
    def mask_id(self) -> int:
        """Id of ``[MASK]``."""
        return self._vocab[MASK]

    @property
    def unk_id(self) -> int:
        """Id of ``[UNK]``."""
        return self._vocab[UNK]

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the five special tokens."""
        return self._special_ids

    @property
    def lowercase(self) -> bool:
        """Whether text is lower-cased (uncased vocabulary)."""
        return self._lowercase

    @property
    def strip_accents(self) -> bool | None:
        """Whether accents are stripped; ``None`` means "as ``lowercase``"."""
        return self._strip_accents

    @property
    def tokenize_chinese_chars(self) -> bool:
        """Whether CJK ideographs are split into single-character words."""
        return self._tokenize_chinese_chars

    @property
    def model_max_length(self) -> int:
        """Default ``max_length`` for truncation."""
        return self._model_max_length

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (no truncation, no padding; do not mutate)."""
        return self._backend

    def id_to_token(self, i: int) -> str:
        """The token of id ``i``.

        Raises:
            KeyError: ``i`` is not an id of the vocabulary.
        """
        if isinstance(i, bool) or not 0 <= int(i) < len(self._tokens):
            raise KeyError(f"id {i!r} is not in the vocabulary (size {len(self._tokens)})")
        return self._tokens[int(i)]

    def token_to_id(self, token: str) -> int:
        """The id of ``token``.

        Raises:
            KeyError: ``token`` is not in the vocabulary.
        """
        try:
            return self._vocab[token]
        except KeyError:
            raise KeyError(f"token {token!r} is not in the vocabulary") from None

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, lowercase={self._lowercase}, "
                f"strip_accents={self._strip_accents}, model_max_length={self._model_max_length})")

    # -------------------------------------------------------------------------------- encoding

    def _resolve_max_length(self, max_length: int | None, truncation: bool,
                            is_pair: bool) -> int | None:
        """The truncation length (None: no truncation), checked against the specials."""
        if not truncation:
            return None
        if max_length is None:
            max_length = self._model_max_length
        max_length = _check_max_length(max_length, "max_length")
        n_special = 3 if is_pair else 2
        if max_length < n_special:
            raise TokenizerError(f"max_length={max_length} leaves no room for the {n_special} "
                                 f"special tokens of a {'pair' if is_pair else 'single text'}")
        return max_length

    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into wordpieces, without special tokens and without truncation.

        Args:
            text: the text.

        Returns:
            The wordpieces, e.g. ``["un", "##aff", "##able"]``.
        """
        _check_text(text, "text")
        with _invalid_text_named(text=text):
            return self._backend.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, pair: str | None = None,
               max_length: int | None = None) -> list[int]:
        """Encode one text (or pair) to ids with ``[CLS]``/``[SEP]``.

        Args:
            text: the first sequence.
            pair: the optional second sequence.
            max_length: truncate (longest first) to this many ids; ``None`` does not truncate.

        Returns:
            The ids.
        """
        _check_text(text, "text")
        if pair is not None:
            _check_text(pair, "pair")
        limit = self._resolve_max_length(max_length, max_length is not None, pair is not None)
        with _invalid_text_named(text=text, pair=pair):
            enc = self._backend.encode(text, pair)
        return _truncate(limit, pair is not None, enc.ids, enc.type_ids)[0]

    def __call__(self, texts: str | Sequence[str], pairs: str | Sequence[str] | None = None, *,
                 max_length: int | None = None, padding: str | bool = "longest",
                 truncation: bool | str = True, return_offsets: bool = False,
                 pad_to_multiple_of: int | None = None) -> dict[str, Any]:
        """Encode a batch of texts (or text pairs) to numpy arrays.

        Args:
            texts: one text or a list of texts (a single str gives a batch of 1).
            pairs: the second sequences, as many as ``texts``.
            max_length: truncation length and the ``"max_length"`` padding length; default
                ``model_max_length``.
            padding: ``"longest"`` (or True): pad to the longest sequence of the batch;
                ``"max_length"``: pad to ``max_length`` (or longer if ``truncation=False`` lets
                a longer sequence through); False or ``"do_not_pad"``: no padding, each key
                maps to a list of 1-D arrays.
            truncation: True (or ``"longest_first"``): cut tokens from the end of the longer
                sequence of a pair (both halves of the budget when both are long) until the ids,
                specials included, fit in ``max_length``. False: keep everything.
            return_offsets: add ``offsets``: the ``(start, end)`` character span of each token
                in its own text; ``(0, 0)`` for special and padding tokens.
            pad_to_multiple_of: round the padded length up to a multiple of this.

        Returns:
            ``input_ids``, ``token_type_ids``, ``attention_mask``: int64 arrays of shape
            ``(batch, seq)`` (``offsets``: ``(batch, seq, 2)``), right-padded with ``pad_id``
            (type id 0, mask 0). Without padding, lists of per-sequence arrays instead.

        Raises:
            TokenizerError: bad arguments (e.g. ``pairs`` of another length than ``texts``).
        """
        texts_l, pairs_l, mode, truncation = _call_arguments(
            texts, pairs, padding, truncation, max_length, pad_to_multiple_of)
        is_pair = pairs_l is not None
        limit = self._resolve_max_length(max_length, truncation, is_pair)
        inputs: list[Any] = texts_l if pairs_l is None else list(zip(texts_l, pairs_l))
        # encode_batch_fast skips the offset bookkeeping (≈ +20% speed) when offsets are unused.
        backend = self._backend
        encode = backend.encode_batch if return_offsets else backend.encode_batch_fast
        with _invalid_text_named(texts=texts_l, pairs=pairs_l):
            if len(inputs) == 1:  # on the calling thread: a batch would wake the rayon pool,
                # whose threads then spin beside the model's (~0.1 ms on a 2-core query)
                one = inputs[0]
                encodings = [backend.encode(*(one if is_pair else (one,)),
                                            add_special_tokens=True)]
            else:
                encodings = encode(inputs, add_special_tokens=True)

        rows = [_truncate(limit, is_pair, e.ids, e.type_ids,
                          *((e.offsets,) if return_offsets else ())) for e in encodings]
        ids = [r[0] for r in rows]
        type_ids = [r[1] for r in rows]
        offsets = [r[2] for r in rows] if return_offsets else None
        if mode is None:
            out: dict[str, Any] = {
                "input_ids": [np.asarray(x, dtype=np.int64) for x in ids],
                "token_type_ids": [np.asarray(x, dtype=np.int64) for x in type_ids],
                "attention_mask": [np.ones(len(x), dtype=np.int64) for x in ids],
            }
            if offsets is not None:
                out["offsets"] = [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in offsets]
            return out

        lengths = [len(x) for x in ids]
        seq = max(lengths, default=0)
        if mode == "max_length":
            seq = max(seq, self._model_max_length if max_length is None else max_length)
        if pad_to_multiple_of is not None:
            seq = -(-seq // pad_to_multiple_of) * pad_to_multiple_of
        out = {
            "input_ids": pad_rows(ids, fill=self.pad_id, seq=seq),
            "token_type_ids": pad_rows(type_ids, fill=0, seq=seq),
            "attention_mask": length_mask(lengths, seq).astype(np.int64),
        }
        if offsets is not None:
            # Each row's (n, 2) spans read row-major as 2n values: (B, 2S) -> (B, S, 2).
            flat = [np.asarray(row, dtype=np.int64).reshape(-1) for row in offsets]
            out["offsets"] = pad_rows(flat, fill=0, seq=2 * seq).reshape(len(ids), seq, 2)
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Turn ids back into text (wordpieces joined, ``##`` removed, spaces before
        punctuation cleaned up).

        Args:
            ids: token ids (a list or a 1-D array).
            skip_special_tokens: drop ``[CLS] [SEP] [PAD] [UNK] [MASK]``.

        Raises:
            TokenizerError: an id is outside the vocabulary.
        """
        id_list = [int(i) for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray)
                                              else ids).reshape(-1)]
        n = len(self._tokens)
        bad = next((i for i in id_list if not 0 <= i < n), None)
        if bad is not None:
            raise TokenizerError(f"decode: id {bad} is outside the vocabulary (size {n})")
        return self._backend.decode(id_list, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------------------- saving

    def save_vocab(self, path: str | os.PathLike[str]) -> Path:
        """Write the vocabulary as ``vocab.txt`` (one token per line, in id order), atomically.

        Args:
            path: the file to write.

        Returns:
            The path written.
        """
        path = Path(path)
        if path.is_dir():
            raise TokenizerError(f"{path}: is a directory (expected the vocab.txt file to write)")
        atomic_write_text(path, "".join(t + "\n" for t in self._tokens))
        return path

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``vocab.txt`` and ``tokenizer_config.json`` (Hugging Face keys) into a directory.

        The directory is created if needed; ``from_dir`` and transformers' ``BertTokenizer``
        both load it.

        Args:
            path: the directory.
        """
        d = Path(path)
        self.save_vocab(d / VOCAB_FILE)
        config = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self._lowercase,
            "strip_accents": self._strip_accents,
            "tokenize_chinese_chars": self._tokenize_chinese_chars,
            "model_max_length": self._model_max_length,
            "unk_token": UNK, "sep_token": SEP, "pad_token": PAD,
            "cls_token": CLS, "mask_token": MASK,
        }
        atomic_write_text(d / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def _pair_lengths(n1: int, n2: int, budget: int) -> tuple[int, int]:
    """``longest_first`` as the tokenizers library (and so transformers' fast tokenizer) does it.

    The longer side is cut first; when both must be cut, the budget is split in two halves and
    an odd token goes to the longer side (to the second one on a tie). Legacy transformers
    removes one token at a time instead and breaks ties the other way (docs/tokenizer.md).
    """
    if n1 + n2 <= budget:
        return n1, n2
    short = min(n1, n2)
    if short <= budget // 2:
        cut = (short, budget - short)
    else:
        cut = (budget // 2, budget - budget // 2)
    return cut if n1 <= n2 else (cut[1], cut[0])


def _keep(n: int, type_ids: list[int], limit: int, is_pair: bool) -> list[slice]:
    """The slices of an encoded ``[CLS] A [SEP] (B [SEP])`` that survive truncation to ``limit``.

    Truncating after the special tokens are placed (instead of with the library's own
    truncation) avoids its overflow bookkeeping, which is quadratic in the number of windows
    for pairs, and keeps one immutable backend for every ``max_length``.
    """
    if not is_pair:
        return [slice(0, limit - 1), slice(n - 1, n)]
    b_start = type_ids.index(1)  # B's first token (its [SEP] when B is empty)
    n1, n2 = b_start - 2, n - b_start - 1
    k1, k2 = _pair_lengths(n1, n2, limit - 3)
    return [slice(0, 1 + k1), slice(b_start - 1, b_start + k2), slice(n - 1, n)]


def _truncate(limit: int | None, is_pair: bool, ids: list[int], type_ids: list[int],
              *rows: list[Any]) -> tuple[list[Any], ...]:
    """``ids``, ``type_ids`` and the other per-token ``rows`` of one encoding, cut to ``limit``
    ids (None: not cut) by ``_keep``."""
    if limit is None or len(ids) <= limit:
        return (ids, type_ids, *rows)
    keep = _keep(len(ids), type_ids, limit, is_pair)
    return tuple([x for part in keep for x in row[part]] for row in (ids, type_ids, *rows))


def _call_arguments(texts: Any, pairs: Any, padding: Any, truncation: Any,
                    max_length: int | None, pad_to_multiple_of: int | None,
                    ) -> tuple[list[str], list[str] | None, str | None, bool]:
    """`Tokenizer.__call__`'s arguments checked: (texts, pairs, padding mode, truncation)."""
    texts_l = _as_text_list(texts, "texts")
    pairs_l = None if pairs is None else _as_text_list(pairs, "pairs")
    if pairs_l is not None and len(pairs_l) != len(texts_l):
        raise TokenizerError(f"got {len(texts_l)} texts but {len(pairs_l)} pairs "
                             "(expected one pair per text)")
    try:
        mode = _PADDING_MODES[padding]
    except (KeyError, TypeError):
        raise TokenizerError(f"padding must be 'longest', 'max_length', True, False or "
                             f"'do_not_pad', got {padding!r}") from None
    if truncation == "longest_first":
        truncation = True
    if not isinstance(truncation, bool):
        raise TokenizerError(f"truncation must be a bool or 'longest_first', "
                             f"got {truncation!r}")
    if pad_to_multiple_of is not None:
        _check_max_length(pad_to_multiple_of, "pad_to_multiple_of")
    if max_length is not None:
        _check_max_length(max_length, "max_length")
    return texts_l, pairs_l, mode, truncation


def _check_text(text: Any, what: str) -> None:
    if not isinstance(text, str):
        raise TokenizerError(f"{what} must be a str, got {type(text).__name__}")


def _check_unicode(text: str, where: str) -> None:
    """Raise a TokenizerError naming ``where`` and the position of a lone surrogate in ``text``
    (Python strings allow one; UTF-8 and the library do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"{where}: character {e.start} is a lone surrogate "
                             f"U+{ord(text[e.start]):04X} (not valid Unicode)") from None


@contextmanager
def _invalid_text_named(**inputs: str | list[str] | None) -> Iterator[None]:
    """Turn the library's TypeError for a lone surrogate into a TokenizerError naming the input
    (``texts[i]`` in a list, ``text`` for a single str)."""
    try:
        yield
    except TypeError:
        for what, value in inputs.items():
            if isinstance(value, str):
                _check_unicode(value, what)
            elif value is not None:
                for i, text in enumerate(value):
                    _check_unicode(text, f"{what}[{i}]")
        raise


def _as_text_list(texts: Any, what: str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, np.ndarray):
        texts = texts.tolist()
    if not isinstance(texts, Sequence):
        raise TokenizerError(f"{what} must be a str or a list of str, got {type(texts).__name__}")
    out = list(texts)
    for i, t in enumerate(out):
        _check_text(t, f"{what}[{i}]")
    return out


def _read_config(path: Path) -> dict[str, Any]:
    """The ``Tokenizer.from_vocab`` keyword arguments stated by a ``tokenizer_config.json``."""
    name = path.name
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise TokenizerError(f"{name}: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{name}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{name}: expected a JSON object")
    out: dict[str, Any] = {}
    for key, arg, allow_none in (("do_lower_case", "lowercase", False),
                                 ("strip_accents", "strip_accents", True),
                                 ("tokenize_chinese_chars", "tokenize_chinese_chars", False)):
        if key in config:
            out[arg] = _check_bool(config[key], f"{name}: {key}", allow_none=allow_none)
    if config.get("model_max_length") is not None:
        mml = config["model_max_length"]
        if isinstance(mml, float) and mml.is_integer():
            mml = int(mml)
        mml = _check_max_length(mml, f"{name}: model_max_length")
        # transformers' "no limit" marker: BERT's usual 512 positions instead.
        out["model_max_length"] = (DEFAULT_MODEL_MAX_LENGTH
                                   if mml >= _UNBOUNDED_MODEL_MAX_LENGTH else mml)
    return out


# ----------------------------------------------------------------------------------- training


def _corpus_lines(files: list[Path], texts: Iterable[str] | None) -> Iterator[str]:
    """The lines of ``files``, then ``texts``, each checked (file and line named)."""
    for path in files:
        with path.open("rb") as f:  # binary: decode per line to report the line number
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise TokenizerError(invalid_utf8_message(path, lineno, e.start)) from None
                yield line
    for i, text in enumerate(() if texts is None else texts):
        _check_text(text, f"texts[{i}]")
        yield text


def _drop_long_words(line: str, counter: list[int]) -> str:
    """`line` without the words WordPiece would turn into [UNK] anyway (longer than
    `MAX_INPUT_CHARS_PER_WORD`): the trainer's cost grows with the square of a word's length,
    so one megabyte-long "word" would never finish. Linear in the line; ``counter[1]`` counts
    what was dropped."""
    if len(line) <= MAX_INPUT_CHARS_PER_WORD:
        return line
    kept = []
    for chunk in line.split():
        if len(chunk) > MAX_INPUT_CHARS_PER_WORD and any(
                len(w) > MAX_INPUT_CHARS_PER_WORD for w in _WORD_BREAKS.split(chunk)):
            counter[1] += 1
            continue
        kept.append(chunk)
    return " ".join(kept)


def _iter_corpus(files: list[Path], texts: Iterable[str] | None,
                 counter: list[int]) -> Iterator[list[str]]:
    """Stream the corpus in batches of non-blank lines; ``counter[0]`` counts them and
    ``counter[1]`` the over-long words dropped."""
    batch: list[str] = []
    for line in _corpus_lines(files, texts):
        line = _drop_long_words(line, counter)
        if line.strip():
            counter[0] += 1
            batch.append(line)
            if len(batch) >= _TRAIN_BATCH_LINES:
                yield batch
                batch = []
    if batch:
        yield batch


def train_vocab(files: Iterable[str | os.PathLike[str]] | None = None, *,
                texts: Iterable[str] | None = None, size: int = 30522, lowercase: bool = True,
                min_frequency: int = 2, limit_alphabet: int = 1000) -> Tokenizer:
    """Train a WordPiece vocabulary, as ``tokenizers``' ``BertWordPieceTokenizer`` does.

    Files are streamed line by line (never read whole). The specials ``[PAD] [UNK] [CLS] [SEP]
    [MASK]`` get ids 0..4; continuation pieces start with ``##``.

    Args:
        files: UTF-8 text files, one or more sentences per line.
        texts: more training text (any iterable of str), after the files.
        size: the vocabulary size to reach (specials and alphabet included); the result can
            be smaller if the corpus is small.
        lowercase: train an uncased vocabulary (lower-case, strip accents).
        min_frequency: the least count of a pair to be merged.
        limit_alphabet: the most distinct characters kept in the alphabet.

    Returns:
        A Tokenizer with the trained vocabulary (``save_vocab`` writes ``vocab.txt``). Words
        longer than ``MAX_INPUT_CHARS_PER_WORD`` characters are left out (they encode as
        ``[UNK]`` anyway), with a warning that counts them; a vocabulary smaller than ``size``
        (a small corpus) is warned about too.

    Raises:
        TokenizerError: a file is missing or not valid UTF-8 (file and line named), the corpus
            has no text, or an argument is invalid.
    """
    paths = [Path(f) for f in (files or [])]
    if not paths and texts is None:
        raise TokenizerError("train_vocab: no corpus given (pass files or texts)")
    for p in paths:
        if not p.exists():
            raise TokenizerError(f"{p}: corpus file not found")
        if not p.is_file():
            raise TokenizerError(f"{p}: not a regular file")
    if isinstance(size, bool) or not isinstance(size, int) or size <= len(SPECIAL_TOKENS):
        raise TokenizerError(f"size must be an int > {len(SPECIAL_TOKENS)}, got {size!r}")
    _check_bool(lowercase, "lowercase")
    for what, v in (("min_frequency", min_frequency), ("limit_alphabet", limit_alphabet)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise TokenizerError(f"{what} must be a non-negative int, got {v!r}")

    tok = _bert_pipeline(None, lowercase, strip_accents=None, tokenize_chinese_chars=True)
    trainer = trainers.WordPieceTrainer(
        vocab_size=size, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS), limit_alphabet=limit_alphabet,
        continuing_subword_prefix="##",
    )
    counter = [0, 0]
    try:
        tok.train_from_iterator(_iter_corpus(paths, texts, counter), trainer=trainer)
    except Exception as e:
        # The Rust side re-raises an error of the iterator as its own exception type; recover
        # our one-line message when it is ours.
        cause = e.__cause__ or e.__context__
        if isinstance(cause, TokenizerError):
            raise cause from None
        raise
    source = ", ".join(map(str, paths)) if paths else "texts"
    if counter[0] == 0:
        raise TokenizerError(f"{source}: the corpus is empty (no non-blank line)")
    if counter[1]:
        warnings.warn(f"{source}: left out {counter[1]:,} word(s) longer than "
                      f"{MAX_INPUT_CHARS_PER_WORD} characters (they would be [UNK])",
                      stacklevel=2)
    vocab = tok.get_vocab(with_added_tokens=True)
    if len(vocab) < size:
        warnings.warn(f"{source}: the corpus yields {len(vocab):,} tokens, fewer than the "
                      f"{size:,} asked for (a larger corpus, or a smaller size)", stacklevel=2)
    return Tokenizer(vocab, lowercase=lowercase, _source="trained vocabulary")
