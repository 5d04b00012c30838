"""What a client did wrong, as one HTTP status and one line of JSON.

Every refusal the server gives is an `HttpError`: a status, an `error_type` from `ERROR_TYPES`
(the kinds a client can tell apart; TEI's names where TEI has one), and a one-line message
naming the field and what was expected. The app turns it into
`{"error": "...", "error_type": "..."}` with that status; the server keeps serving.
"""

from __future__ import annotations

#: error_type -> HTTP status.
ERROR_TYPES: dict[str, int] = {
    "invalid_json": 400,       # the body is not JSON (or not UTF-8)
    "empty": 400,              # an empty batch
    "validation": 422,         # a field of the wrong type or value
    "payload_too_large": 413,  # the body is over --payload-limit
    "batch_too_large": 413,    # more inputs than --max-client-batch
    "input_too_long": 413,     # an input over the model's maximum length, not truncated
    "not_supported": 404,      # a route the model's head does not answer
    "not_found": 404,
    "method_not_allowed": 405,
    "overloaded": 429,         # --max-concurrent requests already in flight
    "unavailable": 503,        # the engine is not running (starting or stopped)
    "internal": 500,           # a bug: the message says what failed, the log has the trace
}


class HttpError(Exception):
    """A refusal: `status` (from the error type), `error_type`, a one-line `message`."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = ERROR_TYPES[error_type]
        self.error_type = error_type
        self.message = " ".join(message.split())  # one line, whatever it quotes

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}
