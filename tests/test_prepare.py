import dataclasses
import hashlib
import math
from pathlib import Path

import polars as pl
import pytest

from data_prep.description import load_description
from data_prep.prepare import prepare
from recsys_mtl.data.loader import Dataset, read_batches
from recsys_mtl.data.schema import Schema
from recsys_mtl.errors import InputError, MissingInputError
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


def _prepare_refused(raw: Path, error: type[Exception], message: str) -> str:
    """Prepare `raw` (its toy.toml) into a sibling folder; check that it fails with exactly `error` matching `message`
    and that the raw folder is all that is left beside it. Returns the message."""
    with pytest.raises(InputError, match=message) as caught:
        prepare(raw, raw.parent / "ds", load_description(raw / "toy.toml"))
    assert caught.type is error
    assert [p.name for p in raw.parent.iterdir()] == [raw.name]
    return str(caught.value)


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_output_over_inside_or_around_the_raw_folder_is_refused_and_raw_survives(tmp_path: Path, where: str) -> None:
    raw = _toy_raw(tmp_path / "raw")
    before = {p.name: p.read_bytes() for p in raw.iterdir()}
    out = {"same": raw, "inside": raw / "ds", "around": tmp_path}[where]
    with pytest.raises(InputError, match=rf"--out {out} is, contains or lies inside the input {raw}") as caught:
        prepare(raw, out, load_description(raw / "toy.toml"), overwrite=True)
    assert caught.type is InputError
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


@pytest.mark.parametrize(
    ("price", "message"),
    [
        (math.inf, r"items\.csv: dense column 'price' has inf \(2 such rows in all splits\), expected finite"),
        (math.nan, r"items\.csv: dense column 'price' has nan \(2 such rows in all splits\), expected finite"),
        (
            -2.0,
            r"items\.csv: dense column 'price' has -2\.0 \(2 such rows .*expected numbers >= 0 \(transform = 'log1p'",
        ),
    ],
)
def test_bad_dense_value_only_in_valid_and_test_is_refused(tmp_path: Path, price: float, message: str) -> None:
    raw = _toy_raw(tmp_path / "raw")
    items = pl.read_csv(raw / "items.csv")  # item 3 is shown on day 3 (valid) and day 4 (test), never in train
    items.with_columns(pl.when(pl.col("item") == 3).then(price).otherwise(pl.col("price")).alias("price")).write_csv(
        raw / "items.csv"
    )
    _prepare_refused(raw, InputError, message)


def test_non_finite_dense_value_of_the_rows_names_the_row_file(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw", dwell=[1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0, -math.inf, 1.0])
    (raw / "toy.toml").write_text(TOY_DESCRIPTION + '[[features]]\nname = "dwell"\nkind = "dense"\n')
    _prepare_refused(raw, InputError, rf"{raw / 'rows.csv'}: dense column 'dwell' has -inf \(1 such rows in all splits")


def test_nan_label_in_valid_is_refused_not_taken_as_absent(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw", stars=[None, 4.0, None, None, 5.0, None, 2.0, math.nan, None, 3.0])
    _prepare_refused(
        raw,
        InputError,
        r"rows\.csv: label column 'stars' has nan \(1 such rows in all splits\), expected a number in \[1\.0, 5\.0\], "
        "or null for an absent label",
    )


def test_empty_or_truncated_raw_file_is_refused_naming_it(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw")
    (raw / "items.csv").write_text("")
    _prepare_refused(raw, InputError, rf"{raw / 'items.csv'}: cannot read it \(NoDataError: empty CSV\)")
    pl.read_csv(raw / "rows.csv").write_parquet(raw / "rows.parquet")
    (raw / "rows.parquet").write_bytes((raw / "rows.parquet").read_bytes()[:100])
    (raw / "toy.toml").write_text(TOY_DESCRIPTION.replace('rows = ["rows.csv"]', 'rows = ["rows.parquet"]'))
    _prepare_refused(raw, InputError, rf"{raw / 'rows.parquet'}: cannot read it \(ComputeError: parquet")
    (raw / "rows.parquet").unlink()
    _prepare_refused(raw, MissingInputError, rf"no raw file matches 'rows.parquet' under {raw}")


def test_id_column_of_another_dtype_in_one_raw_file_is_refused_naming_both(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw")
    rows = pl.read_csv(raw / "rows.csv")
    rows.head(5).write_parquet(raw / "part-0.parquet")
    rows.tail(5).with_columns(pl.col("item").cast(pl.String)).write_parquet(raw / "part-1.parquet")
    (raw / "toy.toml").write_text(TOY_DESCRIPTION.replace('rows = ["rows.csv"]', 'rows = ["part-*.parquet"]'))
    _prepare_refused(
        raw,
        InputError,
        rf"{raw / 'part-1.parquet'}: column 'item' is String here but Int64 in {raw / 'part-0.parquet'}",
    )
    (raw / "part-1.parquet").unlink()
    pl.read_csv(raw / "items.csv").with_columns(pl.format("i{}", "item").alias("item")).write_csv(raw / "items.csv")
    _prepare_refused(raw, InputError, r"items\.csv: join key 'item' is String here but Int64 in the raw rows")


def test_unparsable_value_past_the_inferred_rows_is_refused_naming_the_raw_folder(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw")
    rows = pl.concat([pl.read_csv(raw / "rows.csv")] * 1_001).with_columns(pl.int_range(pl.len()).alias("row"))
    rows.cast({"item": pl.String}).with_columns(  # dtypes are inferred from the first 10,000 rows
        pl.when(pl.col("row") == 10_005).then(pl.lit("x")).otherwise(pl.col("item")).alias("item")
    ).write_csv(raw / "rows.csv")
    message = _prepare_refused(raw, InputError, rf"^{raw}: cannot read it \(ComputeError: ")
    assert "could not parse `x` as dtype `i64` at column 'item'" in message


def test_dense_column_of_strings_is_refused_naming_it(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw")
    pl.read_csv(raw / "items.csv").with_columns(pl.format("${}", "price").alias("price")).write_csv(raw / "items.csv")
    _prepare_refused(raw, InputError, rf"{raw}: column 'price' \(dense 'price'\) has dtype String, expected numbers")


def test_hashed_table_too_large_for_memory_is_refused_when_the_description_loads(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw")
    (raw / "toy.toml").write_text(TOY_DESCRIPTION.replace("min_count = 2", f"hash_buckets = {10**15}"))
    with pytest.raises(
        InputError,
        match=r"toy\.toml: the embedding tables need .* GiB .*table 'item': "
        r"1,000,000,000,000,001 rows x 16 = 59,604,644\.8 GiB\), more than this machine's memory",
    ):
        load_description(raw / "toy.toml")


def test_embedding_dim_that_no_table_can_take_is_refused_when_the_description_loads(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw")
    (raw / "toy.toml").write_text(TOY_DESCRIPTION.replace("min_count = 2", "min_count = 2\nembedding_dim = 30"))
    with pytest.raises(InputError, match=r"\[tables\.item\] in .*toy\.toml: embedding_dim must be a positive multiple"):
        load_description(raw / "toy.toml")


def test_the_next_period_extends_the_parents_encoding(tmp_path: Path) -> None:
    from recsys_mtl.cli import main

    raw = _toy_raw(tmp_path / "raw")
    parent = prepare(raw, tmp_path / "day1", load_description(raw / "toy.toml"))
    (tmp_path / "day1" / "text_emb").mkdir()
    (tmp_path / "day1" / "text_emb" / "title.parquet").write_bytes(b"vectors")
    # day 2: items 1 and 2 again, item 5 new (no catalog row: no text), item 3 now in train; prices changed
    raw2 = _toy_raw(tmp_path / "raw2", item=[5, 5, 2, 1, 5, 3, 3, 3, 6, 2])
    pl.DataFrame(
        {
            "item": [1, 2, 3, 4, 7],
            "tags": ["a|d", "b", None, "c", "d"],
            "price": [1e4, 1.0, 5.0, 1.0, 2.0],
            "title": ["red shoe", "blue cap", "new bag", "old box", "gift"],
        }
    ).write_csv(raw2 / "items.csv")
    assert main(["prepare", str(raw2), "--out", str(tmp_path / "day2"), "--from", str(tmp_path / "day1")]) == 0
    schema = Schema.load(tmp_path / "day2")
    assert schema.parent == str((tmp_path / "day1").resolve())
    for table in ("item", "tags"):
        old = pl.read_parquet(tmp_path / "day1" / "vocab" / f"{table}.parquet")
        new = pl.read_parquet(tmp_path / "day2" / "vocab" / f"{table}.parquet")
        assert new.head(old.height).equals(old)  # every old value keeps its index
        assert new["index"].to_list() == list(range(1, new.height + 1))
        assert schema.table(table).num_embeddings == new.height + 1
    item_vocab = pl.read_parquet(tmp_path / "day2" / "vocab" / "item.parquet")
    # train: item 5 on 3 rows is added; item 3 on 1 row is not (min_count 2); item 1 on 1 row stays (known)
    assert item_vocab.select("value", "index").rows() == [(1, 1), (2, 2), (5, 3)]
    tags = pl.read_parquet(tmp_path / "day2" / "vocab" / "tags.parquet")
    assert tags["value"].to_list() == ["b", "a", "d"]
    assert schema.dense_features == parent.dense_features  # the parent's statistics, not day 2's prices
    titles = pl.read_parquet(tmp_path / "day2" / "text" / "title.parquet")
    assert titles.rows() == [
        (1, 1, "red shoe"),
        (2, 2, "blue cap"),
        (3, 3, "new bag"),
        (4, 4, "old box"),
        (5, 7, "gift"),
    ]
    assert (tmp_path / "day2" / "text_emb" / "title.parquet").read_bytes() == b"vectors"  # encode-text reuses them
    train = pl.read_parquet(tmp_path / "day2" / "train")
    assert train["item"].to_list()[:3] == [3, 3, 2]  # raw 5, 5, 2


def test_the_next_period_refuses_another_description_and_its_parent_as_output(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw")
    desc = load_description(raw / "toy.toml")
    prepare(raw, tmp_path / "day1", desc)
    other = dataclasses.replace(desc, embedding_dim=8)
    with pytest.raises(
        InputError, match=r"description differs from the parent's \(embedding_dim: parent None, given 8"
    ):
        prepare(raw, tmp_path / "day2", other, parent=tmp_path / "day1")
    with pytest.raises(InputError, match="lies inside the input"):
        prepare(raw, tmp_path / "day1", desc, overwrite=True, parent=tmp_path / "day1")
    assert Schema.load(tmp_path / "day1").splits["train"].num_rows == 6  # untouched
