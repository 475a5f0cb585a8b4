"""What the sync and async clients share: retry timing, batch planning, answer parsing.

Nothing here does I/O, so both clients follow the very same rules and differ only in how they
send and how they wait.
"""

from __future__ import annotations

import email.utils
import os
import random
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple, Union

import httpx

from .errors import QScoreAPIError, QScoreConnectionError, QScoreError
from .types import BatchResult, ErrorDetail, ImageScore

#: The server's ``--max-batch-images`` default: the most images one batch request may carry.
DEFAULT_MAX_BATCH_IMAGES = 256
#: The server's ``--max-body-bytes`` default.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# Room left in a body for the multipart boundaries and part headers (about 200 bytes a part).
_PART_OVERHEAD = 512

#: An image: its encoded bytes, or the path of a file holding them.
ImageInput = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]

# Transport failures worth another try: the request never reached the server or the connection
# broke before an answer. Sending a score request twice is harmless (it changes nothing but
# metrics). A read timeout is not among them: the server is still working on it, and a second
# copy would only add to its load.
_RETRYABLE_ERRORS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)


@dataclass(frozen=True)
class RetryEvent:
    """Passed to ``on_retry`` before each wait: ``attempt`` (1 for the first try) failed with
    ``status``/``code`` (an answer) or ``error`` (a transport error), and the client now sleeps
    ``delay_s`` seconds."""

    attempt: int
    delay_s: float
    status: Optional[int] = None
    code: Optional[str] = None
    error: Optional[BaseException] = None


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry a request, and how long to wait.

    - 429 and 503 answers (``retry_statuses``) are retried after their ``Retry-After`` (seconds
      or an HTTP date), or after the backoff delay when there is none.
    - Connection errors (refused, reset, connect timeout) are retried after the backoff delay:
      full jitter, uniform in [0, min(``backoff_max_s``, ``backoff_base_s`` * 2**retry)].
    - At most ``max_attempts`` tries (the first included), and no wait that would end later
      than ``max_elapsed_s`` seconds after the first try: then the last answer is raised as
      :class:`QScoreAPIError`, or the last transport error as :class:`QScoreConnectionError`.
    """

    max_attempts: int = 5
    max_elapsed_s: float = 60.0
    backoff_base_s: float = 0.25
    backoff_max_s: float = 8.0
    retry_statuses: FrozenSet[int] = field(default_factory=lambda: frozenset({429, 503}))

    def backoff(self, retry: int, rng: random.Random) -> float:
        """The jittered delay before retry number ``retry`` (0 for the first retry), seconds."""
        return rng.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * (2.0**retry)))


def parse_retry_after(value: Optional[str], now: Optional[datetime] = None) -> Optional[float]:
    """A ``Retry-After`` header in seconds from ``now``: delta-seconds or an HTTP date (RFC 9110
    section 10.2.3). A date in the past is 0; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


def api_error(response: httpx.Response) -> QScoreAPIError:
    """The error a non-2xx answer stands for, read from the server's JSON error body."""
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    try:
        detail = response.json()["error"]
        return QScoreAPIError(response.status_code, str(detail["code"]), str(detail["message"]), retry_after)
    except (ValueError, KeyError, TypeError):
        text = response.text[:300]
        return QScoreAPIError(response.status_code, f"http_{response.status_code}", text, retry_after)


class Attempts:
    """One request's retry state: call :meth:`after_answer` or :meth:`after_error` after each
    try, and wait for the delay it returns before the next."""

    def __init__(self, policy: RetryPolicy, url: str, on_retry: Optional[Callable[[RetryEvent], None]],
                 rng: random.Random):
        self.policy = policy
        self.url = url
        self.on_retry = on_retry
        self.rng = rng
        self.start = time.monotonic()
        self.attempt = 0

    def _delay(self, wanted: Optional[float]) -> Optional[float]:
        """The wait before the next try, or None when the retries are spent."""
        if self.attempt >= self.policy.max_attempts:
            return None
        delay = wanted if wanted is not None else self.policy.backoff(self.attempt - 1, self.rng)
        if time.monotonic() - self.start + delay > self.policy.max_elapsed_s:
            return None
        return delay

    def after_answer(self, response: httpx.Response) -> Optional[float]:
        """None when ``response`` is final (a success, or an error to raise); else the delay."""
        self.attempt += 1
        if response.status_code not in self.policy.retry_statuses:
            return None
        delay = self._delay(parse_retry_after(response.headers.get("retry-after")))
        if delay is not None and self.on_retry is not None:
            self.on_retry(RetryEvent(self.attempt, delay, status=response.status_code, code=api_error(response).code))
        return delay

    def after_error(self, error: httpx.TransportError) -> float:
        """The delay before retrying after ``error``; raises when it is not worth another try."""
        self.attempt += 1
        delay = self._delay(None) if isinstance(error, _RETRYABLE_ERRORS) else None
        if delay is None:
            elapsed = time.monotonic() - self.start
            raise QScoreConnectionError(self.url, self.attempt, elapsed, error) from error
        if self.on_retry is not None:
            self.on_retry(RetryEvent(self.attempt, delay, error=error))
        return delay


def read_image(image: ImageInput) -> bytes:
    """An image's bytes: as given, or read from its path. Raises OSError for a bad path."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    raise TypeError(f"an image is bytes or a path, not {type(image).__name__}")


def score_params(model: Optional[str], **extra: Any) -> Dict[str, str]:
    """Query parameters, leaving out the unset ones (the server then uses its defaults)."""
    params = {"model": model, **extra}
    return {k: ("true" if v is True else "false" if v is False else str(v)) for k, v in params.items() if v is not None}


def parse_score(body: Any) -> ImageScore:
    try:
        return ImageScore.from_json(body)
    except (KeyError, TypeError) as e:
        raise QScoreError(f"the server's answer is not an image score ({e!r}); is the URL a qscore server?") from e


@dataclass
class _Item:
    index: int
    id: str
    data: bytes


# How a too_many_images error states the limit: "the batch has more than 16 images".
_LIMIT_IN_MESSAGE = re.compile(r"more than (\d+) images")


class BatchPlan:
    """A batch split into requests that fit the server's limits, and the results put back in
    input order.

    Drive it with :meth:`next_chunk`, then :meth:`done` or :meth:`failed` for that chunk, until
    :meth:`next_chunk` returns None; :meth:`results` then holds one entry per input image.
    """

    def __init__(self, images: Iterable[ImageInput], ids: Optional[Sequence[str]], max_images: int, max_bytes: int):
        images = list(images)
        if ids is not None and len(ids) != len(images):
            raise ValueError(f"{len(ids)} ids for {len(images)} images: pass one id per image, or none")
        self.max_images = max(1, max_images)
        self.max_bytes = max_bytes
        self._results: List[Optional[BatchResult]] = [None] * len(images)
        items: List[_Item] = []
        for i, image in enumerate(images):
            item_id = str(ids[i]) if ids is not None else str(i)
            try:
                items.append(_Item(i, item_id, read_image(image)))
            except OSError as e:
                # A file that cannot be read keeps its slot, like an image the server refuses.
                self._results[i] = BatchResult(i, item_id, error=ErrorDetail("unreadable_file", f"could not read {image}: {e}"))
        self._pending: List[List[_Item]] = self._split(items)
        self._pending.reverse()
        self._current: List[_Item] = []

    def _split(self, items: List[_Item]) -> List[List[_Item]]:
        chunks: List[List[_Item]] = []
        chunk: List[_Item] = []
        size = 0
        for item in items:
            cost = len(item.data) + _PART_OVERHEAD + len(item.id.encode())
            if chunk and (len(chunk) >= self.max_images or size + cost > self.max_bytes):
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(item)
            size += cost
        if chunk:
            chunks.append(chunk)
        return chunks

    def next_chunk(self) -> Optional[List[Tuple[str, Tuple[str, bytes, str]]]]:
        """The next request's multipart files (field ``image``, the id as file name), or None."""
        if not self._pending:
            return None
        self._current = self._pending.pop()
        return [("image", (item.id, item.data, "application/octet-stream")) for item in self._current]

    def done(self, body: Any) -> None:
        """Takes the batch answer of the current chunk."""
        try:
            answers = body["results"]
        except (KeyError, TypeError) as e:
            raise QScoreError(f"the server's answer is not a batch answer ({e!r}); is the URL a qscore server?") from e
        if len(answers) != len(self._current):
            raise QScoreError(f"the server answered {len(answers)} results for {len(self._current)} images")
        for item, answer in zip(self._current, answers):
            if "error" in answer:
                error = ErrorDetail(answer["error"]["code"], answer["error"]["message"])
                self._results[item.index] = BatchResult(item.index, item.id, error=error)
            else:
                self._results[item.index] = BatchResult(item.index, item.id, score=parse_score(answer))

    def failed(self, error: QScoreAPIError) -> None:
        """Takes a whole-request error for the current chunk: a limit the chunk broke splits it
        and learns the limit; an image refused on its own becomes its error; anything else (bad
        key, unknown model, retries spent) is raised."""
        chunk = self._current
        if error.code == "too_many_images" and len(chunk) > 1:
            # The server does not advertise --max-batch-images; its refusal states it.
            stated = _LIMIT_IN_MESSAGE.search(error.message)
            self.max_images = int(stated.group(1)) if stated else max(1, len(chunk) // 2)
            self.max_images = min(self.max_images, len(chunk) - 1)
            self._pending.extend(reversed(self._split(chunk)))
        elif error.code == "body_too_large" and len(chunk) > 1:
            self.max_bytes = max(1, sum(len(i.data) for i in chunk) // 2)
            self._pending.extend(reversed(self._split(chunk)))
        elif len(chunk) == 1 and error.status in (400, 413, 415, 422):
            item = chunk[0]
            self._results[item.index] = BatchResult(item.index, item.id, error=ErrorDetail(error.code, error.message))
        else:
            raise error

    def results(self) -> List[BatchResult]:
        """One result per input image, in input order."""
        assert all(r is not None for r in self._results), "results() before the plan was finished"
        return list(self._results)  # type: ignore[arg-type]
