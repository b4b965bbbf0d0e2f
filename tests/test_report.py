import json
import math
import os
from pathlib import Path

from recsys_mtl.report import (
    CalibrationCurve,
    EvaluationDetails,
    SingleTaskComparison,
    _learning_curves,
    metrics_table,
    mixture_section,
    single_task_comparisons,
    write_report,
)

# a PLE-like mixture of two tasks: shared0 for both, task0.0 for ctr only, task1.0 for rating only
HEALTH = {
    "mixture/ctr/gate_entropy": 0.056,
    "mixture/ctr/load/shared0": 0.99,
    "mixture/ctr/load/task0.0": 0.01,
    "mixture/rating/gate_entropy": 0.6109,
    "mixture/rating/load/shared0": 0.7,
    "mixture/rating/load/task1.0": 0.3,
    "mixture/dead_experts": 1 / 3,
}


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


def test_mixture_metrics_stay_out_of_the_metrics_table() -> None:
    table = metrics_table({"ctr/auc": 0.7, **HEALTH}, {})
    assert table.splitlines()[2:] == ["| ctr/auc | 0.7000 |"]


def test_mixture_health_shows_entropy_loads_per_task_and_expert_and_dead_experts() -> None:
    lines = mixture_section({"ctr/auc": 0.7, "rating/rmse": 0.8, **HEALTH}, ["ctr", "rating"], {})
    assert lines[0] == "## Mixture health"
    table = lines[lines.index("| task | gate entropy | max | shared0 | task0.0 | task1.0 |") :]
    assert table[1:5] == [
        "|---|---|---|---|---|---|",
        "| ctr | 0.056 | 0.693 | 0.990 | 0.010 |  |",
        "| rating | 0.611 | 0.693 | 0.700 |  | 0.300 |",
        "",
    ]
    assert table[5] == "Dead experts: 1 of 3 (33%) (task0.0)."
    assert not any("single-task" in line for line in lines)  # no baselines


def test_mtl_against_single_task_runs_says_better_or_worse_by_the_metric_direction() -> None:
    metrics = {"ctr/auc": 0.73, "ctr/logloss": 0.14, "rating/rmse": 0.83, "reads/poisson_deviance": 0.75}
    baselines = {
        "single_ctr": {"ctr/auc": 0.74, "ctr/logloss": 0.13},
        "single_rating": {"rating/rmse": 0.80, "rating/mae": 0.65},
        "single_reads": {"reads/poisson_deviance": 0.77},
        "other_mtl": {"ctr/auc": 0.75, "rating/rmse": 0.7},  # two tasks: no single-task baseline of either
    }
    comparisons = single_task_comparisons(metrics, ["ctr", "rating", "reads"], baselines)
    assert [(c.task, c.baseline, c.verdict) for c in comparisons] == [
        ("ctr", "single_ctr", "worse"),  # AUC: higher is better
        ("rating", "single_rating", "worse"),  # rmse: lower is better
        ("reads", "single_reads", "better"),  # deviance: lower is better
    ]
    lines = mixture_section(metrics, ["ctr", "rating", "reads"], baselines)  # no mixture metrics (shared_bottom)
    assert lines[0] == "## Mixture health"
    assert "Dead experts" not in "\n".join(lines)
    assert lines[-5:] == [
        "|---|---|---|---|---|---|",
        "| ctr | ctr/auc | 0.7300 | 0.7400 (single_ctr) | -0.0100 | worse |",
        "| rating | rating/rmse | 0.8300 | 0.8000 (single_rating) | +0.0300 | worse |",
        "| reads | reads/poisson_deviance | 0.7500 | 0.7700 (single_reads) | -0.0200 | better |",
        "",
    ]


def test_equal_or_undefined_headline_metrics_are_neither_better_nor_worse() -> None:
    assert SingleTaskComparison("ctr", "ctr/auc", "single_ctr", 0.7, 0.7).verdict == "same"
    assert SingleTaskComparison("ctr", "ctr/auc", "single_ctr", math.nan, 0.7).verdict == "—"


def test_no_mixture_section_for_one_expert_without_baselines() -> None:
    assert mixture_section({"ctr/auc": 0.7}, ["ctr"], {}) == []


def test_report_has_the_mixture_health_section(tmp_path: Path) -> None:
    details = EvaluationDetails(
        num_rows=3,
        arch="ple",
        tasks=["ctr", "rating"],
        experts=["shared0", "task0.0", "task1.0"],
        gate_weights=[[0.99, 0.01, 0.0], [0.7, 0.0, 0.3]],
        calibration={"ctr": CalibrationCurve([0.2], [0.0])},
    )
    metrics = {"ctr/auc": 0.7, "rating/rmse": 0.8, **HEALTH}
    text = write_report(tmp_path, "test", metrics, details, {"single_ctr": {"ctr/auc": 0.69}}).read_text()
    assert "| ctr | 0.056 | 0.693 | 0.990 | 0.010 |  |" in text
    assert "| ctr | ctr/auc | 0.7000 | 0.6900 (single_ctr) | +0.0100 | better |" in text
    assert text.index("## Metrics") < text.index("## Mixture health") < text.index("## Expert utilisation")


def test_learning_curves_add_a_conflict_panel_from_health_lines(tmp_path: Path) -> None:
    lines = [
        {"kind": "train", "step": 50, "loss": 0.5, "ctr/loss": 0.3},
        {"kind": "health", "step": 50, "conflict/ctr~cvr": -0.2, "conflict/mean": -0.2},
        {"kind": "health", "step": 100, "conflict/mean": 0.1},  # ctr~cvr left out: a task without labelled rows
        {"kind": "valid", "step": 100, "ctr/auc": 0.7},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert _learning_curves(tmp_path, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_learning_curves_are_drawn_again_only_when_the_log_is_newer(tmp_path: Path) -> None:
    log, png = tmp_path / "metrics.jsonl", tmp_path / "learning_curves.png"
    log.write_text(json.dumps({"kind": "train", "step": 50, "ctr/loss": 0.3}) + "\n")
    assert _learning_curves(tmp_path, png)
    one_step = png.read_bytes()
    os.utime(log, (png.stat().st_mtime - 10,) * 2)  # the figure is newer than the log: kept as it is
    png.write_bytes(b"kept")
    assert _learning_curves(tmp_path, png)
    assert png.read_bytes() == b"kept"
    with log.open("a") as f:  # training went on: the log is newer
        f.write(json.dumps({"kind": "train", "step": 100, "ctr/loss": 0.2}) + "\n")
    os.utime(log, (png.stat().st_mtime + 10,) * 2)
    assert _learning_curves(tmp_path, png)
    assert png.read_bytes().startswith(b"\x89PNG")
    assert png.read_bytes() != one_step
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary file, none left behind
