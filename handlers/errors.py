"""Errors that become HTTP answers: a status code and a message that says what was wrong."""

from __future__ import annotations

REASONS = {
    400: "Bad Request",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class RequestError(Exception):
    """A request the handler refuses: ``status`` (4xx), a message for the client and how many rows it carried
    (1 when they cannot be counted)."""

    def __init__(self, status: int, message: str, rows: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.rows = max(1, int(rows))

    @property
    def reason(self) -> str:
        return REASONS.get(self.status, "Error")


class ConfigError(ValueError):
    """The archive's ``stealguard`` configuration is invalid or a file it names does not load."""
