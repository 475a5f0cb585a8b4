"""Scoring a Ray Data dataset through a qscore service.

``QScoreScorer`` is a callable class for ``Dataset.map_batches``: Ray builds it once per actor,
so each actor keeps one client and its pooled connections::

    ds = ray.data.read_binary_files("s3://bucket/images/")          # a "bytes" column
    scored = ds.map_batches(
        QScoreScorer,
        fn_constructor_kwargs={"url": "http://qscore:8080", "model": "fmnist-simclr"},
        batch_size=256, batch_format="pandas", concurrency=2,
    )

Ray itself is not imported here: a batch is a ``pandas.DataFrame`` (``batch_format="pandas"``),
a ``dict`` of numpy arrays (``"numpy"``) or a ``pyarrow.Table`` (``"pyarrow"``), and the scored
batch comes back in the same form.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from ._core import RetryPolicy
from .client import QScoreClient
from .types import BatchResult

# The columns added, and their Arrow types: numeric columns are null (NaN in numpy) where the
# image failed; error_code and error_message are null where it was scored.
SCORE_COLUMNS = {
    "q_score": "float64",
    "p_misclassified": "float64",
    "likely_misclassified": "bool",
    "predicted_class": "string",
    "class_probability": "float64",
    "risk_source": "string",
    "model": "string",
    "error_code": "string",
    "error_message": "string",
}


def score_columns(results: List[BatchResult]) -> Dict[str, List[Any]]:
    """The :data:`SCORE_COLUMNS` of ``results``, one list each, None where there is no value."""
    columns: Dict[str, List[Any]] = {name: [] for name in SCORE_COLUMNS}
    for r in results:
        s = r.score
        values = {
            "q_score": s.q_score if s else None,
            "p_misclassified": s.p_misclassified if s else None,
            "likely_misclassified": s.likely_misclassified if s else None,
            "predicted_class": s.predicted_class if s else None,
            "class_probability": s.class_probability if s else None,
            "risk_source": s.risk_source if s else None,
            "model": s.model if s else None,
            "error_code": r.error.code if r.error else None,
            "error_message": r.error.message if r.error else None,
        }
        for name, value in values.items():
            columns[name].append(value)
    return columns


class QScoreScorer:
    """Adds qscore's answer to every row of a batch.

    ``url``: the qscore server. ``column``: the column holding each image's encoded bytes or its
    file path (``read_binary_files`` names it ``"bytes"``). ``prefix`` is put before every added
    column's name (:data:`SCORE_COLUMNS`: ``q_score``, ``p_misclassified``,
    ``likely_misclassified``, ``predicted_class``, ``class_probability``, ``risk_source``,
    ``model``, ``error_code``, ``error_message``). ``drop_images`` drops the image column from
    the output, so the bytes are not carried further. The other arguments go to
    :class:`~qscore_client.QScoreClient`.

    A row whose image failed (unreadable, not an image, a path that cannot be opened) keeps its
    place with ``error_code`` and ``error_message`` set and null scores. An error for a whole
    request (wrong key, unknown model, server unreachable or full past the retries) raises, so
    Ray retries or fails the task instead of writing rows without scores.
    """

    def __init__(
        self,
        url: str,
        *,
        column: str = "bytes",
        model: Optional[str] = None,
        api_key: Optional[str] = None,
        prefix: str = "",
        drop_images: bool = False,
        timeout: float = 120.0,
        max_batch_images: Optional[int] = None,
        retry: Optional[RetryPolicy] = None,
    ):
        self.column = column
        self.prefix = prefix
        self.drop_images = drop_images
        self.client = QScoreClient(url, api_key=api_key, model=model, timeout=timeout,
                                   max_batch_images=max_batch_images, retry=retry)

    def __call__(self, batch: Any) -> Any:
        """Scores ``batch`` (DataFrame, dict of numpy arrays or pyarrow Table) and returns it in
        the same form with the score columns added."""
        images = [_image(v) for v in _column(batch, self.column)]
        columns = score_columns(self.client.score_batch(images))
        columns = {self.prefix + name: values for name, values in columns.items()}
        return _attach(batch, columns, self.column if self.drop_images else None, self.prefix)


def _image(value: Any) -> Any:
    # numpy hands bytes columns over as numpy.bytes_ (a bytes subclass) or object; Arrow as bytes.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return b""
    return value


def _column(batch: Any, name: str) -> List[Any]:
    if isinstance(batch, dict):
        values = batch[name]
    elif hasattr(batch, "column_names") and hasattr(batch, "append_column"):
        return batch.column(name).to_pylist()
    else:
        values = batch[name]
    return list(values.tolist() if hasattr(values, "tolist") and not hasattr(values, "iloc") else values)


def _attach(batch: Any, columns: Dict[str, List[Any]], drop: Optional[str], prefix: str) -> Any:
    types = {prefix + name: t for name, t in SCORE_COLUMNS.items()}
    if isinstance(batch, dict):
        import numpy as np

        out = {k: v for k, v in batch.items() if k != drop}
        for name, values in columns.items():
            if types[name] == "float64":
                out[name] = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
            else:
                # Object arrays keep None for a failed row; Ray stores them as nullable Arrow columns.
                out[name] = np.array(values, dtype=object)
        return out
    if hasattr(batch, "column_names") and hasattr(batch, "append_column"):
        import pyarrow as pa

        table = batch.drop_columns([drop]) if drop else batch
        arrow = {"float64": pa.float64(), "bool": pa.bool_(), "string": pa.string()}
        for name, values in columns.items():
            table = table.append_column(name, pa.array(values, type=arrow[types[name]]))
        return table
    import pandas as pd

    frame = batch.drop(columns=[drop]) if drop else batch.copy()
    pandas_types = {"float64": "float64", "bool": "boolean", "string": "object"}
    for name, values in columns.items():
        frame[name] = pd.Series(values, index=frame.index, dtype=pandas_types[types[name]])
    return frame
