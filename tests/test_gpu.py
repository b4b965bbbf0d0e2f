"""The CUDA path (fbgemm GPU kernels, nccl, bf16): these tests skip themselves without a GPU."""

from pathlib import Path

import polars as pl
import pytest
import torch

from recsys_mtl.data.loader import Dataset, ReadOrder, read_batches
from recsys_mtl.score import score
from recsys_mtl.step import build_trainer, predict_batch, train_step
from recsys_mtl.train import train
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
    for step, batch in enumerate(read_batches(dataset, "train", 512, ReadOrder(shuffle=True))):
        metrics = train_step(trainer, batch.to(cuda), step)
        first = metrics["ctr/loss"] if first is None else first
        last = metrics["ctr/loss"]
    assert last < first
    predictions = predict_batch(trainer, next(read_batches(dataset, "test", 256)).to(cuda))
    assert predictions["ctr"].is_cuda
    assert predictions["ctr"].dtype == torch.float32


def test_row_wise_and_uvm_cached_tables_train_on_nccl(text_dataset: Path, tiny_bert: Path) -> None:
    dataset = Dataset(text_dataset)
    cuda = torch.device("cuda")
    cfg = tiny_config(text_dataset, tiny_bert, sharding={"user": "row_wise"}, uvm_caching=["item"])
    trainer = build_trainer(cfg, dataset, cuda)
    plan = str(trainer.sharded.plan)
    assert "row_wise" in plan
    assert "fused_uvm_caching" in plan
    losses = [train_step(trainer, b.to(cuda), i)["ctr/loss"] for i, b in enumerate(read_batches(dataset, "train", 512))]
    assert losses[-1] < losses[0]


def test_scores_on_the_gpu_agree_with_the_cpu(text_dataset: Path, tiny_bert: Path, tmp_path: Path) -> None:
    cuda = torch.device("cuda")
    run = tmp_path / "run"
    train(tiny_config(text_dataset, tiny_bert, train={"max_steps": 30}), run, cuda, progress=False)
    score(run, text_dataset, tmp_path / "cpu", torch.device("cpu"), progress=False)
    score(run, text_dataset, tmp_path / "cuda", cuda, progress=False)
    cpu, gpu = (pl.read_parquet(tmp_path / name / "*.parquet") for name in ("cpu", "cuda"))
    assert cpu["impression_id"].equals(gpu["impression_id"])
    assert (cpu["pred_ctr"] - gpu["pred_ctr"]).abs().max() < 1e-4
