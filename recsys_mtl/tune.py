"""Hyperparameter search (`recsys-mtl tune`): an Optuna study over any config key, every trial a normal run dir.

The space, and the config each trial trains, are in tune_space.py. Trials run in this process (one start-up per study)
into TUNE_DIR/trials/NNNN; each validation's objective goes to the pruner, which may end the trial there. A trial's
value is the objective at its best validation (by the config's early-stopping metric: the checkpoint `train` keeps). A
trial whose config cannot train (a combination the config refuses, a diverging loss) fails with its message and counts
as done. The study lives in an SQL database (TUNE_DIR/study.db unless `storage` names another): an interrupted `tune`
resumes, and machines running `tune` on one storage share the study. A study keeps its space, objective and base config
and refuses others (sampler and pruner settings may change). Outputs: TUNE_DIR/best.toml (for `train --config`),
trials.csv, report.md and its plots.
"""

import csv
import dataclasses
import json
import logging
import platform
import statistics
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
import sqlalchemy.exc
import torch
from optuna.trial import FrozenTrial, Trial, TrialState

from recsys_mtl.errors import InputError, MissingInputError, OutputExistsError
from recsys_mtl.files import atomic_file, atomic_write_text, check_output
from recsys_mtl.structs import list_differences, to_mapping
from recsys_mtl.train import train
from recsys_mtl.tune_space import Search, check_space, label, load_space, value_at

log = logging.getLogger(__name__)
HEARTBEAT_S, GRACE_S = 30, 120  # a trial without a heartbeat for GRACE_S (its process was killed) is marked failed
PLOTS = ("plot_optimization_history", "plot_param_importances", "plot_parallel_coordinate", "plot_intermediate_values")
TIMES = ("seconds", "setup_s", "train_s")  # a trial's wall time: setup (dataset, model, sharding plan), then training


@dataclass(frozen=True)
class TuneResult:
    study_name: str
    storage: str
    objective: str  # as described in the report
    counts: dict[str, int]  # trial state -> trials
    best: FrozenTrial | None  # the best complete trial
    startup_s: float  # from the call to the first trial: space and config checks, opening the study


class _TrialFailed(Exception):
    """A trial whose config could not train; the study goes on."""


def _show(value: Any) -> str:
    return f"{value:.5g}" if isinstance(value, float) else str(value)


def tune(
    config: Path,
    space_path: Path,
    out: Path,
    trials: int,
    device: torch.device,
    overrides: tuple[str, ...] = (),
    storage: str | None = None,
    study_name: str = "tune",
) -> TuneResult:
    """Search until the study holds `trials` done trials (complete, pruned or failed by their config), then write
    best.toml, trials.csv and report.md into `out`.

    Raises:
        InputError: a bad space, config or storage; a study made with another space or config; a trial budget that
            never validates.
        OutputExistsError: a trial's run dir already holds a run (another study in the same `out`).
    """
    started = time.monotonic()
    if trials < 1:
        raise InputError(f"--trials must be >= 1, got {trials}")
    search = check_space(load_space(space_path), config, overrides)
    out = Path(out)
    check_output(out, Path(search.base.dataset))
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study = _open_study(url, study_name, search)
    startup_s = time.monotonic() - started
    log.info("study %r in %s: %d of %d trials done (start-up %.1f s)", study_name, url, _done(study), trials, startup_s)
    while _done(study) < trials:
        study.optimize(lambda trial: _run_trial(trial, search, out, device), n_trials=1, catch=(_TrialFailed,))
        _write_tables(study, search, out)  # kept current: an interrupted study leaves them usable
    best = _write_tables(study, search, out)
    _write_report(study, search, best, startup_s, out)
    counts = dict(Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False)))
    return TuneResult(study_name, url, search.objective.describe(), counts, best, startup_s)


def _open_study(url: str, name: str, search: Search) -> optuna.Study:
    """The study `name` in `url`, created or loaded (then refused if made with another space, objective or config),
    with the space's sampler and pruner."""
    definition = {
        "params": {key: dataclasses.asdict(param) for key, param in search.space.params.items()},
        "objective": search.objective.weights,
        "direction": search.objective.direction,
        "fixed": search.space.study.fixed,
        "config": to_mapping(dataclasses.replace(search.base, run_dir="")),
    }
    definition = json.loads(json.dumps(definition))  # as the storage gives it back
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat
            rdb = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        direction = search.objective.direction
        study = optuna.create_study(storage=rdb, study_name=name, direction=direction, load_if_exists=True)
    except (sqlalchemy.exc.SQLAlchemyError, ValueError) as err:
        raise InputError(f"--storage {url}: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    saved = study.user_attrs.get("definition")
    if saved is None:  # a new study; its first trial takes the base config's own values (those in the space)
        study.set_user_attr("definition", definition)
        values = {key: value_at(search.base, key) for key in search.space.params}
        own = {key: label(v) for key, v in values.items() if search.space.params[key].holds(v)}
        if own:
            study.enqueue_trial(own, user_attrs={"base": True}, skip_if_exists=True)
    elif differences := list_differences(saved, definition, ("study", "now")):
        raise InputError(
            f"study {name!r} in {url} was made with another space or config: {'; '.join(differences)}. Resume with "
            "the same --config, --space and --set, or choose another --study-name or --out"
        )
    settings = search.space.study
    seed, startup, warmup = settings.seed + len(study.trials), settings.startup_trials, settings.warmup_validations
    study.sampler = (
        optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
        if settings.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )
    study.pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
        if settings.pruner == "median"
        else optuna.pruners.ThresholdPruner(settings.lower, settings.upper, warmup)
        if settings.pruner == "threshold"
        else optuna.pruners.NopPruner()
    )
    return study


def _done(study: optuna.Study) -> int:
    """Trials that count towards the total: complete, pruned, or failed by their config (not killed)."""
    return sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and "error" in t.user_attrs)
        for t in study.get_trials(deepcopy=False)
    )


def _run_trial(trial: Trial, search: Search, out: Path, device: torch.device) -> float:
    """Train one trial into out/trials/NNNN, reporting the objective at every validation; its value."""
    started = time.monotonic()
    values = {key: param.suggest(trial, key) for key, param in search.space.params.items()}
    run_dir = out / "trials" / f"{trial.number:04d}"
    _set_attrs(trial, {"run_dir": str(run_dir), "host": platform.node()})
    shown = ", ".join(f"{key}={_show(value)}" for key, value in values.items())
    validations: list[float] = []

    def report(step: int, metrics: dict[str, float]) -> None:
        validations.append(search.objective.value(metrics))
        trial.report(validations[-1], len(validations) - 1)  # by validation: comparable across batch sizes
        if trial.should_prune():
            raise optuna.TrialPruned(f"at validation {len(validations)} (step {step})")

    try:
        cfg = dataclasses.replace(search.config_for(values), run_dir=str(run_dir))
        result = train(cfg, run_dir, device, progress=False, on_validation=report)
    except (MissingInputError, OutputExistsError):
        raise
    except InputError as err:
        _set_attrs(trial, {"error": str(err), "seconds": time.monotonic() - started})
        log.warning("trial %d failed in %.1f s: %s; %s", trial.number, time.monotonic() - started, err, shown)
        raise _TrialFailed(str(err)) from err
    except optuna.TrialPruned as pruned:
        seconds = time.monotonic() - started
        trial.set_user_attr("seconds", seconds)
        log.info("trial %d pruned %s: %.5g in %.1f s; %s", trial.number, pruned, validations[-1], seconds, shown)
        raise
    if not result.valid:
        raise InputError(
            f"trial {trial.number} trained {result.steps} steps without a validation: set train.eval_every (at most "
            "train.max_steps) in [study.fixed]"
        )
    best = result.best or result.valid[-1]
    value, seconds = search.objective.value(best), time.monotonic() - started
    metrics = {m: best[m] for m in search.objective.weights}
    times = dict(zip(TIMES, (seconds, result.setup_s, seconds - result.setup_s), strict=True))
    _set_attrs(trial, {**times, "steps": result.steps, "metrics": metrics})
    log.info(
        "trial %d: %.5g in %.1f s (setup %.1f s, training %.1f s), %d validations; %s",
        *(trial.number, value, seconds, result.setup_s, seconds - result.setup_s, len(validations), shown),
    )
    return value


def _set_attrs(trial: Trial, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def _rows(study: optuna.Study, search: Search) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, times, steps, validations, values, objective metrics, error, run."""
    params, metrics = search.space.params, search.objective.weights
    return [
        {
            "trial": t.number,
            "state": t.state.name.lower(),
            "value": t.value,
            **{key: t.user_attrs.get(key) for key in (*TIMES, "steps")},
            "validations": len(t.intermediate_values),
            **{key: params[key].decode(t.params[key]) if key in t.params else None for key in params},
            **{m: t.user_attrs.get("metrics", {}).get(m) for m in metrics},
            "error": t.user_attrs.get("error"),
            "run_dir": t.user_attrs.get("run_dir"),
            "host": t.user_attrs.get("host"),
        }
        for t in study.get_trials(deepcopy=False)
    ]


def _write_tables(study: optuna.Study, search: Search, out: Path) -> FrozenTrial | None:
    """trials.csv, and best.toml (the base config with the best trial's values) once a trial completed; the best."""
    rows = _rows(study, search)
    with atomic_file(out / "trials.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    if not any(row["state"] == "complete" for row in rows):
        return None
    best = study.best_trial
    values = {key: search.space.params[key].decode(value) for key, value in best.params.items()}
    dataclasses.replace(search.config_for(values, per_trial=False), run_dir=str(out / "best")).save(out / "best.toml")
    return best


def _write_report(study: optuna.Study, search: Search, best: FrozenTrial | None, startup_s: float, out: Path) -> None:
    """report.md: the best trial, the time per trial, every trial (best first) and the plots."""
    rows = _rows(study, search)
    counts = ", ".join(f"{n} {state}" for state, n in Counter(row["state"] for row in rows).items())
    lines = [f"# Hyperparameter search: {study.study_name}", "", f"{search.objective.describe()}: {counts}.", ""]
    if best is not None:
        mean = {key: statistics.fmean(r[key] for r in rows if r["state"] == "complete") for key in TIMES}
        lines += [
            f"**Best: trial {best.number}**, {best.value:.5g}; train it in full: `recsys-mtl train --config "
            f"{out / 'best.toml'}`. Time per complete trial {mean['seconds']:.1f} s: setup {mean['setup_s']:.1f} s "
            f"(dataset, model, sharding plan), training and validation {mean['train_s']:.1f} s; start-up of the "
            f"study {startup_s:.1f} s, once.",
            "",
        ]
    base = next((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("base")), None)
    if base is not None:
        lines += [f"Trial {base.number} trains the base config's own values (those within the space).", ""]
    shown = ["trial", "state", "value", "seconds", *search.space.params, *search.objective.weights]
    lines += ["| " + " | ".join(shown) + " |", "|---" * len(shown) + "|"]
    sign = -1.0 if search.objective.direction == "maximize" else 1.0
    for row in sorted(rows, key=lambda r: (r["value"] is None, sign * (r["value"] or 0.0))):
        lines.append("| " + " | ".join("—" if row[key] is None else _show(row[key]) for key in shown) + " |")
    lines += [f"\n![{name}]({name}.png)" for name in _plots(study, out)]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def _plots(study: optuna.Study, out: Path) -> list[str]:
    """The PNG plots written, out/<name>.png (none before two trials completed)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return []
    from optuna.visualization import matplotlib as optuna_plots

    width = max(8.0, 1.4 * len({key for t in complete for key in t.params}))  # room for each parameter's axis
    names = [plot.removeprefix("plot_") for plot in PLOTS]
    for plot, name in zip(PLOTS, names, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental API; a constant parameter's flat axis
            figure = getattr(optuna_plots, plot)(study).figure
            figure.set_size_inches(width, 5.0)
        with atomic_file(out / f"{name}.png") as tmp:
            figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(figure)
    return names
