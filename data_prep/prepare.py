"""Raw tables -> a prepared dataset (see recsys_mtl.data.schema), driven by a Description.

Everything is a polars lazy query over the raw files (scan -> join -> encode -> sink), so data larger than memory
streams through. Vocabularies and dense statistics come from the train split only. The dataset is written to a
temporary folder, checked against its schema, and renamed into place.
"""

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import polars as pl

from data_prep.description import Description, FeatureDesc, LabelDesc, TextDesc
from recsys_mtl.data.schema import (
    KEY_PREFIX,
    SPLITS,
    FeatureSpec,
    LabelSpec,
    OracleSpec,
    Schema,
    SplitSpec,
    TableSpec,
    TextSpec,
    check_dataset,
)
from recsys_mtl.files import atomic_dir

log = logging.getLogger(__name__)
SPLIT, FILE, ENCODED = "__split", "__file", "__encoded_"
Encoder = Callable[[pl.LazyFrame], pl.LazyFrame]  # adds the column ENCODED + feature name
TEXT_SEPARATOR = ". "


def prepare(raw: Path, out: Path, desc: Description, overwrite: bool = False) -> Schema:
    """Prepare the raw source in `raw` as described by `desc`, writing the dataset folder `out`.

    Returns:
        The schema written to `out/schema.toml`.

    Raises:
        FileNotFoundError: a raw file named by the description is missing.
        ValueError: a raw column is missing or has the wrong type, a label is outside its domain, a split is empty.
    """
    raw = Path(raw)
    rows = _scan_rows(raw, desc)
    _check_columns(rows, desc)
    _check_labels(rows, desc.labels)
    train = rows.filter(pl.col(SPLIT) == "train")
    with atomic_dir(out, overwrite) as tmp:
        log.info("building vocabularies from the train split")
        tables, encoders = _build_tables(train, desc, tmp / "vocab")
        log.info("writing text tables")
        texts = [_build_text(raw, rows, text, desc, tmp / "text", encoders) for text in desc.texts]
        dense = _dense_stats(train, [f for f in desc.features if f.kind == "dense"])
        features = tuple(
            dense.get(f.name) or FeatureSpec(name=f.name, kind=f.kind, table=f.table or f.name) for f in desc.features
        )
        encoded = rows
        for encode in encoders.values():
            encoded = encode(encoded)
        encoded = encoded.select(
            pl.col(SPLIT),
            *(
                pl.col(f.source).cast(pl.Float32).alias(f.name)
                if f.kind == "dense"
                else pl.col(ENCODED + f.name).alias(f.name)
                for f in desc.features
            ),
            *(pl.col(ENCODED + t.name).alias(t.name) for t in desc.texts),
            *(pl.col(label.source).cast(pl.Float32).alias(label.name) for label in desc.labels),
            *(pl.col(key).alias(KEY_PREFIX + key) for key in desc.keys),
        )
        splits = {split: _sink_split(encoded, split, tmp, desc) for split in SPLITS}
        schema = Schema(
            name=desc.name,
            source=str(raw.resolve()),
            tables=tuple(tables),
            features=features,
            texts=tuple(texts),
            labels=tuple(
                LabelSpec(column=label.name, task=label.task, kind=label.kind, min=label.min, max=label.max)
                for label in desc.labels
            ),
            keys=desc.keys,
            splits=splits,
            oracle=_oracle(raw, desc),
        )
        schema.save(tmp)
        check_dataset(tmp, schema)
    log.info("prepared %s: %s", out, ", ".join(f"{s} {splits[s].num_rows:,} rows" for s in SPLITS))
    return schema


def _oracle(raw: Path, desc: Description) -> OracleSpec | None:
    if desc.oracle is None:
        return None
    files = _files(raw, desc.oracle.path)
    names = pl.read_parquet_schema(files[0])
    missing = [c for c in (desc.oracle.key, *desc.oracle.columns.values()) if c not in names]
    if missing:
        raise ValueError(f"{files[0]}: oracle column {missing[0]!r} is missing")
    return OracleSpec(files=tuple(str(f.resolve()) for f in files), key=desc.oracle.key, columns=desc.oracle.columns)


def _files(raw: Path, pattern: str) -> list[Path]:
    files = sorted(raw.glob(pattern)) if any(c in pattern for c in "*?[") else [raw / pattern]
    files = [f for f in files if f.is_file()]
    if not files:
        raise FileNotFoundError(f"no raw file matches {pattern!r} under {raw}")
    return files


def _scan(files: list[Path], desc: Description, file_column: str | None = None) -> pl.LazyFrame:
    suffixes = {f.suffix for f in files}
    if suffixes == {".parquet"}:
        return pl.scan_parquet(files, include_file_paths=file_column)
    if suffixes <= {".csv", ".tsv"}:
        separator = "\t" if suffixes == {".tsv"} else ","
        nulls = list(desc.csv_null_values) or None
        return pl.scan_csv(files, separator=separator, null_values=nulls, include_file_paths=file_column)
    raise ValueError(f"raw files must be .parquet, .csv or .tsv, got {sorted(suffixes)} in {files[0].parent}")


def _scan_rows(raw: Path, desc: Description) -> pl.LazyFrame:
    """The raw rows with side tables joined and a split column (train / valid / test)."""
    split = desc.split
    if split.method == "files":
        rows = pl.concat(
            [_scan(_files(raw, split.files[s]), desc, FILE).with_columns(pl.lit(s).alias(SPLIT)) for s in SPLITS],
            how="vertical_relaxed",
        )
    else:
        files = [f for pattern in desc.rows for f in _files(raw, pattern)]
        rows = _scan(files, desc, FILE)
    if desc.rename:
        rows = rows.rename(desc.rename)
    for join in desc.joins:
        path = _files(raw, join.path)
        side = _scan(path, desc)
        names = side.collect_schema().names()
        missing = [c for c in (join.on, *join.columns) if c not in names]
        if missing:
            raise ValueError(f"{path[0]}: column {missing[0]!r} named by the join on {join.on!r} is missing")
        if rows.select(join.on).collect_schema().get(join.on) is None:
            raise ValueError(f"join on {join.on!r}: the raw rows have no column {join.on!r}")
        side = side.select(join.on, *join.columns)
        if side.select(pl.col(join.on).is_duplicated().any()).collect().item():
            raise ValueError(f"{path[0]}: join key {join.on!r} is not unique, so the join would repeat rows")
        rows = rows.join(side, on=join.on, how="left", maintain_order="left")
    if split.method == "time":
        cuts = rows.select(
            pl.col(split.column).quantile(1 - split.valid - split.test, "higher").alias("valid"),
            pl.col(split.column).quantile(1 - split.test, "higher").alias("test"),
        ).collect()
        time = pl.col(split.column)
        label = pl.when(time >= cuts["test"]).then(pl.lit("test")).when(time >= cuts["valid"]).then(pl.lit("valid"))
        rows = rows.with_columns(label.otherwise(pl.lit("train")).alias(SPLIT))
    elif split.method == "random":
        # a Weyl sequence over the row index: deterministic, uniform, independent of the polars version
        u = ((pl.int_range(pl.len(), dtype=pl.Int64) * 2654435761 + split.seed * 40503) % 2**32) / 2**32
        label = pl.when(u < split.test).then(pl.lit("test")).when(u < split.test + split.valid).then(pl.lit("valid"))
        rows = rows.with_columns(label.otherwise(pl.lit("train")).alias(SPLIT))
    return rows


def _check_columns(rows: pl.LazyFrame, desc: Description) -> None:
    available = rows.collect_schema()
    needed = [(f.source, f"feature {f.name!r}") for f in desc.features]
    needed += [(label.source, f"label {label.name!r}") for label in desc.labels]
    needed += [(t.key, f"text {t.name!r} key") for t in desc.texts]
    needed += [(c, f"text {t.name!r}") for t in desc.texts if t.path is None for c in t.columns]
    needed += [(k, "keys") for k in desc.keys]
    needed += [(desc.split.column, "split.column")] if desc.split.column else []
    for column, role in needed:
        if column not in available:
            raise ValueError(
                f"column {column!r} ({role}) is not in the raw rows or joined tables of {desc.name!r}; "
                f"available: {sorted(c for c in available if not c.startswith('__'))}"
            )
    for f in desc.features:
        dtype = available[f.source]
        if f.kind == "multi_hot" and not isinstance(dtype, pl.List) and f.separator is None:
            raise ValueError(
                f"column {f.source!r} (multi_hot {f.name!r}) has dtype {dtype}: give a list or a separator"
            )
        if f.kind == "dense" and not dtype.is_numeric():
            raise ValueError(f"column {f.source!r} (dense {f.name!r}) has dtype {dtype}, expected numbers")
    for label in desc.labels:
        if not available[label.source].is_numeric():
            raise ValueError(f"label column {label.source!r} has dtype {available[label.source]}, expected numbers")


def _check_labels(rows: pl.LazyFrame, labels: tuple[LabelDesc, ...]) -> None:
    """Refuse a raw label outside its domain, naming the first raw file and value that break it."""
    bad = {}
    for label in labels:
        value = pl.col(label.source).cast(pl.Float64)
        if label.kind == "binary":
            ok = value.is_in([0.0, 1.0])
        elif label.kind == "count":
            ok = (value >= 0) & (value == value.floor())
        else:
            ok = value.is_between(label.min, label.max)
        bad[label] = ok.not_() & value.is_not_null()
    counts = rows.select(expr.sum().alias(label.name) for label, expr in bad.items()).collect().row(0, named=True)
    for label, expr in bad.items():
        if counts[label.name]:
            first = rows.filter(expr).select(FILE, label.source).head(1).collect().row(0)
            spec = LabelSpec(column=label.name, task=label.task, kind=label.kind, min=label.min, max=label.max)
            raise ValueError(
                f"{first[0]}: label column {label.source!r} has {first[1]!r} ({counts[label.name]} such rows), "
                f"expected {spec.domain()}"
            )


def _values(f: FeatureDesc) -> pl.Expr:
    """The raw values of an id / multi-hot feature; multi-hot as a list."""
    column = pl.col(f.source)
    return column.cast(pl.String).str.split(f.separator) if f.separator is not None else column


def _bucket(values: pl.Series, buckets: int) -> pl.Series:
    """Stable hashing (blake2b of the value's text) into rows 1..buckets; null -> 0."""
    uniq = values.drop_nulls().unique()
    index = [int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little") for v in uniq]
    return values.replace_strict(uniq, [i % buckets + 1 for i in index], default=0, return_dtype=pl.Int64)


def _join_encoder(source: pl.Expr, mapping: pl.DataFrame, name: str) -> Encoder:
    """Encode by a left join on `mapping` (value -> index; unmatched -> 0): a join streams, a replace does not."""
    right = mapping.lazy().select(pl.col("value").alias("__value"), pl.col("index").alias(ENCODED + name))

    def encode(lf: pl.LazyFrame) -> pl.LazyFrame:
        lf = lf.with_columns(source.alias("__value")).join(right, on="__value", how="left", maintain_order="left")
        return lf.drop("__value").with_columns(pl.col(ENCODED + name).fill_null(0))

    return encode


def _column_encoder(expr: pl.Expr, name: str) -> Encoder:
    return lambda lf: lf.with_columns(expr.alias(ENCODED + name))


def _build_tables(
    train: pl.LazyFrame, desc: Description, vocab_dir: Path
) -> tuple[list[TableSpec], dict[str, Encoder]]:
    """One embedding table per distinct `table` of the id / multi-hot features, and each feature's encoder."""
    vocab_dir.mkdir()
    by_table: dict[str, list[FeatureDesc]] = {}
    for f in desc.features:
        if f.kind != "dense":
            by_table.setdefault(f.table or f.name, []).append(f)
    schema = train.collect_schema()
    tables, encoders = [], {}
    for name, features in by_table.items():
        opts = desc.table_options(name)
        dim = opts.embedding_dim or desc.embedding_dim
        dtypes = {
            schema[f.source].inner if isinstance(schema[f.source], pl.List) else schema[f.source] for f in features
        }
        dtypes = {pl.String} if any(f.separator is not None for f in features) else dtypes
        dtype = dtypes.pop() if len(dtypes) == 1 else pl.String
        if opts.hash_buckets:
            tables.append(
                TableSpec(name=name, num_embeddings=opts.hash_buckets + 1, embedding_dim=dim, encoding="hash")
            )
            buckets = opts.hash_buckets

            def lookup(values: pl.Expr, buckets: int = buckets) -> pl.Expr:
                return values.map_batches(lambda s: _bucket(s, buckets), return_dtype=pl.Int64)

        else:
            vocab = _vocabulary(train, features, dtype, opts.min_count)
            vocab.write_parquet(vocab_dir / f"{name}.parquet")
            tables.append(TableSpec(name=name, num_embeddings=vocab.height + 1, embedding_dim=dim))

            def lookup(values: pl.Expr, vocab: pl.DataFrame = vocab) -> pl.Expr:
                return values.replace_strict(vocab["value"], vocab["index"], default=0, return_dtype=pl.Int64)

        for f in features:
            values = _values(f)
            if f.kind == "multi_hot":
                empty = pl.lit([], pl.List(pl.Int64))
                encoders[f.name] = _column_encoder(
                    values.list.eval(lookup(pl.element().cast(dtype))).fill_null(empty), f.name
                )
            elif opts.hash_buckets:
                encoders[f.name] = _column_encoder(lookup(values.cast(dtype)), f.name)
            else:
                encoders[f.name] = _join_encoder(values.cast(dtype), vocab, f.name)
    return tables, encoders


def _vocabulary(train: pl.LazyFrame, features: list[FeatureDesc], dtype: pl.DataType, min_count: int) -> pl.DataFrame:
    """value -> index (1.., most frequent first, ties by value), for values seen >= min_count times in train."""
    parts = []
    for f in features:
        values = _values(f)
        values = values.explode() if f.kind == "multi_hot" else values
        parts.append(train.select(values.cast(dtype).alias("value")))
    counts = pl.concat(parts).drop_nulls().group_by("value").agg(pl.len().alias("count"))
    counts = counts.filter(pl.col("count") >= min_count).sort(["count", "value"], descending=[True, False])
    return counts.collect().with_row_index("index", offset=1).with_columns(pl.col("index").cast(pl.Int64))


def _build_text(
    raw: Path, rows: pl.LazyFrame, text: TextDesc, desc: Description, text_dir: Path, encoders: dict[str, Encoder]
) -> TextSpec:
    """Write text/<name>.parquet (id 1.., key, text) and register the key -> id encoding of the feature."""
    text_dir.mkdir(exist_ok=True)
    if text.path is None:
        source = rows
    else:
        path = _files(raw, text.path)
        source = _scan(path, desc)
        missing = [c for c in (text.key, *text.columns) if c not in source.collect_schema()]
        if missing:
            raise ValueError(f"{path[0]}: column {missing[0]!r} of text {text.name!r} is missing")
    body = pl.concat_str([pl.col(c).cast(pl.String) for c in text.columns], separator=TEXT_SEPARATOR, ignore_nulls=True)
    table = (
        source.select(pl.col(text.key).alias("key"), body.str.strip_chars().alias("text"))
        .filter(pl.col("key").is_not_null() & (pl.col("text").str.len_chars() > 0))
        .unique("key", keep="first", maintain_order=True)
        .sort("key")
        .collect()
        .with_row_index("id", offset=1)
        .with_columns(pl.col("id").cast(pl.Int64))
    )
    table.write_parquet(text_dir / f"{text.name}.parquet")
    mapping = table.select(pl.col("key").alias("value"), pl.col("id").alias("index"))
    encoders[text.name] = _join_encoder(pl.col(text.key).cast(mapping["value"].dtype), mapping, text.name)
    return TextSpec(name=text.name, key=text.key, num_texts=table.height + 1)


def _dense_stats(train: pl.LazyFrame, features: list[FeatureDesc]) -> dict[str, FeatureSpec]:
    """Mean and std of each dense feature on the train split, after its transform."""
    if not features:
        return {}
    exprs = []
    for f in features:
        value = pl.col(f.source).cast(pl.Float64)
        value = value.log1p() if f.transform == "log1p" else value
        exprs += [value.mean().alias(f"{f.name}/mean"), value.std().alias(f"{f.name}/std")]
        exprs.append(pl.col(f.source).min().cast(pl.Float64).alias(f"{f.name}/min"))
    stats = train.select(exprs).collect().row(0, named=True)
    specs = {}
    for f in features:
        if f.transform == "log1p" and stats[f"{f.name}/min"] is not None and stats[f"{f.name}/min"] < 0:
            raise ValueError(f"column {f.source!r} (dense {f.name!r}) has {stats[f'{f.name}/min']}; log1p needs >= 0")
        std = stats[f"{f.name}/std"]
        specs[f.name] = FeatureSpec(
            name=f.name,
            kind="dense",
            transform=f.transform,
            mean=stats[f"{f.name}/mean"] or 0.0,
            std=std if std and std > 0 else 1.0,
        )
    return specs


def _sink_split(encoded: pl.LazyFrame, split: str, out: Path, desc: Description) -> SplitSpec:
    log.info("writing %s shards", split)
    target = pl.PartitionBy(out / split, max_rows_per_file=desc.rows_per_shard)
    part = encoded.filter(pl.col(SPLIT) == split).drop(SPLIT)
    part.sink_parquet(target, row_group_size=desc.row_group_size, mkdir=True)
    files = sorted((out / split).glob("*.parquet"))
    num_rows = sum(pl.scan_parquet(f).select(pl.len()).collect().item() for f in files)
    if num_rows == 0:
        raise ValueError(f"split {split!r} of {desc.name!r} has no rows; check the [split] settings of the description")
    return SplitSpec(files=tuple(str(f.relative_to(out)) for f in files), num_rows=num_rows)
