"""Text encoding throughput (texts/s) with the packaged all-MiniLM-L6-v2: fp32 vs bf16 weights vs dynamic int8,
and each variant's cosine agreement with fp32.

    python benchmarks/bench_text.py [--texts titles|reviews] [--num-texts 2000] [--max-length 128] [--device cpu|cuda]

titles: synthetic item titles (about 11 tokens); reviews: the shipped women's clothing reviews, title + text (median
80 tokens), the long texts.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import best_of, print_table, write_results

from data_prep.synth import WorldConfig, generate_world
from recsys_mtl.config import TextConfig
from recsys_mtl.text import TextEncoder

REVIEWS = Path(__file__).parents[1] / "../shared/data/womens-clothing-reviews/womens_clothing_ecommerce_reviews.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", choices=["titles", "reviews"], default="titles")
    parser.add_argument("--num-texts", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=TextConfig().max_length)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.texts == "reviews":
        reviews = pl.read_csv(REVIEWS).select(
            pl.concat_str("Title", "Review Text", separator=". ", ignore_nulls=True).alias("text")
        )
        texts = reviews.filter(pl.col("text").str.len_chars() > 0)["text"].to_list()[: args.num_texts]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            world = WorldConfig(impressions=1000, items=args.num_texts)
            raw = generate_world(Path(tmp) / "raw", world, progress=False)
            texts = pl.read_parquet(raw / "items.parquet")["title"].to_list()[: args.num_texts]
    rows, reference = [], None
    for variant in ("float32", "bfloat16", "int8-dynamic"):
        if variant == "int8-dynamic" and device.type != "cpu":
            continue
        dtype = "float32" if variant == "int8-dynamic" else variant
        encoder = TextEncoder(TextConfig(dtype=dtype, batch_size=args.batch_size, max_length=args.max_length), device)
        if variant == "int8-dynamic":
            encoder.model = torch.ao.quantization.quantize_dynamic(encoder.model, {torch.nn.Linear}, dtype=torch.qint8)
        vectors = encoder.encode(texts)
        seconds = best_of(lambda encoder=encoder: encoder.encode(texts), 2)
        reference = vectors if reference is None else reference
        cosine = torch.nn.functional.cosine_similarity(vectors, reference, dim=1)
        rows.append(
            {
                "variant": variant,
                "texts_per_s": len(texts) / seconds,
                "cosine_min": round(cosine.min().item(), 5),
                "cosine_mean": round(cosine.mean().item(), 5),
            }
        )
        print(rows[-1], flush=True)
    for r in rows:
        r["speedup"] = r["texts_per_s"] / rows[0]["texts_per_s"]
    markdown = print_table(
        rows,
        f"text encoding, all-MiniLM-L6-v2, {len(texts)} {args.texts}, max_length {args.max_length}, batch "
        f"{args.batch_size}, {device}",
    )
    write_results(
        f"text_{args.texts}_{device.type}",
        rows,
        markdown,
        command="python benchmarks/bench_text.py " + " ".join(sys.argv[1:]),
    )


if __name__ == "__main__":
    main()
