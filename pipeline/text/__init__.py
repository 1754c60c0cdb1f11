"""Raw text: readers for txt/jsonl/parquet inputs and sentence splitting."""
