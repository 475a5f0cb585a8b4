"""The exceptions the clients raise. All derive from :class:`QScoreError`."""

from __future__ import annotations

from typing import Optional


class QScoreError(Exception):
    """Base class of every qscore client error."""


class QScoreAPIError(QScoreError):
    """The server answered an error for the whole request.

    ``status`` is the HTTP status; ``code`` and ``message`` are the server's
    ``{"error": {"code", "message"}}`` (``code`` is ``http_<status>`` when the body was not the
    server's JSON, e.g. from a proxy). ``retry_after`` is the ``Retry-After`` header in seconds,
    when there was one (429 and some 503 answers), after the client's retries ran out.
    """

    def __init__(self, status: int, code: str, message: str, retry_after: Optional[float] = None):
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        super().__init__(f"{status} {code}: {message}")


class QScoreConnectionError(QScoreError):
    """The server could not be reached (refused, reset, timed out connecting) on any attempt.

    ``url`` is the request's URL and ``attempts`` how many were made; the last transport error is
    the ``__cause__``.
    """

    def __init__(self, url: str, attempts: int, elapsed_s: float, cause: BaseException):
        self.url = url
        self.attempts = attempts
        self.elapsed_s = elapsed_s
        super().__init__(
            f"could not reach qscore at {url} after {attempts} attempt(s) over {elapsed_s:.1f} s "
            f"({type(cause).__name__}: {cause}); check that the server is running and that the "
            "base URL and port are right, or raise RetryPolicy.max_attempts / max_elapsed_s"
        )
