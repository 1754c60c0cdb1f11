"""The hand-off: pre-trained weights and lineage from a checkpoint or an export; Hugging Face export."""
