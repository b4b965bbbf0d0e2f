"""The run configuration: one frozen Config per run, from TOML, then `--set key=value` overrides, then checked."""

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from recsys_mtl.errors import InputError
from recsys_mtl.files import atomic_write_text
from recsys_mtl.structs import from_mapping, read_toml, to_mapping

Freezable = Literal["shared", "text_projection", "bert"]
# row_wise needs nccl (GPU); on gloo: table_wise, column_wise, table_column_wise, data_parallel
Sharding = Literal["table_wise", "column_wise", "row_wise", "table_column_wise", "data_parallel"]


@dataclass(frozen=True)
class TaskConfig:
    """A task to learn; its label and kind come from the dataset schema.

    `after` names a task whose positive event must precede this one (cvr after ctr). With `esmm`, this task's
    probability is multiplied by the other's and supervised on every row (pCTCVR = pCTR * pCVR); without, it is
    supervised directly on the rows where the other task's label is 1 (that task need not be trained then: a
    single-task CVR baseline is `{ name = "cvr", after = "ctr", esmm = false }`).
    """

    name: str
    weight: float = 1.0
    loss: Literal["auto", "mse", "huber"] = "auto"  # regression tasks: mean squared error or Huber
    after: str | None = None
    esmm: bool = True

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"task {self.name!r}: weight must be >= 0, got {self.weight}")
        if self.after == self.name:
            raise ValueError(f"task {self.name!r}: after must name another task, got itself")


@dataclass(frozen=True)
class ModelConfig:
    """Network shape. shared_bottom: one shared expert; mmoe: `num_experts` shared experts and a gate per task;
    ple: `num_levels` CGC levels of `num_experts` shared and `num_task_experts` task-specific experts."""

    arch: Literal["shared_bottom", "mmoe", "ple"] = "mmoe"
    num_experts: int = 4
    num_task_experts: int = 1
    num_levels: int = 1  # measured on the default world: a second level loses 0.008 CTR AUC (README, Quality)
    expert_dims: tuple[int, ...] = (128, 64)
    tower_dims: tuple[int, ...] = (32,)
    dense_dims: tuple[int, ...] = (16,)
    text_dim: int = 32  # width of each text projection; 0 disables the text branch
    cross_layers: int = 2  # DCN-v2 cross layers on the concatenated features before the mixture; 0: none
    cross_rank: int = 0  # > 0: each cross layer's matrix the product of two of this rank (DCN-v2's low rank form)
    # normalise the concatenated features (their scales differ): helps without cross layers and text, not with them
    input_norm: Literal["batch", "layer", "none"] = "none"
    dropout: float = 0.0
    # in training, each expert leaves each gate of each row with this chance: with `balance`, no expert dies (README)
    gate_dropout: float = 0.1
    # > 0: each task also has tables of this width of its own, read by its tower alone (STEM-style); 0: none
    task_embedding_dim: int = 8
    # how the tasks' gradients on the shared expert outputs combine: summed, or each scaled to its weight's share of
    # their mean norm (experts.GradientBalance; measured better on rating, cvr and reads, README Quality)
    balance: Literal["none", "norm"] = "norm"

    def __post_init__(self) -> None:
        if self.arch != "shared_bottom" and self.num_experts < 1:
            raise ValueError(f"model.num_experts must be >= 1 for arch={self.arch!r}, got {self.num_experts}")
        if self.arch == "ple" and (self.num_levels < 1 or self.num_task_experts < 1):
            raise ValueError(
                f"model.num_levels and num_task_experts must be >= 1 for ple, got {self.num_levels}, "
                f"{self.num_task_experts}"
            )
        if not self.expert_dims or min(self.expert_dims) < 1 or min(self.tower_dims, default=1) < 1:
            raise ValueError(f"model.expert_dims must be non-empty and positive, got {self.expert_dims}")
        if min(self.dense_dims, default=1) < 1 or self.cross_layers < 0 or self.cross_rank < 0:
            raise ValueError(
                f"model.dense_dims must be positive and cross_layers, cross_rank >= 0, got {self.dense_dims}, "
                f"{self.cross_layers}, {self.cross_rank}"
            )
        if self.task_embedding_dim < 0 or self.task_embedding_dim % 4:
            raise ValueError(f"model.task_embedding_dim must be 0 or a multiple of 4, got {self.task_embedding_dim}")
        if not 0 <= self.gate_dropout < 1:
            raise ValueError(f"model.gate_dropout must be in [0, 1), got {self.gate_dropout}")
        if self.text_dim < 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"model.text_dim must be >= 0 and dropout in [0, 1), got {self.text_dim}, {self.dropout}")


@dataclass(frozen=True)
class TextConfig:
    """BERT text features: `model` is the packaged all-MiniLM-L6-v2 or a local transformers folder."""

    model: str = "all-MiniLM-L6-v2"
    batch_size: int = 64
    max_length: int = 128  # reviews (median 80 tokens): 64 cut 63% of them, 128 cuts 11%
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 where the chip has native bf16
    finetune_layers: int = 0  # > 0: run BERT in the model and fine-tune its last k layers (small runs)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_length < 2 or self.finetune_layers < 0:
            raise ValueError(
                f"text: batch_size >= 1, max_length >= 2, finetune_layers >= 0 expected, got "
                f"{self.batch_size}, {self.max_length}, {self.finetune_layers}"
            )


@dataclass(frozen=True)
class LossConfig:
    """task: mean per task, then the weighted sum; sample: weighted sum over a row's tasks, then the mean over rows."""

    reduction: Literal["task", "sample"] = "sample"  # measured: task level lets the sparse tasks' noise drown ctr
    weighting: Literal["fixed", "uncertainty", "gradnorm"] = "fixed"
    gradnorm_alpha: float = 1.5
    gradnorm_lr: float = 0.025
    tower_l2: float = 0.0  # lambda of the L2 penalty on tower weights
    huber_delta: float = 1.0

    def __post_init__(self) -> None:
        if self.gradnorm_alpha < 0 or self.tower_l2 < 0 or self.gradnorm_lr <= 0 or self.huber_delta <= 0:
            raise ValueError(
                f"loss: gradnorm_alpha >= 0, tower_l2 >= 0, gradnorm_lr > 0 and huber_delta > 0 expected, got "
                f"{self.gradnorm_alpha}, {self.tower_l2}, {self.gradnorm_lr}, {self.huber_delta}"
            )


@dataclass(frozen=True)
class OptimConfig:
    embedding_lr: float = 0.1  # row-wise Adagrad, fused into the backward pass
    dense: Literal["adam", "adamw"] = "adam"
    lr: float = 5e-3
    weight_decay: float = 0.0
    # dense lr to 5% of `lr` within each epoch (restarting: early stopping keeps the best epoch) or over the run
    decay: Literal["epoch", "linear", "none"] = "epoch"

    def __post_init__(self) -> None:
        if self.embedding_lr <= 0 or self.lr <= 0:
            raise ValueError(f"optim.embedding_lr and optim.lr must be > 0, got {self.embedding_lr}, {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 2048
    epochs: int = 10  # at most: early stopping (patience) ends a run whose validation stops improving
    max_steps: int = 0  # 0: no limit
    schedule: Literal["joint", "alternating"] = "joint"  # alternating: joint steps between per-task steps in turn
    freeze: tuple[Freezable, ...] = ()
    bf16: bool | Literal["auto"] = "auto"  # autocast matmuls to bf16 (losses stay fp32); auto: where the chip has it
    seed: int = 0
    id_dropout: float = 0.0  # chance that an id of `id_dropout_features` is replaced by the unknown id 0 in training
    id_dropout_features: tuple[str, ...] = ("item_id", "ad_id")  # so that unseen (cold) items are ranked from text
    log_every: int = 50  # steps between training-loss log lines
    conflict_every: int = 50  # steps between measures of the tasks' gradient conflict ("health" lines); 0: never
    eval_every: int = 0  # steps between validations; 0: at the end of every epoch
    checkpoint_every: int = 0  # steps between checkpoints; 0: at every validation and at the end
    checkpoint_minutes: float = 10.0  # also a checkpoint when this long has passed since the last one; 0: never
    early_stop_metric: str = ""  # e.g. "ctr/auc"; "": the first task's main metric
    init_from: str = ""  # a trained run dir to start from (`train --init-from`; see warm_start.py); "": from scratch
    patience: int = 2  # validations without improvement before stopping

    def __post_init__(self) -> None:
        if not 0 <= self.id_dropout < 1:
            raise ValueError(f"train.id_dropout must be in [0, 1), got {self.id_dropout}")
        if min(self.log_every, self.patience) < 1 or min(self.eval_every, self.checkpoint_every) < 0:
            raise ValueError("train: log_every and patience must be >= 1, eval_every and checkpoint_every >= 0")
        if self.conflict_every < 0:
            raise ValueError(f"train.conflict_every must be >= 0 (0: never), got {self.conflict_every}")
        if self.checkpoint_minutes < 0:
            raise ValueError(f"train.checkpoint_minutes must be >= 0, got {self.checkpoint_minutes}")
        if self.batch_size < 1 or self.epochs < 1 or self.max_steps < 0:
            raise ValueError(
                f"train: batch_size >= 1, epochs >= 1, max_steps >= 0 expected, got "
                f"{self.batch_size}, {self.epochs}, {self.max_steps}"
            )


@dataclass(frozen=True)
class Config:
    dataset: str
    tasks: tuple[TaskConfig, ...]
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run_dir: str = ""  # where checkpoints, logs and reports go (`train --out` overrides)
    sharding: dict[str, Sharding] = field(default_factory=dict)  # table -> how the planner must shard it
    uvm_caching: tuple[str, ...] = ()  # tables kept in host memory behind a GPU cache of hot rows (CUDA only)

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ValueError("dataset must name a prepared dataset folder")
        names = [t.name for t in self.tasks]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"tasks must be non-empty with unique names, got {names}")
        for task in self.tasks:
            if task.after is not None and task.esmm and task.after not in names:
                raise ValueError(f"task {task.name!r}: after = {task.after!r} is not among tasks {names} (esmm)")

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), tomli_w.dumps(to_mapping(self)))


def load_config(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a TOML config and apply `key=value` overrides (dotted keys, TOML values; bare words are strings).

    Raises:
        MissingInputError: no such file.
        InputError: invalid TOML, an unknown key, a malformed override or an invalid value, naming the key and the file.
    """
    data = read_toml(Path(path))
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise InputError(f"override {override!r} must look like section.key=value")
        *parents, leaf = key.strip().split(".")
        table = data
        for part in parents:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise InputError(f"override {override!r}: {part!r} is not a table")
        table[leaf] = _parse_value(text.strip())
    return from_mapping(Config, data, str(path))


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text
