import math
from pathlib import Path

from recsys_mtl.report import CalibrationCurve, EvaluationDetails, metrics_table, write_report


def test_undefined_metrics_show_as_a_dash() -> None:
    table = metrics_table({"ctr/auc": math.nan, "ctr/logloss": 0.25, "oracle/ctr/auc": 0.7}, {"single": {}})
    assert table.splitlines()[2:] == ["| ctr/auc | — | 0.7000 | — | — |", "| ctr/logloss | 0.2500 | — | — | — |"]


def test_report_without_labelled_rows_for_a_task_is_written(tmp_path: Path) -> None:
    details = EvaluationDetails(
        num_rows=3,
        arch="mmoe",
        tasks=["ctr", "cvr"],
        experts=["e0"],
        gate_weights=[[1.0], [1.0]],
        calibration={"ctr": CalibrationCurve([0.2], [0.0]), "cvr": CalibrationCurve([], [])},
    )
    path = write_report(tmp_path, "test", {"ctr/auc": math.nan, "cvr/auc_clicked": math.nan}, details, {})
    text = path.read_text()
    assert "| ctr/auc | — |" in text
    assert (tmp_path / "calibration_test.png").is_file()
