import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from data_prep import words
from data_prep.synth import WorldConfig, generate_world
from recsys_mtl.errors import InputError
from tests.conftest import TINY_WORLD


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    ranks = pl.Series(scores).rank().to_numpy()
    positives = labels.astype(bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.*"))}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    cfg = WorldConfig(impressions=5_000, users=100, items=80, ads=10, days=4, seed=3, chunk_rows=1_500)
    first = _digest(generate_world(tmp_path / "a", cfg, progress=False))
    second = _digest(generate_world(tmp_path / "b", cfg, progress=False))
    other = _digest(generate_world(tmp_path / "c", WorldConfig(**{**cfg.__dict__, "seed": 4}), progress=False))
    assert first == second
    assert len(first) == 3 + 2 * 4 + 1  # users, items, ads, 4 days x (impressions, oracle), world.toml
    assert first["impressions/part-00000.parquet"] != other["impressions/part-00000.parquet"]


@pytest.fixture(scope="module")
def log(tiny_world: Path) -> pl.DataFrame:
    impressions = pl.read_parquet(tiny_world / "impressions")
    oracle = pl.read_parquet(tiny_world / "oracle")
    items = pl.read_parquet(tiny_world / "items.parquet").select("item_id", "kind", "launch_day")
    return impressions.join(oracle, on="impression_id", maintain_order="left").join(
        items, on="item_id", maintain_order="left"
    )


def test_log_has_every_impression_once(log: pl.DataFrame) -> None:
    assert log.height == TINY_WORLD.impressions
    assert log["impression_id"].n_unique() == TINY_WORLD.impressions
    assert log["day"].unique().sort().to_list() == list(range(TINY_WORLD.days))


def test_label_semantics_hold(log: pl.DataFrame) -> None:
    assert log.filter((pl.col("conversion") == 1) & (pl.col("click") == 0)).height == 0
    assert (log["rating"].is_not_null() == (log["conversion"] == 1)).all()
    assert log["rating"].drop_nulls().is_between(1, 5).all()
    assert (log["reads"].is_not_null() == (log["kind"] == "content")).all()
    assert log.filter(pl.col("click") == 0)["reads"].drop_nulls().max() == 0
    assert (log["exp_reads"].is_not_null() == (log["kind"] == "content")).all()


def test_rates_are_plausible_and_oracle_carries_signal(log: pl.DataFrame) -> None:
    ctr = log["click"].mean()
    assert 0.015 < ctr < 0.08
    clicks = log.filter(pl.col("click") == 1)
    assert 0.05 < clicks["conversion"].mean() < 0.5
    assert _auc(log["click"].to_numpy(), log["p_click"].to_numpy()) > 0.72
    assert _auc(clicks["conversion"].to_numpy(), clicks["p_conversion"].to_numpy()) > 0.6
    # the oracle's expected click rate matches the drawn one within sampling noise
    assert log["p_click"].mean() == pytest.approx(ctr, rel=0.1)


def test_items_launch_over_time_and_popularity_is_long_tailed(log: pl.DataFrame) -> None:
    assert log.filter(pl.col("day") < pl.col("launch_day")).height == 0
    assert log.filter(pl.col("launch_day") > 0)["launch_day"].n_unique() > 1
    counts = log.group_by("item_id").len().sort("len", descending=True)["len"].to_numpy()
    top_tenth = counts[: max(1, len(counts) // 10)].sum()
    assert top_tenth / counts.sum() > 0.3


def test_titles_name_the_brand_and_ads_promote_products(tiny_world: Path) -> None:
    items = pl.read_parquet(tiny_world / "items.parquet")
    products = items.filter(pl.col("kind") == "product")
    assert products.select(pl.col("title").str.starts_with(pl.col("brand")).all()).item()
    ads = pl.read_parquet(tiny_world / "ads.parquet").join(items, on="item_id")
    assert (ads["kind"] == "product").all()
    assert ads.select(pl.col("ad_text").str.contains(pl.col("brand"), literal=True).all()).item()


def test_recent_categories_are_distinct_known_categories(log: pl.DataFrame) -> None:
    known = {*words.PRODUCT_CATEGORIES, *words.CONTENT_TOPICS}
    recent = log["recent_categories"]
    assert recent.list.len().max() <= 5
    assert (recent.list.len() == recent.list.unique().list.len()).all()
    assert set(recent.explode().drop_nulls().unique()) <= known


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("impressions", 0, "--impressions must be >= 1"), ("days", 2, "--days must be >= 3"), ("items", 5, "--items")],
)
def test_bad_world_config_is_refused(field: str, value: int, message: str) -> None:
    with pytest.raises(InputError, match=message):
        WorldConfig(**{field: value})


def test_existing_output_is_kept_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate_world(out, WorldConfig(impressions=100, users=10, items=60, ads=2, days=3), progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_a_drifting_world_starts_as_the_still_one_and_moves_away(tmp_path: Path) -> None:
    cfg = WorldConfig(impressions=16_000, users=300, items=200, ads=20, days=8, seed=5, chunk_rows=4_000)
    still = generate_world(tmp_path / "still", cfg, progress=False)
    moving = generate_world(tmp_path / "moving", dataclasses.replace(cfg, taste_drift=0.3, price_drift=0.2), False)
    fading = generate_world(tmp_path / "fading", dataclasses.replace(cfg, item_half_life=2.0), progress=False)
    for table in ("users.parquet", "items.parquet", "ads.parquet"):
        assert pl.read_parquet(still / table).equals(pl.read_parquet(moving / table))

    def day(world: Path, d: int) -> pl.DataFrame:
        part = f"part-{d:05d}.parquet"  # one chunk of 2,000 rows a day
        return pl.read_parquet(world / "impressions" / part).join(
            pl.read_parquet(world / "oracle" / part), on="impression_id"
        )

    assert day(still, 0).equals(day(moving, 0))
    assert day(still, 0).equals(day(fading, 0))
    # tastes and prices move: the same impressions (users, items) get ever more different click and buy chances
    for d in range(8):
        assert day(still, d).select("user_id", "item_id").equals(day(moving, d).select("user_id", "item_id"))
    for column in ("p_click", "p_conversion"):
        gaps = [(day(moving, d)[column] - day(still, d)[column]).abs().mean() for d in (1, 4, 7)]
        assert 0 < gaps[0] < gaps[1] < gaps[2], column
    # items fade: by day 7 (3.5 half-lives) the items of day 0 get a much smaller share of the impressions
    launch = pl.read_parquet(still / "items.parquet").select("item_id", "launch_day")
    old_share = [day(world, 7).join(launch, on="item_id")["launch_day"].eq(0).mean() for world in (still, fading)]
    assert old_share[1] < old_share[0] - 0.2
    with pytest.raises(InputError, match="--price-drift must be >= 0"):
        WorldConfig(price_drift=-1.0)
