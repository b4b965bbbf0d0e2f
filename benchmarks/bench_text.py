"""Text encoding throughput (texts/s) with the packaged all-MiniLM-L6-v2, each variant against the way it ran before
(fp32, batches of 256 in input order), with its cosine agreement to fp32 torch.

    python benchmarks/bench_text.py [--texts titles|reviews] [--num-texts 2000] [--max-length 128] [--device cpu|cuda]
        [--out NAME]

titles: synthetic item titles (about 11 tokens); reviews: the shipped women's clothing reviews, title + text (median
80 tokens), the long texts. Variants: fp32 and bf16 in length-sorted batches of `text.batch_size` (the shipped way),
dynamic int8 Linear layers, and ONNX Runtime (fp32, all graph optimisations) where onnx and onnxruntime are installed.
"""

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
from common import best_of, print_table, write_results

from data_prep.synth import WorldConfig, generate_world
from recsys_mtl.config import TextConfig
from recsys_mtl.text import TextEncoder, mean_pool

REVIEWS = Path(__file__).parents[1] / "../shared/data/womens-clothing-reviews/womens_clothing_ecommerce_reviews.csv"
BEFORE_BATCH = 256  # text.batch_size before length-sorted batches


def load_texts(kind: str, num: int) -> list[str]:
    if kind == "reviews":
        reviews = pl.read_csv(REVIEWS).select(
            pl.concat_str("Title", "Review Text", separator=". ", ignore_nulls=True).alias("text")
        )
        return reviews.filter(pl.col("text").str.len_chars() > 0)["text"].to_list()[:num]
    with tempfile.TemporaryDirectory() as tmp:
        raw = generate_world(Path(tmp) / "raw", WorldConfig(impressions=1000, items=num), progress=False)
        return pl.read_parquet(raw / "items.parquet")["title"].to_list()[:num]


def onnx_encoder(encoder: TextEncoder, texts: list[str]):
    """encode(texts) -> [N, D] through ONNX Runtime on the CPU, the same length-sorted batches; None without it."""
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime is not installed: its variant is skipped")
        return None
    names = ["input_ids", "attention_mask", "token_type_ids"]
    sample = encoder.tokenizer(texts[:4], padding=True, return_tensors="pt")

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = encoder.model

        def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
            return self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state  # [N, L, D]

    graph = io.BytesIO()
    axes = {name: {0: "batch", 1: "tokens"} for name in [*names, "hidden"]}
    torch.onnx.export(Hidden(), tuple(sample[n] for n in names), graph, dynamo=False, input_names=names,
                      output_names=["hidden"], dynamic_axes=axes)  # fmt: skip
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(graph.getvalue(), options, providers=["CPUExecutionProvider"])
    order = np.argsort(encoder.token_lengths(texts), kind="stable")

    def encode(texts: list[str]) -> Tensor:
        out = torch.empty(len(texts), encoder.dim)
        for start in range(0, len(texts), encoder.cfg.batch_size):
            rows = order[start : start + encoder.cfg.batch_size]
            tokens = encoder.tokenizer(
                [texts[i] for i in rows], padding=True, truncation=True, max_length=encoder.cfg.max_length,
                return_tensors="np",
            )  # fmt: skip
            hidden = session.run(None, {n: tokens[n].astype(np.int64) for n in names})[0]  # [n, L, D]
            out[torch.from_numpy(rows)] = mean_pool(
                torch.from_numpy(hidden), torch.from_numpy(tokens["attention_mask"])
            )
        return out

    return encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", choices=["titles", "reviews"], default="titles")
    parser.add_argument("--num-texts", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=TextConfig().max_length)
    parser.add_argument("--batch-size", type=int, default=TextConfig().batch_size)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", help="results name under benchmarks/results (default: text_<texts>_<device>)")
    args = parser.parse_args()
    device = torch.device(args.device)
    texts = load_texts(args.texts, args.num_texts)

    def encoder(dtype: str, batch_size: int = args.batch_size) -> TextEncoder:
        return TextEncoder(TextConfig(dtype=dtype, batch_size=batch_size, max_length=args.max_length), device)

    before = encoder("float32", BEFORE_BATCH)
    in_order = np.zeros(len(texts), dtype=np.int64)  # equal lengths: the stable sort keeps the input order
    variants = {
        f"float32, batches of {BEFORE_BATCH} in input order (before)": lambda t: before.encode(t, lengths=in_order),
        f"float32, length-sorted batches of {args.batch_size}": encoder("float32").encode,
        f"bfloat16, length-sorted batches of {args.batch_size}": encoder("bfloat16").encode,
    }
    if device.type == "cpu":
        int8 = encoder("float32")
        int8.model = torch.ao.quantization.quantize_dynamic(int8.model, {torch.nn.Linear}, dtype=torch.qint8)
        variants["int8 dynamic Linear layers, sorted"] = int8.encode
        onnx = onnx_encoder(encoder("float32"), texts)
        if onnx is not None:
            variants["ONNX Runtime float32, sorted"] = onnx
    rows, reference = [], None
    for name, encode in variants.items():
        vectors = encode(texts)
        seconds = best_of(lambda encode=encode: encode(texts), 2)
        reference = vectors if reference is None else reference
        cosine = torch.nn.functional.cosine_similarity(vectors, reference, dim=1)
        rows.append(
            {
                "variant": name,
                "texts_per_s": len(texts) / seconds,
                "cosine_min": round(cosine.min().item(), 5),
                "cosine_mean": round(cosine.mean().item(), 5),
            }
        )
        print(rows[-1], flush=True)
    for row in rows:
        row["speedup"] = row["texts_per_s"] / rows[0]["texts_per_s"]
    markdown = print_table(
        rows, f"text encoding, all-MiniLM-L6-v2, {len(texts)} {args.texts}, max_length {args.max_length}, {device}"
    )
    command = "python benchmarks/bench_text.py " + " ".join(sys.argv[1:])
    write_results(args.out or f"text_{args.texts}_{device.type}", rows, markdown, command=command)


if __name__ == "__main__":
    main()
