"""Distillation: build a student from the teacher (prune.py), its losses (losses.py) and the training loop (train.py)."""
