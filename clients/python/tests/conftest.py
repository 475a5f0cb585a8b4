"""The qscore server these tests run against, and helpers shared by the test modules.

tests/python_client.rs starts a real `qscore serve` and runs this suite with its address in
the environment: QSCORE_URL, QSCORE_API_KEY (the server runs with --api-keys-file),
QSCORE_MAX_BATCH_IMAGES (its --max-batch-images), QSCORE_MEMORY_BUDGET_BYTES (its
--memory-budget-bytes), QSCORE_FIXTURES (tests/fixtures) and QSCORE_TEST_MODEL.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, List

import httpx
import pytest
from qscore_client import QScoreAPIError, QScoreClient, RetryPolicy

if "QSCORE_URL" not in os.environ:
    raise pytest.UsageError(
        "QSCORE_URL is not set: run `cargo test --release --test python_client`, which starts a "
        "qscore server and runs this suite against it"
    )

URL = os.environ["QSCORE_URL"]
API_KEY = os.environ["QSCORE_API_KEY"]
MODEL = os.environ.get("QSCORE_TEST_MODEL", "fmnist-simclr")
MAX_BATCH_IMAGES = int(os.environ["QSCORE_MAX_BATCH_IMAGES"])
MEMORY_BUDGET_BYTES = int(os.environ["QSCORE_MEMORY_BUDGET_BYTES"])
FIXTURES = Path(os.environ["QSCORE_FIXTURES"])
FMNIST = sorted((FIXTURES / "fmnist").glob("*/*.png"))
BAD = FIXTURES / "bad"


@pytest.fixture
def client() -> Iterator[QScoreClient]:
    with QScoreClient(URL, api_key=API_KEY, model=MODEL, max_batch_images=MAX_BATCH_IMAGES) as c:
        yield c


def used_budget_bytes() -> int:
    """qscore_memory_budget_used_bytes from /metrics."""
    for line in httpx.get(f"{URL}/metrics").text.splitlines():
        if line.startswith("qscore_memory_budget_used_bytes "):
            return int(float(line.split()[1]))
    raise AssertionError("/metrics has no qscore_memory_budget_used_bytes")


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BudgetHog:
    """Fills the server's memory budget for held request bytes, for a real 429.

    The held share is half of --memory-budget-bytes. An upload holds the first 64 KiB of its
    declared length as soon as its headers arrive, and its buffer's capacity as its body arrives
    (doubling, and holding the old capacity too while it grows). Uploads that send part of their
    body and stall, one after another, each waiting until the server holds its bytes, so that no
    two grow at once, take the whole share; any other upload is then answered 429
    memory_budget_exhausted with Retry-After. Closing the connections gives the share back.
    """

    BIG = 1024 * 1024
    SMALL = 64 * 1024

    def __init__(self) -> None:
        host, port = URL.removeprefix("http://").split(":")
        self.addr = (host, int(port))
        self.socks: List[socket.socket] = []

    def sizes(self) -> List[int]:
        left = (MEMORY_BUDGET_BYTES // 1024) // 2 * 1024
        sizes = []
        while left >= self.BIG * 3 // 2:  # room for the last growth's transient copy
            sizes.append(self.BIG)
            left -= self.BIG
        while left > 0:
            sizes.append(min(left, self.SMALL))
            left -= sizes[-1]
        return sizes

    def __enter__(self) -> "BudgetHog":
        try:
            self._fill()
        except BaseException:
            # A hog that failed to fill must not leave its stalled uploads holding the budget
            # for the tests after it.
            self.release()
            raise
        return self

    def _fill(self) -> None:
        # Start from an idle server: the bytes of a request answered a moment ago may still be
        # on their way back, and would make the sums below wait for bytes that never come.
        deadline = time.monotonic() + 10
        while (held := used_budget_bytes()) != 0:
            assert time.monotonic() < deadline, f"the server still holds {held} bytes with no request in flight"
            time.sleep(0.02)
        for size in self.sizes():
            s = socket.create_connection(self.addr)
            s.sendall(
                (f"POST /v1/score?model={MODEL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                 f"Content-Type: image/png\r\nContent-Length: {size}\r\n\r\n").encode()
            )
            if size > self.SMALL:
                s.sendall(b"\0" * (size - 1))
            self.socks.append(s)
            held += size
            deadline = time.monotonic() + 10
            # Exactly, not at least: while a buffer grows it holds its old capacity too, and an
            # upload sent during that moment would find the share full and be refused.
            while (used := used_budget_bytes()) != held:
                assert time.monotonic() < deadline, f"the server holds {used} bytes, not the {held} sent so far"
                time.sleep(0.02)
        self.wait_until_full()

    def wait_until_full(self) -> None:
        probe = QScoreClient(URL, api_key=API_KEY, model=MODEL, retry=RetryPolicy(max_attempts=1))
        deadline = time.monotonic() + 10
        image = FMNIST[0].read_bytes()
        while True:
            try:
                probe.score(image)
            except QScoreAPIError as e:
                if e.status == 429:
                    probe.close()
                    return
                raise
            assert time.monotonic() < deadline, f"{len(self.socks)} stalled uploads never filled the budget"
            time.sleep(0.05)

    def release(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()

    def release_after(self, seconds: float) -> threading.Timer:
        t = threading.Timer(seconds, self.release)
        t.start()
        return t

    def __exit__(self, *exc: object) -> None:
        self.release()
