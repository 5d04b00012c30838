"""The exceptions bertrt raises for user mistakes.

Every error a user can cause (a bad file, a bad field, a bad input) is a `BertrtError`: a
one-line message that names the file or field and says what was expected. The CLI prints it and
exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BertrtError(ValueError):
    """A user-facing error: one line naming the file or field and what was expected."""


class ConfigError(BertrtError):
    """A `config.json` or `BertConfig` field is missing or invalid."""


class WeightsError(BertrtError):
    """Weights are missing, unreadable, or do not fit the configuration."""


class InputError(BertrtError):
    """Model inputs (token ids, masks, lengths) are out of range or malformed."""
