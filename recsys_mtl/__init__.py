"""recsys_mtl: multi-task ranking (CTR, CVR, rating, reads) on torchrec embeddings, BERT text and MMoE/PLE experts."""

__version__ = "0.1.0"
