"""The prepared-dataset contract: `schema.toml` as dataclasses, and the checks run whenever a dataset is opened.

A prepared dataset is a folder:

    schema.toml                 this contract
    train/ valid/ test/         parquet shards of integer-encoded rows
    vocab/<table>.parquet       raw value -> index, for every vocabulary-encoded table
    text/<name>.parquet         index -> raw key, text, for every text feature
    text_emb/<name>.parquet     the texts' BERT vectors (`recsys-mtl encode-text`; see recsys_mtl.text)

Shard columns, by kind: id features Int64 (0 = unknown), multi-hot List(Int64), dense Float32 (raw, finite or null;
the reader applies `transform` and the train-split `mean` / `std`), text features Int64 (row of the text table, 0 = no
text), labels Float32 (finite, null = absent; never NaN), keys `key_<column>` with their raw dtype.
"""

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl
import tomli_w

from recsys_mtl.errors import InputError, MissingInputError, reading
from recsys_mtl.files import atomic_write_text
from recsys_mtl.structs import from_mapping, read_toml, to_mapping

SCHEMA_FILE = "schema.toml"
TEXT_EMB = "text_emb"
SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 1
KEY_PREFIX = "key_"
GIB = 1 << 30

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

    def __post_init__(self) -> None:
        if self.kind == "dense" and not self.std > 0:
            raise ValueError(f"feature {self.name!r}: std must be > 0, got {self.std}")


@dataclass(frozen=True)
class TextSpec:
    """A text feature: the shard column `name` holds a row of `text/<name>.parquet`, looked up by raw column `key`."""

    name: str
    key: str
    num_texts: int  # rows of the text table, plus the empty row 0

    def __post_init__(self) -> None:
        if self.num_texts < 1:
            raise ValueError(f"text {self.name!r}: num_texts must be >= 1 (the empty row 0), got {self.num_texts}")


@dataclass(frozen=True)
class LabelSpec:
    """A label column and the task it feeds. Null values are absent labels."""

    column: str
    task: str
    kind: TaskKind
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "regression" and (self.min is None or self.max is None or self.min >= self.max):
            raise ValueError(f"label {self.column!r}: a regression label needs min < max, got {self.min}, {self.max}")

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

    def __post_init__(self) -> None:
        if not self.files or self.num_rows < 1:
            raise ValueError(
                f"a split needs files and num_rows >= 1, got {len(self.files)} files, {self.num_rows} rows"
            )


@dataclass(frozen=True)
class Schema:
    name: str
    tables: tuple[TableSpec, ...]
    features: tuple[FeatureSpec, ...]
    labels: tuple[LabelSpec, ...]
    splits: dict[str, SplitSpec]
    texts: tuple[TextSpec, ...] = ()
    keys: tuple[str, ...] = ()
    oracle: OracleSpec | None = None
    format_version: int = FORMAT_VERSION
    source: str = ""
    parent: str = ""  # the dataset this one continues (`prepare --from`), whose indices and dense statistics it keeps

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version} is not supported (expected {FORMAT_VERSION})")
        tables = {t.name for t in self.tables}
        for f in self.features:
            if f.kind != "dense" and f.table not in tables:
                raise ValueError(
                    f"feature {f.name!r} uses table {f.table!r}, which is not among tables {sorted(tables)}"
                )
        if sorted(self.splits) != sorted(SPLITS):
            raise ValueError(f"splits must be exactly {list(SPLITS)}, got {sorted(self.splits)}")
        if len(tables) != len(self.tables):
            raise ValueError(f"table names must be unique, got {[t.name for t in self.tables]}")
        names = [
            *(f.name for f in self.features),
            *(t.name for t in self.texts),
            *(label.column for label in self.labels),
            *(KEY_PREFIX + key for key in self.keys),
        ]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate column names in {names}")
        tasks = [label.task for label in self.labels]
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"labels must feed distinct tasks, at least one; got {tasks}")
        if self.oracle is not None and (self.oracle.key not in self.keys or not set(self.oracle.columns) <= {*tasks}):
            raise ValueError(
                f"oracle: key {self.oracle.key!r} must be one of keys {list(self.keys)} and its tasks "
                f"{sorted(self.oracle.columns)} among {tasks}"
            )

    def table(self, name: str) -> TableSpec:
        return next(t for t in self.tables if t.name == name)

    def feature_table(self, feature: FeatureSpec) -> TableSpec:
        """The embedding table an id / multi-hot feature looks up.

        Raises:
            ValueError: `feature` is dense, so it looks up no table.
        """
        if feature.table is None:
            raise ValueError(f"feature {feature.name!r} ({feature.kind}) has no embedding table")
        return self.table(feature.table)

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
        """Read `folder/schema.toml`.

        Raises:
            MissingInputError: there is no schema.toml.
            InputError: it is not valid TOML, a key or value is wrong, its parts disagree, or its embedding tables
                would not fit in this machine's memory.
        """
        path = Path(folder) / SCHEMA_FILE
        schema = from_mapping(Schema, read_toml(path), str(path))
        check_table_memory(((t.name, t.num_embeddings, t.embedding_dim) for t in schema.tables), path)
        return schema


def machine_memory() -> int:
    """Physical memory of this machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_table_memory(tables: Iterable[tuple[str, int, int]], source: Path | str) -> None:
    """Refuse embedding tables (name, rows, dim) whose float32 weights would not fit in this machine's memory.

    Raises:
        InputError: naming `source`, the largest table and the sizes in GiB.
    """
    sizes = {name: (rows, dim, rows * dim * 4) for name, rows, dim in tables}
    total, memory = sum(size for *_, size in sizes.values()), machine_memory()
    if total > memory:
        name = max(sizes, key=lambda n: sizes[n][2])
        rows, dim, size = sizes[name]
        raise InputError(
            f"{source}: the embedding tables need {total / GIB:,.1f} GiB of float32 weights (table {name!r}: "
            f"{rows:,} rows x {dim} = {size / GIB:,.1f} GiB), more than this machine's memory ({memory / GIB:,.1f} GiB)"
        )


def read_table(path: Path) -> pl.DataFrame:
    """A parquet table of a prepared dataset (vocabulary, texts, vectors), read whole.

    Raises:
        InputError: it is missing (MissingInputError) or cannot be read, naming the file.
    """
    with reading(path):
        return pl.read_parquet(path)


def check_dataset(folder: Path, schema: Schema, splits: tuple[str, ...] = SPLITS) -> None:
    """Refuse a prepared dataset whose shards do not match its schema.

    Checks every shard of `splits`: present, readable, not empty, every schema column present with its dtype, ids
    within their table, text rows within their text table, dense values finite (and >= 0 under log1p), labels finite
    and within their domain; and every text table's size.

    Raises:
        MissingInputError: a shard or text table named by the schema is missing.
        InputError: the first problem found, naming the file, the column and what was expected.
    """
    folder = Path(folder)
    expected = schema.columns()
    limits = {f.name: schema.table(f.table).num_embeddings for f in schema.sparse_features if f.table}
    limits |= {t.name: t.num_texts for t in schema.texts}
    for split in splits:
        for name in schema.splits[split].files:
            path = folder / name
            if not path.is_file():
                raise MissingInputError(f"{path}: shard listed in {SCHEMA_FILE} is missing")
            with reading(path):
                actual = pl.read_parquet_schema(path)
                for column, dtype in expected.items():
                    if column not in actual:
                        raise InputError(
                            f"{path}: column {column!r} is missing ({SCHEMA_FILE} expects {dtype or 'a key'})"
                        )
                    if dtype is not None and actual[column] != dtype:
                        raise InputError(f"{path}: column {column!r} has dtype {actual[column]}, expected {dtype}")
                _check_values(path, schema, limits)
    for text in schema.texts:
        path = folder / "text" / f"{text.name}.parquet"
        if not path.is_file():
            raise MissingInputError(f"{path}: text table listed in {SCHEMA_FILE} is missing")
        with reading(path):
            num_rows = pl.scan_parquet(path).select(pl.len()).collect().item()
        if num_rows != text.num_texts - 1:
            raise InputError(f"{path}: has {num_rows} texts, {SCHEMA_FILE} says {text.num_texts - 1}")


def _check_values(path: Path, schema: Schema, limits: dict[str, int]) -> None:
    lf = pl.scan_parquet(path)
    aggs = [pl.len().alias("__rows")]
    for column in limits:
        values = pl.col(column).explode() if column in {f.name for f in schema.features} else pl.col(column)
        aggs += [values.min().alias(f"{column}/min"), values.max().alias(f"{column}/max")]
    for f in schema.dense_features:
        aggs.append(pl.col(f.name).is_finite().not_().sum().alias(f"{f.name}/non_finite"))
        if f.transform == "log1p":
            aggs.append((pl.col(f.name) < 0).sum().alias(f"{f.name}/negative"))
    for label in schema.labels:
        values = pl.col(label.column).drop_nulls()
        finite = values.filter(values.is_finite())
        aggs += [finite.min().alias(f"{label.column}/min"), finite.max().alias(f"{label.column}/max")]
        aggs.append(values.is_finite().not_().sum().alias(f"{label.column}/non_finite"))
        if label.kind != "regression":
            aggs.append((finite != finite.floor()).sum().alias(f"{label.column}/fractional"))
    stats = lf.select(aggs).collect().row(0, named=True)
    if stats["__rows"] == 0:
        raise InputError(f"{path}: shard is empty")
    for column, limit in limits.items():
        low, high = stats[f"{column}/min"], stats[f"{column}/max"]
        if low is not None and (low < 0 or high >= limit):
            bad = high if high >= limit else low
            raise InputError(f"{path}: column {column!r} has id {bad}, expected 0 <= id < {limit} (its table size)")
    for f in schema.dense_features:
        if stats[f"{f.name}/non_finite"]:
            raise InputError(
                f"{path}: dense column {f.name!r} has {stats[f'{f.name}/non_finite']} non-finite values (inf or NaN); "
                "expected finite numbers, or null for a missing value"
            )
        if stats.get(f"{f.name}/negative"):
            raise InputError(
                f"{path}: dense column {f.name!r} has {stats[f'{f.name}/negative']} negative values; "
                "its transform log1p needs values >= 0"
            )
    for label in schema.labels:
        if stats[f"{label.column}/non_finite"]:
            raise InputError(
                f"{path}: label {label.column!r} has {stats[f'{label.column}/non_finite']} non-finite values "
                f"(NaN or inf); expected {label.domain()}, or null for an absent label"
            )
        low, high = stats[f"{label.column}/min"], stats[f"{label.column}/max"]
        if low is None:
            continue
        lo, hi = {"binary": (0, 1), "count": (0, float("inf")), "regression": (label.min, label.max)}[label.kind]
        bad = low if lo is not None and low < lo else high if hi is not None and high > hi else None
        if bad is None and stats.get(f"{label.column}/fractional"):
            bad = "a fractional value"
        if bad is not None:
            raise InputError(f"{path}: label {label.column!r} has {bad}, expected {label.domain()}")
