"""DeepSpeed training: the loop shared by pre-training and fine-tuning, checkpoints, tracking, LAMB."""
