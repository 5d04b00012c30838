"""Corpora: streaming documents out of text and JSON-lines files, and the embedded default.

A *document* is a list of sentences (``list[str]``). Two input formats are read:

* plain text (any suffix but ``.jsonl``/``.json``): one sentence per line and a blank line between
  documents, as BERT's ``create_pretraining_data.py`` reads; a file without any blank line
  between two text lines is read as one document per line instead (each line is split into
  sentences);
* JSON lines (``.jsonl`` or ``.json``): one JSON object per line with a string ``"text"``; each
  object is a document, split into sentences.

Files are read line by line (never whole). Invalid UTF-8 is an error naming the file and the
line (see ``docs/data.md``: silently skipping text changes the data a seed stands for).

``embedded_corpus`` writes the built-in corpus: the docstrings of the installed Python standard
library, gathered by parsing its source files with ``ast`` (no module is imported).
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from bertrt.errors import BertrtError, invalid_utf8_message
from bertrt.fileio import atomic_write_text

__all__ = [
    "DataError", "docstring_sentences", "embedded_corpus", "invalid_utf8", "iter_lines",
    "read_documents", "split_sentences",
]

JSON_SUFFIXES = (".jsonl", ".json")
CORPUS_FILE = "corpus.txt"


class DataError(BertrtError):
    """A data file is missing, empty or malformed; one line naming the file and line."""


# --------------------------------------------------------------------------------- lines

def invalid_utf8(path: Path, lineno: int, offset: int) -> DataError:
    """The one error for a line that is not UTF-8: the file, the line, the byte (`offset` from
    0 in the line), and a command that converts the file (text from Windows or older Unix
    tools is most often Latin-1) rather than one that deletes what it cannot read."""
    return DataError(invalid_utf8_message(path, lineno, offset))


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line number from 1, decoded line)`` of a UTF-8 file, newline kept.

    A UTF-8 byte-order mark at the start is dropped.

    Raises:
        DataError: the file is missing, unreadable, or a line is not valid UTF-8.
    """
    path = Path(path)
    _check_file(path)
    try:
        f = path.open("rb")  # binary: decode per line so that an error names its line
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise invalid_utf8(path, lineno, e.start) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            yield lineno, line


def _has_blank_separator(path: Path) -> bool:
    """Whether a blank line stands between two text lines (documents are then separated)."""
    seen_text = pending_blank = False
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                if pending_blank:
                    return True
                seen_text = True
            elif seen_text:
                pending_blank = True
    return False


# ------------------------------------------------------------------------------ sentences

# A sentence ends at . ! or ? (closing quotes/brackets allowed) followed by white space and an
# upper-case letter, a digit, or an opening quote/bracket.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset({
    "e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "prof", "st", "no", "nos", "fig", "figs",
    "cf", "al", "approx", "resp", "jr", "sr", "inc", "ltd", "co", "eq", "sec", "ch", "vol",
})


def split_sentences(text: str) -> list[str]:
    """Split text into sentences (a rule-based splitter; white space is collapsed).

    Paragraphs (blank-line separated) never share a sentence. A period after a common
    abbreviation (``e.g.``, ``Mr.``) or a single capital letter (an initial) does not end one.

    Args:
        text: any text.

    Returns:
        The non-empty sentences, in order.
    """
    out: list[str] = []
    for para in re.split(r"\n[ \t\r\f\v]*\n", text):
        para = " ".join(para.split())
        start = 0
        for m in _SENTENCE_END.finditer(para):
            word = para[para.rfind(" ", start, m.start()) + 1:m.start()].lower()
            if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
            end = m.end() - (len(m.group()) - len(m.group().rstrip()))
            out.append(para[start:end])
            start = m.end()
        if start < len(para):
            out.append(para[start:])
    return [s for s in out if s]


# ------------------------------------------------------------------------------- reading

def read_documents(path: Path) -> Iterator[list[str]]:
    """Stream the documents of a corpus file, each a list of sentences.

    Args:
        path: a plain-text file (one sentence per line, blank line between documents; without
            any blank separator line, one document per line) or a ``.jsonl``/``.json`` file of
            objects with a ``"text"`` field (each a document).

    Yields:
        Documents with at least one sentence; sentences are stripped and white space collapsed.

    Raises:
        DataError: missing file, invalid UTF-8 (file and line named), or a JSON line that is not
            an object with a string ``"text"``.
    """
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() in JSON_SUFFIXES:
        yield from _read_jsonl(path)
    elif _has_blank_separator(path):
        doc: list[str] = []
        for _, line in iter_lines(path):
            if line.strip():
                sentence = " ".join(line.split())
                doc.append(sentence)
            elif doc:
                yield doc
                doc = []
        if doc:
            yield doc
    else:
        for _, line in iter_lines(path):
            sentences = split_sentences(line)
            if sentences:
                yield sentences


def iter_json_objects(path: Path, required: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """Stream `(line number, object)` from a JSON-lines file; blank lines are skipped.

    Raises:
        DataError: a line that is not a JSON object, or lacks a `required` field.
    """
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            hint = " (a .json file must be JSON lines, not one array)" if (
                lineno == 1 and line.lstrip().startswith("[")) else ""
            raise DataError(f"{path}: line {lineno}: invalid JSON ({e.msg} at column "
                            f"{e.colno}){hint}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {lineno}: expected a JSON object with "
                            f"{', '.join(repr(k) for k in required) or 'fields'}, got "
                            f"{type(obj).__name__}")
        for key in required:
            if key not in obj:
                raise DataError(f"{path}: line {lineno}: no {key!r} field "
                                f"(fields: {', '.join(sorted(obj)) or 'none'})")
        yield lineno, obj


def _read_jsonl(path: Path) -> Iterator[list[str]]:
    for lineno, obj in iter_json_objects(path, ("text",)):
        text = obj["text"]
        if not isinstance(text, str):
            raise DataError(f"{path}: line {lineno}: \"text\" must be a string, got "
                            f"{type(text).__name__}")
        sentences = split_sentences(text)
        if sentences:
            yield sentences


# ------------------------------------------------------------------------ embedded corpus

# Folders of the standard library that hold no prose worth having (tests, generated codecs,
# vendored or Python-2 sources) and cost parse time.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                        "__pycache__", "lib2to3", "encodings", "ensurepip", "turtledemo"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_ROLE = re.compile(r":[\w:.+-]+:`~?([^`<]*?)\s*(?:<[^>]*>)?`")
_LITERAL = re.compile(r"``(.+?)``|`([^`]+)`")
_EMPHASIS = re.compile(r"\*\*?([^*\s][^*]*?)\*\*?")
_UNDERLINE = re.compile(r"[-=~^*#+]{3,}")
_FIELD = (":param", ":type", ":return", ":rtype", ":raise", ":var", ":ivar", ":cvar", "..", "|",
          "$", "%", ">>>", "...", "#")


def _stdlib_sources(root: Path) -> list[Path]:
    """The standard library's ``.py`` files in sorted (relative POSIX path) order."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _prose(sentence: str) -> bool:
    """Whether a sentence reads as English prose rather than code or a table."""
    if len(sentence) > 600 or len(sentence.split()) < 4 or not sentence[0].isalpha():
        return False
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return letters >= 0.8 * len(sentence)


def docstring_sentences(doc: str) -> list[str]:
    """Clean a (dedented) docstring into prose sentences.

    Indented blocks (code, literal blocks, argument bodies), doctest lines, reST field lists,
    directives and section underlines are dropped; reST roles and literals are reduced to their
    text; sentences that do not read as prose are dropped.

    Args:
        doc: a docstring as ``ast.get_docstring`` returns it.

    Returns:
        The sentences kept, in order.
    """
    sentences: list[str] = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.split("\n")
        if not lines[0].strip() or lines[0][0].isspace():
            continue  # an indented block: code, a literal block or a parameter body
        kept: list[str] = []
        for line in lines:
            s = line.strip()
            if (not s or line[0].isspace() or _UNDERLINE.fullmatch(s) or s.startswith(_FIELD)
                    or (s.endswith(":") and len(s.split()) <= 3)):
                continue
            kept.append(s)
        text = " ".join(kept).replace("::", ":")
        text = _ROLE.sub(r"\1", text)
        text = _LITERAL.sub(lambda m: m.group(1) or m.group(2), text)
        text = _EMPHASIS.sub(r"\1", text)
        sentences.extend(s for s in split_sentences(text) if _prose(s))
    return sentences


def _iter_docstring_documents(root: Path) -> Iterator[list[str]]:
    """Documents (one per docstring, source order, duplicates dropped) of the stdlib sources."""
    seen: set[str] = set()
    for path in _stdlib_sources(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, OSError):
            continue  # a source this interpreter cannot parse holds nothing we need
        nodes = [n for n in ast.walk(tree) if isinstance(n, _DOC_NODES)]
        nodes.sort(key=lambda n: getattr(n, "lineno", 0))  # Module (no lineno) first
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            sentences = docstring_sentences(doc)
            key = "\n".join(sentences)
            if sentences and key not in seen:
                seen.add(key)
                yield sentences


def docstring_texts(count: int) -> list[str]:
    """The first `count` documents of the built-in corpus (see `embedded_corpus`), each as
    one text (its sentences joined by spaces), without writing a file: real prose to
    calibrate on. Fewer when the standard library has fewer docstrings."""
    root = Path(ast.__file__).resolve().parent
    texts: list[str] = []
    for sentences in _iter_docstring_documents(root):
        if len(texts) == count:
            break
        texts.append(" ".join(sentences))
    return texts


def embedded_corpus(out_dir: Path, max_bytes: int = 3_000_000) -> Path:
    """Write the built-in corpus: docstrings of the installed Python standard library.

    The ``.py`` sources of the standard library's folder are visited in sorted order and
    parsed with ``ast`` (never imported: importing runs module code). Each docstring becomes one
    document of cleaned prose sentences (one per line; a blank line between documents); exact
    duplicates are dropped. Documents are added until the next would pass ``max_bytes``. The
    result is deterministic for a given Python installation.

    Args:
        out_dir: the folder to write ``corpus.txt`` into (created if needed).
        max_bytes: the most bytes of the corpus file.

    Returns:
        The path of ``corpus.txt``, written atomically.

    Raises:
        DataError: the standard library sources are not installed (no docstring found).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The folder of the pure-Python stdlib: where `ast` lives. (sysconfig.get_paths() would
    # import a _sysconfigdata module on first use.)
    root = Path(ast.__file__).resolve().parent
    parts: list[str] = []
    total = 0
    for sentences in _iter_docstring_documents(root):
        text = "\n".join(sentences) + "\n"
        size = len(text.encode("utf-8")) + (1 if parts else 0)  # + the blank separator line
        if total + size > max_bytes:
            break
        parts.append(text)
        total += size
    if not parts:
        raise DataError(f"{root}: no docstrings found (are the standard library's .py sources "
                        f"installed?); pass --data with a corpus instead")
    path = out_dir / CORPUS_FILE
    atomic_write_text(path, "\n".join(parts))
    return path
