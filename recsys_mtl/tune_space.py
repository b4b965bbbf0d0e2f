"""The search space of `recsys-mtl tune` and the config each trial trains.

The space is a TOML file: a table per config key (dotted; `tasks.<task>.<field>` for a task's setting), e.g.
`["optim.lr"] type = "float" low = 1e-4 high = 1e-2 log = true` (float / int: low, high, log or step; categorical:
choices), and a [study] table (`StudySettings`: the metric or a weighted objective, sampler, pruner; [study.fixed]: what
every trial trains under, such as a smaller budget, not carried into best.toml). configs/demo_space.toml is an example.
A trial's values become `key=value` overrides of the config, the path of `train --set`.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from optuna.trial import Trial

from recsys_mtl.config import Config, load_config
from recsys_mtl.data.schema import Schema
from recsys_mtl.errors import InputError
from recsys_mtl.structs import from_mapping, read_toml, to_mapping
from recsys_mtl.tasks import HIGHER_IS_BETTER, TASK_KINDS, task_specs
from recsys_mtl.train import main_metric


@dataclass(frozen=True)
class Param:
    """A searched config key: a float or int range (log-scaled or stepped), or categorical choices (any TOML values;
    a list or table choice is its TOML text in the study)."""

    type: Literal["float", "int", "categorical"]
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.type == "categorical":
            if not self.choices or (self.low, self.high, self.step) != (None, None, None) or self.log:
                raise ValueError("a categorical takes choices = [...] (non-empty), and no low, high, log or step")
            return
        if self.low is None or self.high is None or self.choices:
            raise ValueError(f"a {self.type} takes low and high, and no choices")
        if self.low > self.high:
            raise ValueError(f"low = {self.low} > high = {self.high}")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError(f"log = true takes low > 0 and no step, got low = {self.low}, step = {self.step}")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be > 0, got {self.step}")
        if self.type == "int" and not all(float(v).is_integer() for v in (self.low, self.high, self.step or 1)):
            raise ValueError(f"an int takes whole low, high and step, got {self.low}, {self.high}, {self.step}")

    def bounds(self) -> tuple[Any, ...]:
        """The values that bound what a trial can take: each choice, or low and high."""
        return self.choices if self.type == "categorical" else (self.low, self.high)

    def suggest(self, trial: Trial, key: str) -> Any:
        """This key's value for `trial`, from the study's sampler."""
        if self.type == "categorical":
            return self.decode(trial.suggest_categorical(key, [label(c) for c in self.choices]))
        low, high = cast(float, self.low), cast(float, self.high)
        if self.type == "int":
            return trial.suggest_int(key, int(low), int(high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(key, low, high, log=self.log, step=self.step)

    def holds(self, value: Any) -> bool:
        """Whether a trial can take `value`."""
        if self.type == "categorical":
            return label(value) in [label(c) for c in self.choices]
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        return numeric and cast(float, self.low) <= value <= cast(float, self.high)

    def decode(self, stored: Any) -> Any:
        """The config value of a value as the study stores it."""
        return next(c for c in self.choices if label(c) == stored) if self.type == "categorical" else stored


@dataclass(frozen=True)
class StudySettings:
    """The space file's [study] table."""

    metric: str = ""  # the metric to optimise; "": the config's early-stopping metric
    objective: dict[str, float] = field(default_factory=dict)  # or a weighted sum of metrics (metric -> weight)
    direction: Literal["auto", "maximize", "minimize"] = "auto"  # auto: the metric's; a weighted sum: maximize
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0  # the sampler's, plus the trials the study holds when this process joins it
    startup_trials: int = 5  # trials done before TPE models the space and before the pruner prunes
    pruner: Literal["median", "threshold", "none"] = "median"  # median: worse than half the others at a validation
    warmup_validations: int = 1  # a trial's first validations are never pruned
    lower: float | None = None  # threshold: prune an objective value below lower or above upper
    upper: float | None = None
    fixed: dict[str, Any] = field(default_factory=dict)  # config key -> value for every trial, not for best.toml

    def __post_init__(self) -> None:
        if self.metric and self.objective:
            raise ValueError("give metric or objective, not both")
        if min(self.startup_trials, self.warmup_validations) < 0:
            raise ValueError("startup_trials and warmup_validations must be >= 0")
        if self.pruner == "threshold" and self.lower is None and self.upper is None:
            raise ValueError("pruner = 'threshold' takes lower or upper")


@dataclass(frozen=True)
class SearchSpace:
    source: Path
    params: dict[str, Param]  # config key -> its range
    study: StudySettings  # `fixed` with dotted keys


@dataclass(frozen=True)
class Objective:
    """What a trial is judged by: a weighted sum of validation metrics (one metric: weight 1), and its direction."""

    weights: dict[str, float]
    direction: Literal["maximize", "minimize"]

    def value(self, metrics: dict[str, float]) -> float:
        """Raises InputError: a metric is missing from `metrics`."""
        if missing := sorted(set(self.weights) - set(metrics)):
            raise InputError(f"the objective's {missing} not among the validation metrics {sorted(metrics)}")
        return sum(weight * metrics[name] for name, weight in self.weights.items())

    def describe(self) -> str:
        terms = [name if w == 1 else f"{w:g}·{name}" for name, w in self.weights.items()]
        return f"{' + '.join(terms)} ({self.direction})"


@dataclass(frozen=True)
class Search:
    """A checked space on a base config (`config` with `overrides`): what every trial of a study shares."""

    space: SearchSpace
    objective: Objective
    config: Path
    overrides: tuple[str, ...]
    base: Config

    def config_for(self, values: dict[str, Any], per_trial: bool = True) -> Config:
        """The base config with `values` (config key -> value) and, `per_trial`, the space's [study.fixed]."""
        fixed = self.space.study.fixed if per_trial else {}
        return load_config(self.config, [*self.overrides, *to_overrides(self.base, {**fixed, **values})])


def load_space(path: Path) -> SearchSpace:
    """Read a search-space TOML (see the module docstring).

    Raises:
        MissingInputError: no such file.
        InputError: invalid TOML, a wrong key, type or range; the message names the file and the key.
    """
    data = read_toml(Path(path))
    study = from_mapping(StudySettings, data.pop("study", {}), str(path), "study")
    params = {key: from_mapping(Param, table, str(path), key) for key, table in _param_tables(data, "", path)}
    if not params:
        raise InputError(f'{path}: no key to search; add a table per config key, e.g. ["optim.lr"] type = "float" ...')
    fixed = _flatten(study.fixed)
    if both := sorted(set(fixed) & set(params)):
        raise InputError(f"{path}: {both} both searched and in [study.fixed]")
    return SearchSpace(Path(path), params, dataclasses.replace(study, fixed=fixed))


def _param_tables(data: dict[str, Any], prefix: str, path: Path) -> list[tuple[str, dict]]:
    """(dotted key, table) of every table with a `type`, written ["optim.lr"] or [optim.lr]."""
    found = []
    for name, value in data.items():
        key = f"{prefix}{name}"
        if not isinstance(value, dict):
            raise InputError(f'{path}: {key} = {value!r}: expected a table ["{key}"] with type = "float" ...')
        found += [(key, value)] if "type" in value else _param_tables(value, f"{key}.", path)
    return found


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        flat |= _flatten(value, f"{prefix}{name}.") if isinstance(value, dict) else {f"{prefix}{name}": value}
    return flat


def label(choice: Any) -> Any:
    return choice if isinstance(choice, bool | int | float | str) else _toml(choice)


def _toml(value: Any) -> str:
    """`value` as an inline TOML value (what `--set key=...` parses)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # its escapes are TOML's
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def to_overrides(cfg: Config, values: dict[str, Any]) -> list[str]:
    """`key=value` overrides (the `--set` syntax) that give `cfg` these values; `tasks.<task>.<field>` keys become
    one `tasks=[...]` override of cfg's tasks.

    Raises:
        InputError: a `tasks.<task>.<field>` key names a task that cfg lacks.
    """
    tasks, overrides = to_mapping(cfg.tasks), []
    names = [task["name"] for task in tasks]
    for key, value in values.items():
        parts = key.split(".")
        if parts[0] == "tasks" and len(parts) == 3:
            if parts[1] not in names:
                raise InputError(f"{key}: the config has no task {parts[1]!r} (tasks: {names})")
            tasks[names.index(parts[1])][parts[2]] = value
        else:
            overrides.append(f"{key}={_toml(value)}")
    touched = any(key.startswith("tasks.") for key in values)
    return overrides + ([f"tasks={_toml(tasks)}"] if touched else [])


def check_space(space: SearchSpace, config: Path, overrides: tuple[str, ...] = ()) -> Search:
    """The search, once the fixed values and every bound of every key (each choice, low and high) are known to give
    a valid config, and the objective's metrics to be validation metrics of its tasks.

    Raises:
        InputError: naming the space file and the key: not a config key, a value of the wrong type or range, an
            unknown metric (and anything wrong with the config itself, naming it).
    """
    base = load_config(config, overrides)
    search = Search(space, Objective({}, "maximize"), Path(config), tuple(overrides), base)
    bounds = [(key, {key: value}) for key, param in space.params.items() for value in param.bounds()]
    for key, values in [("study.fixed", {}), *bounds]:
        try:
            search.config_for(values)
        except InputError as err:
            shown = f" = {_toml(values[key])}" if key in values else ""
            raise InputError(f"{space.source}: [{key}]{shown}: {err}") from err
    specs = task_specs(base, Schema.load(Path(base.dataset)))
    known = {f"{s.name}/{m}" for s in specs for m in TASK_KINDS[s.task_kind].metrics}
    known |= {f"{s.name}/auc_cold" for s in specs if s.task_kind == "binary"}
    weights = space.study.objective or {space.study.metric or main_metric(base, specs): 1.0}
    if unknown := sorted(set(weights) - known):
        raise InputError(
            f"{space.source}: [study] {unknown}: not validation metrics of the config; one of {sorted(known)}"
        )
    direction = space.study.direction
    if direction == "auto":
        higher = len(weights) > 1 or next(iter(weights)).split("/")[-1] in HIGHER_IS_BETTER
        direction = "maximize" if higher else "minimize"
    return dataclasses.replace(search, objective=Objective(weights, direction))


def value_at(cfg: Config, key: str) -> Any:
    """The value of dotted `key` in cfg (`tasks.<task>.<field>`: a task's); None where it has none."""
    node: Any = dataclasses.asdict(cfg)
    for part in key.split("."):
        node = {t["name"]: t for t in node} if key.startswith("tasks.") and isinstance(node, tuple) else node
        node = node.get(part) if isinstance(node, dict) else None
    return node
