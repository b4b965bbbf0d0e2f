import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from recsys_mtl.cli import main
from recsys_mtl.data.loader import Dataset


def test_synth_then_prepare_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, out = tmp_path / "raw", tmp_path / "ds"
    args = ["--impressions", "6000", "--users", "100", "--items", "80", "--ads", "8", "--days", "5", "--quiet"]
    assert main(["synth", "--out", str(raw), *args]) == 0
    assert main(["prepare", str(raw), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "6,000 impressions" in printed
    assert "tasks ['ctr', 'cvr', 'rating', 'reads']" in printed
    assert sum(s.num_rows for s in Dataset(out).schema.splits.values()) == 6000
    assert pl.read_parquet(raw / "oracle").height == 6000


def test_user_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path / "raw"), "--days", "2"]) == 2
    assert (
        "recsys-mtl synth: error: --days must be >= 3 (train, valid and test take whole days), got 2"
        in capsys.readouterr().err
    )
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "ds")]) == 2
    assert "no raw file matches 'impressions/*.parquet'" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path), "--out", str(tmp_path / "ds"), "--description", "nope"]) == 2
    assert "nope.toml: no such file" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(("command", "option"), [("synth", "--impressions"), ("prepare", "--description")])
def test_every_subcommand_has_help(command: str, option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert option in capsys.readouterr().out


def test_bad_input_is_one_line_but_a_bug_keeps_its_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "run.toml"
    config.write_text('dataset = "x"\ntasks = [{ name = "ctr" }]\n[optim]\nlr = inf\n')
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (
        f"recsys-mtl train: error: optim.lr in {config}: expected a finite number, got inf\n"
    )
    config.write_bytes(b"\xff\xfe garbage")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert f"{config}: invalid TOML" in capsys.readouterr().err

    def bug(args: object) -> None:
        raise KeyError("valid")  # an internal error: must not pass for bad input

    monkeypatch.setattr("data_prep.commands._prepare", bug)
    with pytest.raises(KeyError, match="valid"):
        main(["prepare", str(tmp_path), "--out", str(tmp_path / "ds")])


def test_the_console_script_runs_full_collections_rarely_and_leaves_its_objects_out_of_the_exit_ones(
    tmp_path: Path,
) -> None:
    code = (
        "import gc, sys; from recsys_mtl.cli import console; "
        f"sys.argv = ['recsys-mtl', 'synth', '--out', {str(tmp_path / 'raw')!r}, '--days', '2']; "
        "rc = console(); print(rc, gc.get_threshold()[2], gc.get_freeze_count())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rc, threshold, frozen = map(int, done.stdout.split())
    assert (rc, threshold) == (2, 1000)  # the bad --days still exits 2
    assert frozen > 10_000  # the imported modules' objects
