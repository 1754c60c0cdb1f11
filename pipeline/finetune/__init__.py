"""Fine-tuning: classification, sentence pairs, SQuAD 1.1 / 2.0 and multiple choice, for BERT and GPT-1."""
