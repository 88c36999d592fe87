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
    """A request the handler refuses: ``status`` (4xx) and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def reason(self) -> str:
        return REASONS.get(self.status, "Error")


class ConfigError(ValueError):
    """The archive's ``stealguard`` configuration is invalid or a file it names does not load."""
