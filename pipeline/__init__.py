"""Distributed pre-training pipeline for BERT and GPT-1 style language models."""

__version__ = "0.1.0"
