"""Raw rows -> shard rows: the encoding of ids, multi-hot lists and text keys, shared by data_prep's `prepare` and by
scoring.

`prepare` builds the vocabularies from the train split and encodes every split with these encoders; `RawEncoder`
rebuilds the same encoders from a prepared dataset's saved `vocab/`, `text/` and `description.toml`, so that raw rows
arriving later (to be scored) are encoded exactly as the training rows were: unseen ids go to the unknown row 0.
"""

import codecs
import hashlib
from collections.abc import Callable, Collection
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from recsys_mtl.data.description import DeriveDesc, Description, FeatureDesc, JoinDesc, ReadDesc, read_description
from recsys_mtl.data.schema import KEY_PREFIX, Schema, TableSpec, read_table
from recsys_mtl.errors import InputError, MissingInputError, reading

if TYPE_CHECKING:
    from polars._typing import PolarsDataType  # a dtype instance or class: a list's `inner` is the class

ENCODED = "__encoded_"
DESCRIPTION_FILE = "description.toml"
Encoder = Callable[[pl.LazyFrame], pl.LazyFrame]  # adds the column ENCODED + feature name


def raw_values(f: FeatureDesc) -> pl.Expr:
    """The raw values of an id / multi-hot feature; multi-hot as a list."""
    column = pl.col(f.source)
    return column.cast(pl.String).str.split(f.separator) if f.separator is not None else column


def features_by_table(desc: Description) -> dict[str, list[FeatureDesc]]:
    """The id and multi-hot features of each embedding table."""
    by_table: dict[str, list[FeatureDesc]] = {}
    for f in desc.features:
        if f.kind != "dense":
            by_table.setdefault(f.table or f.name, []).append(f)
    return by_table


def table_dtype(features: list[FeatureDesc], schema: pl.Schema) -> "PolarsDataType":
    """The dtype a table's raw values are compared in: theirs when all its features agree, else String."""
    if any(f.separator is not None for f in features):
        return pl.String()
    dtypes = {_element_dtype(schema[f.source]) for f in features}
    return dtypes.pop() if len(dtypes) == 1 else pl.String()


def _element_dtype(dtype: "PolarsDataType") -> "PolarsDataType":
    """A list's element dtype; any other dtype itself."""
    return dtype.inner if isinstance(dtype, pl.List) else dtype


def bucket(values: pl.Series, buckets: int) -> pl.Series:
    """Stable hashing (blake2b of the value's text) into rows 1..buckets; null -> 0."""
    uniq = values.drop_nulls().unique()
    index = [int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little") for v in uniq]
    return values.replace_strict(uniq, [i % buckets + 1 for i in index], default=0, return_dtype=pl.Int64)


def join_encoder(source: pl.Expr, mapping: pl.DataFrame, name: str) -> Encoder:
    """Encode by a left join on `mapping` (value -> index; unmatched -> 0): a join streams, a replace does not."""
    right = mapping.lazy().select(pl.col("value").alias("__value"), pl.col("index").alias(ENCODED + name))

    def encode(lf: pl.LazyFrame) -> pl.LazyFrame:
        lf = lf.with_columns(source.alias("__value")).join(right, on="__value", how="left", maintain_order="left")
        return lf.drop("__value").with_columns(pl.col(ENCODED + name).fill_null(0))

    return encode


def _hash_lookup(values: pl.Expr, buckets: int) -> pl.Expr:
    return values.map_batches(lambda s: bucket(s, buckets), return_dtype=pl.Int64)


def _vocab_lookup(values: pl.Expr, vocab: pl.DataFrame) -> pl.Expr:
    return values.replace_strict(vocab["value"], vocab["index"], default=0, return_dtype=pl.Int64)


def _column_encoder(expr: pl.Expr, name: str) -> Encoder:
    """Add `expr` as the encoded column of feature `name`."""

    def encode(lf: pl.LazyFrame) -> pl.LazyFrame:
        return lf.with_columns(expr.alias(ENCODED + name))

    return encode


def feature_encoders(
    desc: Description, tables: dict[str, TableSpec], vocabs: dict[str, pl.DataFrame], schema: pl.Schema
) -> dict[str, Encoder]:
    """The encoder of every id / multi-hot feature.

    Args:
        tables: table name -> spec (its encoding: "vocab" or "hash" into num_embeddings - 1 buckets).
        vocabs: vocabulary table name -> frame (value, index).
        schema: the raw rows' polars schema (the dtype hashed values are compared in).
    """
    encoders: dict[str, Encoder] = {}
    for name, features in features_by_table(desc).items():
        spec = tables[name]
        lookup: Callable[[pl.Expr], pl.Expr]
        if spec.encoding == "hash":
            dtype = table_dtype(features, schema)
            lookup = partial(_hash_lookup, buckets=spec.num_embeddings - 1)
        else:
            dtype = vocabs[name]["value"].dtype
            lookup = partial(_vocab_lookup, vocab=vocabs[name])
        for f in features:
            values = raw_values(f)
            if f.kind == "multi_hot":
                expr = values.list.eval(lookup(pl.element().cast(dtype))).fill_null(pl.lit([], pl.List(pl.Int64)))
            elif spec.encoding == "hash":
                expr = lookup(values.cast(dtype))
            else:
                encoders[f.name] = join_encoder(values.cast(dtype), vocabs[name], f.name)
                continue
            encoders[f.name] = _column_encoder(expr, f.name)
    return encoders


def text_encoder(key: str, table: pl.DataFrame, name: str) -> Encoder:
    """Raw text key column -> row of the text table (id, key, text); keys without a text -> 0."""
    mapping = table.select(pl.col("key").alias("value"), pl.col("id").alias("index"))
    return join_encoder(pl.col(key).cast(mapping["value"].dtype), mapping, name)


def shard_columns(desc: Description) -> list[pl.Expr]:
    """The shard columns, in order, from encoded raw rows (see recsys_mtl.data.schema)."""
    return [
        *(_feature_column(f).alias(f.name) for f in desc.features),
        *(pl.col(ENCODED + t.name).alias(t.name) for t in desc.texts),
        *(pl.col(label.source).cast(pl.Float32).alias(label.name) for label in desc.labels),
        *(pl.col(key).alias(KEY_PREFIX + key) for key in desc.keys),
    ]


def find_files(raw: Path, pattern: str) -> list[Path]:
    """The files under `raw` that `pattern` (a name or a glob) names.

    Raises:
        MissingInputError: none.
    """
    files = sorted(raw.glob(pattern)) if any(c in pattern for c in "*?[") else [raw / pattern]
    files = [f for f in files if f.is_file()]
    if not files:
        raise MissingInputError(f"no raw file matches {pattern!r} under {raw}")
    return files


def scan_raw(files: list[Path], read: ReadDesc, file_column: str | None = None) -> pl.LazyFrame:
    """Parquet files, or delimited-text files read as `read` says, as one lazy frame (with each row's file path as
    `file_column`, when given).

    Each file's header is read here, so that an empty, truncated or foreign file is refused by name. Parquet files
    must agree on their columns and dtypes; text files are unified by polars (a column's dtype widens if it must).

    Raises:
        InputError: parquet mixed with text files, a file that cannot be read (naming the [read] options it was read
            with), parquet files that disagree, or a headerless file whose width is not that of `read.columns`.
    """
    parquet = [f.suffix == ".parquet" for f in files]
    if all(parquet):
        _check_parquet_files(files)
        return pl.scan_parquet(files, include_file_paths=file_column)
    if any(parquet):
        raise InputError(f"{files[0].parent}: raw files of one table must all be parquet or all delimited text")
    frames = [_scan_text(f, read) for f in files]
    if file_column is not None:
        frames = [lf.with_columns(pl.lit(str(f)).alias(file_column)) for lf, f in zip(frames, files, strict=True)]
    return pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]


def _scan_text(path: Path, read: ReadDesc) -> pl.LazyFrame:
    """One delimited-text file; lazily when it is UTF-8 (compressed or not), else decoded into memory."""
    separator = read.separator or ("\t" if ".tsv" in path.suffixes else ",")
    options: dict[str, Any] = {
        "separator": separator,
        "has_header": read.header,
        "quote_char": read.quote or None,
        "null_values": None if read.strip else list(read.null_values) or None,  # after stripping, below
        "infer_schema": not read.strip,
        "infer_schema_length": 10_000,
    }
    how = (
        f"read with separator {separator!r}, header = {str(read.header).lower()}, encoding {read.encoding!r}, "
        f"quote {read.quote!r}: set the description's [read] options (or the join's or text's read) to fit the file"
    )
    try:
        with reading(path):
            if codecs.lookup(read.encoding).name == "utf-8":
                lf = pl.scan_csv(path, **options)
            else:
                lf = pl.read_csv(path, encoding=read.encoding, **options).lazy()
            names = lf.collect_schema().names()  # a lazy scan reads the first rows here
    except InputError as err:
        raise InputError(f"{err}; {how}") from err
    if not read.header:
        if len(names) != len(read.columns):
            raise InputError(
                f"{path}: {len(names)} columns, but read.columns names {len(read.columns)} ({list(read.columns)}); "
                f"{how}"
            )
        lf = lf.rename(dict(zip(names, read.columns, strict=True)))
    return _strip(lf, read.null_values) if read.strip else lf


def _strip(lf: pl.LazyFrame, null_values: tuple[str, ...]) -> pl.LazyFrame:
    """Text columns with blanks stripped, empty strings and `null_values` as null, and numbers typed again (a column
    is integer, else float, when every value of its first 10,000 rows is)."""
    value = pl.all().str.strip_chars()
    lf = lf.with_columns(pl.when(value.is_in([*null_values, ""])).then(None).otherwise(value).name.keep())
    sample = lf.head(10_000).collect()
    casts = {}
    for column in sample.iter_columns():
        for dtype in (pl.Int64, pl.Float64):
            if column.cast(dtype, strict=False).null_count() == column.null_count():
                casts[column.name] = dtype
                break
    return lf.with_columns(pl.col(name).cast(dtype) for name, dtype in casts.items())


def derive_columns(lf: pl.LazyFrame, desc: Description, where: str, optional: Collection[str] = ()) -> pl.LazyFrame:
    """`lf` with the description's derived columns added, in order (each may use the ones before it). A derived column
    in `optional` whose sources are missing is left out (e.g. a label of rows to score).

    Raises:
        InputError: naming `where` and the derived column: a source column is missing, a column of that name exists
            already, or an sql expression does not parse or names an unknown column.
    """
    schema = lf.collect_schema()
    for d in desc.derive:
        if d.name in schema:
            raise InputError(f"{where}: the rows have a column {d.name!r} already; name the derived column otherwise")
        missing = [c for c in d.sources if c not in schema]
        if missing and d.name in optional:
            continue
        if missing:
            raise InputError(
                f"{where}: column {missing[0]!r} (to derive {d.name!r}) is missing; the rows have "
                f"{sorted(c for c in schema if not c.startswith('__'))}"
            )
        try:
            derived = lf.with_columns(_derived(d, schema).alias(d.name))
            schema = derived.collect_schema()
        except (pl.exceptions.PolarsError, ValueError) as err:
            if d.name in optional:
                continue
            message = str(err).strip().splitlines()[0]
            raise InputError(f"{where}: cannot derive {d.name!r} (op = {d.op!r}): {message}") from None
        lf = derived
    return lf


def _derived(d: DeriveDesc, schema: pl.Schema) -> pl.Expr:
    """The expression of derived column `d` (see DeriveDesc) over rows of `schema`."""
    column = pl.col(d.column)
    number = column.cast(pl.Float64)
    if d.op == "threshold":
        return (number >= d.at).cast(pl.Float64)
    if d.op == "map":
        default = pl.lit(d.default, pl.Float64)
        return column.cast(pl.String).replace_strict(list(d.values), list(d.values.values()), default=default)
    if d.op == "log1p":
        return number.log1p()
    if d.op == "bucket":
        band = pl.sum_horizontal((number >= edge).cast(pl.Int64) for edge in d.edges)
        return pl.when(number.is_null()).then(None).otherwise(band)
    if d.op == "prefix":
        return column.cast(pl.String).str.slice(0, d.length)
    if d.op == "flags":
        return pl.concat_list(pl.when(pl.col(c) == 1).then(pl.lit(c)) for c in d.columns).list.drop_nulls()
    if d.op in ("hour", "weekday"):
        dtype = schema[d.column]
        if dtype == pl.String:
            when = column.str.strptime(pl.Datetime, d.format or None)
        elif dtype.is_numeric():
            when = pl.from_epoch(column, time_unit=d.unit)
        else:
            when = column
        return (when.dt.hour() if d.op == "hour" else when.dt.weekday()).cast(pl.Int64)
    return pl.sql_expr(d.sql)


def _check_parquet_files(files: list[Path]) -> None:
    """Refuse a parquet file that cannot be read, or whose columns or dtypes differ from the first file's."""
    first = files[0]
    theirs: dict[str, pl.DataType] = {}
    for f in files:
        with reading(f):
            schema = dict(pl.read_parquet_schema(f))
        theirs = theirs or schema
        differ = [c for c in {**theirs, **schema} if theirs.get(c) != schema.get(c)]
        if differ:
            raise InputError(
                f"{f}: column {differ[0]!r} is {schema.get(differ[0], 'absent')} here but "
                f"{theirs.get(differ[0], 'absent')} in {first}; the raw files of one table must agree"
            )


def check_dtypes(available: pl.Schema, desc: Description, where: str) -> None:
    """Refuse raw columns of a dtype their role cannot take: dense features and labels need numbers, multi-hot
    features a list (or a `separator`). Absent labels are skipped.

    Raises:
        InputError: naming `where`, the column, its role and its dtype.
    """
    for f in desc.features:
        dtype = available[f.source]
        if f.kind == "multi_hot" and not isinstance(dtype, pl.List) and f.separator is None:
            raise InputError(
                f"{where}: column {f.source!r} (multi_hot {f.name!r}) has dtype {dtype}: give a list or a separator"
            )
        if f.kind == "dense" and not dtype.is_numeric():
            raise InputError(f"{where}: column {f.source!r} (dense {f.name!r}) has dtype {dtype}, expected numbers")
    for label in desc.labels:
        label_dtype = available.get(label.source)
        if label_dtype is not None and not label_dtype.is_numeric():
            raise InputError(f"{where}: label column {label.source!r} has dtype {label_dtype}, expected numbers")


def _feature_column(f: FeatureDesc) -> pl.Expr:
    return pl.col(f.source).cast(pl.Float32) if f.kind == "dense" else pl.col(ENCODED + f.name)


def unique_side_table(side: pl.LazyFrame, on: str, path: Path) -> pl.LazyFrame:
    """`side` itself, after checking that its join key is unique (else a left join would repeat rows).

    Raises:
        InputError: the key repeats, or `path` cannot be read.
    """
    with reading(path):
        duplicated = side.select(pl.col(on).is_duplicated().any()).collect().item()
    if duplicated:
        raise InputError(f"{path}: join key {on!r} is not unique, so the join would repeat rows")
    return side


class RawEncoder:
    """Raw rows -> shard rows of a prepared dataset, with its saved vocabularies: `encoder(df, source)`.

    The rows look like the description's row files. Side-table columns already in the rows are used as they are;
    missing ones are joined from the side tables under `side_dir` (default: the raw folder the dataset was prepared
    from). Labels are optional (absent ones are null); features, text keys and key columns are required.
    """

    def __init__(self, folder: Path | str, side_dir: Path | str | None = None) -> None:
        folder = Path(folder)
        path = folder / DESCRIPTION_FILE
        if not path.is_file():
            raise MissingInputError(f"{path} is missing: prepare the dataset again to score raw rows with it")
        self.desc = read_description(path)
        self.schema = Schema.load(folder)
        self.side_dir = Path(side_dir) if side_dir is not None else Path(self.schema.source)
        self.tables = {t.name: t for t in self.schema.tables}
        self.vocabs = {
            t.name: read_table(folder / "vocab" / f"{t.name}.parquet")
            for t in self.schema.tables
            if t.encoding == "vocab"
        }
        self.text_encoders = [
            text_encoder(t.key, read_table(folder / "text" / f"{t.name}.parquet"), t.name) for t in self.desc.texts
        ]
        self._sides: dict[str, pl.DataFrame] = {}

    def __call__(self, df: pl.DataFrame, source: str) -> pl.DataFrame:
        """Encode raw rows `df` (read from `source`, named in errors): the same rows, in order, as shard columns.

        Raises:
            MissingInputError: a side table needed for missing columns is not under `side_dir`.
            InputError: a feature, text key or key column is missing, or a column has a dtype its role cannot take
                (a dense feature or label that is not numeric, an id that does not cast to its vocabulary's dtype).
        """
        desc = self.desc
        df = df.rename({k: v for k, v in desc.rename.items() if k in df.columns})
        lf = df.lazy()
        for join in desc.joins:
            wanted = [c for c in join.columns if c not in df.columns]
            if wanted and join.on not in lf.collect_schema():
                raise InputError(f"{source}: column {join.on!r} (to join {wanted} from {join.path}) is missing")
            if wanted:
                side = self._side(join, wanted, source)
                lf = lf.join(side, on=join.on, how="left", maintain_order="left")
        lf = derive_columns(lf, desc, source, optional={label.source for label in desc.labels})
        available = lf.collect_schema()
        needed = [(f.source, f"feature {f.name!r}") for f in desc.features]
        needed += [(t.key, f"text {t.name!r} key") for t in desc.texts] + [(k, "key") for k in desc.keys]
        for column, role in needed:
            if column not in available:
                raise InputError(f"{source}: column {column!r} ({role}) is missing; the rows have {sorted(available)}")
        check_dtypes(available, desc, source)
        absent = [label.source for label in desc.labels if label.source not in available]
        lf = lf.with_columns(pl.lit(None, pl.Float32).alias(c) for c in absent)
        for encode in [*feature_encoders(desc, self.tables, self.vocabs, available).values(), *self.text_encoders]:
            lf = encode(lf)
        with reading(source):  # e.g. an id column of strings where the vocabulary holds numbers
            return lf.select(shard_columns(desc)).collect()

    def _side(self, join: JoinDesc, columns: list[str], source: str) -> pl.LazyFrame:
        pattern, on = join.path, join.on
        if pattern not in self._sides:
            try:
                files = find_files(self.side_dir, pattern)
            except MissingInputError:
                raise MissingInputError(
                    f"{source}: columns {columns} are missing, and the side table {pattern!r} to join them from is "
                    f"not under {self.side_dir} (pass the raw folder that has it)"
                ) from None
            with reading(files[0]):
                side = scan_raw(files, join.read or self.desc.read)
                self._sides[pattern] = unique_side_table(side, on, files[0]).collect()
        return self._sides[pattern].lazy().select(on, *columns)
