"""The CUDA path (fbgemm GPU kernels, nccl, bf16): these tests skip themselves without a GPU."""

from pathlib import Path

import pytest
import torch

from recsys_mtl.data.loader import Dataset, read_batches
from recsys_mtl.trainer import build_trainer, predict_batch, train_step
from tests.conftest import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_training_lowers_the_loss_with_fused_gpu_kernels(text_dataset: Path, tiny_bert: Path, bf16: bool) -> None:
    dataset = Dataset(text_dataset)
    cuda = torch.device("cuda")
    trainer = build_trainer(tiny_config(text_dataset, tiny_bert, train={"bf16": bf16}), dataset, cuda)
    first, last = None, None
    for step, batch in enumerate(read_batches(dataset, "train", 512, shuffle=True)):
        metrics = train_step(trainer, batch.to(cuda), step)
        first = metrics["ctr/loss"] if first is None else first
        last = metrics["ctr/loss"]
    assert last < first
    predictions = predict_batch(trainer, next(read_batches(dataset, "test", 256)).to(cuda))
    assert predictions["ctr"].is_cuda
    assert predictions["ctr"].dtype == torch.float32
