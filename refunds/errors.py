"""One flat hierarchy for the errors of the core, so callers catch by meaning."""


class RefundsError(Exception):
    """Base of every error raised by this project's core."""


class ConfigError(RefundsError):
    """A setting is missing or malformed; the process cannot start."""


class VaultError(RefundsError):
    """A sealed secret cannot be opened (wrong master key, or moved to another row)."""


class RefundRefused(RefundsError):
    """A refund request failed validation; nothing was written.

    ``code`` is a stable machine-readable reason (also the ``reason`` label of
    ``refunds_rejected_total``), ``field`` the request field at fault, if any.
    """

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


class IdempotencyConflict(RefundRefused):
    """The same merchant + external_ref was used before with other parameters."""

    def __init__(self, message: str):
        super().__init__("external_ref_conflict", message, "external_ref")


class NotFound(RefundsError):
    """The thing asked for does not exist."""


class InvalidTransition(RefundsError):
    """A state change that the state machine does not allow."""
