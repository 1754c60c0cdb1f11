"""Evaluation of a pre-trained model: fine-tuning suites against random initialisation (`evaluate`)."""
