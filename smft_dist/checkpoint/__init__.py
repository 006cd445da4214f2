"""Checkpoint files, below every tool that reads them: `layout` (the step folder, its manifest,
memory shards, dense weights and row-sparse optimizer state) and `model` (a checkpoint as one whole
model). The trainer's `Checkpointer` (train/checkpoint.py) writes and resumes runs on top of it."""
