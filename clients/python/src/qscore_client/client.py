"""The sync and async clients: the same methods, the same rules (see ``_core``)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import httpx

from ._core import (
    DEFAULT_MAX_BATCH_IMAGES,
    DEFAULT_MAX_BODY_BYTES,
    Attempts,
    BatchPlan,
    ImageInput,
    RetryEvent,
    RetryPolicy,
    api_error,
    parse_score,
    read_image,
    score_params,
)
from .errors import QScoreAPIError
from .types import BatchResult, ImageScore

__all__ = ["QScoreClient", "AsyncQScoreClient"]


class _Base:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: Optional[str],
        model: Optional[str],
        timeout: Union[float, httpx.Timeout],
        max_batch_images: Optional[int],
        max_body_bytes: int,
        retry: Optional[RetryPolicy],
        on_retry: Optional[Callable[[RetryEvent], None]],
        headers: Optional[Mapping[str, str]],
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_batch_images = max_batch_images or DEFAULT_MAX_BATCH_IMAGES
        self.max_body_bytes = max_body_bytes
        # What the caller asked for caps what the server advertises; None: the server decides.
        self._batch_cap = max_batch_images
        self._limits_read = False
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self._rng = random.Random()
        self._headers: Dict[str, str] = {"user-agent": "qscore-client-python/0.1", **(headers or {})}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout, connect=min(10.0, timeout))

    def _attempts(self, path: str) -> Attempts:
        return Attempts(self.retry, self.base_url + path, self.on_retry, self._rng)

    def _plan(self, images: Iterable[ImageInput], ids: Optional[Sequence[str]]) -> BatchPlan:
        return BatchPlan(images, ids, self.max_batch_images, self.max_body_bytes)

    def _adopt_limits(self, listing: Optional[Dict[str, Any]]) -> None:
        # GET /v1/models advertises --max-batch-images and --max-body-bytes (servers from
        # before it did not: then the defaults stand and a refusal teaches the limit).
        self._limits_read = True
        limits = (listing or {}).get("limits") or {}
        if isinstance(limits.get("max_batch_images"), int) and limits["max_batch_images"] > 0:
            server = limits["max_batch_images"]
            self.max_batch_images = min(self._batch_cap, server) if self._batch_cap else server
        if isinstance(limits.get("max_body_bytes"), int) and limits["max_body_bytes"] > 0:
            self.max_body_bytes = min(self.max_body_bytes, limits["max_body_bytes"])

    def _learn(self, plan: BatchPlan) -> None:
        # A limit learnt from one batch's refusal holds for the next batches too.
        self.max_batch_images = plan.max_images


class QScoreClient(_Base):
    """A blocking client for one qscore server; thread-safe, and reuses connections.

    ``base_url`` is the server's root (``http://host:8080``). ``api_key`` is sent as
    ``Authorization: Bearer KEY`` (needed when the server runs with ``--api-keys-file``).
    ``model`` is the default for every call (None: the server's default model). ``timeout`` is
    seconds per try (or an ``httpx.Timeout``); connecting gets at most 10 s of it.
    ``max_batch_images`` caps the images per request; by default the client reads the server's
    ``--max-batch-images`` from ``GET /v1/models`` (``limits``) before its first batch, and a
    smaller limit stated in a ``too_many_images`` refusal is learnt. ``max_body_bytes`` likewise bounds one request's
    image bytes. ``retry`` says when to retry (:class:`RetryPolicy`), and ``on_retry`` is
    called before each wait with a :class:`RetryEvent`.

    Raises :class:`QScoreAPIError` for an error answer to a whole request (after retrying 429
    and 503), :class:`QScoreConnectionError` when the server cannot be reached, and
    ``httpx.TimeoutException`` when an answer takes longer than ``timeout``.
    """

    def __init__(
        self,
        base_url: str = "http://localhost:8080",
        *,
        api_key: Optional[str] = None,
        model: Optional[str] = None,
        timeout: Union[float, httpx.Timeout] = 60.0,
        max_batch_images: Optional[int] = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        retry: Optional[RetryPolicy] = None,
        on_retry: Optional[Callable[[RetryEvent], None]] = None,
        headers: Optional[Mapping[str, str]] = None,
        transport: Optional[httpx.BaseTransport] = None,
    ):
        super().__init__(
            base_url, api_key=api_key, model=model, timeout=timeout, max_batch_images=max_batch_images,
            max_body_bytes=max_body_bytes, retry=retry, on_retry=on_retry, headers=headers,
        )
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=self._timeout, transport=transport)

    def __enter__(self) -> "QScoreClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Closes the pooled connections."""
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        attempts = self._attempts(path)
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                time.sleep(attempts.after_error(e))
                continue
            delay = attempts.after_answer(response)
            if delay is None:
                if response.is_success:
                    return response.json()
                raise api_error(response)
            time.sleep(delay)

    def score(self, image: ImageInput, *, model: Optional[str] = None, confidence: Optional[float] = None) -> ImageScore:
        """Scores one image (bytes or a path): ``POST /v1/score``. ``confidence`` is your
        classifier's probability for its prediction, in [0, 1], needed only by a model
        calibrated on it. Raises :class:`QScoreAPIError` for an image the server refuses
        (e.g. 415 ``unsupported_image_format``, 422 ``undecodable_image``)."""
        params = score_params(model or self.model, confidence=confidence)
        body = self._request("POST", "/v1/score", params=params, content=read_image(image),
                             headers={"content-type": "application/octet-stream"})
        return parse_score(body)

    def embed(self, image: ImageInput, *, model: Optional[str] = None, compressed: bool = False) -> ImageScore:
        """Scores one image and returns its representation too: ``POST /v1/embed``.
        ``embedding`` is h (``stats.dim`` floats), or with ``compressed=True`` only the
        discriminative features, named in ``embedding_features`` (calibrated models only; else
        400 ``not_calibrated``)."""
        params = score_params(model or self.model, compressed=compressed or None)
        body = self._request("POST", "/v1/embed", params=params, content=read_image(image),
                             headers={"content-type": "application/octet-stream"})
        return parse_score(body)

    def score_batch(
        self, images: Iterable[ImageInput], *, ids: Optional[Sequence[str]] = None, model: Optional[str] = None
    ) -> List[BatchResult]:
        """Scores many images (bytes or paths) through ``POST /v1/score/batch``, split into
        requests within the server's limits and sent one after another.

        Returns one :class:`BatchResult` per image, in input order: its score, or its own error
        (an image the server could not read, a path that could not be opened). ``ids`` (one per
        image) are echoed back; by default an image's id is its index. Raises like the other
        calls for errors that concern a whole request (bad API key, unknown model, server full
        past the retries); results of the requests already answered are then lost.
        """
        if not self._limits_read:
            try:
                self._adopt_limits(self.models())
            except QScoreAPIError:
                self._adopt_limits(None)
        plan = self._plan(images, ids)
        params = score_params(model or self.model)
        while (files := plan.next_chunk()) is not None:
            try:
                plan.done(self._request("POST", "/v1/score/batch", params=params, files=files))
            except QScoreAPIError as e:
                plan.failed(e)
        self._learn(plan)
        return plan.results()

    def models(self) -> Dict[str, Any]:
        """``GET /v1/models``: ``{"default": name, "models": [ModelInfo, ...]}`` as JSON."""
        return self._request("GET", "/v1/models")


class AsyncQScoreClient(_Base):
    """The asyncio twin of :class:`QScoreClient`: the same arguments, methods and errors, with
    ``await``. Use ``async with`` or ``await client.aclose()``."""

    def __init__(
        self,
        base_url: str = "http://localhost:8080",
        *,
        api_key: Optional[str] = None,
        model: Optional[str] = None,
        timeout: Union[float, httpx.Timeout] = 60.0,
        max_batch_images: Optional[int] = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        retry: Optional[RetryPolicy] = None,
        on_retry: Optional[Callable[[RetryEvent], None]] = None,
        headers: Optional[Mapping[str, str]] = None,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ):
        super().__init__(
            base_url, api_key=api_key, model=model, timeout=timeout, max_batch_images=max_batch_images,
            max_body_bytes=max_body_bytes, retry=retry, on_retry=on_retry, headers=headers,
        )
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout, transport=transport)

    async def __aenter__(self) -> "AsyncQScoreClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the pooled connections."""
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        attempts = self._attempts(path)
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                await asyncio.sleep(attempts.after_error(e))
                continue
            delay = attempts.after_answer(response)
            if delay is None:
                if response.is_success:
                    return response.json()
                raise api_error(response)
            await asyncio.sleep(delay)

    async def score(self, image: ImageInput, *, model: Optional[str] = None, confidence: Optional[float] = None) -> ImageScore:
        """See :meth:`QScoreClient.score`."""
        params = score_params(model or self.model, confidence=confidence)
        body = await self._request("POST", "/v1/score", params=params, content=read_image(image),
                                   headers={"content-type": "application/octet-stream"})
        return parse_score(body)

    async def embed(self, image: ImageInput, *, model: Optional[str] = None, compressed: bool = False) -> ImageScore:
        """See :meth:`QScoreClient.embed`."""
        params = score_params(model or self.model, compressed=compressed or None)
        body = await self._request("POST", "/v1/embed", params=params, content=read_image(image),
                                   headers={"content-type": "application/octet-stream"})
        return parse_score(body)

    async def score_batch(
        self, images: Iterable[ImageInput], *, ids: Optional[Sequence[str]] = None, model: Optional[str] = None
    ) -> List[BatchResult]:
        """See :meth:`QScoreClient.score_batch`. Requests go one after another, so one batch
        never holds more than ``max_batch_images`` of the server's room; run several batches with
        ``asyncio.gather`` for more."""
        if not self._limits_read:
            try:
                self._adopt_limits(await self.models())
            except QScoreAPIError:
                self._adopt_limits(None)
        plan = self._plan(images, ids)
        params = score_params(model or self.model)
        while (files := plan.next_chunk()) is not None:
            try:
                plan.done(await self._request("POST", "/v1/score/batch", params=params, files=files))
            except QScoreAPIError as e:
                plan.failed(e)
        self._learn(plan)
        return plan.results()

    async def models(self) -> Dict[str, Any]:
        """See :meth:`QScoreClient.models`."""
        return await self._request("GET", "/v1/models")
