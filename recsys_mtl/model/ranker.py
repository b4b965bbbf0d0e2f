"""MultiTaskRanker: embeddings + text + dense -> mixture of experts -> one tower per task."""

import itertools
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from recsys_mtl.config import Config, Freezable
from recsys_mtl.data.batch import Batch
from recsys_mtl.data.schema import Schema
from recsys_mtl.hardware import use_bf16
from recsys_mtl.model.embeddings import build_ebc, build_text_ebc, split_rows
from recsys_mtl.model.experts import Mixture, MixtureLevel
from recsys_mtl.model.interaction import CrossNet
from recsys_mtl.model.towers import TaskTower
from recsys_mtl.text import TextFinetuner


def autocast(cfg: Config, device: torch.device) -> torch.autocast:
    """bf16 autocast of the dense network where `train.bf16` resolves to on (losses are computed in fp32 regardless)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(cfg.train.bf16, device))


@dataclass
class RankerOutput:
    """logits: task -> [B] (see tasks.predict for what each stands for); gate_weights: [B, T, E]."""

    logits: dict[str, Tensor]
    gate_weights: Tensor


@dataclass
class RankerInputs:
    """What the dense network reads, feature by feature, for B rows (`MultiTaskRanker.inputs` -> `head`).

    pooled: [B, sum of D_emb], the sparse features' pooled embeddings side by side, in `sparse_names` order.
    own: [B, F, T * D_own], each feature's pooled own columns (the tasks' embeddings, `model.task_embedding_dim`),
        task t's in columns [t * D_own, (t + 1) * D_own); None without them.
    texts: one [B, text_dim] projected vector per text feature.
    dense: [B, D_dense] the standardised dense features (before the dense MLP).
    """

    pooled: Tensor
    own: Tensor | None
    texts: list[Tensor]
    dense: Tensor


def _mlp(in_dim: int, dims: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for d_in, d_out in zip((in_dim, *dims), dims, strict=False):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers)


class MultiTaskRanker(nn.Module):
    """Batch -> RankerOutput.

    Sparse features go through `ebc` (trainable, fused optimizer); text features through frozen tables of precomputed
    BERT vectors (`text_ebc`, detached) or a fine-tuned BERT (`text_finetuner`), then a trainable projection each;
    dense features through a small MLP. Their concatenation [B, D_in] feeds the mixture; its T outputs feed the towers.
    With `model.task_embedding_dim`, each task also has embeddings of its own in every table's rows (STEM-style: a
    sparse task's ids learn from its own gradients, not drowned by the dense tasks' ones), which only its tower reads.
    """

    def __init__(
        self,
        cfg: Config,
        schema: Schema,
        text_dims: dict[str, int],
        texts: dict[str, list[str]] | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.task_names = cfg.task_names
        self.num_sparse = len(schema.sparse_features)
        self.own_dim = cfg.model.task_embedding_dim
        self.own_width = self.own_dim * len(self.task_names)
        self.ebc = build_ebc(schema, device or torch.device("meta"), self.own_width)
        # the sparse features by table, widest first, as the collection lays out its output on one process
        self.sparse_names = [f for c in self.ebc.embedding_bag_configs() for f in c.feature_names]
        # runs of consecutive features of one embedding width: (D_emb, number of features)
        dims = [c.embedding_dim - self.own_width for c in self.ebc.embedding_bag_configs() for _ in c.feature_names]
        self.width_runs = [(dim, len(list(run))) for dim, run in itertools.groupby(dims)]
        schema_order = [f.name for f in schema.sparse_features]  # the batch's order
        self.schema_positions = [schema_order.index(name) for name in self.sparse_names]
        self.text_names = [t.name for t in schema.texts] if cfg.model.text_dim > 0 else []
        self.text_ebc: EmbeddingBagCollection | None = None
        self.text_finetuner: TextFinetuner | None = None
        if self.text_names and cfg.text.finetune_layers > 0:
            self.text_finetuner = TextFinetuner(cfg.text, texts or {})
            text_dims = dict.fromkeys(self.text_names, self.text_finetuner.dim)
        elif self.text_names:
            self.text_ebc = build_text_ebc(schema, text_dims, device or torch.device("meta"))
        self.text_projections = nn.ModuleDict(
            {name: nn.Linear(text_dims[name], cfg.model.text_dim) for name in self.text_names}
        )
        self.dense_mlp = _mlp(len(schema.dense_features), cfg.model.dense_dims) if schema.dense_features else None
        in_dim = sum(schema.feature_table(f).embedding_dim for f in schema.sparse_features)
        in_dim += cfg.model.text_dim * len(self.text_names)
        in_dim += (
            cfg.model.dense_dims[-1] if schema.dense_features and cfg.model.dense_dims else len(schema.dense_features)
        )
        norms = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
        self.input_norm = norms[cfg.model.input_norm](in_dim) if cfg.model.input_norm in norms else nn.Identity()
        cross = cfg.model.cross_layers
        self.cross = CrossNet(in_dim, cross, cfg.model.cross_rank) if cross else nn.Identity()
        self.mixture = Mixture(in_dim, len(cfg.tasks), cfg.model, [t.weight for t in cfg.tasks])
        tower_dim = self.mixture.out_dim + self.own_dim * self.num_sparse
        self.towers = nn.ModuleDict(
            {t: TaskTower(tower_dim, cfg.model.tower_dims, cfg.model.dropout) for t in self.task_names}
        )

    def table_names(self) -> list[str]:
        """The embedding tables: the sparse features' tables, then the text tables (`TEXT_TABLE_PREFIX` + text)."""
        collections = [ebc for ebc in (self.ebc, self.text_ebc) if ebc is not None]
        return [c.name for ebc in collections for c in ebc.embedding_bag_configs()]

    def freeze(self, parts: tuple[Freezable, ...]) -> None:
        """Stop training `parts` (`train.freeze`): "shared" (the mixture), "text_projection", "bert" (the fine-tuned
        BERT layers)."""
        modules: dict[str, list[nn.Module]] = {
            "shared": [self.mixture],
            "text_projection": [self.text_projections],
            "bert": [self.text_finetuner] if self.text_finetuner is not None else [],
        }
        for part in parts:
            for module in modules[part]:
                for param in module.parameters():
                    param.requires_grad_(False)

    @staticmethod
    def is_frozen_table(parameter_name: str) -> bool:
        """Whether a parameter (named as in this model, wrapped or not) belongs to the frozen text tables: their
        output is detached, so the fused kernel never sees a gradient for them and no optimizer may hold them."""
        return "text_ebc." in parameter_name

    def text_features(self, batch: Batch) -> list[Tensor]:
        """Projected text vectors, one [B, text_dim] per text feature."""
        if not self.text_names:
            return []
        text_kjt = batch.sparse.split([self.num_sparse, len(batch.sparse.keys()) - self.num_sparse])[1]
        if self.text_finetuner is not None:
            ids = {name: jt.values() for name, jt in text_kjt.to_dict().items()}
            vectors = self.text_finetuner(ids)
        else:
            assert self.text_ebc is not None  # text_names without a finetuner: built in __init__
            vectors = self.text_ebc(text_kjt).to_dict()  # [B, D_text] each; frozen: no gradient flows back
            vectors = {name: v.detach() for name, v in vectors.items()}
        return [self.text_projections[name](vectors[name]) for name in self.text_names]

    def forward(self, batch: Batch) -> RankerOutput:
        return self.head(self.inputs(batch))

    def inputs(self, batch: Batch) -> RankerInputs:
        """The batch's per-feature inputs of the dense network (explain.py perturbs them between here and `head`).

        The tables sum their bags (`build_ebc`): each pooled row is divided by its bag's length here (a multi-hot
        feature's mean; an empty bag stays 0), in the same pass that splits the rows [D_emb | T * D_own] into the
        shared columns and the tasks' own."""
        sparse_kjt = batch.sparse.split([self.num_sparse, len(batch.sparse.keys()) - self.num_sparse])[0]
        pooled = self.ebc(sparse_kjt)  # features by table on one process, by shard on several
        in_order = pooled.keys() == self.sparse_names
        values = pooled.values() if in_order else KeyedTensor.regroup([pooled], [self.sparse_names])[0]
        lengths = sparse_kjt.lengths().view(self.num_sparse, len(batch))[self.schema_positions]  # [F, B]
        scales = 1.0 / lengths.T.clamp(min=1).to(values.dtype).unsqueeze(2)  # [B, F, 1]
        shared, own = split_rows(values, scales, self.width_runs, self.own_width)  # [B, sum D_emb], [B, F, T * D_own]
        return RankerInputs(shared, own if self.own_width else None, self.text_features(batch), batch.dense)

    def head(self, inputs: RankerInputs) -> RankerOutput:
        """The dense network: the features concatenated [B, D_in] -> mixture -> one tower per task."""
        parts = [inputs.pooled, *inputs.texts]
        if self.dense_mlp is not None:
            parts.append(self.dense_mlp(inputs.dense))  # [B, D_dense]
        features = torch.cat(parts, dim=1)  # [B, D_in]
        task_inputs, gate_weights = self.mixture(self.cross(self.input_norm(features)))  # [B, T, D_exp], [B, T, E]
        tower_inputs = task_inputs.transpose(0, 1).float()  # [T, B, D_exp]
        if inputs.own is not None:  # each tower also reads its task's own embeddings: [T, B, D_exp + F * D_own]
            rows, num_tasks = len(inputs.own), len(self.task_names)
            own = inputs.own.view(rows, self.num_sparse, num_tasks, self.own_dim)  # [B, F, T, D_own]
            own = own.permute(2, 0, 1, 3)  # [T, B, F, D_own]
            tower_inputs = torch.cat([tower_inputs, own.flatten(2).float()], 2)
        with torch.autocast(task_inputs.device.type, enabled=False):  # the small heads in fp32: bf16 cost rating RMSE
            logits = {t: self.towers[t](x) for t, x in zip(self.task_names, tower_inputs, strict=True)}
        return RankerOutput(logits=logits, gate_weights=gate_weights)

    def tower_weights(self) -> list[Tensor]:
        return [w for tower in self.towers.values() for w in cast(TaskTower, tower).weight_matrices()]

    def shared_parameters(self) -> list[Tensor]:
        """The last shared layer (GradNorm measures each task's gradient there)."""
        experts = cast(MixtureLevel, self.mixture.levels[-1]).experts
        return [experts.weights[-1]]
