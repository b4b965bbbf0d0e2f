"""Batch: one step's worth of model inputs, labels and key columns."""

from dataclasses import dataclass

import polars as pl
import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Batch:
    """Model inputs and targets for B rows.

    Attributes:
        sparse: id, multi-hot and text-row features, keyed as `Schema.kjt_keys`; lengths [F * B], feature-major.
        dense: normalised dense features [B, D_dense] float32 (nulls are 0, the train mean).
        labels: task -> [B] float32; 0 where the label is absent.
        masks: task -> [B] bool; true where the label is present.
        keys: the key columns (raw values, B rows), carried to scores; stays on the CPU.
    """

    sparse: KeyedJaggedTensor
    dense: Tensor
    labels: dict[str, Tensor]
    masks: dict[str, Tensor]
    keys: pl.DataFrame

    def __len__(self) -> int:
        return self.dense.shape[0]

    def to(self, device: torch.device) -> "Batch":
        """The batch with its tensors on `device` (the keys stay a CPU frame)."""
        return Batch(
            sparse=self.sparse.to(device),
            dense=self.dense.to(device),
            labels={t: v.to(device) for t, v in self.labels.items()},
            masks={t: m.to(device) for t, m in self.masks.items()},
            keys=self.keys,
        )
