"""Pre-training data: epoch plans over the manifest's shards, webdataset reading, dynamic masking, batches.

The trainer needs :class:`PretrainLoader` (and :class:`DataConfig` for its ``data`` section); the other
modules are its parts: ``shards`` (manifest, start-up check, tokenizer check), ``plan`` (the partition of an
epoch over ranks and workers), ``reader`` (tar reading, decoding, bad data), ``masking``, ``collate``,
``dataset`` (the worker side).
"""

from pipeline.data.config import DataConfig
from pipeline.data.loader import PretrainLoader
from pipeline.data.shards import ShardSet, check_tokenizer, open_shard_set

__all__ = ["DataConfig", "PretrainLoader", "ShardSet", "check_tokenizer", "open_shard_set"]
