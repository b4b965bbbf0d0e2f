from pathlib import Path

import polars as pl
import pytest

from data_prep.description import load_description
from data_prep.prepare import prepare
from recsys_mtl.data.encode import RawEncoder
from recsys_mtl.data.schema import SPLITS
from recsys_mtl.errors import InputError, MissingInputError
from tests.test_prepare import TOY_DESCRIPTION, _toy_raw


def _prepared_rows(folder: Path, key: str) -> pl.DataFrame:
    return pl.concat(pl.read_parquet(folder / split) for split in SPLITS).sort(key)


def test_raw_impressions_encode_exactly_as_prepared(tiny_world: Path, tiny_dataset: Path) -> None:
    raw = pl.read_parquet(tiny_world / "impressions")
    encoded = RawEncoder(tiny_dataset)(raw, "impressions")  # side tables joined from the world's raw folder
    assert encoded.height == raw.height
    assert encoded["key_impression_id"].to_list() == raw["impression_id"].to_list()  # same rows, same order
    prepared = _prepared_rows(tiny_dataset, "key_impression_id")
    assert encoded.sort("key_impression_id").equals(prepared)


@pytest.mark.parametrize("table", ["min_count = 2", "hash_buckets = 7"])
def test_toy_rows_encode_as_prepared_with_side_columns_given_and_unseen_ids(tmp_path: Path, table: str) -> None:
    raw = _toy_raw(tmp_path / "raw")
    (raw / "toy.toml").write_text(TOY_DESCRIPTION.replace("[tables.item]\nmin_count = 2", f"[tables.item]\n{table}"))
    prepare(raw, tmp_path / "ds", load_description(raw / "toy.toml"))
    rows = pl.read_csv(raw / "rows.csv")
    items = pl.read_csv(raw / "items.csv")
    encoder = RawEncoder(tmp_path / "ds")
    prepared = _prepared_rows(tmp_path / "ds", "key_row")
    assert encoder(rows, "rows.csv").sort("key_row").equals(prepared)
    joined = rows.join(items.select("item", "tags", "price"), on="item", how="left").drop("click", "stars")
    unlabelled = encoder(joined, "joined")  # side columns present: no join; labels absent: null
    assert unlabelled.drop("click", "stars").sort("key_row").equals(prepared.drop("click", "stars"))
    assert unlabelled["click"].null_count() == rows.height

    new = encoder(pl.DataFrame({"row": [10, 11], "day": [5, 5], "item": [99, 4]}), "new")
    if table.startswith("min_count"):
        assert new["item"].to_list() == [0, 0]  # never seen / seen only once in train: the unknown row
    assert new["title"].to_list() == [0, 4]  # item 99 has no text; item 4 has the catalogue's 4th title


def test_raw_rows_missing_a_feature_or_side_table_are_refused(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw")
    prepare(raw, tmp_path / "ds", load_description(raw / "toy.toml"))
    rows = pl.read_csv(raw / "rows.csv")
    with pytest.raises(
        ValueError, match=r"new.csv: column .item. \(to join \[.tags., .price.\] from items.csv\) is missing"
    ):
        RawEncoder(tmp_path / "ds")(rows.drop("item"), "new.csv")
    with pytest.raises(ValueError, match=r"new.csv: column 'row' \(key\) is missing"):
        RawEncoder(tmp_path / "ds")(rows.drop("row"), "new.csv")
    with pytest.raises(FileNotFoundError, match=r"side table 'items.csv' .* not under"):
        RawEncoder(tmp_path / "ds", side_dir=tmp_path)(rows, "new.csv")
    (tmp_path / "ds" / "description.toml").unlink()
    with pytest.raises(FileNotFoundError, match=r"description\.toml is missing"):
        RawEncoder(tmp_path / "ds")


def test_raw_rows_with_a_column_of_the_wrong_dtype_are_refused_naming_it(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw")
    prepare(raw, tmp_path / "ds", load_description(raw / "toy.toml"))
    rows = pl.read_csv(raw / "rows.csv").join(pl.read_csv(raw / "items.csv"), on="item", how="left")
    encoder = RawEncoder(tmp_path / "ds")
    with pytest.raises(
        InputError, match=r"new\.csv: column 'price' \(dense 'price'\) has dtype String, expected numbers"
    ):
        encoder(rows.with_columns(pl.col("price").cast(pl.String)), "new.csv")
    with pytest.raises(InputError, match=r"new\.csv: label column 'click' has dtype String, expected numbers"):
        encoder(rows.with_columns(pl.col("click").cast(pl.String)), "new.csv")
    with pytest.raises(
        InputError, match=r"new\.csv: cannot read it .*`str` to `i64` failed in column 'item'"
    ) as caught:
        encoder(rows.with_columns(pl.format("i{}", "item").alias("item")), "new.csv")
    assert caught.type is InputError


def test_missing_vocabulary_is_refused_naming_it(tmp_path: Path) -> None:
    raw = _toy_raw(tmp_path / "raw")
    prepare(raw, tmp_path / "ds", load_description(raw / "toy.toml"))
    (tmp_path / "ds" / "vocab" / "tags.parquet").unlink()
    with pytest.raises(MissingInputError, match=r"vocab/tags\.parquet"):
        RawEncoder(tmp_path / "ds")
