"""Typed domain errors.

The engine, batcher and index raise these; the HTTP layer maps each class to a
status code in exactly one place (`clipsearch.service.http.errors`). Nothing here knows
about HTTP.
"""

from __future__ import annotations


class ClipsearchError(Exception):
    """Base class: `code` is a stable machine-readable name, `field` the bad input (if any)."""

    code = "error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(ClipsearchError):
    """A request item that is well-formed JSON but not usable (empty text list, bad value)."""

    code = "invalid_input"


class OutOfRange(InvalidInput):
    """A parameter outside the range the settings allow (``k`` above ``max_k``)."""

    code = "validation_error"


class InvalidBase64(InvalidInput):
    code = "invalid_base64"


class InvalidImage(InvalidInput):
    """Bytes that decode from base64 but are not a readable image."""

    code = "invalid_image"


class ImageFetchFailed(InvalidInput):
    """An image URL that is not allowed, or that could not be fetched (status, timeout, size)."""

    code = "image_fetch_failed"


class PayloadTooLarge(ClipsearchError):
    """Too many items, a too-long text, too many image bytes or pixels."""

    code = "payload_too_large"


class Overloaded(ClipsearchError):
    """The batch queue is full; the client should retry after `retry_after` seconds."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(ClipsearchError):
    """A request waited longer than the configured timeout for its batch."""

    code = "timeout"


class ClientGone(ClipsearchError):
    """The client disconnected before its answer: not a server error (counted as 499)."""

    code = "client_closed_request"


class NotReady(ClipsearchError):
    """The model or a needed index is not loaded (yet, or refused)."""

    code = "not_ready"


class ShuttingDown(NotReady):
    code = "shutting_down"


class ModelLoadError(ClipsearchError):
    """The model spec cannot be loaded. Raised at start-up; the service does not start."""

    code = "model_load_error"


class PortInUse(ClipsearchError):
    """The address `serve` should listen on is taken. Raised at start-up, before the model loads."""

    code = "port_in_use"


class IndexLoadError(ClipsearchError):
    """An index directory is unreadable or corrupt."""

    code = "index_load_error"


class IndexMismatch(IndexLoadError):
    """An index was built with another model or dimension than the one being served."""

    code = "index_mismatch"


class IndexRefused(ClipsearchError):
    """An explicit reload found a corrupt or mismatched version; the old one keeps serving."""

    code = "index_refused"


class NotFound(ClipsearchError):
    """Something the request names is not served here (a model name, say)."""

    code = "not_found"


class Unauthorized(ClipsearchError):
    code = "unauthorized"


class Forbidden(ClipsearchError):
    code = "forbidden"


class InferenceError(ClipsearchError):
    """The model call for a batch failed. Every request in that batch gets this error."""

    code = "inference_error"
