"""Pre-training data: epoch plans over the manifest's shards, webdataset reading, dynamic masking, batches.

The trainer needs :class:`PretrainLoader` (and :class:`DataConfig` for its ``data`` section); the other
modules are its parts: ``shards`` (manifest, start-up check, tokenizer check), ``plan`` (the partition of an
epoch over ranks and workers), ``reader`` (tar reading, decoding, bad data), ``npy``, ``masking``,
``collate``, ``dataset`` (the worker side).

Only the config is imported eagerly: a command's ``--help`` that builds its parser from ``DataConfig`` should
not pay for importing torch and webdataset.
"""

from importlib import import_module

from pipeline.data.config import DataConfig

_LAZY = {
    "PretrainLoader": "pipeline.data.loader",
    "ShardSet": "pipeline.data.shards",
    "check_tokenizer": "pipeline.data.shards",
    "open_shard_set": "pipeline.data.shards",
}

__all__ = ["DataConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
