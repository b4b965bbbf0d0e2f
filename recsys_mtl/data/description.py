"""Dataset descriptions: what a raw source's columns mean. Preparing a new source needs only one of these.

A description is a TOML file (data_prep ships some in `data_prep/descriptions/`): where the rows are and how their
files read, which side tables to join, which columns to derive from others, which columns are id / multi-hot / dense
features and for which embedding table, which columns are texts, which are labels and which task each feeds, which
columns are keys, and how to split train / valid / test. A prepared dataset keeps the one it was prepared with
(`description.toml`), so that raw rows can be encoded like it when scored. README's "Describing a dataset" shows every
option with an example.
"""

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from recsys_mtl.data.schema import FeatureKind, TaskKind, Transform, check_table_memory
from recsys_mtl.errors import InputError
from recsys_mtl.structs import from_mapping, read_toml


@dataclass(frozen=True)
class ReadDesc:
    """How delimited-text files are read (parquet files need none of it). Any file that is not .parquet is delimited
    text, compressed (.gz, .zst) or not."""

    separator: str = ""  # one character; "": tab for .tsv files, else ","
    header: bool = True  # false: no header line; `columns` names the columns
    columns: tuple[str, ...] = ()  # the names of a headerless file's columns, in order
    encoding: str = "utf-8"  # any Python codec ("latin-1", "cp1252", ...); not UTF-8: read into memory
    null_values: tuple[str, ...] = ()  # values read as null (e.g. "?", "NA")
    quote: str = '"'  # "": quoting off (a quote is an ordinary character)
    strip: bool = False  # strip blanks around every value ("a, b" files); numbers are then recognised again

    def __post_init__(self) -> None:
        if len(self.separator) > 1 or len(self.quote) > 1:
            raise ValueError(
                f"separator and quote must be one character (or empty), got {self.separator!r}, {self.quote!r}"
            )
        if self.header == bool(self.columns):
            raise ValueError("give columns (the names) for a file without a header (header = false), and only then")
        try:
            "".encode(self.encoding)
        except LookupError:
            raise ValueError(f"encoding {self.encoding!r} is not a known codec (e.g. utf-8, latin-1)") from None


@dataclass(frozen=True)
class JoinDesc:
    """A side table (relative to the raw folder) left-joined to the rows on `on`; `read`: how it reads, when not as
    the description's `[read]` says."""

    path: str
    on: str
    columns: tuple[str, ...]
    read: ReadDesc | None = None


DeriveOp = Literal["threshold", "map", "log1p", "bucket", "prefix", "flags", "hour", "weekday", "sql"]
_DERIVE_ARGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # op -> (keys it needs, keys it may take)
    "threshold": (("column", "at"), ()),
    "map": (("column", "values"), ("default",)),
    "log1p": (("column",), ()),
    "bucket": (("column", "edges"), ()),
    "prefix": (("column", "length"), ()),
    "flags": (("columns",), ()),
    "hour": (("column",), ("format", "unit")),
    "weekday": (("column",), ("format", "unit")),
    "sql": (("sql",), ()),
}


@dataclass(frozen=True)
class DeriveDesc:
    """A column computed from others (after renames and joins) that features, labels, texts and keys can name:

    - threshold: 1.0 where `column` >= `at`, else 0.0 (`rating >= 4` -> a binary label);
    - map: `values[str(column)]` (`{"50000+." = 1}`), `default` for any other value (unset: null);
    - log1p: log(1 + `column`), e.g. a count as a regression label;
    - bucket: the band of `column` among the ascending `edges` (0: below the first, ..., len(edges): from the last);
    - prefix: the first `length` characters of `column` (as text);
    - flags: the names of the `columns` whose value is 1, as a list (19 genre flags -> one multi-hot feature);
    - hour / weekday (1 = Monday): of a datetime `column`, a text one parsed with `format` (strftime codes), or
      numbers counted in `unit` since 1970-01-01 UTC;
    - sql: a polars SQL expression over the columns (`sql = "CASE WHEN a > 0 THEN b ELSE c END"`): parsed, never run
      as Python.
    """

    name: str
    op: DeriveOp
    column: str = ""
    columns: tuple[str, ...] = ()
    at: float | None = None
    values: dict[str, float] = field(default_factory=dict)
    default: float | None = None
    edges: tuple[float, ...] = ()
    length: int = 0
    format: str = ""
    unit: Literal["s", "ms", "us", "ns"] = "s"
    sql: str = ""

    def __post_init__(self) -> None:
        needed, optional = _DERIVE_ARGS[self.op]
        defaults = {f.name: f.default_factory() if callable(f.default_factory) else f.default for f in fields(self)}
        for key, default in defaults.items():
            unset = getattr(self, key) == default
            if key in needed and unset:
                raise ValueError(f"derive {self.name!r}: op = {self.op!r} needs {', '.join(needed)}; {key} is unset")
            if key not in (*needed, *optional, "name", "op") and not unset:
                raise ValueError(f"derive {self.name!r}: {key} is not an option of op = {self.op!r}")
        if self.op == "bucket" and list(self.edges) != sorted(set(self.edges)):
            raise ValueError(f"derive {self.name!r}: edges must ascend strictly, got {list(self.edges)}")
        if self.op == "prefix" and self.length < 1:
            raise ValueError(f"derive {self.name!r}: length must be >= 1, got {self.length}")

    @property
    def sources(self) -> tuple[str, ...]:
        """The columns it reads (unknown for sql: polars checks them when the rows are read)."""
        return self.columns if self.op == "flags" else () if self.op == "sql" else (self.column,)


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
    """A text feature keyed by raw column `key`: `columns` of `path` (default: the rows, else read as `read` says or
    the description's `[read]`), joined by ". "."""

    name: str
    key: str
    columns: tuple[str, ...]
    path: str | None = None
    read: ReadDesc | None = None


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
    """time: the last rows by `column` (valid, then test fractions); random: by row, seeded; files: one source each
    (without a valid file, `valid` of the train file's rows, seeded)."""

    method: Literal["time", "random", "files"]
    column: str | None = None
    valid: float = 0.1
    test: float = 0.1
    seed: int = 0
    files: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method == "time" and not self.column:
            raise ValueError("split.method = 'time' needs split.column")
        if self.method == "files" and sorted(self.files) not in (["test", "train"], ["test", "train", "valid"]):
            raise ValueError(
                f"split.method = 'files' needs split.files with train, test and optionally valid; got "
                f"{sorted(self.files)}"
            )
        if self.method == "files" and not 0 < self.valid < 1:
            raise ValueError(f"split.valid must be in (0, 1), got {self.valid}")
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
    read: ReadDesc = field(default_factory=ReadDesc)
    joins: tuple[JoinDesc, ...] = ()
    derive: tuple[DeriveDesc, ...] = ()
    texts: tuple[TextDesc, ...] = ()
    keys: tuple[str, ...] = ()
    rename: dict[str, str] = field(default_factory=dict)  # raw column -> name, applied to the rows before anything else
    tables: dict[str, TableDesc] = field(default_factory=dict)
    embedding_dim: int = 16
    rows_per_shard: int = 1_000_000
    row_group_size: int = 65_536
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
        derived = [d.name for d in self.derive]
        if len(set(derived)) != len(derived):
            raise ValueError(f"derived column names must be unique; got {derived}")
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
    """Read the description TOML file at `path`. A `[[features]]` entry may declare many features at once with
    `names = [...]` instead of `name` (each name its own column; the other keys shared).

    Raises:
        MissingInputError: no such file.
        InputError: invalid TOML, an unknown key or a bad value, or hashed tables too large for this machine's memory.
    """
    path = Path(path)
    data = read_toml(path)
    data["features"] = _expand_features(data.get("features", []), path)
    desc = from_mapping(Description, data, str(path))
    hashed = [(name, t.hash_buckets + 1, t.embedding_dim or desc.embedding_dim) for name, t in desc.tables.items()]
    check_table_memory([table for table in hashed if table[1] > 1], path)  # vocabularies are sized by prepare
    return desc


def _expand_features(entries: Any, path: Path) -> Any:
    """`[[features]]` entries with `names = [...]` as one entry per name."""
    if not isinstance(entries, list):
        return entries  # from_mapping names the error
    expanded = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "names" not in entry:
            expanded.append(entry)
            continue
        names = entry["names"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise InputError(f"features[{i}].names in {path}: expected a non-empty list of column names, got {names!r}")
        clash = sorted({"name", "column"} & set(entry))
        if clash:
            raise InputError(f"features[{i}] in {path}: give names (each its own column) or {clash[0]}, not both")
        rest = {k: v for k, v in entry.items() if k != "names"}
        expanded += [{**copy.deepcopy(rest), "name": name} for name in names]
    return expanded
