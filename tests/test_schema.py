import math
import re
import shutil
from pathlib import Path

import polars as pl
import pytest

from recsys_mtl.data.loader import Dataset
from recsys_mtl.data.schema import Schema
from recsys_mtl.errors import InputError


@pytest.fixture
def dataset(tiny_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset, to be broken by each test."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "ds"))


def _rewrite(path: Path, edit) -> None:
    edit(pl.read_parquet(path)).write_parquet(path)


def test_a_good_dataset_opens(dataset: Path) -> None:
    ds = Dataset(dataset)
    assert ds.schema.kjt_keys[-2:] == ("item_title", "ad_text")
    assert sum(g.num_rows for g in ds.row_groups("train")) == ds.num_rows("train")


def test_missing_column_is_refused(dataset: Path) -> None:
    shard = dataset / Schema.load(dataset).splits["valid"].files[0]
    _rewrite(shard, lambda df: df.drop("price"))
    with pytest.raises(ValueError, match=rf"{shard}: column 'price' is missing \(schema.toml expects Float32\)"):
        Dataset(dataset)


def test_wrong_dtype_is_refused(dataset: Path) -> None:
    shard = dataset / Schema.load(dataset).splits["test"].files[0]
    _rewrite(shard, lambda df: df.with_columns(pl.col("user_id").cast(pl.Int32)))
    with pytest.raises(ValueError, match=rf"{shard}: column 'user_id' has dtype Int32, expected Int64"):
        Dataset(dataset)


def test_id_beyond_its_vocabulary_is_refused(dataset: Path) -> None:
    schema = Schema.load(dataset)
    shard = dataset / schema.splits["train"].files[-1]
    size = schema.table("item").num_embeddings
    _rewrite(
        shard,
        lambda df: df.with_columns(
            pl.when(pl.int_range(pl.len()) == 3).then(size + 5).otherwise(pl.col("item_id")).alias("item_id")
        ),
    )
    with pytest.raises(ValueError, match=rf"{shard}: column 'item_id' has id {size + 5}, expected 0 <= id < {size}"):
        Dataset(dataset)


def test_multi_hot_id_beyond_its_vocabulary_is_refused(dataset: Path) -> None:
    shard = dataset / Schema.load(dataset).splits["train"].files[0]
    _rewrite(shard, lambda df: df.with_columns(pl.col("recent_categories").list.concat(pl.lit([-1]))))
    with pytest.raises(ValueError, match="column 'recent_categories' has id -1"):
        Dataset(dataset)


def test_empty_shard_is_refused(dataset: Path) -> None:
    shard = dataset / Schema.load(dataset).splits["valid"].files[0]
    _rewrite(shard, lambda df: df.head(0))
    with pytest.raises(ValueError, match=rf"{shard}: shard is empty"):
        Dataset(dataset)


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [("click", 2.0, "0 or 1"), ("rating", 6.0, r"a number in \[1.0, 5.0\]"), ("reads", 1.5, "a whole number >= 0")],
)
def test_label_outside_its_domain_is_refused(dataset: Path, column: str, value: float, expected: str) -> None:
    shard = dataset / Schema.load(dataset).splits["test"].files[0]
    _rewrite(
        shard,
        lambda df: df.with_columns(
            pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(value, pl.Float32)).otherwise(pl.col(column)).alias(column)
        ),
    )
    with pytest.raises(ValueError, match=rf"{shard}: label '{column}' has .*expected {expected}"):
        Dataset(dataset)


def test_missing_shard_and_text_table_are_refused(dataset: Path) -> None:
    (dataset / "text" / "ad_text.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"ad_text\.parquet: text table listed in schema\.toml is missing"):
        Dataset(dataset)
    shard = dataset / Schema.load(dataset).splits["train"].files[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard}: shard listed in schema.toml is missing"):
        Dataset(dataset)


def test_schema_with_unknown_key_or_bad_dim_is_refused(dataset: Path) -> None:
    path = dataset / "schema.toml"
    text = path.read_text()
    path.write_text(text.replace('name = "synthetic"', 'name = "synthetic"\nnmae = "x"', 1))
    with pytest.raises(ValueError, match=f"unknown key nmae in {path}"):
        Dataset(dataset)
    path.write_text(text.replace("embedding_dim = 32", "embedding_dim = 30", 1))
    with pytest.raises(ValueError, match="embedding_dim must be a positive multiple of 4, got 30"):
        Dataset(dataset)


def test_feature_table_is_the_table_a_sparse_feature_looks_up(dataset: Path) -> None:
    schema = Schema.load(dataset)
    features = {f.name: f for f in schema.features}
    user = schema.feature_table(features["user_id"])
    assert (user.name, user.embedding_dim) == ("user", 32)
    assert schema.feature_table(features["advertiser"]).name == "brand"  # a table shared with `brand`
    assert schema.feature_table(features["recent_categories"]).name == "category"
    with pytest.raises(ValueError, match="feature 'price' \\(dense\\) has no embedding table"):
        schema.feature_table(features["price"])


def test_schema_round_trips_through_toml(dataset: Path, tmp_path: Path) -> None:
    schema = Schema.load(dataset)
    schema.save(tmp_path)
    assert Schema.load(tmp_path) == schema


def _refused(dataset: Path, error: type[Exception], message: str) -> None:
    with pytest.raises(InputError, match=message) as caught:
        Dataset(dataset)
    assert caught.type is error


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda text: re.sub(r"\[splits\.valid\].*?(?=\n\[)", "", text, flags=re.DOTALL),
            r"splits must be exactly \['train', 'valid', 'test'\], got \['test', 'train'\]",
        ),
        (lambda text: text.replace('task = "cvr"', 'task = "ctr"'), r"labels must feed distinct tasks, .*'ctr', 'ctr'"),
        (lambda text: text.replace("min = 1.0, max = 5.0", "min = 5.0, max = 1.0"), "needs min < max, got 5.0, 1.0"),
        (
            lambda text: re.sub(r'(name = "bid"\n[^\[]*std = )\S+', r"\g<1>0.0", text),
            "feature 'bid': std must be > 0, got 0.0",
        ),
        (lambda text: re.sub(r"num_rows = \d+", "num_rows = 0", text, count=1), r"num_rows >= 1, got \d files, 0 rows"),
        (lambda text: text[: len(text) // 2] + "\n[[[", "invalid TOML"),
    ],
)
def test_incomplete_or_inconsistent_schema_is_refused_naming_the_file(dataset: Path, edit, message: str) -> None:
    path = dataset / "schema.toml"
    path.write_text(edit(path.read_text()))
    _refused(dataset, InputError, rf"{path}.*{message}")


def test_embedding_table_too_large_for_memory_is_refused_naming_it(dataset: Path) -> None:
    path = dataset / "schema.toml"
    path.write_text(re.sub(r'"item", num_embeddings = \d+', f'"item", num_embeddings = {10**15}', path.read_text()))
    _refused(
        dataset,
        InputError,
        rf"{path}: the embedding tables need [\d,.]+ GiB of float32 weights \(table 'item': "
        r"1,000,000,000,000,000 rows x 32 = 119,209,289\.6 GiB\), more than this machine's memory \([\d,.]+ GiB\)",
    )


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("bid", math.inf, r"dense column 'bid' has 2 non-finite values \(inf or NaN\)"),
        ("bid", math.nan, r"dense column 'bid' has 2 non-finite values \(inf or NaN\)"),
        ("price", -3.0, r"dense column 'price' has 2 negative values; its transform log1p needs values >= 0"),
        ("click", math.nan, r"label 'click' has 2 non-finite values \(NaN or inf\); expected 0 or 1, or null"),
        ("reads", math.inf, r"label 'reads' has 2 non-finite values \(NaN or inf\); expected a whole number >= 0"),
    ],
)
def test_hand_made_shard_with_non_finite_values_is_refused(
    dataset: Path, column: str, value: float, message: str
) -> None:
    shard = dataset / Schema.load(dataset).splits["valid"].files[0]
    _rewrite(
        shard,
        lambda df: df.with_columns(
            pl.when(pl.int_range(pl.len()) < 2).then(pl.lit(value, pl.Float32)).otherwise(pl.col(column)).alias(column)
        ),
    )
    _refused(dataset, InputError, rf"{shard}: {message}")


def test_truncated_shard_is_refused_naming_it(dataset: Path) -> None:
    shard = dataset / Schema.load(dataset).splits["test"].files[0]
    shard.write_bytes(shard.read_bytes()[:-20])
    _refused(dataset, InputError, rf"{shard}: cannot read it \(ComputeError: parquet")
