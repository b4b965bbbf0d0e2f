import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from polars.testing import assert_frame_equal

from recsys_mtl import score as score_module
from recsys_mtl.checkpoint import load_checkpoint, trained_checkpoint
from recsys_mtl.cli import main
from recsys_mtl.config import load_config
from recsys_mtl.data.loader import Dataset
from recsys_mtl.errors import InputError, OutputExistsError
from recsys_mtl.evaluate import Predictor, predict_split
from recsys_mtl.files import locked
from recsys_mtl.metrics import auc
from recsys_mtl.score import ScoreShard, plan_shards, score
from recsys_mtl.step import build_trainer
from recsys_mtl.train import train
from tests.conftest import tiny_config

CPU = torch.device("cpu")
PRED_COLUMNS = ["pred_ctr", "pred_cvr", "pred_rating", "pred_reads", "pred_cvr_joint"]


@pytest.fixture(scope="module")
def run(text_dataset: Path, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for 60 steps on the tiny world."""
    run = tmp_path_factory.mktemp("score") / "run"
    train(tiny_config(text_dataset, tiny_bert, train={"max_steps": 60, "batch_size": 256}), run, CPU, progress=False)
    return run


def _scores(out: Path) -> pl.DataFrame:
    return pl.concat(pl.read_parquet(path) for path in sorted(out.glob("part-*.parquet")))


def test_scores_equal_the_evaluation_predictions_row_for_row(run: Path, text_dataset: Path, tmp_path: Path) -> None:
    summary = score(run, text_dataset, tmp_path / "out", CPU, rows_per_shard=2_000, batch_size=700, progress=False)
    scores = _scores(tmp_path / "out")
    test_rows = pl.read_parquet(text_dataset / "test")
    assert scores.columns == ["impression_id", "user_id", "item_id", "ad_id", *PRED_COLUMNS]
    assert scores["impression_id"].to_list() == test_rows["key_impression_id"].to_list()  # every row, in order
    assert summary.rows == test_rows.height
    assert len(summary.shards_written) == len(list((tmp_path / "out").glob("part-*.parquet"))) > 2
    # the model as training holds it (sharded, fused kernels), loaded from the checkpoint the scorer used
    trainer = build_trainer(load_config(run / "config.toml"), Dataset(text_dataset), CPU)
    load_checkpoint(trained_checkpoint(run), {"model": trainer.model.state_dict()})
    predictor = Predictor(trainer.model, trainer.specs, trainer.cfg, CPU)
    expected = predict_split(predictor, Dataset(text_dataset), "test")
    for task in ("ctr", "cvr", "cvr_joint", "rating", "reads"):
        torch.testing.assert_close(
            scores[f"pred_{task}"].to_torch(), expected.values[task].float(), rtol=1e-5, atol=1e-6
        )
    assert summary.unknown_ids["item_id"] == int((test_rows["item_id"] == 0).sum()) > 0  # items launched late


def _raw_test_rows(world: Path, dataset: Path) -> pl.DataFrame:
    """The raw impressions of the test split, in the prepared split's order."""
    ids = pl.read_parquet(dataset / "test", columns=["key_impression_id"]).with_row_index("order")
    raw = pl.read_parquet(world / "impressions")
    return ids.join(raw, left_on="key_impression_id", right_on="impression_id").sort("order").drop("order")


def test_raw_rows_score_as_their_prepared_split_and_unseen_ids_fall_back(
    run: Path, tiny_world: Path, text_dataset: Path, tmp_path: Path
) -> None:
    raw = _raw_test_rows(tiny_world, text_dataset).rename({"key_impression_id": "impression_id"})
    unseen = raw.head(3).with_columns(
        pl.Series("impression_id", [-1, -2, -3]),
        pl.Series("user_id", [10**9] * 3),
        pl.Series("item_id", [10**9] * 3),
    )
    rows = pl.concat([raw, unseen])
    rows.write_parquet(tmp_path / "raw.parquet", row_group_size=1_500)
    summary = score(run, tmp_path / "raw.parquet", tmp_path / "raw_out", CPU, side_dir=tiny_world, progress=False)
    score(run, text_dataset, tmp_path / "prepared_out", CPU, progress=False)
    from_raw, from_prepared = _scores(tmp_path / "raw_out"), _scores(tmp_path / "prepared_out")
    assert from_raw["impression_id"].to_list() == rows["impression_id"].to_list()
    assert_frame_equal(from_raw.head(raw.height), from_prepared, abs_tol=1e-6)  # batches cut elsewhere: fp rounding
    assert from_raw.tail(3)["pred_ctr"].is_between(0, 1).all()  # unknown user, unknown item without a title
    assert summary.missing_text["item_title"] >= 3
    with pytest.raises(ValueError, match=r"rows have a 'item_id' without a 'item_title' text vector"):
        score(run, tmp_path / "raw.parquet", tmp_path / "strict", CPU, side_dir=tiny_world, missing_text="error")


def test_a_rerun_after_a_crash_completes_without_duplicates(
    run: Path, text_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    write = score_module._write_shard
    calls = []

    def crash_on_the_third(path: Path, frame: pl.DataFrame, shard: ScoreShard, digest: str) -> None:
        calls.append(shard.index)
        if len(calls) == 3:
            frame.head(10).write_parquet(path.with_name(f".{path.name}.tmp-1"))  # half written, then killed
            raise KeyboardInterrupt
        write(path, frame, shard, digest)

    monkeypatch.setattr(score_module, "_write_shard", crash_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        score(run, text_dataset, out, CPU, rows_per_shard=1_000, progress=False)
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    monkeypatch.setattr(score_module, "_write_shard", write)
    summary = score(run, text_dataset, out, CPU, rows_per_shard=1_000, progress=False)
    assert summary.shards_skipped == 2
    assert not list(out.glob(".*tmp*"))
    score(run, text_dataset, tmp_path / "clean", CPU, rows_per_shard=1_000, progress=False)
    assert _scores(out).equals(_scores(tmp_path / "clean"))
    with pytest.raises(FileExistsError, match="--overwrite"):
        score(run, text_dataset, out, CPU, split="valid", progress=False)
    score(run, text_dataset, out, CPU, split="valid", overwrite=True, progress=False)
    assert _scores(out).height == Dataset(text_dataset, check=False).num_rows("valid")


def test_int8_tables_score_close_to_fp32(run: Path, text_dataset: Path, tmp_path: Path) -> None:
    score(run, text_dataset, tmp_path / "fp32", CPU, progress=False)
    score(run, text_dataset, tmp_path / "int8", CPU, int8=True, progress=False)
    fp32, int8 = _scores(tmp_path / "fp32"), _scores(tmp_path / "int8")
    drift = (fp32["pred_ctr"] - int8["pred_ctr"]).abs()
    assert 0 < drift.max() < 0.01
    clicks = torch.from_numpy(pl.read_parquet(text_dataset / "test")["click"].to_numpy())
    assert auc(clicks, int8["pred_ctr"].to_torch()) == pytest.approx(
        auc(clicks, fp32["pred_ctr"].to_torch()), abs=0.005
    )


def test_shards_follow_row_groups(tmp_path: Path) -> None:
    pl.DataFrame({"a": range(10)}).write_parquet(tmp_path / "x.parquet", row_group_size=3)  # groups of 3, 3, 3, 1
    shards = plan_shards([tmp_path / "x.parquet"], rows_per_shard=6)
    assert [(s.row_groups, s.num_rows) for s in shards] == [((0, 1), 6), ((2, 3), 4)]
    assert pq.ParquetFile(tmp_path / "x.parquet").metadata.num_row_groups == 4


def test_score_from_the_command_line(
    run: Path, tiny_world: Path, text_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["score", str(run), str(text_dataset), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "scored 4,285 rows" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows"] == 4_285
    assert main(["score", str(run), str(tmp_path / "nothing"), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "no files to score" in capsys.readouterr().err
    raw = tmp_path / "rows.parquet"  # raw rows without the side columns: joined from --side-dir
    pl.read_parquet(tiny_world / "impressions").head(50).write_parquet(raw)
    assert main(["score", str(run), str(raw), "--out", str(tmp_path / "o3"), "--side-dir", str(tiny_world)]) == 0
    assert "scored 50 rows" in capsys.readouterr().out
    assert main(["score", str(run), str(raw), "--out", str(tmp_path / "o4"), "--side-dir", str(tmp_path)]) == 2
    assert f"is not under {tmp_path} (pass the raw folder that has it)" in capsys.readouterr().err


def test_an_out_that_is_holds_or_lies_inside_the_input_is_refused(
    run: Path, tiny_world: Path, text_dataset: Path, tmp_path: Path
) -> None:
    schema_before = (text_dataset / "schema.toml").read_bytes()
    for out in (text_dataset, text_dataset / "scores", text_dataset.parent):
        with pytest.raises(InputError, match="is, contains or lies inside the input"):
            score(run, text_dataset, out, CPU, progress=False)
    raw = tmp_path / "raw" / "rows.parquet"
    raw.parent.mkdir()
    pl.read_parquet(tiny_world / "impressions").head(50).write_parquet(raw)
    for inp, out in ((raw, raw.parent), (raw.parent, raw.parent / "scores"), (raw.parent / "*.parquet", raw.parent)):
        with pytest.raises(InputError, match="is, contains or lies inside the input"):
            score(run, inp, out, CPU, side_dir=tiny_world, progress=False)
    assert (text_dataset / "schema.toml").read_bytes() == schema_before
    assert not (text_dataset / "scores").exists()
    assert [p.name for p in raw.parent.iterdir()] == ["rows.parquet"]
    assert pl.read_parquet(raw).height == 50


def test_files_the_scorer_did_not_write_are_never_taken_for_scores(
    run: Path, text_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"holds files that recsys-mtl score did not write \(notes.txt\)"):
        score(run, text_dataset, out, CPU, progress=False)
    (out / "notes.txt").unlink()
    test_rows = pl.read_parquet(text_dataset / "test")
    test_rows.write_parquet(out / "part-00000.parquet")  # input rows where a shard would be, without a manifest
    with pytest.raises(OutputExistsError, match=r"did not write \(part-00000.parquet\)"):
        score(run, text_dataset, out, CPU, progress=False)
    (out / "part-00000.parquet").unlink()
    score(run, text_dataset, out, CPU, rows_per_shard=2_000, progress=False)
    clean = _scores(out)
    test_rows.head(pq.ParquetFile(out / "part-00001.parquet").metadata.num_rows).write_parquet(
        out / "part-00001.parquet"
    )  # same row count, not the scorer's: rescored, not skipped
    summary = score(run, text_dataset, out, CPU, rows_per_shard=2_000, progress=False)
    assert summary.shards_written == ["part-00001.parquet"]
    assert _scores(out).equals(clean)


def test_two_scorers_never_write_one_out(run: Path, text_dataset: Path, tmp_path: Path) -> None:
    with locked(tmp_path / "out"), pytest.raises(OutputExistsError, match=r"in use by another process \(pid \d+\)"):
        score(run, text_dataset, tmp_path / "out", CPU, progress=False)
    assert score(run, text_dataset, tmp_path / "out", CPU, progress=False).rows == 4_285  # the lock is released


def test_non_finite_raw_values_are_scored_as_missing_and_counted(
    run: Path, tiny_world: Path, text_dataset: Path, tmp_path: Path
) -> None:
    raw = _raw_test_rows(tiny_world, text_dataset).rename({"key_impression_id": "impression_id"}).head(400)
    bid = pl.Series("bid", [float("inf"), float("nan"), -float("inf")] + [None] * 397, dtype=pl.Float64)
    raw.with_columns(bid).write_parquet(tmp_path / "bad.parquet")
    raw.with_columns(pl.lit(None, pl.Float64).alias("bid")).write_parquet(tmp_path / "missing.parquet")
    summary = score(run, tmp_path / "bad.parquet", tmp_path / "bad", CPU, side_dir=tiny_world, progress=False)
    score(run, tmp_path / "missing.parquet", tmp_path / "missing", CPU, side_dir=tiny_world, progress=False)
    assert summary.non_finite == {"price": 0, "length": 0, "bid": 3}
    assert_frame_equal(_scores(tmp_path / "bad"), _scores(tmp_path / "missing"))
