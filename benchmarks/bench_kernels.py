"""Kernels against this machine's limits, measured side by side in one run.

    python benchmarks/bench_kernels.py [--config configs/demo.toml] [--quick] [--device cpu|cuda] [--out NAME]

1. Ceilings: memory bandwidth (copy, triad) and matmul rate (fp32, bf16).
2. Embedding training step at realistic sizes (1M users, 500k items, 100k ads, 8 small tables, a multi-hot feature,
   batch 4096): fbgemm's fused TBE with row-wise Adagrad in backward (torchrec EBC under DMP, as the project uses it)
   against nn.EmbeddingBag with torch's Adagrad, sparse and dense gradients; samples/s and the bandwidth of the
   embedding rows touched (3 x the looked-up rows' bytes: read forward, read + write in the update) against copy.
3. Fused experts (stacked weights, one batched matmul) against a per-expert loop; the dense network (cross layers,
   MMoE, towers) eager against torch.compile.
4. The project's full training step on the config's dataset at batch 4096, in fp32 and, where the device has native
   bf16, under bf16 autocast, against the batch reader; model FLOP utilisation (dense FLOPs per sample x samples/s /
   the matmul rate of the dtype the step runs its matmuls in, measured just before each round of steps: the median
   round's); a torch.profiler table of three steps in the dtype `train.bf16 = "auto"` picks.
Writes benchmarks/results/kernels_<device>.json and .md (or <out>.json and .md).
"""

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingEnv
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

sys.path.insert(0, str(Path(__file__).parent))
from common import best_of, print_table, write_results

from recsys_mtl.config import ModelConfig, load_config
from recsys_mtl.data.loader import Dataset, ReadOrder, read_batches
from recsys_mtl.distributed import init_process_group
from recsys_mtl.hardware import use_bf16
from recsys_mtl.model.experts import ExpertStack, Mixture
from recsys_mtl.model.interaction import CrossNet
from recsys_mtl.model.towers import TaskTower
from recsys_mtl.step import build_trainer, train_step

BATCH = 4096
# name -> (rows, dim, features); "category" also feeds the multi-hot feature
TABLES = {"user": (1_000_000, 32, 1), "item": (500_000, 32, 1), "ad": (100_000, 16, 1), "category": (1_000, 16, 1)}
TABLES |= {f"small{i}": (1_000, 16, 1) for i in range(8)}
MULTI_HOT_MAX = 5


def _timed(step: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Seconds per call: the mean over `repeats` calls after two warm-up calls."""
    for _ in range(2):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ceilings(device: torch.device, quick: bool) -> dict[str, float]:
    """Copy and triad bandwidth (GB/s) over 256 MB arrays; matmul GFLOP/s at [4096, 1024] x [1024, 1024]."""
    n = (1 << 24) if quick else (1 << 26)
    a, b, c = (torch.rand(n, device=device) for _ in range(3))
    copy = best_of(lambda: (b.copy_(a), _sync(device)), 5)
    triad = best_of(lambda: (torch.add(b, c, alpha=3.0, out=a), _sync(device)), 5)
    out = {"copy GB/s": 2 * 4 * n / copy / 1e9, "triad GB/s": 3 * 4 * n / triad / 1e9}
    for dtype in (torch.float32, torch.bfloat16):
        out[f"matmul {str(dtype).removeprefix('torch.')} GFLOP/s"] = matmul_rate(dtype, device) / 1e9
    return out


def matmul_rate(dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of [4096, 1024] x [1024, 1024] in `dtype` (10 calls; 2 for bf16 on a CPU, where it may be emulated)."""
    x = torch.randn(BATCH, 1024, device=device, dtype=dtype)
    w = torch.randn(1024, 1024, device=device, dtype=dtype)
    seconds = _timed(lambda: x @ w, 2 if dtype == torch.bfloat16 and device.type == "cpu" else 10, device)
    return 2 * BATCH * 1024 * 1024 / seconds


def _embedding_batches(num: int, device: torch.device) -> list[KeyedJaggedTensor]:
    """Skewed ids (a few hot rows, a long tail) for every feature, and 0-5 categories per row."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(num):
        values, lengths = [], []
        for rows, _, _ in TABLES.values():
            values.append((rows * torch.rand(BATCH, generator=generator) ** 3).long())
            lengths.append(torch.ones(BATCH, dtype=torch.int32))
        multi = torch.randint(0, MULTI_HOT_MAX + 1, (BATCH,), generator=generator, dtype=torch.int32)
        values.append(torch.randint(0, TABLES["category"][0], (int(multi.sum()),), generator=generator))
        lengths.append(multi)
        keys = [*TABLES, "recent_categories"]
        kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
        batches.append(kjt.to(device))
    return batches


def _table_of(key: str) -> str:
    return "category" if key == "recent_categories" else key


def _fused_tbe_step(batches: list[KeyedJaggedTensor], device: torch.device) -> Callable[[], None]:
    """torchrec EBC, table-wise on the fused kernel, row-wise Adagrad applied inside backward (the project's path)."""
    configs = [
        EmbeddingBagConfig(
            name=name,
            num_embeddings=rows,
            embedding_dim=dim,
            feature_names=[k for k in [*TABLES, "recent_categories"] if _table_of(k) == name],
            pooling=PoolingType.SUM,  # as the project pools (the multi-hot means are taken in the ranker)
        )
        for name, (rows, dim, _) in TABLES.items()
    ]
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.1})
    pg = init_process_group(device)
    constraints = {
        name: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"]) for name in TABLES
    }
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device=device.type), constraints=constraints
    )
    plan = planner.collective_plan(ebc, get_default_sharders(), pg)
    model = DistributedModelParallel(ebc, env=ShardingEnv.from_process_group(pg), device=device, plan=plan)
    state = {"i": 0}

    def step() -> None:
        kjt = batches[state["i"] % len(batches)]
        state["i"] += 1
        pooled = model(kjt).values()  # [B, sum of dims]
        pooled.square().mean().backward()  # the fused optimizer updates the touched rows here

    return step


def _embedding_bag_step(batches: list[KeyedJaggedTensor], device: torch.device, sparse: bool) -> Callable[[], None]:
    """One nn.EmbeddingBag per table and torch's Adagrad (sparse or dense gradients)."""
    bags = nn.ModuleDict(
        {name: nn.EmbeddingBag(rows, dim, mode="sum", sparse=sparse) for name, (rows, dim, _) in TABLES.items()}
    ).to(device)
    optimizer = torch.optim.Adagrad(bags.parameters(), lr=0.1)
    state = {"i": 0}

    def step() -> None:
        kjt = batches[state["i"] % len(batches)]
        state["i"] += 1
        pooled = [
            bags[_table_of(key)](jt.values(), jt.offsets()[:-1].long()) for key, jt in kjt.to_dict().items()
        ]  # [B, D] each
        optimizer.zero_grad()
        torch.cat(pooled, dim=1).square().mean().backward()
        optimizer.step()

    return step


def embedding_rows(device: torch.device, copy_gbs: float, quick: bool) -> list[dict]:
    batches = _embedding_batches(8, device)
    lookups = sum(int(jt.values().numel()) * TABLES[_table_of(k)][1] for k, jt in batches[0].to_dict().items())
    step_bytes = 3 * 4 * lookups  # read forward; read and write the row in the update
    variants = [
        ("fbgemm fused TBE, row-wise Adagrad (ours)", _fused_tbe_step(batches, device), 20),
        ("nn.EmbeddingBag(sparse=True) + Adagrad", _embedding_bag_step(batches, device, sparse=True), 10),
        ("nn.EmbeddingBag dense grad + Adagrad", _embedding_bag_step(batches, device, sparse=False), 2 if quick else 4),
    ]
    rows = []
    for name, step, repeats in variants:
        seconds = _timed(step, repeats, device)
        rows.append(
            {
                "embedding step": name,
                "samples/s": BATCH / seconds,
                "ms/step": 1000 * seconds,
                "rows GB/s": step_bytes / seconds / 1e9,
                "of copy": step_bytes / seconds / 1e9 / copy_gbs,
            }
        )
        print(rows[-1], flush=True)
    for row in rows:
        row["vs fused"] = row["samples/s"] / rows[0]["samples/s"]
    return rows


class _ExpertLoop(nn.Module):
    """The per-expert loop the stacked experts replace: E separate MLPs, outputs stacked."""

    def __init__(self, num_experts: int, in_dim: int, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            nn.Sequential(
                *(
                    m
                    for d_in, d_out in zip((in_dim, *dims[:-1]), dims, strict=True)
                    for m in (nn.Linear(d_in, d_out), nn.ReLU())
                )
            )
            for _ in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([expert(x) for expert in self.experts], dim=1)  # [B, E, D_exp]


class _DenseNet(nn.Module):
    """The dense network after the embeddings: cross layers, the mixture, one tower per task."""

    def __init__(self, in_dim: int, cfg: ModelConfig, num_tasks: int) -> None:
        super().__init__()
        self.cross = CrossNet(in_dim, cfg.cross_layers)
        self.mixture = Mixture(in_dim, num_tasks, cfg)
        self.towers = nn.ModuleList(TaskTower(self.mixture.out_dim, cfg.tower_dims) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task_inputs, _ = self.mixture(self.cross(x))  # [B, T, D_exp]
        return torch.stack([tower(task_inputs[:, t]) for t, tower in enumerate(self.towers)], dim=1)  # [B, T]


def _train_rate(module: nn.Module, x: torch.Tensor, device: torch.device, repeats: int) -> float:
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad()
        module(x).square().mean().backward()
        optimizer.step()

    return BATCH / _timed(step, repeats, device)


def dense_rows(cfg_model: ModelConfig, in_dim: int, device: torch.device, quick: bool) -> list[dict]:
    x = torch.randn(BATCH, in_dim, device=device)
    repeats = 5 if quick else 20
    fused = ExpertStack(cfg_model.num_experts, in_dim, cfg_model.expert_dims).to(device)
    loop = _ExpertLoop(cfg_model.num_experts, in_dim, cfg_model.expert_dims).to(device)
    rows = [
        {
            "dense part": f"{cfg_model.num_experts} experts {cfg_model.expert_dims}, stacked (ours)",
            "samples/s": _train_rate(fused, x, device, repeats),
        },
        {"dense part": "the same experts, a per-expert loop", "samples/s": _train_rate(loop, x, device, repeats)},
    ]
    net = _DenseNet(in_dim, cfg_model, 4).to(device)
    rows.append(
        {"dense part": "cross + MMoE + 4 towers, eager (ours)", "samples/s": _train_rate(net, x, device, repeats)}
    )
    start = time.perf_counter()
    compiled = torch.compile(net)
    _train_rate(compiled, x, device, 1)  # compiles
    compile_seconds = time.perf_counter() - start
    rate = _train_rate(compiled, x, device, repeats)
    rows.append({"dense part": f"the same, torch.compile ({compile_seconds:.0f} s to compile)", "samples/s": rate})
    for row in rows:
        print(row, flush=True)
    return rows


def full_step_rows(config: Path, device: torch.device, bf16: bool, quick: bool) -> tuple[list[dict], str]:
    """The project's train_step at batch 4096 on the config's dataset (bf16 autocast or not); the reader over the same
    rows; MFU against the matmul rate of the dtype in use, each round of steps paired with a measure of that rate
    taken just before it (the median round's: both move with a shared machine's load); a profile of three steps."""
    cfg = load_config(config)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=BATCH, bf16=bf16))
    dataset = Dataset(cfg.dataset)
    trainer = build_trainer(cfg, dataset, device)
    num_batches = 6 if quick else 24
    batches = [
        b.to(device)
        for _, b in zip(
            range(num_batches), read_batches(dataset, "train", BATCH, ReadOrder(shuffle=True)), strict=False
        )
    ]
    state = {"i": 0}

    def step() -> None:
        train_step(trainer, batches[state["i"] % len(batches)], state["i"])
        state["i"] += 1

    dtype = torch.bfloat16 if bf16 else torch.float32
    rounds = [(matmul_rate(dtype, device), _timed(step, num_batches, device)) for _ in range(3 if quick else 5)]
    seconds = statistics.median(s for _, s in rounds)  # rounds: an odd number
    reader_seconds = (
        best_of(
            lambda: [
                b.to(device)
                for _, b in zip(
                    range(num_batches), read_batches(dataset, "train", BATCH, ReadOrder(shuffle=True)), strict=False
                )
            ],
            3,
        )
        / num_batches
    )
    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_sample = counter.get_total_flops() / BATCH
    utilisation = statistics.median(flops_per_sample * BATCH / s / rate for rate, s in rounds)
    with profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ) as prof:
        for _ in range(3):
            step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
    name = "bf16" if bf16 else "fp32"
    rows = [
        {"measure": f"training step ({name}), samples/s", "value": BATCH / seconds},
        {"measure": f"batch reader rows/s over training samples/s ({name})", "value": seconds / reader_seconds},
        {"measure": "dense FLOPs per sample (forward + backward)", "value": flops_per_sample},
        {
            "measure": f"matmul rate ({name}) beside the steps, GFLOP/s (median of {len(rounds)})",
            "value": statistics.median(rate for rate, _ in rounds) / 1e9,
        },
        {"measure": f"model FLOP utilisation ({name} step, of that matmul rate)", "value": utilisation},
    ]
    for row in rows:
        print(row, flush=True)
    return rows, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller arrays")
    parser.add_argument("--out", help="results name under benchmarks/results (default: kernels_<device>)")
    args = parser.parse_args()
    device = torch.device(args.device)
    limits = ceilings(device, args.quick)
    print(limits, flush=True)
    embedding = embedding_rows(device, limits["copy GB/s"], args.quick)
    cfg = load_config(args.config)
    dense = dense_rows(cfg.model, 400, device, args.quick)
    step, profile_table = [], ""
    auto = use_bf16("auto", device)
    for bf16 in (False, True) if auto else (False,):
        rows, table = full_step_rows(args.config, device, bf16, args.quick)
        step, profile_table = step + rows, table if bf16 == auto else profile_table
    markdown = "\n".join(
        [
            print_table([limits], f"this machine's ceilings ({args.device})"),
            print_table(
                embedding,
                f"embedding training step, batch {BATCH}, tables {TABLES['user'][0]:,} users, "
                f"{TABLES['item'][0]:,} items, {TABLES['ad'][0]:,} ads + 9 small, a multi-hot feature",
            ),
            print_table(dense, f"dense part, forward + backward + Adam, batch {BATCH}, input width 400"),
            print_table(step, f"the project's training step ({args.config}, batch {BATCH})"),
            f"\nprofile of three training steps ({'bf16' if auto else 'fp32'}, self CPU time)",
            f"\n```\n{profile_table}\n```",
        ]
    )
    print(f"\nprofile of three training steps\n{profile_table}")
    command = "python benchmarks/bench_kernels.py " + " ".join(sys.argv[1:])
    write_results(args.out or f"kernels_{args.device}", [limits, *embedding, *dense, *step], markdown, command=command)


if __name__ == "__main__":
    main()
