"""Process group, sharding plan and DistributedModelParallel: the same path for 1 process and N.

Embedding tables are sharded by torchrec's planner (table-wise on the fused kernel unless constrained) and updated by
fbgemm's fused row-wise Adagrad inside the backward pass; dense parameters get Adam / AdamW through torchrec's
KeyedOptimizerWrapper.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, ParameterConstraints, TopologyFactory, TrainerConfig
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys_mtl.config import Config
from recsys_mtl.errors import InputError
from recsys_mtl.model.ranker import MultiTaskRanker

log = logging.getLogger(__name__)


def init_process_group(device: torch.device) -> dist.ProcessGroup:
    """The default process group: joined from torchrun's environment when launched by it (env://), else a
    single-process group on an in-memory store (no port). gloo on CPU, nccl on CUDA."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if dist.is_torchelastic_launched():
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    group = dist.group.WORLD
    if group is None:  # init_process_group sets it, or raises
        raise RuntimeError("torch.distributed has no default process group after init_process_group")
    return group


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def destroy_process_group(failed: bool = False) -> None:
    """Leave the process group after every rank has arrived (a bare destroy could abort peers mid-collective).

    After a failure there is no barrier: the peers may never arrive, and torchrun stops them when this rank exits.
    """
    if dist.is_initialized():
        if dist.get_world_size() > 1 and not failed:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def process_group(device: torch.device) -> Iterator[dist.ProcessGroup]:
    """The default process group (see `init_process_group`) for the block, left when it ends (see
    `destroy_process_group`: with a barrier, unless the block raised)."""
    group = init_process_group(device)
    failed = True
    try:
        yield group
        failed = False
    finally:
        destroy_process_group(failed)


@torch.no_grad()
def average_norm_statistics(module: nn.Module) -> None:
    """Average the batch-norm running statistics over the ranks (each rank normalises its own batches), so that every
    rank predicts alike and a checkpoint holds statistics of all the data; a no-op on one rank. Collective."""
    if world()[1] > 1:
        for norm in (m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            for stats in (norm.running_mean, norm.running_var):
                if stats is not None:
                    dist.all_reduce(stats)
                    stats /= dist.get_world_size()


class _DataParallel(DefaultDataParallelWrapper):
    """DDP over the dense parameters when there is more than one process; on one, nothing to synchronise, and DDP's
    own forward and gradient hooks cost 5% of the default world's step."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        if env.world_size > 1:
            super().wrap(dmp, env, device)


@dataclass
class ShardedRanker:
    model: DistributedModelParallel
    dense_optimizer: KeyedOptimizerWrapper
    plan: ShardingPlan

    @property
    def module(self) -> MultiTaskRanker:
        return self.model.module


def _constraints(model: MultiTaskRanker, cfg: Config) -> dict[str, ParameterConstraints]:
    """Every table on the fused kernel, table-wise unless `cfg.sharding` says otherwise (data-parallel: dense kernel;
    tables in `cfg.uvm_caching`: fbgemm's UVM-caching kernel).

    Raises:
        KeyError: `cfg.sharding` or `cfg.uvm_caching` names a table the model does not have.
    """
    names = model.table_names()
    for option, tables in (("sharding", cfg.sharding), ("uvm_caching", cfg.uvm_caching)):
        unknown = sorted(set(tables) - set(names))
        if unknown:
            raise InputError(f"{option} names unknown tables {unknown}; the tables are {names}")
    constraints = {}
    for name in names:
        sharding = cfg.sharding.get(name, ShardingType.TABLE_WISE.value)
        kernel = EmbeddingComputeKernel.DENSE if sharding == "data_parallel" else EmbeddingComputeKernel.FUSED
        kernel = EmbeddingComputeKernel.FUSED_UVM_CACHING if name in cfg.uvm_caching else kernel
        constraints[name] = ParameterConstraints(sharding_types=[sharding], compute_kernels=[kernel.value])
    return constraints


def shard_model(model: MultiTaskRanker, cfg: Config, device: torch.device) -> ShardedRanker:
    """Plan, shard and wrap `model` (built on the meta device) with its optimizers.

    Frozen parts get no optimizer: `train.freeze` (`MultiTaskRanker.freeze`), the text tables
    (`MultiTaskRanker.is_frozen_table`) and BERT outside its fine-tuned layers.
    """
    if cfg.uvm_caching and device.type != "cuda":
        raise InputError(
            f"uvm_caching = {list(cfg.uvm_caching)} needs --device cuda (it caches host-memory rows on a GPU)"
        )
    pg = init_process_group(device)
    # row-wise Adagrad (one accumulator per row); with the tasks' own columns in the rows, Adagrad per element, so
    # each task's columns keep their own state (embeddings.build_ebc)
    optimizer = torch.optim.Adagrad if model.own_width else RowWiseAdagrad
    apply_optimizer_in_backward(optimizer, list(model.ebc.parameters()), {"lr": cfg.optim.embedding_lr})
    model.freeze(cfg.train.freeze)
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=dist.get_world_size(pg)),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=_constraints(model, cfg),
        storage_reservation=FixedPercentageStorageReservation(percentage=0.15),  # torchrec's recommended policy
    )
    plan = planner.collective_plan(model, get_default_sharders(), pg)
    sharded = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(pg),
        device=device,
        plan=plan,
        # every trainable dense parameter is in every step's graph (inactive tasks are weighted 0, frozen parts do not
        # require grad), so DDP need not search the graph for unused ones; not static: the schedule varies the weights
        data_parallel_wrapper=_DataParallel(static_graph=False, find_unused_parameters=False),
    )
    dense = {
        name: param
        for name, param in in_backward_optimizer_filter(sharded.named_parameters())
        if param.requires_grad and not MultiTaskRanker.is_frozen_table(name)
    }
    optimizer_cls = torch.optim.AdamW if cfg.optim.dense == "adamw" else torch.optim.Adam
    optimizer = KeyedOptimizerWrapper(
        dense,
        lambda params: optimizer_cls(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=True),
    )
    return ShardedRanker(model=sharded, dense_optimizer=optimizer, plan=plan)
