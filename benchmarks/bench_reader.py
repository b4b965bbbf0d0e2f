"""Batch reader throughput (rows/s): our vectorised reader vs a per-row Dataset + collate baseline.

    python benchmarks/bench_reader.py [--impressions 2000000] [--batch-size 4096] [--device cpu|cuda]

The baseline is the map-style pattern of DeepCTR-Torch / torch-rechub examples: index one row at a time into a frame
already in memory, then collate the rows into tensors; it is timed on a slice and reported as rows/s.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import polars as pl
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, str(Path(__file__).parent))
from common import best_of, print_table, write_results

from data_prep.description import load_description
from data_prep.prepare import prepare
from data_prep.synth import WorldConfig, generate_world
from recsys_mtl.data.loader import Dataset, ReadOrder, read_batches


def _drain(dataset: Dataset, device: torch.device, batch_size: int, order: ReadOrder) -> int:
    rows = 0
    for batch in read_batches(dataset, "train", batch_size, order):
        batch = batch.to(device)
        rows += len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return rows


def _per_row_baseline(dataset: Dataset, batch_size: int, num_rows: int) -> None:
    """Row-at-a-time dataset + collate, the common pattern in the peers' examples."""
    schema = dataset.schema
    frame = pl.read_parquet(dataset.folder / schema.splits["train"].files[0], n_rows=num_rows)
    records = frame.to_dicts()
    keys = list(schema.kjt_keys)
    dense_names = [f.name for f in schema.dense_features]
    for start in range(0, len(records), batch_size):
        rows = [records[i] for i in range(start, min(start + batch_size, len(records)))]  # __getitem__ per row
        values, lengths = [], []
        for key in keys:
            for row in rows:
                ids = row[key] if isinstance(row[key], list) else [row[key]]
                values.extend(ids)
                lengths.append(len(ids))
        KeyedJaggedTensor(keys=keys, values=torch.tensor(values), lengths=torch.tensor(lengths, dtype=torch.int32))
        torch.tensor([[row[n] if row[n] is not None else 0.0 for n in dense_names] for row in rows])
        for label in schema.labels:
            torch.tensor([row[label.column] if row[label.column] is not None else 0.0 for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--baseline-rows", type=int, default=100_000)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "ds"
        generate_world(raw, WorldConfig(impressions=args.impressions), progress=False)
        prepare(raw, out, load_description("synthetic"))
        dataset = Dataset(out)
        num_rows = dataset.num_rows("train")
        rows = []
        for name, order in [
            ("reader, in order", ReadOrder()),
            ("reader, shuffled", ReadOrder(shuffle=True)),
            ("reader, rank 0 of 2, shuffled", ReadOrder(0, 2, shuffle=True)),
        ]:
            read = _drain(dataset, device, args.batch_size, order)
            seconds = best_of(lambda order=order: _drain(dataset, device, args.batch_size, order), args.repeats)
            rows.append({"reader": name, "rows": read, "seconds": seconds, "rows_per_s": read / seconds})
        baseline_rows = min(args.baseline_rows, num_rows)
        seconds = best_of(lambda: _per_row_baseline(dataset, args.batch_size, baseline_rows), 1)
        rows.append(
            {
                "reader": "baseline: per-row dataset + collate",
                "rows": baseline_rows,
                "seconds": seconds,
                "rows_per_s": baseline_rows / seconds,
            }
        )
    ours = rows[1]["rows_per_s"]
    for r in rows:
        r["vs_baseline"] = r["rows_per_s"] / rows[-1]["rows_per_s"]
    markdown = print_table(
        rows,
        f"batch reader, batch {args.batch_size}, {len(dataset.schema.kjt_keys)} sparse keys, "
        f"{len(dataset.schema.dense_features)} dense, device {device}",
    )
    print(f"\nshuffled reader: {ours:,.0f} rows/s")
    write_results(
        f"reader_{device.type}", rows, markdown, command="python benchmarks/bench_reader.py " + " ".join(sys.argv[1:])
    )


if __name__ == "__main__":
    main()
