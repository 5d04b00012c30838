"""The exceptions bertrt raises for user mistakes.

Every error a user can cause (a bad file, a bad field, a bad input) is a `BertrtError`: a
one-line message that names the file or field and says what was expected. The CLI prints it and
exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any


class BertrtError(ValueError):
    """A user-facing error: one line naming the file or field and what was expected."""


class ConfigError(BertrtError):
    """A `config.json` or `BertConfig` field is missing or invalid."""


class WeightsError(BertrtError):
    """Weights are missing, unreadable, or do not fit the configuration."""


class InputError(BertrtError):
    """Model inputs (token ids, masks, lengths) are out of range or malformed."""


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """CLI decorator: a `BertrtError` prints one line, `error: ...`, on stderr (from rank 0
    only under torchrun) and exits with code 2; any other exception keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BertrtError as exc:
            if int(os.environ.get("RANK", "0")) == 0:  # one message, not one per rank
                print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def invalid_utf8_message(path: object, lineno: int, offset: int) -> str:
    """The one wording for a line that is not UTF-8: the file, the line, the byte (`offset`
    from 0 in the line), and a command that converts the file (text from Windows or older Unix
    tools is most often Latin-1) rather than one that deletes what it cannot read."""
    import shlex

    source, target = shlex.quote(str(path)), shlex.quote(f"{path}.utf8")
    return (f"{path}: line {lineno}: invalid UTF-8 (byte {offset + 1} of the line); convert "
            f"the file to UTF-8, e.g. from Latin-1: iconv -f latin1 -t utf-8 {source} > "
            f"{target}")
