"""The asyncio client against the real server: the same rules as the blocking one."""

from __future__ import annotations

import asyncio
import time
from typing import List

import httpx
import pytest
from conftest import API_KEY, BAD, FMNIST, MAX_BATCH_IMAGES, MODEL, URL, BudgetHog, free_port
from qscore_client import AsyncQScoreClient, QScoreAPIError, QScoreConnectionError, RetryEvent, RetryPolicy


def client() -> AsyncQScoreClient:
    return AsyncQScoreClient(URL, api_key=API_KEY, model=MODEL, max_batch_images=MAX_BATCH_IMAGES)


async def test_score_embed_and_batch() -> None:
    async with client() as c:
        s, e = await asyncio.gather(c.score(FMNIST[5]), c.embed(FMNIST[5]))
        assert s.model == MODEL and len(e.embedding) == 128
        assert e.q_score == pytest.approx(s.q_score, rel=1e-5)
        images = [*FMNIST[: MAX_BATCH_IMAGES + 3], BAD / "corrupt.jpg", FMNIST[5]]
        results = await c.score_batch(images)
    assert len(results) == len(images) and [r.index for r in results] == list(range(len(images)))
    assert all(r.ok for r in results[: MAX_BATCH_IMAGES + 3])
    assert results[-2].error is not None and results[-2].error.code in ("undecodable_image", "unsupported_image_format")
    assert results[-1].score.q_score == pytest.approx(s.q_score, rel=1e-5)


async def test_concurrent_batches_keep_their_own_order() -> None:
    groups = [FMNIST[i * 20 : i * 20 + 20] for i in range(4)]
    async with client() as c:
        answers = await asyncio.gather(*(c.score_batch(g, ids=[p.name for p in g]) for g in groups))
    for group, results in zip(groups, answers):
        assert [r.id for r in results] == [p.name for p in group] and all(r.ok for r in results)


async def test_key_and_errors() -> None:
    async with AsyncQScoreClient(URL, model=MODEL) as c:
        with pytest.raises(QScoreAPIError) as e:
            await c.embed(FMNIST[0])
    assert (e.value.status, e.value.code) == (401, "unauthorized")
    async with client() as c:
        with pytest.raises(QScoreAPIError) as e:
            await c.score(BAD / "truncated.jpg")
    assert (e.value.status, e.value.code) == (422, "undecodable_image")


async def test_429_is_retried_after_retry_after() -> None:
    events: List[RetryEvent] = []
    with BudgetHog() as hog:
        hog.release_after(1.2)
        start = time.monotonic()
        async with AsyncQScoreClient(URL, api_key=API_KEY, model=MODEL, on_retry=events.append) as c:
            results = await c.score_batch(FMNIST[:3])
    assert all(r.ok for r in results)
    assert events and {(ev.status, ev.delay_s) for ev in events} == {(429, 1.0)}
    assert time.monotonic() - start >= 1.0


async def test_connection_refused_is_retried_then_raised() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    events: List[RetryEvent] = []
    async with AsyncQScoreClient(url, retry=RetryPolicy(max_attempts=3, backoff_base_s=0.05), on_retry=events.append) as c:
        with pytest.raises(QScoreConnectionError) as e:
            await c.score(FMNIST[0])
    assert e.value.attempts == 3 and len(events) == 2
    assert isinstance(e.value.__cause__, httpx.ConnectError)
