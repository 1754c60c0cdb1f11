"""Sharded preprocessing: raw documents -> BERT sentence pairs / GPT blocks in WebDataset shards."""
