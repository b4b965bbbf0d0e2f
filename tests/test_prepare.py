import hashlib
from pathlib import Path

import polars as pl
import pytest

from data_prep.description import load_description
from data_prep.prepare import prepare
from recsys_mtl.data.loader import Dataset, read_batches
from recsys_mtl.data.schema import Schema
from tests.conftest import TINY_WORLD, shared_data

TOY_DESCRIPTION = """
name = "toy"
rows = ["rows.csv"]
keys = ["row"]
[split]
method = "time"
column = "day"
valid = 0.2
test = 0.2
[[joins]]
path = "items.csv"
on = "item"
columns = ["tags", "price"]
[tables.item]
min_count = 2
[[features]]
name = "item"
kind = "id"
[[features]]
name = "tags"
kind = "multi_hot"
separator = "|"
[[features]]
name = "price"
kind = "dense"
transform = "log1p"
[[texts]]
name = "title"
key = "item"
path = "items.csv"
columns = ["title"]
[[labels]]
name = "click"
task = "ctr"
kind = "binary"
[[labels]]
name = "stars"
task = "rating"
kind = "regression"
min = 1
max = 5
"""


def _toy_raw(folder: Path, **overrides: list) -> Path:
    """10 rows over 5 days; items 1-3 (item 3 only in the last days), item 4 in the catalog but never shown."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {
        "row": list(range(10)),
        "day": [0, 0, 1, 1, 2, 2, 3, 3, 4, 4],
        "item": [1, 1, 2, 1, 2, 2, 3, 1, 3, 2],
        "click": [0, 1, 0, 0, 1, 0, 1, 0, 0, 1],
        "stars": [None, 4, None, None, 5, None, 2, None, None, 3],
    } | overrides
    pl.DataFrame(rows).write_csv(folder / "rows.csv")
    pl.DataFrame(
        {
            "item": [1, 2, 3, 4],
            "tags": ["a|b", "b", None, "c"],
            "price": [9.0, 99.0, None, 1.0],
            "title": ["red shoe", "blue hat", "new bag", "old box"],
        }
    ).write_csv(folder / "items.csv")
    (folder / "toy.toml").write_text(TOY_DESCRIPTION)
    return folder


def test_toy_source_prepares_with_train_only_vocabulary_and_stats(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw")
    schema = prepare(raw, tmp_path / "ds", load_description(raw / "toy.toml"))
    assert {s: schema.splits[s].num_rows for s in ("train", "valid", "test")} == {"train": 6, "valid": 2, "test": 2}
    vocab = pl.read_parquet(tmp_path / "ds" / "vocab" / "item.parquet")
    # train days 0-2 show item 1 three times and item 2 three times; min_count = 2 keeps both, most frequent first
    assert vocab.sort("index").select("value", "index", "count").rows() == [(1, 1, 3), (2, 2, 3)]
    test = pl.read_parquet(tmp_path / "ds" / "test")
    assert test["key_row"].to_list() == [8, 9]
    assert test["item"].to_list() == [0, 2]  # item 3 appears only in test: unknown id 0 ...
    titles = pl.read_parquet(tmp_path / "ds" / "text" / "title.parquet")
    assert titles.rows() == [(1, 1, "red shoe"), (2, 2, "blue hat"), (3, 3, "new bag"), (4, 4, "old box")]
    assert test["title"].to_list() == [3, 2]  # ... but its title row exists, so text can rank it
    price = schema.dense_features[0]
    train_prices = pl.Series([9.0, 9.0, 99.0, 9.0, 99.0, 99.0]).log1p()
    assert price.mean == pytest.approx(train_prices.mean())
    assert price.std == pytest.approx(train_prices.std())
    train = pl.read_parquet(tmp_path / "ds" / "train")
    tag_vocab = dict(pl.read_parquet(tmp_path / "ds" / "vocab" / "tags.parquet").select("value", "index").iter_rows())
    assert train["tags"][0].to_list() == [tag_vocab["a"], tag_vocab["b"]]
    assert train["stars"].to_list() == [None, 4.0, None, None, 5.0, None]


def test_synthetic_world_prepares_every_row_once_split_by_time(tiny_world: Path, tiny_dataset: Path) -> None:
    schema = Schema.load(tiny_dataset)
    assert sum(s.num_rows for s in schema.splits.values()) == TINY_WORLD.impressions
    days = {s: pl.read_parquet(tiny_dataset / s)["key_impression_id"] for s in schema.splits}
    impressions = pl.read_parquet(tiny_world / "impressions").select("impression_id", "day")
    by_split = {s: impressions.filter(pl.col("impression_id").is_in(ids.implode()))["day"] for s, ids in days.items()}
    assert by_split["train"].max() < by_split["valid"].min() <= by_split["valid"].max() < by_split["test"].min()
    assert len(schema.splits["train"].files) > 1  # rows_per_shard = 8000


def test_shared_table_gives_item_category_and_recent_categories_one_vocabulary(tiny_dataset: Path) -> None:
    schema = Schema.load(tiny_dataset)
    tables = {f.name: f.table for f in schema.features}
    assert tables["category"] == tables["recent_categories"] == "category"
    assert tables["advertiser"] == tables["brand"] == "brand"
    vocab = pl.read_parquet(tiny_dataset / "vocab" / "category.parquet")
    assert schema.table("category").num_embeddings == vocab.height + 1
    assert vocab["index"].to_list() == list(range(1, vocab.height + 1))


def test_cold_items_in_test_have_titles(tiny_world: Path, tiny_dataset: Path) -> None:
    test = pl.read_parquet(tiny_dataset / "test")
    cold = test.filter(pl.col("item_id") == 0)
    assert cold.height > 0
    assert (cold["item_title"] > 0).all()


def test_ali_ccp_sample_prepares_and_reads(tmp_path: Path) -> None:
    raw = shared_data("ali-ccp-sample")
    schema = prepare(raw, tmp_path / "ali", load_description("ali_ccp"))
    assert [schema.splits[s].num_rows for s in ("train", "valid", "test")] == [100, 50, 50]
    assert [label.task for label in schema.labels] == ["ctr", "cvr"]
    batches = list(read_batches(Dataset(tmp_path / "ali"), "train", 64))
    assert [len(b) for b in batches] == [64, 36]
    assert sum(int(b.labels["ctr"].sum()) for b in batches) == 7
    assert sum(int(b.labels["cvr"].sum()) for b in batches) == 1
    assert batches[0].dense.shape == (64, 8)


def test_womens_clothing_reviews_prepare_and_read(tmp_path: Path) -> None:
    raw = shared_data("womens-clothing-reviews")
    schema = prepare(raw, tmp_path / "reviews", load_description("reviews"))
    assert sum(s.num_rows for s in schema.splits.values()) == 23_486
    assert {label.task: label.kind for label in schema.labels} == {
        "rating": "regression",
        "recommend": "binary",
        "helpful": "count",
    }
    texts = pl.read_parquet(tmp_path / "reviews" / "text" / "review.parquet")
    assert texts.height == 23_486 - 844  # 844 rows have neither title nor review text
    batch = next(read_batches(Dataset(tmp_path / "reviews"), "test", 512))
    assert batch.masks["rating"].all()
    assert batch.labels["rating"].min() >= 1
    assert batch.sparse["review"].values().min() >= 0


def test_missing_column_is_refused_naming_it(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw")
    pl.read_csv(raw / "rows.csv").drop("click").write_csv(raw / "rows.csv")
    with pytest.raises(ValueError, match=r"column 'click' \(label 'click'\) is not in the raw rows"):
        prepare(raw, tmp_path / "ds", load_description(raw / "toy.toml"))
    assert not (tmp_path / "ds").exists()


def test_label_outside_its_domain_is_refused_naming_file_and_column(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw", stars=[None, 4, None, None, 7, None, 2, None, None, 3])
    with pytest.raises(
        ValueError, match=r"rows\.csv: label column 'stars' has 7 .*expected a number in \[1\.0, 5\.0\]"
    ):
        prepare(raw, tmp_path / "ds", load_description(raw / "toy.toml"))
    raw = _toy_raw(tmp_path / "raw2", click=[0, 1, 0, 0, 2, 0, 1, 0, 0, 1])
    with pytest.raises(ValueError, match=r"label column 'click' has 2 .*expected 0 or 1"):
        prepare(raw, tmp_path / "ds", load_description(raw / "toy.toml"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "raw2"]


def test_duplicate_join_key_is_refused(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw")
    items = pl.read_csv(raw / "items.csv")
    pl.concat([items, items.head(1)]).write_csv(raw / "items.csv")
    with pytest.raises(ValueError, match=r"items\.csv: join key 'item' is not unique"):
        prepare(raw, tmp_path / "ds", load_description(raw / "toy.toml"))


def test_empty_split_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw", day=[0] * 10)
    with pytest.raises(ValueError, match="split 'train' of 'toy' has no rows"):
        prepare(raw, tmp_path / "ds", load_description(raw / "toy.toml"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_unknown_description_key_is_refused(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw")
    (raw / "toy.toml").write_text(TOY_DESCRIPTION.replace('kind = "multi_hot"', 'kind = "multi_hot"\nseperator = "|"'))
    with pytest.raises(ValueError, match=r"unknown key features\[1\]\.seperator in .*toy.toml"):
        load_description(raw / "toy.toml")


def test_existing_dataset_is_replaced_only_with_overwrite(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw")
    desc = load_description(raw / "toy.toml")
    prepare(raw, tmp_path / "ds", desc)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare(raw, tmp_path / "ds", desc)
    prepare(raw, tmp_path / "ds", desc, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "raw"]


def test_hashed_table_buckets_every_value_stably(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw")
    (raw / "toy.toml").write_text(
        TOY_DESCRIPTION.replace("[tables.item]\nmin_count = 2", "[tables.item]\nhash_buckets = 7")
    )
    schema = prepare(raw, tmp_path / "ds", load_description(raw / "toy.toml"))
    assert schema.table("item").num_embeddings == 8
    assert schema.table("item").encoding == "hash"
    rows = (
        pl.concat(pl.read_parquet(tmp_path / "ds" / s) for s in ("train", "valid", "test"))
        .select("key_row", "item")
        .sort("key_row")
    )
    raw_items = pl.read_csv(raw / "rows.csv").sort("row")["item"].to_list()
    expected = [
        int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little") % 7 + 1 for v in raw_items
    ]
    assert rows["item"].to_list() == expected  # item 3, unseen in train, still gets its own bucket
    assert not (tmp_path / "ds" / "vocab" / "item.parquet").exists()
