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
