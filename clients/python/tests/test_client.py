"""The blocking client against the real server: scores, embeddings, batches past the server's
limit, per-image errors, API keys, a real 429 with Retry-After, and an unreachable server."""

from __future__ import annotations

import email.utils
import http.server
import json
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterator, List, Tuple, Union

import httpx
import pytest
from conftest import API_KEY, BAD, FMNIST, MAX_BATCH_IMAGES, MODEL, URL, BudgetHog, free_port
from qscore_client import (
    QScoreAPIError,
    QScoreClient,
    QScoreConnectionError,
    RetryEvent,
    RetryPolicy,
    parse_retry_after,
)


def test_score_embed_and_batch_agree(client: QScoreClient) -> None:
    path = FMNIST[0]
    s = client.score(path)
    assert s.model == MODEL and s.calibrated
    assert s.q_score >= 0 and 0 <= s.p_misclassified <= 1
    assert isinstance(s.likely_misclassified, bool) and s.predicted_class
    assert s.stats.dim == 128 and s.timings_ms["total"] > 0
    e = client.embed(path.read_bytes())
    assert len(e.embedding) == e.stats.dim == 128
    assert e.q_score == pytest.approx(s.q_score, rel=1e-5)
    c = client.embed(path, compressed=True)
    assert c.embedding_features and len(c.embedding) == len(c.embedding_features) < 128
    [b] = client.score_batch([path], ids=["only"])
    assert b.ok and b.id == "only" and b.score.q_score == pytest.approx(s.q_score, rel=1e-5)


def test_batch_past_the_server_limit_is_split_in_order(client: QScoreClient) -> None:
    images = FMNIST[: MAX_BATCH_IMAGES * 2 + 5]
    alone = {p: client.score(p).q_score for p in images[:: MAX_BATCH_IMAGES // 2]}
    results = client.score_batch(images, ids=[p.name for p in images])
    assert [r.index for r in results] == list(range(len(images)))
    assert [r.id for r in results] == [p.name for p in images]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    for i, p in enumerate(images):
        if p in alone:
            assert results[i].score.q_score == pytest.approx(alone[p], rel=1e-5), p
    # The server really refuses one request that big.
    r = httpx.post(f"{URL}/v1/score/batch", params={"model": MODEL}, headers={"authorization": f"Bearer {API_KEY}"},
                   files=[("image", (p.name, p.read_bytes())) for p in images])
    assert (r.status_code, r.json()["error"]["code"]) == (413, "too_many_images"), r.text


def test_batch_limit_is_read_from_the_server(client: QScoreClient) -> None:
    images = FMNIST[: MAX_BATCH_IMAGES * 3]
    with QScoreClient(URL, api_key=API_KEY, model=MODEL) as c:  # told no limit: asks the server
        assert c.models()["limits"]["max_batch_images"] == MAX_BATCH_IMAGES
        results = c.score_batch(images)
        assert c.max_batch_images == MAX_BATCH_IMAGES
    assert len(results) == len(images) and all(r.ok for r in results)
    assert [r.id for r in results] == [str(i) for i in range(len(images))]
    with QScoreClient(URL, api_key=API_KEY, model=MODEL, max_batch_images=5) as c:  # a cap stays a cap
        assert len(c.score_batch(images[:12])) == 12 and c.max_batch_images == 5


def test_failed_items_keep_their_slots(client: QScoreClient, tmp_path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    images = [FMNIST[0], BAD / "not_an_image.txt", FMNIST[1], BAD / "truncated.jpg", empty,
              tmp_path / "missing.png", FMNIST[2]]
    results = client.score_batch(images)
    assert len(results) == len(images)
    codes = [r.error.code if r.error else None for r in results]
    assert codes == [None, "unsupported_image_format", None, "undecodable_image", "empty_image", "unreadable_file", None]
    for r in results:
        assert (r.score is None) == (r.error is not None)
        if r.error:
            assert len(r.error.message) > 10
    assert "missing.png" in results[5].error.message


def test_error_answers_raise_with_the_server_code(client: QScoreClient) -> None:
    with pytest.raises(QScoreAPIError) as e:
        client.score(BAD / "not_an_image.txt")
    assert (e.value.status, e.value.code) == (415, "unsupported_image_format") and e.value.message
    with pytest.raises(QScoreAPIError) as e:
        client.score(FMNIST[0], model="no-such-model")
    assert (e.value.status, e.value.code) == (404, "unknown_model")
    assert "fmnist-simclr" in e.value.message


def test_api_key_is_required_and_accepted() -> None:
    for key in (None, "not-the-key"):
        with QScoreClient(URL, api_key=key, model=MODEL) as c, pytest.raises(QScoreAPIError) as e:
            c.score(FMNIST[0])
        assert (e.value.status, e.value.code) == (401, "unauthorized")
        with QScoreClient(URL, api_key=key) as c, pytest.raises(QScoreAPIError):
            c.score_batch(FMNIST[:3])
    with QScoreClient(URL, api_key=API_KEY) as c:
        assert MODEL in [m["name"] for m in c.models()["models"]]


def test_429_is_retried_after_retry_after() -> None:
    events: List[RetryEvent] = []
    with BudgetHog() as hog:
        with QScoreClient(URL, api_key=API_KEY, model=MODEL, retry=RetryPolicy(max_attempts=1)) as once:
            with pytest.raises(QScoreAPIError) as e:
                once.score(FMNIST[0])
        assert (e.value.status, e.value.code, e.value.retry_after) == (429, "memory_budget_exhausted", 1.0)
        hog.release_after(1.5)
        start = time.monotonic()
        with QScoreClient(URL, api_key=API_KEY, model=MODEL, on_retry=events.append) as c:
            s = c.score(FMNIST[0])
        took = time.monotonic() - start
    assert s.q_score >= 0
    assert events and all((ev.status, ev.code, ev.delay_s) == (429, "memory_budget_exhausted", 1.0) for ev in events)
    assert took >= 1.0 * len(events), (took, events)


class FlakyProxy(http.server.ThreadingHTTPServer):
    """A real HTTP server in front of qscore that answers its scripted refusals first (status,
    Retry-After or a function that makes one when the refusal is sent), then forwards every
    request to qscore and relays the answer."""

    def __init__(self, refusals: List[Tuple[int, Union[str, Callable[[], str]]]]):
        self.refusals = list(refusals)
        self.seen = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                proxy.seen += 1
                if proxy.refusals:
                    status, retry_after = proxy.refusals.pop(0)
                    retry_after = retry_after() if callable(retry_after) else retry_after
                    payload = json.dumps({"error": {"code": "overloaded", "message": "scripted refusal"}}).encode()
                    self.send_response(status)
                    self.send_header("Retry-After", retry_after)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = httpx.post(URL + self.path, content=body, headers=headers)
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers["content-type"])
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def flaky(request) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(request.param)
    yield proxy
    proxy.shutdown()
    proxy.server_close()


def _http_date(seconds_from_now: float) -> str:
    return email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now), usegmt=True)


@pytest.mark.parametrize("flaky", [[]], indirect=True)
def test_batch_limit_is_learnt_from_a_refusal(flaky: FlakyProxy) -> None:
    # The proxy answers no GET (501), as a server that does not advertise its limits: the
    # client believes the default, 256, and learns the real limit from the 413.
    images = FMNIST[: MAX_BATCH_IMAGES * 3]
    with QScoreClient(flaky.url, api_key=API_KEY, model=MODEL) as c:
        results = c.score_batch(images)
        assert c.max_batch_images == MAX_BATCH_IMAGES
    assert len(results) == len(images) and all(r.ok for r in results)
    assert [r.id for r in results] == [str(i) for i in range(len(images))]


@pytest.mark.parametrize("flaky", [[(503, lambda: _http_date(2)), (429, "0")]], indirect=True)
def test_503_with_an_http_date_and_429_are_retried(flaky: FlakyProxy, client: QScoreClient) -> None:
    events: List[RetryEvent] = []
    with QScoreClient(flaky.url, api_key=API_KEY, model=MODEL, on_retry=events.append) as c:
        s = c.score(FMNIST[3])
    assert flaky.seen == 3
    assert [ev.status for ev in events] == [503, 429]
    assert 0 < events[0].delay_s <= 2.5 and events[1].delay_s == 0
    assert s.q_score == pytest.approx(client.score(FMNIST[3]).q_score, rel=1e-5)


@pytest.mark.parametrize("flaky", [[(429, "3600")]], indirect=True)
def test_retry_after_past_the_time_budget_raises_at_once(flaky: FlakyProxy) -> None:
    start = time.monotonic()
    with QScoreClient(flaky.url, api_key=API_KEY, retry=RetryPolicy(max_elapsed_s=30)) as c:
        with pytest.raises(QScoreAPIError) as e:
            c.score(FMNIST[0])
    assert (e.value.status, e.value.retry_after) == (429, 3600.0)
    assert time.monotonic() - start < 5 and flaky.seen == 1


def test_connection_refused_is_retried_then_raised() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    events: List[RetryEvent] = []
    policy = RetryPolicy(max_attempts=4, backoff_base_s=0.05, backoff_max_s=0.2)
    start = time.monotonic()
    with QScoreClient(url, retry=policy, on_retry=events.append) as c, pytest.raises(QScoreConnectionError) as e:
        c.score(FMNIST[0])
    assert e.value.attempts == 4 and len(events) == 3
    assert all(isinstance(ev.error, httpx.ConnectError) and 0 <= ev.delay_s <= 0.2 for ev in events)
    assert url in str(e.value) and "server is running" in str(e.value)
    assert time.monotonic() - start < 3
    # The time bound stops the retries too, whatever max_attempts says.
    start = time.monotonic()
    with QScoreClient(url, retry=RetryPolicy(max_attempts=10_000, max_elapsed_s=0.5, backoff_base_s=0.05)) as c:
        with pytest.raises(QScoreConnectionError):
            c.score_batch(FMNIST[:3])
    assert time.monotonic() - start < 2


def test_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now) == 30.0
    assert parse_retry_after("Wed, 31 Dec 2025 23:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None and parse_retry_after(None) is None
