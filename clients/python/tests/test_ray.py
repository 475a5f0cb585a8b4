"""QScoreScorer in a real local Ray: read_binary_files over the 200 Fashion-MNIST fixtures plus
bad files, and from_items over paths, each through map_batches against the real server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest
from conftest import API_KEY, BAD, FMNIST, MAX_BATCH_IMAGES, MODEL, URL

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray", reason="ray[data] comes from tests/requirements.txt: run `make tools`")

from qscore_client import QScoreClient
from qscore_client.ray import SCORE_COLUMNS, QScoreScorer

BAD_FILES = ["not_an_image.txt", "truncated.jpg", "corrupt.jpg"]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # Small and offline: two CPUs, no dashboard, a 200 MB object store, no usage reporting.
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
             log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


def scorer_kwargs(**extra: object) -> dict:
    return {"url": URL, "api_key": API_KEY, "model": MODEL, "max_batch_images": MAX_BATCH_IMAGES, **extra}


def actors(n: int) -> dict:
    # Scoring waits on the network, so an actor takes half a CPU: whole-CPU actors would take
    # both of Ray's CPUs and leave none for the read tasks that feed them (a deadlock).
    return {"compute": ray.data.ActorPoolStrategy(size=n), "num_cpus": 0.5}


def test_read_binary_files_pandas(local_ray: None, tmp_path: Path) -> None:
    for p in FMNIST:
        shutil.copy(p, tmp_path / f"{p.parent.name}-{p.name}")
    for name in BAD_FILES:
        shutil.copy(BAD / name, tmp_path / f"bad-{name}")
    ds = ray.data.read_binary_files(str(tmp_path), include_paths=True)
    scored = ds.map_batches(QScoreScorer, fn_constructor_kwargs=scorer_kwargs(drop_images=True),
                            batch_size=64, batch_format="pandas", **actors(2))
    df = scored.to_pandas()
    assert len(df) == len(FMNIST) + len(BAD_FILES)
    assert "bytes" not in df.columns and set(SCORE_COLUMNS) <= set(df.columns)
    df["file"] = df["path"].map(lambda p: Path(p).name)
    bad = df[df["file"].str.startswith("bad-")]
    good = df[~df["file"].str.startswith("bad-")]
    assert len(good) == len(FMNIST) and good["error_code"].isna().all()
    assert good["q_score"].notna().all() and good["p_misclassified"].between(0, 1).all()
    assert good["predicted_class"].notna().all() and (good["model"] == MODEL).all()
    assert len(bad) == len(BAD_FILES) and bad["error_code"].notna().all() and bad["q_score"].isna().all()
    assert set(bad["error_code"]) <= {"unsupported_image_format", "undecodable_image"}
    # Each row's score is its own image's: spot-check against direct calls.
    with QScoreClient(URL, api_key=API_KEY, model=MODEL) as c:
        for row in good.sample(5, random_state=0).itertuples():
            direct = c.score(Path(tmp_path) / row.file)
            assert row.q_score == pytest.approx(direct.q_score, rel=1e-5)
            assert row.predicted_class == direct.predicted_class


def test_from_items_paths_numpy(local_ray: None) -> None:
    paths = [str(p) for p in FMNIST[:40]] + [str(BAD / "truncated.jpg"), "/nonexistent/image.png"]
    ds = ray.data.from_items([{"path": p, "n": i} for i, p in enumerate(paths)])
    scored = ds.map_batches(QScoreScorer, fn_constructor_kwargs=scorer_kwargs(column="path", prefix="qs_"),
                            batch_size=16, batch_format="numpy", **actors(1))
    rows = sorted(scored.take_all(), key=lambda r: r["n"])
    assert [r["path"] for r in rows] == paths
    for r in rows[:40]:
        assert r["qs_error_code"] is None and r["qs_q_score"] >= 0 and r["qs_likely_misclassified"] in (True, False)
    assert rows[40]["qs_error_code"] == "undecodable_image"
    assert rows[41]["qs_error_code"] == "unreadable_file" and "/nonexistent/image.png" in rows[41]["qs_error_message"]
    assert all(r["qs_q_score"] != r["qs_q_score"] for r in rows[40:])  # NaN where the image failed


def test_pyarrow_batches(local_ray: None) -> None:
    ds = ray.data.from_items([{"image": p.read_bytes()} for p in FMNIST[:10]] + [{"image": b"not an image"}])
    scored = ds.map_batches(QScoreScorer, fn_constructor_kwargs=scorer_kwargs(column="image"),
                            batch_size=8, batch_format="pyarrow", **actors(1))
    table = scored.take_batch(batch_size=100, batch_format="pyarrow")
    codes = table.column("error_code").to_pylist()
    assert len(codes) == 11 and codes.count(None) == 10 and "unsupported_image_format" in codes
    assert table.column("q_score").null_count == 1
