"""Raw tables -> a prepared dataset (see recsys_mtl.data.schema), driven by a Description.

Everything is a polars lazy query over the raw files (scan -> join -> encode -> sink), so data larger than memory
streams through. Vocabularies and dense statistics come from the train split only. The dataset is written to a
temporary folder, checked against its schema, and renamed into place.

With a parent dataset (`prepare --from`: the next period's data), the parent's encoding is extended, never changed:
every known value keeps its index and new ones are appended (the tables grow), text keys keep their rows, the dense
statistics are the parent's (a model trained on it reads the new rows the same way), and the parent's text vectors
are carried over so that `encode-text` encodes only new or changed texts.
"""

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import tomli_w

from recsys_mtl.data.description import Description, FeatureDesc, LabelDesc, TextDesc, read_description
from recsys_mtl.data.encode import (
    DESCRIPTION_FILE,
    Encoder,
    check_dtypes,
    derive_columns,
    feature_encoders,
    features_by_table,
    find_files,
    raw_values,
    scan_raw,
    shard_columns,
    table_dtype,
    text_encoder,
    unique_side_table,
)
from recsys_mtl.data.schema import (
    SPLITS,
    TEXT_EMB,
    FeatureSpec,
    LabelSpec,
    OracleSpec,
    Schema,
    SplitSpec,
    TableSpec,
    TextSpec,
    check_dataset,
    read_table,
)
from recsys_mtl.errors import InputError, MissingInputError, reading

if TYPE_CHECKING:
    from polars._typing import PolarsDataType
from recsys_mtl.files import atomic_dir, atomic_write_text, check_output
from recsys_mtl.structs import list_differences, to_mapping

log = logging.getLogger(__name__)
SPLIT, FILE = "__split", "__file"
TEXT_SEPARATOR = ". "


def prepare(raw: Path, out: Path, desc: Description, overwrite: bool = False, parent: Path | None = None) -> Schema:
    """Prepare the raw source in `raw` as described by `desc`, writing the dataset folder `out`; with `parent`, as
    the next period of that prepared dataset (see the module).

    Returns:
        The schema written to `out/schema.toml`.

    Raises:
        MissingInputError: a raw file named by the description is missing; `parent` is not a prepared dataset.
        OutputExistsError: `out` exists and not `overwrite`.
        InputError: `out` is, contains or lies inside `raw` or `parent`; `desc` is not the parent's description; a raw
            file cannot be read, or its parquet files disagree; a raw column is missing or has the wrong type, or an
            id column's values do not cast to the parent vocabulary's dtype; in any split, a label is outside its
            domain (NaN included) or a dense value is not finite (or negative under log1p); a split is empty.
    """
    raw = Path(raw)
    check_output(out, raw, *([parent] if parent is not None else []))
    parent_schema = None
    if parent is not None:
        parent = Path(parent)
        parent_schema = _check_parent(parent, desc)
    # polars reads lazily: a raw file it cannot parse fails at the first collect or sink, anywhere below
    with atomic_dir(out, overwrite) as tmp, reading(raw):
        rows = _scan_rows(raw, desc)
        _check_columns(rows, desc, raw)
        _check_values(rows, desc, raw)
        train = rows.filter(pl.col(SPLIT) == "train")
        log.info("building vocabularies from the train split" + (f", extending {parent}'s" if parent else ""))
        tables, vocabs = _build_tables(train, desc, tmp / "vocab", parent)
        encoders = feature_encoders(desc, {t.name: t for t in tables}, vocabs, train.collect_schema())
        log.info("writing text tables")
        texts = [_build_text(raw, rows, text, desc, tmp / "text", encoders, parent) for text in desc.texts]
        if parent is None or parent_schema is None:
            dense = _dense_stats(train, [f for f in desc.features if f.kind == "dense"])
        else:  # kept, so that a model trained on the parent reads the new rows the same way
            dense = {f.name: f for f in parent_schema.dense_features}
            _carry_text_vectors(parent, tmp)
        features = tuple(
            dense.get(f.name) or FeatureSpec(name=f.name, kind=f.kind, table=f.table or f.name) for f in desc.features
        )
        encoded = rows
        for encode in encoders.values():
            encoded = encode(encoded)
        encoded = encoded.select(pl.col(SPLIT), *shard_columns(desc))
        splits = {split: _sink_split(encoded, split, tmp, desc) for split in SPLITS}
        schema = Schema(
            name=desc.name,
            source=str(raw.resolve()),
            tables=tuple(tables),
            features=features,
            texts=tuple(texts),
            labels=tuple(_label_spec(label) for label in desc.labels),
            keys=desc.keys,
            splits=splits,
            oracle=_oracle(raw, desc),
            parent=str(Path(parent).resolve()) if parent is not None else "",
        )
        schema.save(tmp)
        atomic_write_text(tmp / DESCRIPTION_FILE, tomli_w.dumps(to_mapping(desc)))  # to encode raw rows for scoring
        check_dataset(tmp, schema)
    log.info("prepared %s: %s", out, ", ".join(f"{s} {splits[s].num_rows:,} rows" for s in SPLITS))
    return schema


def _check_parent(parent: Path, desc: Description) -> Schema:
    """The parent dataset's schema, after checking that `desc` is the description it was prepared with.

    Raises:
        MissingInputError: `parent` has no schema.toml or description.toml.
        InputError: the descriptions differ (every difference listed).
    """
    schema = Schema.load(parent)
    path = Path(parent) / DESCRIPTION_FILE
    if not path.is_file():
        raise MissingInputError(f"{path} is missing: prepare the parent dataset again to prepare its next period")
    differences = list_differences(to_mapping(read_description(path)), to_mapping(desc), ("parent", "given"))
    if differences:
        raise InputError(
            f"--from {parent}: the description differs from the parent's ({'; '.join(differences)}); the next period "
            "is prepared with the parent's description (omit --description)"
        )
    return schema


def _carry_text_vectors(parent: Path, out: Path) -> None:
    """Copy the parent's text vectors (`encode-text` keeps those whose key and text are unchanged)."""
    source = parent / TEXT_EMB
    if source.is_dir():
        shutil.copytree(source, out / TEXT_EMB)


def _oracle(raw: Path, desc: Description) -> OracleSpec | None:
    if desc.oracle is None:
        return None
    files = find_files(raw, desc.oracle.path)
    with reading(files[0]):
        names = pl.read_parquet_schema(files[0])
    missing = [c for c in (desc.oracle.key, *desc.oracle.columns.values()) if c not in names]
    if missing:
        raise InputError(f"{files[0]}: oracle column {missing[0]!r} is missing")
    return OracleSpec(files=tuple(str(f.resolve()) for f in files), key=desc.oracle.key, columns=desc.oracle.columns)


def _scan_rows(raw: Path, desc: Description) -> pl.LazyFrame:
    """The raw rows with side tables joined and a split column (train / valid / test)."""
    split = desc.split
    if split.method == "files":
        sources = [s for s in SPLITS if s in split.files]  # without a valid file: carved out of train, below
        rows = pl.concat(
            [
                scan_raw(find_files(raw, split.files[s]), desc.read, FILE).with_columns(pl.lit(s).alias(SPLIT))
                for s in sources
            ],
            how="vertical_relaxed",
        )
    else:
        files = [f for pattern in desc.rows for f in find_files(raw, pattern)]
        rows = scan_raw(files, desc.read, FILE)
    if desc.rename:
        rows = rows.rename(desc.rename)
    for join in desc.joins:
        path = find_files(raw, join.path)
        side = scan_raw(path, join.read or desc.read)
        names = side.collect_schema().names()
        missing = [c for c in (join.on, *join.columns) if c not in names]
        if missing:
            raise InputError(f"{path[0]}: column {missing[0]!r} named by the join on {join.on!r} is missing")
        dtype = rows.collect_schema().get(join.on)
        if dtype is None:
            raise InputError(f"join on {join.on!r}: the raw rows have no column {join.on!r}")
        side_dtype = side.collect_schema()[join.on]
        if side_dtype != dtype:
            raise InputError(
                f"{path[0]}: join key {join.on!r} is {side_dtype} here but {dtype} in the raw rows; give both one dtype"
            )
        side = unique_side_table(side.select(join.on, *join.columns), join.on, path[0])
        rows = rows.join(side, on=join.on, how="left", maintain_order="left")
    rows = derive_columns(rows, desc, str(raw))
    if split.method == "time":
        if split.column is None:  # SplitDesc refuses this already
            raise ValueError("split.method = 'time' needs split.column")
        time = pl.col(split.column)
        cuts = rows.select(
            time.quantile(1 - split.valid - split.test, "higher").alias("valid"),
            time.quantile(1 - split.test, "higher").alias("test"),
        ).collect()
        label = pl.when(time >= cuts["test"]).then(pl.lit("test")).when(time >= cuts["valid"]).then(pl.lit("valid"))
        rows = rows.with_columns(label.otherwise(pl.lit("train")).alias(SPLIT))
    elif split.method == "random":
        u = _uniform(split.seed)
        label = pl.when(u < split.test).then(pl.lit("test")).when(u < split.test + split.valid).then(pl.lit("valid"))
        rows = rows.with_columns(label.otherwise(pl.lit("train")).alias(SPLIT))
    elif "valid" not in split.files:
        carved = (pl.col(SPLIT) == "train") & (_uniform(split.seed) < split.valid)
        rows = rows.with_columns(pl.when(carved).then(pl.lit("valid")).otherwise(pl.col(SPLIT)).alias(SPLIT))
    return rows


def _uniform(seed: int) -> pl.Expr:
    """A number in [0, 1) per row: a Weyl sequence over the row index (deterministic, independent of the polars
    version)."""
    return ((pl.int_range(pl.len(), dtype=pl.Int64) * 2654435761 + seed * 40503) % 2**32) / 2**32


def _check_columns(rows: pl.LazyFrame, desc: Description, raw: Path) -> None:
    available = rows.collect_schema()
    needed = [(f.source, f"feature {f.name!r}") for f in desc.features]
    needed += [(label.source, f"label {label.name!r}") for label in desc.labels]
    needed += [(t.key, f"text {t.name!r} key") for t in desc.texts]
    needed += [(c, f"text {t.name!r}") for t in desc.texts if t.path is None for c in t.columns]
    needed += [(k, "keys") for k in desc.keys]
    needed += [(desc.split.column, "split.column")] if desc.split.column else []
    for column, role in needed:
        if column not in available:
            raise InputError(
                f"{raw}: column {column!r} ({role}) is not in the raw rows or joined tables of {desc.name!r}; "
                f"available: {sorted(c for c in available if not c.startswith('__'))}"
            )
    check_dtypes(available, desc, str(raw))


def _check_values(rows: pl.LazyFrame, desc: Description, raw: Path) -> None:
    """Refuse, in every split, a label outside its domain (NaN and inf included) and a dense value that is not finite
    as float32 or, under log1p, negative; naming the raw file of the first bad value, the column and the count."""
    checks = {}  # name -> (role, raw column, bad rows, what was expected)
    for label in desc.labels:
        value = pl.col(label.source).cast(pl.Float64)
        if label.kind == "binary":
            ok = value.is_in([0.0, 1.0])
        elif label.kind == "count":
            ok = (value >= 0) & (value == value.floor())
        else:
            ok = value.is_between(label.min, label.max)
        bad = (value.is_finite() & ok).not_() & value.is_not_null()
        checks[label.name] = ("label", label.source, bad, f"{_label_spec(label).domain()}, or null for an absent label")
    for f in (f for f in desc.features if f.kind == "dense"):
        value = pl.col(f.source).cast(pl.Float32)  # as the shards store it
        checks[f.name] = ("dense", f.source, value.is_finite().not_(), "finite float32 numbers, or null")
        if f.transform == "log1p":
            checks[f"{f.name}/log1p"] = ("dense", f.source, value < 0, "numbers >= 0 (transform = 'log1p'), or null")
    counts = rows.select(bad.sum().alias(name) for name, (_, _, bad, _) in checks.items()).collect().row(0, named=True)
    side_files = {column: raw / join.path for join in desc.joins for column in join.columns}
    for name, (role, column, bad, expected) in checks.items():
        if counts[name]:
            file, value = rows.filter(bad).select(FILE, column).head(1).collect().row(0)
            raise InputError(
                f"{side_files.get(column, file)}: {role} column {column!r} has {value!r} ({counts[name]} such rows "
                f"in all splits), expected {expected}"
            )


def _label_spec(label: LabelDesc) -> LabelSpec:
    return LabelSpec(column=label.name, task=label.task, kind=label.kind, min=label.min, max=label.max)


def _build_tables(
    train: pl.LazyFrame, desc: Description, vocab_dir: Path, parent: Path | None = None
) -> tuple[list[TableSpec], dict[str, pl.DataFrame]]:
    """One embedding table per distinct `table` of the id / multi-hot features; the vocabularies, also written to
    `vocab_dir/<table>.parquet` (value, index), extending the parent's when there is one."""
    vocab_dir.mkdir()
    schema = train.collect_schema()
    tables, vocabs = [], {}
    for name, features in features_by_table(desc).items():
        opts = desc.table_options(name)
        dim = opts.embedding_dim or desc.embedding_dim
        if opts.hash_buckets:
            tables.append(TableSpec(name, num_embeddings=opts.hash_buckets + 1, embedding_dim=dim, encoding="hash"))
        else:
            known = read_table(parent / "vocab" / f"{name}.parquet") if parent is not None else None
            dtype = known["value"].dtype if known is not None else table_dtype(features, schema)
            vocab = _vocabulary(train, features, dtype, opts.min_count, known)
            vocab.write_parquet(vocab_dir / f"{name}.parquet")
            vocabs[name] = vocab
            tables.append(TableSpec(name, num_embeddings=vocab.height + 1, embedding_dim=dim))
    return tables, vocabs


def _vocabulary(
    train: pl.LazyFrame,
    features: list[FeatureDesc],
    dtype: "PolarsDataType",
    min_count: int,
    known: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """value -> index (1.., most frequent first, ties by value), for values seen >= min_count times in train; after
    the `known` vocabulary (value, index 1..n), which keeps every row, when given.

    Raises:
        InputError: a feature's values do not cast to `dtype` (the parent vocabulary's).
    """
    parts = []
    for f in features:
        values = raw_values(f)
        values = values.explode() if f.kind == "multi_hot" else values
        parts.append(train.select(values.cast(dtype).alias("value")))
    counts = pl.concat(parts).drop_nulls().group_by("value").agg(pl.len().alias("count"))
    counts = counts.filter(pl.col("count") >= min_count).sort(["count", "value"], descending=[True, False])
    try:
        fresh = counts.collect()
    except pl.exceptions.InvalidOperationError as err:
        names = [f.source for f in features]
        raise InputError(f"columns {names}: the values do not cast to the vocabulary's dtype {dtype} ({err})") from None
    if known is not None:
        fresh = fresh.join(known.select("value"), on="value", how="anti", maintain_order="left")
    start = 1 if known is None else known.height + 1
    fresh = fresh.with_row_index("index", offset=start).with_columns(pl.col("index").cast(pl.Int64))
    return fresh if known is None else pl.concat([known, fresh])  # a known value keeps its row (and first count)


def _build_text(
    raw: Path,
    rows: pl.LazyFrame,
    text: TextDesc,
    desc: Description,
    text_dir: Path,
    encoders: dict[str, Encoder],
    parent: Path | None = None,
) -> TextSpec:
    """Write text/<name>.parquet (id 1.., key, text) and register the key -> id encoding of the feature. With a
    parent, its keys keep their ids (and take their new text, if any), new keys follow."""
    text_dir.mkdir(exist_ok=True)
    if text.path is None:
        source = rows
    else:
        path = find_files(raw, text.path)
        source = scan_raw(path, text.read or desc.read)
        missing = [c for c in (text.key, *text.columns) if c not in source.collect_schema()]
        if missing:
            raise InputError(f"{path[0]}: column {missing[0]!r} of text {text.name!r} is missing")
    body = pl.concat_str([pl.col(c).cast(pl.String) for c in text.columns], separator=TEXT_SEPARATOR, ignore_nulls=True)
    table = (
        source.select(pl.col(text.key).alias("key"), body.str.strip_chars().alias("text"))
        .filter(pl.col("key").is_not_null() & (pl.col("text").str.len_chars() > 0))
        .unique("key", keep="first", maintain_order=True)
        .sort("key")
        .collect()
    )
    start = 1
    if parent is not None:
        known = read_table(parent / "text" / f"{text.name}.parquet")
        table = table.with_columns(pl.col("key").cast(known["key"].dtype))
        updated = known.join(table, on="key", how="left", maintain_order="left")
        kept = updated.select("id", "key", pl.coalesce("text_right", "text").alias("text"))
        table = table.join(known.select("key"), on="key", how="anti", maintain_order="left")
        start = known.height + 1
    table = table.with_row_index("id", offset=start).with_columns(pl.col("id").cast(pl.Int64))
    if parent is not None:
        table = pl.concat([kept, table])
    table.write_parquet(text_dir / f"{text.name}.parquet")
    encoders[text.name] = text_encoder(text.key, table, text.name)
    return TextSpec(name=text.name, key=text.key, num_texts=table.height + 1)


def _dense_stats(train: pl.LazyFrame, features: list[FeatureDesc]) -> dict[str, FeatureSpec]:
    """Mean and std of each dense feature on the train split, after its transform (the values are checked)."""
    if not features:
        return {}
    exprs = []
    for f in features:
        value = pl.col(f.source).cast(pl.Float64)
        value = value.log1p() if f.transform == "log1p" else value
        exprs += [value.mean().alias(f"{f.name}/mean"), value.std().alias(f"{f.name}/std")]
    stats = train.select(exprs).collect().row(0, named=True)
    specs = {}
    for f in features:
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
        raise InputError(f"split {split!r} of {desc.name!r} has no rows; check the [split] settings of the description")
    return SplitSpec(files=tuple(str(f.relative_to(out)) for f in files), num_rows=num_rows)
