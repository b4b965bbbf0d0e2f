"""Real files from a description alone: headerless, any separator, latin-1, gzip, null markers, quoting off, blanks;
derived labels and features; bulk declarations; a files split without a validation file (README: Describing a
dataset). Each test writes small files shaped like a public dataset of that kind."""

import gzip
import math
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
import torch

from data_prep.description import load_description
from data_prep.prepare import prepare
from recsys_mtl.cli import main
from recsys_mtl.data.description import read_description
from recsys_mtl.errors import InputError
from recsys_mtl.score import score
from recsys_mtl.train import train
from tests.conftest import tiny_config

GENRES = ["action", "comedy", "drama", "horror", "romance"]
ITEM_COLUMNS = ", ".join(f'"{c}"' for c in ["item_id", "title", *GENRES])
ITEM_READ = f'{{ header = false, separator = "|", encoding = "latin-1", columns = [{ITEM_COLUMNS}] }}'  # join and text
RATINGS_DESCRIPTION = f"""
name = "ratings"
rows = ["u.data"]
keys = ["user_id", "item_id"]
read = {{ header = false, separator = "\\t", columns = ["user_id", "item_id", "rating", "timestamp"] }}

[[joins]]
path = "u.user"
on = "user_id"
columns = ["age", "gender", "occupation", "zip"]
read = {{ header = false, separator = "|", columns = ["user_id", "age", "gender", "occupation", "zip"] }}

[[joins]]
path = "u.item"
on = "item_id"
columns = {GENRES}
read = {ITEM_READ}

[[derive]]
name = "liked"
op = "threshold"
column = "rating"
at = 4

[[derive]]
name = "age_band"
op = "bucket"
column = "age"
edges = [18, 25, 35, 45, 55]

[[derive]]
name = "zip3"
op = "prefix"
column = "zip"
length = 3

[[derive]]
name = "genres"
op = "flags"
columns = {GENRES}

[[derive]]
name = "hour"
op = "hour"
column = "timestamp"

[[derive]]
name = "weekday"
op = "weekday"
column = "timestamp"

[split]
method = "time"
column = "timestamp"

[[features]]
names = ["user_id", "item_id", "gender", "occupation", "age_band", "zip3", "hour", "weekday"]
kind = "id"

[[features]]
name = "genres"
kind = "multi_hot"

[[texts]]
name = "title"
key = "item_id"
path = "u.item"
columns = ["title"]
read = {ITEM_READ}

[[labels]]
name = "liked"
task = "ctr"
kind = "binary"

[[labels]]
name = "rating"
task = "rating"
kind = "regression"
min = 1
max = 5
"""


def _ratings_raw(folder: Path, n: int = 2_000) -> Path:
    """A ratings log like MovieLens 100k: tab-separated headerless ratings, |-separated users, latin-1 items with
    genre flags. Users who like genre (user % 5) rate its items high."""
    folder.mkdir(parents=True)
    users, items = 60, 40
    genre = [i % len(GENRES) for i in range(items)]
    rows = []
    for r in range(n):
        user, item = (r * 7919) % users + 1, (r * 104729 + r // 3) % items + 1
        rating = 5 if genre[item - 1] == user % len(GENRES) else 1 + (r * 31) % 4
        rows.append(f"{user}\t{item}\t{rating}\t{880_000_000 + r * 3_600}")
    (folder / "u.data").write_text("\n".join(rows) + "\n")
    (folder / "u.user").write_text(
        "".join(f"{u}|{15 + u}|{'MF'[u % 2]}|job{u % 4}|{10_000 + u * 997}\n" for u in range(1, users + 1))
    )
    flags = ["|".join("1" if genre[i] == g else "0" for g in range(len(GENRES))) for i in range(items)]
    titles = "".join(f"{i + 1}|Café film {i + 1}|{flags[i]}\n" for i in range(items))
    (folder / "u.item").write_bytes(titles.encode("latin-1"))
    (folder / "ratings.toml").write_text(RATINGS_DESCRIPTION)
    return folder


def test_a_ratings_log_prepares_from_its_description_alone(tmp_path: Path) -> None:
    raw = _ratings_raw(tmp_path / "raw")
    schema = prepare(raw, tmp_path / "ds", load_description(raw / "ratings.toml"))
    assert sum(s.num_rows for s in schema.splits.values()) == 2_000
    rows = pl.concat(pl.read_parquet(tmp_path / "ds" / split) for split in ("train", "valid", "test"))
    assert (rows["liked"] == (rows["rating"] >= 4).cast(pl.Float32)).all()

    def decoded(table: str, column: str) -> pl.Series:
        vocab = pl.read_parquet(tmp_path / "ds" / "vocab" / f"{table}.parquet")
        return rows[column].replace_strict(vocab["index"], vocab["value"], default=None)

    users = rows["key_user_id"]
    assert decoded("age_band", "age_band").to_list() == [sum(15 + u >= e for e in (18, 25, 35, 45, 55)) for u in users]
    assert decoded("zip3", "zip3").to_list() == [str(10_000 + u * 997)[:3] for u in users]
    assert decoded("gender", "gender").to_list() == ["MF"[u % 2] for u in users]
    genre_vocab = pl.read_parquet(tmp_path / "ds" / "vocab" / "genres.parquet")
    names = dict(zip(genre_vocab["index"], genre_vocab["value"], strict=True))
    item_genres = [[names[i] for i in row] for row in rows["genres"].to_list()]
    assert item_genres == [[GENRES[(i - 1) % len(GENRES)]] for i in rows["key_item_id"]]
    train_rows = pl.read_csv(raw / "u.data", separator="\t", has_header=False).head(schema.splits["train"].num_rows)
    first = datetime.fromtimestamp(train_rows[0, 3], UTC)
    assert decoded("hour", "hour")[0] == first.hour
    assert decoded("weekday", "weekday")[0] == first.isoweekday()
    titles = pl.read_parquet(tmp_path / "ds" / "text" / "title.parquet")
    assert titles["text"][0] == "Café film 1"  # latin-1 decoded


def test_a_raw_csv_of_the_description_scores_as_its_prepared_split(tmp_path: Path, tiny_bert: Path) -> None:
    raw = _ratings_raw(tmp_path / "raw")
    prepare(raw, tmp_path / "ds", load_description(raw / "ratings.toml"))
    cfg = tiny_config(
        tmp_path / "ds",
        tiny_bert,
        tasks=[{"name": "ctr"}, {"name": "rating"}],
        text={"model": str(tiny_bert)},
        train={"batch_size": 128},
    )
    from recsys_mtl.text import encode_dataset

    encode_dataset(tmp_path / "ds", cfg.text, torch.device("cpu"), progress=False)
    train(cfg, tmp_path / "run", torch.device("cpu"), progress=False)
    test = pl.read_parquet(tmp_path / "ds" / "test")
    lines = (raw / "u.data").read_text().splitlines()
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "test.tsv").write_text("\n".join(lines[-test.height :]) + "\n")  # the last rows by time
    cpu = torch.device("cpu")
    summary = score(tmp_path / "run", tmp_path / "rows" / "test.tsv", tmp_path / "raw_out", cpu, rows_per_shard=150)
    assert summary.rows == test.height
    assert len(summary.shards_written) == math.ceil(test.height / 150)
    score(tmp_path / "run", tmp_path / "ds", tmp_path / "prepared_out", cpu)
    from_raw, from_prepared = (
        pl.concat(pl.read_parquet(p) for p in sorted(out.glob("part-*.parquet")))
        for out in (tmp_path / "raw_out", tmp_path / "prepared_out")
    )
    assert from_raw["user_id"].to_list() == test["key_user_id"].to_list()
    for column in ("pred_ctr", "pred_rating"):
        torch.testing.assert_close(from_raw[column].to_torch(), from_prepared[column].to_torch())


CENSUS_COLUMNS = ["age", "workclass", "education", "marital", "capital_gain", "weeks", "income"]
CENSUS_DESCRIPTION = f"""
name = "census"
read = {{ header = false, columns = {CENSUS_COLUMNS}, strip = true, null_values = ["?"] }}

[split]
method = "files"
files = {{ train = "census.data.gz", test = "census.test" }}
valid = 0.25
seed = 3

[[derive]]
name = "high_income"
op = "map"
column = "income"
values = {{ "50000+." = 1, "- 50000." = 0 }}

[[features]]
names = ["workclass", "education", "marital"]
kind = "id"

[[features]]
names = ["age", "capital_gain", "weeks"]
kind = "dense"
transform = "log1p"

[[labels]]
name = "high_income"
task = "income"
kind = "binary"
"""


def _census_raw(folder: Path) -> Path:
    """Census-income-like: comma-and-blank separated, no header, '?' for unknown, a train file gzipped."""
    folder.mkdir(parents=True)

    def line(i: int) -> str:
        work = "?" if i % 7 == 0 else ["Private", "Self-emp", "State-gov"][i % 3]
        income = "50000+." if i % 4 == 0 else "- 50000."
        education = ["HS-grad", "Bachelors"][i % 2]
        return f"{20 + i % 50}, {work}, {education}, Never married, {i * 13 % 900}, {i % 53}, {income}"

    with gzip.open(folder / "census.data.gz", "wt") as f:
        f.write("\n".join(line(i) for i in range(400)) + "\n")
    (folder / "census.test").write_text("\n".join(line(i) for i in range(400, 500)) + "\n")
    (folder / "census.toml").write_text(CENSUS_DESCRIPTION)
    return folder


def test_a_census_survey_prepares_with_a_validation_split_carved_from_train(tmp_path: Path) -> None:
    raw = _census_raw(tmp_path / "raw")
    schema = prepare(raw, tmp_path / "ds", load_description(raw / "census.toml"))
    sizes = {name: split.num_rows for name, split in schema.splits.items()}
    assert sizes["train"] + sizes["valid"] == 400
    assert sizes["test"] == 100
    assert 70 <= sizes["valid"] <= 130  # a quarter of the train file, seeded
    test = pl.read_parquet(tmp_path / "ds" / "test")
    assert test["high_income"].to_list() == [float(i % 4 == 0) for i in range(400, 500)]
    vocab = pl.read_parquet(tmp_path / "ds" / "vocab" / "workclass.parquet")
    assert sorted(vocab["value"]) == ["Private", "Self-emp", "State-gov"]  # stripped; "?" is null: the unknown row
    assert [w == 0 for w in test["workclass"]] == [i % 7 == 0 for i in range(400, 500)]
    assert [f.name for f in schema.dense_features] == ["age", "capital_gain", "weeks"]
    assert all(f.transform == "log1p" for f in schema.dense_features)
    # the same rows read again as the description says reproduce the valid split exactly
    again = prepare(raw, tmp_path / "ds2", load_description(raw / "census.toml"))
    assert again.splits == schema.splits


def test_a_wide_click_log_prepares_from_bulk_declarations(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    ids, dense = [f"C{i}" for i in range(1, 61)], [f"I{i}" for i in range(1, 18)]
    header = "\t".join(["click", "buy", "dwell", *ids, *dense])
    lines = [header]
    for r in range(300):
        cats = [f'v"{(r * (i + 3)) % 5}' for i in range(60)]  # a quote inside a value: quoting is off
        nums = [str((r * (i + 1)) % 11) for i in range(17)]
        lines.append("\t".join([str(r % 2), ["no", "yes"][r % 6 == 0], str(r % 9), *cats, *nums]))
    with gzip.open(raw / "log.tsv.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    (raw / "log.toml").write_text(f"""
name = "clicks"
rows = ["log.tsv.gz"]
read = {{ separator = "\\t", quote = "" }}
[split]
method = "random"
[[derive]]
name = "bought"
op = "sql"
sql = "CASE WHEN buy = 'yes' THEN 1.0 ELSE 0.0 END"
[[derive]]
name = "log_dwell"
op = "log1p"
column = "dwell"
[[features]]
names = {ids}
kind = "id"
table = "categories"
[[features]]
names = {dense}
kind = "dense"
transform = "log1p"
[[labels]]
name = "click"
task = "ctr"
kind = "binary"
[[labels]]
name = "bought"
task = "cvr"
kind = "binary"
[[labels]]
name = "log_dwell"
task = "dwell"
kind = "regression"
min = 0
max = 3
""")
    desc = load_description(raw / "log.toml")
    assert len(desc.features) == 77
    schema = prepare(raw, tmp_path / "ds", desc)
    assert sum(s.num_rows for s in schema.splits.values()) == 300
    assert [t.name for t in schema.tables] == ["categories"]
    vocab = pl.read_parquet(tmp_path / "ds" / "vocab" / "categories.parquet")
    assert sorted(vocab["value"]) == [f'v"{k}' for k in range(5)]
    rows = pl.concat(pl.read_parquet(tmp_path / "ds" / s) for s in ("train", "valid", "test"))
    assert rows["bought"].sum() == 50
    assert rows["log_dwell"].max() == pytest.approx(math.log1p(8))


def _refused(tmp_path: Path, description: str, message: str) -> None:
    raw = _ratings_raw(tmp_path / "raw")
    (raw / "ratings.toml").write_text(description)
    with pytest.raises(InputError, match=message):
        prepare(raw, tmp_path / "ds", load_description(raw / "ratings.toml"))
    assert not (tmp_path / "ds").exists()


def test_a_file_read_with_the_wrong_options_is_refused_naming_them(tmp_path: Path) -> None:
    wrong = RATINGS_DESCRIPTION.replace('separator = "\\t", columns', "columns")
    _refused(tmp_path, wrong, r"u\.data: 1 columns, but read\.columns names 4 .* separator ','.*set the description")
    (tmp_path / "raw").rename(tmp_path / "raw1")
    utf8 = RATINGS_DESCRIPTION.replace('encoding = "latin-1", ', "")
    _refused(tmp_path, utf8, r"u\.item: cannot read it .*utf-8.*give the description's read\.encoding")


def test_a_derivation_without_its_column_or_with_bad_sql_is_refused_naming_it(tmp_path: Path) -> None:
    missing = RATINGS_DESCRIPTION.replace('column = "zip"', 'column = "postcode"')
    _refused(tmp_path, missing, r"column 'postcode' \(to derive 'zip3'\) is missing")
    (tmp_path / "raw").rename(tmp_path / "raw1")
    sql = RATINGS_DESCRIPTION.replace('op = "threshold"\ncolumn = "rating"\nat = 4', 'op = "sql"\nsql = "rating >>> 4"')
    _refused(tmp_path, sql, r"cannot derive 'liked' \(op = 'sql'\)")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('op = "log1p"\ncolumn = "a"\nat = 2', "at is not an option of op = 'log1p'"),
        ('op = "bucket"\ncolumn = "a"', "op = 'bucket' needs column, edges; edges is unset"),
        ('op = "bucket"\ncolumn = "a"\nedges = [3, 1]', "edges must ascend strictly"),
        ('op = "exec"\nsql = "x"', "expected one of"),
    ],
)
def test_a_bad_derivation_is_refused_when_the_description_loads(tmp_path: Path, entry: str, message: str) -> None:
    path = tmp_path / "d.toml"
    path.write_text(RATINGS_DESCRIPTION + f'\n[[derive]]\nname = "x"\n{entry}\n')
    with pytest.raises(InputError, match=message):
        read_description(path)


def test_bulk_features_refuse_a_name_beside_their_names(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text(RATINGS_DESCRIPTION.replace('names = ["user_id"', 'name = "u"\nnames = ["user_id"'))
    with pytest.raises(InputError, match=r"features\[0\] in .*: give names \(each its own column\) or name"):
        read_description(path)


def test_prepare_without_a_description_says_which_it_used(tiny_world: Path, tmp_path: Path, capsys) -> None:
    assert main(["prepare", str(tiny_world), "--out", str(tmp_path / "ds")]) == 0
    assert "description 'synthetic' (the default; --description names another)" in capsys.readouterr().out


def test_the_readme_example_description_loads(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = readme.split("A description is a TOML file", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "example.toml").write_text(example)
    desc = read_description(tmp_path / "example.toml")
    assert [f.name for f in desc.features] == ["item", "category", "brand", "city", "price", "views"]
    assert desc.read.null_values == ("?", "NA")
    assert desc.joins[0].read is not None
    assert desc.joins[0].read.separator == "|"
