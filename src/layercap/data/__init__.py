"""Reading calibration text and task files (shared by scoring, pruning, evaluation, fine-tuning)."""
