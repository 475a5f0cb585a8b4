"""The service's answers as typed, read-only records.

Each record keeps the JSON it was read from in ``raw``, so a field a newer server adds is never
lost to an older client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional


@dataclass(frozen=True)
class ActiveFeature:
    """One discriminative feature that fired: a member of L ∩ D.

    ``index`` is its position in the representation h, ``activation`` is h_j, and ``z_score`` is
    (h_j - mu) / sigma.
    """

    index: int
    activation: float
    z_score: float


@dataclass(frozen=True)
class Stats:
    """Statistics of one representation h (design notes, section 1).

    ``mu`` and ``sigma`` are h's mean and unbiased standard deviation, ``active`` is |L|,
    ``active_discriminative`` is |L ∩ D|, ``z_max`` = (max h - mu) / sigma, ``q_v1`` = z_max / ||h||_1,
    ``l2_norm`` = ||h||_2, and ``dim`` is d.
    """

    mu: float
    sigma: float
    active: int
    active_discriminative: int
    z_max: float
    q_v1: float
    l2_norm: float
    dim: int


@dataclass(frozen=True)
class ImageScore:
    """The answer for one image: the body of ``POST /v1/score`` (and of ``/v1/embed``).

    ``q_score`` is the Q-Score (>= 0; 0 when no discriminative feature fired).
    ``likely_misclassified`` and ``p_misclassified`` (a probability in [0, 1]) are None when the
    model is uncalibrated. ``risk_source`` names the estimator behind them. ``predicted_class``
    and ``class_probability`` come from the calibration's linear probe or from the model's own
    classifier head, and are None when there is neither. ``embedding`` (f32 values, length
    ``stats.dim``, or |D| with ``compressed=True``) is set only by ``embed``, and
    ``embedding_features`` only by a compressed ``embed``. ``timings_ms`` maps ``decode``,
    ``queue``, ``inference`` and ``total`` to milliseconds, and ``batch_size`` to the size of the
    ONNX Runtime run.
    """

    model: str
    q_score: float
    calibrated: bool
    likely_misclassified: Optional[bool]
    p_misclassified: Optional[float]
    risk_source: Optional[str]
    predicted_class: Optional[str]
    class_probability: Optional[float]
    discriminative_features: List[ActiveFeature]
    stats: Stats
    timings_ms: Mapping[str, float]
    embedding: Optional[List[float]] = None
    embedding_features: Optional[List[int]] = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ImageScore":
        """Reads one answer. Raises KeyError when a required field is missing."""
        return cls(
            model=d["model"],
            q_score=float(d["q_score"]),
            calibrated=bool(d["calibrated"]),
            likely_misclassified=d.get("likely_misclassified"),
            p_misclassified=d.get("p_misclassified"),
            risk_source=d.get("risk_source"),
            predicted_class=d.get("predicted_class"),
            class_probability=d.get("class_probability"),
            discriminative_features=[ActiveFeature(**f) for f in d["discriminative_features"]],
            stats=Stats(**{k: d["stats"][k] for k in Stats.__dataclass_fields__}),
            timings_ms=dict(d["timings_ms"]),
            embedding=d.get("embedding"),
            embedding_features=d.get("embedding_features"),
            raw=d,
        )


@dataclass(frozen=True)
class ErrorDetail:
    """Why one image failed: the server's stable snake_case ``code`` (``undecodable_image``,
    ``unsupported_image_format``, ...) and a ``message`` for a human. A client-side failure uses
    the code ``unreadable_file`` (a path that could not be read); it was never sent."""

    code: str
    message: str


@dataclass(frozen=True)
class BatchResult:
    """One image of a batch, at ``index`` in the input and under ``id`` (the id passed in, or
    the index as a string). Exactly one of ``score`` and ``error`` is set."""

    index: int
    id: str
    score: Optional[ImageScore] = None
    error: Optional[ErrorDetail] = None

    @property
    def ok(self) -> bool:
        """Whether the image was scored."""
        return self.error is None
