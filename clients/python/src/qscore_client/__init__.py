"""Python client for the qscore service.

``QScoreClient`` (blocking) and ``AsyncQScoreClient`` (asyncio) score images through
``/v1/score``, ``/v1/score/batch`` and ``/v1/embed``: batches are split to the server's limits,
429/503 answers are retried after their ``Retry-After``, connection errors with jittered
exponential backoff, and a batch image that fails keeps its slot with its error.
``qscore_client.ray.QScoreScorer`` does the same for Ray Data's ``map_batches``.
"""

from ._core import DEFAULT_MAX_BATCH_IMAGES, DEFAULT_MAX_BODY_BYTES, RetryEvent, RetryPolicy, parse_retry_after
from .client import AsyncQScoreClient, QScoreClient
from .errors import QScoreAPIError, QScoreConnectionError, QScoreError
from .types import ActiveFeature, BatchResult, ErrorDetail, ImageScore, Stats

__version__ = "0.1.0"

__all__ = [
    "QScoreClient",
    "AsyncQScoreClient",
    "RetryPolicy",
    "RetryEvent",
    "parse_retry_after",
    "QScoreError",
    "QScoreAPIError",
    "QScoreConnectionError",
    "ImageScore",
    "BatchResult",
    "ErrorDetail",
    "ActiveFeature",
    "Stats",
    "DEFAULT_MAX_BATCH_IMAGES",
    "DEFAULT_MAX_BODY_BYTES",
]
