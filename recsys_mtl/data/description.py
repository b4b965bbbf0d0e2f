"""Dataset descriptions: what a raw source's columns mean. Preparing a new source needs only one of these.

A description is a TOML file (data_prep ships some in `data_prep/descriptions/`): where the rows are, which side tables
to join, which columns are id / multi-hot / dense features and for which embedding table, which columns are texts, which
are labels and which task each feeds, which columns are keys, and how to split train / valid / test. A prepared dataset
keeps the one it was prepared with (`description.toml`), so that raw rows can be encoded like it when scored.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from recsys_mtl.data.schema import FeatureKind, TaskKind, Transform, check_table_memory
from recsys_mtl.structs import from_mapping, read_toml


@dataclass(frozen=True)
class JoinDesc:
    """A side table (parquet or csv, relative to the raw folder) left-joined to the rows on `on`."""

    path: str
    on: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class TableDesc:
    """Options of an embedding table: a frequency-thresholded vocabulary, or hashing into `hash_buckets` rows."""

    embedding_dim: int | None = None
    min_count: int = 1
    hash_buckets: int = 0

    def __post_init__(self) -> None:
        if self.min_count < 1 or self.hash_buckets < 0:
            raise ValueError(f"min_count must be >= 1 and hash_buckets >= 0, got {self.min_count}, {self.hash_buckets}")
        if self.embedding_dim is not None and (self.embedding_dim < 4 or self.embedding_dim % 4):
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")


@dataclass(frozen=True)
class FeatureDesc:
    """An input feature: output `name`, raw `column` (default: name), embedding `table` (default: name)."""

    name: str
    kind: FeatureKind
    column: str | None = None
    table: str | None = None
    separator: str | None = None  # multi_hot stored as a delimited string
    transform: Transform = "none"

    @property
    def source(self) -> str:
        return self.column or self.name


@dataclass(frozen=True)
class TextDesc:
    """A text feature keyed by raw column `key`: `columns` of `path` (default: the rows), joined by ". "."""

    name: str
    key: str
    columns: tuple[str, ...]
    path: str | None = None


@dataclass(frozen=True)
class LabelDesc:
    """A label: output `name`, raw `column` (default: name), the task it feeds and its kind."""

    name: str
    task: str
    kind: TaskKind
    column: str | None = None
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "regression" and (self.min is None or self.max is None or self.min >= self.max):
            raise ValueError(f"label {self.name!r}: a regression label needs min < max, got {self.min}, {self.max}")

    @property
    def source(self) -> str:
        return self.column or self.name


@dataclass(frozen=True)
class SplitDesc:
    """time: the last rows by `column` (valid, then test fractions); random: by row, seeded; files: one source each."""

    method: Literal["time", "random", "files"]
    column: str | None = None
    valid: float = 0.1
    test: float = 0.1
    seed: int = 0
    files: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method == "time" and not self.column:
            raise ValueError("split.method = 'time' needs split.column")
        if self.method == "files" and sorted(self.files) != ["test", "train", "valid"]:
            raise ValueError(
                f"split.method = 'files' needs split.files with train, valid, test; got {sorted(self.files)}"
            )
        if self.method != "files" and not (self.valid > 0 and self.test > 0 and self.valid + self.test < 1):
            raise ValueError(f"split.valid and split.test must be > 0 with a sum < 1, got {self.valid}, {self.test}")


@dataclass(frozen=True)
class OracleDesc:
    """Ground truth per row, for sources that have one: parquet files under RAW, their key, task -> column."""

    path: str
    key: str
    columns: dict[str, str]


@dataclass(frozen=True)
class Description:
    name: str
    split: SplitDesc
    features: tuple[FeatureDesc, ...]
    labels: tuple[LabelDesc, ...]
    rows: tuple[str, ...] = ()  # globs relative to the raw folder; unused with split.method = "files"
    joins: tuple[JoinDesc, ...] = ()
    texts: tuple[TextDesc, ...] = ()
    keys: tuple[str, ...] = ()
    rename: dict[str, str] = field(default_factory=dict)  # raw column -> name, applied to the rows before anything else
    tables: dict[str, TableDesc] = field(default_factory=dict)
    embedding_dim: int = 16
    rows_per_shard: int = 1_000_000
    row_group_size: int = 65_536
    csv_null_values: tuple[str, ...] = ()
    oracle: OracleDesc | None = None

    def __post_init__(self) -> None:
        if not self.labels:
            raise ValueError("a description needs at least one label")
        if self.embedding_dim < 4 or self.embedding_dim % 4 or min(self.rows_per_shard, self.row_group_size) < 1:
            raise ValueError(
                f"embedding_dim must be a positive multiple of 4, rows_per_shard and row_group_size >= 1; got "
                f"{self.embedding_dim}, {self.rows_per_shard}, {self.row_group_size}"
            )
        if self.split.method != "files" and not self.rows:
            raise ValueError(f"rows must name the raw row files for split.method = {self.split.method!r}")
        names = [f.name for f in self.features] + [t.name for t in self.texts] + [label.name for label in self.labels]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"feature, text and label names must be unique; repeated: {duplicated}")
        if self.oracle is not None and self.oracle.key not in self.keys:
            raise ValueError(f"oracle.key {self.oracle.key!r} must be one of keys {list(self.keys)}")
        tasks = [label.task for label in self.labels]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"each task takes one label; tasks repeated in {tasks}")
        unused = sorted(set(self.tables) - {f.table or f.name for f in self.features})
        if unused:
            raise ValueError(f"[tables] names tables no feature uses: {unused}")

    def table_options(self, table: str) -> TableDesc:
        return self.tables.get(table, TableDesc())


def read_description(path: Path | str) -> Description:
    """Read the description TOML file at `path`.

    Raises:
        MissingInputError: no such file.
        InputError: invalid TOML, an unknown key or a bad value, or hashed tables too large for this machine's memory.
    """
    path = Path(path)
    desc = from_mapping(Description, read_toml(path), str(path))
    hashed = [(name, t.hash_buckets + 1, t.embedding_dim or desc.embedding_dim) for name, t in desc.tables.items()]
    check_table_memory([table for table in hashed if table[1] > 1], path)  # vocabularies are sized by prepare
    return desc
