"""The prepared-dataset contract: `schema.toml` as dataclasses, and the checks run whenever a dataset is opened.

A prepared dataset is a folder:

    schema.toml                 this contract
    train/ valid/ test/         parquet shards of integer-encoded rows
    vocab/<table>.parquet       raw value -> index, for every vocabulary-encoded table
    text/<name>.parquet         index -> raw key, text, for every text feature

Shard columns, by kind: id features Int64 (0 = unknown), multi-hot List(Int64), dense Float32 (raw; the reader
applies `transform` and the train-split `mean` / `std`), text features Int64 (row of the text table, 0 = no text),
labels Float32 (null = absent), keys `key_<column>` with their raw dtype.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl
import tomli_w

from recsys_mtl.files import atomic_write_text
from recsys_mtl.structs import from_mapping, read_toml, to_mapping

SCHEMA_FILE = "schema.toml"
SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 1
KEY_PREFIX = "key_"

FeatureKind = Literal["id", "multi_hot", "dense"]
TaskKind = Literal["binary", "regression", "count"]
Transform = Literal["none", "log1p"]


@dataclass(frozen=True)
class TableSpec:
    """An embedding table. Index 0 is the unknown / out-of-vocabulary / null row."""

    name: str
    num_embeddings: int
    embedding_dim: int
    encoding: Literal["vocab", "hash"] = "vocab"

    def __post_init__(self) -> None:
        if self.embedding_dim % 4 != 0 or self.embedding_dim < 4:
            raise ValueError(
                f"table {self.name!r}: embedding_dim must be a positive multiple of 4, got {self.embedding_dim}"
            )
        if self.num_embeddings < 1:
            raise ValueError(f"table {self.name!r}: num_embeddings must be >= 1, got {self.num_embeddings}")


@dataclass(frozen=True)
class FeatureSpec:
    """An input feature. id / multi_hot features look up `table`; dense ones are normalised with train statistics."""

    name: str
    kind: FeatureKind
    table: str | None = None
    transform: Transform = "none"
    mean: float = 0.0
    std: float = 1.0


@dataclass(frozen=True)
class TextSpec:
    """A text feature: the shard column `name` holds a row of `text/<name>.parquet`, looked up by raw column `key`."""

    name: str
    key: str
    num_texts: int  # rows of the text table, plus the empty row 0


@dataclass(frozen=True)
class LabelSpec:
    """A label column and the task it feeds. Null values are absent labels."""

    column: str
    task: str
    kind: TaskKind
    min: float | None = None
    max: float | None = None

    def domain(self) -> str:
        if self.kind == "binary":
            return "0 or 1"
        if self.kind == "count":
            return "a whole number >= 0"
        return f"a number in [{self.min}, {self.max}]"


@dataclass(frozen=True)
class OracleSpec:
    """A table of true probabilities / expectations per row (the synthetic world's), joined on key column `key`."""

    files: tuple[str, ...]  # absolute parquet paths
    key: str
    columns: dict[str, str]  # task -> oracle column


@dataclass(frozen=True)
class SplitSpec:
    files: tuple[str, ...]
    num_rows: int


@dataclass(frozen=True)
class Schema:
    name: str
    tables: tuple[TableSpec, ...]
    features: tuple[FeatureSpec, ...]
    labels: tuple[LabelSpec, ...]
    texts: tuple[TextSpec, ...] = ()
    keys: tuple[str, ...] = ()
    splits: dict[str, SplitSpec] = field(default_factory=dict)
    oracle: OracleSpec | None = None
    format_version: int = FORMAT_VERSION
    source: str = ""

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version} is not supported (expected {FORMAT_VERSION})")
        tables = {t.name for t in self.tables}
        for f in self.features:
            if f.kind != "dense" and f.table not in tables:
                raise ValueError(
                    f"feature {f.name!r} uses table {f.table!r}, which is not among tables {sorted(tables)}"
                )
        names = [*self.columns()]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate column names in {names}")

    def table(self, name: str) -> TableSpec:
        return next(t for t in self.tables if t.name == name)

    @property
    def sparse_features(self) -> tuple[FeatureSpec, ...]:
        return tuple(f for f in self.features if f.kind != "dense")

    @property
    def dense_features(self) -> tuple[FeatureSpec, ...]:
        return tuple(f for f in self.features if f.kind == "dense")

    @property
    def kjt_keys(self) -> tuple[str, ...]:
        """Keys of the batch's KeyedJaggedTensor: id and multi-hot features, then text features."""
        return (*(f.name for f in self.sparse_features), *(t.name for t in self.texts))

    def columns(self) -> dict[str, pl.DataType | None]:
        """Shard column -> expected polars dtype (None: any dtype, for raw key columns)."""
        kinds = {"id": pl.Int64(), "multi_hot": pl.List(pl.Int64), "dense": pl.Float32()}
        return {
            **{f.name: kinds[f.kind] for f in self.features},
            **{t.name: pl.Int64() for t in self.texts},
            **{label.column: pl.Float32() for label in self.labels},
            **{KEY_PREFIX + key: None for key in self.keys},
        }

    def save(self, folder: Path) -> None:
        atomic_write_text(Path(folder) / SCHEMA_FILE, tomli_w.dumps(to_mapping(self)))

    @staticmethod
    def load(folder: Path) -> "Schema":
        path = Path(folder) / SCHEMA_FILE
        return from_mapping(Schema, read_toml(path), str(path))


def check_dataset(folder: Path, schema: Schema, splits: tuple[str, ...] = SPLITS) -> None:
    """Refuse a prepared dataset whose shards do not match its schema.

    Checks every shard of `splits`: present, not empty, every schema column present with its dtype, ids within
    their table, text rows within their text table, labels within their domain; and every text table's size.

    Raises:
        FileNotFoundError: a shard or text table named by the schema is missing.
        ValueError: the first problem found, naming the file, the column and what was expected.
    """
    folder = Path(folder)
    expected = schema.columns()
    limits = {f.name: schema.table(f.table).num_embeddings for f in schema.sparse_features if f.table}
    limits |= {t.name: t.num_texts for t in schema.texts}
    for split in splits:
        for name in schema.splits[split].files:
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in {SCHEMA_FILE} is missing")
            actual = pl.read_parquet_schema(path)
            for column, dtype in expected.items():
                if column not in actual:
                    raise ValueError(f"{path}: column {column!r} is missing (schema.toml expects {dtype or 'a key'})")
                if dtype is not None and actual[column] != dtype:
                    raise ValueError(f"{path}: column {column!r} has dtype {actual[column]}, expected {dtype}")
            _check_values(path, schema, limits)
    for text in schema.texts:
        path = folder / "text" / f"{text.name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: text table listed in {SCHEMA_FILE} is missing")
        num_rows = pl.scan_parquet(path).select(pl.len()).collect().item()
        if num_rows != text.num_texts - 1:
            raise ValueError(f"{path}: has {num_rows} texts, {SCHEMA_FILE} says {text.num_texts - 1}")


def _check_values(path: Path, schema: Schema, limits: dict[str, int]) -> None:
    lf = pl.scan_parquet(path)
    aggs = [pl.len().alias("__rows")]
    for column in limits:
        values = pl.col(column).explode() if column in {f.name for f in schema.features} else pl.col(column)
        aggs += [values.min().alias(f"{column}/min"), values.max().alias(f"{column}/max")]
    for label in schema.labels:
        values = pl.col(label.column).drop_nulls()
        aggs += [values.min().alias(f"{label.column}/min"), values.max().alias(f"{label.column}/max")]
        if label.kind != "regression":
            aggs.append((values != values.floor()).sum().alias(f"{label.column}/fractional"))
    stats = lf.select(aggs).collect().row(0, named=True)
    if stats["__rows"] == 0:
        raise ValueError(f"{path}: shard is empty")
    for column, limit in limits.items():
        low, high = stats[f"{column}/min"], stats[f"{column}/max"]
        if low is not None and (low < 0 or high >= limit):
            bad = high if high >= limit else low
            raise ValueError(f"{path}: column {column!r} has id {bad}, expected 0 <= id < {limit} (its table size)")
    for label in schema.labels:
        low, high = stats[f"{label.column}/min"], stats[f"{label.column}/max"]
        if low is None:
            continue
        lo, hi = {"binary": (0, 1), "count": (0, float("inf")), "regression": (label.min, label.max)}[label.kind]
        bad = low if lo is not None and low < lo else high if hi is not None and high > hi else None
        if bad is None and stats.get(f"{label.column}/fractional"):
            bad = "a fractional value"
        if bad is not None:
            raise ValueError(f"{path}: label {label.column!r} has {bad}, expected {label.domain()}")
