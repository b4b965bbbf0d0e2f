"""The run report: report_<split>.md with a metrics table (model, oracle, single-task baselines), the mixture's health
(gate entropy, load per task x expert, dead experts, MTL against the single-task runs) and PNG plots of the learning
curves, expert utilisation (mean gate weight per task x expert) and calibration."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from recsys_mtl.files import atomic_file, atomic_write_text
from recsys_mtl.metrics import DEAD_LOAD, MixtureHealth, format_metric, has_oracle, is_task_metric
from recsys_mtl.tasks import better, is_headline


@dataclass(frozen=True)
class CalibrationCurve:
    """Mean prediction and mean label in equal-count bins of the prediction."""

    predicted: list[float]
    observed: list[float]


@dataclass(frozen=True)
class EvaluationDetails:
    """What the report shows beside the metrics (evaluate writes it as details_<split>.json)."""

    num_rows: int
    arch: str
    tasks: list[str]
    experts: list[str]
    gate_weights: list[list[float]]  # the mean gate weight of each task on each expert, [T][E]
    calibration: dict[str, CalibrationCurve]  # binary task -> its curve


def _metrics_note(metrics: dict[str, float], has_baselines: bool) -> str:
    """What the metrics table shows, for the columns it has."""
    notes = ["AUCs are exact."]
    if has_oracle(metrics):
        notes.append(
            "`model / oracle` compares with the true probabilities of the data's generator (1.0 = the best achievable "
            "for AUCs; for errors and deviances, lower is better and the oracle is the floor)."
        )
    if has_baselines:
        notes.append("Baselines are single-task runs on the same data.")
    notes.append(
        "— marks a metric undefined on this split (an AUC where the task's labels are all 0 or all 1, any metric of a "
        "task without labelled rows)."
    )
    return " ".join(notes)


def metrics_table(metrics: dict[str, float], baselines: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per model metric; columns model, oracle, model / oracle, then each baseline."""
    names = [k for k in metrics if is_task_metric(k)]
    oracle = has_oracle(metrics)
    header = ["metric", "model", *(["oracle", "model / oracle"] if oracle else []), *baselines]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        row = [name, format_metric(metrics[name])]
        if oracle:
            row += [format_metric(metrics.get(f"oracle/{name}")), format_metric(metrics.get(f"ratio/{name}"))]
        row += [format_metric(b.get(name)) for b in baselines.values()]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class SingleTaskComparison:
    """A task's headline metric in this (multi-task) run and in a single-task baseline run."""

    task: str
    metric: str  # `<task>/<metric>`
    baseline: str  # the baseline run's name
    mtl: float
    single: float

    @property
    def verdict(self) -> str:
        """ "better" / "worse" for the multi-task run (AUCs up, errors and deviances down), "same", or "—" (NaN)."""
        if math.isnan(self.mtl) or math.isnan(self.single):
            return "—"
        if better(self.metric, self.mtl, self.single):
            return "better"
        return "worse" if better(self.metric, self.single, self.mtl) else "same"


def single_task_comparisons(
    metrics: dict[str, float], tasks: list[str], baselines: dict[str, dict[str, float]]
) -> list[SingleTaskComparison]:
    """Per task, its headline metric here against each baseline that is a single-task run of it: a baseline whose only
    headline metric (tasks.is_headline) is the task's."""
    out = []
    for task in tasks:
        metric = next((k for k in metrics if is_headline(k) and k.split("/")[0] == task), None)
        if metric is None:
            continue
        for name, other in baselines.items():
            if [k for k in other if is_headline(k)] == [metric]:
                out.append(SingleTaskComparison(task, metric, name, metrics[metric], other[metric]))
    return out


def mixture_section(metrics: dict[str, float], tasks: list[str], baselines: dict[str, dict[str, float]]) -> list[str]:
    """The "Mixture health" section's markdown lines; none without mixture metrics or single-task baselines."""
    health = MixtureHealth.from_metrics(metrics)
    comparisons = single_task_comparisons(metrics, tasks, baselines)
    if health is None and not comparisons:
        return []
    lines = ["## Mixture health", ""]
    if health is not None:
        experts = health.experts
        dead = health.dead()
        lines += [
            "Gate entropy: the mean over rows of the entropy (nats) of the task's gate, from 0 (always one expert) to "
            "`max` = ln(the number of experts it routes to), a uniform gate. Load: the mean gate weight the task gives "
            f"each expert (blank where its gate cannot route). Dead: under {DEAD_LOAD:.0%} load from every task that "
            "routes to it.",
            "",
            "| task | gate entropy | max | " + " | ".join(experts) + " |",
            "|" + "---|" * (3 + len(experts)),
        ]
        for task, loads in health.loads.items():
            row = [task, format_metric(health.entropy[task], 3), format_metric(health.max_entropy(task), 3)]
            row += [format_metric(loads[e], 3) if e in loads else "" for e in experts]
            lines.append("| " + " | ".join(row) + " |")
        names = f" ({', '.join(dead)})" if dead else ""
        lines += ["", f"Dead experts: {len(dead)} of {len(experts)} ({health.dead_share:.0%}){names}.", ""]
    if comparisons:
        lines += [
            "MTL - single-task: each task's headline metric in this run minus in its single-task run (AUCs: higher "
            "is better; rmse and deviance: lower is better).",
            "",
            "| task | metric | MTL | single-task | MTL - single-task | |",
            "|---|---|---|---|---|---|",
        ]
        for c in comparisons:
            diff = c.mtl - c.single
            signed = "—" if math.isnan(diff) else f"{diff:+.4f}"
            row = [c.task, c.metric, format_metric(c.mtl), f"{format_metric(c.single)} ({c.baseline})", signed]
            lines.append("| " + " | ".join([*row, c.verdict]) + " |")
        lines.append("")
    return lines


def save_figure(fig: "plt.Figure", path: Path) -> None:
    """Write `fig` as PNG through a temporary file and a rename, and free it."""
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def _learning_curves(run_dir: Path, path: Path) -> bool:
    """Plot the training log into `path` (kept as it is when newer than the log: each evaluation of a run would draw
    the same figure); False without a log to plot."""
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        return False
    if path.is_file() and path.stat().st_mtime >= log.stat().st_mtime:
        return True
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["kind"] == "train"]
    valid = [r for r in rows if r["kind"] == "valid"]
    health = [r for r in rows if r["kind"] == "health"]
    if not train and not valid:
        return False
    fig, axes = plt.subplots(1, 3 if health else 2, figsize=(16.5 if health else 11, 4))
    left, right = axes[0], axes[1]
    for key in sorted({k for r in train for k in r if k.endswith("/loss")}):
        left.plot([r["step"] for r in train], [r[key] for r in train], label=key)
    left.set(title="training loss per task (running mean)", xlabel="step", yscale="log")
    for key in sorted({k for r in valid for k in r if is_headline(k)}):
        right.plot([r["step"] for r in valid], [r[key] for r in valid], marker="o", label=key)
    right.set(title="validation", xlabel="step")
    if health:  # a pair is missing from a line when one of its tasks had no labelled rows in that batch
        for key in sorted({k for r in health for k in r if k.startswith("conflict/")}):
            steps, values = zip(*((r["step"], r[key]) for r in health if key in r), strict=True)
            width = 2.5 if key == "conflict/mean" else 1.0
            axes[2].plot(steps, values, label=key.removeprefix("conflict/"), linewidth=width)
        axes[2].axhline(0, color="grey", linewidth=0.5)
        axes[2].set(title="gradient cosine between tasks (< 0: conflict)", xlabel="step", ylim=(-1, 1))
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def _utilisation(details: EvaluationDetails, path: Path) -> None:
    weights, tasks, experts = details.gate_weights, details.tasks, details.experts
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(experts), 1.2 + 0.5 * len(tasks)))
    image = ax.imshow(weights, cmap="viridis", vmin=0, vmax=max(max(r) for r in weights))
    ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    for t, row in enumerate(weights):
        for e, w in enumerate(row):
            ax.text(e, t, f"{w:.2f}", ha="center", va="center", color="white" if w < 0.5 * max(row) else "black")
    ax.set_title("mean gate weight (task x expert)")
    fig.colorbar(image, ax=ax)
    save_figure(fig, path)


def _calibration(curves: dict[str, CalibrationCurve], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    top = max(max(c.predicted + c.observed) for c in curves.values())
    ax.plot([0, top], [0, top], color="grey", linestyle="--", label="perfect")
    for task, curve in curves.items():
        ax.plot(curve.predicted, curve.observed, marker="o", label=task)
    ax.set(title="calibration (deciles of the prediction)", xlabel="mean predicted", ylabel="observed rate")
    ax.legend()
    save_figure(fig, path)


def write_report(
    run_dir: Path,
    split: str,
    metrics: dict[str, float],
    details: EvaluationDetails,
    baselines: dict[str, dict[str, float]],
    sections: list[str] | None = None,
) -> Path:
    """Write report_<split>.md and its PNGs into `run_dir`, `sections` (markdown lines, e.g. the explanation's) last.
    Returns the markdown path."""
    run_dir = Path(run_dir)
    parts = [
        f"# Report: {run_dir.name} on the {split} split",
        "",
        f"Rows: {details.num_rows:,}. Tasks: {', '.join(details.tasks)}. Architecture: {details.arch}.",
        "",
        "## Metrics",
        "",
        _metrics_note(metrics, bool(baselines)),
        "",
        metrics_table(metrics, baselines),
        "",
        *mixture_section(metrics, details.tasks, baselines),
    ]
    if _learning_curves(run_dir, run_dir / "learning_curves.png"):
        parts += ["## Learning curves", "", "![learning curves](learning_curves.png)", ""]
    if len(details.experts) > 1:
        _utilisation(details, run_dir / f"expert_utilisation_{split}.png")
        parts += ["## Expert utilisation", "", f"![expert utilisation](expert_utilisation_{split}.png)", ""]
    curves = {task: curve for task, curve in details.calibration.items() if curve.predicted}  # rows labelled
    if curves:
        _calibration(curves, run_dir / f"calibration_{split}.png")
        parts += ["## Calibration", "", f"![calibration](calibration_{split}.png)", ""]
    path = run_dir / f"report_{split}.md"
    atomic_write_text(path, "\n".join([*parts, *(sections or [])]))
    return path
