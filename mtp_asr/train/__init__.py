"""Training: the training loop, tasks (speech, text), checkpoints, MWER fine-tuning."""
